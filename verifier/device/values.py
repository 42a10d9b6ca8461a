"""The symbolic values of one consumer thread of a task body (`verifier.device.execute`).

* integers (int, i64, size_t, the task's params) are `Aff`s over symbols (the task params
  "ta"/"tb"/"tc", "pos", a strided loop's index); `/` and `%` by a constant become the Aff's
  ("div", a, k) and ("mod", a, k) atoms, whose defining constraints SMT-LIB's div and mod carry;
* booleans are `Bool`s over index conditions (the terms' ("<", a, b), ("and", ..), ...);
* floats are `Real`s holding an element term (`verifier.terms`), and `NEG_INF`, -INFINITY,
  which may only meet fmaxf (its identity) and comparisons;
* a 32-bit word of two bf16 halves is a `Word` (the bit tricks of bf16_lo / bf16_hi);
* pointers are `Ptr`s into a global array (named by its role), offset in elements of the
  array's own type, viewed through a scalar or vector type (float4: 4 floats);
* struct values (float4, uint4, the Task, ArgMax) are `Struct`s of named fields; the kernel
  parameters `p` and `p.layers[l]` are `Params` and `LayerRef`, whose fields are pointers;
* local variables live in `Cell`s; a local array is a cell holding a tuple.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verifier.terms import Aff, Term, add, app, const, ite, mul, neg


class Unsupported(ValueError):
    """A construct of kernel.cu the executor does not model: the task body is not proved."""

    def __init__(self, why: str, line: int = 0):
        super().__init__(f"line {line}: {why}" if line else why)
        self.line = line


TRUE: Term = ("true",)
FALSE: Term = ("false",)


@dataclass(frozen=True)
class Bool:
    cond: Term


@dataclass(frozen=True)
class Real:
    term: Term


@dataclass(frozen=True)
class NegInf:
    pass


NEG_INF = NegInf()


@dataclass(frozen=True)
class Word:
    """A 32-bit word: its low and high 16-bit halves, each a bf16 element term or None (zero)."""

    lo: Term | None
    hi: Term | None


@dataclass(frozen=True)
class Ptr:
    array: str  # the role name of the global array
    elem: str  # the array's element type: float, bf16, i64
    offset: Aff  # in elements of `elem`
    view: str  # the pointed-to type: float, bf16, i64, float4, float2, uint4, uint2, unsigned


@dataclass(frozen=True)
class Struct:
    type: str
    fields: tuple[tuple[str, Any], ...]

    def get(self, name: str, line: int = 0) -> Any:
        for k, v in self.fields:
            if k == name:
                return v
        raise Unsupported(f"{self.type} has no field {name}", line)

    def set(self, name: str, value: Any) -> Struct:
        return Struct(self.type, tuple((k, value if k == name else v) for k, v in self.fields))


@dataclass(frozen=True)
class Params:
    """`p`: the kernel's parameters; its fields are global arrays (or `p.layers`)."""


@dataclass(frozen=True)
class Layers:
    """`p.layers`, indexed by a layer."""


@dataclass(frozen=True)
class LayerRef:
    """`p.layers[l]`: `offset` layers from the task's own (0: its own layer)."""

    offset: int


@dataclass(frozen=True)
class Undef:
    """A local never assigned: reading it is an error of the kernel."""

    name: str


@dataclass(frozen=True)
class NullPtr:
    """`nullptr`: may only be compared with a pointer."""


NULL = NullPtr()


@dataclass(frozen=True)
class Closure:
    """A lambda: its node (`nodes.Lambda`) and the scopes it captures by reference."""

    node: Any
    scopes: tuple[Any, ...]


@dataclass(frozen=True)
class Choice:
    """A pointer chosen by conditions (a row map's returns under conditions): the first option
    whose condition holds; the conditions are path guards, exclusive of one another."""

    options: tuple[tuple[Term, Any], ...]


@dataclass
class Cell:
    value: Any
    name: str = ""
    readonly: bool = False
    ident: int = field(default=0)


# ---- conditions --------------------------------------------------------------------------------


def not_(c: Term) -> Term:
    if c == TRUE:
        return FALSE
    if c == FALSE:
        return TRUE
    if c[0] == "not":
        return tuple(c[1])
    return ("not", c)


def and_(*cs: Term) -> Term:
    out: list[Term] = []
    for c in cs:
        if c == FALSE:
            return FALSE
        if c == TRUE:
            continue
        out += list(c[1:]) if c[0] == "and" else [c]
    out = list(dict.fromkeys(out))
    return TRUE if not out else out[0] if len(out) == 1 else ("and", *out)


def or_(*cs: Term) -> Term:
    out: list[Term] = []
    for c in cs:
        if c == TRUE:
            return TRUE
        if c == FALSE:
            continue
        out += list(c[1:]) if c[0] == "or" else [c]
    out = list(dict.fromkeys(out))
    return FALSE if not out else out[0] if len(out) == 1 else ("or", *out)


def rename(x: Any, names: dict[str, str]) -> Any:
    """x (an Aff, a term or a condition) with the index variables in `names` renamed."""
    if isinstance(x, Aff):
        out = Aff(x.const)
        for a, c in x.terms:
            atom = names.get(a, a) if isinstance(a, str) else rename(a, names)
            out = out + Aff(0, ((atom, c),))
        return out
    if isinstance(x, tuple):
        return tuple(rename(y, names) for y in x)
    return x


# ---- operations on values ---------------------------------------------------------------------------------


def real(v: Any) -> Term:
    if isinstance(v, Real):
        return v.term
    if isinstance(v, Aff):
        return const(v.const) if v.is_const() else ("r", v)
    if isinstance(v, NegInf):
        raise Unsupported("-INFINITY in arithmetic")
    raise Unsupported(f"a {type(v).__name__} used as a float")


def quotient(x: Term, y: Term) -> Term:
    """x / y over the reals: by a constant, the product by its inverse; x / (1 + exp(-x)) is
    x * sigmoid(x) (SiLU, as the model's terms write it); else x * recip(y)."""
    if y[0] == "c" and y[1] != 0:
        return mul(x, const(1 / y[1]))
    if y == add(const(1), app("exp", neg(x))):
        return mul(x, app("sigmoid", x))
    return mul(x, app("recip", y))


def merge(c: Term, a: Any, b: Any, line: int) -> Any:
    """The value that is a where c holds, else b."""
    if a == b:
        return a
    if (
        isinstance(a, (Real, Aff))
        and isinstance(b, (Real, Aff))
        and not (isinstance(a, Aff) and isinstance(b, Aff))
    ):
        return Real(ite(c, real(a), real(b)))
    if isinstance(a, Real) and isinstance(b, Real):
        return Real(ite(c, a.term, b.term))
    if isinstance(a, Struct) and isinstance(b, Struct) and a.type == b.type:
        return Struct(
            a.type,
            tuple(
                (k, merge(c, x, y, line)) for (k, x), (_, y) in zip(a.fields, b.fields, strict=True)
            ),
        )
    if isinstance(a, tuple) and isinstance(b, tuple) and len(a) == len(b):
        return tuple(merge(c, x, y, line) for x, y in zip(a, b, strict=True))
    if isinstance(a, Undef) or isinstance(b, Undef):
        return a if isinstance(a, Undef) else b
    raise Unsupported(
        f"a {type(a).__name__} that differs between the branches of a condition", line
    )


def word_op(op: str, w: Word, k: int, line: int) -> Word:
    """The bit operations of bf16_lo / bf16_hi on a word of two bf16 halves."""
    if op == "<<" and k == 16:
        return Word(None, w.lo)
    if op == ">>" and k == 16:
        return Word(w.hi, None)
    if op == "&" and k == 0xFFFF0000:
        return Word(None, w.hi)
    if op == "&" and k == 0x0000FFFF:
        return Word(w.lo, None)
    raise Unsupported(f"word {op} {k:#x}", line)
