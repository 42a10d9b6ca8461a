"""Class (g) obligations: every reduction's split is a function of static configuration only.

kernel.cu sizes its reductions with integer constexprs (`P`, `KS`, `NT`, `CI = I / KS`,
`CV = (V + NT - 1) / NT`) and cuts the KV cache at run time, in attn_partial, from the decode
position (`lo`, `n`, `c`, `j0`, `j1`: the key range [j0, j1) of partition `part`). Those
right-hand sides, and whatever names they reference, transitively, are read from kernel.cu and
translated to linear integer arithmetic (C++ division truncates toward zero; `div` in SMT-LIB
floors, so a division is encoded by the sign of its dividend). `B` (batch rows) and `SM_COUNT`
are left symbolic; every other constexpr is folded to its declared value. Per reduction, for
symbolic B_1, B_2 and SM_COUNT_1, SM_COUNT_2 in [1, 1024], the claim is (E8 in
verification.md):

* split-K and the LM head, for a symbolic element index x in [0, N) (N as under B1): every
  divisor is nonzero under both configurations, N, the number of chunks K and the chunk
  [k*Z, min((k+1)*Z, N)), k = x / Z, of x are the same under (B1, SM1) as under (B2, SM2); for
  the split-K chunk of column j (N = I, K = KS, Z = CI) and the LM-head tile of vocabulary row
  v (N = V, K = NT, Z = CV);
* split-KV, for a symbolic position pos in [0, S) and partition part in [0, P): every divisor
  is nonzero, and S, P and the partition's keys [j0, j1) are the same under both.

So the partition of every reduction, and with the combiners' fixed index order the order in
which its partials are combined, cannot depend on the batch size or the number of SMs.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from verifier.obligation import Obligation

Expr = int | str | tuple[Any, ...]  # literal, name, ("neg", a), ("?", c, a, b) or (op, a, b)
SYMBOLIC = ("B", "SM_COUNT")  # what a reduction's split must not depend on
RANGE = 1024  # B1, B2, SM1, SM2 in [1, RANGE]
REDUCTIONS = (  # (mode, subject, index, N, K, Z)
    ("split_k", "split-K chunk of column j", "j", "I", "KS", "CI"),
    ("lm_tiles", "LM-head tile of vocabulary row v", "v", "V", "NT", "CV"),
)
KEY_VARS = ("pos", "part")  # attn_partial's free variables: the position and the task's partition
KEY_RANGE = ("j0", "j1")  # attn_partial's locals holding partition part's keys [j0, j1)
_TOKEN = re.compile(r"\s*(?:(\d+)|([A-Za-z_]\w*)|(<=|>=|==|!=|.))")
_COMPARE = {"<": "<", "<=": "<=", ">": ">", ">=": ">=", "==": "=", "!=": "distinct"}
_CALLS = ("min", "max")


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
    """An integer C++ expression of literals, names, + - * / %, comparisons, `c ? a : b`,
    min(a, b), max(a, b) and parentheses."""
    tokens = [m.group(1) or m.group(2) or m.group(3) for m in _TOKEN.finditer(text)]
    tokens = [t for t in tokens if t and not t.isspace()]
    at = 0

    def peek() -> str:
        return tokens[at] if at < len(tokens) else ""

    def take() -> str:
        nonlocal at
        at += 1
        return tokens[at - 1]

    def expect(t: str) -> None:
        if not peek() or take() != t:
            raise ExprError(f"expected {t!r} in {text!r}")

    def atom() -> Expr:
        t = take() if peek() else ""
        if t == "(":
            e = ternary()
            expect(")")
            return e
        if t == "-":
            return ("neg", atom())
        if t == "+":
            return atom()
        if t.isdigit():
            return int(t)
        if t in _CALLS and peek() == "(":
            take()
            a = ternary()
            expect(",")
            b = ternary()
            expect(")")
            return (t, a, b)
        if re.fullmatch(r"[A-Za-z_]\w*", t) and peek() != "(":
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

    def ternary() -> Expr:
        e = binary(0)
        if peek() in _COMPARE:
            e = (take(), e, binary(0))
        if peek() == "?":
            take()
            a = ternary()
            expect(":")
            e = ("?", e, a, ternary())
        return e

    e = ternary()
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
    """C++ semantics: / and % truncate toward zero (ZeroDivisionError on a zero divisor), a
    comparison is 1 or 0, `c ? a : b` evaluates one branch."""
    if isinstance(e, int):
        return e
    if isinstance(e, str):
        return env(e)
    if e[0] == "neg":
        return -evaluate(e[1], env)
    if e[0] == "?":
        return evaluate(e[2] if evaluate(e[1], env) else e[3], env)
    a, b = evaluate(e[1], env), evaluate(e[2], env)
    if e[0] in ("/", "%"):
        q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
        return q if e[0] == "/" else a - b * q
    if e[0] in _COMPARE:
        return int(
            {"<": a < b, "<=": a <= b, ">": a > b, ">=": a >= b, "==": a == b}.get(e[0], a != b)
        )
    return {"+": a + b, "-": a - b, "*": a * b, "min": min(a, b), "max": max(a, b)}[e[0]]


def smt(e: Expr, env: Callable[[str], str], divisors: list[str]) -> str:
    """SMT-LIB for `e` (names through `env`), with C++ division; divisors are collected (those
    of both branches of a `?:`, so a divisor is required nonzero wherever it is written)."""
    if isinstance(e, int):
        return str(e)
    if isinstance(e, str):
        return env(e)
    if e[0] == "neg":
        return f"(- {smt(e[1], env, divisors)})"
    if e[0] == "?":
        a, b = smt(e[2], env, divisors), smt(e[3], env, divisors)
        return f"(ite {smt_bool(e[1], env, divisors)} {a} {b})"
    if e[0] in _COMPARE:
        return f"(ite {smt_bool(e, env, divisors)} 1 0)"
    a, b = smt(e[1], env, divisors), smt(e[2], env, divisors)
    if e[0] in ("min", "max"):
        return f"(ite ({'<=' if e[0] == 'min' else '>='} {a} {b}) {a} {b})"
    if e[0] not in ("/", "%"):
        return f"({e[0]} {a} {b})"
    divisors.append(b)
    q = f"(ite (>= {a} 0) (div {a} {b}) (- (div (- {a}) {b})))"
    return q if e[0] == "/" else f"(- {a} (* {b} {q}))"


def smt_bool(e: Expr, env: Callable[[str], str], divisors: list[str]) -> str:
    """SMT-LIB for `e` as a condition (C++: nonzero is true)."""
    if isinstance(e, tuple) and e[0] in _COMPARE:
        a, b = smt(e[1], env, divisors), smt(e[2], env, divisors)
        return f"({_COMPARE[e[0]]} {a} {b})"
    return f"(not (= {smt(e, env, divisors)} 0))"


def locals_of(kernel: str, function: str) -> dict[str, str]:
    """Right-hand sides of the `const int NAME = ...` declarations in the body of kernel.cu's
    device function `function` (comments dropped; a statement may declare several)."""
    body = re.search(rf"void {function}\(.*?\n\}}\n", kernel, re.S)
    if body is None:
        raise ExprError(f"kernel.cu: no device function {function}")
    text = re.sub(r"//[^\n]*", "", body.group(0).partition("{")[2])
    out: dict[str, str] = {}
    for decl in re.findall(r"^\s*const int\s+([^;]*);", text, re.M):
        depth, start = 0, 0
        for i, ch in enumerate(decl + ","):
            depth += {"(": 1, ")": -1}.get(ch, 0)
            if ch == "," and depth == 0:
                name, _, rhs = decl[start:i].partition("=")
                name, start = name.strip(), i + 1
                if name in out:
                    raise ExprError(f"kernel.cu: {function} declares {name} twice")
                out[name] = rhs.strip()
    return out


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
                return literal(self.value(n, {}))
            if n not in done:
                done.add(n)
                body = smt(self.expr(n), ref, divisors)
                lines.append(f"(define-fun {n}{suffix} () Int {body})")
            return f"{n}{suffix}"

        for r in roots:
            ref(r)
        return "\n".join(lines), divisors


def literal(v: int) -> str:
    """An SMT-LIB integer literal (a negative one as a negation)."""
    return str(v) if v >= 0 else f"(- {-v})"


def key_range(kernel: str) -> dict[str, str]:
    """attn_partial's j0 and j1 (partition part's keys [j0, j1) at pos) and the locals they are
    computed from, transitively, as kernel.cu writes them; pos (the function's parameter) and
    part (the task's second parameter, t.b) are left free."""
    found = locals_of(kernel, "attn_partial")
    if "pos" in found or found.get("part") != "t.b":
        raise ExprError("kernel.cu: attn_partial's pos is not its parameter, or part not t.b")
    out: dict[str, str] = {}
    todo = list(KEY_RANGE)
    while todo:
        n = todo.pop()
        if n in out or n in KEY_VARS or n not in found:
            if n in KEY_RANGE and n not in found:
                raise ExprError(f"kernel.cu: attn_partial declares no const int {n}")
            continue
        out[n] = found[n]
        todo += sorted(names(parse(found[n])))
    return out


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


def split_kv(kernel: str) -> Obligation:
    """S, P and partition part's keys [j0, j1) at pos (attn_partial's text) are the same under
    (B1, SM1) and (B2, SM2), for every pos in [0, S) and part in [0, P) (an empty range is the
    same as any other)."""
    free = SYMBOLIC + KEY_VARS
    c = Constants(kernel, free)
    c.text |= key_range(kernel)  # attn_partial's locals shadow the constexprs
    roots = ("S", "P", *KEY_RANGE)
    decls = [f"(declare-const {s}_{i} Int)" for s in free for i in (1, 2)]
    ranges = [f"(<= 1 {s}_{i} {RANGE})" for s in SYMBOLIC for i in (1, 2)]
    terms, defined, facts = [], [], [*decls, f"(assert (and {' '.join(ranges)}))"]
    for i in (1, 2):
        defs, divisors = c.definitions(roots, f"_{i}")
        terms.append([f"{r}_{i}" if c.depends(r) else literal(c.value(r, {})) for r in roots])
        defined += [f"(not (= {d} 0))" for d in divisors]
        facts.append(defs)
    (s1, p1, _, _), (_, _, a2, b2) = terms
    facts.append(
        f"(assert (and (= pos_1 pos_2) (= part_1 part_2) (<= 0 pos_1) (< pos_1 {s1}) "
        f"(<= 0 part_1) (< part_1 {p1})))"
    )
    one, two = terms
    same = " ".join(f"(= {a} {b})" for a, b in zip(one[:2], two[:2], strict=True))
    keys = (
        f"(or (and (>= {one[2]} {one[3]}) (>= {a2} {b2})) "
        f"(and (= {one[2]} {a2}) (= {one[3]} {b2})))"
    )
    rhs = ", ".join(f"{m} = {c.text[m]}" for m in KEY_RANGE)
    return Obligation(
        "g",
        "reduction split independent of batch size and SM count",
        -1,
        f"split-KV keys of partition part at pos ({rhs})",
        "\n".join(f for f in facts if f) + "\n",
        f"(assert (not (and true {' '.join(defined)} {same} {keys})))\n",
        data={
            "mode": "batch_kv",
            "reduction": "split_kv",
            "names": list(roots),
            "defs": {m: c.text[m] for m in sorted(c.exprs)},
        },
    )


def obligations(kernel: str) -> list[Obligation]:
    """One obligation per reduction of kernel.cu: split-KV, split-K, the LM head (ExprError:
    its constants or attn_partial's key range cannot be read)."""
    c = Constants(kernel)
    return [split_kv(kernel), *(_chunk(*r, c) for r in REDUCTIONS)]


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


def replay_kv(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    """Re-evaluate S, P and the key range of the assignment's partition under both
    configurations."""
    c = Constants("", SYMBOLIC + KEY_VARS)
    c.text = dict(data["defs"])
    pos, part = int(values.get("pos_1", 0)), int(values.get("part_1", 0))
    seen = []
    for i in (1, 2):
        at = {s: int(values.get(f"{s}_{i}", 1)) for s in SYMBOLIC} | {"pos": pos, "part": part}
        try:
            n, k, j0, j1 = (c.value(m, at) for m in data["names"])
        except ZeroDivisionError:
            where = f"B = {at['B']}, SM_COUNT = {at['SM_COUNT']}"
            return True, f"split_kv: at {where}, pos = {pos} a division by 0"
        seen.append((n, k, (j0, j1) if j0 < j1 else "empty"))
    cfg = ", ".join(f"{s} = {values.get(f'{s}_1')} vs {values.get(f'{s}_2')}" for s in SYMBOLIC)
    what = f"pos = {pos}, part = {part}: (S, P, keys) = {seen[0]} vs {seen[1]}"
    return seen[0] != seen[1], f"split_kv: {cfg}: {what}"
