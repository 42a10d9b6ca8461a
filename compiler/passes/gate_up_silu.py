"""GATE_UP_SILU: post-attention RMSNorm, the gate and up projections, act = silu(gate) * up.

Anchors: the layer's `gate_proj`, `up_proj` and `post_attention_layernorm` WEIGHTs. Pattern:
    act = MUL(SILU(h Wg^T), h Wu^T), h = RMSNorm(x, post_attention_layernorm.weight, eps)
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.ops import Op
from compiler.passes.match import (
    Fusion,
    Step,
    check_ops,
    linear,
    num_layers,
    op,
    ops,
    region,
    rmsnorm,
    scalar,
)

ACT = op(
    Op.MUL,
    op(Op.SILU, linear("h", "wg", "gate")),
    linear("h", "wu", "up"),
    bind="act",
    label="silu(h Wg^T) * h Wu^T",
)
NORM = rmsnorm("x", "wn", "eps", "h")
# RMSNorm (pow mean add rsqrt mul*2), the gate and up projections, silu(gate) * up.
COVERS = ops("pow mean add rsqrt mul*2  matmul*2  silu mul")


def gate_up_silu(f: Fusion) -> Fusion:
    """Append one GATE_UP_SILU per layer; learn `intermediate` and `eps`."""
    g = f.graph
    for layer in range(num_layers(g)):
        what, p = f"layer {layer}: GATE_UP_SILU", f"model.layers.{layer}."
        wn, wg, wu = (
            f.node(p + n)
            for n in (
                "post_attention_layernorm.weight",
                "mlp.gate_proj.weight",
                "mlp.up_proj.weight",
            )
        )
        b = f.find(ACT, "wg", wg, what, {"wu": wu})
        nb = f.match_at(NORM, b["h"], what + " (post-attention norm)", {"wn": wn})
        covers = region(f, [b["act"]], [nb["x"], wn, wg, wu], what)
        check_ops(g, covers, COVERS, what)
        eps = scalar(g.nodes[nb["eps"]])
        instr = Instr(
            Kind.GATE_UP_SILU,
            layer,
            ("x", g.nodes[wn].name, g.nodes[wg].name, g.nodes[wu].name),
            ("act",),
            (("eps", eps),),
            covers,
        )
        step = Step(instr, reads=(("x", nb["x"]),), writes=(("act", b["act"]),))
        f = f.add([step], what, eps=eps, intermediate=g.nodes[wg].shape[0])
    return f
