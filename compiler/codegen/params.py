"""The kernel's `Params` struct: every device pointer it reads or writes, and its byte layout.

`Params` is passed by value (`const __grid_constant__ Params p`, so per-layer fields can be
indexed by the task's layer without a local copy). Every field is an 8-byte device pointer,
16-byte aligned, in this order:

    embed_tokens, norm, lm_head     weights outside the layers (bf16)
    token .. amax_idx               the FusedGraph's buffers (fp32, token/amax_idx int64)
    counters                        u64 [number of schedule counters], zero at allocation
    tokens_out                      int64 [steps, B]: the token chosen at each step
    layers[L]                       per layer: its 9 weights (bf16) then k_cache, v_cache (bf16)

`params_layout(fg)` describes the same layout as JSON-able data (field name, byte offset, C type,
what it binds: an HF weight name or a FusedGraph buffer name, dtype and shape) so the runtime can
fill it without parsing C.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from compiler.codegen.emit import Emitter
from compiler.ir.fused import FusedGraph
from compiler.ir.fused_layout import head_weight

POINTER_BYTES = 8

# (field, HF weight suffix under model.layers.{l}.)
LAYER_WEIGHTS: tuple[tuple[str, str], ...] = (
    ("input_layernorm", "input_layernorm.weight"),
    ("q_proj", "self_attn.q_proj.weight"),
    ("k_proj", "self_attn.k_proj.weight"),
    ("v_proj", "self_attn.v_proj.weight"),
    ("o_proj", "self_attn.o_proj.weight"),
    ("post_attention_layernorm", "post_attention_layernorm.weight"),
    ("gate_proj", "mlp.gate_proj.weight"),
    ("up_proj", "mlp.up_proj.weight"),
    ("down_proj", "mlp.down_proj.weight"),
)
LAYER_CACHES = ("k_cache", "v_cache")

# (field, FusedGraph buffer, C type)
BUFFERS: tuple[tuple[str, str, str], ...] = (
    ("token", "token", "i64*"),
    ("x", "x", "float*"),
    ("q", "q", "float*"),
    ("attn_o", "attn_o", "float*"),
    ("attn_m", "attn_m", "float*"),
    ("attn_l", "attn_l", "float*"),
    ("attn", "attn", "float*"),
    ("act", "act", "float*"),
    ("down", "down", "float*"),
    ("logits", "logits", "float*"),
    ("amax_val", "amax_val", "float*"),
    ("amax_idx", "amax_idx", "i64*"),
)

DTYPE_OF_CTYPE = {
    "const bf16*": "bf16",
    "bf16*": "bf16",
    "float*": "f32",
    "i64*": "i64",
    "u64*": "u64",
}


@dataclass(frozen=True)
class Field:
    name: str  # C++ member path, e.g. "layers[3].q_proj"
    ctype: str  # in kernel.cu's aliases (bf16 = __nv_bfloat16, i64, u64)
    role: str  # weight | buffer | counters | tokens_out
    binds: str  # HF weight name, FusedGraph buffer name, or the role
    shape: tuple[int | str, ...]


def fields(fg: FusedGraph) -> list[Field]:
    """The fields of Params in declaration order (layers flattened)."""
    weights = dict(fg.weights)

    def weight(name: str, hf: str) -> Field:
        return Field(name, "const bf16*", "weight", hf, tuple(weights[hf]))

    def buffer(name: str, buf: str, ctype: str) -> Field:
        return Field(name, ctype, "buffer", buf, tuple(fg.buffer(buf).shape))

    out = [
        weight("embed_tokens", "model.embed_tokens.weight"),
        weight("norm", "model.norm.weight"),
        weight("lm_head", head_weight(dict(fg.dims))),  # embed_tokens when tied
    ]
    out += [buffer(n, b, c) for n, b, c in BUFFERS]
    # counters: zero at allocation, never reset; tokens_out: the token chosen at each step
    out.append(Field("counters", "u64*", "counters", "counters", ("NCOUNTERS",)))
    out.append(Field("tokens_out", "i64*", "tokens_out", "tokens_out", ("steps", "B")))
    for layer in range(int(fg.dim("layers"))):
        for f, suffix in LAYER_WEIGHTS:
            out.append(weight(f"layers[{layer}].{f}", f"model.layers.{layer}.{suffix}"))
        for c in LAYER_CACHES:
            out.append(buffer(f"layers[{layer}].{c}", f"{c}.{layer}", "bf16*"))
    return out


def params_layout(fg: FusedGraph, binding: dict[str, int] | None = None) -> dict[str, Any]:
    """The byte layout of `Params` for `fg`, JSON-able.

    Args:
        fg: the fused graph the kernel was rendered from.
        binding: optional symbol values (a Schedule's `bound()`, plus "steps" and "NCOUNTERS" if
            known) to resolve symbolic shapes; unresolved symbols stay strings.

    Returns:
        {"struct": "Params", "size", "align", "pass": "by value, __grid_constant__", "fields":
        [{"name", "offset", "ctype", "role", "binds", "dtype", "shape"}]}, every field an 8-byte
        device pointer that must be 16-byte aligned.
    """
    env = binding or {}
    out = []
    for i, f in enumerate(fields(fg)):
        shape = [env.get(s, s) if isinstance(s, str) else s for s in f.shape]
        out.append(
            {
                "name": f.name,
                "offset": i * POINTER_BYTES,
                "ctype": f.ctype.replace("bf16", "__nv_bfloat16")
                .replace("i64", "long long")
                .replace("u64", "unsigned long long"),
                "role": f.role,
                "binds": f.binds,
                "dtype": DTYPE_OF_CTYPE[f.ctype],
                "shape": shape,
            }
        )
    return {
        "struct": "Params",
        "pass": "by value, __grid_constant__",
        "size": len(out) * POINTER_BYTES,
        "align": POINTER_BYTES,
        "pointer_align": 16,
        "fields": out,
    }


def render_params(e: Emitter, fg: FusedGraph) -> None:
    """`struct Layer` and `struct Params`, one commented pointer per line."""
    fs = fields(fg)
    n = len(fs)
    e.comment("---- Params: every device pointer, passed by value (__grid_constant__) ----")
    e.comment(
        f"{n} pointers of 8 bytes, {n * POINTER_BYTES} bytes in all; each 16-byte aligned. params_layout(fg)"
    )
    e.comment("in compiler/codegen/params.py gives the same layout (offsets, bound names) as JSON.")
    with e.block("struct Layer", close="};"):
        e.comment("model.layers.{l}.<name>.weight, bf16, HF layout [out, in]")
        for member, suffix in LAYER_WEIGHTS:
            e.line(f"const bf16* {member};".ljust(40) + f"// {suffix}")
        e.comment("KV cache of the layer, bf16 [B, KV, S, D]")
        for c in LAYER_CACHES:
            e.line(f"bf16* {c};")
    with e.block("struct Params", close="};"):
        for f in fs:
            if f.name.startswith("layers["):
                continue
            shape = ", ".join(str(s) for s in f.shape)
            e.line(f"{f.ctype} {f.name};".ljust(40) + f"// {f.binds} [{shape}]")
        e.line("Layer layers[L];".ljust(40) + "// per decoder layer")
    e.line(
        f'static_assert(sizeof(Params) == {n * POINTER_BYTES}, "Params layout (params_layout)");'
    )
