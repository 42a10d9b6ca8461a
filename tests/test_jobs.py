"""A farm job's state in the registry database (`amk_farm.jobs`), on SQLite and PostgreSQL:
one job per key, owner leases, exactly one row per obligation, proofs reused by structural key
across jobs; and how proofs are packed into tasks and routed to nodes."""

from __future__ import annotations

import datetime as dt
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import Engine, update
from sqlalchemy.orm import Session

from amk_farm import db, farm, jobs
from amk_farm.db import Job
from workers import tasks


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_database")
    else:
        url = f"sqlite:///{tmp_path / 'registry.db'}"
    eng = db.engine(url)
    yield eng
    eng.dispose()


def _job(engine: Engine, key: str = "k" * 64, template: str = "b1-s64") -> tuple[int, bool]:
    return jobs.find_or_create(
        engine,
        key=key,
        model_name="tiny-llama",
        model_hash="h" * 64,
        template=template,
        arch="sm_90a",
        options={"spec": {}},
    )


def _index(keys: list[str]) -> list[dict[str, Any]]:
    return [
        {
            "key": k,
            "cls": "c",
            "check": "no deadlock",
            "layer": i,
            "subject": "s",
            "digest": "d" + k,
        }
        for i, k in enumerate(keys)
    ]


def _result(key: str, status: str = "proved") -> dict[str, Any]:
    return {
        "key": key,
        "result": {
            "status": status,
            "reason": "" if status == "proved" else "task 3 reads x before task 1 wrote it",
            "counterexample": {} if status == "proved" else {"t": 3},
            "seconds": 0.5,
        },
        "certificate": "cert-" + key,
        "node": "n1",
    }


def test_the_same_key_is_one_job_even_when_submitted_concurrently(engine: Engine):
    got: list[tuple[int, bool]] = []
    threads = [threading.Thread(target=lambda: got.append(_job(engine))) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({j for j, _ in got}) == 1
    assert sum(new for _, new in got) == 1
    other, new = _job(engine, key="o" * 64, template="b4-s64")
    assert new and other != got[0][0]


def test_a_live_owner_keeps_its_job_and_a_dead_one_loses_it(engine: Engine):
    job, _ = _job(engine)
    assert jobs.claim(engine, job, jobs.owner_id())
    assert jobs.claim(engine, job, jobs.owner_id())  # ours already: claiming again is fine
    assert not jobs.claim(engine, job, "elsewhere:1")  # fresh heartbeat: alive

    with Session(engine) as s, s.begin():  # an owner on another host that stopped beating
        s.execute(
            update(Job)
            .where(Job.id == job)
            .values(owner="elsewhere:1", heartbeat=jobs.utcnow() - dt.timedelta(seconds=60))
        )
    assert jobs.claim(engine, job, jobs.owner_id())

    # an owner on this host whose process is gone is dead at once, heartbeat or not
    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        text=True,
        capture_output=True,
        check=True,
    ).stdout.strip()
    dead = f"{jobs.owner_id().rpartition(':')[0]}:{gone}"
    with Session(engine) as s, s.begin():
        s.execute(update(Job).where(Job.id == job).values(owner=dead, heartbeat=jobs.utcnow()))
    assert jobs.claim(engine, job, "other:2")
    assert not jobs.beat(engine, job, jobs.owner_id())  # no longer ours: our heartbeat says so


def test_a_published_job_is_never_claimed(engine: Engine):
    job, _ = _job(engine)
    assert jobs.claim(engine, job, "a:1")
    jobs.finish(engine, job, "a:1", "published", summary={"verified": True})
    assert not jobs.claim(engine, job, "b:2")
    snap = jobs.snapshot(engine, job)
    assert snap is not None and snap["status"] == "published" and snap["owner"] is None


def test_each_obligation_is_one_row_recorded_once(engine: Engine):
    job, _ = _job(engine)
    jobs.add_obligations(engine, job, _index(["A", "B", "A", "C"]))
    jobs.add_obligations(engine, job, _index(["A", "B", "A", "C"]))  # again: nothing added
    assert jobs.todo(engine, job) == {"A": "dA", "B": "dB", "C": "dC"}

    jobs.mark_running(engine, job, ["A", "B"])
    jobs.record(engine, job, [_result("A"), _result("B", "failed")])
    jobs.record(engine, job, [_result("A")])  # a retried task's duplicate changes nothing
    rows = jobs.obligation_rows(engine, job)
    assert [(r.ordinal, r.structural_key, r.status) for r in rows] == [
        (0, "A", "proved"),
        (1, "B", "failed"),
        (2, "A", "cached"),
        (3, "C", "pending"),
    ]
    assert rows[1].reason and rows[1].counterexample == {"t": 3}
    assert rows[0].solver_seconds == 0.5 and rows[2].solver_seconds is None
    assert set(jobs.todo(engine, job)) == {"B", "C"}  # a failure is tried again, never cached
    assert [k for _, k, _ in jobs.certificates(engine, job)] == ["A", "B"]

    jobs.mark_running(engine, job, ["C"])
    assert jobs.claim(engine, job, "a:1")
    jobs.finish(engine, job, "a:1", "failed", error="(c) ...")  # its running ones are not
    snap = jobs.snapshot(engine, job)
    assert snap is not None
    assert snap["obligations"] == {
        "proved": 1,
        "cached": 1,
        "failed": 1,
        "running": 0,
        "pending": 1,
    }
    assert snap["layers"]["0"]["proved"] == 1 and snap["layers"]["3"]["pending"] == 1
    assert snap["failures"][0]["counterexample"] == {"t": 3}


def test_a_proof_is_reused_by_structural_key_in_another_job(engine: Engine):
    first, _ = _job(engine)
    jobs.add_obligations(engine, first, _index(["A", "B"]))
    jobs.record(engine, first, [_result("A"), _result("B", "failed")])
    second, _ = _job(engine, key="s" * 64, template="b4-s64")
    jobs.add_obligations(engine, second, _index(["B", "A", "A"]))
    assert jobs.reuse_proofs(engine, second) == 2  # both A rows; B failed, so it is not reused
    rows = jobs.obligation_rows(engine, second)
    assert [(r.structural_key, r.status, r.certificate_digest) for r in rows] == [
        ("B", "pending", None),
        ("A", "cached", "cert-A"),
        ("A", "cached", "cert-A"),
    ]


def test_stages_are_one_row_each(engine: Engine):
    job, _ = _job(engine)
    jobs.stage_begin(engine, job, "prove")
    jobs.stage_end(engine, job, "prove", "failed", error="worker lost")
    jobs.stage_begin(engine, job, "prove")
    jobs.stage_end(engine, job, "prove", "done", node="n1", seconds=2.0)
    jobs.stage_end(engine, job, "frontend", "done", digest="g" * 64)
    snap = jobs.snapshot(engine, job)
    assert snap is not None
    assert [(s["stage"], s["status"], s["note"]) for s in snap["stages"]] == [
        ("frontend", "done", None),
        ("prove", "done", None),
    ]


def test_proofs_are_packed_largest_first_within_the_limits():
    sizes = {"huge": farm.BATCH_CHARS * 2, "big": farm.BATCH_CHARS - 10}
    sizes |= {f"s{i}": 100 for i in range(farm.BATCH_MAX + 5)}
    left = {k: "d" + k for k in sizes}
    batches = farm._batches(left, sizes)
    assert [k for k, _ in batches[0]] == ["huge"]
    assert batches[1][0][0] == "big"
    assert all(len(b) <= farm.BATCH_MAX for b in batches)
    assert sorted(k for b in batches for k, _ in b) == sorted(left)
    for b in batches:
        assert len(b) == 1 or sum(sizes[k] for k, _ in b) <= farm.BATCH_CHARS


def test_routing_keeps_cpu_work_to_smt_nodes_and_builds_to_codegen_or_gpu_nodes():
    assert tasks.cpu()["resources"] == {tasks.SMT: 1}
    assert tasks.codegen({"CPU": 4, "codegen": 1})["resources"] == {tasks.CODEGEN: 1}
    assert tasks.codegen({"CPU": 4, "GPU": 1})["num_gpus"] == 1
    with pytest.raises(tasks.RoutingError, match="codegen"):
        tasks.codegen({"CPU": 4, "smt": 4})
    with pytest.raises(tasks.RoutingError, match="smt"):
        tasks.check_cpu({"CPU": 4, "GPU": 1})
    assert tasks.accelerator("sm_90a", {"accelerator_type:H200": 1}) == "H200"
    assert tasks.accelerator("sm_90a", {"accelerator_type:A100": 1}) is None
    assert tasks.accelerator("sm_80", {"accelerator_type:A100": 1}) == "A100"
