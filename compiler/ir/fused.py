"""FusedGraph: the decode step as a sequence of megakernel instructions over named buffers.

The fusion passes (`compiler/passes/`) turn a model Graph into a FusedGraph; the scheduler
splits each instruction into tasks. Instruction semantics are defined here, in words, and in
numpy by `compiler.ir.fused_eval` (whole buffers, float64); the schedule's tiles compute the same
thing piecewise. Shapes may use the symbols of the model graph ("B", "S") and the split symbols
bound by the schedule: "P" (KV partitions), "KS" (down-projection split-K chunks), "NT" (LM-head
vocabulary tiles).

Buffers (per step; `x` is the fp32 residual stream, updated in place):
    token [B] i64            the token this step embeds; ARGMAX_REDUCE writes the next one
    x [B, H]                 residual stream
    q [B, Hq*D]              roped queries of the current layer
    k_cache.{l}, v_cache.{l} [B, KV, S, D]
    attn_o [B, Hq, P, D]     unnormalized partial attention outputs
    attn_m, attn_l [B, Hq, P] partial running max and sum of exponentials
    attn [B, Hq*D]           merged attention output
    act [B, I]               silu(gate) * up
    down [KS, B, H]          split-K partial sums of the down projection
    logits [B, V]
    amax_val [B, NT], amax_idx [B, NT]   per-tile maximum logit and its (first) index
Inputs that are not buffers: `pos` (scalar step position) and the constant `rope_inv_freq` [D/2].

Instruction kinds, with their `inputs` and `outputs` in this exact order (l = layer):
    EMBED            (token, model.embed_tokens.weight) -> (x)
                     x[b] = E[token[b]]
    QKV_ROPE_APPEND  (x, input_layernorm.weight, q_proj, k_proj, v_proj, rope_inv_freq, pos,
                      k_cache.l, v_cache.l) -> (q, k_cache.l, v_cache.l)
                     h = x * rsqrt(mean(x^2) + eps) * w; q = rope(h Wq^T); k = rope(h Wk^T);
                     v = h Wv^T; cache[:, :, pos] = k, v. rope(y)[i] = y[i] cos(a_i) +
                     rotate_half(y)[i] sin(a_i), a_i = pos * inv_freq[i mod D/2], per head.
                     (Its tasks take rows in RoPE pair order, whole pairs each: schedule.py.)
    ATTN_PARTIAL     (q, k_cache.l, v_cache.l, pos) -> (attn_o, attn_m, attn_l)
                     head h reads KV head h // (Hq/KV). The visible keys are lo <= j <= pos,
                     lo = max(0, pos - window + 1) (window: sliding_window, else lo = 0): n =
                     pos + 1 - lo of them, cut into P runs of c = ceil(n/P); partition p covers
                     [lo + p*c, min(lo + (p+1)*c, pos + 1)) (empty when lo + p*c > pos). The
                     split depends on pos only: the same for every batch row and launch shape.
                     s_j = q.k_j / sqrt(D); m = max_j s_j (-inf if no key); l = sum exp(s_j - m);
                     o = sum exp(s_j - m) v_j (0 if no key).
    ATTN_MERGE       (attn_o, attn_m, attn_l) -> (attn)
                     M = max_p m_p; attn = sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p.
    OPROJ_RESIDUAL   (attn, o_proj, x) -> (x)            x = x + attn Wo^T
    GATE_UP_SILU     (x, post_attention_layernorm.weight, gate_proj, up_proj) -> (act)
                     h = rms(x) * w; act = silu(h Wg^T) * (h Wu^T)
    DOWN_PARTIAL     (act, down_proj) -> (down)
                     down[k] = act[:, k*CI:(k+1)*CI] Wd[:, k*CI:(k+1)*CI]^T, CI = I / KS
    DOWN_RESIDUAL    (down, x) -> (x)                    x = x + (down[0] + ... + down[KS-1]),
                     the chunks summed in order k = 0 .. KS-1
    LMHEAD_ARGMAX    (x, model.norm.weight, lm_head weight) -> (logits, amax_val, amax_idx)
                     logits = rms(x) * w W^T; tile t covers vocab rows [t*CV, min((t+1)*CV, V)),
                     CV = ceil(V/NT); amax over the tile, first index on ties. A tile past
                     the vocabulary (t*CV >= V) is empty and holds (-inf, -1).
    ARGMAX_REDUCE    (amax_val, amax_idx) -> (token)     first maximum over tiles in order
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from compiler.ir import jsonform
from compiler.ir.graph import AttrValue, IRError, Shape, decode_attr, encode_attr, freeze_attr
from compiler.ir.ops import DType


class Kind(enum.Enum):
    EMBED = "embed"
    QKV_ROPE_APPEND = "qkv_rope_append"
    ATTN_PARTIAL = "attn_partial"
    ATTN_MERGE = "attn_merge"
    OPROJ_RESIDUAL = "oproj_residual"
    GATE_UP_SILU = "gate_up_silu"
    DOWN_PARTIAL = "down_partial"
    DOWN_RESIDUAL = "down_residual"
    LMHEAD_ARGMAX = "lmhead_argmax"
    ARGMAX_REDUCE = "argmax_reduce"


FUSED_VERSION = 1
SYMBOLS = ("B", "S", "P", "KS", "NT")


@dataclass(frozen=True)
class Buffer:
    """A named device buffer (or constant) the instructions read and write."""

    name: str
    shape: Shape
    dtype: DType
    value: tuple[float, ...] | None = None  # constants only (rope_inv_freq)

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "name": self.name,
            "shape": list(self.shape),
            "dtype": self.dtype.value,
        }
        if self.value is not None:
            d["value"] = encode_attr(self.value)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Buffer:
        value = d.get("value")
        return cls(
            d["name"],
            tuple(d["shape"]),
            DType(d["dtype"]),
            decode_attr(value, True) if value is not None else None,
        )


@dataclass(frozen=True)
class Instr:
    """One megakernel instruction: a kind, a layer (-1 outside the layers), named operands."""

    kind: Kind
    layer: int
    inputs: tuple[str, ...]
    outputs: tuple[str, ...]
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    covers: tuple[int, ...] = ()  # node indices of the model graph this instruction computes

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        return dict(self.attrs).get(key, default)

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind.value,
            "layer": self.layer,
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "attrs": {k: encode_attr(v) for k, v in self.attrs},
            "covers": list(self.covers),
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Instr:
        return cls(
            kind=Kind(d["kind"]),
            layer=int(d["layer"]),
            inputs=tuple(d["inputs"]),
            outputs=tuple(d["outputs"]),
            attrs=tuple(sorted((k, freeze_attr(v)) for k, v in d.get("attrs", {}).items())),
            covers=tuple(d.get("covers", ())),
        )


@dataclass(frozen=True)
class FusedGraph:
    """Instructions in program order, the buffers and weights they name, and model dimensions.

    `dims` holds hidden, intermediate, vocab, layers, heads, kv_heads, head_dim, eps,
    sliding_window (None if absent) and tied (the LM head is the embedding table);
    `graph_digest` is the model hash of the source graph.
    """

    dims: tuple[tuple[str, AttrValue], ...]
    buffers: tuple[Buffer, ...]
    weights: tuple[tuple[str, Shape], ...]
    instrs: tuple[Instr, ...]
    graph_digest: str

    def dim(self, key: str) -> Any:
        return dict(self.dims)[key]

    def buffer(self, name: str) -> Buffer:
        for b in self.buffers:
            if b.name == name:
                return b
        raise KeyError(name)

    def to_json(self) -> dict[str, Any]:
        return {
            "fused_version": FUSED_VERSION,
            "graph_digest": self.graph_digest,
            "dims": {k: encode_attr(v) for k, v in self.dims},
            "buffers": [b.to_json() for b in self.buffers],
            "weights": [[n, list(s)] for n, s in self.weights],
            "instrs": [i.to_json() for i in self.instrs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> FusedGraph:
        if not isinstance(d, dict) or d.get("fused_version") != FUSED_VERSION:
            raise IRError(f"not a fused graph of version {FUSED_VERSION}")
        try:
            return cls(
                dims=tuple(sorted((k, freeze_attr(v)) for k, v in d["dims"].items())),
                buffers=tuple(Buffer.from_json(b) for b in d["buffers"]),
                weights=tuple((n, tuple(s)) for n, s in d["weights"]),
                instrs=tuple(Instr.from_json(i) for i in d["instrs"]),
                graph_digest=d["graph_digest"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IRError(f"bad fused graph: {e}") from None

    def canonical(self) -> bytes:
        return jsonform.canonical(self.to_json())

    def digest(self) -> str:
        return jsonform.digest(self.to_json())

    def dumps(self) -> str:
        return jsonform.readable(self.to_json(), ("instrs",))

    @classmethod
    def loads(cls, text: str) -> FusedGraph:
        return cls.from_json(jsonform.parse(text, "fused graph"))
