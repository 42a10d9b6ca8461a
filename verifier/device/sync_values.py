"""The abstract values of `verifier.device.interp`: what one expression of kernel.cu is, for every
thread of a CTA at once.

Integers and booleans are Z3 terms over `TID` (threadIdx.x) and free symbols: a symbol is
uniform (one value for the whole CTA: a task field, a loop count of a uniform loop) or varying
(a function of `TID`: what a thread loaded, its own loop count). A term that mentions `TID` is
varying, so "does this condition split the CTA?" is a Z3 question. Floating-point values never
decide synchronization here, so they are `Opaque` (only whether they may differ across threads
is kept). Pointers are a memory space, a region (the parameter path they were derived from,
`p.x`, `smem`, ...) and a byte offset term.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import z3

TID = z3.Int("tid")  # threadIdx.x of the thread the term is evaluated for
_fresh = itertools.count()

Term = z3.ArithRef | z3.BoolRef


@dataclass(frozen=True)
class Opaque:
    """A value the checks do not follow (a float, a vector); `varying`: may differ across threads."""

    varying: bool


@dataclass(frozen=True)
class Null:
    """nullptr."""


@dataclass(frozen=True)
class Ptr:
    """A pointer: `space` ("global", "shared", "const" tables, "param"), the region it points
    into, its byte offset there and the type of what it points to."""

    space: str
    region: str
    off: z3.ArithRef
    elem: str


@dataclass(frozen=True)
class Obj:
    """A struct read from memory (a Task from TASKS, a Layer from p.layers, the kernel's Params):
    its fields are derived from `region` and its struct definition."""

    type: str
    space: str
    region: str
    name: str  # unique per read: the names of the field symbols
    varying: bool


@dataclass(frozen=True)
class StructV:
    """A struct the code built itself (Smem, Ring, ArgMax): its fields' values."""

    type: str
    fields: tuple[tuple[str, object], ...]

    def get(self, name: str) -> object:
        for k, v in self.fields:
            if k == name:
                return v
        raise KeyError(name)

    def set(self, name: str, value: object) -> StructV:
        return StructV(self.type, tuple((k, value if k == name else v) for k, v in self.fields))


@dataclass(frozen=True)
class LocalArr:
    """A thread-local array (registers): its elements are not followed."""

    name: str


@dataclass(frozen=True)
class AtomicRef:
    """cuda::atomic_ref over the word at `ptr`; `scope` is the atomic_ref's thread scope."""

    ptr: Ptr
    scope: str


@dataclass(frozen=True)
class Order:
    """A cuda::memory_order_* constant."""

    name: str  # "relaxed", "acquire", "release", "acq_rel", "seq_cst"


@dataclass(frozen=True)
class Ref:
    """A reference (or an address taken with &) to a variable, or a field path inside one."""

    key: tuple[int, str]  # (frame, name)
    path: tuple[str, ...] = ()


@dataclass(frozen=True)
class Closure:
    fn: object  # nodes.Function or nodes.Lambda
    frame: int  # the frame a lambda captured (-1 for a function)


Value = (
    Term
    | int
    | bool
    | Opaque
    | Null
    | Ptr
    | Obj
    | StructV
    | LocalArr
    | AtomicRef
    | Order
    | Ref
    | Closure
)


def fresh(prefix: str, varying: bool, sort: str = "int") -> z3.ExprRef:
    """A new symbol: a constant, or a function of TID when it may differ across threads."""
    name = f"{prefix}#{next(_fresh)}"
    if sort == "bool":
        if varying:
            return z3.Function(name, z3.IntSort(), z3.BoolSort())(TID)
        return z3.Bool(name)
    if varying:
        return z3.Function(name, z3.IntSort(), z3.IntSort())(TID)
    return z3.Int(name)


def fresh_mark() -> int:
    """A number below every later `fresh` symbol's (`#n`) and above every earlier one's."""
    return next(_fresh)


def fresh_number(name: str) -> int:
    """The `#n` of a `fresh` symbol's name (-1 for another name)."""
    head, _, tail = name.rpartition("#")
    return int(tail) if head and tail.isdigit() else -1


_varying_cache: dict[int, tuple[z3.ExprRef, bool]] = {}  # AST id -> (the term, kept alive; answer)


def mentions_tid(e: object) -> bool:
    """Whether a term (or a value holding terms) may differ across threads."""
    if isinstance(e, (bool, int)):
        return False
    if isinstance(e, Opaque):
        return e.varying
    if isinstance(e, Obj):
        return e.varying
    if isinstance(e, Ptr):
        return mentions_tid(e.off)
    if isinstance(e, StructV):
        return any(mentions_tid(v) for _, v in e.fields)
    if not isinstance(e, z3.ExprRef):
        return False
    key = e.get_id()
    hit = _varying_cache.get(key)
    if hit is None or not hit[0].eq(e):
        hit = (e, e.eq(TID) or any(mentions_tid(c) for c in e.children()))
        _varying_cache[key] = hit
    return hit[1]


def symbols(e: z3.ExprRef) -> set[str]:
    """Names of the free constants and functions in a term."""
    out: set[str] = set()
    todo, seen = [e], set()
    while todo:
        x = todo.pop()
        if x.get_id() in seen:
            continue
        seen.add(x.get_id())
        if z3.is_app(x) and x.decl().kind() == z3.Z3_OP_UNINTERPRETED:
            out.add(x.decl().name())
        todo.extend(x.children())
    return out


def as_int(v: object, what: str = "value") -> z3.ArithRef | int:
    """An integer term for `v` (a boolean is 0/1; an opaque value becomes a fresh symbol)."""
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, int):
        return v
    if isinstance(v, z3.BoolRef):
        return z3.If(v, z3.IntVal(1), z3.IntVal(0))
    if isinstance(v, z3.ArithRef):
        return v
    if isinstance(v, Opaque):
        return fresh(what, v.varying)
    if isinstance(v, Obj):
        return fresh(v.name, v.varying)
    return fresh(what, mentions_tid(v))


def as_bool(v: object) -> z3.BoolRef | bool:
    """The truth of `v` as a C condition."""
    if isinstance(v, bool):
        return v
    if isinstance(v, int):
        return v != 0
    if isinstance(v, z3.BoolRef):
        return v
    if isinstance(v, z3.ArithRef):
        return v != 0
    if isinstance(v, Null):
        return False
    if isinstance(v, (Ptr, StructV, LocalArr, Ref, Closure, AtomicRef)):
        return True
    return fresh("cond", mentions_tid(v), "bool")


def concrete(v: object) -> int | bool | None:
    """A Python value for a term that is a numeral (after simplification), else None."""
    if isinstance(v, (bool, int)):
        return v
    if isinstance(v, z3.ExprRef):
        s = z3.simplify(v)
        if z3.is_int_value(s):
            return s.as_long()
        if z3.is_true(s):
            return True
        if z3.is_false(s):
            return False
    return None
