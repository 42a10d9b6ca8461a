"""Shared memory within a CTA, proved on kernel.cu's code: no data race between consumer barriers
(issue 16, item 2 (B)).

A second client of the `verifier.device.interp` run (beside the counter protocol of
`verifier.device.sync`). Its facts are the shared-memory accesses of the consumer threads that
are *open*: performed since the last barrier every consumer thread passes, each a site (the
access's call chain and kind). Beside them it keeps, per site, the loops whose back edge it
reached while open (so the loop counters that may differ between it and a later access). When a consumer access happens while
another is open and one of the two is a write, the pair is recorded; so is every write with
itself (two threads at the same statement). At the end each pair is a Z3 question over the two
sites' latest (most general) address terms: two different consumer threads `t1 != t2`, each
under its guard (loop counters within their loops' ranges), whose byte ranges overlap. The
symbols a gone-round loop created (its counters, what its body loaded) are renamed apart in the
earlier access, so the question covers every pair of iterations. A model is a race: WAW, RAW or
WAR, named by both sites. Across tasks the same holds: an access of one task still open at the
next task's accesses (the task loop's back edge) is a pair like any other, so the barrier that
separates tasks is proved, not assumed.

Barriers that close the open accesses: a `bar.sync` with the "memory" clobber that every
consumer thread passes on the path, counting exactly the threads that arrive (THREADS, or
BLOCK_THREADS with the producer warp too). The producer warp's own shared accesses (the ring)
fill the ring and are left out here (that they stay in their slot is not yet proved).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import z3

from verifier.device.interp import Client, Event, Interp
from verifier.device.loops import known_about
from verifier.device.sync_values import TID, fresh_number, symbols

RACE = "shared memory: consumer accesses ordered by barriers (no WAW, RAW, WAR)"
CHECKS = (RACE,)

Site = tuple[tuple[tuple[str, int], ...], str]  # (call chain, "read" | "write")


@dataclass(frozen=True)
class Access:
    guard: object
    off: z3.ArithRef
    size: int


@dataclass
class Races(Client):
    """The open-access automaton of the module docstring."""

    threads: int
    block: int
    work: int  # byte offset of the work area (sm.f) in dynamic shared memory
    interp: Interp | None = None
    last: dict[Site, Access] = field(default_factory=dict)
    pairs: set[tuple[Site, Site]] = field(default_factory=set)
    around: dict[Site, set[tuple]] = field(
        default_factory=dict
    )  # the loops a site stayed open round
    errors: dict[str, dict[str, None]] = field(default_factory=dict)
    _barriers: dict[tuple, bool] = field(default_factory=dict)
    _producer: dict[int, tuple[z3.ExprRef, bool]] = field(default_factory=dict)

    def fail(self, check: str, msg: str) -> None:
        self.errors.setdefault(check, {})[msg] = None

    def event(self, facts: frozenset, ev: Event) -> frozenset:
        if ev.kind == "barrier":
            return frozenset() if self.orders(ev) else facts
        if ev.kind not in ("read", "write") or ev.data["ptr"].space != "shared":
            return facts
        p = ev.data["ptr"]
        if self.producer_may(ev.guard):
            return facts  # the producer's stores fill the ring (THREAD_COPIES): not the work area's
        site: Site = (ev.where, ev.kind)
        self.last[site] = Access(ev.guard, p.off, ev.data["size"])
        for other in facts:
            if "write" in (other[1], ev.kind):
                self.pairs.add((other, site))
        if ev.kind == "write":
            self.pairs.add((site, site))
        return facts | {site}

    def back_edge(self, loop: tuple, facts: frozenset) -> frozenset:
        # kept beside the facts, not in them: a loop's facts stay stable after one pass
        for site in facts:
            self.around.setdefault(site, set()).add(loop)
        return facts

    # ---- thread sets -----------------------------------------------------------------------

    def sat(self, *cs: object) -> bool:
        assert self.interp is not None
        return self.interp.sat(*cs)

    def producer_may(self, g: object) -> bool:
        if not isinstance(g, z3.ExprRef):
            return bool(g)
        got = self._producer.get(g.get_id())
        if got is None or not got[0].eq(g):
            got = (g, self.sat(self.threads <= TID, g))
            self._producer[g.get_id()] = got
        return got[1]

    def orders(self, ev: Event) -> bool:
        """Whether barrier `ev` orders every consumer thread's accesses before and after it."""
        key = (ev.where, z3.simplify(ev.guard).get_id() if isinstance(ev.guard, z3.ExprRef) else 1)
        got = self._barriers.get(key)
        if got is None:
            got = self._orders(ev)
            self._barriers[key] = got
        return got

    def _orders(self, ev: Event) -> bool:
        d = ev.data
        if not d["memory"] or not isinstance(d["count"], int):
            return False
        g = ev.guard
        if isinstance(g, z3.ExprRef):  # a consumer thread skips it while another passes it
            t0, t1 = z3.Ints("bar_t0 bar_t1")
            at = lambda t: z3.substitute(g, (TID, t))  # noqa: E731
            if self.sat(
                t0 >= 0, t0 < self.block, at(t0), t1 >= 0, t1 < self.threads, z3.Not(at(t1))
            ):
                return False
        elif not g:
            return False
        return d["count"] == (self.block if self.producer_may(g) else self.threads)

    def known(self, a: Access) -> z3.BoolRef:
        """The proved ranges of the loop-head symbols in `a`'s terms (`verifier.device.loops`)."""
        assert self.interp is not None
        return known_about(self.interp, symbols(a.off) | symbols(_bool(a.guard)))

    # ---- the pairs -------------------------------------------------------------------------

    def judge(self, loop_symbols: dict[tuple, tuple[int, int]]) -> None:
        s = z3.Solver()
        s.set("timeout", 20000)
        for a, b in sorted(self.pairs):
            gone = self.around.get(a, ())
            ranges = [loop_symbols[k] for k in gone if k in loop_symbols]
            why = self.race(s, self.last[a], self.last[b], ranges)
            if why:
                kind = {("write", "write"): "WAW", ("write", "read"): "RAW"}.get(
                    (a[1], b[1]), "WAR"
                )
                self.fail(RACE, f"{kind}: {a[1]} at {_site(a)} and {b[1]} at {_site(b)} with no "
                          f"consumer barrier between ({why})")  # fmt: skip

    def race(self, s: z3.Solver, a: Access, b: Access, ranges: list[tuple[int, int]]) -> str:
        """'' if no two consumer threads may touch a common byte at a and b, else a witness."""
        ga, oa = _renamed((z3.And(_bool(a.guard), self.known(a)), a.off), ranges)
        t1, t2 = z3.Ints("race_t1 race_t2")
        at = lambda e, t: z3.substitute(e, (TID, t))  # noqa: E731
        s.push()
        s.add(t1 >= 0, t1 < self.threads, t2 >= 0, t2 < self.threads, t1 != t2)
        s.add(at(ga, t1), at(_bool(b.guard), t2), at(self.known(b), t2))
        s.add(at(oa, t1) < at(b.off, t2) + b.size, at(b.off, t2) < at(oa, t1) + a.size)
        r = s.check()
        why = ""
        if r == z3.sat:
            m = s.model()
            why = f"threads {m.eval(t1)} and {m.eval(t2)} at byte {m.eval(at(oa, t1))}"
        elif r == z3.unknown:
            why = f"Z3: {s.reason_unknown()}"
        s.pop()
        return why


def _bool(g: object) -> z3.BoolRef:
    return g if isinstance(g, z3.BoolRef) else z3.BoolVal(bool(g))


def _site(s: Site) -> str:
    return " in ".join(f"{f} (kernel.cu:{ln})" for f, ln in reversed(s[0]))


def _renamed(terms: tuple, ranges: list[tuple[int, int]]) -> tuple:
    """`terms` with every symbol made in one of `ranges` (a gone-round loop's run) renamed apart."""
    if not ranges:
        return terms
    subs: dict[int, tuple[z3.ExprRef, z3.ExprRef]] = {}
    todo, seen = list(terms), set()
    while todo:
        x = todo.pop()
        if x.get_id() in seen:
            continue
        seen.add(x.get_id())
        if z3.is_app(x) and x.decl().kind() == z3.Z3_OP_UNINTERPRETED:
            k = fresh_number(x.decl().name())
            if any(lo <= k < hi for lo, hi in ranges):
                d = x.decl()
                dom = [d.domain(i) for i in range(d.arity())]
                f = z3.Function(d.name() + "'", *dom, d.range())
                subs[x.get_id()] = (x, f(*x.children()))
        todo.extend(x.children())
    if not subs:
        return terms
    return tuple(z3.substitute(t, *subs.values()) for t in terms)
