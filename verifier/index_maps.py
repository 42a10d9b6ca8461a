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

from compiler.schedule.schedule import Schedule
from verifier.model import LAYER_KINDS, Bound, Geometry, Region, Step, Touch, program
from verifier.obligation import Obligation

Tasked = tuple[int, Region]  # (task id, region)


def _term(b: Bound) -> str:
    if not b.at_pos:
        return str(b.const) if b.const >= 0 else f"(- {-b.const})"
    scaled = "pos" if b.at_pos == 1 else f"(* {b.at_pos} pos)"
    return scaled if not b.const else f"(+ {scaled} {_term(Bound.of(b.const))})"


def _inside(r: Region) -> str:
    """SMT-LIB: element (e0, e1, ...) lies in r (at the symbolic position pos)."""
    parts = [f"(<= {_term(lo)} e{d}) (< e{d} {_term(hi)})" for d, (lo, hi) in enumerate(r.spans)]
    return f"(and {' '.join(parts)})"


def _in_shape(shape: Sequence[int]) -> str:
    return "(and " + " ".join(f"(<= 0 e{d}) (< e{d} {n})" for d, n in enumerate(shape)) + ")"


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


def _facts(shape: Sequence[int], S: int, regions: Sequence[Region]) -> str:
    """Declarations of e0.. and pos, with their ranges."""
    lines = ["(declare-const pos Int)", f"(assert (and (>= pos 0) (< pos {S})))"]
    for d, (lo, hi) in enumerate(_bounds(regions, shape)):
        lines += [
            f"(declare-const e{d} Int)",
            f"(assert (and (>= e{d} {_term(Bound.of(lo))}) (<= e{d} {hi})))",
        ]
    return "\n".join(lines) + "\n"


def writers(
    step: Step | None, buffer: str, shape: Sequence[int], writes: Sequence[Tasked], g: Geometry
) -> Obligation:
    """Exactly one writer per element of `buffer` for the tasks of `step` (see the docstring)."""
    ref = [r for r in (step.writes if step else ()) if r.buffer == buffer]
    facts = _facts(shape, g.S, [r for _, r in writes] + ref)
    count = "(+ 0 " + " ".join(f"(ite {_inside(r)} 1 0)" for _, r in writes) + ")"
    in_ref = "(or false " + " ".join(_inside(r) for r in ref) + ")"
    expected = f"(ite (and {_in_shape(shape)} {in_ref}) 1 0)"
    kind = step.kind.value if step else "tasks"
    return Obligation(
        "b",
        "one writer per element" if ref else "no write outside the step's outputs",
        step.layer if step else -1,
        f"{kind} {_generic(buffer)}",
        facts,
        f"(assert (not (= {count} {expected})))\n",
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
    """No element of a read region of `buffer` lies outside the buffer (each distinct region
    once: many tasks read the same one)."""
    distinct = sorted({r.spans: r for _, r in reads}.values(), key=lambda r: str(r.spans))
    facts = _facts(shape, g.S, distinct)
    touched = "(or " + " ".join(_inside(r) for r in distinct) + ")"
    return Obligation(
        "b",
        "reads in bounds",
        step.layer,
        f"{step.kind.value} {_generic(buffer)}",
        facts,
        f"(assert (and {touched} (not {_in_shape(shape)})))\n",
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
