"""The artifact directory: every stage's output on disk, and a manifest with their sha256.

    manifest.json  graph.json  fused.json  schedule.json  kernel.cu  kernel.<arch>.cubin
    (later: proof/, bench.json, signature.json)

The manifest names the model (its spec, so the graph can be rebuilt independently), the model
hash, shape template, arch, compiler version, options and their hash, the toolchain, and the
sha256 of every file. A directory is written under a temporary name and renamed into place, so
no reader ever sees a partial artifact.

Nothing of the user's is deleted: an output directory that exists and is not empty is refused
unless `force`, and then only the files the command writes are replaced (`check_output`,
`install`); notes, proof/, bench.json and any other file already there are left alone.
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


def check_output(out: Path, force: bool = False) -> None:
    """Refuse `out` as an output directory unless it is absent, empty, or `force` is given.

    Raises:
        ArtifactError: `out` is not a directory, or is a non-empty one and `force` is False.
    """
    if not out.exists() and not out.is_symlink():
        return
    if not out.is_dir():
        raise ArtifactError(f"{out} exists and is not a directory; not writing an artifact there")
    if not force and any(out.iterdir()):
        raise ArtifactError(
            f"{out} exists and is not empty; use --force to replace the artifact's own files "
            "in it (other files are kept)"
        )


def _check_target(out: Path, rel: Path) -> None:
    """`out / rel` can be replaced by a file: every directory on the way is a real directory
    (not a link that would lead outside `out`), and the file itself is not a directory."""
    p = out
    for part in rel.parts[:-1]:
        p = p / part
        if p.is_symlink() or (p.exists() and not p.is_dir()):
            raise ArtifactError(f"{p} is not a directory; not writing {rel} through it")
    dest = out / rel
    if dest.is_dir() and not dest.is_symlink():
        raise ArtifactError(f"{dest} is a directory; not replacing it with a file")


def install(tmp: Path, out: Path, force: bool = False) -> None:
    """Move the complete artifact directory `tmp` to `out`.

    An absent or empty `out` is replaced by one rename: it appears whole or not at all. A
    non-empty `out` (only with `force`) gets each of `tmp`'s files in place of its namesake, the
    manifest removed first and written last, so no reader sees a manifest that does not match
    the files; every other file in `out` is left as it was. `tmp` is gone afterwards.
    """
    check_output(out, force)
    tmp.chmod(0o755)
    if not out.exists() or not any(out.iterdir()):
        os.rename(tmp, out)  # onto an empty directory too
        return
    files = sorted(p.relative_to(tmp) for p in tmp.rglob("*") if p.is_file())
    for rel in files:  # every target checked before anything moves
        _check_target(out, rel)
    (out / MANIFEST).unlink(missing_ok=True)
    for rel in sorted(files, key=lambda r: str(r) == MANIFEST):
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp / rel, out / rel)
    shutil.rmtree(tmp, ignore_errors=True)


class ArtifactWriter:
    """Collects files in a temporary directory beside `out`; `commit` moves them into place.

    `out` is checked first (`check_output`): a non-empty directory is refused unless `force`.
    """

    def __init__(self, out: Path, force: bool = False):
        check_output(out, force)
        self.out, self.force = out, force
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
        install(self.tmp, self.out, self.force)

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)
