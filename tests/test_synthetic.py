"""Synthetic weights: names and shapes, determinism per seed, and scales that keep activations O(1)."""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import Tensor

from compiler.frontend.checkpoint import expected_tensors
from compiler.frontend.synthetic import iter_synthetic, synthetic_state_dict
from compiler.reference import Reference
from compiler.spec import ModelSpec

TINY = ModelSpec(
    name="tiny", arch="llama", hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=256,
)  # fmt: skip


@pytest.mark.parametrize("tied", [False, True])
def test_names_and_shapes_are_the_spec_weights(tied: bool) -> None:
    spec = dataclasses.replace(TINY, tie_word_embeddings=tied)
    sd = synthetic_state_dict(spec, seed=0)
    assert {n: tuple(t.shape) for n, t in sd.items()} == expected_tensors(spec)
    assert all(t.dtype == torch.float32 and t.device.type == "cpu" for t in sd.values())


def test_same_seed_gives_identical_weights() -> None:
    a, b = synthetic_state_dict(TINY, seed=7), synthetic_state_dict(TINY, seed=7)
    assert all(torch.equal(a[n], b[n]) for n in a)


def test_different_seeds_differ_in_every_tensor() -> None:
    a, b = synthetic_state_dict(TINY, seed=1), synthetic_state_dict(TINY, seed=2)
    assert all(not torch.equal(a[n], b[n]) for n in a)


def test_tensors_within_one_model_are_distinct() -> None:
    sd = synthetic_state_dict(TINY, seed=0)
    q0, q1 = (
        sd["model.layers.0.self_attn.q_proj.weight"],
        sd["model.layers.1.self_attn.q_proj.weight"],
    )
    assert not torch.equal(q0, q1)
    assert not torch.equal(
        sd["model.layers.0.mlp.gate_proj.weight"], sd["model.layers.0.mlp.up_proj.weight"]
    )


def test_dtype_is_a_cast_of_the_float32_values() -> None:
    f32 = synthetic_state_dict(TINY, seed=3)
    for dtype in (torch.float64, torch.bfloat16):
        other = synthetic_state_dict(TINY, seed=3, dtype=dtype)
        assert all(other[n].dtype == dtype and torch.equal(other[n], f32[n].to(dtype)) for n in f32)


def test_a_tensor_depends_only_on_seed_name_and_shape() -> None:
    # Streaming a deeper model yields the same layer-0 weights: nothing depends on draw order.
    # (o_proj/down_proj carry a depth-dependent scale, so they are compared up to it.)
    deep = dataclasses.replace(TINY, num_layers=5)
    a, b = synthetic_state_dict(TINY, seed=4), dict(iter_synthetic(deep, seed=4))
    for name in a:
        if name.endswith(("o_proj.weight", "down_proj.weight")):
            torch.testing.assert_close(a[name] * math.sqrt(2 * 2), b[name] * math.sqrt(2 * 5))
        else:
            assert torch.equal(a[name], b[name]), name


def _std(t: Tensor) -> float:
    return float(t.double().std())


def test_scales() -> None:
    sd = synthetic_state_dict(TINY, seed=0)
    assert _std(sd["model.embed_tokens.weight"]) == pytest.approx(1.0, rel=0.05)
    for name, t in sd.items():
        if name.endswith("norm.weight"):
            assert float(t.mean()) == pytest.approx(1.0, abs=0.03), name
            assert _std(t) == pytest.approx(0.1, rel=0.25), name
        elif name.endswith("proj.weight") or name == "lm_head.weight":
            want = 1 / math.sqrt(t.shape[1])
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                want /= math.sqrt(2 * TINY.num_layers)
            assert _std(t) == pytest.approx(want, rel=0.05), name


def test_activations_stay_order_one_over_depth() -> None:
    deep = dataclasses.replace(
        TINY, hidden_size=64, intermediate_size=128, num_layers=24, head_dim=16
    )
    ref = Reference(deep, max_seq=16)
    ref.load_state_dict(synthetic_state_dict(deep, seed=0, dtype=torch.float64), strict=True)
    rms: list[float] = []
    for layer in ref.model.layers:
        layer.register_forward_hook(
            lambda _m, _i, out: rms.append(float(out[0].pow(2).mean().sqrt()))
        )
    tokens = torch.arange(16).reshape(2, 8) * 7 % deep.vocab_size  # [B=2, T=8]
    ks, vs = ref.empty_cache(2)
    with torch.no_grad():
        logits, _, _ = ref(tokens, torch.tensor(0), ks, vs)
    assert len(rms) == deep.num_layers
    assert all(0.7 < r < 2.0 for r in rms), rms  # the residual's RMS: 1 at the embedding
    assert bool(torch.isfinite(logits).all()) and 0.3 < float(logits.std()) < 3.0
