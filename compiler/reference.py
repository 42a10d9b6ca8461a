"""Reference LLaMA/Mistral forward with a static KV cache, in plain PyTorch.

This is the semantic reference for everything downstream: the graph frontends trace it, the
evaluator is checked against it, and kernels are compared with it. It runs on the CPU in
float64 (every op in float64) and on a GPU in bf16 (norms, RoPE angles and softmax in float32,
as HF does). Parameter names are HF's, so an HF state dict loads as is.

Cache layout, per layer: k_cache[l], v_cache[l] of shape [B, KV, S, D] (batch, KV head,
position, head dim). Positions are shared across the batch: tokens [B, T] occupy positions
pos .. pos+T-1 of every sequence.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from compiler.spec import ModelSpec


def rope_inv_freq(spec: ModelSpec) -> Tensor:
    """Inverse RoPE frequencies [D/2] in float64, with llama3 scaling applied when configured."""
    d = spec.head_dim
    inv = 1.0 / spec.rope_theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    rs = spec.rope_scaling
    if rs is None:
        return inv
    low_wavelen = rs.original_max_position_embeddings / rs.low_freq_factor
    high_wavelen = rs.original_max_position_embeddings / rs.high_freq_factor
    wavelen = 2 * math.pi / inv
    scaled = torch.where(wavelen > low_wavelen, inv / rs.factor, inv)
    smooth = (rs.original_max_position_embeddings / wavelen - rs.low_freq_factor) / (
        rs.high_freq_factor - rs.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / rs.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float32 if dtype in (torch.bfloat16, torch.float16) else dtype


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype, device=device))
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        # y = x / sqrt(mean(x^2) + eps) * w, computed in float32 (or float64) like HF.
        h = x.to(_compute_dtype(x.dtype))
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def _linear(i: int, o: int, dtype: torch.dtype, device: torch.device | str) -> nn.Linear:
    return nn.Linear(i, o, bias=False, dtype=dtype, device=device)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


class Attention(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.spec = spec
        h = spec.hidden_size
        self.q_proj = _linear(h, spec.q_size, dtype, device)
        self.k_proj = _linear(h, spec.kv_size, dtype, device)
        self.v_proj = _linear(h, spec.kv_size, dtype, device)
        self.o_proj = _linear(spec.q_size, h, dtype, device)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        positions: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        s = self.spec
        b, t, _ = x.shape
        d, kv, g = s.head_dim, s.num_kv_heads, s.num_heads // s.num_kv_heads
        q = self.q_proj(x).view(b, t, s.num_heads, d).transpose(1, 2)  # [B, H, T, D]
        k = self.k_proj(x).view(b, t, kv, d).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(b, t, kv, d).transpose(1, 2)  # [B, KV, T, D]
        q = q * cos + rotate_half(q) * sin
        k = k * cos + rotate_half(k) * sin
        k_cache = k_cache.index_copy(2, positions, k)  # [B, KV, S, D]
        v_cache = v_cache.index_copy(2, positions, v)
        # GQA: query head h reads KV head h // g.
        keys = k_cache[:, :, None].expand(b, kv, g, *k_cache.shape[2:]).reshape(b, kv * g, -1, d)
        vals = v_cache[:, :, None].expand(b, kv, g, *v_cache.shape[2:]).reshape(b, kv * g, -1, d)
        scores = torch.matmul(q, keys.transpose(2, 3)) * (1.0 / math.sqrt(d))  # [B, H, T, S]
        scores = scores.to(_compute_dtype(scores.dtype)).masked_fill(~mask, float("-inf"))
        probs = torch.softmax(scores, dim=-1).to(q.dtype)
        out = torch.matmul(probs, vals)  # [B, H, T, D]
        out = out.transpose(1, 2).reshape(b, t, s.q_size)
        return self.o_proj(out), k_cache, v_cache


class MLP(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        h, i = spec.hidden_size, spec.intermediate_size
        self.gate_proj = _linear(h, i, dtype, device)
        self.up_proj = _linear(h, i, dtype, device)
        self.down_proj = _linear(i, h, dtype, device)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(nn.functional.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.input_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.self_attn = Attention(spec, dtype, device)
        self.post_attention_layernorm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)
        self.mlp = MLP(spec, dtype, device)

    def forward(
        self,
        x: Tensor,
        cos: Tensor,
        sin: Tensor,
        mask: Tensor,
        positions: Tensor,
        k_cache: Tensor,
        v_cache: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor]:
        a, k_cache, v_cache = self.self_attn(
            self.input_layernorm(x), cos, sin, mask, positions, k_cache, v_cache
        )
        x = x + a
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x, k_cache, v_cache


class Body(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, spec: ModelSpec, dtype: torch.dtype, device: torch.device | str):
        super().__init__()
        self.embed_tokens = nn.Embedding(
            spec.vocab_size, spec.hidden_size, dtype=dtype, device=device
        )
        self.layers = nn.ModuleList(
            DecoderLayer(spec, dtype, device) for _ in range(spec.num_layers)
        )
        self.norm = RMSNorm(spec.hidden_size, spec.rms_norm_eps, dtype, device)


class Reference(nn.Module):
    """The LLaMA/Mistral forward over T new tokens with a static KV cache of capacity max_seq.

    `forward(tokens [B, T] int64, pos [] int64, k_caches, v_caches)` returns
    `(logits [B, T, V], new k_caches, new v_caches)`; caches are not modified in place.
    """

    inv_freq: Tensor  # [D/2] float64, a non-persistent buffer

    def __init__(
        self,
        spec: ModelSpec,
        max_seq: int,
        dtype: torch.dtype = torch.float64,
        device: torch.device | str = "cpu",
    ):
        super().__init__()
        self.spec, self.max_seq, self.dtype = spec, max_seq, dtype
        self.model = Body(spec, dtype, device)
        if not spec.tie_word_embeddings:
            self.lm_head = _linear(spec.hidden_size, spec.vocab_size, dtype, device)
        self.register_buffer("inv_freq", rope_inv_freq(spec).to(device=device), persistent=False)

    def head_weight(self) -> Tensor:
        return (
            self.model.embed_tokens.weight if self.spec.tie_word_embeddings else self.lm_head.weight
        )

    def empty_cache(
        self, batch: int, device: torch.device | str | None = None
    ) -> tuple[list[Tensor], list[Tensor]]:
        s = self.spec
        dev = device if device is not None else self.model.embed_tokens.weight.device
        shape = (batch, s.num_kv_heads, self.max_seq, s.head_dim)
        ks = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(s.num_layers)]
        vs = [torch.zeros(shape, dtype=self.dtype, device=dev) for _ in range(s.num_layers)]
        return ks, vs

    def prologue(self, tokens: Tensor, pos: Tensor, max_seq: int) -> tuple[Tensor, ...]:
        """Embeddings and per-step tables: x [B, T, H], cos/sin [T, D], mask [T, S], positions [T]."""
        s = self.spec
        t = tokens.shape[1]
        positions = pos + torch.arange(t, device=tokens.device)  # [T]
        # RoPE angles in float64 on the CPU, float32 for bf16: [T, D/2] -> cos/sin [T, D].
        cdt = _compute_dtype(self.dtype)
        angles = positions.to(cdt)[:, None] * self.inv_freq.to(cdt)[None, :]
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        # mask[t, j]: query at positions[t] sees key position j (causal, optional sliding window).
        keys = torch.arange(max_seq, device=tokens.device)  # [S]
        mask = keys[None, :] <= positions[:, None]
        if s.sliding_window is not None:
            mask = mask & (keys[None, :] > positions[:, None] - s.sliding_window)
        x = self.model.embed_tokens(tokens)  # [B, T, H]
        return x, cos, sin, mask, positions

    def epilogue(self, x: Tensor) -> Tensor:
        """Final norm and LM head: x [B, T, H] -> logits [B, T, V]."""
        return torch.matmul(self.model.norm(x), self.head_weight().t())

    def forward(
        self, tokens: Tensor, pos: Tensor, k_caches: list[Tensor], v_caches: list[Tensor]
    ) -> tuple[Tensor, list[Tensor], list[Tensor]]:
        x, cos, sin, mask, positions = self.prologue(tokens, pos, k_caches[0].shape[2])
        new_k, new_v = [], []
        for layer, kc, vc in zip(self.model.layers, k_caches, v_caches, strict=True):
            x, kc, vc = layer(x, cos, sin, mask, positions, kc, vc)
            new_k.append(kc)
            new_v.append(vc)
        return self.epilogue(x), new_k, new_v


class DecodeStep(nn.Module):
    """One decode step, the function a megakernel computes: token in, next token and logits out.

    `forward(token [B] int64, pos [] int64, *caches)` with caches k_0, v_0, k_1, v_1, ...
    returns `(next_token [B], logits [B, V], k_0', v_0', ...)`.
    """

    def __init__(self, ref: Reference):
        super().__init__()
        self.ref = ref

    def forward(self, token: Tensor, pos: Tensor, *caches: Tensor) -> tuple[Tensor, ...]:
        ks, vs = list(caches[0::2]), list(caches[1::2])
        logits, ks, vs = self.ref(token[:, None], pos, ks, vs)
        logits = logits[:, 0]
        next_token = torch.argmax(logits, dim=-1)
        out: list[Tensor] = [next_token, logits]
        for k, v in zip(ks, vs, strict=True):
            out += [k, v]
        return tuple(out)


def generate(ref: Reference, prompt: Tensor, steps: int) -> tuple[Tensor, list[Tensor]]:
    """Greedy decode: prefill `prompt` [B, P], then `steps` decode steps.

    Returns tokens [B, steps] and steps + 1 logits [B, V]: those of the prefill's last position
    (which chose the first token), then those of each decode step (the last chose nothing).
    """
    ks, vs = ref.empty_cache(prompt.shape[0], prompt.device)
    logits, ks, vs = ref(prompt, torch.tensor(0, device=prompt.device), ks, vs)
    last = logits[:, -1]
    tokens, all_logits = [], [last]
    pos = prompt.shape[1]
    for _ in range(steps):
        tok = torch.argmax(last, dim=-1)
        tokens.append(tok)
        logits, ks, vs = ref(tok[:, None], torch.tensor(pos, device=prompt.device), ks, vs)
        last = logits[:, 0]
        all_logits.append(last)
        pos += 1
    return torch.stack(tokens, dim=1), all_logits
