"""ModelSpec validation, HF config parsing (transformers v4 and v5 layouts), shape templates."""

from __future__ import annotations

import copy
import dataclasses
import json
import math
from pathlib import Path
from typing import Any

import pytest

from compiler.spec import (
    ModelSpec,
    RopeScaling,
    ShapeTemplate,
    SpecError,
    spec_from_config_file,
    spec_from_hf_config,
    spec_to_hf_config,
)

# meta-llama/Llama-3.2-1B config.json as published (transformers v4 layout, llama3 RoPE).
LLAMA_3_2_1B: dict[str, Any] = {
    "architectures": ["LlamaForCausalLM"],
    "attention_bias": False,
    "attention_dropout": 0.0,
    "bos_token_id": 128000,
    "eos_token_id": 128001,
    "head_dim": 64,
    "hidden_act": "silu",
    "hidden_size": 2048,
    "initializer_range": 0.02,
    "intermediate_size": 8192,
    "max_position_embeddings": 131072,
    "mlp_bias": False,
    "model_type": "llama",
    "num_attention_heads": 32,
    "num_hidden_layers": 16,
    "num_key_value_heads": 8,
    "pretraining_tp": 1,
    "rms_norm_eps": 1e-05,
    "rope_scaling": {
        "factor": 32.0,
        "high_freq_factor": 4.0,
        "low_freq_factor": 1.0,
        "original_max_position_embeddings": 8192,
        "rope_type": "llama3",
    },
    "rope_theta": 500000.0,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.45.0.dev0",
    "use_cache": True,
    "vocab_size": 128256,
}

# mistralai/Mistral-7B-v0.1 config.json as published (v4 layout, sliding window).
MISTRAL_7B: dict[str, Any] = {
    "architectures": ["MistralForCausalLM"],
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_act": "silu",
    "hidden_size": 4096,
    "initializer_range": 0.02,
    "intermediate_size": 14336,
    "max_position_embeddings": 32768,
    "model_type": "mistral",
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "rms_norm_eps": 1e-05,
    "rope_theta": 10000.0,
    "sliding_window": 4096,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "transformers_version": "4.34.0.dev0",
    "use_cache": True,
    "vocab_size": 32000,
}

TINY = ModelSpec(
    name="tiny",
    arch="llama",
    hidden_size=256,
    intermediate_size=512,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=64,
    vocab_size=512,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    max_position_embeddings=512,
)


def with_(cfg: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """A deep copy of `cfg` with `changes` applied; a value of `...` deletes the key."""
    out = copy.deepcopy(cfg)
    for key, value in changes.items():
        if value is ...:
            out.pop(key, None)
        else:
            out[key] = value
    return out


def refused(call: Any, *fragments: str) -> str:
    """Assert `call()` raises a one-line SpecError containing every fragment; return it."""
    with pytest.raises(SpecError) as info:
        call()
    message = str(info.value)
    assert "\n" not in message, message
    for fragment in fragments:
        assert fragment in message, (fragment, message)
    return message


# ModelSpec


def test_model_spec_sizes_by_hand() -> None:
    # Per layer: q [256x256], k and v [256x128] each, o [256x256], gate/up/down [256x512] x3,
    # two norms [256]. Plus embedding and lm_head [512x256] each and the final norm.
    layer = 256 * 256 + 2 * 256 * 128 + 256 * 256 + 3 * 256 * 512 + 2 * 256
    assert (TINY.q_size, TINY.kv_size) == (256, 128)
    assert TINY.num_params == 2 * 512 * 256 + 2 * layer + 256
    tied = dataclasses.replace(TINY, tie_word_embeddings=True)
    assert tied.num_params == TINY.num_params - 512 * 256
    assert TINY.weight_bytes_bf16 == 2 * TINY.num_params


@pytest.mark.parametrize(
    "spec",
    [
        TINY,
        dataclasses.replace(
            TINY, arch="mistral", sliding_window=16, tie_word_embeddings=True, name="m"
        ),
        dataclasses.replace(TINY, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 128)),
    ],
)
def test_model_spec_json_round_trip(spec: ModelSpec) -> None:
    text = json.dumps(spec.to_json(), sort_keys=True)
    assert ModelSpec.from_json(json.loads(text)) == spec


def test_with_name_changes_only_the_name() -> None:
    renamed = TINY.with_name("other")
    assert renamed.name == "other"
    assert dataclasses.replace(renamed, name="tiny") == TINY


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"hidden_size": 0}, ["hidden_size", "positive integer"]),
        ({"num_layers": True}, ["num_layers", "positive integer"]),
        ({"vocab_size": 512.0}, ["vocab_size"]),
        ({"num_kv_heads": 3}, ["num_attention_heads (4)", "num_key_value_heads (3)"]),
        ({"head_dim": 63}, ["head_dim (63)", "even"]),
        ({"rms_norm_eps": 0.0}, ["rms_norm_eps", "positive"]),
        ({"rms_norm_eps": "1e-5"}, ["rms_norm_eps", "number"]),
        ({"rope_theta": math.nan}, ["rope_theta", "positive"]),
        ({"rope_theta": math.inf}, ["rope_theta", "positive"]),
        ({"sliding_window": 0}, ["sliding_window", "positive"]),
        ({"sliding_window": "16"}, ["sliding_window", "integer"]),
        ({"arch": "gpt2"}, ["architecture 'gpt2'"]),
    ],
)
def test_model_spec_refuses(changes: dict[str, Any], fragments: list[str]) -> None:
    message = refused(lambda: dataclasses.replace(TINY, **changes), *fragments)
    assert message.startswith("tiny: ")


# spec_from_hf_config: accepted configs


def test_llama_3_2_1b_v4_layout() -> None:
    spec = spec_from_hf_config(LLAMA_3_2_1B, name="llama-3.2-1b")
    assert spec == ModelSpec(
        name="llama-3.2-1b",
        arch="llama",
        hidden_size=2048,
        intermediate_size=8192,
        num_layers=16,
        num_heads=32,
        num_kv_heads=8,
        head_dim=64,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=131072,
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 8192),
    )


def test_llama_3_2_1b_v5_layout_gives_the_same_spec() -> None:
    # transformers v5 moves rope_theta and the scaling into one `rope_parameters` block.
    v5 = with_(LLAMA_3_2_1B, rope_scaling=..., rope_theta=..., torch_dtype=..., dtype="bfloat16")
    v5["rope_parameters"] = {**LLAMA_3_2_1B["rope_scaling"], "rope_theta": 500000.0}
    assert spec_from_hf_config(v5, "a") == spec_from_hf_config(LLAMA_3_2_1B, "a")


def test_v4_legacy_type_key_for_llama3_scaling() -> None:
    scaling = {k: v for k, v in LLAMA_3_2_1B["rope_scaling"].items() if k != "rope_type"}
    cfg = with_(LLAMA_3_2_1B, rope_scaling={**scaling, "type": "llama3"})
    assert spec_from_hf_config(cfg, "a").rope_scaling == RopeScaling(32.0, 1.0, 4.0, 8192)


def test_mistral_v4_layout() -> None:
    spec = spec_from_hf_config(MISTRAL_7B, name="m")
    assert spec.arch == "mistral"
    assert spec.sliding_window == 4096
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (32, 8, 128)
    assert spec.rope_theta == 10000.0
    assert spec.rope_scaling is None
    assert spec.tie_word_embeddings is False


def test_mistral_v5_layout_default_rope_and_no_sliding_window() -> None:
    # Mistral-7B-v0.2 and later have sliding_window null: full attention.
    cfg = with_(MISTRAL_7B, rope_theta=..., sliding_window=None)
    cfg["rope_parameters"] = {"rope_type": "default", "rope_theta": 1000000.0}
    spec = spec_from_hf_config(cfg, name="m")
    assert spec.rope_theta == 1000000.0
    assert spec.rope_scaling is None
    assert spec.sliding_window is None


def test_llama_2_style_defaults() -> None:
    # Llama-2 configs state no head_dim, carry rope_scaling: null and a _name_or_path.
    cfg = with_(
        LLAMA_3_2_1B,
        head_dim=...,
        num_key_value_heads=...,
        rms_norm_eps=...,
        rope_theta=...,
        rope_scaling=None,
        _name_or_path="meta-llama/Llama-2-7b-hf",
    )
    spec = spec_from_hf_config(cfg, name="x")
    assert spec.head_dim == 2048 // 32
    assert spec.num_kv_heads == 32  # no GQA unless stated
    assert spec.rms_norm_eps == 1e-6  # LlamaConfig's default
    assert spec.rope_theta == 10000.0
    assert spec.rope_scaling is None


def test_spec_to_hf_config_round_trips() -> None:
    for spec in (
        spec_from_hf_config(LLAMA_3_2_1B, "a"),
        spec_from_hf_config(MISTRAL_7B, "a"),
        dataclasses.replace(TINY, name="a"),
    ):
        assert spec_from_hf_config(spec_to_hf_config(spec), "a") == spec


@pytest.mark.parametrize("arch", ["llama", "mistral"])
def test_config_written_by_installed_transformers(arch: str, tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    common = dict(
        hidden_size=256,
        intermediate_size=512,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=512,
        max_position_embeddings=16384,
        rms_norm_eps=1e-5,
    )
    if arch == "llama":
        scaling = {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
        }
        # v4 takes rope_scaling + rope_theta; v5 takes one rope_parameters block.
        if int(transformers.__version__.split(".")[0]) >= 5:
            rope = {"rope_parameters": {**scaling, "rope_theta": 500000.0}}
        else:
            rope = {"rope_scaling": scaling, "rope_theta": 500000.0}
        config = transformers.LlamaConfig(**common, **rope)
    else:
        config = transformers.MistralConfig(**common, sliding_window=16, rope_theta=500000.0)
    config.save_pretrained(tmp_path)
    spec = spec_from_config_file(tmp_path)
    assert spec.arch == arch
    assert (spec.hidden_size, spec.intermediate_size, spec.num_layers) == (256, 512, 2)
    assert (spec.num_heads, spec.num_kv_heads, spec.head_dim) == (4, 2, 64)
    assert (spec.vocab_size, spec.max_position_embeddings) == (512, 16384)
    assert (spec.rms_norm_eps, spec.rope_theta) == (1e-5, 500000.0)
    if arch == "llama":
        assert spec.rope_scaling == RopeScaling(8.0, 1.0, 4.0, 8192)
        assert spec.sliding_window is None
    else:
        assert spec.rope_scaling is None
        assert spec.sliding_window == 16


# spec_from_hf_config: refusals, each by name


REFUSALS: list[tuple[str, dict[str, Any], list[str]]] = [
    ("gpt2 architecture", {"architectures": ["GPT2LMHeadModel"]}, ["'GPT2LMHeadModel'"]),
    ("architectures not a list", {"architectures": "LlamaForCausalLM"}, ["architectures"]),
    ("unhashable architecture", {"architectures": [["x"]]}, ["architecture"]),
    ("unknown model_type", {"model_type": "gpt2"}, ["model_type 'gpt2'"]),
    ("missing model_type", {"model_type": ...}, ["model_type None"]),
    (
        "architecture vs model_type",
        {"architectures": ["MistralForCausalLM"]},
        ["MistralForCausalLM", "model_type 'llama'"],
    ),
    (
        "second architecture vs model_type",
        {"architectures": ["LlamaForCausalLM", "MistralForCausalLM"]},
        ["MistralForCausalLM", "does not match"],
    ),
    ("rope linear", {"rope_scaling": {"type": "linear", "factor": 2.0}}, ["type 'linear'"]),
    ("rope dynamic", {"rope_scaling": {"rope_type": "dynamic", "factor": 2.0}}, ["'dynamic'"]),
    (
        # yarn brings fields of its own; the type is what is named, not beta_fast.
        "rope yarn",
        {"rope_scaling": {"rope_type": "yarn", "factor": 4.0, "beta_fast": 32}},
        ["rope scaling type 'yarn'"],
    ),
    (
        "rope yarn, v5 layout",
        {"rope_scaling": ..., "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}},
        ["rope scaling type 'yarn'"],
    ),
    (
        "rope_scaling and rope_parameters both",
        {"rope_parameters": {"rope_type": "default", "rope_theta": 1e4}},
        ["both rope_scaling and rope_parameters"],
    ),
    ("rope_scaling not an object", {"rope_scaling": [32.0]}, ["rope_scaling must be an object"]),
    (
        "llama3 unknown field",
        {"rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "mscale": 1.0}},
        ["field 'mscale'"],
    ),
    (
        "llama3 missing factor",
        {"rope_scaling": {"rope_type": "llama3", "low_freq_factor": 1.0}},
        ["missing 'factor'"],
    ),
    (
        "llama3 fractional original length",
        {
            "rope_scaling": {
                **LLAMA_3_2_1B["rope_scaling"],
                "original_max_position_embeddings": 8192.5,
            }
        },
        ["original_max_position_embeddings", "8192.5"],
    ),
    (
        "llama3 factor not a number",
        {"rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "factor": "32"}},
        ["factor must be a number"],
    ),
    (
        "llama3 infinite factor",
        {"rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "factor": math.inf}},
        ["inconsistent"],
    ),
    (
        "llama3 low >= high",
        {"rope_scaling": {**LLAMA_3_2_1B["rope_scaling"], "low_freq_factor": 4.0}},
        ["inconsistent"],
    ),
    ("attention_bias", {"attention_bias": True}, ["attention_bias"]),
    ("mlp_bias", {"mlp_bias": True}, ["mlp_bias"]),
    ("gelu", {"hidden_act": "gelu"}, ["hidden_act 'gelu'"]),
    ("unknown field", {"qk_layernorm": True}, ["unsupported config field 'qk_layernorm'"]),
    (
        "heads not a multiple of kv heads",
        {"num_key_value_heads": 5},
        ["num_attention_heads (32)", "num_key_value_heads (5)"],
    ),
    (
        "hidden not divisible by heads",
        {"head_dim": ..., "num_attention_heads": 30, "num_key_value_heads": 30},
        ["hidden_size 2048", "num_attention_heads 30"],
    ),
    ("missing hidden_size", {"hidden_size": ...}, ["hidden_size", "None"]),
    ("string vocab_size", {"vocab_size": "128256"}, ["vocab_size"]),
    ("rms_norm_eps string", {"rms_norm_eps": "1e-5"}, ["rms_norm_eps must be a number"]),
    ("sliding_window on llama", {"sliding_window": 4096}, ["sliding_window", "llama"]),
    ("tie_word_embeddings not bool", {"tie_word_embeddings": "yes"}, ["tie_word_embeddings"]),
]


@pytest.mark.parametrize(
    ("changes", "fragments"), [r[1:] for r in REFUSALS], ids=[r[0] for r in REFUSALS]
)
def test_hf_config_refused_by_name(changes: dict[str, Any], fragments: list[str]) -> None:
    cfg = with_(LLAMA_3_2_1B, **changes)
    message = refused(lambda: spec_from_hf_config(cfg, name="cfg.json"), *fragments)
    assert message.startswith("cfg.json: ")


@pytest.mark.parametrize(
    ("sliding", "fragment"), [(0, "positive"), ("4096", "integer"), (True, "integer")]
)
def test_mistral_bad_sliding_window(sliding: Any, fragment: str) -> None:
    cfg = with_(MISTRAL_7B, sliding_window=sliding)
    refused(lambda: spec_from_hf_config(cfg, name="m"), "sliding_window", fragment)


def test_config_must_be_an_object() -> None:
    refused(lambda: spec_from_hf_config([1, 2], name="m"), "JSON object")  # type: ignore[arg-type]


# spec_from_config_file


def test_config_file_and_checkpoint_directory(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(MISTRAL_7B))
    from_file = spec_from_config_file(path)
    from_dir = spec_from_config_file(tmp_path)
    assert from_file == from_dir
    assert from_file.name == str(path)
    assert from_file == spec_from_hf_config(MISTRAL_7B, name=str(path))


@pytest.mark.parametrize(
    "content", [b'{"model_type": "llama",', b"", b"\xff\xfe not utf-8", b"{'single': 1}"]
)
def test_malformed_json_file(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "config.json"
    path.write_bytes(content)
    message = refused(lambda: spec_from_config_file(path), "malformed JSON")
    assert message.startswith(str(path))


def test_missing_file(tmp_path: Path) -> None:
    refused(lambda: spec_from_config_file(tmp_path / "nope.json"), "nope.json", "no such")


def test_directory_without_config(tmp_path: Path) -> None:
    refused(lambda: spec_from_config_file(tmp_path), str(tmp_path), "no such config file")


# ShapeTemplate


@pytest.mark.parametrize(
    ("text", "batch", "max_seq"), [("b1-s4096", 1, 4096), ("b16-s2048", 16, 2048), ("b3-s7", 3, 7)]
)
def test_shape_template_parse(text: str, batch: int, max_seq: int) -> None:
    template = ShapeTemplate.parse(text)
    assert template == ShapeTemplate(batch, max_seq)
    assert str(template) == text


@pytest.mark.parametrize(
    "text",
    [
        "",
        "b1",
        "s4096",
        "b0-s4096",
        "b1-s0",
        "b-1-s4096",
        "B1-S4096",
        "b1_s4096",
        "b1-s4096 ",
        " b1-s4096",
        "b1-s4096\n",  # `$` would accept this
        "b01-s4096",  # not canonical: the text is a registry key
        "b1.5-s4096",
        "b\u0661-s4096",  # ARABIC-INDIC DIGIT ONE: int() would take it
        "s4096-b1",
    ],
)
def test_shape_template_refuses(text: str) -> None:
    refused(lambda: ShapeTemplate.parse(text), "bad shape template", repr(text))
