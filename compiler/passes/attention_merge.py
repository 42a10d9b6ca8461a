"""ATTN_MERGE: merge the split-KV partials, attn = sum_p e^(m_p - M) o_p / sum_p e^(m_p - M) l_p.

Anchor: the layer's `v_cache.l` INPUT. Pattern: pv = MATMUL(SOFTMAX(scores), V) with V the
updated v cache. The merge completes the softmax normalization and the PV sum that
ATTN_PARTIAL began per partition, so it covers SOFTMAX and the PV MATMUL (and V's broadcast).
"""

from __future__ import annotations

from compiler.ir.fused import Instr, Kind
from compiler.ir.ops import Op
from compiler.passes.attention_partial import VALUES
from compiler.passes.match import (
    Fusion,
    Step,
    any_,
    check_ops,
    last_axis,
    num_layers,
    op,
    ops,
    region,
)

MERGE = op(
    Op.MATMUL,
    op(Op.SOFTMAX, any_("scores"), where=last_axis),
    VALUES,
    bind="pv",
    label="softmax(scores) V",
)
COVERS = ops("softmax matmul")


def attention_merge(f: Fusion) -> Fusion:
    """Append one ATTN_MERGE per layer."""
    for layer in range(num_layers(f.graph)):
        what = f"layer {layer}: ATTN_MERGE"
        vc = f.node(f"v_cache.{layer}", Op.INPUT)
        b = f.find(MERGE, "v_cache", vc, what)
        covers = region(f, [b["pv"]], [b["scores"], b["values"]], what)
        check_ops(f.graph, covers, COVERS, what)
        instr = Instr(
            Kind.ATTN_MERGE, layer, ("attn_o", "attn_m", "attn_l"), ("attn",), covers=covers
        )
        step = Step(
            instr, reads=tuple((i, b["pv"]) for i in instr.inputs), writes=(("attn", b["pv"]),)
        )
        f = f.add([step], what)
    return f
