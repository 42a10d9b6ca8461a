"""Checkpoint loading: round trips, laziness, every refusal, and the digest."""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor

import compiler.frontend.checkpoint as ckpt_mod
from compiler.frontend.checkpoint import (
    INDEX_FILE,
    SINGLE_FILE,
    Checkpoint,
    CheckpointError,
    checkpoint_digest,
    expected_tensors,
)
from compiler.frontend.synthetic import synthetic_state_dict, write_checkpoint
from compiler.reference import Reference
from compiler.spec import ModelSpec, spec_from_config_file

TINY = ModelSpec(
    name="tiny", arch="llama", hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=256,
)  # fmt: skip
TIED = dataclasses.replace(TINY, name="tiny-tied", tie_word_embeddings=True)
UP1 = "model.layers.1.mlp.up_proj.weight"


def _sd(spec: ModelSpec = TINY) -> dict[str, Tensor]:
    return synthetic_state_dict(spec, seed=0)


def _refused(path: Path, spec: ModelSpec = TINY) -> str:
    """Open the checkpoint, expect a refusal, and return its (one-line) message."""
    with pytest.raises(CheckpointError) as info:
        Checkpoint.open(path, spec)
    msg = str(info.value)
    assert "\n" not in msg
    return msg


def _shards(path: Path) -> list[Path]:
    return sorted(path.glob("model-*.safetensors"))


def _edit_index(path: Path, edit: Any) -> None:
    doc = json.loads((path / INDEX_FILE).read_text())
    edit(doc["weight_map"])
    (path / INDEX_FILE).write_text(json.dumps(doc))


# -- names, round trips, laziness ---------------------------------------------------------


@pytest.mark.parametrize("spec", [TINY, TIED], ids=["untied", "tied"])
def test_expected_tensors_are_the_reference_parameters(spec: ModelSpec) -> None:
    ref = Reference(spec, max_seq=8)
    params = {n: tuple(p.shape) for n, p in ref.named_parameters()}
    assert expected_tensors(spec) == params
    assert ("lm_head.weight" in params) == (not spec.tie_word_embeddings)


@pytest.mark.parametrize("shards", [1, 3])
def test_round_trip(tmp_path: Path, shards: int) -> None:
    sd = _sd()
    write_checkpoint(TINY, sd, tmp_path, shards=shards)
    assert len(_shards(tmp_path)) == (0 if shards == 1 else 3)
    assert (tmp_path / SINGLE_FILE).exists() == (shards == 1)
    assert spec_from_config_file(tmp_path) == TINY.with_name(str(tmp_path / "config.json"))
    loaded = Checkpoint.open(tmp_path, TINY).state_dict(torch.float64)
    assert list(loaded) == list(expected_tensors(TINY))
    for name, t in sd.items():
        assert loaded[name].dtype == torch.float64
        assert torch.equal(loaded[name], t.double()), name


@pytest.mark.parametrize(
    ("dtype", "code"), [(torch.bfloat16, "BF16"), (torch.float16, "F16"), (torch.float32, "F32")]
)
def test_accepted_stored_dtypes_convert_on_load(
    tmp_path: Path, dtype: torch.dtype, code: str
) -> None:
    sd = {n: t.to(dtype) for n, t in _sd().items()}
    write_checkpoint(TINY, sd, tmp_path)
    ck = Checkpoint.open(tmp_path, TINY)
    assert {i.dtype for i in ck.tensors.values()} == {code}
    for name, t in ck.iter_tensors(torch.float32):
        assert t.dtype == torch.float32
        assert torch.equal(t, sd[name].float()), name


def test_tied_embeddings_round_trip(tmp_path: Path) -> None:
    sd = _sd(TIED)
    assert "lm_head.weight" not in sd
    write_checkpoint(TIED, sd, tmp_path, shards=3)
    ref = Reference(TIED, max_seq=8)
    Checkpoint.open(tmp_path, TIED).load_into(ref)
    assert torch.equal(ref.head_weight(), sd["model.embed_tokens.weight"].double())


def test_load_into_matches_load_state_dict(tmp_path: Path) -> None:
    sd = _sd()
    write_checkpoint(TINY, sd, tmp_path, shards=3)
    loaded = Reference(TINY, max_seq=8)
    for p in loaded.parameters():
        p.data.zero_()
    Checkpoint.open(tmp_path, TINY).load_into(loaded)
    direct = Reference(TINY, max_seq=8)
    direct.load_state_dict({n: t.double() for n, t in sd.items()}, strict=True)
    tokens = torch.tensor([[3, 1, 4, 1, 5]])
    ks, vs = direct.empty_cache(1)
    want, _, _ = direct(tokens, torch.tensor(0), ks, vs)
    got, _, _ = loaded(tokens, torch.tensor(0), ks, vs)
    assert torch.equal(got, want)


def test_tensors_are_read_one_at_a_time(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    reads: list[str] = []
    real_open = ckpt_mod.safe_open

    class SpyOpen:
        """Wraps safe_open and records every tensor read."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> SpyOpen:
            self.inner.__enter__()
            return self

        def __exit__(self, *exc: object) -> None:
            self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> Tensor:
            reads.append(name)
            return self.inner.get_tensor(name)

    monkeypatch.setattr(ckpt_mod, "safe_open", SpyOpen)
    ck = Checkpoint.open(tmp_path, TINY)
    assert reads == []  # opening reads headers only
    it = ck.iter_tensors()
    first, _ = next(it)
    assert reads == [first]
    rest = [n for n, _ in it]
    assert reads == [first, *rest]
    assert sorted(reads) == sorted(expected_tensors(TINY))


# -- refusals: each names the tensor and the file ------------------------------------------


def test_missing_tensor_single_file(tmp_path: Path) -> None:
    sd = _sd()
    del sd[UP1]
    write_checkpoint(TINY, sd, tmp_path)
    msg = _refused(tmp_path)
    assert UP1 in msg and SINGLE_FILE in msg and "missing" in msg


def test_missing_tensor_not_in_index(tmp_path: Path) -> None:
    sd = _sd()
    del sd[UP1]
    write_checkpoint(TINY, sd, tmp_path, shards=3)
    msg = _refused(tmp_path)
    assert UP1 in msg and INDEX_FILE in msg and "missing" in msg


def test_missing_tensor_index_points_to_shard_without_it(tmp_path: Path) -> None:
    sd = _sd()
    del sd[UP1]
    write_checkpoint(TINY, sd, tmp_path, shards=3)
    shard = _shards(tmp_path)[1].name
    _edit_index(tmp_path, lambda wm: wm.__setitem__(UP1, shard))
    msg = _refused(tmp_path)
    assert UP1 in msg and shard in msg and INDEX_FILE in msg and "missing" in msg


def test_index_disagrees_with_shard_contents(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    wrong = _shards(tmp_path)[0].name
    _edit_index(tmp_path, lambda wm: wm.__setitem__(UP1, wrong))
    msg = _refused(tmp_path)
    assert UP1 in msg and wrong in msg and INDEX_FILE in msg


def test_index_points_to_missing_shard(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    _edit_index(tmp_path, lambda wm: wm.__setitem__(UP1, "model-00009-of-00003.safetensors"))
    msg = _refused(tmp_path)
    assert UP1 in msg and "model-00009-of-00003.safetensors" in msg and INDEX_FILE in msg


def test_shard_deleted(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    gone = _shards(tmp_path)[2]
    gone.unlink()
    msg = _refused(tmp_path)
    assert gone.name in msg and "does not exist" in msg and "model." in msg


def test_no_checkpoint_in_directory(tmp_path: Path) -> None:
    msg = _refused(tmp_path)
    assert SINGLE_FILE in msg and INDEX_FILE in msg


def test_wrong_shape(tmp_path: Path) -> None:
    sd = _sd()
    sd[UP1] = sd[UP1][:100]
    write_checkpoint(TINY, sd, tmp_path)
    msg = _refused(tmp_path)
    assert UP1 in msg and SINGLE_FILE in msg and "[100, 128]" in msg and "[256, 128]" in msg


@pytest.mark.parametrize(
    ("dtype", "code"),
    [
        (torch.int32, "I32"),
        (torch.bool, "BOOL"),
        (torch.float8_e4m3fn, "F8_E4M3"),
        (torch.float64, "F64"),
    ],
)
def test_refused_dtype(tmp_path: Path, dtype: torch.dtype, code: str) -> None:
    sd = _sd()
    sd[UP1] = sd[UP1].to(dtype)
    write_checkpoint(TINY, sd, tmp_path, shards=3)
    msg = _refused(tmp_path)
    assert UP1 in msg and code in msg and ".safetensors" in msg


def test_truncated_file(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path)
    f = tmp_path / SINGLE_FILE
    os.truncate(f, f.stat().st_size - 10)
    msg = _refused(tmp_path)
    assert "truncated" in msg and SINGLE_FILE in msg
    assert "model.norm.weight" in msg  # the last tensor in the file is the one cut short


def test_corrupt_header(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    f = _shards(tmp_path)[0]
    data = bytearray(f.read_bytes())
    data[8:12] = b"!!!!"  # break the JSON header
    f.write_bytes(bytes(data))
    msg = _refused(tmp_path)
    assert "corrupt" in msg and f.name in msg


def test_header_length_past_end_of_file(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path)
    f = tmp_path / SINGLE_FILE
    f.write_bytes((10**9).to_bytes(8, "little") + f.read_bytes()[8:])
    msg = _refused(tmp_path)
    assert "header" in msg and SINGLE_FILE in msg


def test_unexpected_tensor(tmp_path: Path) -> None:
    sd = _sd()
    sd["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(256)
    write_checkpoint(TINY, sd, tmp_path)
    msg = _refused(tmp_path)
    assert (
        "unexpected" in msg and "model.layers.0.self_attn.q_proj.bias" in msg and SINGLE_FILE in msg
    )


def test_rotary_inv_freq_is_tolerated(tmp_path: Path) -> None:
    sd = _sd()
    sd["model.layers.1.self_attn.rotary_emb.inv_freq"] = torch.ones(32)
    write_checkpoint(TINY, sd, tmp_path, shards=3)
    ck = Checkpoint.open(tmp_path, TINY)
    assert set(ck.state_dict()) == set(expected_tensors(TINY))


def test_lm_head_missing_with_untied_embeddings(tmp_path: Path) -> None:
    sd = _sd()
    del sd["lm_head.weight"]
    write_checkpoint(TINY, sd, tmp_path)
    msg = _refused(tmp_path)
    assert "lm_head.weight" in msg and SINGLE_FILE in msg and "tie_word_embeddings" in msg


def test_lm_head_present_with_tied_embeddings_is_refused(tmp_path: Path) -> None:
    sd = _sd(TIED)
    sd["lm_head.weight"] = sd["model.embed_tokens.weight"].clone()
    write_checkpoint(TIED, sd, tmp_path)
    msg = _refused(tmp_path, TIED)
    assert "lm_head.weight" in msg and SINGLE_FILE in msg and "tie_word_embeddings" in msg


# -- digest -----------------------------------------------------------------------------


def test_digest_is_stable_and_independent_of_the_directory(tmp_path: Path) -> None:
    a = write_checkpoint(TINY, _sd(), tmp_path / "a", shards=3)
    b = write_checkpoint(TINY, _sd(), tmp_path / "b", shards=3)
    d = checkpoint_digest(a)
    assert len(d) == 64
    assert checkpoint_digest(a) == d == checkpoint_digest(b)


@pytest.mark.parametrize("shards", [1, 3])
def test_digest_changes_when_one_byte_changes(tmp_path: Path, shards: int) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=shards)
    before = checkpoint_digest(tmp_path)
    f = (tmp_path / SINGLE_FILE) if shards == 1 else _shards(tmp_path)[-1]
    data = bytearray(f.read_bytes())
    data[-1] ^= 1
    f.write_bytes(bytes(data))
    assert checkpoint_digest(tmp_path) != before


def test_digest_covers_the_index(tmp_path: Path) -> None:
    write_checkpoint(TINY, _sd(), tmp_path, shards=3)
    before = checkpoint_digest(tmp_path)
    doc = json.loads((tmp_path / INDEX_FILE).read_text())
    doc["metadata"]["total_size"] += 1
    (tmp_path / INDEX_FILE).write_text(json.dumps(doc))
    assert checkpoint_digest(tmp_path) != before
