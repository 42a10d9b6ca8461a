"""What one decode step of a schedule must do, read off schedule.json and fused.json (no GPU).

* **Dependencies.** A task's predecessors in a step are the tasks that signal a counter it waits
  on with step offset 0 (offset -1 waits are on the previous step). `depth` is the length, in
  tasks, of the longest chain that ends at a task; the step's longest chain (`hops`) is the
  number of dependent phases a step pays, each a counter round trip.
* **Bytes.** What a task must read from device memory: its weight rows (rows x K bf16) or, for
  attention, the K and V rows of its partition at the KV length (pos = KV length: its share of
  the visible keys). Activations are a few KiB a phase and are left out.
* **Phases.** Tasks grouped by (layer, kind) in program order, with their bytes and depths.
* **Prediction.** The phases of a step run one after another (each waits on the one before it);
  a phase lasts as long as its busiest CTA, and a task costs a fixed TASK_US of its kind plus its
  bytes at one SM's share of the bandwidth. step = sum over phases of that, plus HOP_US per
  dependent phase (the counter hand-off). It leaves out the weight ring's prefetch across
  phases, so it over-predicts where the ring hides a phase's stream. The constants come from the
  profiles of the v3.1 kernel (`amk-farm profile`, compiler/runtime/NOTES.md "v3.1 profiles").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from compiler.ir.fused import FusedGraph, Kind
from compiler.schedule.regions import Geometry
from compiler.schedule.schedule import Schedule

# H200 (v3.1 profiles): the copy bandwidth; the median hand-off from a finished dependency to its
# consumer going (0.3-0.5 us); and per kind, a task's cost beyond its bytes, the intercept of task
# time against bytes over the row_tile 16/32/64 profiles of smollm2-135m (matvec kinds) or the
# median task time (the kinds that stream no weights)
BANDWIDTH = 4.27e12
HOP_US = 0.35
TASK_US: dict[Kind, float] = {
    Kind.EMBED: 2.0,
    Kind.QKV_ROPE_APPEND: 2.8,
    Kind.ATTN_PARTIAL: 2.2,
    Kind.ATTN_MERGE: 1.1,
    Kind.OPROJ_RESIDUAL: 1.1,
    Kind.GATE_UP_SILU: 1.9,
    Kind.DOWN_PARTIAL: 1.2,
    Kind.DOWN_RESIDUAL: 1.1,
    Kind.LMHEAD_ARGMAX: 3.3,
    Kind.ARGMAX_REDUCE: 1.4,
}


@dataclass(frozen=True)
class Phase:
    layer: int
    kind: Kind
    tasks: int
    bytes: int
    depth_lo: int
    depth_hi: int

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "kind": self.kind.value,
            "tasks": self.tasks,
            "bytes": self.bytes,
            "depths": [self.depth_lo, self.depth_hi],
        }


def task_bytes(fg: FusedGraph, sched: Schedule, kv_len: int) -> np.ndarray:
    """Bytes each task reads from device memory at KV length `kv_len` (int64, by task id)."""
    b = sched.bound()
    bsz, seq, nt, ks = b["B"], b["S"], b["NT"], b["KS"]
    h, i = int(fg.dim("hidden")), int(fg.dim("intermediate"))
    d, heads, vocab = int(fg.dim("head_dim")), int(fg.dim("heads")), int(fg.dim("vocab"))
    cv = -(-vocab // nt)
    g = Geometry.of(fg, b)
    pos = min(kv_len, seq - 1)  # keys 0..kv_len (those of the window), cut as at that pos
    out = np.zeros(len(sched.tasks), dtype=np.int64)
    for t in sched.tasks:
        ps = t.params
        match t.kind:
            case Kind.EMBED:
                n = bsz * (ps[1] - ps[0]) * 2
            case Kind.QKV_ROPE_APPEND:
                n = (ps[1] - ps[0]) * h * 2
            case Kind.ATTN_PARTIAL:
                j0, j1 = g.keys(ps[1], pos)
                n = bsz * (j1 - j0) * d * 2 * 2
            case Kind.OPROJ_RESIDUAL:
                n = (ps[1] - ps[0]) * heads * d * 2
            case Kind.GATE_UP_SILU:
                n = 2 * (ps[1] - ps[0]) * h * 2
            case Kind.DOWN_PARTIAL:
                n = (ps[1] - ps[0]) * (i // ks) * 2
            case Kind.LMHEAD_ARGMAX:
                n = min(cv, vocab - ps[0] * cv) * h * 2
            case _:
                n = 0
        out[t.id] = n
    return out


def dependencies(sched: Schedule) -> tuple[np.ndarray, np.ndarray]:
    """(depth, critical predecessor) per task id: the longest chain of same-step dependencies
    that ends at the task (1 for a task that waits on nothing this step), and the predecessor on
    that chain (-1 if none). A counter's depth is its deepest signaller's."""
    n = len(sched.tasks)
    signallers: dict[int, list[int]] = {}
    for t in sched.tasks:
        signallers.setdefault(t.signal, []).append(t.id)
    depth = np.zeros(n, dtype=np.int64)
    pred = np.full(n, -1, dtype=np.int64)
    waits = {t.id: [c for c, _, off in t.waits if off == 0] for t in sched.tasks}
    # Kahn's order over counters: a task is ready once every signaller of its counters is done
    missing = {t.id: sum(len(signallers.get(c, ())) for c in waits[t.id]) for t in sched.tasks}
    waiters: dict[int, list[int]] = {}
    for tid, cs in waits.items():
        for c in cs:
            waiters.setdefault(c, []).append(tid)
    cdepth: dict[int, tuple[int, int]] = {}  # counter -> (depth, the signaller that has it)
    ready = [tid for tid, m in missing.items() if m == 0]
    seen = 0
    while ready:
        tid = ready.pop()
        seen += 1
        best = (0, -1)
        for c in waits[tid]:
            best = max(best, cdepth.get(c, (0, -1)))
        depth[tid], pred[tid] = best[0] + 1, best[1]
        c = sched.tasks[tid].signal
        cdepth[c] = max(cdepth.get(c, (0, -1)), (int(depth[tid]), tid))
        for w in waiters.get(c, ()):
            missing[w] -= 1
            if missing[w] == 0:
                ready.append(w)
    if seen != n:
        raise ValueError(f"{n - seen} tasks wait on a cycle of same-step dependencies")
    return depth, pred


def report(
    fg: FusedGraph,
    sched: Schedule,
    kv_len: int = 128,
    bandwidth: float = BANDWIDTH,
    hop_us: float = HOP_US,
    task_us: dict[Kind, float] | None = None,
) -> dict[str, Any]:
    """The schedule's dependent phases, longest chain, bytes per phase and predicted step time.

    Args:
        fg: the fused graph the schedule was built from.
        sched: the schedule.
        kv_len: KV length of the step (attention bytes).
        bandwidth: device bytes/s for the stream term.
        hop_us: microseconds per dependent phase.
        task_us: fixed microseconds per task by kind (default TASK_US).
    """
    fixed = TASK_US if task_us is None else task_us
    cta = np.zeros(len(sched.tasks), dtype=np.int64)
    for q, ids in enumerate(sched.queues):
        cta[list(ids)] = q
    per_sm = bandwidth / len(sched.queues)
    nbytes = task_bytes(fg, sched, kv_len)
    depth, pred = dependencies(sched)
    phases: list[Phase] = []
    phase_us: list[np.ndarray] = []  # per phase, each CTA's busy microseconds
    for t in sched.tasks:  # tasks are in program order: a phase is a run of one (layer, kind)
        d, n = int(depth[t.id]), int(nbytes[t.id])
        last = phases[-1] if phases else None
        if last is not None and (last.layer, last.kind) == (t.layer, t.kind):
            phases[-1] = Phase(
                last.layer,
                last.kind,
                last.tasks + 1,
                last.bytes + n,
                min(last.depth_lo, d),
                max(last.depth_hi, d),
            )
        else:
            phases.append(Phase(t.layer, t.kind, 1, n, d, d))
            phase_us.append(np.zeros(len(sched.queues)))
        phase_us[-1][cta[t.id]] += fixed[t.kind] + n / per_sm * 1e6
    layers = sorted({p.layer for p in phases if p.layer >= 0})
    per_layer = {
        lay: max(p.depth_hi for p in phases if p.layer == lay)
        - min(p.depth_lo for p in phases if p.layer == lay) + 1
        for lay in layers
    }  # fmt: skip
    end = int(np.argmax(depth))
    chain = []
    while end >= 0:
        chain.append(end)
        end = int(pred[end])
    chain.reverse()
    hops, total = int(depth.max()), int(nbytes.sum())
    stream_ms = total / bandwidth * 1e3
    phases_ms = sum(float(u.max()) for u in phase_us) * 1e-3
    return {
        "kv_len": kv_len,
        "tasks": len(sched.tasks),
        "hops": hops,
        "phases_per_layer": sorted(set(per_layer.values())),
        "longest_chain": [sched.tasks[i].kind.value for i in chain],
        "bytes": total,
        "phases": [p.to_json() for p in phases],
        "model": {
            "hop_us": hop_us,
            "bandwidth": bandwidth,
            "task_us": {k.value: v for k, v in fixed.items()},
        },
        "phases_ms": round(phases_ms, 4),
        "predicted_ms": round(phases_ms + hops * hop_us * 1e-3, 4),
        "stream_ms": round(stream_ms, 4),
    }


def summary(r: dict[str, Any]) -> str:
    """A few lines of `report` for a terminal."""
    kinds: dict[str, int] = {}
    for p in r["phases"]:
        kinds[p["kind"]] = kinds.get(p["kind"], 0) + p["bytes"]
    chain = r["longest_chain"]
    lines = [
        f"{r['tasks']} tasks, longest dependency chain {r['hops']} tasks "
        f"({', '.join(str(n) for n in r['phases_per_layer'])} dependent phases per layer)",
        f"bytes per step at KV {r['kv_len']}: {r['bytes'] / 1e9:.3f} GB "
        f"({r['stream_ms']:.3f} ms at {r['model']['bandwidth'] / 1e12:.2f} TB/s)",
        "bytes by kind: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in kinds.items() if v),
        f"predicted step: phases (each its busiest CTA) {r['phases_ms']:.3f} ms + {r['hops']} "
        f"hand-offs x {r['model']['hop_us']} us = {r['predicted_ms']:.3f} ms",
        f"chain: {' > '.join(chain[:9])}{' > ...' if len(chain) > 9 else ''}",
    ]
    return "\n".join(lines)
