"""The model's weights on the device, held by a `Reference` so PyTorch and the kernel share them.

One copy of the weights serves both: the kernel's Params point at the `Reference`'s parameter
tensors (HF layout `[out, in]`, bf16, contiguous), and the same module computes the prefill and
the PyTorch baselines. Sources:

* an HF safetensors checkpoint (`compiler.frontend.checkpoint.Checkpoint`), each tensor
  converted to bf16 on the way in;
* seeded synthetic weights (`compiler.frontend.synthetic`): drawn on the CPU in float32, then
  cast and moved, one tensor at a time (values depend only on seed and name);
* `synthetic_on="device"`: the same scaling rules drawn by the device's own generator, for the
  benchmarks of large models, where drawing billions of values on the host would dominate the
  run. Deterministic for a seed and device type, but not the CPU draw's values.
"""

from __future__ import annotations

import hashlib
import math
from pathlib import Path

import torch

from compiler.frontend.checkpoint import Checkpoint, expected_tensors
from compiler.frontend.synthetic import iter_synthetic
from compiler.reference import Reference, rope_inv_freq
from compiler.spec import ModelSpec

SYNTHETIC_ON = ("cpu", "device")


def _scale(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> tuple[float, float]:
    """(scale, offset) of `synthetic_tensor`'s rules: value = offset + scale * N(0, 1)."""
    if name.endswith("norm.weight"):
        return 0.1, 1.0
    if name == "model.embed_tokens.weight":
        return 1.0, 0.0
    scale = 1.0 / math.sqrt(shape[1])
    if name.endswith(("o_proj.weight", "down_proj.weight")):
        scale /= math.sqrt(2 * spec.num_layers)
    return scale, 0.0


def _device_seed(seed: int, name: str) -> int:
    digest = hashlib.sha256(f"device:{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


@torch.no_grad()
def load_reference(
    spec: ModelSpec,
    max_seq: int,
    device: torch.device,
    weights: str | Path | None = None,
    synthetic_seed: int | None = None,
    synthetic_on: str = "cpu",
) -> Reference:
    """A bf16 `Reference` on `device` holding the checkpoint's or the synthetic weights.

    Args:
        spec: the model (the artifact's manifest spec).
        max_seq: cache capacity of the reference (the artifact's S).
        device: where the weights live.
        weights: HF checkpoint directory; exclusive with `synthetic_seed`.
        synthetic_seed: seed of synthetic weights.
        synthetic_on: "cpu" (the `compiler.frontend.synthetic` values) or "device".

    Raises:
        ValueError: neither or both sources given, or an unknown `synthetic_on`.
        CheckpointError: the checkpoint does not hold exactly `spec`'s weights.
    """
    if (weights is None) == (synthetic_seed is None):
        raise ValueError("give exactly one of a checkpoint directory or a synthetic seed")
    if synthetic_on not in SYNTHETIC_ON:
        raise ValueError(f"synthetic_on must be one of {SYNTHETIC_ON}, got {synthetic_on!r}")
    ckpt = Checkpoint.open(weights, spec) if weights is not None else None
    # built on the meta device (no host copy, no init kernels), then given device storage
    ref = Reference(spec, max_seq, dtype=torch.bfloat16, device="meta").to_empty(device=device)
    ref.inv_freq = rope_inv_freq(spec).to(device)  # to_empty left the buffer uninitialized
    params = dict(ref.named_parameters())
    if set(params) != set(expected_tensors(spec)):  # pragma: no cover - Reference's contract
        raise ValueError("Reference parameters do not match the spec's tensor names")
    if ckpt is not None:
        ckpt.load_into(ref)
    elif synthetic_on == "cpu":
        assert synthetic_seed is not None
        for name, t in iter_synthetic(spec, synthetic_seed, dtype=torch.bfloat16):
            params[name].copy_(t)
    else:
        assert synthetic_seed is not None
        for name, p in params.items():
            g = torch.Generator(device=device).manual_seed(_device_seed(synthetic_seed, name))
            scale, offset = _scale(spec, name, tuple(p.shape))
            x = torch.randn(p.shape, generator=g, device=device, dtype=torch.float32)
            p.copy_(x.mul_(scale).add_(offset))
    return ref.eval().requires_grad_(False)
