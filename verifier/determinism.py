"""Class (g) checks on kernel.cu: results cannot depend on arrival order.

A float atomic (atomicAdd on a float, `red`/`atom` PTX with a floating type, an atomic_ref
over a floating type) would make a sum depend on which thread arrives first. The only atomics
the kernel may hold are the integer task counters (`counter_ref`, an atomic_ref over u64).
This is a syntactic check of the text, not an SMT query: what it rules out is a construct.
"""

from __future__ import annotations

import re

FLOAT_ATOMICS = (
    r"\batomic(Add|Sub|Exch|Min|Max|CAS)\w*\s*\(",  # CUDA atomics: the counters use none
    r"\b(red|atom)\.[\w.]*\.(f16|bf16|f32|f64)\b",  # PTX float reductions
    r"atomic_ref\s*<\s*(float|double|__half|__nv_bfloat16|bf16)",  # libcu++ float atomics
)


def float_atomics(kernel: str) -> str:
    """'' if kernel.cu has no atomic that could take a float, else the first one found."""
    code = re.sub(r"//[^\n]*", "", kernel)  # comments may mention atomics
    for pattern in FLOAT_ATOMICS:
        m = re.search(pattern, code)
        if m:
            line = code[: m.start()].count("\n") + 1
            return f"kernel.cu line {line}: {m.group(0).strip()}"
    return ""
