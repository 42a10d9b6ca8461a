"""Dependencies between the tasks of one decode step, and the counters that express them.

Four steps, all driven by the regions of `regions.task_access` (static, conservative mode):

1. **Direct hazards**, in program order, instruction by instruction (an instruction reads all
   its inputs before it writes any output): a task depends on the last writers of what it reads
   (RAW), on the last writers of what it writes (WAW) and on the readers, since that last write,
   of what it writes (WAR: `x` read by QKV's norm, then written by OPROJ_RESIDUAL; `q`, `attn`,
   `act`, `down` reused by every layer). Regions are tracked exactly, box by box: a write
   removes the part it covers from the older writers' and readers' boxes.
2. **Transitive reduction**: a dependency on u is dropped when another kept dependency v has u
   as an ancestor. Ancestor sets are bitsets truncated to the last `WINDOW` instructions, so
   the reduction is conservative (it may keep a redundant wait, never drop a needed one).
3. **Closing the step**: every task with no consumer in the step becomes a dependency of the
   sink (the single task of the last instruction, ARGMAX_REDUCE), and every task with no
   dependency (a root: the EMBED tasks) waits on the sink of the previous step (step_offset -1).
4. **Counters**: the producers of each instruction are grouped by their exact set of consumers;
   each group is one counter, which each member signals once per step, and a consumer waits for
   the full count of every group holding one of its dependencies. Grouping by the consumer set
   means no consumer waits on a task it does not need: QKV tasks group per KV head (attention
   of that head needs them), GATE_UP tasks per split-K chunk, DOWN_PARTIAL tasks per row tile.

Cross-step safety. The derivation above is for one step; every hazard between steps (the
cache row written at pos+1 after step s's attention read that partition, `x` rewritten by the
next EMBED, `token`, `q`, `attn`, `act`, `down`, `logits` reused) is ordered by one fence:

    (F) no task of step s+1 starts before every task of step s has signalled.

Proof. Suppose not, and let e be the first start that breaks (F), by a task X of step s+1.
(A) Before e counts are exact: for a counter c with per_step n, a value >= (s'+1)*n means
every step-<=s' member of c has signalled. Otherwise, with some member of a step t <= s'
missing, no task of a step after t has started (that start would break (F) before e), so at
most (t+1)*n - 1 signals exist. Now follow X's waits back within step s+1 to a root r: X, and
each task on the way, started only after a full-count wait (target (s+2)*n) on the group of its
predecessor, so by (A) the predecessor had finished; hence r started before X. r waited on the
sink counter with step_offset -1, target s+1, so by (A) the step-s sink had finished, and it
had in turn waited (by (A) again, recursively) for every task of step s, since step 3 makes
every task an ancestor of the sink. So every step-s task finished before X started: a
contradiction. (A) is thus true at all times, which is also why a full-count wait means
exactly "these producers of this step are done". The only explicit cross-step wait is EMBED
(the roots) on the previous ARGMAX_REDUCE. The interpreter does not rely on this argument: it
tags every element with the (step, instruction) that wrote it and checks every read and write
against sequential order across steps, so a schedule that broke (F) where it matters raises
ScheduleHazard, and its traces show the fence (tests/test_interpret.py).

Deadlock freedom: every wait targets tasks earlier in (step, program order) and `queues.py`
keeps every queue in program order, so the earliest unfinished task is at the head of its queue
with all its waits satisfied; some SM can always run until all tasks are done.
"""

from __future__ import annotations

from collections import defaultdict, deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from compiler.ir.graph import IRError
from compiler.schedule.regions import Access, Box, subtract
from compiler.schedule.split import TaskSpec

WINDOW = 16  # instructions of ancestry kept for the transitive reduction (two layers)


@dataclass(frozen=True)
class Counters:
    """Counter names with per-step counts, each task's signal and each task's waits."""

    counters: tuple[tuple[str, int], ...]
    signal: tuple[int, ...]
    waits: tuple[tuple[tuple[int, int, int], ...], ...]


def _blocks(tasks: Sequence[TaskSpec]) -> list[range]:
    """Task id ranges of consecutive instructions."""
    out: list[range] = []
    start = 0
    for t in range(1, len(tasks) + 1):
        if t == len(tasks) or tasks[t].instr != tasks[start].instr:
            out.append(range(start, t))
            start = t
    return out


class _Entries:
    """Disjoint-or-not boxes of one buffer, each owned by a set of tasks (numpy-indexed).

    Boxes with identical extents share one entry (every GATE_UP task reads all of `x`), so
    cutting by a write touches one entry per distinct box rather than one per task.
    """

    def __init__(self, ndim: int):
        self.lo = np.zeros((0, ndim), dtype=np.int64)
        self.hi = np.zeros((0, ndim), dtype=np.int64)
        self.owners: list[frozenset[int]] = []
        self.memo: dict[Box, frozenset[int]] = {}

    def _hits(self, box: Box) -> np.ndarray:
        lo, hi = np.array(box, dtype=np.int64).T
        return np.flatnonzero(np.all((self.lo < hi) & (self.hi > lo), axis=1))

    def tasks(self, box: Box) -> frozenset[int]:
        """Owners of every entry overlapping `box` (memoized until the entries change: many
        tasks of one instruction ask about the same box, e.g. every GATE_UP task reads all x)."""
        if box not in self.memo:
            out: set[int] = set()
            for i in self._hits(box):
                out |= self.owners[i]
            self.memo[box] = frozenset(out)
        return self.memo[box]

    def add(self, items: list[tuple[Box, int]]) -> None:
        merged: dict[Box, set[int]] = defaultdict(set)
        for box, t in items:
            merged[box].add(t)
        self._append([(b, frozenset(ts)) for b, ts in merged.items()])

    def _append(self, items: list[tuple[Box, frozenset[int]]]) -> None:
        self.memo.clear()
        if items:
            arr = np.array([b for b, _ in items], dtype=np.int64)  # [n, ndim, 2]
            self.lo = np.concatenate([self.lo, arr[:, :, 0]])
            self.hi = np.concatenate([self.hi, arr[:, :, 1]])
            self.owners += [ts for _, ts in items]

    def cut(self, boxes: list[Box]) -> None:
        """Remove the parts covered by `boxes` (one instruction's writes)."""
        if not boxes or not self.owners:
            return
        w = np.array(boxes, dtype=np.int64)  # [m, ndim, 2]
        hit = np.all(
            (self.lo[:, None, :] < w[None, :, :, 1]) & (self.hi[:, None, :] > w[None, :, :, 0]),
            axis=2,
        )  # [n, m]
        rows = np.flatnonzero(hit.any(axis=1))
        if not len(rows):
            return
        pieces: list[tuple[Box, frozenset[int]]] = []
        for i in rows:
            parts = [tuple(zip(self.lo[i].tolist(), self.hi[i].tolist(), strict=True))]
            for j in np.flatnonzero(hit[i]):
                parts = [q for p in parts for q in subtract(p, boxes[j])]
            pieces += [(p, self.owners[i]) for p in parts]
        self.memo.clear()
        keep = np.ones(len(self.owners), dtype=bool)
        keep[rows] = False
        self.lo, self.hi = self.lo[keep], self.hi[keep]
        self.owners = [o for o, k in zip(self.owners, keep.tolist(), strict=True) if k]
        self._append(pieces)


def direct(
    tasks: Sequence[TaskSpec], accesses: Sequence[Access], names: frozenset[str]
) -> list[set[int]]:
    """RAW, WAW and WAR hazards of each task on earlier tasks of the same step."""
    writers: dict[str, _Entries] = {}
    readers: dict[str, _Entries] = {}
    for a in accesses:
        for name, box in a.reads + a.writes:
            if name in names and name not in writers:
                writers[name], readers[name] = _Entries(len(box)), _Entries(len(box))
    deps: list[set[int]] = [set() for _ in tasks]
    for block in _blocks(tasks):
        reads: dict[str, list[tuple[Box, int]]] = defaultdict(list)
        writes: dict[str, list[tuple[Box, int]]] = defaultdict(list)
        for t in block:
            for name, box in accesses[t].reads:
                if name in names:
                    deps[t] |= writers[name].tasks(box)
                    reads[name].append((box, t))
            for name, box in accesses[t].writes:
                deps[t] |= writers[name].tasks(box) | readers[name].tasks(box)
                writes[name].append((box, t))
        for name, items in reads.items():
            readers[name].add(items)
        for name, items in writes.items():
            boxes = [b for b, _ in items]
            writers[name].cut(boxes)
            readers[name].cut(boxes)
            writers[name].add(items)
    return deps


def reduce(
    tasks: Sequence[TaskSpec], deps: Sequence[set[int]], window: int = WINDOW
) -> list[list[int]]:
    """Drop the dependencies implied by others (see the module docstring, step 2)."""
    first: dict[int, int] = {}
    for t, s in enumerate(tasks):
        first.setdefault(s.instr, t)
    anc: dict[int, int] = {}  # task -> bitset of its ancestors (truncated)
    out: list[list[int]] = []
    live: deque[int] = deque()  # tasks whose ancestor sets are kept, in id order
    shared: dict[int, int] = {}  # equal ancestor sets of one instruction's tasks, as one object
    for t, s in enumerate(tasks):
        if t and tasks[t - 1].instr != s.instr:
            shared = {}
        floor = first.get(s.instr - window, 0) if s.instr - window >= 0 else 0
        while live and live[0] < floor:
            anc.pop(live.popleft(), None)
        kept: list[int] = []
        cover = 0  # union of the kept dependencies' ancestors
        merged: set[int] = set()  # ids of the ancestor sets already in `cover`
        cover_bytes = b""  # `cover` as bytes, for cheap bit tests (it rarely changes)
        for u in sorted(deps[t], reverse=True):
            if (u >> 3) < len(cover_bytes) and cover_bytes[u >> 3] >> (u & 7) & 1:
                continue
            kept.append(u)
            a = anc.get(u, 0)
            if id(a) not in merged:
                merged.add(id(a))
                cover |= a
                cover_bytes = cover.to_bytes((cover.bit_length() + 7) // 8, "little")
        own = bytearray((kept[0] >> 3) + 1 if kept else 0)  # the kept dependencies themselves
        for u in kept:
            own[u >> 3] |= 1 << (u & 7)
        bits = (cover | int.from_bytes(own, "little")) >> floor << floor
        anc[t] = shared.setdefault(bits, bits)
        live.append(t)
        out.append(sorted(kept))
    return out


def close_step(tasks: Sequence[TaskSpec], deps: list[list[int]]) -> int:
    """Make the last task the sink of the step (step 3); returns its id."""
    sink = len(tasks) - 1
    if sink < 0 or (sink > 0 and tasks[sink - 1].instr == tasks[sink].instr):
        raise IRError("the last instruction must be a single task (ARGMAX_REDUCE) to end a step")
    consumed = {u for d in deps for u in d}
    leaves = [t for t in range(sink) if t not in consumed]
    deps[sink] = sorted(set(deps[sink]) | set(leaves))
    return sink


def counters(tasks: Sequence[TaskSpec], deps: Sequence[Sequence[int]], sink: int) -> Counters:
    """Group producers into counters and turn dependencies into waits (step 4)."""
    consumers: list[set[int]] = [set() for _ in tasks]
    for t, d in enumerate(deps):
        for u in d:
            consumers[u].add(t)
    group: dict[tuple[int, frozenset[int]], int] = {}
    names: list[tuple[str, int]] = []
    per_instr: dict[int, int] = defaultdict(int)
    signal: list[int] = []
    for t, s in enumerate(tasks):
        key = (s.instr, frozenset(consumers[t]))
        if key not in group:
            group[key] = len(names)
            names.append((f"{s.instr}.{s.kind.value}.{per_instr[s.instr]}", 0))
            per_instr[s.instr] += 1
        c = group[key]
        names[c] = (names[c][0], names[c][1] + 1)
        signal.append(c)
    per_step = [n for _, n in names]
    waits: list[tuple[tuple[int, int, int], ...]] = []
    for t in range(len(tasks)):
        cs = sorted({signal[u] for u in deps[t]})
        if cs:
            waits.append(tuple((c, per_step[c], 0) for c in cs))
        else:  # a root: the previous step's sink must be done (see the module docstring)
            waits.append(((signal[sink], per_step[signal[sink]], -1),))
    return Counters(tuple(names), tuple(signal), tuple(waits))


def derive(
    tasks: Sequence[TaskSpec], accesses: Sequence[Access], names: frozenset[str]
) -> Counters:
    """Steps 1-4 of the module docstring."""
    reduced = reduce(tasks, direct(tasks, accesses, names))
    sink = close_step(tasks, reduced)
    return counters(tasks, reduced, sink)
