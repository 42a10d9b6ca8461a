"""ModelSpec: the weight-free description of a LLaMA-family model, and shape templates.

A spec is built from a catalog entry or from an HF `config.json`. Fields that would change the
computed function but that amk-farm does not implement are refused by name, never ignored.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from compiler.limits import (
    FLOAT_LIMITS,
    HF_NAMES,
    LIMITS,
    MAX_DIGITS,
    MIN_RMS_NORM_EPS,
    show,
    show_digits,
)


class SpecError(ValueError):
    """A model description that amk-farm cannot compile faithfully."""


ARCHITECTURES = {"LlamaForCausalLM": "llama", "MistralForCausalLM": "mistral"}

# HF config keys that never change the decode-step function: tokenizer ids, training and
# serialization knobs. Everything else must be understood below or the config is refused.
BENIGN_KEYS = frozenset(
    {
        "architectures",
        "model_type",
        "torch_dtype",
        "dtype",
        "transformers_version",
        "bos_token_id",
        "eos_token_id",
        "pad_token_id",
        "initializer_range",
        "use_cache",
        "attention_dropout",
        "pretraining_tp",
        "tie_word_embeddings",
        "max_position_embeddings",
        "output_attentions",
        "output_hidden_states",
        "return_dict",
        "is_decoder",
        "is_encoder_decoder",
        "torchscript",
        "use_return_dict",
        "bad_words_ids",
        "id2label",
        "label2id",
        "vocab_file",
        "name_or_path",
        "task_specific_params",
        "tokenizer_class",
        "problem_type",
    }
)

SEMANTIC_KEYS = frozenset(
    {
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "head_dim",
        "vocab_size",
        "rms_norm_eps",
        "rope_theta",
        "rope_scaling",
        "rope_parameters",
        "sliding_window",
        "hidden_act",
        "attention_bias",
        "mlp_bias",
    }
)

ROPE_SCALING_KEYS = frozenset(
    {
        "rope_type",
        "type",
        "factor",
        "low_freq_factor",
        "high_freq_factor",
        "original_max_position_embeddings",
        "rope_theta",
    }
)
LLAMA3_KEYS = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")


@dataclass(frozen=True)
class RopeScaling:
    """Llama-3 style frequency-dependent RoPE scaling (HF `rope_type: llama3`)."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass(frozen=True)
class ModelSpec:
    """Architecture of a LLaMA/Mistral decoder; everything that defines the decode function."""

    name: str
    arch: str  # "llama" | "mistral"
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    sliding_window: int | None = None
    rope_scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        for f in (
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "vocab_size",
            "max_position_embeddings",
        ):
            v = getattr(self, f)
            if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
                raise SpecError(f"{self.name}: {f} must be a positive integer, got {show(v)}")
            _within(f, v, self.name)
        if self.arch not in ("llama", "mistral"):
            raise SpecError(f"{self.name}: unsupported architecture {self.arch!r}")
        if self.num_heads % self.num_kv_heads:
            raise SpecError(
                f"{self.name}: num_attention_heads ({self.num_heads}) is not a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        if self.head_dim % 2:
            raise SpecError(f"{self.name}: head_dim ({self.head_dim}) must be even for RoPE")
        for f in ("rms_norm_eps", "rope_theta"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float):
                raise SpecError(f"{self.name}: {f} must be a number, got {show(v)}")
        if not (self.rms_norm_eps > 0 and math.isfinite(self.rms_norm_eps)):
            raise SpecError(
                f"{self.name}: rms_norm_eps must be positive, got {self.rms_norm_eps!r}"
            )
        if not (self.rope_theta > 0 and math.isfinite(self.rope_theta)):
            raise SpecError(f"{self.name}: rope_theta must be positive, got {self.rope_theta!r}")
        for f in ("rms_norm_eps", "rope_theta"):
            if getattr(self, f) > FLOAT_LIMITS[f]:
                raise SpecError(
                    f"{self.name}: {f} {show(getattr(self, f))} exceeds the limit "
                    f"{FLOAT_LIMITS[f]:g}"
                )
        if self.rms_norm_eps < MIN_RMS_NORM_EPS:
            raise SpecError(
                f"{self.name}: rms_norm_eps {self.rms_norm_eps!r} is below the limit "
                f"{MIN_RMS_NORM_EPS:g} (it would be 0 in float32)"
            )
        if self.sliding_window is not None and (
            not isinstance(self.sliding_window, int) or isinstance(self.sliding_window, bool)
        ):
            raise SpecError(
                f"{self.name}: sliding_window must be an integer or None, got {self.sliding_window!r}"
            )
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise SpecError(
                f"{self.name}: sliding_window must be positive, got {self.sliding_window!r}"
            )
        if self.sliding_window is not None:
            _within("sliding_window", self.sliding_window, self.name)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def num_params(self) -> int:
        h, i = self.hidden_size, self.intermediate_size
        layer = h * self.q_size + 2 * h * self.kv_size + self.q_size * h + 3 * h * i + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    @property
    def weight_bytes_bf16(self) -> int:
        return 2 * self.num_params

    def to_json(self) -> dict[str, Any]:
        """Canonical dict form (used in manifests and for hashing)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> ModelSpec:
        d = dict(d)
        if d.get("rope_scaling") is not None:
            d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
        return cls(**d)

    def with_name(self, name: str) -> ModelSpec:
        return dataclasses.replace(self, name=name)


def _within(field: str, value: int, where: str, name: str | None = None) -> int:
    """`value` if within LIMITS[field] (compiler/limits.py), else SpecError naming `name`."""
    if value > LIMITS[field]:
        raise SpecError(f"{where}: {name or field} {show(value)} exceeds the limit {LIMITS[field]}")
    return value


_HF_FIELDS = {hf: field for field, hf in HF_NAMES.items()}


def _positive_int(cfg: dict[str, Any], key: str, where: str) -> int:
    """cfg[key], a positive integer within its limit."""
    v = cfg.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise SpecError(f"{where}: {key} must be a positive integer, got {show(v)}")
    return _within(_HF_FIELDS.get(key, key), v, where, key)


def _number(cfg: dict[str, Any], key: str, default: float, where: str) -> float:
    v = cfg.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int | float):
        raise SpecError(f"{where}: {key} must be a number, got {show(v)}")
    if isinstance(v, int) and abs(v) > FLOAT_LIMITS.get(key, 1e300):  # float(v) would overflow
        raise SpecError(
            f"{where}: {key} {show(v)} exceeds the limit {FLOAT_LIMITS.get(key, 1e300):g}"
        )
    return float(v)


def _rope(cfg: dict[str, Any], where: str) -> tuple[float, RopeScaling | None]:
    """Read rope_theta and rope scaling from either the v4 or the v5 transformers layout."""
    theta = _number(cfg, "rope_theta", 10000.0, where)
    scaling = cfg.get("rope_scaling")
    params = cfg.get("rope_parameters")
    if scaling is not None and params is not None:
        raise SpecError(f"{where}: both rope_scaling and rope_parameters are set")
    block = scaling if scaling is not None else params
    if block is None:
        return theta, None
    if not isinstance(block, dict):
        raise SpecError(f"{where}: rope_scaling must be an object, got {block!r}")
    # The scaling type is checked before the field names, so that a yarn or longrope block is
    # refused by its type rather than by one of its type-specific fields.
    kind = block.get("rope_type", block.get("type", "default"))
    if kind not in ("default", "llama3"):
        raise SpecError(
            f"{where}: unsupported rope scaling type {kind!r} (supported: default, llama3)"
        )
    unknown = sorted(set(block) - ROPE_SCALING_KEYS)
    if unknown:
        raise SpecError(f"{where}: unsupported rope_scaling field {unknown[0]!r}")
    if "rope_theta" in block:
        theta = _number(block, "rope_theta", theta, where)
    if kind == "default":
        return theta, None
    missing = [k for k in LLAMA3_KEYS if k not in block]
    if missing:
        raise SpecError(f"{where}: llama3 rope scaling is missing {missing[0]!r}")
    rs = RopeScaling(
        factor=_number(block, "factor", 0.0, f"{where}: rope_scaling"),
        low_freq_factor=_number(block, "low_freq_factor", 0.0, f"{where}: rope_scaling"),
        high_freq_factor=_number(block, "high_freq_factor", 0.0, f"{where}: rope_scaling"),
        original_max_position_embeddings=_positive_int(
            block, "original_max_position_embeddings", f"{where}: rope_scaling"
        ),
    )
    for key in ("factor", "low_freq_factor", "high_freq_factor"):
        if math.isfinite(getattr(rs, key)) and getattr(rs, key) > FLOAT_LIMITS[key]:
            raise SpecError(f"{where}: rope_scaling {key} exceeds the limit {FLOAT_LIMITS[key]:g}")
    finite = all(math.isfinite(x) for x in (rs.factor, rs.low_freq_factor, rs.high_freq_factor))
    if not (finite and rs.factor > 0 and rs.high_freq_factor > rs.low_freq_factor > 0):
        raise SpecError(f"{where}: llama3 rope scaling factors are inconsistent: {block!r}")
    return theta, rs


def spec_from_hf_config(cfg: dict[str, Any], name: str) -> ModelSpec:
    """Build a ModelSpec from an HF LLaMA/Mistral config dict; refuse what would change semantics."""
    where = name
    if not isinstance(cfg, dict):
        raise SpecError(f"{where}: config must be a JSON object")
    archs = cfg.get("architectures") or []
    model_type = cfg.get("model_type")
    if not isinstance(archs, list):
        raise SpecError(f"{where}: architectures must be a list, got {archs!r}")
    bad = [a for a in archs if not isinstance(a, str) or a not in ARCHITECTURES]
    if bad:
        raise SpecError(f"{where}: unsupported architecture {bad[0]!r}")
    if model_type not in ("llama", "mistral"):
        raise SpecError(
            f"{where}: unsupported model_type {model_type!r} (supported: llama, mistral)"
        )
    for a in archs:
        if ARCHITECTURES[a] != model_type:
            raise SpecError(f"{where}: architecture {a} does not match model_type {model_type!r}")
    unknown = sorted(
        k for k in cfg if k not in BENIGN_KEYS | SEMANTIC_KEYS and not k.startswith("_")
    )
    if unknown:
        raise SpecError(f"{where}: unsupported config field {unknown[0]!r}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise SpecError(f"{where}: unsupported hidden_act {cfg['hidden_act']!r} (supported: silu)")
    for flag in ("attention_bias", "mlp_bias"):
        if cfg.get(flag, False):
            raise SpecError(f"{where}: unsupported {flag}=true")
    heads = _positive_int(cfg, "num_attention_heads", where)
    hidden = _positive_int(cfg, "hidden_size", where)
    if cfg.get("head_dim") is None:
        if hidden % heads:
            raise SpecError(
                f"{where}: hidden_size {hidden} is not divisible by num_attention_heads {heads}"
            )
        head_dim = _within("head_dim", hidden // heads, where, "hidden_size / num_attention_heads")
    else:
        head_dim = _positive_int(cfg, "head_dim", where)
    kv = heads if cfg.get("num_key_value_heads") is None else None
    kv = kv or _positive_int(cfg, "num_key_value_heads", where)
    sliding = cfg.get("sliding_window")
    if model_type == "llama" and sliding is not None:
        raise SpecError(f"{where}: sliding_window is not a llama field")
    if sliding is not None:
        sliding = _positive_int(cfg, "sliding_window", where)
    theta, scaling = _rope(cfg, where)
    tie = cfg.get("tie_word_embeddings", False)
    if not isinstance(tie, bool):
        raise SpecError(f"{where}: tie_word_embeddings must be true or false, got {tie!r}")
    return ModelSpec(
        name=name,
        arch=model_type,
        hidden_size=hidden,
        intermediate_size=_positive_int(cfg, "intermediate_size", where),
        num_layers=_positive_int(cfg, "num_hidden_layers", where),
        num_heads=heads,
        num_kv_heads=kv,
        head_dim=head_dim,
        vocab_size=_positive_int(cfg, "vocab_size", where),
        rms_norm_eps=_number(cfg, "rms_norm_eps", 1e-6, where),
        rope_theta=theta,
        max_position_embeddings=_positive_int(cfg, "max_position_embeddings", where),
        tie_word_embeddings=tie,
        sliding_window=sliding,
        rope_scaling=scaling,
    )


CONFIG_MAX_BYTES = 1 << 20  # an HF config.json is a few kilobytes


def spec_from_config_file(path: str | Path) -> ModelSpec:
    """Read an HF `config.json` (or a checkpoint directory holding one)."""
    p = Path(path)
    if p.is_dir():
        p = p / "config.json"
    if not p.is_file():
        raise SpecError(f"{path}: no such config file")
    try:
        if p.stat().st_size > CONFIG_MAX_BYTES:
            raise SpecError(f"{p}: {p.stat().st_size} bytes, over the limit {CONFIG_MAX_BYTES}")
        cfg = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise SpecError(f"{p}: malformed JSON: {e}") from None
    except (ValueError, RecursionError) as e:  # 5000-digit numbers, [[[[... nested too deep
        if isinstance(e, SpecError):
            raise
        raise SpecError(f"{p}: malformed JSON: {str(e)[:80] or type(e).__name__}") from None
    except OSError as e:
        raise SpecError(f"{p}: cannot read: {e.strerror or e}") from None
    return spec_from_hf_config(cfg, name=str(p))


def spec_to_hf_config(spec: ModelSpec) -> dict[str, Any]:
    """The HF config dict of a spec (used to write test checkpoints and to build HF models)."""
    arch = "LlamaForCausalLM" if spec.arch == "llama" else "MistralForCausalLM"
    cfg: dict[str, Any] = {
        "architectures": [arch],
        "model_type": spec.arch,
        "hidden_size": spec.hidden_size,
        "intermediate_size": spec.intermediate_size,
        "num_hidden_layers": spec.num_layers,
        "num_attention_heads": spec.num_heads,
        "num_key_value_heads": spec.num_kv_heads,
        "head_dim": spec.head_dim,
        "vocab_size": spec.vocab_size,
        "rms_norm_eps": spec.rms_norm_eps,
        "rope_theta": spec.rope_theta,
        "max_position_embeddings": spec.max_position_embeddings,
        "tie_word_embeddings": spec.tie_word_embeddings,
        "hidden_act": "silu",
        "torch_dtype": "bfloat16",
    }
    if spec.arch == "mistral":
        cfg["sliding_window"] = spec.sliding_window
    if spec.rope_scaling is not None:
        cfg["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(spec.rope_scaling)}
    return cfg


# Canonical form only (ASCII digits, no leading zeros, no trailing newline): the text is a
# registry key, so `str(ShapeTemplate.parse(t)) == t` must hold for every accepted t.
TEMPLATE_RE = re.compile(r"b([1-9][0-9]*)-s([1-9][0-9]*)")


@dataclass(frozen=True)
class ShapeTemplate:
    """What a kernel is specialized for: batch size and KV-cache capacity (`b1-s4096`)."""

    batch: int
    max_seq: int

    @classmethod
    def parse(cls, text: str) -> ShapeTemplate:
        """`b<batch>-s<max_seq>`, canonical, each number at least 1 and within its limit."""
        m = TEMPLATE_RE.fullmatch(text) if isinstance(text, str) else None
        if not m:
            raise SpecError(
                f"bad shape template {show(text)} (expected b<batch>-s<max_seq>, e.g. b1-s4096)"
            )
        values = []
        for field, digits in zip(("batch", "max_seq"), m.groups(), strict=True):
            if len(digits) > MAX_DIGITS:  # over every limit; not worth converting
                raise SpecError(
                    f"shape template {show(text)}: {field} {show_digits(digits)} exceeds the limit "
                    f"{LIMITS[field]}"
                )
            values.append(_within(field, int(digits), f"shape template {text}"))
        return cls(values[0], values[1])

    @classmethod
    def default(cls, spec: ModelSpec) -> ShapeTemplate:
        """b1-s4096, or b1-s<max positions> for a model with fewer positions."""
        return cls(1, min(4096, spec.max_position_embeddings))

    def __str__(self) -> str:
        return f"b{self.batch}-s{self.max_seq}"
