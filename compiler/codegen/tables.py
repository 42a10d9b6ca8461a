"""The schedule as `__device__ const` tables in kernel.cu, and a parser that reads them back.

    TASKS[id]      {op, layer, a, b, c, nw, w0, signal}   (struct Task in amk.cuh)
    WAITS[i]       {counter, count, step_offset}          (struct Wait)
    PER_STEP[c]    tasks that signal counter c in one step
    QUEUE_OFF[sm]  queue of SM sm = QUEUE[QUEUE_OFF[sm] .. QUEUE_OFF[sm + 1])
    QUEUE[i]       task ids, queue after queue

`op` is the index of the kind in `OPS`; params a, b, c are the task's params padded with 0
(16-bit: `check_schedule` refuses larger ones). A task's waits are contiguous, in task-id order.
`parse_tables` is independent of the renderer's data structures, so tests (and the verifier) can
check that a kernel.cu encodes exactly a given schedule.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from compiler.codegen.dims import CodegenError
from compiler.codegen.emit import Emitter
from compiler.ir.fused import FusedGraph, Kind
from compiler.schedule.schedule import Schedule

OPS: tuple[Kind, ...] = tuple(Kind)  # opcode = position in this tuple
ARITY: dict[Kind, int] = {
    Kind.EMBED: 2,
    Kind.QKV_ROPE_APPEND: 2,
    Kind.ATTN_PARTIAL: 2,
    Kind.ATTN_MERGE: 1,
    Kind.OPROJ_RESIDUAL: 2,
    Kind.GATE_UP_SILU: 2,
    Kind.DOWN_PARTIAL: 3,
    Kind.DOWN_RESIDUAL: 2,
    Kind.LMHEAD_ARGMAX: 1,
    Kind.ARGMAX_REDUCE: 0,
}
PER_LINE = 16  # numbers per line in the flat tables


def op_name(kind: Kind) -> str:
    return f"OP_{kind.name}"


def check_schedule(fg: FusedGraph, sched: Schedule) -> None:
    """The structural facts the tables (and the kernel loop) rely on; the verifier proves the rest."""
    n = len(sched.tasks)
    if [t.id for t in sched.tasks] != list(range(n)):
        raise CodegenError("task ids must be 0 .. n-1 in order")
    if len(sched.queues) != sched.options.sm_count:
        raise CodegenError(f"{len(sched.queues)} queues for sm_count {sched.options.sm_count}")
    if sorted(i for q in sched.queues for i in q) != list(range(n)):
        raise CodegenError("queues must hold every task exactly once")
    signals = [0] * len(sched.counters)
    for t in sched.tasks:
        ins = fg.instrs[t.instr] if 0 <= t.instr < len(fg.instrs) else None
        if ins is None or ins.kind != t.kind or ins.layer != t.layer:
            raise CodegenError(f"task {t.id} does not match instruction {t.instr}")
        if len(t.params) != ARITY[t.kind]:
            raise CodegenError(
                f"task {t.id}: {t.kind.value} takes {ARITY[t.kind]} params, got {len(t.params)}"
            )
        if any(not 0 <= v < 2**16 for v in t.params) or not -1 <= t.layer < 2**15:
            raise CodegenError(f"task {t.id}: params {t.params} or layer {t.layer} exceed 16 bits")
        if not 0 <= t.signal < len(signals):
            raise CodegenError(f"task {t.id}: no counter {t.signal}")
        signals[t.signal] += 1
        for c, count, off in t.waits:
            if not 0 <= c < len(signals) or off not in (0, -1) or count < 0:
                raise CodegenError(f"task {t.id}: bad wait {(c, count, off)}")
        if len(t.waits) >= 2**16:
            raise CodegenError(f"task {t.id}: too many waits")
    for (name, per_step), got in zip(sched.counters, signals, strict=True):
        if per_step != got:
            raise CodegenError(f"counter {name}: per_step {per_step} but {got} tasks signal it")


def _flat(e: Emitter, decl: str, values: list[int]) -> None:
    with e.block(f"{decl} =", close="};"):
        for i in range(0, len(values), PER_LINE):
            e.line(",".join(str(v) for v in values[i : i + PER_LINE]) + ",")


def render_tables(e: Emitter, sched: Schedule) -> None:
    """TASKS, WAITS, PER_STEP, QUEUE_OFF and QUEUE (call `check_schedule` first)."""
    e.comment("---- opcodes: kinds in compiler.ir.fused.Kind order ----")
    with e.block("enum Op : unsigned short", close="};"):
        for i, k in enumerate(OPS):
            e.line(f"{op_name(k)} = {i},")
    e.blank()
    waits = [w for t in sched.tasks for w in t.waits]
    e.comment("---- the schedule (schedule.json), one task per line ----")
    e.comment(
        "TASKS[id] = {op, layer, a, b, c, nw, w0, signal}: params (a, b, c) as in schedule.py;"
    )
    e.comment(
        "before it runs, WAITS[w0 .. w0+nw) must hold; when it is done, counters[signal] += 1."
    )
    e.line(f"constexpr int NTASKS = {len(sched.tasks)};")
    e.line(f"constexpr int NWAITS = {len(waits)};")
    e.line(f"constexpr int NCOUNTERS = {len(sched.counters)};")
    w0 = 0
    with e.block("__device__ const Task TASKS[NTASKS] =", close="};"):
        for t in sched.tasks:
            a, b, c = (*t.params, 0, 0, 0)[:3]
            e.line(f"{{{OPS.index(t.kind)},{t.layer},{a},{b},{c},{len(t.waits)},{w0},{t.signal}}},")
            w0 += len(t.waits)
    e.comment(
        "WAITS[i] = {counter, count, step_offset}: counters[counter] >= (step + step_offset) * PER_STEP[counter] + count"
    )
    with e.block("__device__ const Wait WAITS[NWAITS > 0 ? NWAITS : 1] =", close="};"):
        for c, count, off in waits or [(0, 0, 0)]:
            e.line(f"{{{c},{count},{off}}},")
    e.comment(
        "PER_STEP[c]: tasks that signal counter c in one step (counter names in schedule.json)"
    )
    _flat(e, "__device__ const int PER_STEP[NCOUNTERS]", [p for _, p in sched.counters])
    offs = [0]
    for q in sched.queues:
        offs.append(offs[-1] + len(q))
    e.comment("queue of SM s: QUEUE[QUEUE_OFF[s] .. QUEUE_OFF[s+1]), run in order every step")
    _flat(e, "__device__ const int QUEUE_OFF[SM_COUNT + 1]", offs)
    _flat(e, "__device__ const int QUEUE[NTASKS]", [i for q in sched.queues for i in q])


@dataclass(frozen=True)
class ParsedTables:
    """The schedule as kernel.cu encodes it."""

    tasks: tuple[
        tuple[Kind, int, tuple[int, ...], tuple[tuple[int, int, int], ...], int], ...
    ]  # kind, layer, params, waits, signal
    per_step: tuple[int, ...]
    queues: tuple[tuple[int, ...], ...]


def _array(text: str, name: str) -> str:
    m = re.search(rf"__device__ const \w+ {name}\[[^\]]*\] = \{{\n(.*?)\n\}};", text, re.S)
    if m is None:
        raise CodegenError(f"kernel.cu has no table {name}")
    return m.group(1)


def _ints(body: str) -> list[int]:
    return [int(v) for v in re.findall(r"-?\d+", body)]


def parse_tables(text: str) -> ParsedTables:
    """Read TASKS, WAITS, PER_STEP, QUEUE_OFF and QUEUE back out of a kernel.cu."""
    recs = [_ints(r) for r in re.findall(r"\{([-\d,]+)\}", _array(text, "TASKS"))]
    waits = [tuple(_ints(r)) for r in re.findall(r"\{([-\d,]+)\}", _array(text, "WAITS"))]
    tasks = []
    for op, layer, a, b, c, nw, w0, signal in recs:
        kind = OPS[op]
        ws = tuple((w[0], w[1], w[2]) for w in waits[w0 : w0 + nw])
        tasks.append((kind, layer, (a, b, c)[: ARITY[kind]], ws, signal))
    offs, flat = _ints(_array(text, "QUEUE_OFF")), _ints(_array(text, "QUEUE"))
    queues = tuple(tuple(flat[offs[i] : offs[i + 1]]) for i in range(len(offs) - 1))
    return ParsedTables(tuple(tasks), tuple(_ints(_array(text, "PER_STEP"))), queues)
