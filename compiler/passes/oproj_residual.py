"""OPROJ_RESIDUAL: the attention output projection added into the residual stream.

Anchor: the layer's `o_proj` WEIGHT. Pattern: x' = ADD(x, attn Wo^T).
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.ops import Op
from compiler.passes.match import Fusion, Step, any_, check_ops, linear, num_layers, op, ops, region

RESIDUAL = op(Op.ADD, any_("x"), linear("attn", "wo", "proj"), bind="x_out", label="x + attn Wo^T")
COVERS = ops("matmul add")


def oproj_residual(f: Fusion) -> Fusion:
    """Append one OPROJ_RESIDUAL per layer."""
    for layer in range(num_layers(f.graph)):
        what = f"layer {layer}: OPROJ_RESIDUAL"
        wo = f.node(f"model.layers.{layer}.self_attn.o_proj.weight")
        b = f.find(RESIDUAL, "wo", wo, what)
        covers = region(f, [b["x_out"]], [b["x"], b["attn"], wo], what)
        check_ops(f.graph, covers, COVERS, what)
        instr = Instr(
            Kind.OPROJ_RESIDUAL, layer, ("attn", f.graph.nodes[wo].name, "x"), ("x",), covers=covers
        )
        step = Step(instr, reads=(("attn", b["attn"]), ("x", b["x"])), writes=(("x", b["x_out"]),))
        f = f.add([step], what)
    return f
