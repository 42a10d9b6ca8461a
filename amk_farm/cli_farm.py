"""The farm's commands: `submit` (and the `drive` process it starts), `status`.

Registered on `amk_farm.cli.app`; the same conventions hold: data on stdout, progress and errors
on stderr, `--json`, one line `error: ...` and exit 1 on failure.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from amk_farm import catalog, config
from amk_farm.cli import JsonOpt, _options, _progress, _registry, _user_errors, app, err

DONE_STATES = ("published", "failed")
JOB_ID_MAX = 2**63 - 1  # job ids are SQL BIGINT / SQLite INTEGER


def _signing_key() -> Any:
    from amk_farm import signing

    path = config.load().signing_key
    if not path.is_file():
        raise FileNotFoundError(
            f"no signing key at {path}: run `amk-farm keys init` first (a job publishes signed)"
        )
    return signing.load_private_key(path)


def _start_stages(start: Path, option: list[str] | None) -> dict[str, Any]:
    """The stages a job starts from (`--from`): kind -> loaded stage. A schedule.json carries
    the options it was built with, so --option cannot change them."""
    from compiler.pipeline import load_stage

    stages = load_stage(start)
    if "schedule" in stages and option:
        raise ValueError("--option cannot change a schedule.json's options")
    return stages


@app.command()
@_user_errors
def submit(
    model: Annotated[
        str, typer.Argument(help="Catalog name, alias, or path to an HF config.json.")
    ],
    template: Annotated[
        list[str] | None,
        typer.Option(
            "-t",
            "--template",
            help="Shape template; repeatable (default b1-s4096, or fewer positions if the model "
            "has fewer).",
        ),
    ] = None,
    arch: Annotated[
        list[str] | None,
        typer.Option("--arch", help="CUDA target; repeatable (default sm_90a)."),
    ] = None,
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="HF checkpoint directory: recorded, used to benchmark."),
    ] = None,
    start: Annotated[
        Path | None,
        typer.Option("--from", help="Start from this graph.json, fused.json or schedule.json."),
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", help="Schedule option KEY=VALUE; repeatable.")
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="Run here and wait until every job ends.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Build, prove and publish MODEL on the Ray farm: one job per (template, arch).

    The same job submitted again is the same job: a finished one is reported, an unfinished one
    resumed (or, while its submitter is alive, waited for). Without --wait the jobs run in a
    background process (log in AMK_HOME/logs) and `amk-farm status` follows them."""
    from amk_farm import farm, jobs
    from amk_farm.model_hash import model_hash
    from compiler.limits import check_compile
    from compiler.pipeline import ARCHS
    from compiler.spec import ShapeTemplate

    cfg = config.load()
    spec = catalog.resolve(model)
    shapes = [ShapeTemplate.parse(t) for t in dict.fromkeys(template or [])]
    shapes = shapes or [ShapeTemplate.default(spec)]
    archs = list(dict.fromkeys(arch or ["sm_90a"]))
    for a in archs:
        if a not in ARCHS:
            raise ValueError(f"unsupported arch {a!r} (supported: {', '.join(ARCHS)})")
    for shape in shapes:  # every job within the limits before anything is stored
        for a in archs:
            check_compile(spec, shape, _options(option or [], None, a, shape.batch, spec))
    _signing_key()  # refuse before any work if nothing could be published
    ckpt = None
    if weights is not None:
        from compiler.frontend.checkpoint import Checkpoint, checkpoint_digest

        Checkpoint.open(weights, spec)
        ckpt = checkpoint_digest(weights)
    engine, store = _registry()
    begin = _start_stages(start, option) if start is not None else {}
    files = {k: store.put_bytes(v.dumps().encode()) for k, v in begin.items()}
    given = begin["schedule"].options if "schedule" in begin else None
    targets = [
        farm.Target(
            spec,
            shape,
            a,
            given or _options(option or [], None, a, shape.batch, spec),
            files,
            ckpt,
            str(weights.resolve()) if weights else None,
        )
        for shape in shapes
        for a in archs
    ]
    _progress(f"model hash of {spec.name}")
    planned = farm.plan(engine, targets, model_hash(spec, cfg.home))
    _progress("")
    ids = [j for j, _ in planned]
    for (j, new), t in zip(planned, targets, strict=True):
        print(
            f"job {j}: {spec.name} {t.template} {t.arch} ({'new' if new else 'submitted before'})",
            file=sys.stderr,
        )
    if all(_job_status(engine, j) == "published" for j in ids):
        _print_jobs(engine, ids, as_json, note="already published: nothing to run")
        return
    if not wait:
        log = _detach(ids)
        _print_jobs(engine, ids, as_json, note=f"running in the background; log: {log}")
        return
    _drive(ids)
    _print_jobs(engine, ids, as_json)
    ended = {j: jobs.snapshot(engine, j, failures=0) or {} for j in ids}
    unfinished = {j: e for j, e in ended.items() if e.get("status") != "published"}
    for j, e in unfinished.items():
        why = e.get("error") or "not published"
        print(f"error: job {j} {e.get('status')}: {why}", file=sys.stderr)
    if unfinished:
        raise typer.Exit(1)


def _detach(ids: list[int]) -> Path:
    """Start `amk-farm drive IDS` in its own session, logging to AMK_HOME/logs."""
    logs = config.load().home / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    log = logs / f"jobs-{'-'.join(map(str, ids))}.log"
    code = "from amk_farm.cli import main; main()"
    with log.open("ab") as f:
        subprocess.Popen(
            [sys.executable, "-c", code, "drive", *map(str, ids)],
            stdin=subprocess.DEVNULL,
            stdout=f,
            stderr=f,
            start_new_session=True,
        )
    return log


@app.command(hidden=True)
@_user_errors
def drive(
    job_ids: Annotated[list[int], typer.Argument(help="Jobs to run.", min=1, max=JOB_ID_MAX)],
) -> None:
    """Run existing jobs to their end (what `submit` starts in the background)."""
    _drive(job_ids)


def _drive(ids: list[int]) -> None:
    from amk_farm import cluster, farm, jobs

    key = _signing_key()
    engine, store = _registry()
    for j in ids:
        if jobs.snapshot(engine, j, failures=0) is None:
            raise ValueError(f"no job {j} in the registry")
    # Ray prints its own notices (a worker that died, ...) on stdout: they go to stderr, and
    # the cluster is left before this command prints its result there
    with contextlib.redirect_stdout(sys.stderr):
        try:
            cluster.connect()
            with _Bar() as bar:
                farm.Driver(engine, store, key, progress=bar.update).run(ids)
        finally:
            cluster.disconnect()


class _Bar:
    """Progress on stderr: a bar per job on a terminal, else a line when the stage changes."""

    def __init__(self) -> None:
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

        self.live = err.is_terminal
        self.bars = Progress(
            TextColumn("job {task.fields[job]}: {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            console=err,
            transient=True,
        )
        self.tasks: dict[int, Any] = {}
        self.last: dict[int, tuple[str, int]] = {}

    def __enter__(self) -> _Bar:
        if self.live:
            self.bars.start()
        return self

    def __exit__(self, *_: Any) -> None:
        if self.live:
            self.bars.stop()

    def update(self, job: int, what: str, done: int, total: int) -> None:
        if self.live:
            if job not in self.tasks:
                self.tasks[job] = self.bars.add_task(what, job=job, total=total or None)
            self.bars.update(self.tasks[job], description=what, completed=done, total=total or None)
            return
        step = max(1, total // 10)
        before = self.last.get(job)
        if before is None or before[0] != what or done // step != before[1] // step:
            shown = f" {done}/{total}" if total else ""
            print(f"job {job}: {what}{shown}", file=sys.stderr, flush=True)
            self.last[job] = (what, done)


def _job_status(engine: Any, job_id: int) -> str | None:
    from amk_farm import jobs

    snap = jobs.snapshot(engine, job_id, failures=0)
    return None if snap is None else str(snap["status"])


def _print_jobs(engine: Any, ids: list[int], as_json: bool, note: str = "") -> None:
    from amk_farm import jobs

    snaps = [jobs.snapshot(engine, j) for j in ids]
    if as_json:
        print(json.dumps({"jobs": snaps, "note": note} if note else {"jobs": snaps}, indent=2))
        return
    for snap in snaps:
        assert snap is not None
        print(_render(snap))
    if note:
        print(note, file=sys.stderr)


@app.command()
@_user_errors
def status(
    job: Annotated[
        int | None,
        typer.Argument(help="A job id (default: the newest jobs).", min=1, max=JOB_ID_MAX),
    ] = None,
    watch: Annotated[
        bool,
        typer.Option("--watch", help="Refresh until the job ends or its submitter is gone."),
    ] = False,
    interval: Annotated[
        float, typer.Option("--interval", help="Seconds between refreshes.", min=0.1, max=3600)
    ] = 2.0,
    as_json: JsonOpt = False,
) -> None:
    """A job's stages and its obligations per layer (proved, cached, failed, running, pending),
    read from the registry: it works from any shell, whether or not the submitter still runs.
    Exit 1 if the job failed, or, with --watch, ended any other way than published."""
    from amk_farm import db, jobs

    engine = db.engine(config.load().db_url)
    if job is None:
        rows = jobs.list_jobs(engine)
        if as_json:
            print(json.dumps(rows, indent=2))
        else:
            for r in rows:
                print(_line(r))
        return
    snap = jobs.snapshot(engine, job)
    if snap is None:
        raise ValueError(f"no job {job} in the registry")
    if watch and snap["status"] not in DONE_STATES:
        snap = _watch(engine, job, interval, as_json)
    if as_json:
        print(json.dumps(snap, indent=2))
    else:
        print(_render(snap))
    if snap["status"] == "failed" or (watch and snap["status"] != "published"):
        raise typer.Exit(1)  # watched: 0 only when the job was published


def _watch(engine: Any, job: int, interval: float, as_json: bool) -> dict[str, Any]:
    """Refresh until the job ends, or has had no live submitter for a whole lease (then
    nothing will move it until it is submitted again)."""
    from amk_farm import jobs

    shown = ""
    owned = time.monotonic()
    while True:
        snap = jobs.snapshot(engine, job)
        assert snap is not None
        if snap["owner"]:
            owned = time.monotonic()
        if snap["status"] in DONE_STATES or time.monotonic() - owned > jobs.LEASE_S:
            if err.is_terminal and not as_json:
                err.clear()
            return snap
        text = _render(snap)
        if text != shown and not as_json:
            if err.is_terminal:
                err.clear()
            print(text, file=sys.stderr, flush=True)
            shown = text
        time.sleep(interval)


def _counts(c: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in c.items() if v) or "none"


def _line(r: dict[str, Any]) -> str:
    total = sum(r["obligations"].values())
    done = r["obligations"]["proved"] + r["obligations"]["cached"]
    owner = f"  ({r['owner']})" if r["owner"] else ""
    if r["status"] in ("running", "queued") and not r["owner"]:
        owner = "  (no live submitter: submit it again to resume)"
    return (
        f"job {r['job']:<4} {r['model']:<16} {r['template']:<10} {r['arch']:<7} "
        f"{r['status']:<10} {done}/{total} obligations{owner}"
    )


def _render(snap: dict[str, Any]) -> str:
    """A job as text: its line, its stages, its obligations per run of alike layers."""
    out = [_line(snap)]
    if snap["error"]:
        out.append(f"  error: {snap['error']}")
    for st in snap["stages"]:
        secs = f"{st['seconds']:.1f}s" if st["seconds"] is not None else ""
        note = f"  ({st['note']})" if st["note"] else ""
        out.append(f"  {st['stage']:<12} {st['status']:<8} {secs:>8}  {st['node'] or ''}{note}")
    runs: list[tuple[str, str, dict[str, int]]] = []  # first layer, last layer, counts
    for layer, counts in snap["layers"].items():
        if runs and runs[-1][2] == counts and layer != "global" and runs[-1][1] != "global":
            runs[-1] = (runs[-1][0], layer, counts)
        else:
            runs.append((layer, layer, counts))
    if runs:
        out.append("  obligations:")
    for first, last, counts in runs:
        where = (
            "global"
            if first == "global"
            else (f"layer {first}" if first == last else f"layers {first}-{last} (each)")
        )
        out.append(f"    {where:<22} {_counts(counts)}")
    out += [
        f"  FAILED {f['obligation']}, layer {f['layer']}: {f['reason']}; counterexample "
        f"{json.dumps(f['counterexample'])[:200]}"
        for f in snap["failures"]
    ]
    return "\n".join(out)
