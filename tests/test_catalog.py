"""The model catalog: names, aliases, resolution of names and config paths, entry dimensions."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from amk_farm import catalog
from compiler.spec import ModelSpec, SpecError, spec_from_hf_config, spec_to_hf_config

CANONICAL = [
    "smollm2-135m",
    "llama-3.2-1b",
    "llama-2-7b",
    "llama-2-13b",
    "llama-2-70b",
    "llama-3-8b",
    "llama-3-70b",
    "mistral-7b",
    "tiny-llama",
    "tiny-mistral",
]

# Parameter counts of the published checkpoints (sum of their tensor sizes).
PARAMS = {
    "smollm2-135m": 134_515_008,
    "llama-3.2-1b": 1_235_814_400,
    "llama-2-7b": 6_738_415_616,
    "llama-2-13b": 13_015_864_320,
    "llama-2-70b": 68_976_648_192,
    "llama-3-8b": 8_030_261_248,
    "llama-3-70b": 70_553_706_496,
    "mistral-7b": 7_241_732_096,
}


def _published(**fields: Any) -> dict[str, Any]:
    """A config.json as the HF hub publishes it for the Llama-2/3 and Mistral checkpoints."""
    base: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "bos_token_id": 1,
        "eos_token_id": 2,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "rms_norm_eps": 1e-05,
        "tie_word_embeddings": False,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }
    return {**base, **fields}


# The fields that differ between checkpoints, as in each repository's config.json.
PUBLISHED: dict[str, dict[str, Any]] = {
    "llama-2-7b": _published(
        _name_or_path="meta-llama/Llama-2-7b-hf",
        hidden_size=4096,
        intermediate_size=11008,
        max_position_embeddings=4096,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=32,
        pretraining_tp=1,
        rope_scaling=None,
        torch_dtype="float16",
        vocab_size=32000,
    ),
    "llama-2-13b": _published(
        hidden_size=5120,
        intermediate_size=13824,
        max_position_embeddings=4096,
        num_attention_heads=40,
        num_hidden_layers=40,
        num_key_value_heads=40,
        pretraining_tp=1,
        rope_scaling=None,
        torch_dtype="float16",
        vocab_size=32000,
    ),
    "llama-2-70b": _published(
        hidden_size=8192,
        intermediate_size=28672,
        max_position_embeddings=4096,
        num_attention_heads=64,
        num_hidden_layers=80,
        num_key_value_heads=8,
        pretraining_tp=1,
        rope_scaling=None,
        torch_dtype="float16",
        vocab_size=32000,
    ),
    "llama-3-8b": _published(
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=128000,
        eos_token_id=128001,
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=8192,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        pretraining_tp=1,
        rope_scaling=None,
        rope_theta=500000.0,
        vocab_size=128256,
    ),
    "llama-3-70b": _published(
        attention_bias=False,
        attention_dropout=0.0,
        bos_token_id=128000,
        eos_token_id=128001,
        hidden_size=8192,
        intermediate_size=28672,
        max_position_embeddings=8192,
        num_attention_heads=64,
        num_hidden_layers=80,
        num_key_value_heads=8,
        pretraining_tp=1,
        rope_scaling=None,
        rope_theta=500000.0,
        vocab_size=128256,
    ),
    "llama-3.2-1b": _published(
        attention_bias=False,
        bos_token_id=128000,
        eos_token_id=128001,
        head_dim=64,
        hidden_size=2048,
        intermediate_size=8192,
        max_position_embeddings=131072,
        mlp_bias=False,
        num_attention_heads=32,
        num_hidden_layers=16,
        num_key_value_heads=8,
        rope_scaling={
            "factor": 32.0,
            "high_freq_factor": 4.0,
            "low_freq_factor": 1.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        rope_theta=500000.0,
        tie_word_embeddings=True,
        vocab_size=128256,
    ),
    "smollm2-135m": _published(
        _name_or_path="HuggingFaceTB/SmolLM2-135M",
        attention_bias=False,
        bos_token_id=0,
        eos_token_id=0,
        hidden_size=576,
        intermediate_size=1536,
        max_position_embeddings=8192,
        mlp_bias=False,
        num_attention_heads=9,
        num_hidden_layers=30,
        num_key_value_heads=3,
        pretraining_tp=1,
        rope_scaling=None,
        rope_theta=100000.0,
        tie_word_embeddings=True,
        vocab_size=49152,
    ),
    "mistral-7b": _published(
        architectures=["MistralForCausalLM"],
        model_type="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        max_position_embeddings=32768,
        num_attention_heads=32,
        num_hidden_layers=32,
        num_key_value_heads=8,
        rope_theta=10000.0,
        sliding_window=4096,
        vocab_size=32000,
    ),
}


def test_names_in_catalog_order() -> None:
    assert catalog.names() == CANONICAL


def test_aliases() -> None:
    assert catalog.aliases() == {
        "llama-7b": "llama-2-7b",
        "llama-13b": "llama-2-13b",
        "llama-70b": "llama-2-70b",
    }
    # A copy: callers cannot change the catalog through it.
    catalog.aliases()["llama-7b"] = "tiny-llama"
    assert catalog.resolve("llama-7b").name == "llama-2-7b"


@pytest.mark.parametrize("name", CANONICAL)
def test_resolve_name(name: str) -> None:
    spec = catalog.resolve(name)
    assert isinstance(spec, ModelSpec)
    assert spec.name == name


@pytest.mark.parametrize(("alias", "canonical"), sorted(catalog.aliases().items()))
def test_resolve_alias_gives_the_canonical_entry(alias: str, canonical: str) -> None:
    spec = catalog.resolve(alias)
    assert spec == catalog.resolve(canonical)
    assert spec.name == canonical


@pytest.mark.parametrize(("name", "params"), sorted(PARAMS.items()))
def test_parameter_counts(name: str, params: int) -> None:
    assert catalog.resolve(name).num_params == params


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_entries_match_published_configs(name: str) -> None:
    assert set(PUBLISHED) == set(PARAMS)  # every real checkpoint is checked
    assert spec_from_hf_config(PUBLISHED[name], name=name) == catalog.resolve(name)


@pytest.mark.parametrize("name", CANONICAL)
def test_every_entry_is_a_valid_spec(name: str) -> None:
    spec = catalog.resolve(name)
    # Rebuilding runs ModelSpec's validation again; the HF round trip runs the config checks.
    assert ModelSpec.from_json(json.loads(json.dumps(spec.to_json()))) == spec
    assert spec_from_hf_config(spec_to_hf_config(spec), name=name) == spec
    assert spec.num_heads % spec.num_kv_heads == 0
    assert spec.head_dim * spec.num_heads == spec.hidden_size
    assert spec.intermediate_size > spec.hidden_size
    if spec.arch == "mistral":
        assert spec.sliding_window is not None
        assert spec.sliding_window < spec.max_position_embeddings
    else:
        assert spec.sliding_window is None


def test_tiny_configs_differ_only_in_architecture() -> None:
    llama, mistral = catalog.resolve("tiny-llama"), catalog.resolve("tiny-mistral")
    assert (mistral.arch, mistral.sliding_window) == ("mistral", 16)
    assert mistral.num_params == llama.num_params < 2_000_000
    assert mistral.num_kv_heads < mistral.num_heads  # exercises grouped-query attention


def _write_config(directory: Path, cfg: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.json"
    path.write_text(json.dumps(cfg))
    return path


def test_resolve_config_file_and_directory(tmp_path: Path) -> None:
    path = _write_config(tmp_path / "ckpt", PUBLISHED["mistral-7b"])
    from_file = catalog.resolve(str(path))
    assert from_file == catalog.resolve(str(tmp_path / "ckpt"))
    assert from_file.name == str(path)
    assert from_file.with_name("mistral-7b") == catalog.resolve("mistral-7b")


def test_resolve_config_under_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    _write_config(tmp_path / "models" / "m", PUBLISHED["llama-2-7b"])
    spec = catalog.resolve("~/models/m")
    assert spec.with_name("llama-2-7b") == catalog.resolve("llama-2-7b")


def test_resolve_bad_config_reports_the_config_problem(tmp_path: Path) -> None:
    path = _write_config(tmp_path, {**PUBLISHED["llama-2-7b"], "hidden_act": "gelu"})
    with pytest.raises(SpecError, match="unsupported hidden_act 'gelu'"):
        catalog.resolve(str(path))
    path.write_text("{")
    with pytest.raises(SpecError, match="malformed JSON"):
        catalog.resolve(str(tmp_path))


def test_catalog_name_wins_over_a_directory_of_that_name(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    _write_config(tmp_path / "llama-2-7b", spec_to_hf_config(catalog.resolve("tiny-llama")))
    assert catalog.resolve("llama-2-7b").hidden_size == 4096
    assert catalog.resolve("./llama-2-7b").hidden_size == 256


@pytest.mark.parametrize("text", ["gpt-2", "", "Llama-2-7B", "llama-2-7b\n", "nowhere/config.json"])
def test_unknown_model(text: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SpecError) as info:
        catalog.resolve(text)
    message = str(info.value)
    assert "\n" not in message
    assert message.startswith(
        f"unknown model {text!r} (not in the catalog and not a config.json path); known: "
    )
    known = message.split("; known: ", 1)[1].split(", ")
    assert known == [*CANONICAL, *catalog.aliases()]


def test_directory_without_config_is_unknown(tmp_path: Path) -> None:
    with pytest.raises(SpecError, match="unknown model"):
        catalog.resolve(str(tmp_path))
