"""verifier.mutants_device in the buggy-compiler mode of verifier.compiled_mutants (issue 16,
item 3): kernel.cu edited, the cubin rebuilt and the hashes updated, so the integrity checks
pass and only the judgement of the code can reject it. Each planted bug is rejected by its
obligation class with a message naming its device function and a line in it; each equivalent
edit still proves. The bugs in code the device semantics do not read yet are strict xfails
naming what is missing: they flip to failures (remove the mark) when that coverage lands."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from amk_farm import catalog
from compiler.artifact import ArtifactError, check_files, read_manifest
from compiler.pipeline import compile_model
from compiler.spec import ShapeTemplate
from verifier import provenance
from verifier.compiled_mutants import CUBIN, HASHES, apply, outcome, rebuild
from verifier.mutants_device import EQUIVALENT, MUTANTS, DeviceMutant, replace
from verifier.verify import verify

ATTN = "attn_keys (ATTN_PARTIAL's scores) has no (f) semantics"
MISSING = {
    "attn_keys: q.k unscaled": ATTN,
    "qkv_rope_append: rotate_half's sign flipped": "QKV_ROPE_APPEND has no (f) semantics (RoPE)",
    "qkv_rope_append: - sin": "QKV_ROPE_APPEND has no (f) semantics (RoPE)",
}


class NotKilled(AssertionError):
    """The verifier accepted a planted bug (or rejected it without naming its site)."""


@pytest.fixture(scope="module")
def artifact(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("device-mutants") / "tiny"
    compile_model(catalog.resolve("tiny-llama"), ShapeTemplate.parse("b1-s64"), "sm_90a", out)
    return out


@pytest.fixture(scope="module")
def cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("proof-cache")


# Each mutant is a whole verify (~10 s on 2 cores): by default the first killed mutant of each
# class of bug, the first live one of each, and three equivalent edits; AMK_DEVICE_MUTANTS=all
# runs the whole catalog (`python -m verifier.compiled_mutants ARTIFACT` prints its table).
ALL = os.environ.get("AMK_DEVICE_MUTANTS") == "all"


def _sample(ms: tuple[DeviceMutant, ...]) -> tuple[DeviceMutant, ...]:
    if ALL:
        return ms
    if not ms[0].bug:  # equivalent edits
        return ms[:3]
    firsts: dict[tuple[str, bool], DeviceMutant] = {}
    for m in ms:
        firsts.setdefault((m.bug, m.name in MISSING), m)
    return tuple(m for m in ms if m in firsts.values())


def _params(ms: tuple[DeviceMutant, ...]) -> list[object]:
    marks = {
        n: pytest.mark.xfail(strict=True, raises=NotKilled, reason=w) for n, w in MISSING.items()
    }
    return [pytest.param(m, id=m.name, marks=marks.get(m.name, ())) for m in _sample(ms)]


def test_the_catalog_covers_every_class_of_the_issue() -> None:
    assert {m.cls for m in MUTANTS} == {"c", "d", "f", "h"}
    assert len({m.bug for m in MUTANTS}) == 11
    assert set(MISSING) <= {m.name for m in MUTANTS}
    assert len({m.name for m in MUTANTS + EQUIVALENT}) == len(MUTANTS + EQUIVALENT)


def test_rebuild_makes_an_edited_artifact_self_consistent(artifact: Path, tmp_path: Path) -> None:
    m = MUTANTS[0]
    what, nvcc = apply(artifact, tmp_path / "m", m.edit)
    assert what is not None and nvcc == ""
    manifest = read_manifest(tmp_path / "m")
    check_files(tmp_path / "m", manifest)
    assert manifest.files["kernel.cu"] != read_manifest(artifact).files["kernel.cu"]
    assert provenance.cubin(tmp_path / "m", manifest) == (True, "")


def test_an_edit_nvcc_refuses_is_reported_not_killed(artifact: Path, tmp_path: Path) -> None:
    bad = replace("down_residual", "s += ld_act", "s += undeclared_name + ld_act", "no such name")
    what, nvcc = apply(artifact, tmp_path / "m", bad)
    assert what is not None and "nvcc failed" in nvcc and "undeclared_name" in nvcc
    with pytest.raises(ArtifactError, match=r"kernel\.cu does not match"):  # hashes not updated
        check_files(tmp_path / "m", read_manifest(tmp_path / "m"))
    assert rebuild(tmp_path / "m") == nvcc


@pytest.mark.slow
@pytest.mark.parametrize("m", _params(MUTANTS))
def test_a_planted_bug_is_rejected_naming_its_function_and_line(
    artifact: Path, cache: Path, tmp_path: Path, m: DeviceMutant
) -> None:
    what, nvcc = apply(artifact, tmp_path / "m", m.edit)
    assert what is not None and nvcc == "", (what, nvcc)
    report = verify(tmp_path / "m", write_proof=False, cache=cache)
    got = outcome(m, (tmp_path / "m" / "kernel.cu").read_text(), report)
    assert got["integrity"], [c for c in report.checks if c[0] in (HASHES, CUBIN)]
    if not (got["killed"] and got["names_function"] and got["names_line"]):
        raise NotKilled(got)


@pytest.mark.slow
@pytest.mark.parametrize("m", _params(EQUIVALENT))
def test_an_equivalent_edit_still_proves(
    artifact: Path, cache: Path, tmp_path: Path, m: DeviceMutant
) -> None:
    what, nvcc = apply(artifact, tmp_path / "m", m.edit)
    assert what is not None and nvcc == "", (what, nvcc)
    report = verify(tmp_path / "m", write_proof=False, cache=cache)
    assert report.ok, report.failures()
