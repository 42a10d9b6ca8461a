"""The model catalog: named ModelSpecs with the dimensions of the published HF checkpoints.

A model argument (`amk-farm compile MODEL`, `submit MODEL`, ...) is resolved here: a catalog
name, an alias of one, or the path of an HF `config.json` (or of a checkpoint directory holding
one). Catalog names win over paths, so `llama-2-7b` means the catalog entry even where a
directory of that name exists in the working directory.
"""

from __future__ import annotations

from pathlib import Path

from compiler.spec import ModelSpec, RopeScaling, SpecError, spec_from_config_file

# Values copied from each model's HF config.json. head_dim is hidden_size / num_heads for all
# but the 1B and the test configs, which state it (and SmolLM2, where it is 576 / 9 = 64).
_ENTRIES: tuple[ModelSpec, ...] = (
    ModelSpec(
        name="smollm2-135m",  # HuggingFaceTB/SmolLM2-135M: 30 narrow layers, the fixed cost per layer
        arch="llama",
        hidden_size=576,
        intermediate_size=1536,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        vocab_size=49152,
        rms_norm_eps=1e-5,
        rope_theta=100000.0,
        max_position_embeddings=8192,
        tie_word_embeddings=True,
    ),
    ModelSpec(
        name="llama-3.2-1b",  # meta-llama/Llama-3.2-1B
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
        rope_scaling=RopeScaling(
            factor=32.0,
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=8192,
        ),
    ),
    ModelSpec(
        name="llama-2-7b",  # meta-llama/Llama-2-7b-hf
        arch="llama",
        hidden_size=4096,
        intermediate_size=11008,
        num_layers=32,
        num_heads=32,
        num_kv_heads=32,
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    ModelSpec(
        name="llama-2-13b",  # meta-llama/Llama-2-13b-hf
        arch="llama",
        hidden_size=5120,
        intermediate_size=13824,
        num_layers=40,
        num_heads=40,
        num_kv_heads=40,
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    ModelSpec(
        name="llama-2-70b",  # meta-llama/Llama-2-70b-hf
        arch="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=4096,
    ),
    ModelSpec(
        name="llama-3-8b",  # meta-llama/Meta-Llama-3-8B
        arch="llama",
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    ModelSpec(
        name="llama-3-70b",  # meta-llama/Meta-Llama-3-70B
        arch="llama",
        hidden_size=8192,
        intermediate_size=28672,
        num_layers=80,
        num_heads=64,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=128256,
        rms_norm_eps=1e-5,
        rope_theta=500000.0,
        max_position_embeddings=8192,
    ),
    ModelSpec(
        name="mistral-7b",  # mistralai/Mistral-7B-v0.1
        arch="mistral",
        hidden_size=4096,
        intermediate_size=14336,
        num_layers=32,
        num_heads=32,
        num_kv_heads=8,
        head_dim=128,
        vocab_size=32000,
        rms_norm_eps=1e-5,
        rope_theta=10000.0,
        max_position_embeddings=32768,
        sliding_window=4096,
    ),
    # Small test configs: every feature of the big ones (GQA, and for mistral a sliding window
    # shorter than the context), at sizes that compile, run and prove in seconds.
    ModelSpec(
        name="tiny-llama",
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
    ),
    ModelSpec(
        name="tiny-mistral",
        arch="mistral",
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
        sliding_window=16,
    ),
)

_BY_NAME: dict[str, ModelSpec] = {spec.name: spec for spec in _ENTRIES}

_ALIASES: dict[str, str] = {
    "llama-7b": "llama-2-7b",
    "llama-13b": "llama-2-13b",
    "llama-70b": "llama-2-70b",
}


def names() -> list[str]:
    """Canonical catalog names, in catalog order (small to large per family, test configs last)."""
    return [spec.name for spec in _ENTRIES]


def aliases() -> dict[str, str]:
    """Alias -> canonical catalog name."""
    return dict(_ALIASES)


def _config_path(text: str) -> Path | None:
    """The config.json that `text` names (the file itself or a directory holding one), if any."""
    path = Path(text).expanduser()
    if path.is_dir():
        path = path / "config.json"
    return path if path.is_file() else None


def resolve(name_or_path: str) -> ModelSpec:
    """The ModelSpec that a model argument names.

    Args:
        name_or_path: a catalog name, an alias (resolves to the canonical entry, canonical name
            included), or the path of an HF `config.json` or of a directory holding one.

    Returns:
        The catalog entry, or the spec read from the config file (named by its path).

    Raises:
        SpecError: the argument names nothing, or its config is one amk-farm cannot compile.
    """
    name = _ALIASES.get(name_or_path, name_or_path)
    if name in _BY_NAME:
        return _BY_NAME[name]
    config = _config_path(name_or_path) if name_or_path else None
    if config is not None:
        return spec_from_config_file(config)
    known = ", ".join([*names(), *_ALIASES])
    raise SpecError(
        f"unknown model {name_or_path!r} (not in the catalog and not a config.json path); "
        f"known: {known}"
    )
