"""Seeded synthetic weights for a ModelSpec, and a writer for HF-format checkpoint directories.

Every tensor is drawn on the CPU in float32 from its own generator, seeded from (seed, name),
then cast and moved: the values depend only on the seed and the tensor's name and shape, never
on the device, the dtype asked for or the other tensors, so large models can be streamed.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import Tensor

from compiler.frontend.checkpoint import INDEX_FILE, SINGLE_FILE, expected_tensors
from compiler.spec import ModelSpec, spec_to_hf_config


def _tensor_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1  # a non-negative int64


def synthetic_tensor(spec: ModelSpec, name: str, shape: tuple[int, ...], seed: int) -> Tensor:
    """One synthetic weight, float32 on the CPU, scaled so activations stay O(1) at any depth.

    Embeddings are N(0, 1); norm weights 1 + 0.1 N(0, 1) (not trivially ones); linears
    N(0, 1/fan_in), and the two projections that feed the residual stream (o_proj, down_proj)
    are further divided by sqrt(2 * num_layers) so the residual's variance grows by about 1 in
    total over the whole depth rather than by 1 per layer.

    Args:
        spec: the model architecture (for the depth scaling).
        name: HF tensor name, e.g. `model.layers.0.mlp.up_proj.weight`.
        shape: the tensor's shape.
        seed: the model seed.
    """
    g = torch.Generator().manual_seed(_tensor_seed(seed, name))
    x = torch.randn(shape, generator=g, dtype=torch.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * x
    if name == "model.embed_tokens.weight":
        return x
    scale = 1.0 / math.sqrt(shape[1])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        scale /= math.sqrt(2 * spec.num_layers)
    return x * scale


def iter_synthetic(
    spec: ModelSpec,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Iterator[tuple[str, Tensor]]:
    """Yield `(name, tensor)` for every weight of `spec`, one at a time (see `synthetic_tensor`)."""
    for name, shape in expected_tensors(spec).items():
        yield name, synthetic_tensor(spec, name, shape, seed).to(device=device, dtype=dtype)


def synthetic_state_dict(
    spec: ModelSpec,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> dict[str, Tensor]:
    """Deterministic synthetic weights of `spec` under HF names (loadable into `Reference`).

    Args:
        spec: the model architecture.
        seed: the same seed gives the same values on every device and for every dtype (up to
            the cast from float32).
        dtype: dtype of the returned tensors.
        device: device of the returned tensors.

    Returns:
        `{name: tensor}` in `expected_tensors(spec)` order; no `lm_head.weight` when tied.
    """
    return dict(iter_synthetic(spec, seed, dtype, device))


def write_checkpoint(
    spec: ModelSpec, state_dict: Mapping[str, Tensor], path: str | Path, shards: int = 1
) -> Path:
    """Write an HF-format checkpoint directory: `config.json` plus safetensors weights.

    The tensors are written as given (no validation), so tests can write broken checkpoints.

    Args:
        spec: the architecture, written as `config.json` via `spec_to_hf_config`.
        state_dict: the tensors to write, in this order.
        path: the directory; created if needed.
        shards: 1 writes `model.safetensors`; more splits the tensors in order into that many
            `model-0000i-of-0000n.safetensors` files plus `model.safetensors.index.json`.

    Returns:
        The directory.
    """
    out = Path(path)
    names = list(state_dict)
    if not 1 <= shards <= max(1, len(names)):
        raise ValueError(f"shards must be between 1 and {len(names)}, got {shards}")
    out.mkdir(parents=True, exist_ok=True)
    cfg = spec_to_hf_config(spec)
    dtypes = {t.dtype for t in state_dict.values()}
    if len(dtypes) == 1:
        cfg["torch_dtype"] = str(dtypes.pop()).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    tensors = {n: state_dict[n].detach().to("cpu").contiguous() for n in names}
    meta = {"format": "pt"}
    if shards == 1:
        save_file(tensors, str(out / SINGLE_FILE), metadata=meta)
        return out
    weight_map: dict[str, str] = {}
    for i in range(shards):
        group = names[i * len(names) // shards : (i + 1) * len(names) // shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in group}, str(out / shard), metadata=meta)
        weight_map.update(dict.fromkeys(group, shard))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / INDEX_FILE).write_text(json.dumps(index, indent=2) + "\n")
    return out
