"""The farm end to end, as a user runs it: `amk-farm submit` on the embedded Ray cluster (a real
local cluster started by the command), the registry on SQLite or PostgreSQL, the store in a
directory or on S3, and `pull` of what it published. Processes are really killed: a proof
worker mid-task, and the submitting process itself.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import pytest

from amk_farm import catalog
from compiler.artifact import read_manifest
from compiler.pipeline import compile_model
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate
from verifier import mutate

pytestmark = pytest.mark.slow
AMK = str(Path(sys.executable).parent / "amk-farm")
TEMPLATE, ARCH = "b2-s64", "sm_90a"


def _env(home: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AMK_", "RAY_"))}
    return env | {"AMK_HOME": str(home), "PYTHONUNBUFFERED": "1"} | extra


def amk(env: dict[str, str], *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [AMK, *args], env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


def ok(p: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert p.returncode == 0, f"exit {p.returncode}\n{p.stdout[-3000:]}\n{p.stderr[-3000:]}"
    return p


def _home(tmp_path: Path, name: str = "home", **extra: str) -> dict[str, str]:
    env = _env(tmp_path / name, **extra)
    ok(amk(env, "keys", "init"))
    return env


def _status(env: dict[str, str], job: int) -> dict[str, Any]:
    p = amk(env, "status", str(job), "--json")
    assert p.returncode in (0, 1), p.stderr
    return dict(json.loads(p.stdout))


def _until(what: Callable[[], Any], timeout: float, why: str) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        got = what()
        if got:
            return got
        time.sleep(0.2)
    pytest.fail(f"timed out after {timeout:.0f}s waiting for {why}")


def _processes(title: str) -> list[int]:
    """Pids whose command line starts with `title` (Ray names a busy worker `ray::<task>`)."""
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmd = (entry / "cmdline").read_bytes().split(b"\0")[0].decode()
            except OSError:
                continue
            if cmd.startswith(title):
                out.append(int(entry.name))
    return out


def _assert_complete(snap: dict[str, Any]) -> None:
    """Published, every obligation recorded exactly once and proved (or its proof reused)."""
    assert snap["status"] == "published", snap
    counts = snap["obligations"]
    assert counts["failed"] == counts["running"] == counts["pending"] == 0, counts
    assert counts["proved"] > 0


@pytest.fixture(params=["sqlite-local", "postgresql-s3"])
def registry_env(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, str]:
    """A user's environment: a fresh home with a signing key, on SQLite with a store directory,
    or on PostgreSQL with an S3 bucket (moto's server on loopback)."""
    if request.param == "sqlite-local":
        return _home(tmp_path)
    endpoint = request.getfixturevalue("s3_endpoint")
    s3 = {
        "AMK_DB_URL": request.getfixturevalue("pg_database"),
        "AMK_STORE_URL": "s3://amk-farm-test/run",
        "AMK_S3_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        aws_access_key_id="testing",
        aws_secret_access_key="testing",
    ).create_bucket(Bucket="amk-farm-test")
    return _home(tmp_path, **s3)


def test_submit_proves_publishes_and_pull_gets_it(registry_env: dict[str, str], tmp_path: Path):
    env = registry_env
    p = ok(amk(env, "submit", "tiny-llama", "-t", TEMPLATE, "--wait", "--json"))
    (snap,) = json.loads(p.stdout)["jobs"]
    _assert_complete(snap)
    stages = {s["stage"]: s for s in snap["stages"]}
    for name in ("frontend", "fuse", "schedule", "codegen", "nvcc", "obligations", "prove"):
        assert stages[name]["status"] == "done" and stages[name]["node"], stages[name]
    assert stages["bench"]["status"] == "skipped"
    assert "no node with an H100 or H200" in stages["bench"]["note"]
    assert stages["publish"]["status"] == "done"
    assert snap["summary"]["verified"] and snap["summary"]["failures"] == []

    out = tmp_path / "pulled"
    ok(amk(env, "pull", "tiny-llama", "-t", TEMPLATE, "--arch", ARCH, "-o", str(out)))
    manifest = read_manifest(out)
    assert manifest.template == TEMPLATE and (out / f"kernel.{ARCH}.cubin").is_file()
    summary = json.loads((out / "proof" / "summary.json").read_text())
    assert summary["verified"] and summary["obligations"] == sum(snap["obligations"].values())

    again = ok(amk(env, "submit", "tiny-llama", "-t", TEMPLATE, "--wait", "--json"))
    assert json.loads(again.stdout)["jobs"][0]["job"] == snap["job"]  # one job, not two
    assert "submitted before" in again.stderr
    assert "already published" in json.loads(again.stdout)["note"]
    assert len(json.loads(ok(amk(env, "status", "--json")).stdout)) == 1


def test_submit_without_wait_runs_two_templates_in_the_background(tmp_path: Path):
    env = _home(tmp_path)
    p = ok(amk(env, "submit", "tiny-llama", "-t", "b1-s64", "-t", "b4-s64", "--json"))
    first, second = json.loads(p.stdout)["jobs"]
    assert "background" in json.loads(p.stdout)["note"]
    for snap in (first, second):
        watched = ok(amk(env, "status", str(snap["job"]), "--watch", "--interval", "0.5", "--json"))
        _assert_complete(json.loads(watched.stdout))
    listed = json.loads(ok(amk(env, "list", "--json")).stdout)
    assert sorted(a["template"] for a in listed) == ["b1-s64", "b4-s64"]


def test_a_failing_obligation_fails_the_job_and_nothing_is_published(tmp_path: Path):
    env = _home(tmp_path)
    good = tmp_path / "good"
    shape = ShapeTemplate.parse(TEMPLATE)
    compile_model(
        catalog.resolve("tiny-llama"), shape, ARCH, good, Options.for_target(ARCH, shape.batch)
    )
    bug = next(m for m in mutate.full_catalog() if m.name == "residual waits dropped")
    assert mutate.apply(good, tmp_path / "bad", bug.edit) is not None

    p = amk(
        env,
        "submit",
        "tiny-llama",
        "--from",
        str(tmp_path / "bad" / "schedule.json"),
        "-t",
        TEMPLATE,
        "--wait",
        "--json",
    )
    assert p.returncode == 1, p.stderr
    (snap,) = json.loads(p.stdout)["jobs"]
    assert snap["status"] == "failed" and snap["error"].startswith("(c)")
    assert p.stderr.strip().splitlines()[-1].startswith(f"error: job {snap['job']} failed: (c)")
    assert snap["obligations"]["failed"] > 0
    failure = snap["failures"][0]
    assert failure["obligation"].startswith("(c)") and failure["counterexample"]
    assert {s["stage"]: s["status"] for s in snap["stages"]}["publish"] == "skipped"
    assert json.loads(ok(amk(env, "list", "--json")).stdout) == []
    shown = amk(env, "status", str(snap["job"]))
    assert (
        shown.returncode == 1 and "FAILED (c)" in shown.stdout and "counterexample" in shown.stdout
    )


def test_a_proof_worker_killed_mid_task_is_retried_and_each_result_recorded_once(tmp_path: Path):
    env = _home(tmp_path)
    sub = subprocess.Popen(
        [AMK, "submit", "llama-3.2-1b", "-t", "b1-s256", "--wait", "--json"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        victim = _until(lambda: _processes("ray::prove"), 300, "a proof task to run")[0]
        solvers = _until(lambda: _solvers_of(victim), 60, "the task's solver process")
        os.kill(victim, signal.SIGKILL)
        out, errs = sub.communicate(timeout=600)
    finally:
        sub.kill()
    assert not [p for p in solvers if _alive(p)], "a solver outlived its proof worker"
    assert sub.returncode == 0, errs[-3000:]
    assert "worker died or was killed while executing a task" in errs  # Ray's word for it
    (snap,) = json.loads(out)["jobs"]
    _assert_complete(snap)
    _assert_one_proof_per_key(env, snap["job"])


def _solvers_of(pid: int) -> list[int]:
    """The solver processes (`verifier.solvers`) among `pid`'s children."""
    kids = []
    for f in Path(f"/proc/{pid}/task").glob("*/children"):
        try:
            kids += [int(k) for k in f.read_text().split()]
        except OSError:  # the thread or the process is gone
            continue
    return [k for k in kids if b"verifier.solvers" in _cmdline(k)]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _alive(pid: int) -> bool:
    """Running, not a zombie (a dead child its new parent has not reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def _assert_one_proof_per_key(env: dict[str, str], job: int) -> None:
    """No obligation row twice, and for each structural key exactly one row was solved."""
    from sqlalchemy import create_engine, text

    url = env.get("AMK_DB_URL") or f"sqlite:///{env['AMK_HOME']}/registry.db"
    eng = create_engine(url)
    with eng.connect() as c:
        rows = c.execute(
            text("SELECT ordinal, structural_key, status FROM obligations WHERE job_id = :j"),
            {"j": job},
        ).all()
    eng.dispose()
    ordinals = [r[0] for r in rows]
    assert sorted(ordinals) == list(range(len(rows)))
    solved: dict[str, int] = {}
    for _, key, status in rows:
        solved[key] = solved.get(key, 0) + (status == "proved")
    assert set(solved.values()) == {1}, "a key proved twice or never"


def test_a_killed_submitter_is_resumed_without_proving_anything_twice(tmp_path: Path):
    env = _home(tmp_path)
    argv = [AMK, "submit", "llama-3.2-1b", "-t", "b1-s256", "--wait", "--json"]
    sub = subprocess.Popen(
        argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )

    def proved() -> Any:
        p = amk(env, "status", "--json")
        jobs = json.loads(p.stdout) if p.returncode == 0 else []
        return jobs and jobs[0]["obligations"]["proved"] > 0 and jobs[0]

    try:
        job = _until(proved, 300, "the first proofs")["job"]
    finally:
        os.killpg(sub.pid, signal.SIGKILL)  # the submitter and the Ray cluster it started
        sub.wait()
    before = _proofs(env, job)
    assert before and _status(env, job)["status"] != "published"

    p = ok(amk(env, *argv[1:]))
    assert "submitted before" in p.stderr
    (snap,) = json.loads(p.stdout)["jobs"]
    _assert_complete(snap)
    after = _proofs(env, job)
    assert {k: after[k] for k in before} == before  # nothing proved before was proved again
    _assert_one_proof_per_key(env, job)


def _proofs(env: dict[str, str], job: int) -> dict[int, tuple[Any, ...]]:
    """Each solved obligation: when it finished and its certificate."""
    from sqlalchemy import create_engine, text

    eng = create_engine(f"sqlite:///{env['AMK_HOME']}/registry.db")
    with eng.connect() as c:
        rows = c.execute(
            text(
                "SELECT ordinal, finished, certificate_digest, solver_seconds FROM obligations "
                "WHERE job_id = :j AND status = 'proved'"
            ),
            {"j": job},
        ).all()
    eng.dispose()
    return {r[0]: tuple(r[1:]) for r in rows}


def test_submit_without_a_signing_key_refuses_before_any_work(tmp_path: Path):
    env = _env(tmp_path / "home")
    p = amk(env, "submit", "tiny-llama", "--wait")
    assert p.returncode == 1
    assert p.stderr.strip().splitlines()[-1].startswith("error: no signing key at ")
    assert "amk-farm keys init" in p.stderr
    assert json.loads(ok(amk(env, "status", "--json")).stdout) == []  # no job was made


def test_status_of_an_unknown_job_is_one_line_error(tmp_path: Path):
    p = amk(_env(tmp_path / "home"), "status", "7")
    assert p.returncode == 1 and p.stderr.strip() == "error: no job 7 in the registry"


def test_a_codegen_node_without_nvcc_fails_the_job(tmp_path: Path):
    """A farm publishes kernels that run: an artifact without its cubin is a failed build."""
    path = os.pathsep.join(
        d for d in os.environ["PATH"].split(os.pathsep) if not (Path(d) / "nvcc").exists()
    )
    env = _home(tmp_path) | {"PATH": path}
    p = amk(env, "submit", "tiny-llama", "-t", TEMPLATE, "--wait", "--json")
    assert p.returncode == 1, p.stderr
    (snap,) = json.loads(p.stdout)["jobs"]
    assert snap["status"] == "failed" and "nvcc not found" in snap["error"]
    assert {s["stage"]: s["status"] for s in snap["stages"]}["nvcc"] == "failed"
    assert json.loads(ok(amk(env, "list", "--json")).stdout) == []
