"""The verifier on real tiny-llama artifacts: fresh ones prove, hand-edited ones are rejected by
the intended obligation class with a reason, equivalent edits still prove."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amk_farm import catalog
from amk_farm.cli import app
from compiler.artifact import sha256_file
from compiler.ir.fused import Kind
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier import identity, mutate
from verifier.model import Bound
from verifier.obligation import Obligation
from verifier.verify import KERNEL_COPY, PARTS, Report, merge, obligations_of, verify

runner = CliRunner()


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("verify") / "tiny"
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse("b2-s64")
    compile_model(spec, shape, "sm_90a", out, Options.for_target("sm_90a", 2))
    return out


def edited(fresh: Path, tmp_path: Path, edit) -> Path:
    """A copy of the artifact with schedule.json edited by `edit(schedule_dict)`."""
    out = tmp_path / "edited"
    shutil.copytree(fresh, out, ignore=shutil.ignore_patterns("proof"))
    sched = json.loads((out / "schedule.json").read_text())
    edit(sched)
    (out / "schedule.json").write_text(json.dumps(sched))
    return out


def tasks_of(sched: dict, kind: str, layer: int) -> list[list]:
    return [t for t in sched["tasks"] if t[2] == kind and t[3] == layer]


def failed(report) -> list[tuple[Obligation, str]]:
    return [(ob, r.reason) for ob, r, _ in report.results if not r.proved]


def test_fresh_tiny_artifact_proves_and_writes_certificates(fresh, tmp_path):
    report = verify(fresh, cache=tmp_path / "cache")
    assert report.ok, report.failures()
    classes = {ob.cls for ob, _, _ in report.results}
    assert classes >= {"b", "c", "d", "e", "g", "h"}
    proof = fresh / "proof"
    certs = [json.loads(p.read_text()) for p in proof.glob("[a-i]-*.json")]
    assert len(certs) == len({ob.key for ob, _, _ in report.results})
    cert = certs[0]
    assert cert["result"]["status"] == "proved" and cert["result"]["z3_version"]
    assert "(assert" in cert["obligation"]["assumptions"] + cert["obligation"]["goal"]
    assert cert["result"]["rlimit_used"] > 0
    summary = json.loads((proof / "summary.json").read_text())
    assert summary["verified"] is True and summary["proved"] == summary["obligations"]
    # the summary names what it judged: the manifest (so every file) and the verifier
    assert summary["manifest_sha256"] == sha256_file(fresh / "manifest.json")
    assert summary["verifier"] == identity() and summary["verifier"]["version"]
    again = verify(fresh, cache=tmp_path / "cache")  # identical obligations: all from the cache
    assert again.ok and all(cached for _, _, cached in again.results)


def test_identical_layers_share_keys_and_a_changed_query_changes_its_key(fresh):
    report = verify(fresh, write_proof=False)
    by_layer: dict[int, set[str]] = {}
    for ob, _, _ in report.results:
        if ob.layer >= 0 and ob.cls == "b":
            by_layer.setdefault(ob.layer, set()).add(ob.key)
    assert by_layer[0] == by_layer[1]  # tiny-llama's two layers: one proof each
    # (the schedule shards differ: layer 0's holds EMBED, layer l > 0's holds layer l - 1)
    ob = next(ob for ob, _, _ in report.results if ob.cls == "b")
    i = ob.goal.index("(")
    changed = Obligation(**(ob.to_json() | {"goal": ob.goal[:i] + " " + ob.goal[i:]}))
    assert changed.key != ob.key  # one character of the query text
    relabelled = Obligation(**(ob.to_json() | {"layer": 7, "subject": "x", "tasks": ()}))
    assert relabelled.key == ob.key  # labels are not the query


def test_parts_made_apart_are_the_whole_list(fresh, tmp_path):
    """What farm workers make part by part (the ordering in two shards) merges into the list
    one process makes, checks included, for a fresh artifact and for one whose kernel.cu runs
    another task table (then kernel.cu's own obligations are made too)."""
    bug = next(m for m in mutate.full_catalog() if m.file == "kernel.cu" and m.cls == "c")
    assert mutate.apply(fresh, tmp_path / "table", bug.edit, bug.file) is not None
    for directory in (fresh, tmp_path / "table"):
        whole = Report(str(directory))
        expected = obligations_of(directory, whole)
        shares = [(p, (k, 2)) for p in PARTS for k in range(2 if p == "order" else 1)]
        reports = [Report(str(directory)) for _ in shares]
        got = merge(
            [obligations_of(directory, r, p, s) for r, (p, s) in zip(reports, shares, strict=True)]
        )
        assert sorted((o.key, o.layer, o.subject) for o in got) == sorted(
            (o.key, o.layer, o.subject) for o in expected
        )
        assert {c for r in reports for c in r.checks} == set(whole.checks)
        assert any(o.subject.startswith(KERNEL_COPY) for o in got) == (directory != fresh)


def test_dropped_dependency_is_rejected_by_the_schedule_class(fresh, tmp_path):
    def drop(sched):  # attention of layer 1 no longer waits for its queries and keys
        for t in tasks_of(sched, "attn_partial", 1):
            t[5] = []

    report = verify(edited(fresh, tmp_path, drop), write_proof=False)
    assert not report.ok
    bad = failed(report)
    assert bad and {ob.cls for ob, _ in bad} == {"c"}
    ob, reason = bad[0]
    assert ob.layer == 1 and "may start before task" in reason and "required dependency" in reason


def test_tile_bound_shifted_by_one_is_rejected_by_the_index_maps(fresh, tmp_path):
    def shift(sched):  # the first o-proj tile of layer 0 ends one row late: overlap
        tasks_of(sched, "oproj_residual", 0)[0][4][1] += 1

    report = verify(edited(fresh, tmp_path, shift), write_proof=False)
    bad = failed(report)
    b = [(ob, reason) for ob, reason in bad if ob.cls == "b"]
    assert b and b[0][0].layer == 0 and "oproj_residual x" in b[0][0].subject
    assert "written by 2 tasks" in b[0][1]


def test_task_pointed_at_another_layers_weights_is_rejected(fresh, tmp_path):
    def point(sched):  # a QKV task of layer 1 computes with layer 0's weights and cache
        tasks_of(sched, "qkv_rope_append", 1)[-1][3] = 0

    report = verify(edited(fresh, tmp_path, point), write_proof=False)
    reasons = [(ob.layer, ob.subject, reason) for ob, reason in failed(report) if ob.cls == "b"]
    assert any(layer == 1 and "written by no task" in r for layer, _, r in reasons)
    assert any(layer == 0 and "written by 2 tasks" in r for layer, _, r in reasons)


def test_an_edit_is_seen_even_when_every_obligation_proves(fresh, tmp_path):
    from verifier.mutate import EQUIVALENT

    report = verify(edited(fresh, tmp_path, lambda s: EQUIVALENT[1][1](s)), write_proof=False)
    assert all(r.proved for _, r, _ in report.results), report.failures()
    assert not report.ok  # schedule.json's hash is no longer the manifest's
    assert [f.split(":")[0] for f in report.failures()] == [
        "(i) every file's sha256 is the manifest's",
        "(i) kernel.cu's task table is schedule.json's",  # the kernel runs the old order
    ]


def test_verify_cli_json_and_exit_codes(fresh, tmp_path, monkeypatch):
    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    result = runner.invoke(app, ["verify", str(fresh), "--json", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert summary["verified"] is True and summary["obligations"] == summary["proved"]
    assert set(summary["by_class_and_layer"]) >= {"b layer 0", "c layer 1", "c global"}

    def drop(sched):
        for t in tasks_of(sched, "attn_partial", 1):
            t[5] = []

    bad = edited(fresh, tmp_path, drop)
    result = runner.invoke(app, ["verify", str(bad)])
    assert result.exit_code == 1
    assert "(c) every required dependency ordered by the counters" in result.stdout
    result = runner.invoke(app, ["verify", str(tmp_path / "nothing")])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "manifest.json").write_text("{}")
    result = runner.invoke(app, ["verify", str(broken)])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert "artifact version" in result.stderr and list(broken.iterdir()) == [
        broken / "manifest.json"
    ]


def test_every_planted_bug_is_rejected_by_its_class(fresh, tmp_path):
    from verifier.mutants_algebra import RULE_MUTANTS
    from verifier.mutate import full_catalog, kill_rates

    catalog = full_catalog()
    assert len(catalog) + len(RULE_MUTANTS) >= 25
    result = kill_rates(fresh, tmp_path)
    missed = [m for m in result["mutants"] if not m.get("killed")]
    assert not missed, missed
    assert set(result["per_class"]) == set("abcdefghi")
    assert all(n["of"] >= 2 for n in result["per_class"].values()), result["per_class"]
    assert sum(m["applied"] for m in result["mutants"]) == len(catalog) + len(RULE_MUTANTS)


def test_equivalent_variants_still_prove(fresh, tmp_path):
    from verifier.mutate import EQUIVALENT, apply

    for i, (name, edit) in enumerate(EQUIVALENT):
        dst = tmp_path / f"eq{i}"
        assert apply(fresh, dst, edit) is not None, name
        report = verify(dst, write_proof=False)
        assert all(r.proved for _, r, _ in report.results), (name, report.failures())


@pytest.mark.parametrize(
    "option", [{"sm_count": 7}, {"kv_partitions": 2, "down_splits": 2, "row_tile": 32}]
)
def test_other_sm_counts_and_tilings_prove(tmp_path, option):
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse("b2-s64")
    out = tmp_path / "a"
    compile_model(spec, shape, "sm_90a", out, Options.for_target("sm_90a", 2, **option))
    report = verify(out, write_proof=False)
    assert report.ok, report.failures()


def test_qkv_head_split_artifact_proves_and_its_qkv_bugs_are_rejected(tmp_path, monkeypatch):
    """`amk-farm compile --option qkv_head_split=2`: QKV tasks of half a head (32 rows in pair
    order, two element ranges of q or of the cache row each). The verifier proves it, its own
    model writes each element once, and the planted QKV and KV-append bugs are still rejected
    by their classes."""
    from verifier.model import Geometry, ParamError, touches
    from verifier.mutate import full_catalog, kill_rates

    monkeypatch.setenv("AMK_HOME", str(tmp_path / "home"))
    out = tmp_path / "split"
    args = ["compile", "tiny-llama", "-t", "b2-s64", "-o", str(out), "--option", "qkv_head_split=2"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    result = runner.invoke(app, ["verify", str(out), "--json", "--jobs", "2"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["verified"] is True
    sched = json.loads((out / "schedule.json").read_text())
    qkv = tasks_of(sched, "qkv_rope_append", 0)
    assert [t[4] for t in qkv] == [[a, a + 32] for a in range(0, 512, 32)]
    g = Geometry.of(catalog.resolve("tiny-llama"), ShapeTemplate(2, 64), sched["binding"])
    k0 = touches(Kind.QKV_ROPE_APPEND, 0, (4 * 64 + 32, 4 * 64 + 64), g)  # k head 0, pairs 16..31
    assert [(r.buffer, r.concrete()) for r in k0.writes] == [("k_cache.0", None)] * 2
    assert [r.spans[3] for r in k0.writes] == [
        tuple(Bound.of(v) for v in span) for span in ((16, 32), (48, 64))
    ]
    for bad in ((1, 32), (32, 95), (0, 9 * 64)):  # odd ends, past [Wq; Wk; Wv]
        with pytest.raises(ParamError):
            touches(Kind.QKV_ROPE_APPEND, 0, bad, g)
    picked = tuple(
        m for m in full_catalog() if "QKV" in m.name or "KV append" in m.name or "v-cache" in m.name
    )
    assert len(picked) >= 5
    rates = kill_rates(out, tmp_path / "mutants", picked, rules=False)
    missed = [m for m in rates["mutants"] if not m.get("killed")]
    assert not missed, missed


def test_softmax_lemmas_catch_their_planted_bugs():
    from verifier import attention
    from verifier.solve import run

    assert all(run(ob).proved for ob in attention.obligations())
    unscaled = run(attention.merge(o_rescaled=False))
    assert unscaled.status == "failed" and "the union's" in unscaled.reason  # replayed with exp
    # min instead of max is still an identity over the reals; the float-safety lemma rejects it
    assert run(attention.merge(use_max=False)).proved
    unsafe = run(attention.float_safety(use_max=False))
    assert unsafe.status == "failed" and "rescale exponent" in unsafe.reason
