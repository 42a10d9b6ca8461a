"""Artifact directories: atomic writes, manifests, sha256 checks."""

import json

import pytest

from compiler.artifact import ArtifactError, ArtifactWriter, Manifest, check_files, read_manifest


def manifest(files: dict[str, str]) -> Manifest:
    return Manifest(
        model="tiny-llama",
        spec={},
        model_hash="ab" * 32,
        template="b1-s64",
        arch="sm_90a",
        compiler_version="0.1.0",
        options={},
        options_hash="cd" * 32,
        toolchain={},
        files=files,
    )


def test_commit_is_atomic_and_manifest_round_trips(tmp_path):
    out = tmp_path / "art"
    w = ArtifactWriter(out)
    w.write_text("graph.json", "{}")
    assert not out.exists()  # nothing visible before commit
    m = manifest(w.digests())
    w.commit(m)
    assert read_manifest(out) == m
    check_files(out, m)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary left behind


def test_abort_leaves_nothing(tmp_path):
    w = ArtifactWriter(tmp_path / "art")
    w.write_text("kernel.cu", "x")
    w.abort()
    assert list(tmp_path.iterdir()) == []


def test_replacing_an_artifact_needs_force_and_keeps_other_files(tmp_path):
    """A non-empty directory is refused before anything is written; with force only the
    artifact's own files are replaced (issue 15: a recompile deleted proof/ and notes)."""
    out = tmp_path / "art"
    w = ArtifactWriter(out)
    w.write_text("kernel.cu", "one")
    w.commit(manifest(w.digests()))
    with pytest.raises(ArtifactError, match="not empty; use --force"):
        ArtifactWriter(out)
    assert [p.name for p in tmp_path.iterdir()] == ["art"]  # no temporary made
    (out / "notes.txt").write_text("mine")
    w = ArtifactWriter(out, force=True)
    w.write_text("kernel.cu", "two")
    w.commit(manifest(w.digests()))
    assert (out / "kernel.cu").read_text() == "two"
    assert (out / "notes.txt").read_text() == "mine"
    check_files(out, read_manifest(out))
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_text("meow")
    with pytest.raises(ArtifactError, match="photos exists and is not empty"):
        ArtifactWriter(other)
    assert [p.name for p in other.iterdir()] == ["cat.png"]


def test_tampered_or_missing_files_are_named(tmp_path):
    out = tmp_path / "art"
    w = ArtifactWriter(out)
    w.write_text("kernel.cu", "abc")
    m = manifest(w.digests())
    w.commit(m)
    (out / "kernel.cu").write_text("abd")
    with pytest.raises(ArtifactError, match=r"kernel\.cu does not match"):
        check_files(out, m)
    (out / "kernel.cu").unlink()
    with pytest.raises(ArtifactError, match=r"kernel\.cu is listed in the manifest but missing"):
        check_files(out, m)


def test_bad_manifests(tmp_path):
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"artifact_version": 99}))
    with pytest.raises(ArtifactError, match="artifact version"):
        read_manifest(tmp_path)
