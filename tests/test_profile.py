"""The profile build, the schedule report and the timeline analysis, without a GPU.

The timeline tests feed `Timeline.from_stamps` the stamps of a simulated step: every CTA runs its
queue in order, a task's waits end HOP us after the last of its predecessors ends, and each kind
runs a known time. The analysis must give those numbers back.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest

from compiler.codegen.kernel import render_kernel
from compiler.ir.fused import FusedGraph, Kind
from compiler.runtime.timeline import (
    MARKS,
    WORDS,
    ProfileError,
    Timeline,
    analyse,
    chrome_trace,
    critical_path,
    png,
)
from compiler.runtime.timeline import hops as hop_times
from compiler.schedule.report import dependencies, report, task_bytes
from compiler.schedule.schedule import Schedule
from tests.test_codegen import case

HOP = 2.0  # us from a predecessor's end to its consumer's going
RUN = {k: 1.0 + i for i, k in enumerate(Kind)}  # us a task of each kind runs
T0 = 10**12  # a global-timer origin (ns)
# marks the simulated bodies reach, at these fractions of their run (mark 0 unreached in one)
MARKED = {
    Kind.GATE_UP_SILU: {0: 0.25, 1: 0.5, 2: 0.75},
    Kind.ATTN_PARTIAL: {1: 0.5, 3: 0.75, 4: 0.875},
}


@pytest.fixture(scope="module")
def tiny() -> tuple[FusedGraph, Schedule, str]:
    return case("tiny-llama", "b1-s64")


def simulate(sched: Schedule) -> np.ndarray:
    """The profile build's stamp words of one step, simulated (module docstring)."""
    n, ctas = len(sched.tasks), len(sched.queues)
    free = np.zeros(ctas)
    end = np.full(n, np.nan)
    signallers: dict[int, list[int]] = {}
    for t in sched.tasks:
        signallers.setdefault(t.signal, []).append(t.id)
    words = np.zeros(n * WORDS, dtype=np.uint64)
    pos = [0] * ctas
    done = 0
    ns = lambda us: np.uint64(T0 + round(us * 1e3))  # noqa: E731
    while done < n:  # run, on each CTA, the next task whose predecessors have ended
        progressed = False
        for q, ids in enumerate(sched.queues):
            if pos[q] == len(ids):
                continue
            t = sched.tasks[ids[pos[q]]]
            preds = [p for c, _, off in t.waits if off == 0 for p in signallers[c]]
            if any(np.isnan(end[p]) for p in preds):
                continue
            start = free[q]
            waited = max([start, *(end[p] + HOP for p in preds)])
            end[t.id] = waited + RUN[t.kind]
            words[t.id * 4 : t.id * 4 + 4] = [ns(start), ns(waited), ns(end[t.id]), q]
            words[n * 4 + t.id * 2 : n * 4 + t.id * 2 + 2] = [ns(start), ns(start + 0.5)]
            for k, f in MARKED.get(t.kind, {}).items():  # marks at fractions of the body
                words[n * 6 + t.id * MARKS + k] = ns(waited + f * RUN[t.kind])
            free[q] = end[t.id]
            pos[q] += 1
            done += 1
            progressed = True
        assert progressed, "the simulated schedule deadlocked"
    return words


def test_report_counts_the_phases_and_bytes(tiny: tuple[FusedGraph, Schedule, str]) -> None:
    fg, sched, _ = tiny
    r = report(fg, sched, kv_len=32, bandwidth=1e12, hop_us=3.0)
    layers = int(fg.dim("layers"))
    # embed, 7 dependent phases per layer, LM head, argmax
    assert r["phases_per_layer"] == [7]
    assert r["hops"] == 1 + 7 * layers + 2
    assert r["longest_chain"][:3] == ["embed", "qkv_rope_append", "attn_partial"]
    h, i, v = int(fg.dim("hidden")), int(fg.dim("intermediate")), int(fg.dim("vocab"))
    d, hq, kv = int(fg.dim("head_dim")), int(fg.dim("heads")), int(fg.dim("kv_heads"))
    per_layer = 2 * (h * (hq + 2 * kv) * d + hq * d * h + 3 * h * i)
    nbytes = task_bytes(fg, sched, 32)
    matvecs = [t.id for t in sched.tasks if t.kind not in (Kind.EMBED, Kind.ATTN_PARTIAL)]
    assert int(nbytes[matvecs].sum()) == layers * per_layer + 2 * v * h
    attn = [t.id for t in sched.tasks if t.kind == Kind.ATTN_PARTIAL]
    assert int(nbytes[attn].sum()) == layers * kv * 33 * d * 2 * 2  # keys 0..32, K and V
    assert r["predicted_ms"] == pytest.approx(r["phases_ms"] + r["hops"] * 3e-3, abs=1e-4)
    # a phase lasts at least its bytes over the whole bandwidth plus one task's fixed cost
    assert r["phases_ms"] > r["bytes"] / 1e12 * 1e3
    free = report(
        fg, sched, kv_len=32, bandwidth=1e12, hop_us=0.0, task_us=dict.fromkeys(Kind, 0.0)
    )
    assert free["predicted_ms"] >= r["bytes"] / 1e12 * 1e3 - 1e-4


def test_dependencies_refuse_a_cycle(tiny: tuple[FusedGraph, Schedule, str]) -> None:
    _, sched, _ = tiny
    first, second = sched.tasks[0], sched.tasks[1]
    looped = (first.__class__(first.id, first.instr, first.kind, first.layer, first.params,
                              ((second.signal, 1, 0),), first.signal),)  # fmt: skip
    bad = Schedule(sched.template, sched.options, sched.binding, sched.counters,
                   looped + sched.tasks[1:], sched.queues, sched.fused_digest)  # fmt: skip
    with pytest.raises(ValueError, match="cycle"):
        dependencies(bad)


def test_timeline_gives_back_the_simulated_step(tiny: tuple[FusedGraph, Schedule, str]) -> None:
    fg, sched, _ = tiny
    tl = Timeline.from_stamps(simulate(sched), sched)
    h = hop_times(tl, sched)
    # a task's wait ends HOP after its last predecessor, unless its CTA was still busy then
    busy_late = tl.waited == tl.start
    assert np.allclose(h[~np.isnan(h) & ~busy_late], HOP)
    a = analyse([tl, tl], fg, sched, 32, 1e12)
    assert a["step_us"] == pytest.approx(tl.span)
    for k, row in a["by_kind"].items():
        assert row["median_task_us"] == pytest.approx(RUN[Kind(k)])
        segs, run = row["segments_us"], RUN[Kind(k)]
        assert sum(x for x in segs if x is not None) == pytest.approx(run, abs=0.02)  # rounded
        fractions = MARKED.get(Kind(k), {})
        assert [x is not None for x in segs[:MARKS]] == [m in fractions for m in range(MARKS)]
    gate = a["by_kind"]["gate_up_silu"]["segments_us"]
    quarter = 0.25 * RUN[Kind.GATE_UP_SILU]  # waited > 0 > 1 > 2 (3 unreached) > end
    assert gate[3] is None and gate[4] is None
    assert [gate[i] for i in (0, 1, 2, 5)] == pytest.approx([quarter] * 4)
    json.dumps(a, allow_nan=False)  # --json output: no NaN
    ct = a["cta_time"]
    assert ct["busy"] + ct["wait"] + ct["idle"] == pytest.approx(1, abs=1e-3)
    path = critical_path(tl, sched, 1)
    kinds = [sched.tasks[i].kind for i in path]
    assert kinds == [Kind.QKV_ROPE_APPEND, Kind.ATTN_PARTIAL, Kind.ATTN_MERGE,
                     Kind.OPROJ_RESIDUAL, Kind.GATE_UP_SILU, Kind.DOWN_PARTIAL,
                     Kind.DOWN_RESIDUAL]  # fmt: skip
    assert all(sched.tasks[i].layer == 1 for i in path)


def test_trace_and_png(tiny: tuple[FusedGraph, Schedule, str]) -> None:
    _, sched, _ = tiny
    tl = Timeline.from_stamps(simulate(sched), sched)
    ev = chrome_trace(tl, sched)["traceEvents"]
    tasks = [e for e in ev if e["ph"] == "X" and e["pid"] == 0 and e["name"] != "wait"]
    assert len(tasks) == len(sched.tasks)
    assert {e["tid"] for e in tasks} <= set(range(len(sched.queues)))
    json.dumps(ev)  # serializable
    data = png(tl, sched, width=400, row=3)
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", data[16:24])
    assert (w, h) == (400, 3 * len(sched.queues) + 12)
    idat = data.index(b"IDAT")
    (length,) = struct.unpack(">I", data[idat - 4 : idat])
    raw = zlib.decompress(data[idat + 4 : idat + 4 + length])
    assert len(raw) == h * (1 + 3 * w)


def test_missing_stamps_are_refused(tiny: tuple[FusedGraph, Schedule, str]) -> None:
    _, sched, _ = tiny
    words = simulate(sched)
    words[5 * 4 + 2] = 0  # task 5 never ended
    with pytest.raises(ProfileError, match="task 5"):
        Timeline.from_stamps(words, sched)
    with pytest.raises(ProfileError, match="stamp words"):
        Timeline.from_stamps(words[:-1], sched)


def test_profile_build_only_adds_stamps(
    tiny: tuple[FusedGraph, Schedule, str], tmp_path: Path
) -> None:
    fg, sched, plain = tiny
    assert "amk_prof" not in plain and "globaltimer" not in plain
    prof = render_kernel(fg, sched, profile=True)
    marks = re.findall(r"^\s*// @mark (\d)$", plain, re.M)
    assert len(marks) >= 8 and "prof_mark" not in plain
    # + its definition and the entry's mark 4, before each task's signal
    assert prof.count("prof_mark(") == len(marks) + 2 and "amk_prof" in prof
    # the profile build is the plain kernel plus lines: nothing of it is changed or dropped,
    # but for the mark comments, which become the marks
    filled = re.sub(r"^(\s*)// @mark (\d)$", r"\1prof_mark(\2);", plain, flags=re.M)
    it = iter(prof.splitlines())
    assert all(
        any(line == p for p in it) for line in filled.splitlines() if line != "// @profile-defs"
    )
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc not on PATH")
    from compiler.codegen.nvcc import compile_cubin

    src = tmp_path / "kernel.profile.cu"
    src.write_text(prof)
    r = compile_cubin(src, "sm_90a", tmp_path / "kernel.profile.sm_90a.cubin")
    assert r.spills == 0 and r.cubin.stat().st_size > 0


def test_profile_command_refuses_what_is_not_an_artifact(tmp_path: Path) -> None:
    cli = "from amk_farm.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", cli, "profile", str(tmp_path)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [
        f"error: {tmp_path}: not an artifact directory (no manifest.json)"
    ]


def test_compile_json_carries_the_schedule_report(tmp_path: Path) -> None:
    cli = "from amk_farm.cli import main; main()"
    out = tmp_path / "a"
    r = subprocess.run(
        [sys.executable, "-c", cli, "compile", "tiny-llama", "-t", "b1-s64", "-o", str(out),
         "--json"],
        capture_output=True, text=True, env={**os.environ, "PATH": "/nonexistent"},
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    rep = json.loads(r.stdout)["schedule_report"]
    assert rep["hops"] == 17 and rep["phases_per_layer"] == [7]
    assert rep["predicted_ms"] > rep["stream_ms"] > 0


def test_profile_command_keeps_an_existing_trace(tmp_path: Path) -> None:
    (tmp_path / "manifest.json").write_text("{}")
    trace = tmp_path / "t.json"
    trace.write_text("mine")
    cli = "from amk_farm.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", cli, "profile", str(tmp_path), "-o", str(trace)],
                       capture_output=True, text=True)  # fmt: skip
    assert r.returncode == 1 and trace.read_text() == "mine"
    assert r.stderr.strip().splitlines() == [f"error: {trace} exists; use --force to replace it"]
