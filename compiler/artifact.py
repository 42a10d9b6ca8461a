"""The artifact directory: every stage's output on disk, and a manifest with their sha256.

    manifest.json  graph.json  fused.json  schedule.json  kernel.cu  kernel.<arch>.cubin
    (later: proof/, bench.json, signature.json)

The manifest names the model (its spec, so the graph can be rebuilt independently), the model
hash, shape template, arch, compiler version, options and their hash, the toolchain, and the
sha256 of every file. A directory is written under a temporary name and renamed into place, so
no reader ever sees a partial artifact.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
ARTIFACT_VERSION = 1


class ArtifactError(ValueError):
    """An artifact directory that is missing, incomplete or does not match its manifest."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class Manifest:
    """What an artifact is: keyed by (model hash, shape template, arch, compiler version)."""

    model: str
    spec: dict[str, Any]
    model_hash: str
    template: str
    arch: str
    compiler_version: str
    options: dict[str, Any]
    options_hash: str
    toolchain: dict[str, str]
    files: dict[str, str]  # relative path -> sha256
    checkpoint_digest: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = {"artifact_version": ARTIFACT_VERSION, **self.__dict__}
        d["files"] = dict(sorted(self.files.items()))
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Manifest:
        if d.get("artifact_version") != ARTIFACT_VERSION:
            raise ArtifactError(f"manifest is not of artifact version {ARTIFACT_VERSION}")
        d = {k: v for k, v in d.items() if k != "artifact_version"}
        try:
            return cls(**d)
        except TypeError as e:
            raise ArtifactError(f"bad manifest: {e}") from None

    @property
    def key(self) -> tuple[str, str, str, str]:
        return (self.model_hash, self.template, self.arch, self.compiler_version)


def read_manifest(directory: Path) -> Manifest:
    path = directory / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{directory}: not an artifact directory (no {MANIFEST})")
    try:
        return Manifest.from_json(json.loads(path.read_text()))
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{path}: malformed JSON: {e}") from None


def check_files(directory: Path, manifest: Manifest) -> None:
    """Every file the manifest lists exists and has its sha256."""
    for name, digest in manifest.files.items():
        p = directory / name
        if not p.is_file():
            raise ArtifactError(f"{directory}: {name} is listed in the manifest but missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{directory}: {name} does not match its sha256 in the manifest")


class ArtifactWriter:
    """Collects files in a temporary directory beside `out`; `commit` renames it into place."""

    def __init__(self, out: Path):
        self.out = out
        out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.partial-"))

    def path(self, name: str) -> Path:
        return self.tmp / name

    def write_text(self, name: str, text: str) -> Path:
        p = self.tmp / name
        p.write_text(text)
        return p

    def digests(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.tmp)): sha256_file(p)
            for p in sorted(self.tmp.rglob("*"))
            if p.is_file() and p.name != MANIFEST
        }

    def commit(self, manifest: Manifest) -> None:
        (self.tmp / MANIFEST).write_text(
            json.dumps(manifest.to_json(), indent=1, sort_keys=True) + "\n"
        )
        os.chmod(self.tmp, 0o755)
        if self.out.exists():
            if not (self.out / MANIFEST).is_file() and any(self.out.iterdir()):
                raise ArtifactError(
                    f"{self.out} exists and is not an artifact directory; not replacing it"
                )
            old = self.out.with_name(f".{self.out.name}.old-{os.getpid()}")
            self.out.rename(old)
            self.tmp.rename(self.out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            self.tmp.rename(self.out)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
