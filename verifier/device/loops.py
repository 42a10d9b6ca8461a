"""Loop heads for `verifier.device.interp`: which values a loop changes, and how.

`havoc` makes the loop head's state from the entry and one pass of the body: a value the body
leaves alone stays, an integer that grew by a constant d is an induction `v0 + d * n` (n >= 1: the head after n passes,
one count per loop, varying when v0 is), anything else a fresh symbol (struct fields one by one,
so a Ring's slot changes while the struct's other fields stay). Both guesses are then checked on
a pass from that head (`Head.check`):

* an induction must be one: the pass must give v0 + d * (n + 1) (a counter that wraps, like the
  ring's slot, is not, and is made a fresh symbol instead);
* a fresh integer gets a range invariant lo <= x < hi when one is inductive: the entry value is
  in it, and the pass from a head where it holds gives a value in it (candidates: the constants
  the pass's value is built from, and the ranges of the symbols it mentions). The invariants are
  kept per symbol (`Head.invariants`), for checks that ask about the values (the ring's slots).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import z3

from verifier.device.sync_values import (
    TID,
    StructV,
    concrete,
    fresh,
    fresh_number,
    mentions_tid,
    symbols,
)

if TYPE_CHECKING:
    from verifier.device.interp import Interp, State

Path = tuple  # (env key, field name, ...)


@dataclass
class Head:
    state: State
    inductions: list[tuple[Path, object, int]] = field(default_factory=list)  # (path, v, d)
    # (path, x, v0, the value after the first pass)
    widened: list[tuple[Path, z3.ArithRef, object, object]] = field(default_factory=list)
    probe_guard: object = True
    counts: list[z3.ExprRef] = field(default_factory=list)  # the loop's pass counts

    def check(self, it: Interp, after: State) -> set[Path]:
        """The paths whose induction the pass `after` refutes; ranges of the fresh integers."""
        wrong = set()
        if after.dead:  # no second pass: the head after one pass is the only one
            for n in self.counts:
                it.invariants[n.decl().name()] = n == 1
        for path, v, d in self.inductions if not after.dead else ():
            v1 = get(after.env, path)
            w = v + d  # type: ignore[operator]
            num = isinstance(v1, (int, z3.ArithRef)) and not isinstance(v1, bool)
            if not num or (concrete(z3.simplify(v1 - w)) != 0 and it.sat(after.guard, v1 != w)):  # type: ignore[operator]
                wrong.add(path)
        for path, x, v0, first in self.widened:
            v1 = get(after.env, path) if not after.dead else None
            if isinstance(v1, bool) or not isinstance(v1, (int, z3.ArithRef, type(None))):
                continue
            _range(it, x, v0, (first, self.probe_guard), (v1, after.guard))
        return wrong


def get(env: dict, path: Path) -> object:
    v = env.get(path[0])
    for f in path[1:]:
        if not isinstance(v, StructV):
            return None
        v = v.get(f)
    return v


def havoc(it: Interp, entry: State, after: State, wrong: set[Path]) -> Head:
    """The loop head (see the module docstring); `wrong`: paths that are not inductions."""
    head = Head(entry.copy(), probe_guard=after.guard)
    count: dict[bool, z3.ArithRef] = {}

    def one(path: Path, v0: object, v1: object) -> object:
        if v1 is v0 or it.same(v0, v1):
            return v0
        if isinstance(v0, StructV) and isinstance(v1, StructV) and v0.type == v1.type:
            return StructV(v0.type, tuple(
                (k, one((*path, k), x, y)) for (k, x), (_, y) in zip(v0.fields, v1.fields, strict=True)
            ))  # fmt: skip
        num = isinstance(v0, (int, z3.ArithRef)) and isinstance(v1, (int, z3.ArithRef))
        if num and not isinstance(v0, bool) and not isinstance(v1, bool):
            d = concrete(v1 - v0)  # type: ignore[operator]
            if isinstance(d, int) and not isinstance(d, bool) and d != 0 and path not in wrong:
                vary = mentions_tid(v0)
                if vary not in count:
                    count[vary] = fresh("iter", vary)
                v = v0 + d * count[vary]
                head.inductions.append((path, v, d))
                return v
            x = fresh("v", mentions_tid(v0) or mentions_tid(v1))
            head.widened.append((path, x, v0, v1))
            return x
        return it.widen(v0, v1)

    for key, v0 in entry.env.items():
        v1 = after.env.get(key, v0) if not after.dead else v0
        head.state.env[key] = one((key,), v0, v1)
    head.counts = list(count.values())
    for n in head.counts:  # the head after n >= 1 passes (every value made from n says so)
        it.invariants[n.decl().name()] = n >= 1
    if count:
        head.state.guard = z3.And(head.state.guard, *(n >= 1 for n in count.values()))
    return head


def reached(it: Interp, head: Head, test: object, lo: int) -> None:
    """Adds to each pass count n of `head` that its head was reached: a thread that passed the
    test on entry (n = 0) and is at the head after n passes passed it after n - 1 passes.
    `test`: its value at the head after n passes; it says so of n - 1 (and of 0) only when it is
    built from the counts and from values fixed before the loop (fresh numbers below `lo`), not
    from the loop's widened values nor its loads, and when a thread-dependent test has a count
    per thread. n = 1 always satisfies it (nothing vacuous for a thread that never enters)."""
    if not head.counts or not isinstance(test, z3.BoolRef):
        return
    counts = {n.decl().name() for n in head.counts}
    if any(s not in counts and fresh_number(s) >= lo for s in symbols(test)):
        return
    if mentions_tid(test) and not all(mentions_tid(n) for n in head.counts):
        return  # one count for threads that may leave after different passes: claim nothing
    first = z3.substitute(test, *((n, z3.IntVal(0)) for n in head.counts))
    prev = z3.substitute(test, *((n, n - 1) for n in head.counts))
    for n in head.counts:
        k = n.decl().name()
        it.invariants[k] = z3.And(it.invariants.get(k, True), z3.Or(z3.Not(first), prev))


def _range(it: Interp, x: z3.ArithRef, v0: object, first: tuple, step: tuple) -> None:
    """Records `lo <= v0 < hi implies lo <= x < hi` for the tightest candidate [lo, hi) that is
    inductive: the value after the first pass is in it, and so is the value after a later pass
    from a head in it (`step`: (value, guard), or (None, _) when no later pass runs)."""
    if not isinstance(v0, (int, z3.ArithRef)) or isinstance(v0, bool):
        return
    terms = [t for t, _ in (first, step) if isinstance(t, z3.ExprRef)]
    names = set().union(
        *(symbols(t) for t in terms), symbols(v0) if isinstance(v0, z3.ExprRef) else set()
    )
    known = known_about(it, names - {x.decl().name()})
    consts = {concrete(t) for t in _leaves(z3.And(known, *(t >= 0 for t in terms)))}
    consts |= {concrete(first[0])}
    his = sorted(c for c in consts if isinstance(c, int) and not isinstance(c, bool) and c > 0)
    for hi in his[:4]:
        inv = lambda t, hi=hi: z3.And(t >= 0, t < hi)  # noqa: E731
        if all(_holds(it, [inv(v0), known, _b(g)], inv(v1)) for v1, g in (first,)) and (
            step[0] is None or _holds(it, [inv(v0), inv(x), known, _b(step[1])], inv(step[0]))
        ):
            it.invariants[x.decl().name()] = z3.Implies(inv(v0), inv(x))
            return


def _b(g: object) -> z3.BoolRef:
    return g if isinstance(g, z3.BoolRef) else z3.BoolVal(bool(g))


def _holds(it: Interp, hyps: list, goal: z3.BoolRef) -> bool:
    s = z3.Solver()
    s.set("timeout", 2000)
    s.add(it.tid_range(TID), *hyps, z3.Not(goal))
    return s.check() == z3.unsat


def known_about(it: Interp, names: set[str]) -> z3.BoolRef:
    """The invariants of the symbols `names`, and of the symbols those mention, and so on."""
    out, todo, seen = [], sorted(names), set()
    while todo:
        k = todo.pop()
        if k in seen or k not in it.invariants:
            continue
        seen.add(k)
        out.append(it.invariants[k])
        todo.extend(symbols(it.invariants[k]))
    return z3.And(*out)


def _leaves(e: z3.ExprRef) -> list[z3.ExprRef]:
    out, todo, seen = [], [e], set()
    while todo:
        t = todo.pop()
        if t.get_id() in seen:
            continue
        seen.add(t.get_id())
        if z3.is_int_value(t):
            out.append(t)
        todo.extend(t.children())
    return out
