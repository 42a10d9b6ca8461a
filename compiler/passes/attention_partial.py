"""ATTN_PARTIAL: decode attention per KV head over split-KV partitions (online-softmax partials).

Anchors: the layer's `k_cache.l`/`v_cache.l` INPUTs. Pattern (the torch form of
`softmax(mask(q K^T / sqrt(D))) V` with GQA):
    pv     = MATMUL(SOFTMAX(WHERE(NOT(mask), -inf, q K^T * scale)), V)
    K, V   = the updated caches INDEX_COPY(cache, ...), broadcast to the query heads
    mask   = arange(S) <= positions                      (causal)
           | that AND arange(S) > positions - window    (sliding window)
The mask, key positions and positions are prologue nodes shared by the layers; each layer's
ATTN_PARTIAL covers them. The softmax and the PV product are split between this instruction
(per-partition max, exp-sums and unnormalized PV) and ATTN_MERGE, so both cover them.
"""

from __future__ import annotations

import math

from compiler.ir.fused import Instr, Kind
from compiler.ir.graph import Graph, IRError, Node
from compiler.ir.ops import Op
from compiler.passes.match import (
    KEY_POSITIONS,
    POSITIONS,
    Bindings,
    Fusion,
    Pat,
    Step,
    any_,
    check_ops,
    const,
    dim,
    inp,
    is_layout,
    isclose,
    last_axis,
    num_layers,
    op,
    ops,
    region,
    scalar,
)

# q K^T * scale, softmax, P V; positions = pos + arange(1); the mask arange(S) <= positions;
# WHERE(NOT mask, -inf, scores). The sliding window adds arange(S) > positions - window.
CAUSAL_OPS = ops("matmul mul softmax matmul  add arange  arange le  not where")
WINDOW_OPS = ops("matmul mul softmax matmul  add arange  arange le  not where  sub gt and")


def _swap_last(g: Graph, n: Node) -> bool:
    r = len(n.shape)
    return bool(n.attr("perm") == (*range(r - 2), r - 1, r - 2))


KEYS = op(Op.INDEX_COPY, inp("k_cache"), any_("k_index"), any_("k_new"), bind="keys")
VALUES = op(Op.INDEX_COPY, inp("v_cache"), any_("v_index"), any_("v_new"), bind="values")
SCORES = op(
    Op.MUL,
    op(Op.MATMUL, any_("q"), op(Op.TRANSPOSE, KEYS, where=_swap_last, bind="kt")),
    const("scale"),
    bind="scores",
)
CAUSAL = op(Op.LE, KEY_POSITIONS, POSITIONS, label="causal mask")
WINDOW = op(
    Op.AND,
    CAUSAL,
    op(Op.GT, KEY_POSITIONS, op(Op.SUB, POSITIONS, const("window"))),
    label="sliding-window mask",
)


def attention(mask: Pat) -> Pat:
    masked = op(Op.WHERE, op(Op.NOT, mask), const(value=-math.inf), SCORES, bind="masked")
    probs = op(Op.SOFTMAX, masked, where=last_axis, bind="probs")
    return op(Op.MATMUL, probs, VALUES, bind="pv", label=f"attention with a {mask.label}")


def gqa_chain(g: Graph, top: int, cache: int, heads: int, what: str) -> None:
    """The layout ops from a cache to its [B, Hq, S, D] use: query head h reads KV head h // G."""
    _, kv, s, d = g.nodes[cache].shape
    groups = heads // kv if isinstance(kv, int) else 0
    expands = []
    i = top
    while i != cache and is_layout(g.nodes[i]):
        if g.nodes[i].op is Op.EXPAND:
            expands.append(i)
        i = g.nodes[i].inputs[0]
    b = g.nodes[cache].shape[0]
    ok = len(expands) == (1 if groups > 1 else len(expands)) and all(
        g.nodes[g.nodes[e].inputs[0]].shape == (b, kv, 1, s, d)
        and g.nodes[e].shape == (b, kv, groups, s, d)
        for e in expands
    )
    if not ok:
        raise IRError(
            f"{what}: the cache is not broadcast as query head h -> KV head h // {groups}"
        )


def match_attention(f: Fusion, layer: int, what: str) -> tuple[Bindings, int | None]:
    """The layer's attention bindings and its sliding window (None when causal only)."""
    kc, vc = f.node(f"k_cache.{layer}", Op.INPUT), f.node(f"v_cache.{layer}", Op.INPUT)
    env = {"v_cache": vc, "pos": f.node("pos", Op.INPUT)}
    errors = []
    for mask in (CAUSAL, WINDOW):
        try:
            b = f.find(attention(mask), "k_cache", kc, what, env)
        except IRError as e:
            errors.append(str(e))
            continue
        window = scalar(f.graph.nodes[b["window"]]) if "window" in b else None
        if window is not None and not (isinstance(window, int) and window > 0):
            raise IRError(f"{what}: sliding window {window!r} is not a positive integer")
        return b, window
    raise IRError(" | ".join(errors))


def attention_partial(f: Fusion) -> Fusion:
    """Append one ATTN_PARTIAL per layer; learn `sliding_window`."""
    g = f.graph
    pos = f.node("pos", Op.INPUT)
    for layer in range(num_layers(g)):
        what = f"layer {layer}: ATTN_PARTIAL"
        kname, vname = f"k_cache.{layer}", f"v_cache.{layer}"
        b, window = match_attention(f, layer, what)
        heads, d = dim(g, b["q"], 1, what), dim(g, b["keys"], 3, what)
        scale = scalar(g.nodes[b["scale"]])
        if not isinstance(scale, float) or not isclose(scale, 1.0 / math.sqrt(d)):
            raise IRError(f"{what}: scores are scaled by {scale!r}, not 1/sqrt({d})")
        if g.nodes[b["key_positions"]].shape != (g.nodes[b["keys"]].shape[2],):
            raise IRError(f"{what}: the mask's key positions do not span the cache")
        gqa_chain(g, g.nodes[b["kt"]].inputs[0], b["keys"], heads, what + " (keys)")
        gqa_chain(g, g.nodes[b["pv"]].inputs[1], b["values"], heads, what + " (values)")
        covers = region(f, [b["pv"]], [b["q"], b["keys"], b["values"], pos], what)
        check_ops(g, covers, CAUSAL_OPS if window is None else WINDOW_OPS, what)
        instr = Instr(
            Kind.ATTN_PARTIAL,
            layer,
            ("q", kname, vname, "pos"),
            ("attn_o", "attn_m", "attn_l"),
            covers=covers,
        )
        step = Step(
            instr,
            reads=(("q", b["q"]), (kname, b["keys"]), (vname, b["values"]), ("pos", pos)),
            writes=tuple((o, b["pv"]) for o in instr.outputs),
        )
        f = f.add([step], what, sliding_window=window)
    return f
