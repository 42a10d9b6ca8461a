"""DOWN_PARTIAL and DOWN_RESIDUAL: the down projection in split-K chunks, then the residual add.

Anchor: the layer's `down_proj` WEIGHT. Pattern: x' = ADD(x, act Wd^T). DOWN_PARTIAL computes
the KS partial products of act Wd^T; DOWN_RESIDUAL sums them into x, so it covers the ADD and
completes the MATMUL's reduction (both cover the MATMUL).
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.ops import Op
from compiler.passes.match import Fusion, Step, any_, check_ops, linear, num_layers, op, ops, region

RESIDUAL = op(Op.ADD, any_("x"), linear("act", "wd", "down"), bind="x_out", label="x + act Wd^T")
PARTIAL_COVERS = ops("matmul")
RESIDUAL_COVERS = ops("matmul add")


def down_split(f: Fusion) -> Fusion:
    """Append DOWN_PARTIAL and DOWN_RESIDUAL per layer."""
    g = f.graph
    for layer in range(num_layers(g)):
        what = f"layer {layer}: DOWN_PARTIAL/DOWN_RESIDUAL"
        wd = f.node(f"model.layers.{layer}.mlp.down_proj.weight")
        b = f.find(RESIDUAL, "wd", wd, what)
        partial = region(f, [b["down"]], [b["act"], wd], what)
        check_ops(g, partial, PARTIAL_COVERS, what)
        residual = tuple(sorted({*region(f, [b["x_out"]], [b["x"], b["down"]], what), b["down"]}))
        check_ops(g, residual, RESIDUAL_COVERS, what)
        p = Instr(Kind.DOWN_PARTIAL, layer, ("act", g.nodes[wd].name), ("down",), covers=partial)
        r = Instr(Kind.DOWN_RESIDUAL, layer, ("down", "x"), ("x",), covers=residual)
        f = f.add(
            [
                Step(p, reads=(("act", b["act"]),), writes=(("down", b["down"]),)),
                Step(r, reads=(("down", b["down"]), ("x", b["x"])), writes=(("x", b["x_out"]),)),
            ],
            what,
        )
    return f
