"""CPU schedule interpreter: run a schedule's tasks one at a time, in any order its counters allow.

The machine state is what the kernel has: float64 buffers (`tiles.py` runs one task on them),
one counter array, and per SM a queue position and a step. At each point one SM whose head
task has all its waits satisfied runs that task to completion; the task then signals its counter.
The choice among runnable SMs is the `order`:

* `"random"`: uniform, from a generator seeded with `seed`;
* `"adversarial"`: the runnable head furthest downstream in (step, program order), so a
  consumer that lacks a dependency runs before its producer and the hazard shows;
* `"program"`: the earliest in (step, program order), close to a sequential run.

If no SM can run while tasks remain, `ScheduleDeadlock` names every blocked head task and the
counter value and target of each wait it is stuck on.

Hazards. Every element of every non-constant buffer carries a tag: the (step, instruction) of
the last write that actually happened (-1: the initial contents, e.g. the prefilled cache or
the first token). Before a task reads or writes a region (`regions.task_access` at the runtime
`pos`), the interpreter computes what a sequential execution, instruction after instruction and
step after step, would have left there: walking back from the task's own (step, instruction),
each element's expected writer is the latest instruction whose whole output (fused.py
semantics, `regions.instr_writes`, independent of the schedule) covers it. A read or write that
finds another tag raises `ScheduleHazard` (a missing RAW or WAW dependency, or a later writer
that came too early); a write additionally requires every task that reads the region between
that expected writer and itself (in sequential order, across steps too) to have run already
(WAR). This checks the cross-step argument of deps.py at run time rather than trusting it.
"""

from __future__ import annotations

import functools
import heapq
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from compiler.ir.evaluate import concrete
from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.ops import DType
from compiler.schedule.build import check_schedule
from compiler.schedule.regions import (
    Access,
    Box,
    Geometry,
    coalesce,
    index,
    instr_writes,
    intersect,
    local,
    task_access,
    tracked,
)
from compiler.schedule.schedule import Schedule, Task
from compiler.schedule.tiles import run_task

ORDERS = ("random", "adversarial", "program")
INITIAL = -1  # tag of contents nobody in the run wrote (prefill, first token, zeros)


class ScheduleDeadlock(RuntimeError):
    """No SM can run while tasks remain; `blocked` describes each blocked head task."""

    def __init__(self, message: str, blocked: list[dict[str, Any]]):
        super().__init__(message)
        self.blocked = blocked


class ScheduleHazard(RuntimeError):
    """A task accessed a region in an order a sequential execution would not have."""


@dataclass
class Result:
    """What the interpreted kernel produced."""

    tokens: np.ndarray  # [steps, B] int64: the token ARGMAX_REDUCE chose in each step
    logits: np.ndarray  # [steps, B, V] float64
    caches: dict[str, np.ndarray]  # final k_cache.{l}, v_cache.{l} [B, KV, S, D]
    trace: list[tuple[int, int, int]] = field(default_factory=list)  # (step, sm, task) in run order


def _numpy(v: Any) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor: share its memory
        v = v.detach().cpu().numpy()
    return np.asarray(v)


class _Tracker:
    """Element tags and the sequential-order walk of the module docstring."""

    def __init__(
        self,
        sched: Schedule,
        fg: FusedGraph,
        g: Geometry,
        shapes: dict[str, tuple[int, ...]],
        pos0: int,
    ):
        self.fg, self.g, self.pos0 = fg, g, pos0
        self.n_instr = len(fg.instrs)
        self.names = tracked(fg)
        self.tags = {n: np.full(shapes[n], INITIAL, dtype=np.int64) for n in self.names}
        self.by_instr: dict[int, list[Task]] = {}
        for t in sched.tasks:
            self.by_instr.setdefault(t.instr, []).append(t)
        self.readers: dict[str, set[int]] = {n: set() for n in self.names}
        self.writers: dict[str, set[int]] = {n: set() for n in self.names}
        for i, ins in enumerate(fg.instrs):
            for n, _ in instr_writes(ins, g):
                self.writers[n].add(i)
            for t in self.by_instr.get(i, []):
                for n, _ in task_access(ins, t.params, g).reads:
                    if n in self.names:
                        self.readers[n].add(i)
        self.accessors = {n: sorted(self.readers[n] | self.writers[n]) for n in self.names}
        self.done: dict[tuple[int, int], bool] = {}

    @functools.cache  # noqa: B019 (one tracker per run)
    def access(self, task: int, instr: int, params: tuple[int, ...], step: int) -> Access:
        return task_access(self.fg.instrs[instr], params, self.g, self.pos0 + step)

    @functools.cache  # noqa: B019
    def whole(self, instr: int, step: int, name: str) -> tuple[Box, ...]:
        ws = instr_writes(self.fg.instrs[instr], self.g, self.pos0 + step)
        return tuple(coalesce(b for n, b in ws if n == name))

    def describe(self, code: int) -> str:
        if code == INITIAL:
            return "the initial contents"
        step, i = divmod(int(code), self.n_instr)
        ins = self.fg.instrs[i]
        return f"instruction {i} ({ins.kind.value}, layer {ins.layer}) of step {step}"

    def _check_readers(
        self, instr: int, step: int, name: str, box: Box, open_: np.ndarray, me: Task, my_step: int
    ) -> None:
        for u in self.by_instr.get(instr, []):
            if (u.id == me.id and step == my_step) or self.done.get((step, u.id)):
                continue
            for n, rb in self.access(u.id, u.instr, u.params, step).reads:
                if n != name:
                    continue
                inter = intersect(rb, box)
                if inter is not None and open_[local(inter, box)].any():
                    raise ScheduleHazard(
                        f"task {me.id} ({me.kind.value}, layer {me.layer}, params {list(me.params)}) "
                        f"of step {my_step} writes {name}{list(inter)} before task {u.id} "
                        f"({u.kind.value}, layer {u.layer}, params {list(u.params)}) of step {step} "
                        f"has read it (write-after-read)"
                    )

    def expected(self, name: str, box: Box, me: Task, step: int, write: bool) -> np.ndarray:
        """Tags a sequential execution leaves in `box` just before `me` runs in `step`."""
        exp = np.full([b - a for a, b in box], INITIAL, dtype=np.int64)
        open_ = np.ones(exp.shape, dtype=bool)
        if write and me.instr in self.readers[name]:
            self._check_readers(me.instr, step, name, box, open_, me, step)
        acc = self.accessors[name]
        s, k = step, acc.index(me.instr) if me.instr in acc else len(acc)
        while s >= 0 and open_.any():
            k -= 1
            if k < 0:
                s, k = s - 1, len(acc)
                continue
            i = acc[k]
            if i in self.writers[name]:
                for wb in self.whole(i, s, name):
                    inter = intersect(wb, box)
                    if inter is not None:
                        sl = local(inter, box)
                        exp[sl][open_[sl]] = s * self.n_instr + i
                        open_[sl] = False
            if write and i in self.readers[name] and open_.any():
                self._check_readers(i, s, name, box, open_, me, step)
        return exp

    def check(self, name: str, box: Box, me: Task, step: int, write: bool) -> None:
        exp = self.expected(name, box, me, step, write)
        act = self.tags[name][index(box)]
        if not np.array_equal(exp, act):
            bad = np.argwhere(exp != act)
            at = tuple(int(a) + lo for a, (lo, _) in zip(bad[0], box, strict=True))
            e, a = exp[tuple(bad[0])], act[tuple(bad[0])]
            what = "writes over" if write else "reads"
            raise ScheduleHazard(
                f"task {me.id} ({me.kind.value}, layer {me.layer}, params {list(me.params)}) of "
                f"step {step} {what} {name}{list(box)}: at {list(at)} expected the last writer to "
                f"be {self.describe(e)} but found {self.describe(a)}"
            )

    def stamp(self, name: str, box: Box, step: int, instr: int) -> None:
        self.tags[name][index(box)] = step * self.n_instr + instr


def _check_coverage(
    sched: Schedule, fg: FusedGraph, g: Geometry, shapes: dict[str, tuple[int, ...]], pos: int
) -> None:
    """Each instruction's tasks write every element of its output exactly once."""
    by_instr: dict[int, list[Task]] = {}
    for t in sched.tasks:
        by_instr.setdefault(t.instr, []).append(t)
    for i, ins in enumerate(fg.instrs):
        want: dict[str, np.ndarray] = {}
        for n, b in instr_writes(ins, g, pos):
            want.setdefault(n, np.zeros(shapes[n], dtype=np.int64))[index(b)] += 1
        got = {n: np.zeros_like(w) for n, w in want.items()}
        for t in by_instr.get(i, []):
            for n, b in task_access(ins, t.params, g, pos).writes:
                if n not in got:
                    raise ScheduleHazard(f"task {t.id} writes {n}, which instruction {i} does not")
                got[n][index(b)] += 1
        for n in want:
            bad = np.argwhere(got[n] != want[n])
            if len(bad):
                at = [int(a) for a in bad[0]]
                raise ScheduleHazard(
                    f"instruction {i} ({ins.kind.value}, layer {ins.layer}): {n}{at} is written "
                    f"{got[n][tuple(at)]} times by its tasks, {want[n][tuple(at)]} by the instruction"
                )


class _Machine:
    """SM queue positions, counters, and the set of SMs whose head task can run."""

    def __init__(self, sched: Schedule, steps: int):
        self.sched, self.steps = sched, steps
        self.per_step = [n for _, n in sched.counters]
        self.value = [0] * len(sched.counters)
        self.at = [0] * len(sched.queues)  # index into the SM's queue
        self.step = [0 if q else steps for q in sched.queues]
        self.runnable: set[int] = set()
        self.waiting: dict[int, list[tuple[int, int]]] = {}  # counter -> heap of (target, SM)
        for sm in range(len(sched.queues)):
            self._settle(sm)

    def head(self, sm: int) -> Task:
        return self.sched.tasks[self.sched.queues[sm][self.at[sm]]]

    def target(self, wait: tuple[int, int, int], step: int) -> int:
        c, count, off = wait
        return (step + off) * self.per_step[c] + count

    def _settle(self, sm: int) -> None:
        """Put a live SM in `runnable` or in `waiting` on its first unsatisfied counter."""
        if self.step[sm] >= self.steps:
            return
        for w in self.head(sm).waits:
            target = self.target(w, self.step[sm])
            if self.value[w[0]] < target:
                heapq.heappush(self.waiting.setdefault(w[0], []), (target, sm))
                return
        self.runnable.add(sm)

    def finish(self, sm: int) -> None:
        """The head task of `sm` has run: signal, advance the queue, wake waiters."""
        c = self.head(sm).signal
        self.runnable.discard(sm)
        self.at[sm] += 1
        if self.at[sm] == len(self.sched.queues[sm]):
            self.at[sm], self.step[sm] = 0, self.step[sm] + 1
        self._settle(sm)
        self.value[c] += 1
        heap = self.waiting.get(c, [])
        while heap and heap[0][0] <= self.value[c]:
            self._settle(heapq.heappop(heap)[1])

    def live(self) -> list[int]:
        return [sm for sm in range(len(self.sched.queues)) if self.step[sm] < self.steps]

    def deadlock(self) -> ScheduleDeadlock:
        blocked: list[dict[str, Any]] = []
        lines = []
        for sm in self.live():
            t, step = self.head(sm), self.step[sm]
            waits = [
                {
                    "counter": self.sched.counters[w[0]][0],
                    "value": self.value[w[0]],
                    "target": self.target(w, step),
                }
                for w in t.waits
                if self.value[w[0]] < self.target(w, step)
            ]
            blocked.append({"sm": sm, "step": step, "task": t.id, "kind": t.kind.value,
                            "layer": t.layer, "params": list(t.params), "waits": waits})  # fmt: skip
            ws = ", ".join(f"{w['counter']} at {w['value']} < {w['target']}" for w in waits)
            lines.append(
                f"  sm {sm} step {step}: task {t.id} ({t.kind.value}, layer {t.layer}, params {list(t.params)}) waits on {ws}"
            )
        return ScheduleDeadlock("schedule deadlock: no SM can run\n" + "\n".join(lines), blocked)


def _pick(machine: _Machine, order: str, rng: np.random.Generator) -> int:
    """The SM that runs next, among those whose head task can run (see the module docstring)."""
    ready = sorted(machine.runnable)
    if order == "random":
        return ready[int(rng.integers(len(ready)))]
    keyed = [((machine.step[sm], machine.head(sm).instr, machine.head(sm).id), sm) for sm in ready]
    return (max(keyed) if order == "adversarial" else min(keyed))[1]


def interpret(
    schedule: Schedule,
    fg: FusedGraph,
    weights: Mapping[str, Any],
    token0: Any,
    pos0: int,
    steps: int,
    order: str = "random",
    seed: int = 0,
    caches: Mapping[str, Any] | None = None,
    check: bool = True,
) -> Result:
    """Run `steps` decode steps of `schedule` on the CPU, checking hazards as it goes.

    Args:
        schedule: the schedule (checked with `build.check_schedule` first).
        fg: the fused graph it was built from.
        weights: every weight of `fg` by HF name (numpy arrays or torch tensors, any float dtype).
        token0: the tokens [B] the first step embeds.
        pos0: the position of the first step; step s runs at pos0 + s.
        steps: decode steps to run; ARGMAX_REDUCE's token of each step feeds the next EMBED.
        order: "random", "adversarial" or "program" (see the module docstring).
        seed: the random order's seed.
        caches: initial contents of k_cache.{l}/v_cache.{l} [B, KV, S, D] (e.g. a prefill's);
            zeros where absent.
        check: track element writers and raise ScheduleHazard on any out-of-order access.

    Returns:
        Tokens [steps, B], logits [steps, B, V] and the final caches.

    Raises:
        ScheduleDeadlock: no SM can run while tasks remain.
        ScheduleHazard: a task read or overwrote a region out of sequential order, or the tasks
            of an instruction do not write its output exactly once.
    """
    if order not in ORDERS:
        raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
    check_schedule(schedule, fg)
    g = Geometry.of(fg, schedule.bound())
    if not pos0 >= 0 or pos0 + steps > g.S:
        raise ValueError(
            f"positions {pos0}..{pos0 + steps - 1} do not fit the cache capacity {g.S}"
        )
    env = schedule.bound()
    shapes = {b.name: concrete(b.shape, env) for b in fg.buffers}
    wt = {n: _numpy(weights[n]) for n, _ in fg.weights}
    for n, shape in fg.weights:
        if wt[n].shape != tuple(shape):
            raise ValueError(f"weight {n}: expected shape {list(shape)}, got {list(wt[n].shape)}")
    buf: dict[str, np.ndarray] = {}
    for b in fg.buffers:
        if b.value is not None:
            buf[b.name] = np.asarray(b.value, dtype=np.float64)
        else:
            buf[b.name] = np.zeros(
                shapes[b.name], dtype=np.int64 if b.dtype is DType.I64 else np.float64
            )
    for n, v in (caches or {}).items():
        buf[n][...] = _numpy(v)
    buf["token"][...] = _numpy(token0)

    _check_coverage(schedule, fg, g, shapes, pos0)
    tracker = _Tracker(schedule, fg, g, shapes, pos0) if check else None
    machine = _Machine(schedule, steps)
    rng = np.random.default_rng(seed)
    tokens = np.zeros((steps, g.B), dtype=np.int64)
    emitted: list[np.ndarray] = []
    logits = np.zeros((steps, g.B, g.V))
    trace: list[tuple[int, int, int]] = []

    while machine.runnable:
        sm = _pick(machine, order, rng)
        task, step = machine.head(sm), machine.step[sm]
        ins = fg.instrs[task.instr]
        pos = pos0 + step
        acc = task_access(ins, task.params, g, pos)
        if tracker is not None:
            tracker.done[(step, task.id)] = False
            for n, box in acc.reads:
                if n in tracker.names:
                    tracker.check(n, box, task, step, write=False)
            for n, box in acc.writes:
                tracker.check(n, box, task, step, write=True)
        run_task(ins, task.params, g, buf, wt, pos, emitted)
        if emitted:
            tokens[step] = emitted.pop()
        if tracker is not None:
            for n, box in acc.writes:
                tracker.stamp(n, box, step, task.instr)
            tracker.done[(step, task.id)] = True
        if ins.kind is Kind.LMHEAD_ARGMAX:
            for n, box in acc.writes:
                if n == ins.outputs[0]:
                    logits[step][index(box)] = buf[n][index(box)]
        trace.append((step, sm, task.id))
        machine.finish(sm)

    if machine.live():
        raise machine.deadlock()
    for c, (name, per_step) in enumerate(schedule.counters):
        if machine.value[c] != steps * per_step:  # pragma: no cover - implied by the loop
            raise ScheduleHazard(
                f"counter {name} ended at {machine.value[c]}, not {steps * per_step}"
            )
    caches_out = {n: buf[n].copy() for n in buf if n.startswith(("k_cache.", "v_cache."))}
    return Result(tokens, logits, caches_out, trace)
