"""The SMT-LIB facts the device obligations share: the integer symbols of a symbolic thread
(task params, pos, loop indices) in their ranges, and its integer inputs in their valid range."""

from __future__ import annotations

from typing import Any

from verifier.algebra import walk
from verifier.model import Geometry
from verifier.terms import Aff, smt_aff

INT_ARRAYS = ("token",)  # integer inputs and their valid range [0, V)


def int_decls(things: Any, ranges: dict[str, tuple[int, int]]) -> str:
    """Declarations of the integer symbols and arrays in `things`, each symbol in its range."""
    names: set[str] = set()
    arrays: dict[str, int] = {}
    for x in walk(tuple(things)):
        if isinstance(x, Aff):
            names |= {a for a, _ in x.terms if isinstance(a, str)}
        if isinstance(x, tuple) and x and x[0] == "vi":
            arrays[x[1]] = len(x[2])
    lines = []
    for v in sorted(names):
        lines.append(f"(declare-const {v} Int)")
        if v in ranges:
            lo, hi = ranges[v]
            lines.append(f"(assert (and (<= {lo} {v}) (< {v} {hi})))")
    for a, arity in sorted(arrays.items()):
        lines.append(f"(declare-fun {a} ({' '.join(['Int'] * arity)}) Int)")
    return "\n".join(lines) + "\n"


def int_ranges(things: Any, g: Geometry) -> str:
    """Every integer input element read lies in its valid range (a token is in [0, V))."""
    out = []
    for x in walk(tuple(things)):
        if isinstance(x, tuple) and x and x[0] == "vi" and x[1] in INT_ARRAYS:
            e = f"({x[1]} {' '.join(smt_aff(i, {}) for i in x[2])})"
            out.append(f"(assert (and (<= 0 {e}) (< {e} {g.V})))")
    return "".join(f"{x}\n" for x in dict.fromkeys(out))
