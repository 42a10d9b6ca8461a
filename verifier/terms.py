"""Element terms: one element of a tensor as an expression over ℝ, for the algebra obligations.

A term is a nested tuple (hashable, JSON-able through `encode`/`decode`):

    ("c", q)                 a rational constant (Fraction)
    ("v", name, idx)         element idx (a tuple of Aff) of the array `name`: a buffer, a
                             weight, a table; an uninterpreted function of its indices
    ("f", fn, t)             fn(t), fn uninterpreted: rsqrt, sqrt, exp, sin, cos, sigmoid
    ("+", t, ...) ("*", t, ...)
    ("r", a)                 the integer Aff a as a real
    ("ite", cond, t, e)      cond: ("<", a, b) | ("<=", a, b) | ("=", a, b) | ("and", ...) |
                             ("or", ...) | ("not", c) over Aff
    ("sum", var, n, t)       t summed over var = 0 .. n-1 (a binder: the printed query expands
                             it into n terms, the term itself stays small)
    ("max", t, u)            the larger of t and u (fmaxf over the reals)

Division is multiplication by ("f", "recip", t), an uninterpreted reciprocal.

An `Aff` is an integer index: const + Σ coeff * atom, an atom being an index variable (a str,
with a range) or an opaque integer term ("div", a, k), ("mod", a, k), ("vi", name, idx) (an
integer array element, e.g. a token). Division and remainder by a constant simplify when the
variables' ranges allow (row-major reshapes then cancel exactly), so both sides of an
obligation usually index an array with the same Aff and agree by congruence.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

Term = tuple[Any, ...]
Ranges = Mapping[str, tuple[int, int]]  # var -> [lo, hi) ; vars not named are unbounded


@dataclass(frozen=True)
class Aff:
    const: int
    terms: tuple[tuple[Any, int], ...] = ()  # (atom, coeff), sorted by repr(atom), coeff != 0

    @staticmethod
    def of(x: int | str | Any) -> Aff:
        if isinstance(x, int):
            return Aff(x)
        return Aff(0, ((x, 1),))

    def __add__(self, o: Aff | int) -> Aff:
        o = o if isinstance(o, Aff) else Aff(o)
        d = dict(self.terms)
        for a, c in o.terms:
            d[a] = d.get(a, 0) + c
        return Aff(self.const + o.const, tuple(sorted(((a, c) for a, c in d.items() if c), key=_k)))

    def scale(self, k: int) -> Aff:
        if k == 0:
            return Aff(0)
        return Aff(self.const * k, tuple((a, c * k) for a, c in self.terms))

    def __sub__(self, o: Aff | int) -> Aff:
        return self + (o if isinstance(o, Aff) else Aff(o)).scale(-1)

    def __mul__(self, o: Aff | int) -> Aff:
        if isinstance(o, int):
            return self.scale(o)
        if not o.terms:
            return self.scale(o.const)
        if not self.terms:
            return o.scale(self.const)
        raise ValueError("index product of two variables")

    def is_const(self) -> bool:
        return not self.terms

    def bounds(self, ranges: Ranges) -> tuple[float, float]:
        """[lo, hi] (inclusive; inf where unknown)."""
        lo = hi = float(self.const)
        for a, c in self.terms:
            alo, ahi = _atom_bounds(a, ranges)
            lo += min(c * alo, c * ahi) if math.isfinite(alo) and math.isfinite(ahi) else -math.inf
            hi += max(c * alo, c * ahi) if math.isfinite(alo) and math.isfinite(ahi) else math.inf
        return lo, hi

    def divmod(self, k: int, ranges: Ranges) -> tuple[Aff, Aff]:
        """(self div k, self mod k), floor semantics, simplified where ranges allow."""
        if self.is_const():
            return Aff(self.const // k), Aff(self.const % k)
        q, r = Aff(self.const // k), Aff(self.const % k)
        for a, c in self.terms:
            q, r = (
                q + Aff(0, ((a, c // k),)) if c // k else q,
                r + Aff(0, ((a, c % k),)) if c % k else r,
            )
        lo, hi = r.bounds(ranges)
        if math.isfinite(lo) and math.isfinite(hi) and lo // k == hi // k:
            m = int(lo // k)  # r lies in [m*k, (m+1)*k): its quotient is m
            return q + m, r - m * k
        if r.is_const():  # cannot happen: a const remainder lies in [0, k)
            return q, r
        return q + Aff.of(("div", r, k)), Aff.of(("mod", r, k))


def _k(item: tuple[Any, int]) -> str:
    return repr(item[0])


def _atom_bounds(a: Any, ranges: Ranges) -> tuple[float, float]:
    if isinstance(a, str):
        if a in ranges:
            lo, hi = ranges[a]
            return lo, hi - 1
        return -math.inf, math.inf
    if a[0] == "mod":
        return 0, a[2] - 1
    if a[0] == "div":
        lo, hi = a[1].bounds(ranges)
        return (lo // a[2] if math.isfinite(lo) else lo), (hi // a[2] if math.isfinite(hi) else hi)
    return -math.inf, math.inf


# ---- real terms ------------------------------------------------------------------------------

ZERO: Term = ("c", Fraction(0))
ONE: Term = ("c", Fraction(1))


def const(x: Fraction | int | float) -> Term:
    return ("c", Fraction(x))


def add(*ts: Term) -> Term:
    flat: list[Term] = []
    c = Fraction(0)
    for t in ts:
        if t[0] == "+":
            flat += t[1:]
        elif t[0] == "c":
            c += t[1]
        else:
            flat.append(t)
    if c:
        flat.append(("c", c))
    if not flat:
        return ZERO
    return flat[0] if len(flat) == 1 else ("+", *flat)


def mul(*ts: Term) -> Term:
    flat: list[Term] = []
    c = Fraction(1)
    for t in ts:
        if t[0] == "*":
            flat += t[1:]
        elif t[0] == "c":
            c *= t[1]
        else:
            flat.append(t)
    if c == 0:
        return ZERO
    if c != 1 or not flat:
        flat.insert(0, ("c", c))
    return flat[0] if len(flat) == 1 else ("*", *flat)


def neg(t: Term) -> Term:
    return mul(const(-1), t)


def ite(cond: Term, a: Term, b: Term) -> Term:
    if cond == ("true",):
        return a
    if cond == ("false",):
        return b
    return a if a == b else ("ite", cond, a, b)


def app(fn: str, arg: Term) -> Term:
    """fn(arg), a condition of the argument lifted out: f(ite(c, a, b)) = ite(c, f(a), f(b))."""
    if arg[0] == "ite":
        return ite(arg[1], app(fn, arg[2]), app(fn, arg[3]))
    return ("f", fn, arg)


def compare(op: str, a: Aff, b: Aff, ranges: Ranges) -> Term:
    """a op b for op in <, <=, =, decided where the ranges decide it."""
    lo, hi = (a - b).bounds(ranges)
    if (op == "<" and hi < 0) or (op == "<=" and hi <= 0) or (op == "=" and lo == hi == 0):
        return ("true",)
    if (op == "<" and lo >= 0) or (op == "<=" and lo > 0) or (op == "=" and (lo > 0 or hi < 0)):
        return ("false",)
    return (op, a, b)


def summed(var: str, n: int, body: Term) -> Term:
    if n == 1:
        return substitute(body, {var: 0})
    return ("sum", var, n, body)


def substitute(t: Any, env: Mapping[str, int]) -> Any:
    """t with the index variables of `env` replaced by their values."""
    if isinstance(t, Aff):
        out = Aff(t.const)
        for a, c in t.terms:
            if isinstance(a, str):
                out = out + (Aff(env[a] * c) if a in env else Aff(0, ((a, c),)))
            else:
                out = out + Aff.of(substitute(a, env)).scale(c)
        return out
    if isinstance(t, tuple):
        if t and t[0] == "sum":
            inner = {k: v for k, v in env.items() if k != t[1]}
            return ("sum", t[1], t[2], substitute(t[3], inner))
        return tuple(substitute(x, env) for x in t)
    return t


# ---- numeric evaluation ----------------------------------------------------------------------

FUNCTIONS = {
    "rsqrt": lambda x: 1.0 / math.sqrt(abs(x) + 1e-300),
    "sqrt": lambda x: math.sqrt(abs(x)),
    "exp": lambda x: math.exp(min(x, 700.0)),
    "sin": math.sin,
    "cos": math.cos,
    "sigmoid": lambda x: 1.0 / (1.0 + math.exp(-max(min(x, 700.0), -700.0))),
    "recip": lambda x: 1.0 / x if x else 1e300,
}


def random_value(name: str, idx: tuple[int, ...], seed: int) -> float:
    """A deterministic pseudo-random value in [-1, 1) for an array element."""
    h = zlib.crc32(f"{seed}:{name}:{idx}".encode())
    return h / 2**31 - 1.0


def ival(a: Aff, env: Mapping[str, int], tables: Mapping[str, Any], seed: int) -> int:
    out = a.const
    for atom, c in a.terms:
        out += c * _iatom(atom, env, tables, seed)
    return out


def _iatom(a: Any, env: Mapping[str, int], tables: Mapping[str, Any], seed: int) -> int:
    if isinstance(a, str):
        return env[a]
    if a[0] == "div":
        return ival(a[1], env, tables, seed) // a[2]
    if a[0] == "mod":
        return ival(a[1], env, tables, seed) % a[2]
    if a[0] == "vi":
        idx = tuple(ival(i, env, tables, seed) for i in a[2])
        return int(
            env.get(f"{a[1]}{list(idx)}", abs(zlib.crc32(f"{seed}{a[1]}{idx}".encode())) % 97)
        )
    raise ValueError(f"unknown index atom {a[0]}")


def _free(t: Any, cache: dict[int, frozenset[str]]) -> frozenset[str]:
    """The index variables t reads that no sum inside t binds."""
    got = cache.get(id(t))
    if got is not None:
        return got
    out: frozenset[str]
    if isinstance(t, Aff):
        out = frozenset()
        for a, _ in t.terms:
            out |= frozenset({a}) if isinstance(a, str) else _free(a, cache)
    elif isinstance(t, tuple):
        out = frozenset().union(*(_free(x, cache) for x in t)) if t else frozenset()
        if t and t[0] == "sum":
            out = out - {t[1]}
    else:
        out = frozenset()
    cache[id(t)] = out
    return out


class _Eval:
    """float64 evaluation with sums and function applications memoized on the variables they
    read (an RMSNorm's rsqrt inside a matmul's sum is computed once, not once per term)."""

    def __init__(self, tables: Mapping[str, Any], seed: int):
        self.tables, self.seed = tables, seed
        self.free: dict[int, frozenset[str]] = {}
        self.memo: dict[tuple[int, tuple[tuple[str, int], ...]], float] = {}

    def __call__(self, t: Term, env: Mapping[str, int]) -> float:
        op = t[0]
        if op in ("sum", "f"):
            key = (id(t), tuple(sorted((v, env[v]) for v in _free(t, self.free) if v in env)))
            got = self.memo.get(key)
            if got is None:
                got = self.memo[key] = self._eval(t, env)
            return got
        return self._eval(t, env)

    def _eval(self, t: Term, env: Mapping[str, int]) -> float:
        op, tables, seed = t[0], self.tables, self.seed
        if op == "c":
            return float(t[1])
        if op == "v":
            idx = tuple(ival(i, env, tables, seed) for i in t[2])
            if t[1] in tables:
                table = tables[t[1]]
                return float(table[idx[0]]) if 0 <= idx[0] < len(table) else 0.0
            return random_value(t[1], idx, seed)
        if op == "f":
            return FUNCTIONS[t[1]](self(t[2], env))
        if op == "+":
            return sum(self(x, env) for x in t[1:])
        if op == "*":
            return math.prod(self(x, env) for x in t[1:])
        if op == "r":
            return float(ival(t[1], env, tables, seed))
        if op == "max":
            return max(self(t[1], env), self(t[2], env))
        if op == "ite":
            return self(t[2] if truth(t[1], env, tables, seed) else t[3], env)
        if op == "sum":
            inner = dict(env)
            total = 0.0
            for k in range(t[2]):
                inner[t[1]] = k
                total += self(t[3], inner)
            return total
        raise ValueError(f"unknown term {op}")


def evaluate(t: Term, env: Mapping[str, int], tables: Mapping[str, Any], seed: int = 0) -> float:
    """t in float64: arrays pseudo-random (tables by value), functions real."""
    return _Eval(tables, seed)(t, env)


def truth(c: Term, env: Mapping[str, int], tables: Mapping[str, Any], seed: int = 0) -> bool:
    op = c[0]
    if op in ("true", "false"):
        return op == "true"
    if op == "not":
        return not truth(c[1], env, tables, seed)
    if op in ("and", "or"):
        vals = [truth(x, env, tables, seed) for x in c[1:]]
        return all(vals) if op == "and" else any(vals)
    a, b = ival(c[1], env, tables, seed), ival(c[2], env, tables, seed)
    return a < b if op == "<" else a <= b if op == "<=" else a == b


# ---- SMT-LIB ---------------------------------------------------------------------------------


def _num(q: Fraction) -> str:
    n = (
        f"(/ {abs(q.numerator)}.0 {q.denominator}.0)"
        if q.denominator != 1
        else f"{abs(q.numerator)}.0"
    )
    return f"(- {n})" if q < 0 else n


def smt_aff(a: Aff, env: Mapping[str, int]) -> str:
    c = a.const
    parts = []
    for atom, k in a.terms:
        if isinstance(atom, str) and atom in env:
            c += k * env[atom]
            continue
        s = _smt_iatom(atom, env)
        parts.append(s if k == 1 else f"(* {k} {s})" if k > 0 else f"(* (- {-k}) {s})")
    if c or not parts:
        parts.append(str(c) if c >= 0 else f"(- {-c})")
    return parts[0] if len(parts) == 1 else f"(+ {' '.join(parts)})"


def _smt_iatom(a: Any, env: Mapping[str, int]) -> str:
    if isinstance(a, str):
        return a
    if a[0] in ("div", "mod"):
        return f"({a[0]} {smt_aff(a[1], env)} {a[2]})"
    return f"({a[1]} {' '.join(smt_aff(i, env) for i in a[2])})"


def smt(t: Term, env: Mapping[str, int] | None = None) -> str:
    """SMT-LIB2 text of t, sums expanded (env: values of bound index variables)."""
    env = env or {}
    op = t[0]
    if op == "c":
        return _num(t[1])
    if op == "v":
        return f"({t[1]} {' '.join(smt_aff(i, env) for i in t[2])})" if t[2] else t[1]
    if op == "f":
        return f"({t[1]} {smt(t[2], env)})"
    if op in ("+", "*"):
        return f"({op} {' '.join(smt(x, env) for x in t[1:])})"
    if op == "r":
        return f"(to_real {smt_aff(t[1], env)})"
    if op == "ite":
        return f"(ite {smt_cond(t[1], env)} {smt(t[2], env)} {smt(t[3], env)})"
    if op == "max":
        a, b = smt(t[1], env), smt(t[2], env)
        return f"(ite (>= {a} {b}) {a} {b})"
    if op == "sum":
        inner = dict(env)
        parts = []
        for k in range(t[2]):
            inner[t[1]] = k
            parts.append(smt(t[3], inner))
        return f"(+ {' '.join(parts)})"
    raise ValueError(f"unknown term {op}")


def smt_cond(c: Term, env: Mapping[str, int]) -> str:
    op = c[0]
    if op in ("true", "false"):
        return op
    if op == "not":
        return f"(not {smt_cond(c[1], env)})"
    if op in ("and", "or"):
        return f"({op} {' '.join(smt_cond(x, env) for x in c[1:])})"
    if op in REAL_CMP:  # a comparison of two real terms
        return f"({REAL_CMP[op]} {smt(c[1], env)} {smt(c[2], env)})"
    return f"({op} {smt_aff(c[1], env)} {smt_aff(c[2], env)})"


# conditions over real terms (the executor's float comparisons): ("r<", t, u), ...
REAL_CMP = {"r<": "<", "r<=": "<=", "r=": "="}


# ---- JSON ------------------------------------------------------------------------------------


def encode(t: Any) -> Any:
    if isinstance(t, Fraction):
        return {"q": str(t)}
    if isinstance(t, Aff):
        return {"aff": [t.const, [[encode(a), c] for a, c in t.terms]]}
    if isinstance(t, tuple):
        return [encode(x) for x in t]
    return t


def decode(d: Any) -> Any:
    if isinstance(d, dict):
        if "q" in d:
            return Fraction(d["q"])
        const_, terms = d["aff"]
        return Aff(const_, tuple((decode(a), c) for a, c in terms))
    if isinstance(d, list):
        return tuple(decode(x) for x in d)
    return d


def instances(
    t: Term, env: Mapping[str, int], tables: Mapping[str, Any], seed: int = 0
) -> dict[tuple[Any, ...], Any]:
    """Every array element t reads at `env` (sums expanded), with the value `evaluate` gives
    it: {(name, index...): value}; integer arrays (tokens) by their int value."""
    out: dict[tuple[Any, ...], Any] = {}

    def walk(x: Any, env: Mapping[str, int]) -> None:
        if isinstance(x, Aff):
            for a, _ in x.terms:
                if isinstance(a, tuple):
                    walk(a, env)
                    if a[0] == "vi":
                        idx = tuple(ival(i, env, tables, seed) for i in a[2])
                        out[(a[1], *idx)] = _iatom(a, env, tables, seed)
            return
        if not isinstance(x, tuple) or not x:
            return
        if x[0] == "sum":
            inner = dict(env)
            for k in range(x[2]):
                inner[x[1]] = k
                walk(x[3], inner)
            return
        if x[0] == "v" and x[1] not in tables:
            idx = tuple(ival(i, env, tables, seed) for i in x[2])
            out[(x[1], *idx)] = random_value(x[1], idx, seed)
        for y in x[1:]:
            walk(y, env)

    walk(t, env)
    return out
