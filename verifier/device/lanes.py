"""The 32 lanes of a warp, for the symbolic executor (`verifier.device.fma`): one symbolic thread
stands for every lane, `lane_id()` being the integer of five bit symbols

    lane = lane0 + 2 lane1 + 4 lane2 + 8 lane3 + 16 lane4,   lanei in {0, 1},

so `__shfl_xor_sync(full, v, 2^p)` (v at the lane whose bit p differs) is v with lanep replaced
by 1 - lanep: an xor butterfly stays a term over the same symbols. It is kept as the term
("xor", o, v) until a lane is chosen. `at(x, env)` substitutes integers (e.g. a concrete lane, a
warp) into an Aff, a term or a condition, re-deciding what the substitution decides (div and mod
atoms, comparisons, ite; ("xor", o, v) at lane l is v at lane l ^ o).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from verifier.device.values import and_, not_, or_
from verifier.terms import Aff, Ranges, add, app, compare, const, ite, mul

BITS = tuple(f"lane{p}" for p in range(5))
WARP = "warp"


def lane() -> Aff:
    out = Aff(0)
    for p, b in enumerate(BITS):
        out = out + Aff.of(b).scale(1 << p)
    return out


def bit_ranges() -> dict[str, tuple[int, int]]:
    return {b: (0, 2) for b in BITS}


def lane_env(v: int) -> dict[str, Aff]:
    """The bit symbols of concrete lane v."""
    return {b: Aff((v >> p) & 1) for p, b in enumerate(BITS)}


def xor_env(o: int) -> dict[str, Aff]:
    """lane -> lane ^ o for o a power of two below 32."""
    p = o.bit_length() - 1
    return {BITS[p]: Aff(1) - Aff.of(BITS[p])}


def symbols(x: Any) -> set[str]:
    """The index symbols x mentions."""
    out: set[str] = set()
    stack = [x]
    while stack:
        t = stack.pop()
        if isinstance(t, Aff):
            for a, _ in t.terms:
                if isinstance(a, str):
                    out.add(a)
                else:
                    stack.append(a)
        elif isinstance(t, tuple):
            stack.extend(t)
    return out


def at(x: Any, env: Mapping[Any, Aff], ranges: Ranges) -> Any:
    """x with the symbols of env replaced by their Affs, simplified again."""
    memo: dict[Any, Any] = {}
    return _at(x, env, ranges, memo)


def _at(x: Any, env: Mapping[Any, Aff], ranges: Ranges, memo: dict[Any, Any]) -> Any:
    if isinstance(x, Aff):  # Affs by value (small, and repeated across the term)
        if x not in memo:
            memo[x] = _aff(x, env, ranges, memo)
        return memo[x]
    key = id(x)
    if key in memo:
        return memo[key][1]
    out = _at1(x, env, ranges, memo)
    memo[key] = (x, out)  # x kept alive, so its id is not reused during the walk
    return out


def _aff(a: Aff, env: Mapping[Any, Aff], ranges: Ranges, memo: dict[Any, Any]) -> Aff:
    if all(atom not in env and isinstance(atom, str) for atom, _ in a.terms):
        return a
    const = a.const
    d: dict[Any, int] = {}
    for atom, c in a.terms:
        if atom in env:  # a symbol, or an atom given a value (e.g. a parity)
            x = env[atom]
        elif isinstance(atom, str):
            x = Aff.of(atom)
        elif atom[0] in ("div", "mod"):
            q, r = _at(atom[1], env, ranges, memo).divmod(atom[2], ranges)
            x = q if atom[0] == "div" else r
        else:
            x = Aff.of(_at(atom, env, ranges, memo))
        const += c * x.const
        for y, cy in x.terms:
            d[y] = d.get(y, 0) + c * cy
    return Aff(const, tuple(sorted(((y, c) for y, c in d.items() if c), key=lambda t: repr(t[0]))))


def _at1(x: Any, env: Mapping[Any, Aff], ranges: Ranges, memo: dict[int, Any]) -> Any:
    if isinstance(x, Aff):
        return _aff(x, env, ranges, memo)
    if not isinstance(x, tuple) or not x or not isinstance(x[0], str):
        return tuple(_at(y, env, ranges, memo) for y in x) if isinstance(x, tuple) else x
    h = x[0]
    sub = [_at(y, env, ranges, memo) for y in x[1:]] if h not in ("c", "sum") else []
    if h in ("c", "true", "false"):
        return x
    if h == "+":
        return add(*sub)
    if h == "*":
        return mul(*sub)
    if h == "f":
        return app(x[1], sub[1])
    if h == "r":
        return const(sub[0].const) if sub[0].is_const() else ("r", sub[0])
    if h == "ite":
        return ite(sub[0], sub[1], sub[2])
    if h in ("<", "<=", "="):
        return compare(h, sub[0], sub[1], ranges)
    if h == "and":
        return and_(*sub)
    if h == "or":
        return or_(*sub)
    if h == "not":
        return not_(sub[0])
    if h == "xor":  # ("xor", o, t): t at the lane ^ o
        o, t = x[1], x[2]
        lane_of = [env.get(b) for b in BITS]
        if all(v is not None and v.is_const() for v in lane_of):
            v = sum(int(a.const) << p for p, a in enumerate(lane_of) if a is not None)
            return at(t, {**env, **lane_env(v ^ o)}, ranges)
        return at(at(t, xor_env(o), ranges), env, ranges)
    if h == "sum":
        inner = {k: v for k, v in env.items() if k != x[1]}
        return ("sum", x[1], x[2], at(x[3], inner, ranges))
    return (h, *sub)
