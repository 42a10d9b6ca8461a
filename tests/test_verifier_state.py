"""Classes (g) batch invariance, (h) cross-step state and (i) provenance on real tiny-llama
artifacts: fresh ones prove, planted bugs are rejected by their class with the obligation named,
equivalent variants (another SM count, another batch) still prove. Real Z3, real nvcc."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from amk_farm import catalog
from compiler.artifact import read_manifest
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier import batch_invariance, kv_invariant, provenance
from verifier.model import Geometry
from verifier.mutants_state import BINARY_MUTANTS, MUTANTS, apply
from verifier.mutate import rejected_by
from verifier.solve import run
from verifier.verify import verify

needs_nvcc = pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc not on PATH")


def _compile(out: Path, template: str = "b2-s64", **option: int) -> Path:
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse(template)
    compile_model(spec, shape, "sm_90a", out, Options.for_target("sm_90a", shape.batch, **option))
    return out


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    return _compile(tmp_path_factory.mktemp("state") / "tiny")


@pytest.fixture(scope="module")
def report(fresh):
    return verify(fresh, write_proof=False)


def test_fresh_artifact_proves_g_h_and_provenance(report):
    assert report.ok, report.failures()
    by_class = {c: [ob for ob, _, _ in report.results if ob.cls == c] for c in "gh"}
    assert len(by_class["g"]) == 3  # split-KV, split-K, LM head
    # per layer a k and a v step invariant, the append's address, the token handoff
    assert len(by_class["h"]) == 2 * 2 + 2
    assert {ob.cls for ob, _, _ in report.results} == set("abcdefgh")
    names = {n for n, ok, _ in report.checks if ok}
    assert "kernel.cu's constants are those of the manifest and schedule.json" in names
    if shutil.which("nvcc"):
        assert "the cubin is kernel.cu compiled by the manifest's nvcc" in names
        assert not report.skipped
    else:
        assert [n for n, _ in report.skipped] == [
            "the cubin is kernel.cu compiled by the manifest's nvcc"
        ]


def test_expression_reader_follows_cpp_integer_semantics():
    e = batch_invariance.parse("(S + P - 1) / P - -7 % 3 * 2")
    env = {"S": 10, "P": 4}.__getitem__
    assert batch_invariance.evaluate(e, env) == 3 - (-1 * 2)  # C++: -7 % 3 == -1
    e = batch_invariance.parse("W > 0 ? max(0, x - W + 1) : min(x, -2) == -2")
    assert [batch_invariance.evaluate(e, {"W": w, "x": x}.__getitem__)
            for w, x in ((4, 9), (4, 1), (0, 5), (0, -3))] == [6, 0, 1, 0]  # fmt: skip
    for bad in ("S << 1", "f(P)", "max(P)", "(S + 1"):
        with pytest.raises(batch_invariance.ExprError):
            batch_invariance.parse(bad)
    with pytest.raises(batch_invariance.ExprError):
        batch_invariance.Constants("constexpr int P = Q;\n").value("P", {})


def test_key_range_is_read_from_attn_partial(fresh):
    """attn_partial's j0, j1 and the locals they use, as written, pos and part left free; so
    evaluated they cut the keys 0..pos into the P runs, in order; without j1, or with part not
    the task's parameter, nothing is read."""
    text = (fresh / "kernel.cu").read_text()
    keys = batch_invariance.key_range(text)
    assert set(keys) == {"lo", "n", "c", "j0", "j1"} and keys["c"] == "(n + P - 1) / P"
    c = batch_invariance.Constants(text, batch_invariance.KEY_VARS)
    c.text |= keys
    for pos in (0, 3, 4, 63):
        runs = [tuple(c.value(r, {"pos": pos, "part": p}) for r in ("j0", "j1")) for p in range(4)]
        assert [j for a, b in runs for j in range(a, b)] == list(range(pos + 1))
    with pytest.raises(batch_invariance.ExprError, match="no const int j1"):
        batch_invariance.key_range(text.replace("j1 = min(", "j2 = min("))
    with pytest.raises(batch_invariance.ExprError, match=r"part not t\.b"):
        batch_invariance.key_range(text.replace("part = t.b;", "part = t.a;"))


def test_batch_dependent_split_is_refuted_with_a_replayed_counterexample(fresh):
    text = (fresh / "kernel.cu").read_text()
    kept = re.sub(r"^constexpr int P = (\d+);", r"constexpr int P = \1 + B - B;", text, flags=re.M)
    assert all(run(ob).proved for ob in batch_invariance.obligations(kept))  # value, not syntax
    bad = re.sub(r"^constexpr int KS = (\d+);", "constexpr int KS = 8 / B;", text, flags=re.M)
    results = [run(ob) for ob in batch_invariance.obligations(bad)]
    assert [r.status for r in results] == ["proved", "failed", "proved"]
    cex = results[1].counterexample
    assert cex["B_1"] != cex["B_2"] and 0 <= cex["j"] < 512
    assert "not confirmed" not in results[1].reason and "split_k" in results[1].reason


def test_append_address_is_read_from_kernel_cu(fresh, report):
    text = (fresh / "kernel.cu").read_text()
    g = next(ob for ob, _, _ in report.results if ob.check.startswith("the KV append"))
    assert "pos" in g.subject and g.cls == "h"
    shifted = text.replace("* S + pos) * D", "* S + pos - 1) * D")
    spec = catalog.resolve("tiny-llama")
    geom = Geometry(spec, 2, 64, 4, 4, 4)
    result = run(kv_invariant.append_store(shifted, geom))
    assert result.status == "failed" and "row pos is at" in result.reason


@pytest.mark.parametrize("m", MUTANTS + BINARY_MUTANTS, ids=lambda m: m.name)
def test_planted_bug_is_rejected_by_its_class(fresh, tmp_path, m):
    dst = tmp_path / "mutant"
    assert apply(fresh, dst, m.edit, m.file) is not None, m.name
    bad = verify(dst, write_proof=False)
    assert m.cls in rejected_by(bad), bad.failures()
    named = [f for f in bad.failures() if f.startswith(f"({m.cls}) ")]
    assert named and all(": " in f for f in named)
    if m.cls in "gh":
        assert any(ob.cls == m.cls and not r.proved for ob, r, _ in bad.results)
        assert all("not confirmed" not in r.reason for ob, r, _ in bad.results if ob.cls == m.cls)


@needs_nvcc
def test_nvcc_of_another_version_fails_the_cubin_check(fresh, tmp_path):
    dst = tmp_path / "other"
    shutil.copytree(fresh, dst)
    manifest = json.loads((dst / "manifest.json").read_text())
    manifest["toolchain"]["nvcc"] = "Build cuda_12.4.r12.4/compiler.0_0"
    (dst / "manifest.json").write_text(json.dumps(manifest))
    ok, why = provenance.cubin(dst, read_manifest(dst))
    assert ok is False and "cuda_12.4" in why


@pytest.mark.parametrize(("template", "option"), [("b2-s64", {"sm_count": 100}), ("b4-s64", {})])
def test_other_sm_counts_and_batches_prove(tmp_path, template, option):
    report = verify(_compile(tmp_path / "a", template, **option), write_proof=False)
    assert report.ok, report.failures()
    assert {ob.cls for ob, _, _ in report.results} >= {"g", "h"}
