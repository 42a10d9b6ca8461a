"""run_fused: the FusedGraph semantics in float64, on structured inputs first, then seeded random.

Structured: single instructions of a micro model's canonical program (`fused_layout.layout`)
against direct numpy formulas (split-KV attention with empty partitions, argmax ties across
tiles, split-K). Random: `run_fused(fuse(graph))` against `compiler.ir.evaluate(graph)` and the
PyTorch reference `DecodeStep`, over batch, position and every split binding.
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
import pytest
import torch

from compiler.frontend.synthetic import synthetic_state_dict
from compiler.ir import IRError, evaluate
from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.fused_eval import run_fused
from compiler.ir.fused_layout import layout
from compiler.reference import DecodeStep, Reference
from compiler.spec import ModelSpec
from tests.test_passes import SPECS, fused_of, graph_of

MICRO = ModelSpec(
    name="micro", arch="llama", hidden_size=8, intermediate_size=8, num_layers=1, num_heads=2,
    num_kv_heads=1, head_dim=4, vocab_size=16, rms_norm_eps=1e-5, rope_theta=10000.0,
    max_position_embeddings=64,
)  # fmt: skip
SPLITS = [dict(P=p, KS=ks, NT=nt) for p in (1, 3, 4) for ks in (1, 2) for nt in (1, 5)]


def only(fg: FusedGraph, *kinds: Kind) -> FusedGraph:
    return dataclasses.replace(fg, instrs=tuple(i for i in fg.instrs if i.kind in kinds))


# Structured inputs: one instruction or two at a time.


def attention_by_formula(q, k, v, pos, window):
    """Softmax attention of each head over the keys lo..pos, straight from the definition."""
    b, hq, d = q.shape
    g = hq // k.shape[1]
    lo = 0 if window is None else max(0, pos - window + 1)
    out = np.zeros_like(q)
    for bi in range(b):
        for h in range(hq):
            keys, vals = k[bi, h // g, lo : pos + 1], v[bi, h // g, lo : pos + 1]
            s = keys @ q[bi, h] / math.sqrt(d)
            p = np.exp(s - s.max()) / np.exp(s - s.max()).sum()
            out[bi, h] = p @ vals
    return out


@pytest.mark.parametrize(("parts", "pos", "window"), [
    (1, 6, None), (3, 6, None), (4, 6, None), (10, 6, None), (13, 6, None),  # P > n: empty tail
    (5, 8, 3),  # sliding window: keys 6..8 in partitions 0-2, partitions 3-4 empty
    (2, 9, 4),  # sliding window: keys 6..9, two keys each
    (4, 0, None),  # only key 0
])  # fmt: skip
def test_split_kv_attention_on_arange_caches(parts, pos, window):
    spec = dataclasses.replace(MICRO, sliding_window=window)
    fg = only(layout(spec), Kind.ATTN_PARTIAL, Kind.ATTN_MERGE)
    s, d = 10, 4
    k = (np.arange(s)[:, None] / s + np.arange(d) / 8)[None, None]  # [1, 1, S, D]
    v = np.arange(s * d, dtype=float).reshape(1, 1, s, d) / 7
    q = np.array([[1.0, 0.5, -0.5, 2.0, -1.0, 0.0, 1.5, 1.0]])  # [B, Hq*D], two heads
    inputs = {"q": q, "k_cache.0": k, "v_cache.0": v, "pos": pos, "token": np.zeros(1)}
    out = run_fused(fg, inputs, {}, dict(P=parts, KS=1, NT=1))
    want = attention_by_formula(q.reshape(1, 2, d), k, v, pos, window)
    np.testing.assert_allclose(out["attn"].reshape(1, 2, d), want, rtol=1e-13)
    lo = 0 if window is None else max(0, pos - window + 1)
    c = -(-(pos + 1 - lo) // parts)  # the visible keys lo..pos in runs of c
    empty = [p for p in range(parts) if lo + p * c > pos]
    assert len(empty) == parts - -(-(pos + 1 - lo) // c)
    scores = np.einsum("hd,jd->hj", q.reshape(2, d), k[0, 0]) / math.sqrt(d)  # [Hq, S]
    for p in set(range(parts)) - set(empty):
        keys = scores[:, lo + p * c : min(lo + (p + 1) * c, pos + 1)]
        np.testing.assert_allclose(out["attn_m"][0, :, p], keys.max(axis=1), rtol=1e-14)
    assert np.isneginf(out["attn_m"][..., empty]).all()
    assert (out["attn_l"][..., empty] == 0).all() and (out["attn_o"][:, :, empty] == 0).all()
    full = [p for p in range(parts) if p not in empty]
    assert np.isfinite(out["attn_m"][..., full]).all() and (out["attn_l"][..., full] > 0).all()
    assert all(np.isfinite(out[n]).all() for n in ("attn", "attn_o", "attn_l"))


@pytest.mark.parametrize("tiles", [1, 2, 3, 5, 7, 16, 20])
def test_argmax_ties_go_to_the_first_index_across_tiles(tiles):
    """Rows 3 and 9 of the head tie for the maximum logit: the next token is 3 for every tiling;
    with all rows equal it is 0. NT = 5, 7 and 20 leave the last tiles empty (CV = ceil(V/NT))."""
    fg = only(layout(MICRO), Kind.LMHEAD_ARGMAX, Kind.ARGMAX_REDUCE)
    head = np.ones((16, 8))
    head[[3, 9]] = 2.0
    weights = {"model.norm.weight": np.ones(8), "lm_head.weight": head}
    inputs = {
        "x": np.ones((2, 8)),
        "token": np.array([7, 7]),
        "pos": 0,
        "k_cache.0": np.zeros((2, 1, 4, 4)),
    }
    out = run_fused(fg, inputs, weights, dict(P=1, KS=1, NT=tiles))
    assert out["next_token"].tolist() == [3, 3]
    cv = -(-16 // tiles)
    empty = [t for t in range(tiles) if t * cv >= 16]
    assert np.isneginf(out["amax_val"][:, empty]).all() and (out["amax_idx"][:, empty] == -1).all()
    weights["lm_head.weight"] = np.ones((16, 8))
    assert run_fused(fg, inputs, weights, dict(P=1, KS=1, NT=tiles))["next_token"].tolist() == [
        0,
        0,
    ]


@pytest.mark.parametrize("chunks", [1, 2, 4, 8])
def test_split_k_down_projection_sums_to_the_whole(chunks):
    fg = only(layout(MICRO), Kind.DOWN_PARTIAL, Kind.DOWN_RESIDUAL)
    act, x = np.arange(16.0).reshape(2, 8) / 5, np.ones((2, 8))
    wd = np.arange(64.0).reshape(8, 8) / 64 - 0.5
    inputs = {
        "act": act,
        "x": x,
        "token": np.zeros(2),
        "pos": 0,
        "k_cache.0": np.zeros((2, 1, 4, 4)),
    }
    out = run_fused(
        fg, inputs, {"model.layers.0.mlp.down_proj.weight": wd}, dict(P=1, KS=chunks, NT=1)
    )
    assert out["down"].shape == (chunks, 2, 8)
    np.testing.assert_allclose(out["x"], x + act @ wd.T, rtol=1e-14)


def test_bad_bindings_are_refused():
    fg = only(layout(MICRO), Kind.DOWN_PARTIAL)
    inputs = {"token": np.zeros(1), "pos": 0, "k_cache.0": np.zeros((1, 1, 4, 4))}
    w = {"model.layers.0.mlp.down_proj.weight": np.ones((8, 8))}
    with pytest.raises(IRError, match="KS=3 does not divide the intermediate size 8"):
        run_fused(fg, inputs, w, dict(P=1, KS=3, NT=1))
    with pytest.raises(IRError, match="binding has no NT"):
        run_fused(fg, inputs, w, dict(P=1, KS=1))
    with pytest.raises(IRError, match="pos 4 is outside the cache capacity S=4"):
        run_fused(fg, {**inputs, "pos": 4}, w, dict(P=1, KS=1, NT=1))
    with pytest.raises(IRError, match="binding says B=2 but the inputs have B=1"):
        run_fused(fg, inputs, w, dict(B=2, P=1, KS=1, NT=1))


# Seeded random: run_fused(fuse(graph)) == evaluate(graph) == DecodeStep, for every split.

S = 32


@functools.cache
def model(name: str) -> tuple[dict[str, torch.Tensor], Reference]:
    """Seeded synthetic float64 weights, and the reference model holding them."""
    spec = SPECS[name]
    sd = synthetic_state_dict(spec, seed=7, dtype=torch.float64)
    ref = Reference(spec, S)
    ref.load_state_dict(sd)
    return sd, ref


def random_case(name: str, batch: int, pos: int, seed: int = 0):
    spec = SPECS[name]
    sd = model(name)[0]
    gen = torch.Generator().manual_seed(seed * 100 + batch * 10 + pos)
    shape = (batch, spec.num_kv_heads, S, spec.head_dim)
    inputs: dict[str, torch.Tensor] = {
        "token": torch.randint(0, spec.vocab_size, (batch,), generator=gen),
        "pos": torch.tensor(pos),
    }
    for layer in range(spec.num_layers):
        inputs[f"k_cache.{layer}"] = torch.randn(shape, generator=gen, dtype=torch.float64)
        inputs[f"v_cache.{layer}"] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return spec, inputs, sd


def reference(name: str, inputs):
    spec, ref = SPECS[name], model(name)[1]
    caches = [inputs[f"{c}_cache.{i}"] for i in range(spec.num_layers) for c in "kv"]
    with torch.no_grad():
        out = DecodeStep(ref)(inputs["token"], inputs["pos"], *caches)
    want = {"next_token": out[0].numpy(), "logits": out[1].numpy()}
    for i in range(spec.num_layers):
        want[f"k_cache.{i}"], want[f"v_cache.{i}"] = out[2 + 2 * i].numpy(), out[3 + 2 * i].numpy()
    return want


@pytest.mark.parametrize("name", ["tiny-llama", "tiny-mistral", "tiny-tied-llama3"])
@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("pos", [0, 5, 29])  # tiny-mistral's window is 16: pos 29 sees 14..29
def test_fused_program_equals_graph_and_reference(name, batch, pos):
    spec, inputs, sd = random_case(name, batch, pos)
    fg, g = fused_of(name), graph_of(name)
    want = evaluate(g, inputs, sd)
    ref = reference(name, inputs)
    np.testing.assert_allclose(want["logits"], ref["logits"], rtol=1e-10, atol=1e-12)
    for binding in SPLITS:
        got = run_fused(fg, inputs, sd, binding)
        assert (
            got["next_token"].tolist() == want["next_token"].tolist() == ref["next_token"].tolist()
        )
        np.testing.assert_allclose(got["logits"], want["logits"], rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(got["logits"], ref["logits"], rtol=1e-10, atol=1e-12)
        for layer in range(spec.num_layers):
            for c in (f"k_cache.{layer}", f"v_cache.{layer}"):
                # Bit-identical, except the slot written at pos of layers > 0, whose input x
                # went through attention and the down projection summed in another order.
                if layer == 0:
                    np.testing.assert_array_equal(got[c], want[c])
                else:
                    rest = np.delete(got[c], pos, axis=2), np.delete(want[c], pos, axis=2)
                    np.testing.assert_array_equal(*rest)
                    np.testing.assert_allclose(
                        got[c][:, :, pos], want[c][:, :, pos], rtol=1e-12, atol=1e-13
                    )
                np.testing.assert_allclose(got[c], ref[c], rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize(("name", "slot", "changes"), [
    ("tiny-mistral", 5, False),  # outside the window 14..29
    ("tiny-mistral", 20, True),
    ("tiny-llama", 5, True),  # no window: every earlier key is visible
])  # fmt: skip
def test_sliding_window_hides_old_keys(name, slot, changes):
    spec, inputs, sd = random_case(name, 2, 29)
    binding = dict(P=3, KS=2, NT=5)
    base = run_fused(fused_of(name), inputs, sd, binding)["logits"]
    poked = dict(inputs)
    for layer in range(spec.num_layers):
        for c in (f"k_cache.{layer}", f"v_cache.{layer}"):
            poked[c] = inputs[c].clone()
            poked[c][:, :, slot] += 1.0
    logits = run_fused(fused_of(name), poked, sd, binding)["logits"]
    assert (not np.array_equal(logits, base)) is changes
    want = evaluate(graph_of(name), poked, sd)["logits"]
    np.testing.assert_allclose(logits, want, rtol=1e-10, atol=1e-12)


def test_numeric_check_catches_a_wrong_program():
    """The comparison above can fail: the program with one layer's ATTN_MERGE after its
    OPROJ_RESIDUAL (which then reads a stale attn buffer) or a wrong eps gives other logits."""
    name = "tiny-llama"
    _, inputs, sd = random_case(name, 3, 5)
    fg = fused_of(name)
    want = evaluate(graph_of(name), inputs, sd)["logits"]
    instrs = list(fg.instrs)
    k = next(i for i, s in enumerate(instrs) if s.kind is Kind.ATTN_MERGE and s.layer == 1)
    instrs[k : k + 2] = instrs[k + 1], instrs[k]
    stale = run_fused(dataclasses.replace(fg, instrs=tuple(instrs)), inputs, sd, SPLITS[0])
    assert not np.allclose(stale["logits"], want, rtol=1e-3)
    instrs = list(fg.instrs)
    instrs[1] = dataclasses.replace(instrs[1], attrs=(("eps", 1e-2),))
    wrong_eps = run_fused(dataclasses.replace(fg, instrs=tuple(instrs)), inputs, sd, SPLITS[0])
    assert not np.allclose(wrong_eps["logits"], want, rtol=1e-6)
