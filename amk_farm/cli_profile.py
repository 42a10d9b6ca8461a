"""`amk-farm profile`: one artifact's decode step as a per-SM timeline (GPU), and the schedule
report it is read against.

Registered on `amk_farm.cli.app`; the same conventions hold: data on stdout, progress and errors
on stderr, `--json`, one line `error: ...` and exit 1 on failure.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path
from typing import Annotated

import typer

from amk_farm.cli import ForceOpt, JsonOpt, _check_output_file, _user_errors, _write_atomic, app


def _bytes_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.partial")
    tmp.write_bytes(data)
    tmp.replace(path)


@app.command()
@_user_errors
def profile(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (amk-farm compile).")],
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="HF checkpoint directory (default: synthetic weights)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic weights.")] = 0,
    kv: Annotated[int, typer.Option("--kv", help="KV length of the profiled step.")] = 128,
    steps: Annotated[int, typer.Option("--steps", help="Profiled steps (medians over them).")] = 20,
    out: Annotated[
        Path,
        typer.Option("-o", "--out", help="Chrome/Perfetto trace to write; the PNG goes beside it."),
    ] = Path("trace.json"),
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Where one decode step's time goes: an instrumented build of the same kernel records
    global-timer stamps per task; writes a Chrome/Perfetto trace (a track per SM) and a PNG of
    SM x time, and prints waits by kind and layer, idle SMs, bytes per phase against the
    bandwidth, the critical path through one layer, the schedule's prediction and the
    instrumentation's cost."""
    from compiler.artifact import read_manifest
    from compiler.ir.fused import FusedGraph
    from compiler.runtime import timeline
    from compiler.runtime.profile import run
    from compiler.schedule.report import report, summary

    if steps < 1:
        raise ValueError(f"--steps must be >= 1, got {steps}")
    if not (artifact / "manifest.json").is_file():
        raise ValueError(f"{artifact}: not an artifact directory (no manifest.json)")
    if out.suffix != ".json":
        raise ValueError(f"-o {out}: the trace is JSON; name it *.json")
    for path in (out, out.with_suffix(".png")):  # before any GPU work
        _check_output_file(path, force)
    read_manifest(artifact)
    with tempfile.TemporaryDirectory(prefix="amk-profile-") as tmp:
        prof = run(artifact, Path(tmp), weights=weights, seed=seed, kv_len=kv, steps=steps,
                   log=lambda m: print(m, file=sys.stderr))  # fmt: skip
    a = prof.analysis
    fg = FusedGraph.loads((artifact / "fused.json").read_text())
    rep = report(fg, prof.schedule, kv, bandwidth=prof.meta["copy_bandwidth"])
    mid = prof.timelines[len(prof.timelines) // 2]
    png = out.with_suffix(".png")
    _write_atomic(out, timeline.dump_trace(mid, prof.schedule))
    _bytes_atomic(png, timeline.png(mid, prof.schedule))
    result = {
        **prof.meta,
        "kernel_ms": round(prof.plain_ms, 4),
        "profile_build_ms": round(prof.profiled_ms, 4),
        "instrumentation_cost": round(prof.profiled_ms / prof.plain_ms - 1, 4),
        "profile": a,
        "schedule_report": {k: v for k, v in rep.items() if k != "phases"},
        "trace": str(out),
        "png": str(png),
    }
    if as_json:
        print(json.dumps(result, indent=2))
        return
    v = prof.meta["versions"]
    print(f"{prof.meta['model']} {prof.meta['template']} at KV {kv} on {v.get('card', '?')} "
          f"(driver {v.get('driver', '?')}, torch {v.get('torch', '?')})")  # fmt: skip
    print(
        f"kernel {prof.plain_ms:.3f} ms; profile build {prof.profiled_ms:.3f} ms "
        f"({100 * result['instrumentation_cost']:+.1f}%); medians of 100 one-step launches"
    )
    print(timeline.summary(a))
    print("schedule report: " + summary(rep).replace("\n", "\n  "))
    print(f"measured {prof.plain_ms:.3f} ms against predicted {rep['predicted_ms']:.3f} ms")
    print(timeline.legend())
    print(f"wrote {out} (open in ui.perfetto.dev or chrome://tracing) and {png}")
