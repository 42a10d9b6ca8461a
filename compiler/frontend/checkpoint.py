"""Lazy, validated loading of HF safetensors checkpoints for a ModelSpec.

A checkpoint directory holds either `model.safetensors` or `model.safetensors.index.json`
whose `weight_map` names a shard per tensor (HF prefers the single file when both exist, and
so do we). `Checkpoint.open` reads only the headers, checks every tensor against the spec and
refuses the first problem with a one-line `CheckpointError` naming the tensor and the file.
Tensor data is then read one tensor at a time through `safe_open`; no file is loaded whole.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import Tensor, nn

from compiler.spec import ModelSpec

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"

# Bytes per element of every safetensors dtype code; only the float ones below are accepted.
DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1,
}  # fmt: skip
ACCEPTED_DTYPES = ("BF16", "F16", "F32")

# Old checkpoints carry the RoPE table as a buffer; it is recomputed from the spec, so skip it.
TOLERATED_EXTRA = re.compile(r"^model\.layers\.\d+\.self_attn\.rotary_emb\.inv_freq$")

MAX_HEADER_BYTES = 100 * 1024 * 1024  # the limit safetensors itself enforces


class CheckpointError(ValueError):
    """A checkpoint that does not hold exactly the weights of its spec; the message is one line."""


@dataclass(frozen=True)
class TensorInfo:
    """Where one tensor lives and what its header says, before any data is read."""

    name: str
    file: Path
    dtype: str  # safetensors dtype code, e.g. "BF16"
    shape: tuple[int, ...]


def expected_tensors(spec: ModelSpec) -> dict[str, tuple[int, ...]]:
    """The HF tensor names and shapes a checkpoint of `spec` must hold, in model order.

    Args:
        spec: the model architecture.

    Returns:
        `{name: shape}`; `lm_head.weight` is absent when the embeddings are tied.
    """
    h, i, v = spec.hidden_size, spec.intermediate_size, spec.vocab_size
    out: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (v, h)}
    for layer in range(spec.num_layers):
        p = f"model.layers.{layer}."
        out[p + "self_attn.q_proj.weight"] = (spec.q_size, h)
        out[p + "self_attn.k_proj.weight"] = (spec.kv_size, h)
        out[p + "self_attn.v_proj.weight"] = (spec.kv_size, h)
        out[p + "self_attn.o_proj.weight"] = (h, spec.q_size)
        out[p + "mlp.gate_proj.weight"] = (i, h)
        out[p + "mlp.up_proj.weight"] = (i, h)
        out[p + "mlp.down_proj.weight"] = (h, i)
        out[p + "input_layernorm.weight"] = (h,)
        out[p + "post_attention_layernorm.weight"] = (h,)
    out["model.norm.weight"] = (h,)
    if not spec.tie_word_embeddings:
        out["lm_head.weight"] = (v, h)
    return out


def _read_index(index: Path) -> dict[str, str]:
    """The index's weight_map, with shard names checked to be plain file names."""
    try:
        doc = json.loads(index.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{index}: malformed index JSON: {e}") from None
    wmap = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wmap, dict):
        raise CheckpointError(f"{index}: index has no weight_map object")
    for name, shard in wmap.items():
        if not isinstance(shard, str) or Path(shard).name != shard:
            raise CheckpointError(f"{index}: tensor {name!r} maps to a bad shard name {shard!r}")
    return wmap


def _locate(path: Path) -> tuple[Path | None, dict[str, str] | None, list[Path]]:
    """Find the weight files of a checkpoint directory: (index, weight_map, files)."""
    if (path / SINGLE_FILE).is_file():
        return None, None, [path / SINGLE_FILE]
    index = path / INDEX_FILE
    if not index.is_file():
        raise CheckpointError(f"{path}: no {SINGLE_FILE} or {INDEX_FILE}")
    wmap = _read_index(index)
    files: list[Path] = []
    for name, shard in wmap.items():
        f = path / shard
        if f not in files:
            if not f.is_file():
                raise CheckpointError(
                    f"{index}: shard {shard} (holding tensor {name!r}) does not exist"
                )
            files.append(f)
    return index, wmap, sorted(files)


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Parse and check a safetensors header without reading tensor data.

    The file size is checked against the header's data offsets here, so a truncated file is
    reported by tensor name instead of failing inside the reader.

    Args:
        file: a `.safetensors` file.

    Returns:
        `{name: TensorInfo}` for every tensor in the file.
    """
    size = file.stat().st_size
    with file.open("rb") as f:
        prefix = f.read(8)
        n = int.from_bytes(prefix, "little") if len(prefix) == 8 else -1
        if n < 0 or n > size - 8 or n > MAX_HEADER_BYTES:
            raise CheckpointError(
                f"{file}: corrupt or truncated safetensors header (header length {n}, file size {size})"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header: {e}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header: not a JSON object")
    data_bytes = size - 8 - n
    out: dict[str, TensorInfo] = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = str(entry["dtype"])
            shape = tuple(int(d) for d in entry["shape"])
            begin, end = (int(o) for o in entry["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from None
        if not 0 <= begin <= end:
            raise CheckpointError(f"{file}: tensor {name!r} has bad data offsets [{begin}, {end}]")
        if end > data_bytes:
            raise CheckpointError(
                f"{file}: truncated: tensor {name!r} ends at data byte {end} but the file holds {data_bytes}"
            )
        if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
            raise CheckpointError(
                f"{file}: tensor {name!r} has {end - begin} data bytes, not the "
                f"{math.prod(shape) * DTYPE_BYTES[dtype]} its shape {list(shape)} and {dtype} need"
            )
        out[name] = TensorInfo(name, file, dtype, shape)
    return out


def _gather(path: Path) -> tuple[Path, dict[str, TensorInfo]]:
    """Every tensor of the checkpoint, checked against the index when there is one.

    Returns the file that lists the tensors (the index, or the single file) and the tensors.
    """
    index, wmap, files = _locate(path)
    found: dict[str, TensorInfo] = {}
    for f in files:
        for name, info in read_header(f).items():
            if name in found:
                raise CheckpointError(f"{f}: tensor {name!r} also appears in {found[name].file}")
            if wmap is not None and wmap.get(name) != f.name:
                raise CheckpointError(
                    f"{f}: tensor {name!r} is in this shard but {index} maps it to {wmap.get(name)}"
                )
            found[name] = info
    if wmap is not None:
        for name, shard in wmap.items():
            if name not in found:
                raise CheckpointError(
                    f"{path / shard}: missing tensor {name!r} that {index} maps to this shard"
                )
    return index or files[0], found


def _check(spec: ModelSpec, where: Path, found: dict[str, TensorInfo]) -> None:
    """Refuse the first tensor that is missing, extra, mis-shaped or of a refused dtype."""
    expected = expected_tensors(spec)
    for name, shape in expected.items():
        info = found.get(name)
        if info is None:
            why = " (tie_word_embeddings is false)" if name == "lm_head.weight" else ""
            raise CheckpointError(f"{where}: missing tensor {name!r}{why}")
        if info.dtype not in ACCEPTED_DTYPES:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has dtype {info.dtype}; accepted: {', '.join(ACCEPTED_DTYPES)}"
            )
        if info.shape != shape:
            raise CheckpointError(
                f"{info.file}: tensor {name!r} has shape {list(info.shape)}, expected {list(shape)}"
            )
    for name, info in found.items():
        if name in expected or TOLERATED_EXTRA.match(name):
            continue
        why = ""
        if name == "lm_head.weight":
            why = " (tie_word_embeddings is true, so the head is model.embed_tokens.weight)"
        raise CheckpointError(
            f"{info.file}: unexpected tensor {name!r}, not a weight of {spec.name}{why}"
        )


@dataclass(frozen=True)
class Checkpoint:
    """A validated checkpoint directory: where each weight of `spec` lives. Holds no data."""

    path: Path
    spec: ModelSpec
    tensors: dict[str, TensorInfo]  # the spec's weights only, in model order

    @classmethod
    def open(cls, path: str | Path, spec: ModelSpec) -> Checkpoint:
        """Read the headers of a checkpoint directory and check them against `spec`.

        Args:
            path: directory with `model.safetensors` or `model.safetensors.index.json`.
            spec: the architecture the weights must match.

        Returns:
            The checkpoint; no tensor data has been read.

        Raises:
            CheckpointError: on the first missing, extra, mis-shaped, refused-dtype or
                truncated tensor, or a missing shard.
        """
        p = Path(path)
        where, found = _gather(p)
        _check(spec, where, found)
        return cls(p, spec, {n: found[n] for n in expected_tensors(spec)})

    def iter_tensors(
        self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> Iterator[tuple[str, Tensor]]:
        """Yield `(name, tensor)` one tensor at a time, file by file.

        Args:
            dtype: convert each tensor to this dtype; None keeps the stored dtype.
            device: move each tensor here.
        """
        by_file: dict[Path, list[str]] = {}
        for name, info in self.tensors.items():
            by_file.setdefault(info.file, []).append(name)
        for file, names in by_file.items():
            try:
                with safe_open(str(file), framework="pt") as f:
                    for name in names:
                        t = f.get_tensor(name)
                        yield name, t.to(device=device, dtype=dtype or t.dtype)
            except SafetensorError as e:
                raise CheckpointError(f"{file}: unreadable safetensors file: {e}") from None

    def state_dict(
        self, dtype: torch.dtype | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, Tensor]:
        """All weights as a dict (see `iter_tensors`); names match `Reference` parameters."""
        return dict(self.iter_tensors(dtype, device))

    def load_into(self, model: nn.Module) -> None:
        """Copy the weights into `model`'s parameters in place, one tensor at a time.

        Each tensor is converted to its parameter's dtype and device, so peak extra memory is
        one tensor. The model's parameter names must be exactly `expected_tensors(spec)`.

        Args:
            model: e.g. a `Reference` built for the same spec.
        """
        params = dict(model.named_parameters())
        if set(params) != set(self.tensors):
            odd = sorted(set(params) ^ set(self.tensors))[0]
            raise CheckpointError(
                f"{self.path}: model parameters do not match {self.spec.name}: {odd!r} differs"
            )
        with torch.no_grad():
            for name, t in self.iter_tensors():
                params[name].copy_(t)


def checkpoint_digest(path: str | Path) -> str:
    """A streaming sha256 over a checkpoint's weight files and index, in name order.

    Each file contributes its name, its size and its bytes, read in 1 MiB chunks.

    Args:
        path: checkpoint directory.

    Returns:
        The hex digest.
    """
    index, _, files = _locate(Path(path))
    h = hashlib.sha256()
    for f in sorted([*files, *([index] if index else [])], key=lambda p: p.name):
        h.update(f.name.encode() + b"\0" + f.stat().st_size.to_bytes(8, "little"))
        with f.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()
