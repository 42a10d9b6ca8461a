"""The schedule that kernel.cu actually runs, read back from its task table.

The kernel does not read schedule.json: its tasks, waits, per-step counts and queues are
constant arrays in kernel.cu (`TASKS`, `WAITS`, `PER_STEP`, `QUEUE_OFF`, `QUEUE`, the `OP_*`
enum) and its sizes constexprs (`B`, `S`, `P`, `KS`, `NT`, `SM_COUNT`). `read_table` parses
them into a `Schedule` so the same obligations judge what runs; an edit of either file is seen.
It does not reuse the compiler's reader (`compiler.codegen.tables.parse_tables`): that one maps
op numbers through the compiler's own list of kinds, while this one takes them from the
`OP_*` enum in kernel.cu, the names the kernel's switch dispatches on.
"""

from __future__ import annotations

import re

from compiler.ir.fused import Kind
from compiler.schedule.schedule import Schedule, Task
from compiler.spec import ShapeTemplate

PARAMS = {Kind.ATTN_MERGE: 1, Kind.LMHEAD_ARGMAX: 1, Kind.DOWN_PARTIAL: 3, Kind.ARGMAX_REDUCE: 0}


class TableError(ValueError):
    """kernel.cu has no readable task table."""


def _const(text: str, name: str) -> int:
    m = re.search(rf"^constexpr int {name} = (-?\d+);", text, re.M)
    if m is None:
        raise TableError(f"kernel.cu: no constexpr int {name}")
    return int(m.group(1))


def _array(text: str, name: str) -> str:
    m = re.search(rf"__device__ const \w+ {name}\[[^\]]*\] = \{{(.*?)\n\}};", text, re.S)
    if m is None:
        raise TableError(f"kernel.cu: no {name} table")
    return m.group(1)


def _ints(body: str) -> list[int]:
    return [int(x) for x in re.findall(r"-?\d+", body)]


def _rows(body: str, width: int, name: str) -> list[list[int]]:
    rows = [_ints(r) for r in re.findall(r"\{([^{}]*)\}", body)]
    if any(len(r) != width for r in rows):
        raise TableError(f"kernel.cu: a {name} entry does not have {width} fields")
    return rows


def read_table(text: str, template: ShapeTemplate, options: object) -> Schedule:
    """kernel.cu's schedule (`options` and the template are carried over for the record)."""
    ops = {int(v): n.lower() for n, v in re.findall(r"^\s*OP_(\w+) = (\d+),", text, re.M)}
    try:
        kinds = {i: Kind(n) for i, n in ops.items()}
    except ValueError as e:
        raise TableError(f"kernel.cu: unknown op {e}") from None
    binding = {k: _const(text, k) for k in ("B", "S", "P", "KS", "NT")}
    waits = _rows(_array(text, "WAITS"), 3, "WAITS")
    tasks = []
    for i, (op, layer, a, b, c, nw, w0, signal) in enumerate(
        _rows(_array(text, "TASKS"), 8, "TASKS")
    ):
        if op not in kinds or w0 < 0 or nw < 0 or w0 + nw > len(waits):
            raise TableError(
                f"kernel.cu: task {i} has op {op} or waits [{w0}, {w0 + nw}) out of range"
            )
        kind = kinds[op]
        params = (a, b, c)[: PARAMS.get(kind, 2)]
        tw = tuple((w[0], w[1], w[2]) for w in waits[w0 : w0 + nw])
        tasks.append(Task(i, -1, kind, layer, params, tw, signal))
    per_step = _ints(_array(text, "PER_STEP"))
    offsets, queue = _ints(_array(text, "QUEUE_OFF")), _ints(_array(text, "QUEUE"))
    sm = _const(text, "SM_COUNT")
    if (
        len(offsets) != sm + 1
        or offsets[0] != 0
        or offsets[-1] != len(queue)
        or offsets != sorted(offsets)
    ):
        raise TableError("kernel.cu: QUEUE_OFF does not split QUEUE into SM_COUNT queues")
    queues = tuple(tuple(queue[offsets[s] : offsets[s + 1]]) for s in range(sm))
    return Schedule(
        template=template,
        options=options,  # type: ignore[arg-type]
        binding=tuple(sorted(binding.items())),
        counters=tuple((f"c{c}", n) for c, n in enumerate(per_step)),
        tasks=tuple(tasks),
        queues=queues,
        fused_digest="",
    )


def same_tasks(a: Schedule, b: Schedule) -> str:
    """'' if the two schedules run the same tasks, waits, counters and queues, else the first
    difference."""
    if a.bound() != b.bound():
        return f"split symbols {a.bound()} vs {b.bound()}"
    if [n for _, n in a.counters] != [n for _, n in b.counters]:
        return "per-step counts differ"
    if a.queues != b.queues:
        return "queues differ"
    for x, y in zip(a.tasks, b.tasks, strict=False):
        if (x.kind, x.layer, x.params, x.waits, x.signal) != (
            y.kind,
            y.layer,
            y.params,
            y.waits,
            y.signal,
        ):
            return f"task {x.id} differs"
    if len(a.tasks) != len(b.tasks):
        return f"{len(a.tasks)} tasks vs {len(b.tasks)}"
    return ""
