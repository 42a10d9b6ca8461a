"""EMBED: the token embedding lookup, x[b] = E[token[b]].

Anchor: the WEIGHT `model.embed_tokens.weight`. Pattern: GATHER(E, token, axis=0).
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.ops import Op
from compiler.passes.match import Fusion, Step, check_ops, inp, op, ops, region, weight

EMBED_WEIGHT = "model.embed_tokens.weight"
LOOKUP = op(
    Op.GATHER,
    weight("embed"),
    inp("token"),
    where=lambda g, n: n.attr("axis") == 0,
    bind="x",
    label="embedding lookup",
)
COVERS = ops("gather")  # the token's reshape to [B, 1] is layout


def embed(f: Fusion) -> Fusion:
    """Append the EMBED instruction; learn `vocab` and `hidden` from the table's shape."""
    what = "EMBED"
    e, token = f.node(EMBED_WEIGHT), f.node("token", Op.INPUT)
    b = f.find(LOOKUP, "embed", e, what, {"token": token})
    covers = region(f, [b["x"]], [token, e], what)
    check_ops(f.graph, covers, COVERS, what)
    instr = Instr(Kind.EMBED, -1, ("token", EMBED_WEIGHT), ("x",), covers=covers)
    step = Step(instr, reads=(("token", token),), writes=(("x", b["x"]),))
    vocab, hidden = f.graph.nodes[e].shape
    return f.add([step], what, vocab=vocab, hidden=hidden)
