"""Class (b) obligations: every element written by exactly one task, every access in bounds.

Per reference step (kind, layer) and per buffer the step's tasks write, for a symbolic element
index e and a symbolic decode position pos (0 <= pos < S):

    #{tasks whose write region holds e}  ==  1 if e is in the step's reference output, else 0

where the reference output is the whole buffer, or the cache row at pos for the KV append,
and nothing for a buffer the step should not write at all (a task pointed at another layer's
cache). This one equation is coverage, exactly one writer, the bounds of every write (an
element outside the buffer is in no reference output) and the tails. Reads: no element of a
read region lies outside its buffer. Tasks are grouped by what the kernel executes (their kind
and, for layer kinds, their layer), not by the instruction the schedule says they belong to.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence

import z3

from compiler.schedule.schedule import Schedule
from verifier.model import LAYER_KINDS, Bound, Geometry, Region, Step, Touch, program
from verifier.obligation import Obligation

Tasked = tuple[int, Region]  # (task id, region)


def _term(b: Bound, pos: z3.ArithRef) -> z3.ArithRef:
    return b.at_pos * pos + b.const if b.at_pos else z3.IntVal(b.const)


def _inside(r: Region, e: Sequence[z3.ArithRef], pos: z3.ArithRef) -> z3.BoolRef:
    return z3.And(
        [
            z3.And(_term(lo, pos) <= x, x < _term(hi, pos))
            for x, (lo, hi) in zip(e, r.spans, strict=True)
        ]
    )


def _bounds(regions: Iterable[Region], shape: Sequence[int]) -> list[tuple[int, int]]:
    """A range per dimension holding every element of the regions and of the buffer (pos-
    dependent bounds lie within [0, S], which the buffer's own range already spans)."""
    out = [(-1, n) for n in shape]
    for r in regions:
        for d, (lo, hi) in enumerate(r.spans):
            if not lo.at_pos and not hi.at_pos:
                out[d] = (min(out[d][0], lo.const - 1), max(out[d][1], hi.const))
    return out


def _span_json(r: Region) -> list[list[int]]:
    return [[lo.at_pos, lo.const, hi.at_pos, hi.const] for lo, hi in r.spans]


def _query(
    name: str, shape: Sequence[int], S: int, regions: Sequence[Region]
) -> tuple[list[z3.ArithRef], z3.ArithRef, list[z3.BoolRef]]:
    """Element variables e0.. and pos, with their ranges as assumptions."""
    pos = z3.Int("pos")
    e = [z3.Int(f"e{d}") for d in range(len(shape))]
    facts = [pos >= 0, pos < S]
    for x, (lo, hi) in zip(e, _bounds(regions, shape), strict=True):
        facts += [x >= lo, x <= hi]
    return e, pos, facts


def _text(facts: list[z3.BoolRef], goal: z3.BoolRef) -> tuple[str, str]:
    s = z3.Solver()
    s.add(facts)
    return s.sexpr(), f"(assert {goal.sexpr()})\n"


def writers(
    step: Step | None, buffer: str, shape: Sequence[int], writes: Sequence[Tasked], g: Geometry
) -> Obligation:
    """Exactly one writer per element of `buffer` for the tasks of `step` (see the docstring)."""
    ref = [r for r in (step.writes if step else ()) if r.buffer == buffer]
    regions = [r for _, r in writes] + ref
    e, pos, facts = _query(buffer, shape, g.S, regions)
    count = z3.Sum([z3.If(_inside(r, e, pos), 1, 0) for _, r in writes]) if writes else z3.IntVal(0)
    in_shape = z3.And([z3.And(x >= 0, x < n) for x, n in zip(e, shape, strict=True)])
    in_ref = z3.Or([_inside(r, e, pos) for r in ref]) if ref else z3.BoolVal(False)
    expected = z3.If(z3.And(in_shape, in_ref), 1, 0)
    assumptions, goal = _text(facts, count != expected)
    kind = step.kind.value if step else "tasks"
    return Obligation(
        "b",
        "one writer per element" if ref else "no write outside the step's outputs",
        step.layer if step else -1,
        f"{kind} {_generic(buffer)}",
        assumptions,
        goal,
        data={
            "mode": "writes",
            "buffer": buffer,
            "shape": list(shape),
            "S": g.S,
            "ref": [_span_json(r) for r in ref],
            "regions": [[t, _span_json(r)] for t, r in writes],
        },
        tasks=tuple(sorted({t for t, _ in writes})),
    )


def reads_in_bounds(
    step: Step, buffer: str, shape: Sequence[int], reads: Sequence[Tasked], g: Geometry
) -> Obligation:
    """No element of a read region of `buffer` lies outside the buffer."""
    e, pos, facts = _query(buffer, shape, g.S, [r for _, r in reads])
    in_shape = z3.And([z3.And(x >= 0, x < n) for x, n in zip(e, shape, strict=True)])
    touched = z3.Or([_inside(r, e, pos) for _, r in reads])
    assumptions, goal = _text(facts, z3.And(touched, z3.Not(in_shape)))
    return Obligation(
        "b",
        "reads in bounds",
        step.layer,
        f"{step.kind.value} {_generic(buffer)}",
        assumptions,
        goal,
        data={
            "mode": "reads",
            "buffer": buffer,
            "shape": list(shape),
            "S": g.S,
            "ref": [],
            "regions": [[t, _span_json(r)] for t, r in reads],
        },
        tasks=tuple(sorted({t for t, _ in reads})),
    )


def _generic(buffer: str) -> str:
    """The buffer's name without its layer (the subject's layer is given separately)."""
    head, _, tail = buffer.rpartition(".")
    return head if tail.isdigit() else buffer


def group_key(kind_layer: tuple[object, int]) -> tuple[object, int]:
    kind, layer = kind_layer
    return (kind, layer if kind in LAYER_KINDS else -1)


def obligations(sched: Schedule, touched: dict[int, Touch], g: Geometry) -> list[Obligation]:
    """Every class (b) obligation of the schedule (tasks whose parameters do not fit their kind
    are left out of `touched` and reported by the caller)."""
    shapes = g.buffers()
    steps = {(s.kind, s.layer): s for s in program(g)}
    groups: dict[tuple[object, int], list[int]] = defaultdict(list)
    for task in sched.tasks:
        if task.id in touched:
            groups[group_key((task.kind, task.layer))].append(task.id)
    out: list[Obligation] = []
    for key in list(steps) + [k for k in groups if k not in steps]:
        step = steps.get(key)  # type: ignore[arg-type]
        ids = groups.get(key, [])
        writes: dict[str, list[Tasked]] = defaultdict(list)
        reads: dict[str, list[Tasked]] = defaultdict(list)
        for t in ids:
            for r in touched[t].writes:
                writes[r.buffer].append((t, r))
            for r in touched[t].reads:
                reads[r.buffer].append((t, r))
        names = {r.buffer for r in step.writes} if step else set()
        for buffer in sorted(names | set(writes)):
            out.append(writers(step, buffer, shapes[buffer], writes.get(buffer, []), g))
        if step is not None:
            for buffer in sorted(reads):
                out.append(reads_in_bounds(step, buffer, shapes[buffer], reads[buffer], g))
    return out
