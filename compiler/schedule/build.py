"""`build_schedule`: a FusedGraph and a shape template to tasks, counters and per-SM queues.

    bind symbols -> split (split.py) -> regions (regions.py) -> dependencies and counters
    (deps.py) -> queues (queues.py)

`check_schedule` holds the structural invariants any schedule.json must satisfy before it is
interpreted or rendered; `program_order_violations` lists queue entries out of program order.
"""

from __future__ import annotations

import itertools

from compiler.ir.fused import FusedGraph
from compiler.ir.graph import IRError
from compiler.schedule.deps import derive
from compiler.schedule.queues import assign, task_cost
from compiler.schedule.regions import Geometry, task_access, tracked
from compiler.schedule.schedule import Options, Schedule, Task
from compiler.schedule.split import bind, split
from compiler.spec import ShapeTemplate


def build_schedule(fg: FusedGraph, template: ShapeTemplate, options: Options) -> Schedule:
    """Split every instruction into tasks, derive their dependencies, assign them to SMs.

    Args:
        fg: the fused program (e.g. `compiler.ir.fused_layout.layout(spec)`).
        template: batch size B and cache capacity S.
        options: tile sizes, split counts, SM count and queue policy.

    Returns:
        The schedule; every queue is in program order and every wait targets an earlier task
        (or the previous step), so it is deadlock free (see deps.py for the argument).
    """
    binding = bind(fg, template, options)
    g = Geometry.of(fg, binding)
    specs = split(fg, g, options)
    accesses = [task_access(fg.instrs[s.instr], s.params, g) for s in specs]
    deps = derive(specs, accesses, tracked(fg))
    weights = frozenset(n for n, _ in fg.weights)
    costs = [task_cost(s, a, weights, g) for s, a in zip(specs, accesses, strict=True)]
    queues = assign(specs, costs, options)
    tasks = tuple(
        Task(t, s.instr, s.kind, s.layer, s.params, deps.waits[t], deps.signal[t])
        for t, s in enumerate(specs)
    )
    schedule = Schedule(
        template=template,
        options=options,
        binding=tuple(sorted(binding.items())),
        counters=deps.counters,
        tasks=tasks,
        queues=tuple(tuple(q) for q in queues),
        fused_digest=fg.digest(),
    )
    check_schedule(schedule, fg)
    if program_order_violations(schedule):  # pragma: no cover - queues.py sorts every queue
        raise IRError(f"queues out of program order: {program_order_violations(schedule)[:3]}")
    return schedule


def check_schedule(schedule: Schedule, fg: FusedGraph) -> None:
    """Structural invariants; raises IRError naming the first one broken.

    Task ids are their index; each task is one of the fused graph's instructions with its kind
    and layer; every task sits in exactly one queue; per_step equals the number of tasks that
    signal the counter; waits name existing counters with 1 <= count <= per_step and a step
    offset of 0 or -1; the binding agrees with the template; the fused digest matches.
    """
    if schedule.fused_digest != fg.digest():
        raise IRError("schedule was built from another fused graph (fused_digest differs)")
    b = schedule.bound()
    if set(b) != {"B", "S", "P", "KS", "NT"}:
        raise IRError(f"binding must give B, S, P, KS, NT, got {sorted(b)}")
    if (b["B"], b["S"]) != (schedule.template.batch, schedule.template.max_seq):
        raise IRError(f"binding B={b['B']} S={b['S']} disagrees with template {schedule.template}")
    if fg.dim("intermediate") % b["KS"] or not 1 <= b["P"] <= b["S"]:
        raise IRError(f"KS={b['KS']} must divide the intermediate size and 1 <= P={b['P']} <= S")
    if len(schedule.queues) != schedule.options.sm_count:
        raise IRError(f"{len(schedule.queues)} queues for sm_count {schedule.options.sm_count}")
    n_counters = len(schedule.counters)
    signals = [0] * n_counters
    for i, t in enumerate(schedule.tasks):
        if t.id != i:
            raise IRError(f"task {i} has id {t.id}")
        if not 0 <= t.instr < len(fg.instrs):
            raise IRError(f"task {i}: no instruction {t.instr}")
        ins = fg.instrs[t.instr]
        if (ins.kind, ins.layer) != (t.kind, t.layer):
            raise IRError(
                f"task {i}: kind/layer {t.kind.value}/{t.layer} but instruction {t.instr} is {ins.kind.value}/{ins.layer}"
            )
        if not 0 <= t.signal < n_counters:
            raise IRError(f"task {i}: signals unknown counter {t.signal}")
        signals[t.signal] += 1
    for c, (name, per_step) in enumerate(schedule.counters):
        if per_step != signals[c]:
            raise IRError(
                f"counter {c} ({name}): per_step {per_step} but {signals[c]} tasks signal it"
            )
    for t in schedule.tasks:
        for c, count, off in t.waits:
            if not 0 <= c < n_counters:
                raise IRError(f"task {t.id}: waits on unknown counter {c}")
            if not 1 <= count <= schedule.counters[c][1] or off not in (0, -1):
                raise IRError(f"task {t.id}: bad wait ({c}, {count}, {off})")
    placed = sorted(i for q in schedule.queues for i in q)
    if placed != list(range(len(schedule.tasks))):
        raise IRError("every task must appear in exactly one queue")


def program_order_violations(schedule: Schedule) -> list[tuple[int, int, int]]:
    """(sm, earlier entry, later entry) for each adjacent queue pair out of program order."""
    out: list[tuple[int, int, int]] = []
    key = {t.id: (t.instr, t.id) for t in schedule.tasks}
    for sm, q in enumerate(schedule.queues):
        out += [(sm, a, b) for a, b in itertools.pairwise(q) if key[a] >= key[b]]
    return out
