"""The reference model in float64: cache placement, RoPE, masks, GQA, prefill vs decode, and HF.

Structured checks first; then a dev-only comparison with transformers' Llama/Mistral models.
"""

from __future__ import annotations

import dataclasses
from typing import cast

import pytest
import torch
from torch import Tensor

from compiler.frontend.synthetic import synthetic_state_dict
from compiler.reference import DecoderLayer, DecodeStep, Reference, generate
from compiler.spec import ModelSpec, RopeScaling, spec_to_hf_config

TINY = ModelSpec(
    name="tiny", arch="llama", hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=256,
)  # fmt: skip
MISTRAL = dataclasses.replace(TINY, name="tiny-mistral", arch="mistral", sliding_window=8)
LLAMA3_ROPE = dataclasses.replace(
    TINY, name="tiny-llama3-rope", rope_scaling=RopeScaling(8.0, 1.0, 4.0, 64)
)  # 64 tokens of original context puts the 32 frequencies in all three llama3 bands
TIED = dataclasses.replace(TINY, name="tiny-tied", tie_word_embeddings=True)


def _ref(spec: ModelSpec, max_seq: int = 32, seed: int = 0) -> Reference:
    ref = Reference(spec, max_seq)  # float64 on the CPU
    ref.load_state_dict(synthetic_state_dict(spec, seed, torch.float64), strict=True)
    return ref.requires_grad_(False)


def _layer(ref: Reference, i: int) -> DecoderLayer:
    return cast(DecoderLayer, ref.model.layers[i])


def _tokens(batch: int, length: int, seed: int = 0) -> Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, TINY.vocab_size, (batch, length), generator=g)  # [B, T]


def _rel(a: Tensor, b: Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


# -- structured tests ---------------------------------------------------------------------


def test_cache_holds_each_token_at_its_position() -> None:
    ref = _ref(TINY, max_seq=16)
    tokens = _tokens(2, 3)
    ks0, vs0 = ref.empty_cache(2)
    _, ks, vs = ref(tokens, torch.tensor(0), ks0, vs0)
    assert all(int(c.count_nonzero()) == 0 for c in ks0 + vs0)  # inputs are not modified
    for c in ks + vs:  # [B, KV, S, D]
        assert bool((c[:, :, :3] != 0).all()) and int(c[:, :, 3:].count_nonzero()) == 0
    _, ks2, vs2 = ref(_tokens(2, 1, seed=1), torch.tensor(3), ks, vs)
    for old, new in zip(ks + vs, ks2 + vs2, strict=True):
        assert torch.equal(new[:, :, :3], old[:, :, :3])
        assert bool((new[:, :, 3] != 0).all()) and int(new[:, :, 4:].count_nonzero()) == 0


def test_cache_contents_are_projected_and_rotated_keys_and_values() -> None:
    ref = _ref(TINY, max_seq=16)
    tokens = _tokens(2, 5)
    _, ks, vs = ref(tokens, torch.tensor(0), *ref.empty_cache(2))
    layer = _layer(ref, 0)
    x = layer.input_layernorm(ref.model.embed_tokens(tokens))  # [B, T, H]
    d, half = TINY.head_dim, TINY.head_dim // 2
    k = layer.self_attn.k_proj(x).view(2, 5, TINY.num_kv_heads, d).transpose(1, 2)  # [B, KV, T, D]
    v = layer.self_attn.v_proj(x).view(2, 5, TINY.num_kv_heads, d).transpose(1, 2)
    torch.testing.assert_close(vs[0][:, :, :5], v, rtol=0, atol=1e-12)
    # RoPE as a complex rotation of the pairs (x_i, x_{i+D/2}) by pos * theta^(-2i/D).
    inv_freq = TINY.rope_theta ** (-torch.arange(half, dtype=torch.float64) * 2 / d)  # [D/2]
    angle = torch.arange(5, dtype=torch.float64)[:, None] * inv_freq  # [T, D/2]
    z = torch.complex(k[..., :half], k[..., half:]) * torch.polar(torch.ones_like(angle), angle)
    torch.testing.assert_close(ks[0][:, :, :5], torch.cat((z.real, z.imag), -1), rtol=0, atol=1e-12)


@pytest.mark.parametrize(("spec", "length"), [(TINY, 6), (MISTRAL, 12)], ids=["llama", "mistral"])
def test_prefill_equals_one_token_at_a_time(spec: ModelSpec, length: int) -> None:
    ref = _ref(spec)
    tokens = _tokens(2, length)
    logits, ks, vs = ref(tokens, torch.tensor(0), *ref.empty_cache(2))
    ks1, vs1 = ref.empty_cache(2)
    for t in range(length):
        step, ks1, vs1 = ref(tokens[:, t : t + 1], torch.tensor(t), ks1, vs1)
        torch.testing.assert_close(step[:, 0], logits[:, t], rtol=0, atol=1e-10)
    for a, b in zip(ks + vs, ks1 + vs1, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


def test_decode_step_equals_reference() -> None:
    ref = _ref(MISTRAL)
    _, ks, vs = ref(_tokens(2, 9), torch.tensor(0), *ref.empty_cache(2))
    token, pos = _tokens(2, 1, seed=5)[:, 0], torch.tensor(9)
    want, wks, wvs = ref(token[:, None], pos, ks, vs)
    caches = [c for kv in zip(ks, vs, strict=True) for c in kv]  # k_0, v_0, k_1, v_1
    out = DecodeStep(ref)(token, pos, *caches)
    assert torch.equal(out[0], want[:, 0].argmax(-1))
    assert torch.equal(out[1], want[:, 0])
    assert all(
        torch.equal(a, b)
        for a, b in zip(out[2:], [c for kv in zip(wks, wvs, strict=True) for c in kv], strict=True)
    )


@pytest.mark.parametrize(
    ("spec", "slot", "matters"),
    [
        (MISTRAL, 4, False),  # query at 12, window 8: keys 5..12 are visible
        (MISTRAL, 5, True),
        (TINY, 0, True),  # no window: every past key counts
        (TINY, 13, False),  # causal: a future slot never counts
    ],
    ids=["mistral-just-outside", "mistral-oldest-inside", "llama-first", "llama-future"],
)
def test_which_cache_slots_influence_the_output(spec: ModelSpec, slot: int, matters: bool) -> None:
    ref = _ref(spec)
    _, ks, vs = ref(_tokens(2, 12), torch.tensor(0), *ref.empty_cache(2))
    token = _tokens(2, 1, seed=3)
    want, _, _ = ref(token, torch.tensor(12), ks, vs)
    g = torch.Generator().manual_seed(1)
    bent_k, bent_v = [k.clone() for k in ks], [v.clone() for v in vs]
    for c in bent_k + bent_v:
        c[:, :, slot] += 10 * torch.randn(c[:, :, slot].shape, generator=g, dtype=c.dtype)
    got, _, _ = ref(token, torch.tensor(12), bent_k, bent_v)
    if matters:
        assert _rel(got, want) > 1e-3
    else:
        assert torch.equal(got, want)


def test_gqa_query_head_reads_kv_head_h_div_g() -> None:
    # 4 query heads, 2 KV heads: heads 0, 1 read KV head 0 and heads 2, 3 read KV head 1.
    ref = _ref(TINY, max_seq=8)
    attn = _layer(ref, 0).self_attn
    h, d, s = TINY.hidden_size, TINY.head_dim, 8
    # Every query head's q is e_0: x = e_0 and q_proj maps x_0 to component 0 of each head.
    attn.q_proj.weight.zero_()
    attn.q_proj.weight[0::d, 0] = 1.0
    x = torch.zeros(1, 1, h, dtype=torch.float64)
    x[..., 0] = 1.0
    # KV head j's keys single out slot 1 + j; its values at slot s are 10 j + s.
    k_cache = torch.zeros(1, 2, s, d, dtype=torch.float64)
    k_cache[0, 0, 1, 0] = k_cache[0, 1, 2, 0] = 500.0
    v_cache = (10 * torch.arange(2.0)[:, None] + torch.arange(float(s))).to(torch.float64)
    v_cache = v_cache[None, :, :, None].expand(1, 2, s, d).clone()  # [B, KV, S, D]
    mask = torch.arange(s)[None, :] < 4  # slots 0..3 visible; the new token goes to slot 5
    ones, zeros = torch.ones(1, d, dtype=torch.float64), torch.zeros(1, d, dtype=torch.float64)
    seen: list[Tensor] = []
    attn.o_proj.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    attn(x, ones, zeros, mask, torch.tensor([5]), k_cache, v_cache)
    heads = seen[0].view(TINY.num_heads, d)  # [H, D]
    want = torch.tensor([1.0, 1.0, 12.0, 12.0], dtype=torch.float64)[:, None].expand(-1, d)
    torch.testing.assert_close(heads, want, rtol=0, atol=1e-9)


# -- dev-only: against transformers --------------------------------------------------------


def _hf_model(spec: ModelSpec) -> torch.nn.Module:
    transformers = pytest.importorskip(
        "transformers", reason="transformers (dev extra) is not installed; HF comparison skipped"
    )
    if spec.arch == "llama":
        cfg = transformers.LlamaConfig(**spec_to_hf_config(spec), attn_implementation="eager")
        model = transformers.LlamaForCausalLM(cfg)
    else:
        cfg = transformers.MistralConfig(**spec_to_hf_config(spec), attn_implementation="eager")
        model = transformers.MistralForCausalLM(cfg)
    sd = synthetic_state_dict(spec, seed=0, dtype=torch.float64)
    if spec.tie_word_embeddings:
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]  # HF keeps a tied alias
    model = model.to(torch.float64).eval()
    model.load_state_dict(sd, strict=True)
    return model


# HF computes RoPE angles in float32 even in a float64 model, so agreement is ~1e-7, not ~1e-15.
HF_TOLERANCE = 1e-6

# What each case exercises, and the spec without it (the comparison must be able to fail).
HF_CASES = {
    "llama": (TINY, None),
    "mistral-window": (MISTRAL, dataclasses.replace(MISTRAL, sliding_window=None)),
    "llama3-rope": (LLAMA3_ROPE, TINY),
    "tied": (TIED, None),
}


@pytest.mark.parametrize(("spec", "without"), HF_CASES.values(), ids=HF_CASES.keys())
def test_matches_transformers(spec: ModelSpec, without: ModelSpec | None) -> None:
    hf = _hf_model(spec)
    ref = _ref(spec)
    prompt = _tokens(2, 5, seed=11)
    tokens, logits = generate(ref, prompt, steps=8)  # 13 positions: past the window of 8
    seq = prompt
    with torch.no_grad():
        full = hf(input_ids=prompt, use_cache=False).logits  # [B, 5, V]
        prefill, _, _ = ref(prompt, torch.tensor(0), *ref.empty_cache(2))
        assert _rel(prefill, full) < HF_TOLERANCE
        # HF re-runs the whole growing sequence each step; we decode with the cache.
        for step, ours in enumerate(logits):
            theirs = hf(input_ids=seq, use_cache=False).logits[:, -1]  # [B, V]
            assert _rel(ours, theirs) < HF_TOLERANCE, f"step {step}"
            if step < len(logits) - 1:
                assert torch.equal(theirs.argmax(-1), tokens[:, step])
                seq = torch.cat((seq, tokens[:, step : step + 1]), dim=1)
    if without is not None:
        _, other = generate(_ref(without), prompt, steps=8)
        assert _rel(other[-1], logits[-1]) > 1e-3  # the feature changes the function
