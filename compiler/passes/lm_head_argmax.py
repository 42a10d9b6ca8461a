"""LMHEAD_ARGMAX: final RMSNorm, the LM head (vocabulary row tiles) and each tile's argmax.

Anchors: the graph outputs `logits` and `next_token`, and `model.norm.weight`. Pattern:
    logits = (h W^T)[:, 0]  (GATHER of the one token), h = RMSNorm(x, model.norm.weight, eps)
    next_token = ARGMAX(logits, last axis)
W is `lm_head.weight`, or `model.embed_tokens.weight` when the embeddings are tied. The argmax
is split between this instruction (per tile) and ARGMAX_REDUCE, so both cover the ARGMAX.
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.graph import Graph, IRError, Node
from compiler.ir.ops import Op
from compiler.passes.match import (
    Fusion,
    Step,
    any_,
    check_ops,
    const,
    last_axis,
    linear,
    op,
    ops,
    region,
    rmsnorm,
    scalar,
)

HEADS = ("lm_head.weight", "model.embed_tokens.weight")
LOGITS = op(
    Op.GATHER,
    linear("h", "head", "mm"),
    const(value=0),
    where=lambda g, n: n.attr("axis") == 1,
    bind="logits",
    label="LM head logits",
)


def _argmax_last(g: Graph, n: Node) -> bool:
    return last_axis(g, n) and not n.attr("keepdim")


ARGMAX = op(Op.ARGMAX, any_("logits"), where=_argmax_last, bind="next", label="argmax")
NORM = rmsnorm("x", "wn", "eps", "h")
# RMSNorm, the head projection, the GATHER that selects the one token, the argmax.
COVERS = ops("pow mean add rsqrt mul*2  matmul  gather  argmax")


def output(f: Fusion, name: str, what: str) -> int:
    try:
        return f.graph.output(name)
    except KeyError:
        raise IRError(f"{what}: the graph has no output {name!r}") from None


def lm_head_argmax(f: Fusion) -> Fusion:
    """Append LMHEAD_ARGMAX; learn `tied`, `vocab`, `hidden` and `eps`."""
    g, what = f.graph, "LMHEAD_ARGMAX"
    logits, nxt = output(f, "logits", what), output(f, "next_token", what)
    wn = f.node("model.norm.weight")
    b = f.match_at(LOGITS, logits, what)
    head = g.nodes[b["head"]]
    if head.name not in HEADS:
        raise IRError(f"{what}: the LM head reads weight {head.name!r}, not one of {HEADS}")
    nb = f.match_at(NORM, b["h"], what + " (final norm)", {"wn": wn})
    f.match_at(ARGMAX, nxt, what, {"logits": b["logits"]})
    covers = region(f, [logits, nxt], [nb["x"], wn, b["head"]], what)
    check_ops(g, covers, COVERS, what)
    eps = scalar(g.nodes[nb["eps"]])
    instr = Instr(
        Kind.LMHEAD_ARGMAX,
        -1,
        ("x", g.nodes[wn].name, head.name),
        ("logits", "amax_val", "amax_idx"),
        (("eps", eps),),
        covers,
    )
    step = Step(
        instr,
        reads=(("x", nb["x"]),),
        writes=(("logits", logits), ("amax_val", nxt), ("amax_idx", nxt)),
    )
    vocab, hidden = head.shape
    return f.add([step], what, eps=eps, tied=head.name == HEADS[1], vocab=vocab, hidden=hidden)
