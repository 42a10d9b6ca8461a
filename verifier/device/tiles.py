"""The tile shapes of a loop kind for the symbolic executor (`verifier.device.symexec`): the
TASKS entries of one width that write the same buffers (by the model's regions), each group run
once with its task params symbolic: a range tile (a, b) as a = stride * ta, b = a + width (the
stride the gcd of the group's a's), an index tile (a, b) as ta, tb; c as tc."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from functools import reduce
from math import gcd

from compiler.ir.fused import Instr
from verifier.device.coverage import PARAMS
from verifier.fused_terms import role
from verifier.model import Geometry, ParamError, touches
from verifier.terms import Aff

Tile = tuple[str, dict[str, tuple[int, int]], dict[str, Aff], list[dict[str, int]]]


def tiles(how: str, tasks: list[dict[str, int]], instr: Instr, g: Geometry) -> Iterable[Tile]:
    """(tile name, ranges of the param symbols, the Task fields a, b, c, the TASKS entries) per
    tile shape: the tasks of one width that write the same buffers (a QKV tile of q heads apart
    from one of k heads), a as stride * ta where every task's a is a multiple of the stride."""
    groups: dict[tuple[int, tuple[str, ...]], list[dict[str, int]]] = {}
    for t in tasks:
        width = t["b"] - t["a"] if how == "range" else 0
        groups.setdefault((width, _writes(instr, t, g)), []).append(t)
    widths = Counter(w for w, _ in groups)
    for (width, writes), ts in sorted(groups.items()):
        stride = reduce(gcd, (t["a"] for t in ts), 0) if how == "range" else 1
        stride = stride if stride > 1 and all(t["a"] >= 0 for t in ts) else 1
        lo, hi = min(t["a"] for t in ts), max(t["a"] for t in ts)
        ranges = {"ta": (lo // stride, hi // stride + 1)}
        params = {"a": Aff.of("ta").scale(stride)}
        params["b"] = params["a"] + width if how == "range" else Aff.of("tb")
        if how != "range":
            ranges["tb"] = (min(t["b"] for t in ts), max(t["b"] for t in ts) + 1)
        ranges["tc"] = (min(t["c"] for t in ts), max(t["c"] for t in ts) + 1)
        params["c"] = Aff.of("tc")
        name = f"width {width}" if how == "range" else "every tile"
        if widths[width] > 1:
            name += f" writing {', '.join(writes)}"
        yield name, ranges, params, ts


def _writes(instr: Instr, t: dict[str, int], g: Geometry) -> tuple[str, ...]:
    """The buffers (by role) task t writes, as the model says."""
    n = PARAMS.get(instr.kind, 2)
    layer = t.get("layer", -1)
    try:
        regions = touches(instr.kind, layer, tuple(t[f] for f in ("a", "b", "c")[:n]), g).writes
    except ParamError:
        return ()
    return tuple(sorted({role(r.buffer, layer) for r in regions}))
