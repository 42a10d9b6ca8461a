"""Bounded solver time and no process left behind (`verifier.solvers`, `verifier.solve`).

The stuck case is a real one: an artifact whose fused.json has RoPE frequencies of the wrong
theta (500000 instead of 10000). Some of its (f) queries for the K cache keep Z3's nonlinear
arithmetic busy for over 15 minutes, while its rlimit counter barely moves; here each query
gets a wall-clock budget of a few seconds and must end, failed, saying which budget ended it.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from amk_farm import catalog
from amk_farm.cli import app
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier.obligation import Obligation
from verifier.solve import judge, prove_all
from verifier.solvers import Solvers
from verifier.verify import Report, verify

ROOT = Path(__file__).resolve().parent.parent
BUDGET = 2.0  # seconds per query in these tests


@pytest.fixture(scope="module")
def stuck(tmp_path_factory) -> Path:
    """tiny-llama b1-s64 with a wrong RoPE theta in fused.json, and no cubin (the provenance
    check is skipped, which keeps the runs below short)."""
    root = tmp_path_factory.mktemp("budget")
    fresh, out = root / "fresh", root / "stuck"
    spec, shape = catalog.resolve("tiny-llama"), ShapeTemplate.parse("b1-s64")
    compile_model(spec, shape, "sm_90a", fresh, Options.for_target("sm_90a", 2))
    shutil.copytree(fresh, out, ignore=shutil.ignore_patterns("proof", "*.cubin"))
    doc = json.loads((out / "fused.json").read_text())
    freq = next(b for b in doc["buffers"] if b["name"] == "rope_inv_freq")
    d = 2 * len(freq["value"])
    freq["value"] = [500000.0 ** (-2 * i / d) for i in range(d // 2)]
    (out / "fused.json").write_text(json.dumps(doc))
    return out


@pytest.fixture(scope="module")
def report(stuck) -> tuple[Report, float]:
    t0 = time.monotonic()
    got = verify(stuck, jobs=2, seconds=BUDGET, write_proof=False)
    return got, time.monotonic() - t0


def timed_out(report: Report) -> list[tuple[Obligation, object]]:
    return [(ob, r) for ob, r, _ in report.results if r.limit.startswith("wall clock")]


def stuck_query(report: Report) -> Obligation:
    """The query that ran for over 15 minutes (and over 100 s in a solver of its own, with no
    other work on the machine): layer 0's K cache for the rotated half of the head."""
    return next(ob for ob, _ in timed_out(report) if "(not (< d 32))" in ob.check and not ob.layer)


def test_a_query_stuck_in_nonlinear_arithmetic_ends_by_the_wall_clock(report):
    got, seconds = report
    assert not got.ok
    stopped = timed_out(got)
    assert stopped, got.failures()
    for ob, r in stopped:
        assert r.status == "unknown" and r.limit == "wall clock"  # Z3 honoured its timeout
        assert f"wall-clock budget of {BUDGET:.0f}s spent" in r.reason
        assert r.rlimit_used < ob.rlimit  # the rlimit alone would not have stopped it
        assert r.seconds < BUDGET + 1
    assert stuck_query(got) in [ob for ob, _ in stopped]
    assert any("wall-clock budget" in line for line in got.failures())
    assert seconds < 90, seconds  # unbounded, it ran for over 15 minutes


def test_a_solver_that_ignores_its_timeout_is_killed_at_its_deadline(report):
    """Z3 does not poll its timeout everywhere: the child is then killed. Here the deadline
    comes (grace -29 s) long before Z3's own timeout (30 s), as if Z3 ignored it."""
    ob = stuck_query(report[0])
    t0 = time.monotonic()
    with Solvers(1, lambda _: 30.0, grace=-29.0) as pool:
        ((_, answer),) = pool.map([ob])
        children = pool._idle + pool._busy
    assert time.monotonic() - t0 < 10
    assert answer["answer"] == "killed" and children == []  # the killed child is not reused
    result = judge(ob, answer, 30.0)
    assert result.status == "unknown" and result.limit == "wall clock, killed"
    assert "Z3 ignored its timeout and was killed" in result.reason


def test_a_solver_that_dies_fails_its_query_and_the_next_gets_a_fresh_one(report):
    import threading

    ob = stuck_query(report[0])
    fine = next(o for o, r, _ in report[0].results if r.proved)
    with Solvers(1, lambda _: 30.0) as pool:
        threading.Timer(1.0, lambda: os.kill(pool._busy[0].proc.pid, signal.SIGKILL)).start()
        got = list(pool.map([ob, fine]))
    assert [o.key for o, _ in got] == [ob.key, fine.key]
    died = judge(ob, got[0][1], 30.0)
    assert died.status == "unknown" and "the solver process died (exit code -9)" in died.reason
    assert judge(fine, got[1][1], 30.0).proved


def test_proofs_spend_the_same_rlimit_under_any_wall_clock(report):
    """The rlimit decides proofs: the wall clock changes no proved query's work."""
    proved = [(ob, r) for ob, r, _ in report[0].results if r.proved][:30]
    assert len(proved) == 30
    again = {ob.key: r for ob, r in prove_all([ob for ob, _ in proved], 2, seconds=1000.0)}
    assert [again[ob.key].rlimit_used for ob, _ in proved] == [r.rlimit_used for _, r in proved]
    assert all(again[ob.key].proved for ob, _ in proved)
    for ob, r in proved[:5]:  # and the same as Z3 with no timeout at all, in this process
        assert r.rlimit_used == _used_without_timeout(ob)


def _used_without_timeout(ob: Obligation) -> int:
    import z3

    used = 0
    for text in (ob.assumptions, ob.assumptions + ob.goal):
        ctx = z3.Context()
        s = z3.Solver(ctx=ctx)
        s.set("rlimit", ob.rlimit)
        s.add(z3.parse_smt2_string(text, ctx=ctx))
        assert s.check() == (z3.sat if text == ob.assumptions else z3.unsat)
        used += int(s.statistics().get_key_value("rlimit count"))
    return used


def _solvers_under(pid: int) -> list[int]:
    """Solver processes among the children of `pid` (from /proc: psutil is not required)."""
    out = []
    for path in Path(f"/proc/{pid}/task").glob("*/children"):
        for child in path.read_text().split():
            try:
                cmd = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if b"verifier.solvers" in cmd:
                out.append(int(child))
    return out


def _running(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state != "Z"  # a zombie runs nothing; its parent (init) reaps it


def _wait_for_solvers(proc: subprocess.Popen[bytes], n: int = 1) -> list[int]:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        found = _solvers_under(proc.pid)
        if len(found) >= n:
            return found
        time.sleep(0.2)
    proc.kill()
    raise AssertionError(f"no solver process started (exit {proc.poll()})")


def _gone(pids: list[int], within: float = 10.0) -> list[int]:
    deadline = time.monotonic() + within
    while time.monotonic() < deadline and any(_running(p) for p in pids):
        time.sleep(0.1)
    return [p for p in pids if _running(p)]


def _env(tmp_path: Path) -> dict[str, str]:
    return os.environ | {"AMK_HOME": str(tmp_path / "home"), "PYTHONPATH": str(ROOT)}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_verify_leaves_no_solver_and_no_proof(stuck, tmp_path, sig):
    art = tmp_path / "art"
    shutil.copytree(stuck, art)
    cmd = [sys.executable, "-m", "amk_farm.cli", "verify", str(art), "--no-cache", "-j", "2"]
    proc = subprocess.Popen(
        [*cmd, "--query-seconds", "600"],
        env=_env(tmp_path),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    solvers = _wait_for_solvers(proc, 2)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + sig, err
    lines = err.decode().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and sig.name in lines[0], lines
    assert _gone(solvers) == []
    assert sorted(p.name for p in art.iterdir()) == sorted(p.name for p in stuck.iterdir())


def test_a_killed_parent_takes_its_solvers_with_it(report, tmp_path):
    """SIGKILL runs no handler: the children die of their parent's death (PR_SET_PDEATHSIG)."""
    ob = stuck_query(report[0])
    (tmp_path / "ob.json").write_text(json.dumps(ob.to_json()))
    script = (
        "import json, sys; from verifier.obligation import Obligation; "
        "from verifier.solve import prove_all; "
        "ob = Obligation.from_json(json.load(open(sys.argv[1]))); "
        "list(prove_all([ob, ob], jobs=2, seconds=600))"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path / "ob.json")], env=_env(tmp_path)
    )
    solvers = _wait_for_solvers(proc, 2)
    proc.kill()
    proc.wait()
    assert _gone(solvers) == []


runner = CliRunner()


@pytest.mark.parametrize("jobs", ["0", "-3", "100000"])
def test_verify_refuses_a_job_count_out_of_bounds(stuck, jobs):
    result = runner.invoke(app, ["verify", str(stuck), "--jobs", jobs])
    assert result.exit_code == 1
    want = ">= 1" if int(jobs) < 1 else "<= "
    assert result.stderr.startswith(f"error: --jobs must be {want}")
    assert result.stderr.count("\n") == 1 and result.stdout == ""


def test_verify_refuses_a_query_budget_out_of_bounds(stuck):
    result = runner.invoke(app, ["verify", str(stuck), "--query-seconds", "0"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --query-seconds must be > 0")
