"""QKV_ROPE_APPEND: input RMSNorm, the q/k/v projections, RoPE on q and k, the KV-cache append.

Anchors: the layer's `k_cache.l`/`v_cache.l` INPUTs and its q/k/v/norm WEIGHTs. Patterns:
    k_cache' = INDEX_COPY(k_cache, positions, rope(h Wk^T), axis=2)
    v_cache' = INDEX_COPY(v_cache, positions, h Wv^T, axis=2)
    q        = rope(h Wq^T)
    h        = RMSNorm(x, input_layernorm.weight, eps)
    rope(y)  = y cos(a) + concat(-y[..., D/2:], y[..., :D/2]) sin(a),
    a        = concat(f, f), f = positions * inv_freq, positions = pos + arange(1)
The RoPE tables (cos, sin, angles, positions) are prologue nodes every layer shares: each
layer's instruction covers them, since it recomputes them from `pos` and `rope_inv_freq`.
"""

from __future__ import annotations

from collections.abc import Callable

from compiler.ir.fused import Instr, Kind
from compiler.ir.graph import Graph, IRError, Node
from compiler.ir.ops import Op
from compiler.passes.match import (
    POSITIONS,
    Fusion,
    Pat,
    Step,
    check_ops,
    const,
    dim,
    inp,
    last_axis,
    linear,
    num_layers,
    op,
    ops,
    region,
    rmsnorm,
    scalar,
)

# RMSNorm; the q, k, v projections; the angles (positions = pos + arange(1), times inv_freq,
# concatenated twice, cos and sin); RoPE of q and of k; the two cache appends.
ROPE = "slice*2 neg concat mul*2 add"
COVERS = ops(
    f"pow mean add rsqrt mul*2  matmul*3  arange add mul concat cos sin  {ROPE} {ROPE}  "
    "index_copy*2"
)


def _half(upper: bool) -> Callable[[Graph, Node], bool]:
    """A SLICE of the last axis to its upper half [D/2:] or its lower half [:D/2]."""

    def ok(g: Graph, n: Node) -> bool:
        shape = g.nodes[n.inputs[0]].shape
        d, rank = shape[-1], len(shape)
        if not isinstance(d, int) or n.attr("axis") % rank != rank - 1 or n.attr("step", 1) != 1:
            return False
        if upper:
            return bool(n.attr("start") == d // 2 and n.attr("stop") in (None, d))
        return bool(n.attr("start") == 0 and n.attr("stop") == d // 2)

    return ok


def rope(y: Pat, bind: str) -> Pat:
    freqs = op(Op.MUL, POSITIONS, const("inv_freq"), bind="freqs")
    angles = op(Op.CONCAT, freqs, freqs, where=last_axis, bind="angles")
    rot = op(
        Op.CONCAT,
        op(Op.NEG, op(Op.SLICE, y, where=_half(True))),
        op(Op.SLICE, y, where=_half(False)),
        where=last_axis,
        label="rotate_half",
    )
    return op(
        Op.ADD,
        op(Op.MUL, y, op(Op.COS, angles)),
        op(Op.MUL, rot, op(Op.SIN, angles)),
        bind=bind,
        label="rope",
    )


def _axis2(g: Graph, n: Node) -> bool:
    return n.attr("axis") % len(n.shape) == 2


K_APPEND = op(
    Op.INDEX_COPY,
    inp("k_cache"),
    POSITIONS,
    rope(linear("h", "wk", "k_lin"), "k"),
    where=_axis2,
    bind="k_out",
    label="k-cache append of rope(h Wk^T)",
)
V_APPEND = op(
    Op.INDEX_COPY,
    inp("v_cache"),
    POSITIONS,
    linear("h", "wv", "v_lin"),
    where=_axis2,
    bind="v_out",
    label="v-cache append of h Wv^T",
)
Q = rope(linear("h", "wq", "q_lin"), "q")
NORM = rmsnorm("x", "wn", "eps", "h")
SHARED = ("h", "pos", "positions", "inv_freq", "freqs", "angles")


ROLES = ("input_layernorm", "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")


def qkv_rope_append(f: Fusion) -> Fusion:
    """Append one QKV_ROPE_APPEND per layer; learn heads, kv_heads, head_dim, eps, inv_freq."""
    g = f.graph
    pos = f.node("pos", Op.INPUT)
    for layer in range(num_layers(g)):
        what = f"layer {layer}: QKV_ROPE_APPEND"
        kname, vname = f"k_cache.{layer}", f"v_cache.{layer}"
        kc, vc = f.node(kname, Op.INPUT), f.node(vname, Op.INPUT)
        wn, wq, wk, wv = (f.node(f"model.layers.{layer}.{r}.weight") for r in ROLES)
        kb = f.find(K_APPEND, "k_cache", kc, what, {"wk": wk, "pos": pos})
        shared = {k: kb[k] for k in SHARED}
        vb = f.find(V_APPEND, "v_cache", vc, what, {"wv": wv, **shared})
        qb = f.find(Q, "wq", wq, what + " (q)", shared)
        nb = f.match_at(NORM, kb["h"], what + " (input norm)", {"wn": wn})
        outs = [qb["q"], kb["k_out"], vb["v_out"]]
        covers = region(f, outs, [nb["x"], wn, wq, wk, wv, pos, kc, vc], what)
        check_ops(g, covers, COVERS, what)
        kv, d = dim(g, kc, 1, what), dim(g, kc, 3, what)
        inv = g.nodes[kb["inv_freq"]]
        if inv.shape != (d // 2,):
            raise IRError(f"{what}: inv_freq has shape {list(inv.shape)}, not [head_dim / 2]")
        eps = scalar(g.nodes[nb["eps"]])
        weights = tuple(g.nodes[w].name for w in (wn, wq, wk, wv))
        ins = ("x", *weights, "rope_inv_freq", "pos", kname, vname)
        instr = Instr(
            Kind.QKV_ROPE_APPEND, layer, ins, ("q", kname, vname), (("eps", eps),), covers
        )
        reads = {"x": nb["x"], "rope_inv_freq": kb["inv_freq"], "pos": pos, kname: kc, vname: vc}
        writes = {"q": qb["q"], kname: kb["k_out"], vname: vb["v_out"]}
        f = f.add(
            [Step(instr, tuple(reads.items()), tuple(writes.items()))],
            what,
            heads=dim(g, wq, 0, what) // d,
            kv_heads=kv,
            head_dim=d,
            eps=eps,
            rope_inv_freq=tuple(float(x) for x in inv.attr("value")),
        )
    return f
