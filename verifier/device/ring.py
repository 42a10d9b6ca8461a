"""The weight ring of a matvec, for the symbolic executor (`verifier.device.fma`): the slots the
producer fills and the slots the consumers read, matched by their place in the sequence.

Producer: `load_<name>` runs with `produce(sm, r, row, v0, rows, col, width, pitch)` summarized
by its contract (the copy: segment i of the slot, byte i * pitch, holds row(v0 + i)[col + c]
for c < width), each call the next slot of the sequence. Consumer: `consume(sm, r)` is the slot
at the ring position, `release(sm, r)` moves the position on, both on every path of the warp
(never under a condition); a bf16 read of slot t at element offset off is segment i = off div
(pitch / 2), column c = off mod (pitch / 2) of the t-th slot produced, i.e. the weight

    W(v0 + i, col + c) = row(v0 + i)[col + c]   ("@w", the producer's row map),

and is recorded, so that an obligation proves it inside the copied segment (i < rows, c <
width). Two walks that do not visit the same (k0, v0, j) sequence read the wrong W, which the
products' pairing catches; the slot counts are compared.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verifier.device import nodes as n
from verifier.device.values import TRUE, Closure, Ptr, Real, Unsupported
from verifier.terms import Aff, Term

W = "@w"  # W(v, c): column c of the weight row of output v


@dataclass(frozen=True)
class Slot:
    row: Closure
    v0: Aff
    rows: Aff
    col: Aff
    width: Aff
    pitch: int  # bytes from segment to segment
    line: int


@dataclass(frozen=True)
class Read:
    slot: int
    segment: Aff
    column: Aff
    guard: Term
    line: int


@dataclass
class Ring:
    """What one run saw: the producer's slots, the consumer's position and reads."""

    slots: list[Slot] = field(default_factory=list)
    position: int = 0
    reads: list[Read] = field(default_factory=list)
    row: Closure | None = None  # load_matvec's row map
    K: int = 0
    nrows: Any = None


def producer(ex: Any, ring: Ring) -> None:
    """Summaries of load_matvec (its K, nrows and row map noted, then run) and produce."""

    def load(ex: Any, e: n.Call) -> Any:
        targs = [ex.expr(x) for x in e.template_args if not isinstance(x, n.Type)]
        if len(targs) < 1 or len(e.args) != 4:
            raise Unsupported("load_matvec<K>(row, nrows, sm, ring) expected", e.line)
        row = ex.expr(e.args[0])
        if not isinstance(row, Closure):
            raise Unsupported("load_matvec of a row map that is not a lambda", e.line)
        if ring.row is not None:
            raise Unsupported("the producer calls load_matvec more than once", e.line)
        ring.row, ring.nrows = row, ex.expr(e.args[1])
        ring.K = ex.int_value(targs[0], e.line)
        del ex.summaries["load_matvec"]
        try:
            return ex.call_expr(e)
        finally:
            ex.summaries["load_matvec"] = load

    def produce(ex: Any, e: n.Call) -> None:
        if len(e.args) != 8:
            raise Unsupported("produce(sm, r, row, v0, rows, col, width, pitch) expected", e.line)
        if ex.guard != TRUE:
            raise Unsupported("a slot produced under a condition", e.line)
        row, v0, rows, col, width, pitch = (ex.expr(a) for a in e.args[2:])
        if not isinstance(row, Closure) or ring.row is None or row.node is not ring.row.node:
            raise Unsupported("a slot produced from a row map that is not load_matvec's", e.line)
        p = ex.int_value(pitch, e.line)
        w = ex.int_value(width, e.line)
        slot = ex.int_value(ex.k.constant("SLOT_BYTES"), e.line)
        if p % 2 or 2 * w > p or (rows.is_const() and rows.const * p > slot):
            raise Unsupported(
                f"segments of {w} columns, {p} bytes apart, overflow the slot", e.line
            )
        ring.slots.append(Slot(row, v0, rows, col, width, p, e.line))

    ex.summaries["load_matvec"] = load
    ex.summaries["produce"] = produce


def consumer(ex: Any, ring: Ring) -> None:
    """Summaries of consume and release; reads of a slot resolve to the weight it holds."""

    def consume(ex: Any, e: n.Call) -> Ptr:
        if ex.guard != TRUE:
            raise Unsupported("a slot consumed under a condition", e.line)
        t = ring.position
        name = f"slot{t}"
        ex.shared[name] = lambda off, line: _weight(ex, ring, t, off, line)
        return Ptr(name, "bf16", Aff(0), "unsigned char")

    def release(ex: Any, e: n.Call) -> None:
        if ex.guard != TRUE:
            raise Unsupported("a slot released under a condition", e.line)
        ring.position += 1

    ex.summaries["consume"] = consume
    ex.summaries["release"] = release


def _weight(ex: Any, ring: Ring, t: int, off: Aff, line: int) -> Real:
    if t >= len(ring.slots):
        raise Unsupported(
            f"the consumer reads slot {t}, the producer fills {len(ring.slots)}", line
        )
    s = ring.slots[t]
    i, c = off.divmod(s.pitch // 2, ex.ranges)
    ring.reads.append(Read(t, i, c, ex.guard, line))
    return Real(("v", W, (s.v0 + i, s.col + c)))
