"""Assign tasks to per-SM queues, keeping every queue in program order.

Policies (`Options.policy`):

* `round_robin`: the tasks of each instruction are dealt to SMs one by one, continuing at the
  SM after the one that took the previous instruction's last task.
* `balanced`: instruction by instruction, tasks in decreasing estimated cost go to the SM with
  the least cost assigned so far (longest-processing-time greedy over the running totals).

Cost model (`task_cost`): a decode step is memory bound, so a task costs the bytes it must
stream from memory: the weights it reads (bf16, 2 bytes an element), the KV cache it may read
(the whole partition, as 2-byte elements), plus a fixed `TASK_OVERHEAD` bytes for its
activations and synchronisation.

Either way each queue is sorted by task id, which is program order: with every wait on an
earlier task, the earliest unfinished task is always at the head of its queue (no deadlock).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence

from compiler.ir.fused import Kind
from compiler.schedule.regions import Access, Geometry, volume, weight_elements
from compiler.schedule.schedule import Options
from compiler.schedule.split import TaskSpec

WEIGHT_BYTES = 2  # bf16
TASK_OVERHEAD = 4096  # bytes-equivalent of a task's activation traffic and counter round trip


def task_cost(spec: TaskSpec, access: Access, weights: frozenset[str], g: Geometry) -> int:
    """Estimated bytes a task moves (see the module docstring)."""
    cost = TASK_OVERHEAD + WEIGHT_BYTES * weight_elements(access, weights, g.B, spec.kind)
    if spec.kind is Kind.ATTN_PARTIAL:
        cost += WEIGHT_BYTES * sum(
            volume(b) for n, b in access.reads if n.startswith(("k_cache", "v_cache"))
        )
    return cost


def round_robin(tasks: Sequence[TaskSpec], sm_count: int) -> list[list[int]]:
    queues: list[list[int]] = [[] for _ in range(sm_count)]
    for t in range(len(tasks)):
        queues[t % sm_count].append(t)
    return queues


def balanced(tasks: Sequence[TaskSpec], costs: Sequence[int], sm_count: int) -> list[list[int]]:
    queues: list[list[int]] = [[] for _ in range(sm_count)]
    load = [(0, sm) for sm in range(sm_count)]  # heap of (assigned cost, sm)
    by_instr: dict[int, list[int]] = {}
    for t, s in enumerate(tasks):
        by_instr.setdefault(s.instr, []).append(t)
    for ids in by_instr.values():
        for t in sorted(ids, key=lambda t: (-costs[t], t)):
            total, sm = heapq.heappop(load)
            queues[sm].append(t)
            heapq.heappush(load, (total + costs[t], sm))
    return [sorted(q) for q in queues]


def assign(tasks: Sequence[TaskSpec], costs: Sequence[int], options: Options) -> list[list[int]]:
    """Per-SM queues of task ids, each in program order."""
    if options.policy == "balanced":
        return balanced(tasks, costs, options.sm_count)
    return round_robin(tasks, options.sm_count)
