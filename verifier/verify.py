"""Verify an artifact directory: rebuild the reference, make the obligations, prove them.

    report = verify(Path("out/tiny"), jobs=2, cache=Path("~/.amk-farm/proofs"))

1. Integrity (class i, plain checks, no solver): every file's sha256 is the manifest's (a
   mismatch fails the artifact, but the files are still judged on what they say); the
   graph rebuilt from the manifest's model spec through the frontend has the manifest's model
   hash; schedule.json is for the manifest's shape template; kernel.cu's constants are those
   the manifest implies and the cubin is kernel.cu recompiled (`verifier.provenance`; without
   nvcc that check is skipped, and listed as such).
2. The verifier's own model of the step (`verifier.model`): geometry from the spec, the
   template and the schedule's split symbols; what each task of schedule.json makes the kernel
   touch.
3. Obligations, each a self-contained SMT query: index maps (b, `verifier.index_maps`),
   schedule (c, `verifier.happens_before`) and split reductions (d, `verifier.reductions`) for
   schedule.json and, where it differs, for the task table kernel.cu runs
   (`verifier.kernel_table`); the online-softmax lemmas (e, `verifier.attention`), with a check
   that kernel.cu's softmax functions are the ones they cover; the batch invariance of every
   reduction's split (g, `verifier.batch_invariance`, from kernel.cu's constexprs and
   attn_partial's key range); the KV-cache step invariant and the token handoff between steps
   (h, `verifier.kv_invariant`); each
   fused instruction of fused.json against the rebuilt graph's ops (f, `verifier.algebra`),
   with the graph's attention against the kernel's (e, `verifier.attention_link`); the
   fusion rules on a small model of the family, after their axioms are checked numerically
   (a, `verifier.rules`).
4. Each obligation is looked up in the proof cache by its structural key, else proved
   (`verifier.solve.prove_all`: `jobs` solver processes, each query under its rlimit and a
   wall clock, a stuck one killed); proved results are cached, failures never. The cache checks
   every entry against the query's digest and this verifier's code before it believes it
   (`verifier.cache`).
5. Certificates: `proof/` in the artifact directory, written whole or not at all: one JSON per
   distinct obligation (query text, result, solver version, rlimit used, time; identical layers
   share one) and `summary.json`, which names the sha256 of the manifest it judged (and so,
   through the manifest, every file) and the verifier (`verifier.identity`).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from operator import attrgetter
from pathlib import Path
from typing import Any, TypeVar

from compiler.artifact import MANIFEST, ArtifactError, check_files, read_manifest, sha256_file
from compiler.ir.fused import FusedGraph
from compiler.ir.graph import Graph, IRError
from compiler.schedule.schedule import Schedule
from compiler.spec import ModelSpec, ShapeTemplate
from verifier import (
    algebra,
    attention,
    batch_invariance,
    happens_before,
    identity,
    index_maps,
    kv_invariant,
    provenance,
    reductions,
    rules,
)
from verifier.batch_invariance import ExprError
from verifier.cache import ProofCache
from verifier.determinism import float_atomics
from verifier.device import judge
from verifier.fused_terms import rope_table
from verifier.kernel_table import TableError, read_table, same_tasks
from verifier.model import Geometry, ParamError, Touch, touches
from verifier.obligation import Obligation
from verifier.solve import Result, prove_all


@dataclass
class Report:
    artifact: str
    checks: list[tuple[str, bool, str]] = field(default_factory=list)  # (check, ok, why)
    results: list[tuple[Obligation, Result, bool]] = field(default_factory=list)  # cached?
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (check, why not run here)
    seconds: float = 0.0
    manifest_sha256: str = ""  # of the manifest.json judged ("" if unreadable)

    @property
    def ok(self) -> bool:
        return all(ok for _, ok, _ in self.checks) and all(r.proved for _, r, _ in self.results)

    def failures(self) -> list[str]:
        return _failures(self.checks, self._rows())

    def _rows(self) -> list[Row]:
        return [
            (ob.cls, ob.layer, r.status, cached, ob.name, r.reason)
            for ob, r, cached in self.results
        ]

    def summary(self) -> dict[str, Any]:
        return summarize(
            self.artifact,
            self.checks,
            self.skipped,
            self._rows(),
            self.seconds,
            self.manifest_sha256,
        )


Row = tuple[str, int, str, bool, str, str]  # class, layer, status, cached?, name, reason


def _failures(checks: list[tuple[str, bool, str]], rows: list[Row]) -> list[str]:
    out = [f"{_labelled(name)}: {why}" for name, ok, why in checks if not ok]
    out += [
        f"{name}: {status}: {reason}"
        for _, _, status, _, name, reason in rows
        if status != "proved"
    ]
    return out


def summarize(
    artifact: str,
    checks: list[tuple[str, bool, str]],
    skipped: list[tuple[str, str]],
    rows: list[Row],
    seconds: float,
    manifest_sha256: str,
) -> dict[str, Any]:
    """proof/summary.json: the verdict about the manifest whose sha256 is `manifest_sha256`,
    counts per class and layer, failures, skipped checks, and the verifier that made it.
    `rows` has one (class, layer, status, cached?, name, reason) per obligation."""
    per: dict[str, Counter[str]] = defaultdict(Counter)
    for cls, layer, status, cached, _, _ in rows:
        where = f"{cls} layer {layer}" if layer >= 0 else f"{cls} global"
        per[where][status] += 1
        per[where]["cached"] += cached
    failures = _failures(checks, rows)
    return {
        "artifact": artifact,
        "manifest_sha256": manifest_sha256,
        "verifier": identity(),
        "verified": not failures and bool(manifest_sha256),
        "obligations": len(rows),
        "proved": sum(status == "proved" for _, _, status, _, _, _ in rows),
        "cached": sum(cached for _, _, _, cached, _, _ in rows),
        "checks": [{"check": n, "ok": ok, "why": why} for n, ok, why in checks],
        "by_class_and_layer": {k: dict(v) for k, v in sorted(per.items())},
        "skipped": [{"check": n, "why": why} for n, why in skipped],
        "failures": failures,
        "seconds": round(seconds, 2),
    }


def _labelled(check: str) -> str:
    """A check's name with its class: "(e) ..." as given, else integrity, "(i) ..."."""
    return check if check.startswith("(") else f"(i) {check}"


@functools.lru_cache(maxsize=4)
def _graph(spec_json: str) -> Graph:
    """The graph the frontend builds from a model spec (canonical JSON)."""
    from compiler.frontend.torch_export import graph_from_spec

    return graph_from_spec(ModelSpec.from_json(json.loads(spec_json)))


def _spec_json(spec: ModelSpec) -> str:
    return json.dumps(spec.to_json(), sort_keys=True)


def _integrity(
    directory: Path, report: Report, checks: bool = True
) -> tuple[ModelSpec, ShapeTemplate, Schedule] | None:
    """Read the artifact; with `checks`, also check its hashes, model hash and provenance."""
    try:
        manifest = read_manifest(directory)
        if checks:
            try:  # an edited file is still judged on what it now says
                check_files(directory, manifest)
                report.checks.append(("every file's sha256 is the manifest's", True, ""))
            except ArtifactError as e:
                report.checks.append(("every file's sha256 is the manifest's", False, str(e)))
        spec = ModelSpec.from_json(manifest.spec)
        template = ShapeTemplate.parse(manifest.template)
        sched = Schedule.loads((directory / "schedule.json").read_text())
    except (ArtifactError, OSError, ValueError) as e:
        report.checks.append(("artifact readable and intact", False, str(e).splitlines()[0]))
        return None
    if not checks:
        return spec, template, sched
    digest = _graph(_spec_json(spec)).digest()
    ok = digest == manifest.model_hash
    why = "" if ok else f"rebuilt graph {digest[:12]}, manifest {manifest.model_hash[:12]}"
    report.checks.append(("the model spec rebuilds the manifest's model hash", ok, why))
    ok = str(sched.template) == str(template)
    why = "" if ok else f"schedule for {sched.template}, artifact for {template}"
    report.checks.append(("schedule.json is for the artifact's shape template", ok, why))
    found, skipped = provenance.checks(directory, manifest, spec, template, sched)
    report.checks += found
    report.skipped += skipped
    return spec, template, sched


def _touched(sched: Schedule, g: Geometry, report: Report) -> dict[int, Touch]:
    out: dict[int, Touch] = {}
    bad = []
    for t in sched.tasks:
        try:
            out[t.id] = touches(t.kind, t.layer, t.params, g)
        except ParamError as e:
            bad.append(f"task {t.id}: {e}")
    ids_ok = [t.id for t in sched.tasks] == list(range(len(sched.tasks)))
    queued_ok = sorted(i for q in sched.queues for i in q) == list(range(len(sched.tasks)))
    why = (
        ""
        if ids_ok and queued_ok
        else "task ids out of order"
        if not ids_ok
        else "queues do not hold every task once"
    )
    report.checks.append(
        ("tasks numbered 0..N-1, each queued exactly once", ids_ok and queued_ok, why)
    )
    report.checks.append(("every task's parameters fit its kind", not bad, "; ".join(bad[:3])))
    return out


T = TypeVar("T")
PARTS = ("maps", "order", "algebra", "kernel")
KERNEL_COPY = "kernel.cu: "  # subject prefix of an obligation made for kernel.cu's own table


def obligations_of(
    directory: Path, report: Report, part: str | None = None, shard: tuple[int, int] = (0, 1)
) -> list[Obligation]:
    """The artifact's obligations (integrity checks go into `report`).

    A farm makes them in parts, each on its own worker: `part` is one of PARTS (None: all of
    them, merged), and `shard` = (k, n) splits "order" by layer (l % n == k; k == 0 also holds
    the step-wide queries). The integrity checks are made by part "maps" (and by None); the
    parts' lists joined by `merge` are the whole artifact's list.
    """
    got = _integrity(directory, report if part in (None, "maps") else Report(report.artifact))
    if got is None:
        return []
    spec, template, sched = got
    try:
        g = Geometry.of(spec, template, sched.bound())
    except KeyError as e:
        report.checks.append(("schedule binds P, KS and NT", False, f"missing {e}"))
        return []
    touched = _touched(sched, g, report if part in (None, "maps") else Report(report.artifact))
    made: dict[str, Callable[[], list[Obligation]]] = {
        "maps": lambda: (
            index_maps.obligations(sched, touched, g)
            + reductions.obligations(g)
            + kv_invariant.obligations(sched, touched, g)
        ),
        "order": lambda: happens_before.obligations(sched, touched, g, shard),
        "algebra": lambda: attention.obligations() + _algebra(directory, g, report),
        "kernel": lambda: _kernel_obligations(directory, sched, g, template, report),
    }
    if part is not None:
        return made[part]()
    return merge([made[p]() for p in PARTS])


def merge(
    parts: list[list[T]],
    subject: Callable[[T], str] = attrgetter("subject"),
    key: Callable[[T], str] = attrgetter("key"),
) -> list[T]:
    """Parts joined in order, less each obligation made for kernel.cu's task table that one of
    schedule.json's already is (identical tables make identical queries). Obligations, or
    anything with their `subject` and `key` (the farm's index entries)."""
    every = [ob for obs in parts for ob in obs]
    known = {key(ob) for ob in every if not subject(ob).startswith(KERNEL_COPY)}
    return [ob for ob in every if not (subject(ob).startswith(KERNEL_COPY) and key(ob) in known)]


def _algebra(directory: Path, g: Geometry, report: Report) -> list[Obligation]:
    """(f) each fused instruction against the rebuilt graph's ops, (e) the graph's attention
    against the kernel's, and kernel.cu's RoPE table against fused.json's."""
    name = "(f) fused.json is readable and of this model"
    try:
        fused = FusedGraph.loads((directory / "fused.json").read_text())
        text = (directory / "kernel.cu").read_text()
    except (OSError, IRError) as e:
        report.checks.append((name, False, str(e).splitlines()[0]))
        return []
    graph = _graph(_spec_json(g.spec))
    ok = fused.graph_digest == graph.digest()
    report.checks.append(
        (name, ok, "" if ok else f"fused.json is of graph {fused.graph_digest[:12]}")
    )
    why = rope_table(text, fused)
    report.checks.append(("(f) kernel.cu's RoPE frequencies are fused.json's", not why, why))
    obs, failures = algebra.obligations(graph, fused, g)
    for cls, why in failures:
        report.checks.append((f"({cls}) {why.split(':')[0]}", False, why))
    for axiom, why in rules.axioms():
        report.checks.append((f"(a) axiom {axiom}", not why, why))
    for axiom, why in attention.axioms():
        report.checks.append((f"(e) axiom {axiom}", not why, why))
    lemmas, missed = rules.obligations(g.spec, {i.kind.value for i in fused.instrs})
    for why in missed:
        report.checks.append(("(a) rule lemmas", False, why))
    return obs + lemmas


def _per_schedule(sched: Schedule, touched: dict[int, Touch], g: Geometry) -> list[Obligation]:
    return (
        index_maps.obligations(sched, touched, g)
        + happens_before.obligations(sched, touched, g)
        + reductions.obligations(g)
        + kv_invariant.obligations(sched, touched, g)
    )


def _kernel_obligations(
    directory: Path,
    sched: Schedule,
    g: Geometry,
    template: ShapeTemplate,
    report: Report,
) -> list[Obligation]:
    """The obligations read from kernel.cu's text (g: its reductions' split constants and
    attn_partial's key range; h: its KV append's address; d: with its chunk sizes and key
    range), and those of the schedule it runs (its task
    table), where that differs from schedule.json's. Those made again for kernel.cu carry the
    subject prefix KERNEL_COPY; `merge` drops the ones schedule.json's already are."""
    name = "kernel.cu's task table is schedule.json's"
    try:
        text = (directory / "kernel.cu").read_text()
    except OSError as e:
        report.checks.append((name, False, str(e).splitlines()[0]))
        return []
    own: list[Obligation] = []
    for what, make in (
        (
            "(g) kernel.cu's split constants and key range are readable",
            batch_invariance.obligations,
        ),
        (
            "(h) kernel.cu's KV append store is readable",
            lambda t: [kv_invariant.append_store(t, g)],
        ),
    ):
        try:
            own += make(text)
        except (ExprError, ZeroDivisionError) as e:
            report.checks.append((what, False, str(e) or "a constexpr divides by 0"))
    try:  # (d) with the chunk sizes and the key range kernel.cu computes
        own += [
            replace(ob, subject=f"{KERNEL_COPY}{ob.subject}")
            for ob in reductions.obligations(g, text)
        ]
    except (ExprError, ZeroDivisionError) as e:
        report.checks.append(
            ("(d) kernel.cu's chunk sizes and key range are readable", False, str(e))
        )
    try:
        table = read_table(text, template, sched.options)
    except TableError as e:
        report.checks.append((name, False, str(e).splitlines()[0]))
        return own
    own += _device_code(directory, text, g, report)
    why = attention.reviewed(text)
    report.checks.append(
        ("(e) kernel.cu's softmax functions are the ones the lemmas cover", not why, why)
    )
    why = float_atomics(text)
    report.checks.append(("(g) no floating-point atomics in kernel.cu", not why, why))
    diff = same_tasks(sched, table)
    report.checks.append((name, not diff, diff))
    if not diff:
        return own
    b, s = table.bound()["B"], table.bound()["S"]
    if (b, s) != (template.batch, template.max_seq):
        report.checks.append(
            ("kernel.cu is built for the artifact's shape template", False, f"B={b}, S={s}")
        )
    kg = Geometry.of(g.spec, template, table.bound())
    touched = _touched(table, kg, report)
    obs = _per_schedule(table, touched, kg)
    return own + [replace(ob, subject=f"{KERNEL_COPY}{ob.subject}") for ob in obs]


def _device_code(directory: Path, text: str, g: Geometry, report: Report) -> list[Obligation]:
    """kernel.cu's device code parsed, its counter protocol checked and its task bodies'
    obligations made (`verifier.device.judge`)."""
    try:
        arch = read_manifest(directory).arch
        fused = FusedGraph.loads((directory / "fused.json").read_text())
    except (OSError, ArtifactError, IRError) as e:
        report.checks.append((judge.PARSED, False, str(e).splitlines()[0]))
        return []
    checks, obs = judge.judge(text, arch, fused, g)
    report.checks += checks
    return obs


def _write_proof(directory: Path, report: Report) -> None:
    """proof/ in the artifact directory, replaced whole (a reader never sees a partial one)."""
    tmp = Path(tempfile.mkdtemp(dir=directory, prefix=".proof."))
    try:
        written: set[str] = set()
        for ob, r, cached in report.results:
            if ob.key in written:  # identical layers: one certificate, of the first
                continue
            written.add(ob.key)
            cert = {
                "obligation": ob.to_json(),
                "key": ob.key,
                "result": r.to_json(),
                "cached": cached,
            }
            (tmp / f"{ob.cls}-{ob.key[:16]}.json").write_text(json.dumps(cert))
        (tmp / "summary.json").write_text(json.dumps(report.summary(), indent=2))
        old = directory / "proof"
        if old.exists():
            trash = Path(tempfile.mkdtemp(dir=directory, prefix=".old-proof."))
            old.rename(trash / "proof")
            try:
                tmp.rename(old)
            except BaseException:  # interrupted: the old proof/ goes back
                if not old.exists():
                    (trash / "proof").rename(old)
                    trash.rmdir()
                raise
            shutil.rmtree(trash)
        else:
            tmp.rename(old)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def verify(
    directory: Path,
    jobs: int = 1,
    cache: Path | ProofCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    write_proof: bool = True,
    seconds: float | None = None,
) -> Report:
    """Verify the artifact in `directory` (see the module docstring). `cache`: a ProofCache,
    or a directory for one without a secret; each query within `seconds` on the wall clock
    (None: `verifier.solve.wall_seconds`)."""
    t0 = time.perf_counter()
    report = Report(str(directory))
    if isinstance(cache, Path):
        cache = ProofCache(cache)
    report.manifest_sha256 = _digest(directory / MANIFEST)
    obs = obligations_of(directory, report)
    todo: dict[str, Obligation] = {}
    known: dict[str, tuple[Result, bool]] = {}
    for ob in obs:
        hit = cache.get(ob) if cache is not None else None
        if hit is not None:
            known[ob.key] = (hit, True)
        else:
            todo.setdefault(ob.key, ob)
    total = len({ob.key for ob in obs})  # progress counts distinct queries
    done = total - len(todo)
    if progress:
        progress(done, total)
    for ob, result in prove_all(todo.values(), jobs, seconds):
        known[ob.key] = (result, False)
        if cache is not None:
            cache.put(ob, result)
        done += 1
        if progress:
            progress(done, total)
    report.results = [(ob, *known[ob.key]) for ob in obs]
    report.seconds = time.perf_counter() - t0
    if report.manifest_sha256 and _digest(directory / MANIFEST) != report.manifest_sha256:
        report.checks.append(("manifest.json unchanged while verifying", False, "it changed"))
    if (
        write_proof
        and report.checks
        and all(ok for n, ok, _ in report.checks if n.startswith("artifact"))
    ):
        _write_proof(directory, report)
    return report


def _digest(path: Path) -> str:
    """The file's sha256, or "" if it cannot be read."""
    try:
        return sha256_file(path)
    except OSError:
        return ""
