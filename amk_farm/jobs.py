"""A farm job's state in the registry database: the job row and its owner's lease, its stages,
one row per obligation, and the snapshot `amk-farm status` prints.

Everything a job has done is here (and its files in the blob store), never only in Ray or in
the submitting process: a job is resumed by whoever claims it next, from these rows.

    job_id, new = find_or_create(engine, ...)     the same key is the same job
    if claim(engine, job_id, owner): ...          a live owner's job is not taken
    stage_begin / stage_end                        one row per (job, stage)
    add_obligations / todo / mark_running / record / reuse_proofs
    snapshot(engine, job_id)                       what `status` shows
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import socket
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from typing import Any, cast

from sqlalchemy import CursorResult, Engine, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from amk_farm.db import Job, Model, Obligation, Stage, utcnow

LEASE_S = 30.0  # an owner whose heartbeat is older than this is dead; its job may be taken over
HEARTBEAT_S = 5.0
STAGES = (
    "frontend",
    "fuse",
    "schedule",
    "codegen",
    "nvcc",
    "obligations",
    "prove",
    "bench",
    "publish",
)
OBLIGATION_STATES = ("proved", "cached", "failed", "running", "pending")
DONE = ("proved", "cached")
_IN_CHUNK = 500  # keys per IN (...) list


def _changed(result: Any) -> int:
    """Rows an UPDATE changed."""
    return cast(CursorResult[Any], result).rowcount


def owner_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def job_key(
    model_hash: str,
    template: str,
    arch: str,
    compiler_version: str,
    options_hash: str,
    start: Sequence[str] = (),
) -> str:
    """The build a job makes: submitting the same key again is the same job."""
    text = json.dumps([model_hash, template, arch, compiler_version, options_hash, list(start)])
    return hashlib.sha256(text.encode()).hexdigest()


def find_or_create(
    engine: Engine,
    *,
    key: str,
    model_name: str,
    model_hash: str,
    template: str,
    arch: str,
    options: dict[str, Any],
) -> tuple[int, bool]:
    """The job of `key`: (id, True) if this call made it, (id, False) if it was there."""
    with Session(engine) as s:
        found = s.scalar(select(Job.id).where(Job.key == key))
        if found is not None:
            return found, False
    try:
        with Session(engine) as s, s.begin():
            model = s.scalar(
                select(Model).where(Model.name == model_name, Model.model_hash == model_hash)
            )
            if model is None:
                model = Model(name=model_name, model_hash=model_hash)
                s.add(model)
            job = Job(key=key, model=model, template=template, arch=arch, options=options)
            s.add(job)
            s.flush()
            return job.id, True
    except IntegrityError:  # a concurrent submitter made it (or the model row) first
        with Session(engine) as s:
            found = s.scalar(select(Job.id).where(Job.key == key))
        if found is None:
            return find_or_create(
                engine,
                key=key,
                model_name=model_name,
                model_hash=model_hash,
                template=template,
                arch=arch,
                options=options,
            )
        return found, False


def _aware(t: dt.datetime | None) -> dt.datetime | None:
    return t.replace(tzinfo=dt.UTC) if t is not None and t.tzinfo is None else t


def alive(job: Job, now: dt.datetime | None = None) -> bool:
    """Whether `job` has an owner whose heartbeat is fresh (and, on this host, whose process
    still exists: a killed owner here is known dead at once, elsewhere after LEASE_S)."""
    beat = _aware(job.heartbeat)
    if job.owner is None or beat is None:
        return False
    host, _, pid = job.owner.rpartition(":")
    if host == socket.gethostname() and pid.isdigit() and not _running(int(pid)):
        return False
    return ((now or utcnow()) - beat).total_seconds() < LEASE_S


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: it exists
        return True
    return True


def claim(engine: Engine, job_id: int, owner: str) -> bool:
    """Become the owner of a job that is not published and has no live owner (or is ours)."""
    with Session(engine) as s, s.begin():
        job = s.get(Job, job_id)
        if job is None or job.status == "published":
            return False
        if job.owner != owner and alive(job):
            return False
        same_owner = Job.owner.is_(None) if job.owner is None else Job.owner == job.owner
        same_beat = (
            Job.heartbeat.is_(None) if job.heartbeat is None else Job.heartbeat == job.heartbeat
        )
        got = s.execute(  # only if nobody claimed it since we looked
            update(Job)
            .where(Job.id == job_id, same_owner, same_beat)
            .values(owner=owner, heartbeat=utcnow(), status="running", error=None, finished=None)
        )
        return _changed(got) == 1


def beat(engine: Engine, job_id: int, owner: str) -> bool:
    """Renew the lease; False if the job is no longer ours."""
    with Session(engine) as s, s.begin():
        got = s.execute(
            update(Job).where(Job.id == job_id, Job.owner == owner).values(heartbeat=utcnow())
        )
        return _changed(got) == 1


def finish(
    engine: Engine,
    job_id: int,
    owner: str,
    status: str,
    *,
    error: str | None = None,
    summary: dict[str, Any] | None = None,
) -> None:
    """End the job (published or failed) and give up its lease; obligations it had running
    are pending again."""
    with Session(engine) as s, s.begin():
        _unrun(s, job_id)
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.owner == owner)
            .values(
                status=status,
                error=error,
                summary=summary,
                finished=utcnow(),
                owner=None,
                heartbeat=None,
            )
        )


def release(engine: Engine, job_id: int, owner: str) -> None:
    """Give up the lease of an unfinished job (interrupted): the next submitter resumes it."""
    with Session(engine) as s, s.begin():
        _unrun(s, job_id)
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.owner == owner)
            .values(owner=None, heartbeat=None, status="queued")
        )


def _unrun(s: Session, job_id: int) -> None:
    s.execute(
        update(Obligation)
        .where(Obligation.job_id == job_id, Obligation.status == "running")
        .values(status="pending")
    )


# --- stages -------------------------------------------------------------------------------


def stage(engine: Engine, job_id: int, name: str) -> Stage | None:
    with Session(engine, expire_on_commit=False) as s:
        return s.scalar(select(Stage).where(Stage.job_id == job_id, Stage.name == name))


def stage_begin(engine: Engine, job_id: int, name: str) -> None:
    with Session(engine) as s, s.begin():
        row = s.scalar(select(Stage).where(Stage.job_id == job_id, Stage.name == name))
        if row is None:
            row = Stage(job_id=job_id, name=name)
            s.add(row)
        row.status, row.started, row.finished, row.error = "running", utcnow(), None, None


def stage_end(
    engine: Engine,
    job_id: int,
    name: str,
    status: str,
    *,
    digest: str | None = None,
    node: str | None = None,
    seconds: float | None = None,
    error: str | None = None,
) -> None:
    """Record a stage's end: done (with what it stored), failed or skipped (with why)."""
    with Session(engine) as s, s.begin():
        row = s.scalar(select(Stage).where(Stage.job_id == job_id, Stage.name == name))
        if row is None:
            row = Stage(job_id=job_id, name=name, started=utcnow())
            s.add(row)
        row.status, row.finished, row.error = status, utcnow(), error
        row.output_digest, row.node, row.seconds = digest, node, seconds


# --- obligations --------------------------------------------------------------------------


def add_obligations(engine: Engine, job_id: int, index: list[dict[str, Any]]) -> None:
    """One pending row per entry of an obligation index (`workers.stages.obligations`), in one
    transaction; a job that has its rows already is left as it is."""
    with Session(engine) as s, s.begin():
        if s.scalar(select(Obligation.id).where(Obligation.job_id == job_id).limit(1)):
            return
        s.add_all(
            Obligation(
                job_id=job_id,
                ordinal=i,
                layer=e["layer"],
                cls=e["cls"],
                check=e["check"],
                subject=e["subject"],
                status="pending",
                structural_key=e["key"],
                obligation_digest=e["digest"],
            )
            for i, e in enumerate(index)
        )


def todo(engine: Engine, job_id: int) -> dict[str, str]:
    """The obligations left to prove: structural key -> obligation digest (pending, running
    under an owner that died, or failed: a failure is never cached, it is tried again)."""
    with Session(engine) as s:
        rows = s.execute(
            select(Obligation.structural_key, Obligation.obligation_digest)
            .where(Obligation.job_id == job_id, Obligation.status.not_in(DONE))
            .order_by(Obligation.ordinal)
        ).all()
    return {k: d for k, d in rows if d is not None}


def reuse_proofs(engine: Engine, job_id: int) -> int:
    """Mark `cached` every open obligation of the job whose structural key was proved before,
    in any job (the certificate is the earlier proof's). Returns how many were marked."""
    keys = list(todo(engine, job_id))
    marked = 0
    for i in range(0, len(keys), _IN_CHUNK):
        chunk = keys[i : i + _IN_CHUNK]
        with Session(engine) as s, s.begin():
            proofs = {
                k: (cert, secs)
                for k, cert, secs in s.execute(
                    select(
                        Obligation.structural_key,
                        Obligation.certificate_digest,
                        Obligation.solver_seconds,
                    ).where(Obligation.structural_key.in_(chunk), Obligation.status == "proved")
                )
            }
            for key, (cert, _) in proofs.items():
                got = s.execute(
                    update(Obligation)
                    .where(
                        Obligation.job_id == job_id,
                        Obligation.structural_key == key,
                        Obligation.status.not_in(DONE),
                    )
                    .values(status="cached", certificate_digest=cert, finished=utcnow())
                )
                marked += _changed(got)
    return marked


def mark_running(engine: Engine, job_id: int, keys: Iterable[str]) -> None:
    keys = list(keys)
    with Session(engine) as s, s.begin():
        for i in range(0, len(keys), _IN_CHUNK):
            s.execute(
                update(Obligation)
                .where(
                    Obligation.job_id == job_id,
                    Obligation.structural_key.in_(keys[i : i + _IN_CHUNK]),
                    Obligation.status.not_in(DONE),
                )
                .values(status="running")
            )


def record(engine: Engine, job_id: int, results: list[dict[str, Any]]) -> None:
    """Store a proof task's results, in one transaction: for each key, the job's first open
    obligation with it becomes proved (or failed), the others cached (or failed)."""
    with Session(engine) as s, s.begin():
        for r in results:
            res = r["result"]
            rows = s.scalars(
                select(Obligation)
                .where(
                    Obligation.job_id == job_id,
                    Obligation.structural_key == r["key"],
                    Obligation.status.not_in(DONE),
                )
                .order_by(Obligation.ordinal)
            ).all()
            proved = res["status"] == "proved"
            for i, row in enumerate(rows):
                row.status = ("proved" if i == 0 else "cached") if proved else "failed"
                row.certificate_digest = r["certificate"]
                row.solver_seconds = res["seconds"] if i == 0 else None
                row.node = r["node"]
                row.finished = utcnow()
                row.reason = None if proved else res["reason"]
                row.counterexample = None if proved else res["counterexample"]


def certificates(engine: Engine, job_id: int) -> list[tuple[str, str, str]]:
    """(class, structural key, certificate digest) of each distinct proved obligation."""
    with Session(engine) as s:
        rows = s.execute(
            select(Obligation.cls, Obligation.structural_key, Obligation.certificate_digest)
            .where(Obligation.job_id == job_id, Obligation.certificate_digest.is_not(None))
            .order_by(Obligation.ordinal)
        ).all()
    return list({k: (c, k, d) for c, k, d in rows if d}.values())


def obligation_rows(engine: Engine, job_id: int) -> list[Obligation]:
    with Session(engine, expire_on_commit=False) as s:
        return list(
            s.scalars(
                select(Obligation).where(Obligation.job_id == job_id).order_by(Obligation.ordinal)
            )
        )


# --- what `status` shows ------------------------------------------------------------------


def _when(t: dt.datetime | None) -> str | None:
    return _aware(t).isoformat(timespec="seconds") if t is not None else None  # type: ignore[union-attr]


def job_line(job: Job, counts: Counter[str] | None = None) -> dict[str, Any]:
    counts = counts or Counter()
    return {
        "job": job.id,
        "model": job.model.name,
        "model_hash": job.model.model_hash,
        "template": job.template,
        "arch": job.arch,
        "status": job.status,
        "owner": job.owner if alive(job) else None,
        "error": job.error,
        "created": _when(job.created),
        "finished": _when(job.finished),
        "obligations": {k: counts.get(k, 0) for k in OBLIGATION_STATES},
    }


def list_jobs(engine: Engine, limit: int = 20) -> list[dict[str, Any]]:
    """The newest jobs, one line each, with their obligation counts."""
    with Session(engine) as s:
        jobs = s.scalars(select(Job).order_by(Job.id.desc()).limit(limit)).all()
        out = []
        for job in jobs:
            counts: Counter[str] = Counter(
                dict(
                    s.execute(
                        select(Obligation.status, _count())
                        .where(Obligation.job_id == job.id)
                        .group_by(Obligation.status)
                    ).all()
                )
            )
            out.append(job_line(job, counts))
    return out


def _order(stage: str) -> int:
    return STAGES.index(stage) if stage in STAGES else len(STAGES)


def _count() -> Any:
    from sqlalchemy import func

    return func.count(Obligation.id)


def snapshot(engine: Engine, job_id: int, failures: int = 5) -> dict[str, Any] | None:
    """A job with its stages, its obligations counted per layer and state, and its first
    failures (reason and counterexample); None if there is no such job."""
    with Session(engine) as s:
        job = s.get(Job, job_id)
        if job is None:
            return None
        per_layer: dict[int, Counter[str]] = defaultdict(Counter)
        for layer, status, n in s.execute(
            select(Obligation.layer, Obligation.status, _count())
            .where(Obligation.job_id == job_id)
            .group_by(Obligation.layer, Obligation.status)
        ):
            per_layer[layer][status] += n
        total: Counter[str] = sum(per_layer.values(), Counter())
        failed = s.scalars(
            select(Obligation)
            .where(Obligation.job_id == job_id, Obligation.status == "failed")
            .order_by(Obligation.ordinal)
            .limit(failures)
        ).all()
        out = job_line(job, total)
        out["stages"] = [
            {
                "stage": st.name,
                "status": st.status,
                "node": st.node,
                "seconds": round(st.seconds, 2) if st.seconds is not None else None,
                "note": st.error,
            }
            for st in sorted(job.stages, key=lambda st: _order(st.name))
        ]
        out["layers"] = {
            ("global" if layer < 0 else str(layer)): {k: c.get(k, 0) for k in OBLIGATION_STATES}
            for layer, c in sorted(per_layer.items())
        }
        out["failures"] = [
            {
                "obligation": f"({o.cls}) {o.check}: {o.subject}",
                "layer": o.layer,
                "reason": o.reason,
                "counterexample": o.counterexample,
            }
            for o in failed
        ]
        out["summary"] = job.summary
    return out
