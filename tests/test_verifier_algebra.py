"""The algebra classes: (f) fused instructions against the graph's ops, (e) the graph's attention
against the kernel's, (a) the fusion rules on a small model; their encodings and replays."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from amk_farm import catalog
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier import attention, rules
from verifier.algebra import equal_obligations
from verifier.mutants_algebra import MUTANTS, RULE_MUTANTS, patched_rule
from verifier.mutants_state import apply
from verifier.mutate import rejected_by
from verifier.solve import run
from verifier.terms import Aff, add, app, const, mul, summed
from verifier.verify import Report, obligations_of, verify


@pytest.fixture(scope="module")
def fresh(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("algebra") / "tiny"
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse("b2-s64")
    compile_model(spec, shape, "sm_90a", out, Options.for_target("sm_90a", 2))
    return out


def _rms(x: str, scale: Fraction, eps: Fraction, n: int = 16) -> tuple:
    ranges = {"b": (0, 2), "k": (0, n), "c": (0, n)}
    sq = summed(
        "k", n, mul(("v", x, (Aff.of("b"), Aff.of("k"))), ("v", x, (Aff.of("b"), Aff.of("k"))))
    )
    r = app("rsqrt", add(mul(const(scale), sq), const(eps)))
    return summed("c", n, mul(("v", x, (Aff.of("b"), Aff.of("c"))), r)), ranges


def test_the_rsqrt_argument_is_its_own_query():
    """Sum instead of mean: the decomposition makes it a fast, replayed counterexample."""
    lhs, ranges = _rms("x", Fraction(1, 16), Fraction(1, 10**5))
    good, _ = _rms("x", Fraction(1, 16), Fraction(1, 10**5))
    bad, _ = _rms("x", Fraction(1), Fraction(1, 10**5))
    assert all(
        run(ob).proved for ob in equal_obligations(lhs, good, dict(ranges), {}, "rms", "t", 0)
    )
    results = [run(ob) for ob in equal_obligations(lhs, bad, dict(ranges), {}, "rms", "t", 0)]
    failed = [r for r in results if not r.proved]
    assert failed and all(r.status == "failed" for r in failed)
    assert any("argument" in r.reason or "model graph gives" in r.reason for r in failed)
    assert not any("not confirmed" in r.reason for r in failed)


def test_index_arithmetic_cancels_row_major_reshapes():
    ranges = {"h": (0, 4), "d": (0, 64)}
    flat = Aff.of("h").scale(64) + Aff.of("d") - 32 + 256
    q, r = flat.divmod(256, {"h": (0, 4), "d": (32, 64)})
    assert q == Aff(1) and r == Aff.of("h").scale(64) + Aff.of("d") - 32
    q, r = (Aff.of("h").scale(64) + Aff.of("d")).divmod(64, ranges)
    assert (q, r) == (Aff.of("h"), Aff.of("d"))


def test_axioms_hold_numerically():
    assert [why for _, why in rules.axioms() if why] == []


def test_axiom_checks_are_deterministic():
    """A fixed sample (no generator) and the same verdict on every run: the rsqrt axiom once
    failed 4 times in about 190 runs and rejected a fresh artifact."""
    assert rules.sample() == rules.sample()
    xs, pos = rules.sample()
    assert len(set(pos)) == len(pos) == rules.N and min(pos) > 0 and len(xs) > rules.N
    assert rules.axioms() == rules.axioms()
    assert attention.axioms() == attention.axioms()
    assert [why for _, why in attention.axioms() if why] == []


def test_a_failed_axiom_names_its_input_and_both_values():
    why = rules.first_failure([4.0, 9.0], [0.5, 0.3], [0.5, 1 / 3], [8.0, 8.0])
    assert why.startswith("fails at x = 9.0: 0.3 against 0.333"), why
    assert rules.first_failure([1.0], [float("nan")], [1.0], [8.0]) != ""


def test_the_axiom_tolerance_is_a_few_ulps(monkeypatch):
    """1 ulp off (any rounding) passes; 1e-14 relative off (45 ulps) fails, at an x of the
    rsqrt sample (not of the other arrays), with both values."""
    import math

    import torch

    rsqrt = torch.rsqrt
    monkeypatch.setattr(torch, "rsqrt", lambda t: torch.nextafter(rsqrt(t), 2 * rsqrt(t)))
    assert dict(rules.axioms())["rsqrt(x) = 1 / sqrt(x)"] == ""
    monkeypatch.setattr(torch, "rsqrt", lambda t: rsqrt(t) * (1 + 1e-14))
    why = dict(rules.axioms())["rsqrt(x) = 1 / sqrt(x)"]
    x = float(why.split("x = ")[1].split(":")[0])
    assert x in rules.sample()[1] and why.count(" against ") == 1
    assert math.isclose(float(why.split(": ")[1].split(" ")[0]), 1 / math.sqrt(x), rel_tol=1e-13)


def test_a_wrong_exp_fails_the_softmax_axioms(monkeypatch, fresh):
    import math

    exp = math.exp
    monkeypatch.setattr(math, "exp", lambda t: exp(t) * (1 + 1e-12 * t * t))
    failed = [(name, why) for name, why in attention.axioms() if why]
    assert failed and all("fails at x = " in why for _, why in failed)
    report = Report(str(fresh))
    attention._axioms_hold.cache_clear()
    obligations_of(fresh, report, "algebra")
    assert [ok for name, ok, _ in report.checks if name.startswith("(e) axiom")] == [False] * 2
    attention._axioms_hold.cache_clear()


def test_fresh_artifact_proves_every_algebra_class(fresh):
    report = verify(fresh, write_proof=False)
    assert report.ok, report.failures()
    classes = {ob.cls for ob, _, _ in report.results}
    assert {"a", "e", "f"} <= classes
    f_layers = {ob.layer for ob, _, _ in report.results if ob.cls == "f"}
    assert f_layers == {-1, 0, 1}
    # identical layers: the (f) queries of layer 1 are layer 0's, one proof each
    keys = [
        {ob.key for ob, _, _ in report.results if (ob.cls, ob.layer) == ("f", n)} for n in (0, 1)
    ]
    assert keys[0] == keys[1]


def test_a_broken_rule_is_rejected_by_class_a_and_restored(fresh, tmp_path):
    """One rule mutant here (the kill-rate test runs them all): the lemma names the rule."""
    with patched_rule(RULE_MUTANTS[0]):
        report = verify(fresh, write_proof=False, cache=tmp_path)
    assert "a" in rejected_by(report)
    assert any(line.startswith("(a) rule gate_up_silu") for line in report.failures())
    assert verify(fresh, write_proof=False, cache=tmp_path).ok


def test_algebra_mutants_name_their_class(fresh, tmp_path):
    """The kill-rate test checks each is rejected by its class; here, that the report says so
    with a confirmed counterexample or a named mismatch."""
    for i, m in enumerate(MUTANTS[:3]):
        dst = tmp_path / f"m{i}"
        assert apply(fresh, dst, m.edit, m.file) is not None
        failures = verify(dst, write_proof=False, cache=tmp_path / "cache").failures()
        named = [line for line in failures if line.startswith(f"({m.cls})")]
        assert named and not any("not confirmed" in line for line in named), (m.name, failures)
