"""The farm's driver: run jobs' stages as Ray tasks, storing each result as it arrives.

    plan(...)                      one job per (template, arch), found again if submitted before
    Driver(...).run(job_ids)       each job, in its own thread:

    front (frontend, fuse; CPU, once per model) -> build (schedule, codegen, nvcc; codegen node)
      -> obligations (CPU) -> prove (CPU, batches, retried on worker loss) | bench (GPU node)
      -> publish (signed, into the registry)

A stage that is done in the database is not run again, an obligation proved before (in any job,
by structural key) is not proved again, and every result is written to the database the moment
its task returns: a job interrupted anywhere resumes from what was stored (`jobs`). The driver
holds a lease on each job it runs and renews it every few seconds; `amk-farm submit` of a job
whose owner is alive waits for that owner instead of running it twice.
"""

from __future__ import annotations

import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from operator import itemgetter
from pathlib import Path
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session

import compiler
from amk_farm import jobs, registry
from amk_farm.attest import Verdict
from amk_farm.db import Job
from amk_farm.store import BlobStore
from compiler.schedule.schedule import Options
from compiler.spec import ModelSpec, ShapeTemplate

BATCH_CHARS = 4_000_000  # query text per proof task (about 10 s of Z3), ...
BATCH_MAX = 24  # ... and at most this many obligations
ORDER_SHARDS = 4  # tasks that make the schedule's ordering obligations, by layer
Progress = Callable[[int, str, int, int], None]  # job, what, done, total


class FarmError(Exception):
    """A job could not run or failed: one line saying why."""


@dataclass(frozen=True)
class Target:
    """What one job builds."""

    spec: ModelSpec
    template: ShapeTemplate
    arch: str
    options: Options
    start: dict[str, str]  # stage files given to start from: "graph"/"fused"/"schedule" -> digest
    checkpoint_digest: str | None = None
    weights: str | None = None

    def inputs(self) -> dict[str, Any]:
        """The job row's `options`: everything the driver needs to run the job again."""
        return {
            "spec": self.spec.to_json(),
            "options": self.options.to_json(),
            "start": self.start,
            "checkpoint_digest": self.checkpoint_digest,
            "weights": self.weights,
        }

    @classmethod
    def of(cls, job: Job) -> Target:
        d = job.options
        return cls(
            ModelSpec.from_json(d["spec"]),
            ShapeTemplate.parse(job.template),
            job.arch,
            Options(**d["options"]),
            d.get("start") or {},
            d.get("checkpoint_digest"),
            d.get("weights"),
        )


def plan(engine: Engine, targets: list[Target], model_hash: str) -> list[tuple[int, bool]]:
    """The job of each target: (id, made now?). A target submitted before is its old job."""
    out = []
    for t in targets:
        key = jobs.job_key(
            model_hash,
            str(t.template),
            t.arch,
            compiler.__version__,
            t.options.hash(),
            [f"{k}={v}" for k, v in sorted(t.start.items())] + [t.checkpoint_digest or ""],
        )
        out.append(
            jobs.find_or_create(
                engine,
                key=key,
                model_name=t.spec.name,
                model_hash=model_hash,
                template=str(t.template),
                arch=t.arch,
                options=t.inputs(),
            )
        )
    return out


class Lost(Exception):
    """Another process took the job over (our lease lapsed)."""


class Driver:
    """Runs jobs on the connected Ray cluster (`amk_farm.cluster.connect`)."""

    def __init__(
        self,
        engine: Engine,
        store: BlobStore,
        private_key: Any,
        progress: Progress = lambda *_: None,
    ):
        import ray

        self.engine, self.store, self.key = engine, store, private_key
        self.progress = progress
        self.owner = jobs.owner_id()
        self.cluster = dict(ray.cluster_resources())
        self._front: dict[str, Any] = {}  # spec JSON -> the front task's ref, shared by jobs
        self._lock = threading.Lock()
        self._owned: set[int] = set()
        self._lost: set[int] = set()

    # --- the whole run -----------------------------------------------------------------------

    def run(self, job_ids: list[int]) -> dict[int, str]:
        """Claim and run each job whose owner is not alive; wait for the others to end.
        Returns each job's final status (published, failed; queued: interrupted)."""
        from workers import tasks

        tasks.check_cpu(self.cluster)
        stop = threading.Event()
        beat = threading.Thread(target=self._beat, args=(stop,), daemon=True)
        beat.start()
        threads = [threading.Thread(target=self._one, args=(j,), daemon=True) for j in job_ids]
        try:
            for t in threads:
                t.start()
            for t in threads:
                while t.is_alive():
                    t.join(0.5)
        except BaseException:  # interrupted: give the jobs back so a resubmit resumes at once
            for j in list(self._owned):
                jobs.release(self.engine, j, self.owner)
            raise
        finally:
            stop.set()
        with Session(self.engine) as s:
            return {j: s.get(Job, j).status for j in job_ids}  # type: ignore[union-attr]

    def _beat(self, stop: threading.Event) -> None:
        while not stop.wait(jobs.HEARTBEAT_S):
            for j in list(self._owned):
                try:
                    if not jobs.beat(self.engine, j, self.owner):
                        self._lost.add(j)
                except Exception:  # the database hiccuped: beat again next time, the lease
                    continue  # lasts LEASE_S = 6 heartbeats

    def _one(self, job_id: int) -> None:
        """Run the job if we can claim it, else wait until its owner ends it or dies."""
        while True:
            if jobs.claim(self.engine, job_id, self.owner):
                break
            with Session(self.engine) as s:
                job = s.get(Job, job_id)
                assert job is not None
                if job.status in ("published", "failed") and not jobs.alive(job):
                    return
                self.progress(job_id, f"owned by {job.owner}: waiting", 0, 0)
            time.sleep(jobs.HEARTBEAT_S)
        self._owned.add(job_id)
        try:
            self._drive(job_id)
        except Lost:
            pass
        except Exception as e:  # a stage failed: the job fails, with that stage's message
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            jobs.finish(self.engine, job_id, self.owner, "failed", error=msg)
        finally:
            self._owned.discard(job_id)

    def _check(self, job_id: int) -> None:
        if job_id in self._lost:
            raise Lost()

    def _drive(self, job_id: int) -> None:
        with Session(self.engine) as s:
            job = s.get(Job, job_id)
            assert job is not None
            target = Target.of(job)
        files = self._front_stages(job_id, target)
        self._check(job_id)
        manifest = self._build(job_id, target, files)
        self._check(job_id)
        index = self._obligations(job_id, manifest)
        self._check(job_id)
        bench = self._bench_start(job_id, target, manifest)
        self._prove(job_id, {e["key"]: e["size"] for e in index["obligations"]})
        self._check(job_id)
        bench_digest = self._bench_end(job_id, bench)
        self._publish(job_id, manifest, index, bench_digest)

    # --- stages ----------------------------------------------------------------------------

    def _done(self, job_id: int, name: str) -> str | None:
        row = jobs.stage(self.engine, job_id, name)
        return row.output_digest if row is not None and row.status in ("done", "skipped") else None

    def _front_stages(self, job_id: int, t: Target) -> dict[str, str]:
        from workers import tasks

        if "graph" in t.start:
            for name in ("frontend", "fuse"):
                jobs.stage_end(
                    self.engine, job_id, name, "skipped", error="given: the submitted stage files"
                )
            return t.start
        graph, fused = self._done(job_id, "frontend"), self._done(job_id, "fuse")
        if graph and fused:
            return {"graph": graph, "fused": fused}
        self.progress(job_id, "frontend and fusion", 0, 0)
        jobs.stage_begin(self.engine, job_id, "frontend")
        spec = json.dumps(t.spec.to_json(), sort_keys=True)
        with self._lock:  # one front task per model, whatever the number of jobs
            ref = self._front.get(spec)
            if ref is None:
                ref = tasks.front.options(**tasks.cpu()).remote(self.store.url, t.spec.to_json())
                self._front[spec] = ref
        out = self._get(job_id, "frontend", ref)
        for name, file in (("frontend", "graph"), ("fuse", "fused")):
            jobs.stage_end(
                self.engine,
                job_id,
                name,
                "done",
                digest=out["files"][file],
                node=out["node"],
                seconds=out["timings"][name],
            )
        return dict(out["files"])

    def _get(self, job_id: int, stage: str, ref: Any) -> Any:
        """The task's result; its failure fails the stage (and so the job)."""
        import ray

        try:
            return ray.get(ref)
        except ray.exceptions.RayError as e:
            cause = getattr(e, "cause", None) or e
            msg = str(cause).strip().splitlines()[-1] if str(cause).strip() else type(e).__name__
            jobs.stage_end(self.engine, job_id, stage, "failed", error=msg)
            raise FarmError(f"{stage}: {msg}") from None

    def _build(self, job_id: int, t: Target, files: dict[str, str]) -> str:
        from workers import tasks

        done = self._done(job_id, "nvcc")
        if done:
            return done
        self.progress(job_id, "schedule, codegen, nvcc", 0, 0)
        jobs.stage_begin(self.engine, job_id, "schedule")
        ref = tasks.build.options(**tasks.codegen(self.cluster)).remote(
            self.store.url,
            t.spec.to_json(),
            str(t.template),
            t.arch,
            t.options.to_json(),
            files,
            t.checkpoint_digest,
        )
        out = self._get(job_id, "schedule", ref)
        files = json.loads(self.store.get_bytes(out["manifest"]))["files"]
        made = {  # what each stage made; nvcc: the finished artifact (its manifest)
            "schedule": files.get("schedule.json"),
            "codegen": files.get("kernel.cu"),
            "nvcc": out["manifest"],
        }
        no_cubin = f"kernel.{t.arch}.cubin" not in files
        for name, digest in made.items():
            failed = name == "nvcc" and no_cubin
            jobs.stage_end(
                self.engine,
                job_id,
                name,
                "failed" if failed else "done",
                digest=None if failed else digest,
                node=out["node"],
                seconds=out["timings"].get(name),
                error="; ".join(out["notes"]) if failed else None,
            )
        if no_cubin:  # a farm publishes kernels that run: its codegen nodes must have nvcc
            raise FarmError(f"nvcc on {out['node']}: {'; '.join(out['notes']) or 'no cubin'}")
        return str(out["manifest"])

    def _obligations(self, job_id: int, manifest: str) -> dict[str, Any]:
        """The job's obligation index, made by one task per part (the schedule's ordering
        split by layer over up to ORDER_SHARDS tasks) and merged in order."""
        from verifier.verify import PARTS, merge
        from workers import tasks

        digest = self._done(job_id, "obligations")
        if digest is not None:
            return dict(json.loads(self.store.get_bytes(digest)))
        self.progress(job_id, "making the obligations", 0, 0)
        jobs.stage_begin(self.engine, job_id, "obligations")
        t0 = time.perf_counter()
        n = max(1, min(ORDER_SHARDS, int(self.cluster.get(tasks.SMT, 1))))
        parts = [(p, (k, n)) for p in PARTS for k in range(n if p == "order" else 1)]
        refs = [
            tasks.obligations.options(**tasks.cpu()).remote(self.store.url, manifest, p, share)
            for p, share in parts
        ]
        outs = [self._get(job_id, "obligations", ref) for ref in refs]
        lists: dict[str, list[dict[str, Any]]] = {}
        for (part, _), out in zip(parts, outs, strict=True):  # the ordering's shards in layer order
            lists[part] = sorted(lists.get(part, []) + out["obligations"], key=itemgetter("layer"))
        verifiers = {json.dumps(o["verifier"], sort_keys=True) for o in outs}
        if len(verifiers) != 1:  # one verdict is made by one verifier
            raise FarmError(f"obligations were made by {len(verifiers)} verifier versions")
        index = {
            "manifest": manifest,  # what these are the obligations of
            "verifier": outs[0]["verifier"],
            "obligations": merge(
                [lists[p] for p in PARTS], itemgetter("subject"), itemgetter("key")
            ),
            "checks": list({json.dumps(c): c for o in outs for c in o["checks"]}.values()),
            "skipped": list({json.dumps(c): c for o in outs for c in o["skipped"]}.values()),
        }
        digest = self.store.put_bytes(json.dumps(index, sort_keys=True).encode())
        jobs.add_obligations(self.engine, job_id, index["obligations"])
        jobs.stage_end(
            self.engine,
            job_id,
            "obligations",
            "done",
            digest=digest,
            node=", ".join(sorted({o["node"] for o in outs})),
            seconds=time.perf_counter() - t0,
        )
        return index

    def _prove(self, job_id: int, sizes: dict[str, int]) -> None:
        """Prove what is left, in batches (`sizes`: query characters per structural key)."""
        import ray

        from workers import tasks

        row = jobs.stage(self.engine, job_id, "prove")
        if row is not None and row.status == "done":
            return
        t0 = time.perf_counter()
        jobs.stage_begin(self.engine, job_id, "prove")
        jobs.reuse_proofs(self.engine, job_id)
        left = jobs.todo(self.engine, job_id)
        batches = _batches(left, sizes)
        total, done = len(left), 0
        self.progress(job_id, "proving", done, total)
        slots = max(1, int(self.cluster.get(tasks.SMT, 1)))
        pending: dict[Any, list[str]] = {}
        nodes: set[str] = set()
        while batches or pending:
            while batches and len(pending) < 2 * slots:
                batch = batches.pop(0)
                jobs.mark_running(self.engine, job_id, [k for k, _ in batch])
                ref = tasks.prove.options(**tasks.cpu()).remote(self.store.url, batch)
                pending[ref] = [k for k, _ in batch]
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=1.0)
            self._check(job_id)
            for ref in ready:
                pending.pop(ref)
                results = self._get(job_id, "prove", ref)
                jobs.record(self.engine, job_id, results)
                nodes.update(r["node"] for r in results)
                done += len(results)
                self.progress(job_id, "proving", done, total)
        jobs.stage_end(
            self.engine,
            job_id,
            "prove",
            "done",
            node=", ".join(sorted(nodes)) or None,
            seconds=time.perf_counter() - t0,
        )

    def _bench_start(self, job_id: int, t: Target, manifest: str) -> Any:
        from workers import tasks

        if self._done(job_id, "bench") is not None:
            return None
        card = tasks.accelerator(t.arch, self.cluster)
        if card is None:
            cards = " or ".join(tasks.ACCELERATORS.get(t.arch, ("?",)))
            jobs.stage_end(
                self.engine,
                job_id,
                "bench",
                "skipped",
                error=f"no node with an {cards} GPU in the cluster",
            )
            return None
        jobs.stage_begin(self.engine, job_id, "bench")
        return tasks.bench.options(**tasks.bench_options(card)).remote(
            self.store.url, manifest, t.weights
        )

    def _bench_end(self, job_id: int, ref: Any) -> str | None:
        if ref is None:
            return self._done(job_id, "bench")
        self.progress(job_id, "benchmark", 0, 0)
        out = self._get(job_id, "bench", ref)
        jobs.stage_end(self.engine, job_id, "bench", "done", digest=out["bench"], node=out["node"])
        return str(out["bench"])

    def _publish(
        self, job_id: int, manifest: str, index: dict[str, Any], bench: str | None
    ) -> None:
        from verifier.obligation import name_of
        from verifier.verify import summarize

        rows = jobs.obligation_rows(self.engine, job_id)
        summary = summarize(
            manifest,
            [(c["check"], c["ok"], c["why"]) for c in index["checks"]],
            [(c["check"], c["why"]) for c in index["skipped"]],
            [
                (
                    r.cls,
                    r.layer,
                    "proved" if r.status == "cached" else r.status,
                    r.status == "cached",
                    name_of(r.cls, r.check or "", r.subject or "", r.layer),
                    r.reason or "",
                )
                for r in rows
            ],
            sum(r.solver_seconds or 0.0 for r in rows),
            manifest,
        )
        if not summary["verified"]:
            first = summary["failures"][0] if summary["failures"] else "not verified"
            jobs.stage_end(
                self.engine, job_id, "publish", "skipped", error="not every obligation is proved"
            )
            jobs.finish(self.engine, job_id, self.owner, "failed", error=first, summary=summary)
            return
        verdict = _verdict(manifest, index, summary, rows)
        self.progress(job_id, "publishing", 0, 0)
        t0 = time.perf_counter()
        jobs.stage_begin(self.engine, job_id, "publish")
        with tempfile.TemporaryDirectory(prefix="amk-publish-") as tmp:
            directory = self._assemble(Path(tmp) / "artifact", job_id, manifest, summary, bench)
            try:
                published = registry.publish(
                    directory,
                    engine=self.engine,
                    store=self.store,
                    private_key=self.key,
                    verdict=verdict,
                )
            except registry.RegistryError as e:
                jobs.stage_end(self.engine, job_id, "publish", "failed", error=str(e))
                raise
        jobs.stage_end(
            self.engine,
            job_id,
            "publish",
            "done",
            digest=published.manifest_digest,
            node=jobs.owner_id(),
            seconds=time.perf_counter() - t0,
        )
        summary["published"] = published.to_json()
        jobs.finish(self.engine, job_id, self.owner, "published", summary=summary)

    def _assemble(
        self,
        directory: Path,
        job_id: int,
        manifest: str,
        summary: dict[str, Any],
        bench: str | None,
    ) -> Path:
        """The artifact directory `publish` takes: the build's files, proof/ with one
        certificate per distinct obligation and summary.json, and bench.json if measured."""
        from workers.stages import fetch_artifact

        fetch_artifact(self.store, manifest, directory)
        proof = directory / "proof"
        proof.mkdir()
        for cls, key, cert in jobs.certificates(self.engine, job_id):
            self.store.get_file(cert, proof / f"{cls}-{key[:16]}.json")
        (proof / "summary.json").write_text(json.dumps(summary, indent=2))
        if bench is not None:
            self.store.get_file(bench, directory / registry.BENCH)
        return directory


def _verdict(
    manifest: str, index: dict[str, Any], summary: dict[str, Any], rows: list[Any]
) -> Verdict:
    """The farm's verdict about the artifact `manifest` (see `attest`): of the obligations its
    index (made from that manifest) lists, with the counts of the job's rows; `registry.publish`
    re-checks the certificates in proof/ against the index's keys. An index of another manifest
    is no verdict about this one."""
    if index.get("manifest") != manifest:
        raise FarmError(f"the obligation index is not of the manifest {manifest[:12]}")
    keys = frozenset(e["key"] for e in index["obligations"])
    if {r.structural_key for r in rows} != keys:
        raise FarmError("the job's obligation rows are not those of its index")
    proved = [r for r in rows if r.status in ("proved", "cached")]
    return Verdict(
        manifest_sha256=manifest,
        verifier=dict(index["verifier"]),
        obligations=len(rows),
        proved=len(proved),
        keys=keys,
        proved_by_class=dict(Counter(r.cls for r in proved)),
        checks=len(index["checks"]),
        failures=tuple(summary["failures"]),
        skipped=tuple(c["check"] for c in index["skipped"]),
    )


def _batches(left: dict[str, str], sizes: dict[str, int]) -> list[list[tuple[str, str]]]:
    """Proof tasks: obligations in order of size, largest first, packed up to BATCH_CHARS of
    query text or BATCH_MAX obligations, so that every task is worth scheduling and the long
    ones start first."""
    order = sorted(left, key=lambda k: -sizes.get(k, 0))
    out: list[list[tuple[str, str]]] = []
    chars = 0
    for key in order:
        size = sizes.get(key, 0)
        if not out or chars + size > BATCH_CHARS or len(out[-1]) >= BATCH_MAX:
            out.append([])
            chars = 0
        out[-1].append((key, left[key]))
        chars += size
    return out
