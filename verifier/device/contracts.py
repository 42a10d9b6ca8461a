"""Reference forms of amk.cuh's fixed-order reductions, to say which helper broke a failed sum.

The fma proof (`verifier.device.fma`) rejects a task body whose part sums or rstd do not hold
the columns [0, K) once each, at the store where it sees them. That store is in matvec_fma or
rms_rstd; the bug may be in a helper they call. `blame` runs the proof again with one helper at a
time replaced by its reference (the contract it is documented to meet, written in the subset the
executor runs): where the replaced run has no such failure, the kernel's helper is what broke it,
and the rejection names the helper and its lines. The references only attribute a rejection;
no proof relies on them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from functools import cache
from typing import Any

from verifier.device.kernel import Kernel
from verifier.device.nodes import Function
from verifier.device.parse import parse

# group_sum<N>: the sum over the N-lane group of a warp (xor butterfly); block_sum: the sum over
# the CTA's threads (group sums, then the NWARPS lane-0 values through scratch, in order).
REFERENCE = {
    "group_sum": """
template <int N = 32>
__device__ __forceinline__ float group_sum(float v) {
  for (int o = N / 2; o > 0; o /= 2) v = v + __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}
""",
    "block_sum": """
__device__ __forceinline__ float block_sum(float v, float* scratch) {
  v = group_sum(v);
  if (lane_id() == 0) scratch[warp_id()] = v;
  cta_sync();
  float s = 0.f;
  for (int w = 0; w < NWARPS; ++w) s = s + scratch[w];
  cta_sync();
  return s;
}
""",
}


@cache
def _reference(name: str) -> Function:
    (f,) = [i for i in parse(REFERENCE[name], 900).items if isinstance(i, Function)]
    return f


def with_reference(k: Kernel, name: str) -> Kernel:
    """`k` with device function `name` replaced by its reference."""
    out = copy.copy(k)
    out.functions = {**k.functions, name: [_reference(name)]}
    return out


def blame(k: Kernel, fails: Callable[[Kernel], bool]) -> list[tuple[str, int, int]]:
    """(helper, first line, last line) of kernel.cu for each helper of `k` whose reference makes
    `fails(kernel)` false; `fails` reruns the proof (any exception counts as a failure)."""
    out = []
    for name in REFERENCE:
        ours = k.functions.get(name, [])
        if len(ours) != 1:
            continue
        try:
            still: Any = fails(with_reference(k, name))
        except Exception:  # the replaced run fails some other way: no blame
            still = True
        if not still:
            f = ours[0]
            out.append((name, f.body.line if f.body is not None else f.line, f.end_line))
    return out
