"""A profiled decode step as a per-SM timeline: Chrome trace, PNG, and where the time goes.

Input: the stamps of the profile build (compiler/codegen/kernel.py PROFILE_DOC), one array of
PROF_WORDS u64 per profiled step, with the schedule and fused graph they came from. Everything
here is plain numpy over those arrays, so it runs (and is tested) without a GPU.

Per task, in global-timer nanoseconds: `start` (consumer thread 0 reaches the task), `waited`
(its counter waits hold and the consumers have met), `end` (its signal is issued), and for tasks
that stream weights, the producer warp's `pstart`/`pend` of issuing them, and up to four `marks`
inside the task body (PROFILE_DOC: RMSNorm done, inputs staged, weights consumed, sums reduced;
attention: keys folded, slots merged, warps merged; then the body done, before its signal). The step runs from the first CTA's first
start to the last CTA's last end.

* **wait**: waited - start, by kind and by layer: time a CTA sat on counters.
* **hop**: waited - (latest end of the task's same-step predecessors): how long a finished
  dependency takes to reach its consumer and get it going (report.dependencies).
* **idle**: per CTA, the step's span minus its tasks' spans.
* **phases**: per (layer, kind), bytes over the span from the first `waited` to the last `end`.
* **segments**: per kind, the median time from `waited` to the first mark it reaches, from
  each mark to the next, and from the last to `end` (the epilogue and the signal).
* **critical path** of one layer: from the layer's last-ending task back through, at each task,
  the predecessor that ended last.
"""

from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.ir.fused import FusedGraph, Kind
from compiler.schedule.report import task_bytes
from compiler.schedule.schedule import Schedule

# one colour per kind (PNG and legend); waits are drawn grey
COLOURS: dict[Kind, tuple[int, int, int]] = {
    Kind.EMBED: (140, 86, 75),
    Kind.QKV_ROPE_APPEND: (31, 119, 180),
    Kind.ATTN_PARTIAL: (255, 127, 14),
    Kind.ATTN_MERGE: (188, 189, 34),
    Kind.OPROJ_RESIDUAL: (44, 160, 44),
    Kind.GATE_UP_SILU: (214, 39, 40),
    Kind.DOWN_PARTIAL: (148, 103, 189),
    Kind.DOWN_RESIDUAL: (227, 119, 194),
    Kind.LMHEAD_ARGMAX: (23, 190, 207),
    Kind.ARGMAX_REDUCE: (0, 0, 0),
}
WAIT_GREY = (200, 200, 200)
MARKS = 5  # marks a task body can reach (PROFILE_DOC; the fifth, before the signal, every task)
WORDS = 6 + MARKS  # stamp words per task: PROF_WORDS = NTASKS * WORDS


class ProfileError(ValueError):
    """Stamps that do not describe one complete step of this schedule."""


@dataclass
class Timeline:
    """One profiled step, times in microseconds from the step's start (arrays by task id)."""

    start: np.ndarray
    waited: np.ndarray
    end: np.ndarray
    sm: np.ndarray  # the SM (%smid) each task ran on
    pstart: np.ndarray  # producer: NaN for tasks that stream no weights
    pend: np.ndarray
    cta: np.ndarray  # the queue (CTA) of each task
    span: float  # step time
    marks: np.ndarray  # [tasks, MARKS]: marks inside the body, NaN where not reached

    @classmethod
    def from_stamps(cls, words: np.ndarray, sched: Schedule) -> Timeline:
        n = len(sched.tasks)
        words = np.asarray(words, dtype=np.uint64)
        if words.shape != (n * WORDS,):
            raise ProfileError(f"{words.shape[0]} stamp words for {n} tasks ({WORDS} a task)")
        cons = words[: n * 4].reshape(n, 4)
        if (cons[:, :3] == 0).any():
            missing = int(np.flatnonzero((cons[:, :3] == 0).any(axis=1))[0])
            raise ProfileError(f"task {missing} has no stamp: the step did not run whole")
        t0 = cons[:, 0].min()
        us = lambda a: (a.astype(np.int64) - np.int64(t0)) / 1e3  # noqa: E731
        prod = words[n * 4 : n * 6].reshape(n, 2)
        streamed = prod[:, 0] != 0
        pstart, pend = np.full(n, np.nan), np.full(n, np.nan)
        pstart[streamed], pend[streamed] = us(prod[streamed, 0]), us(prod[streamed, 1])
        cta = np.zeros(n, dtype=np.int64)
        for q, ids in enumerate(sched.queues):
            cta[list(ids)] = q
        end = us(cons[:, 2])
        raw = words[n * 6 :].reshape(n, MARKS)
        marks = np.where(raw != 0, us(raw), np.nan)
        return cls(
            us(cons[:, 0]),
            us(cons[:, 1]),
            end,
            cons[:, 3].astype(np.int64),
            pstart,
            pend,
            cta,
            float(end.max()),
            marks,
        )


def segments(tl: Timeline) -> np.ndarray:
    """[tasks, MARKS + 1]: from `waited` to the first mark reached, from each mark to the next
    reached (at the later mark's column), and from the last to `end` (column MARKS); NaN where a
    mark was not reached."""
    n = len(tl.end)
    out = np.full((n, MARKS + 1), np.nan)
    for i in range(n):
        prev = tl.waited[i]
        for k in range(MARKS):
            if not np.isnan(tl.marks[i, k]):
                out[i, k], prev = tl.marks[i, k] - prev, tl.marks[i, k]
        out[i, MARKS] = tl.end[i] - prev
    return out


def hops(tl: Timeline, sched: Schedule) -> np.ndarray:
    """Per task: waited - the latest end of its same-step predecessors (NaN: none)."""
    latest: dict[int, float] = {}
    for t in sched.tasks:
        latest[t.signal] = max(latest.get(t.signal, -np.inf), float(tl.end[t.id]))
    out = np.full(len(sched.tasks), np.nan)
    for t in sched.tasks:
        ends = [latest[c] for c, _, off in t.waits if off == 0 and c in latest]
        if ends:
            out[t.id] = tl.waited[t.id] - max(ends)
    return out


def critical_path(tl: Timeline, sched: Schedule, layer: int) -> list[int]:
    """Task ids from the first to the last of `layer`'s critical path (see the module doc)."""
    signallers: dict[int, list[int]] = {}
    for t in sched.tasks:
        signallers.setdefault(t.signal, []).append(t.id)
    ids = [t.id for t in sched.tasks if t.layer == layer]
    if not ids:
        return []
    cur = max(ids, key=lambda i: tl.end[i])
    path = [cur]
    while True:
        preds = [p for c, _, off in sched.tasks[cur].waits if off == 0
                 for p in signallers.get(c, ())]  # fmt: skip
        preds = [p for p in preds if sched.tasks[p].layer == layer]
        if not preds:
            break
        cur = max(preds, key=lambda i: tl.end[i])
        path.append(cur)
    return path[::-1]


def _median(a: np.ndarray) -> float:
    a = a[~np.isnan(a)]
    return float(np.median(a)) if a.size else float("nan")


def _rounded(x: float) -> float | None:
    """JSON has no NaN: an unreached segment is None."""
    return None if np.isnan(x) else round(x, 2)


def analyse(
    tls: list[Timeline], fg: FusedGraph, sched: Schedule, kv_len: int, bandwidth: float
) -> dict[str, Any]:
    """Where the time goes, over several profiled steps (medians across steps)."""
    if not tls:
        raise ProfileError("no profiled step")
    kinds = np.array([t.kind.value for t in sched.tasks])
    layers = np.array([t.layer for t in sched.tasks])
    nbytes = task_bytes(fg, sched, kv_len)
    ctas = len(sched.queues)
    span = float(np.median([tl.span for tl in tls]))
    wait = np.median([tl.waited - tl.start for tl in tls], axis=0)
    busy = np.median([tl.end - tl.waited for tl in tls], axis=0)
    hop = np.median([hops(tl, sched) for tl in tls], axis=0)
    seg = np.median([segments(tl) for tl in tls], axis=0)
    by_kind = {}
    for k in dict.fromkeys(kinds):
        m = kinds == k
        by_kind[str(k)] = {
            "tasks": int(m.sum()),
            "wait_us": round(float(wait[m].sum()), 1),
            "busy_us": round(float(busy[m].sum()), 1),
            "median_hop_us": _rounded(_median(hop[m])),
            "median_task_us": round(float(np.median(busy[m])), 2),
            "segments_us": [_rounded(_median(seg[m, k])) for k in range(MARKS + 1)],
        }
    by_layer = {int(lay): round(float(wait[layers == lay].sum()), 1) for lay in sorted(set(layers))}
    tasks_us = float(np.median([(tl.end - tl.start).sum() for tl in tls]))
    tl = tls[len(tls) // 2]
    phases: list[tuple[tuple[int, str], list[int]]] = []  # runs of one (layer, kind)
    for t in sched.tasks:
        key = (t.layer, t.kind.value)
        if not phases or phases[-1][0] != key:
            phases.append((key, []))
        phases[-1][1].append(t.id)
    phase_rows = []
    for key, members in phases:
        ids = np.array(members)
        lo, hi = float(tl.waited[ids].min()), float(tl.end[ids].max())
        b = int(nbytes[ids].sum())
        phase_rows.append({
            "layer": key[0], "kind": key[1], "tasks": len(ids), "bytes": b,
            "start_us": round(lo, 2), "us": round(hi - lo, 2),
            "gbps": round(b / max(hi - lo, 1e-3) / 1e3, 1),
        })  # fmt: skip
    mid = (
        sorted(set(layers[layers >= 0]))[len(set(layers[layers >= 0])) // 2]
        if (layers >= 0).any()
        else -1
    )
    path = critical_path(tl, sched, int(mid))
    h = hops(tl, sched)
    crit = [{
        "task": i, "kind": sched.tasks[i].kind.value, "cta": int(tl.cta[i]),
        "hop_us": None if np.isnan(h[i]) else round(float(h[i]), 2),
        "wait_us": round(float(tl.waited[i] - tl.start[i]), 2),
        "busy_us": round(float(tl.end[i] - tl.waited[i]), 2),
    } for i in path]  # fmt: skip
    total = int(nbytes.sum())
    return {
        "steps": len(tls),
        "step_us": round(span, 2),
        "bytes": total,
        "achieved_tbps": round(total / (span * 1e-6) / 1e12, 3),
        "floor_us": round(total / bandwidth * 1e6, 2),
        "cta_time": {
            "busy": round(float(busy.sum()) / (span * ctas), 4),
            "wait": round(float(wait.sum()) / (span * ctas), 4),
            "idle": round(1 - tasks_us / (span * ctas), 4),
        },
        "by_kind": by_kind,
        "wait_by_layer_us": by_layer,
        "median_hop_us": _rounded(_median(hop)),
        "phases": phase_rows,
        "critical_path": {"layer": int(mid), "tasks": crit,
                          "us": round(float(tl.end[path[-1]] - tl.start[path[0]]), 2) if path else 0.0},
        "timer_resolution_ns": _resolution(tls),
    }  # fmt: skip


def _resolution(tls: list[Timeline]) -> float:
    """The smallest non-zero difference between two stamps (ns): the global timer's tick."""
    vals = np.unique(np.concatenate([np.concatenate([tl.start, tl.waited, tl.end]) for tl in tls]))
    d = np.diff(vals) * 1e3
    d = d[d > 0.5]
    return round(float(d.min()), 1) if d.size else float("nan")


def chrome_trace(tl: Timeline, sched: Schedule) -> dict[str, Any]:
    """Chrome/Perfetto trace JSON: process 0 the consumers (a track per CTA, the wait nested in
    each task), process 1 the producer warps."""
    ev: list[dict[str, Any]] = [
        {"ph": "M", "pid": 0, "name": "process_name", "args": {"name": "consumers (per CTA)"}},
        {"ph": "M", "pid": 1, "name": "process_name", "args": {"name": "producer warps"}},
    ]
    for q in range(len(sched.queues)):
        for pid in (0, 1):
            ev.append({"ph": "M", "pid": pid, "tid": q, "name": "thread_name",
                       "args": {"name": f"CTA {q}"}})  # fmt: skip
    for t in sched.tasks:
        i = t.id
        name = f"{t.kind.value} L{t.layer}" if t.layer >= 0 else t.kind.value
        args = {"task": i, "params": list(t.params), "sm": int(tl.sm[i]),
                "wait_us": round(float(tl.waited[i] - tl.start[i]), 3)}  # fmt: skip
        q = int(tl.cta[i])
        ev.append(
            {
                "ph": "X",
                "pid": 0,
                "tid": q,
                "name": name,
                "cat": t.kind.value,
                "ts": float(tl.start[i]),
                "dur": float(tl.end[i] - tl.start[i]),
                "args": args,
            }
        )
        if tl.waited[i] > tl.start[i]:
            ev.append(
                {
                    "ph": "X",
                    "pid": 0,
                    "tid": q,
                    "name": "wait",
                    "cat": "wait",
                    "ts": float(tl.start[i]),
                    "dur": float(tl.waited[i] - tl.start[i]),
                }
            )
        for k in range(MARKS):
            if not np.isnan(tl.marks[i, k]):
                ev.append({"ph": "i", "s": "t", "pid": 0, "tid": q, "name": f"mark {k}",
                           "cat": "mark", "ts": float(tl.marks[i, k])})  # fmt: skip
        if not np.isnan(tl.pstart[i]):
            ev.append(
                {
                    "ph": "X",
                    "pid": 1,
                    "tid": q,
                    "name": name,
                    "cat": t.kind.value,
                    "ts": float(tl.pstart[i]),
                    "dur": float(tl.pend[i] - tl.pstart[i]),
                }
            )
    return {"traceEvents": ev, "displayTimeUnit": "ns"}


def png(tl: Timeline, sched: Schedule, width: int = 1600, row: int = 4) -> bytes:
    """SM x time as an RGB PNG: a band of `row` pixels per CTA, each task in its kind's colour,
    its counter wait grey, idle white; a legend strip of the kinds' colours at the bottom."""
    ctas = len(sched.queues)
    legend = 12
    h = ctas * row + legend
    img = np.full((h, width, 3), 255, dtype=np.uint8)
    scale = (width - 1) / max(tl.span, 1e-9)
    for t in sched.tasks:
        i, q = t.id, int(tl.cta[t.id])
        y0, y1 = q * row, q * row + row - 1
        a, b, c = (int(v * scale) for v in (tl.start[i], tl.waited[i], tl.end[i]))
        img[y0:y1, a : b + 1] = WAIT_GREY
        img[y0:y1, b : c + 1] = COLOURS[t.kind]
    w = width // len(COLOURS)
    for j, col in enumerate(COLOURS.values()):
        img[h - legend + 2 :, j * w + 2 : (j + 1) * w - 2] = col
    return _encode_png(img)


def _encode_png(img: np.ndarray) -> bytes:
    """Minimal RGB8 PNG encoder (zlib): no imaging library needed on the GPU machine."""
    h, w, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(h))

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    head = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", head)
        + chunk(b"IDAT", zlib.compress(raw, 6))
        + chunk(b"IEND", b"")
    )


def legend() -> str:
    """The PNG's colours, left to right, as text."""
    return (
        "PNG colours, left to right: "
        + ", ".join(f"{k.value} #{r:02x}{g:02x}{b:02x}" for k, (r, g, b) in COLOURS.items())
        + f"; counter waits #{WAIT_GREY[0]:02x}{WAIT_GREY[1]:02x}{WAIT_GREY[2]:02x}, idle white"
    )


def _us(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def summary(a: dict[str, Any]) -> str:
    """`analyse`'s result for a terminal."""
    ct = a["cta_time"]
    lines = [
        f"step {a['step_us']:.1f} us (median of {a['steps']}), {a['bytes'] / 1e9:.3f} GB: "
        f"{a['achieved_tbps']:.2f} TB/s; floor {a['floor_us']:.1f} us",
        f"CTA time: busy {100 * ct['busy']:.1f}%, waiting on counters {100 * ct['wait']:.1f}%, "
        f"idle {100 * ct['idle']:.1f}%; median hop (dependency done -> consumer going) "
        f"{_us(a['median_hop_us'])} us; timer tick {a['timer_resolution_ns']} ns",
        "by kind: tasks, wait us, busy us (summed over CTAs), median hop, median task:",
    ]
    for k, v in a["by_kind"].items():
        lines.append(f"  {k:16} {v['tasks']:6d} {v['wait_us']:10.1f} {v['busy_us']:10.1f} "
                     f"{_us(v['median_hop_us']):>7} {v['median_task_us']:7.2f}")  # fmt: skip
    lines.append(
        "task body, median us: waited > mark 0 > 1 > 2 > 3 > body done > signalled "
        "(PROFILE_DOC; - unreached):"
    )
    for k, v in a["by_kind"].items():
        segs = v.get("segments_us", [])
        lines.append(f"  {k:16} " + " ".join("     -" if x is None else f"{x:6.2f}" for x in segs))
    lay = a["wait_by_layer_us"]
    vals = [v for k, v in lay.items() if int(k) >= 0]
    if vals:
        lines.append(f"wait per layer (summed over CTAs): min {min(vals):.1f}, median "
                     f"{float(np.median(vals)):.1f}, max {max(vals):.1f} us")  # fmt: skip
    mid = [p for p in a["phases"] if p["layer"] == a["critical_path"]["layer"]]
    lines.append(f"phases of layer {a['critical_path']['layer']}: kind, tasks, MB, us, GB/s")
    for p in mid:
        lines.append(f"  {p['kind']:16} {p['tasks']:5d} {p['bytes'] / 1e6:8.2f} {p['us']:8.2f} "
                     f"{p['gbps']:8.1f}")  # fmt: skip
    cp = a["critical_path"]
    lines.append(
        f"critical path of layer {cp['layer']} ({cp['us']:.1f} us): "
        + " > ".join(
            f"{t['kind']}[cta {t['cta']}: hop {t['hop_us']}, wait {t['wait_us']}, run {t['busy_us']}]"
            for t in cp["tasks"]
        )
    )
    return "\n".join(lines)


def dump_trace(tl: Timeline, sched: Schedule) -> str:
    return json.dumps(chrome_trace(tl, sched), separators=(",", ":"))
