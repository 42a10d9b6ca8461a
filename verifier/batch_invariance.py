"""Class (g) obligations: every reduction's split is a function of static configuration only.

kernel.cu sizes its reductions with integer constexprs (`P`, `KS`, `NT`, `C = (S + P - 1) / P`,
`CI = I / KS`, `CV = (V + NT - 1) / NT`). Their right-hand sides, and whatever names those
reference, transitively, are read from kernel.cu and translated to linear integer arithmetic
(C++ division truncates toward zero; `div` in SMT-LIB floors, so a division is encoded by the
sign of its dividend). `B` (batch rows) and `SM_COUNT` are left symbolic; every other name is
folded to its declared value. Per reduction, for symbolic B_1, B_2 and SM_COUNT_1, SM_COUNT_2 in [1, 1024] and a
symbolic element index x in [0, N) (N as under B1), the claim is (E8 in verification.md):

    every divisor is nonzero under both configurations, N, the number of chunks K and the chunk
    [k*Z, min((k+1)*Z, N)), k = x / Z, of x are the same under (B1, SM1) as under (B2, SM2)

for the split-KV partition of key j (N = S, K = P, Z = C), the split-K chunk of column j
(N = I, K = KS, Z = CI) and the LM-head tile of vocabulary row v (N = V, K = NT, Z = CV). So the
partition of every reduction, and with the combiners' fixed index order the order in which its
partials are combined, cannot depend on the batch size or the number of SMs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from verifier.obligation import Obligation

Expr = int | str | tuple[Any, ...]  # literal, name, ("neg", a) or (op, a, b)
SYMBOLIC = ("B", "SM_COUNT")  # what a reduction's split must not depend on
RANGE = 1024  # B1, B2, SM1, SM2 in [1, RANGE]
REDUCTIONS = (  # (mode, subject, index, N, K, Z)
    ("split_kv", "split-KV partition of key j", "j", "S", "P", "C"),
    ("split_k", "split-K chunk of column j", "j", "I", "KS", "CI"),
    ("lm_tiles", "LM-head tile of vocabulary row v", "v", "V", "NT", "CV"),
)
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|(.))")


class ExprError(ValueError):
    """A constexpr this reader cannot evaluate (unknown name, unsupported syntax, cycle)."""


def constexprs(kernel: str) -> dict[str, str]:
    """Right-hand sides of kernel.cu's top-level `constexpr int NAME = ...;` (comments dropped)."""
    out: dict[str, str] = {}
    for name, rhs in re.findall(r"^constexpr int (\w+) = ([^;]*);", kernel, re.M):
        if name in out:
            raise ExprError(f"kernel.cu declares constexpr int {name} twice")
        out[name] = rhs.strip()
    return out


def parse(text: str) -> Expr:
    """An integer C++ expression of literals, names, + - * / % and parentheses."""
    tokens = [m.group(1) or m.group(2) or m.group(3) for m in _TOKEN.finditer(text)]
    tokens = [t for t in tokens if t and not t.isspace()]
    at = 0

    def peek() -> str:
        return tokens[at] if at < len(tokens) else ""

    def take() -> str:
        nonlocal at
        at += 1
        return tokens[at - 1]

    def atom() -> Expr:
        t = take() if peek() else ""
        if t == "(":
            e = binary(0)
            if not peek() or take() != ")":
                raise ExprError(f"unbalanced parentheses in {text!r}")
            return e
        if t == "-":
            return ("neg", atom())
        if t == "+":
            return atom()
        if t.isdigit():
            return int(t)
        if re.fullmatch(r"[A-Za-z_]\w*", t):
            return t
        raise ExprError(f"cannot read {t!r} in {text!r}")

    levels = (("+", "-"), ("*", "/", "%"))

    def binary(level: int) -> Expr:
        if level == len(levels):
            return atom()
        e = binary(level + 1)
        while peek() in levels[level]:
            e = (take(), e, binary(level + 1))
        return e

    e = binary(0)
    if at != len(tokens):
        raise ExprError(f"cannot read {' '.join(tokens[at:])!r} in {text!r}")
    return e


def names(e: Expr) -> set[str]:
    if isinstance(e, str):
        return {e}
    if isinstance(e, tuple):
        return set().union(*(names(a) for a in e[1:]))
    return set()


def evaluate(e: Expr, env: Callable[[str], int]) -> int:
    """C++ semantics: / and % truncate toward zero; ZeroDivisionError on a zero divisor."""
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        return env(e)
    if e[0] == "neg":
        return -evaluate(e[1], env)
    a, b = evaluate(e[1], env), evaluate(e[2], env)
    if e[0] in "/%":
        q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
        return q if e[0] == "/" else a - b * q
    return {"+": a + b, "-": a - b, "*": a * b}[e[0]]


def smt(e: Expr, env: Callable[[str], str], divisors: list[str]) -> str:
    """SMT-LIB for `e` (names through `env`), with C++ division; divisors are collected."""
    if isinstance(e, int):
        return str(e)
    if isinstance(e, str):
        return env(e)
    if e[0] == "neg":
        return f"(- {smt(e[1], env, divisors)})"
    a, b = smt(e[1], env, divisors), smt(e[2], env, divisors)
    if e[0] not in "/%":
        return f"({e[0]} {a} {b})"
    divisors.append(b)
    q = f"(ite (>= {a} 0) (div {a} {b}) (- (div (- {a}) {b})))"
    return q if e[0] == "/" else f"(- {a} (* {b} {q}))"


class Constants:
    """kernel.cu's integer constexprs, parsed on demand; names not depending on SYMBOLIC are
    folded to their values."""

    def __init__(self, kernel: str, symbolic: tuple[str, ...] = SYMBOLIC) -> None:
        self.text = constexprs(kernel)
        self.symbolic = symbolic
        self.exprs: dict[str, Expr] = {}
        self._deps: dict[str, set[str]] = {}

    def expr(self, name: str) -> Expr:
        if name not in self.exprs:
            if name not in self.text:
                raise ExprError(f"kernel.cu: no constexpr int {name}")
            self.exprs[name] = parse(self.text[name])
        return self.exprs[name]

    def depends(self, name: str, seen: tuple[str, ...] = ()) -> set[str]:
        """The symbolic names `name` depends on, transitively."""
        if name in self.symbolic:
            return {name}
        if name in seen:
            raise ExprError(f"kernel.cu: constexpr {name} is defined through itself")
        if name not in self._deps:
            self._deps[name] = set().union(
                *(self.depends(n, (*seen, name)) for n in names(self.expr(name)))
            )
        return self._deps[name]

    def value(self, name: str, at: dict[str, int]) -> int:
        """`name` with the symbolic names at the values `at`."""
        if name in at:
            return at[name]
        return evaluate(self.expr(name), lambda n: self.value(n, at))

    def definitions(self, roots: tuple[str, ...], suffix: str) -> tuple[str, list[str]]:
        """`define-fun`s of `roots` and their dependencies for one configuration (the symbolic
        names read as `<name><suffix>`), and the divisors their divisions use."""
        lines: list[str] = []
        divisors: list[str] = []
        done: set[str] = set()

        def ref(n: str) -> str:
            if n in self.symbolic:
                return f"{n}{suffix}"
            if not self.depends(n):
                return str(self.value(n, {}))
            if n not in done:
                done.add(n)
                body = smt(self.expr(n), ref, divisors)
                lines.append(f"(define-fun {n}{suffix} () Int {body})")
            return f"{n}{suffix}"

        for r in roots:
            ref(r)
        return "\n".join(lines), divisors


def _config(x: str, names: tuple[str, str, str], i: int, c: Constants) -> tuple[str, list[str]]:
    """Definitions for configuration i, and the terms (N, K, k, lo, hi, defined) of x's chunk."""
    defs, divisors = c.definitions(names, f"_{i}")
    n, k, z = (f"{r}_{i}" if c.depends(r) else str(c.value(r, {})) for r in names)
    idx = smt(("/", x, "Z"), lambda s: x if s == x else z, divisors)
    hi = f"(* (+ {idx} 1) {z})"
    defined = " ".join(f"(not (= {d} 0))" for d in divisors)
    return defs, [n, k, idx, f"(* {idx} {z})", f"(ite (< {hi} {n}) {hi} {n})", defined]


def _chunk(mode: str, subject: str, x: str, n: str, k: str, z: str, c: Constants) -> Obligation:
    decls = [f"(declare-const {s}_{i} Int)" for s in SYMBOLIC for i in (1, 2)]
    ranges = [f"(<= 1 {s}_{i} {RANGE})" for s in SYMBOLIC for i in (1, 2)]
    defs1, one = _config(x, (n, k, z), 1, c)
    defs2, two = _config(x, (n, k, z), 2, c)
    facts = [*decls, f"(declare-const {x} Int)", f"(assert (and {' '.join(ranges)}))"]
    facts += [defs1, defs2, f"(assert (and (<= 0 {x}) (< {x} {one[0]})))"]
    same = " ".join(f"(= {a} {b})" for a, b in zip(one[:-1], two[:-1], strict=True))
    rhs = ", ".join(f"{m} = {c.text[m]}" for m in (n, k, z))
    return Obligation(
        "g",
        "reduction split independent of batch size and SM count",
        -1,
        f"{subject} ({rhs})",
        "\n".join(f for f in facts if f) + "\n",
        f"(assert (not (and {one[-1]} {two[-1]} {same})))\n",
        data={
            "mode": "batch",
            "reduction": mode,
            "index": x,
            "names": [n, k, z],
            "defs": {m: c.text[m] for m in sorted(c.exprs)},
        },
    )


def obligations(kernel: str) -> list[Obligation]:
    """One obligation per reduction of kernel.cu (ExprError: its constants cannot be read)."""
    c = Constants(kernel)
    return [_chunk(*r, c) for r in REDUCTIONS]


def replay(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    """Re-evaluate the constants in Python under both configurations of the assignment."""
    c = Constants("")
    c.text = dict(data["defs"])
    x = int(values.get(data["index"], 0))
    seen = []
    for i in (1, 2):
        at = {s: int(values.get(f"{s}_{i}", 1)) for s in SYMBOLIC}
        try:
            n, k, z = (c.value(m, at) for m in data["names"])
            idx = evaluate(("/", x, z), int)
        except ZeroDivisionError:
            where = f"B = {at['B']}, SM_COUNT = {at['SM_COUNT']}"
            return True, f"{data['reduction']}: at {where} a constexpr divides by 0"
        seen.append((n, k, idx, idx * z, min((idx + 1) * z, n)))
    cfg = ", ".join(f"{s} = {values.get(f'{s}_1')} vs {values.get(f'{s}_2')}" for s in SYMBOLIC)
    what = f"{data['index']} = {x}: (N, chunks, chunk, lo, hi) = {seen[0]} vs {seen[1]}"
    return seen[0] != seen[1], f"{data['reduction']}: {cfg}: {what}"
