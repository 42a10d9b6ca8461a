"""The buffers, weights and canonical instruction list of a FusedGraph, from model dimensions.

The fusion passes derive instructions from the model graph and must arrive at exactly this
list (plus the graph nodes each instruction covers); tests and the scheduler's own tests build
it directly from a ModelSpec.
"""

from __future__ import annotations

from typing import Any

from compiler.ir.fused import Buffer, FusedGraph, Instr, Kind
from compiler.ir.ops import DType
from compiler.reference import rope_inv_freq
from compiler.spec import ModelSpec


def dims_of(spec: ModelSpec) -> dict[str, Any]:
    return {
        "hidden": spec.hidden_size,
        "intermediate": spec.intermediate_size,
        "vocab": spec.vocab_size,
        "layers": spec.num_layers,
        "heads": spec.num_heads,
        "kv_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "eps": spec.rms_norm_eps,
        "sliding_window": spec.sliding_window,
        "tied": spec.tie_word_embeddings,
    }


def buffers_of(dims: dict[str, Any], inv_freq: tuple[float, ...]) -> tuple[Buffer, ...]:
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    hq, kv, d = dims["heads"], dims["kv_heads"], dims["head_dim"]
    f32 = DType.F32
    bufs = [
        Buffer("token", ("B",), DType.I64),
        Buffer("x", ("B", h), f32),
        Buffer("q", ("B", hq * d), f32),
        Buffer("attn_o", ("B", hq, "P", d), f32),
        Buffer("attn_m", ("B", hq, "P"), f32),
        Buffer("attn_l", ("B", hq, "P"), f32),
        Buffer("attn", ("B", hq * d), f32),
        Buffer("act", ("B", i), f32),
        Buffer("down", ("KS", "B", h), f32),
        Buffer("logits", ("B", v), f32),
        Buffer("amax_val", ("B", "NT"), f32),
        Buffer("amax_idx", ("B", "NT"), DType.I64),
        Buffer("rope_inv_freq", (d // 2,), DType.F64, value=inv_freq),
    ]
    for layer in range(dims["layers"]):
        bufs.append(Buffer(f"k_cache.{layer}", ("B", kv, "S", d), DType.BF16))
        bufs.append(Buffer(f"v_cache.{layer}", ("B", kv, "S", d), DType.BF16))
    return tuple(bufs)


def weights_of(dims: dict[str, Any]) -> tuple[tuple[str, tuple[int, ...]], ...]:
    h, i, v = dims["hidden"], dims["intermediate"], dims["vocab"]
    q, kvs = dims["heads"] * dims["head_dim"], dims["kv_heads"] * dims["head_dim"]
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (v, h))]
    for layer in range(dims["layers"]):
        p = f"model.layers.{layer}."
        out += [
            (p + "input_layernorm.weight", (h,)),
            (p + "self_attn.q_proj.weight", (q, h)),
            (p + "self_attn.k_proj.weight", (kvs, h)),
            (p + "self_attn.v_proj.weight", (kvs, h)),
            (p + "self_attn.o_proj.weight", (h, q)),
            (p + "post_attention_layernorm.weight", (h,)),
            (p + "mlp.gate_proj.weight", (i, h)),
            (p + "mlp.up_proj.weight", (i, h)),
            (p + "mlp.down_proj.weight", (h, i)),
        ]
    out.append(("model.norm.weight", (h,)))
    if not dims["tied"]:
        out.append(("lm_head.weight", (v, h)))
    return tuple(out)


def head_weight(dims: dict[str, Any]) -> str:
    return "model.embed_tokens.weight" if dims["tied"] else "lm_head.weight"


def layer_instrs(layer: int, eps: float) -> list[Instr]:
    """The seven instructions of decoder layer `layer`, in program order."""
    p, k, v = f"model.layers.{layer}.", f"k_cache.{layer}", f"v_cache.{layer}"
    e = (("eps", eps),)
    return [
        Instr(
            Kind.QKV_ROPE_APPEND,
            layer,
            (
                "x",
                p + "input_layernorm.weight",
                p + "self_attn.q_proj.weight",
                p + "self_attn.k_proj.weight",
                p + "self_attn.v_proj.weight",
                "rope_inv_freq",
                "pos",
                k,
                v,
            ),
            ("q", k, v),
            e,
        ),
        Instr(Kind.ATTN_PARTIAL, layer, ("q", k, v, "pos"), ("attn_o", "attn_m", "attn_l")),
        Instr(Kind.ATTN_MERGE, layer, ("attn_o", "attn_m", "attn_l"), ("attn",)),
        Instr(Kind.OPROJ_RESIDUAL, layer, ("attn", p + "self_attn.o_proj.weight", "x"), ("x",)),
        Instr(
            Kind.GATE_UP_SILU,
            layer,
            (
                "x",
                p + "post_attention_layernorm.weight",
                p + "mlp.gate_proj.weight",
                p + "mlp.up_proj.weight",
            ),
            ("act",),
            e,
        ),
        Instr(Kind.DOWN_PARTIAL, layer, ("act", p + "mlp.down_proj.weight"), ("down",)),
        Instr(Kind.DOWN_RESIDUAL, layer, ("down", "x"), ("x",)),
    ]


def instrs_of(dims: dict[str, Any]) -> tuple[Instr, ...]:
    """The canonical program: embed, the layers, LM head, argmax."""
    out = [Instr(Kind.EMBED, -1, ("token", "model.embed_tokens.weight"), ("x",))]
    for layer in range(dims["layers"]):
        out += layer_instrs(layer, dims["eps"])
    out.append(
        Instr(
            Kind.LMHEAD_ARGMAX,
            -1,
            ("x", "model.norm.weight", head_weight(dims)),
            ("logits", "amax_val", "amax_idx"),
            (("eps", dims["eps"]),),
        )
    )
    out.append(Instr(Kind.ARGMAX_REDUCE, -1, ("amax_val", "amax_idx"), ("token",)))
    return tuple(out)


def layout(spec: ModelSpec, graph_digest: str = "") -> FusedGraph:
    """The FusedGraph of `spec` built directly from its dimensions (no `covers`)."""
    dims = dims_of(spec)
    inv = tuple(float(x) for x in rope_inv_freq(spec).tolist())
    return FusedGraph(
        dims=tuple(sorted(dims.items())),
        buffers=buffers_of(dims, inv),
        weights=weights_of(dims),
        instrs=instrs_of(dims),
        graph_digest=graph_digest,
    )
