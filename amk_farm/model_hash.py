"""Model hashes with a small on-disk cache, so listing the catalog does not re-trace every model.

The cache key covers the spec (without its display name), the compiler's source digest and the
torch version, so any change that could change a graph misses the cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path

import torch

import compiler
from compiler.frontend.torch_export import graph_from_spec
from compiler.spec import ModelSpec


def cache_key(spec: ModelSpec) -> str:
    arch = {k: v for k, v in spec.to_json().items() if k != "name"}
    text = json.dumps([arch, compiler.source_digest(), torch.__version__], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def model_hash(spec: ModelSpec, cache_dir: Path | None = None) -> str:
    """The digest of `spec`'s weight-free graph; read from / written to `cache_dir` if given."""
    path = cache_dir / "model-hashes.json" if cache_dir is not None else None
    key = cache_key(spec)
    table: dict[str, str] = {}
    if path is not None and path.is_file():
        try:
            table = json.loads(path.read_text())
        except (json.JSONDecodeError, OSError):
            table = {}  # a damaged cache is rebuilt, never trusted
        if key in table:
            return table[key]
    digest = graph_from_spec(spec).digest()
    if path is not None:
        table[key] = digest
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".hashes")
        with os.fdopen(fd, "w") as f:
            json.dump(table, f, sort_keys=True, indent=1)
        os.replace(tmp, path)
    return digest
