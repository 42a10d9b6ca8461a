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


def test_replacing_an_artifact_and_refusing_other_directories(tmp_path):
    out = tmp_path / "art"
    for text in ("one", "two"):
        w = ArtifactWriter(out)
        w.write_text("kernel.cu", text)
        w.commit(manifest(w.digests()))
    assert (out / "kernel.cu").read_text() == "two"
    other = tmp_path / "photos"
    other.mkdir()
    (other / "cat.png").write_text("meow")
    w = ArtifactWriter(other)
    with pytest.raises(ArtifactError, match="not an artifact directory"):
        w.commit(manifest({}))
    assert (other / "cat.png").read_text() == "meow"


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
