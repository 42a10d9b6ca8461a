"""ARGMAX_REDUCE: the first maximum over the LM head's vocabulary tiles, the next token.

Anchor: the graph output `next_token`. Pattern: ARGMAX(logits, last axis), logits being the
graph output `logits`. It completes the argmax LMHEAD_ARGMAX began per tile.
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.passes.lm_head_argmax import ARGMAX, output
from compiler.passes.match import Fusion, Step, check_ops, ops, region, strip

COVERS = ops("argmax")


def argmax_reduce(f: Fusion) -> Fusion:
    """Append ARGMAX_REDUCE."""
    what = "ARGMAX_REDUCE"
    logits, nxt = strip(f.graph, output(f, "logits", what)), output(f, "next_token", what)
    f.match_at(ARGMAX, nxt, what, {"logits": logits})
    covers = region(f, [nxt], [logits], what)
    check_ops(f.graph, covers, COVERS, what)
    instr = Instr(Kind.ARGMAX_REDUCE, -1, ("amax_val", "amax_idx"), ("token",), covers=covers)
    step = Step(instr, reads=(("amax_val", nxt), ("amax_idx", nxt)), writes=(("token", nxt),))
    return f.add([step], what)
