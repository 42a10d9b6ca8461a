"""An abstract interpreter of kernel.cu's device code: all the threads of one CTA at once.

It walks a `__global__` function's statements, inlining every device function, method and lambda
it calls, with values from `verifier.device.values` (Z3 terms over TID and free symbols). What
matters to synchronization reaches a client as events (`Event`): barriers, atomics, memory
accesses, asm, exits; each with the guard (which threads perform it: a Z3 condition on TID) and
the call chain and kernel.cu line it came from. The client keeps its own abstract facts in the
state (a frozenset), which the interpreter carries along the control flow:

* an `if` whose condition is uniform (the same for every thread that reaches it) splits the state
  and joins both branches (facts: union; values: `If`); a divergent `if` runs both branches one
  after the other (different threads take them), each under its part of the guard;
* a loop runs its first pass from the entry (iteration 0), then passes from a head state for the
  iterations n >= 1 (`verifier.device.loops`: every variable the body changes is an induction
  `v0 + d * n`, checked, or a fresh symbol, with a range invariant where one is inductive) until
  the client's facts are stable; those passes start from what went round the back edge
  (`Client.back_edge`). The exit keeps the facts of the head after a pass, and of the entry when
  the test may fail at once (`Client.loop_exit` may refine that);
* break, continue and return end a path; the paths join where they resume.

`Interp.run(name)` runs a kernel entry for threads 0 <= TID < BLOCK_THREADS. What falls outside
the subset this follows is an `InterpError` naming the line, never silently skipped.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import z3

from verifier.device import loops
from verifier.device import nodes as n
from verifier.device.exprs import ExprEval
from verifier.device.sync_values import (
    TID,
    Opaque,
    Ptr,
    as_bool,
    concrete,
    fresh_mark,
    mentions_tid,
    symbols,
)


class InterpError(ValueError):
    """The code does something the interpreter does not follow (named by its line)."""


@dataclass(frozen=True)
class Event:
    kind: str  # "barrier", "atomic", "read", "write", "asm", "exit", "trap", "warpsync"
    guard: object  # which threads: a Z3 condition on TID (or True)
    where: tuple[tuple[str, int], ...]  # call chain: (function, kernel.cu line), innermost last
    data: dict = field(default_factory=dict, hash=False, compare=False)

    @property
    def line(self) -> int:
        return self.where[-1][1]

    def site(self) -> str:
        """ "cta_sync (kernel.cu:102) in wait_task (kernel.cu:243) in amk_megakernel (...)"."""
        return " in ".join(f"{f} (kernel.cu:{ln})" for f, ln in reversed(self.where))


class Client:
    """What a check does with the events; `facts` is its part of the state."""

    def event(self, facts: frozenset, ev: Event) -> frozenset:
        return facts

    def loop_exit(self, entry: frozenset, iterated: frozenset) -> frozenset:
        return entry | iterated

    def back_edge(self, loop: tuple, facts: frozenset) -> frozenset:
        """The facts that go round loop `loop` (its `Interp.where`) to its head again."""
        return facts


@dataclass
class State:
    env: dict  # (frame, name) -> value
    guard: object  # the threads on this path: a Z3 condition over TID (or True)
    facts: frozenset
    dead: bool = False
    trapped: bool = False  # dead by __trap: the launch fails, so no completed run took this path

    def copy(self) -> State:
        return State(dict(self.env), self.guard, self.facts, self.dead, self.trapped)


class _Jump(Exception):
    pass


class Interp(ExprEval):
    """Runs a kernel entry over a parsed Unit; see the module docstring."""

    def __init__(self, unit: n.Unit, client: Client, block_threads: int | None = None) -> None:
        super().__init__(unit)
        self.client = client
        self.block = block_threads if block_threads is not None else self.const("BLOCK_THREADS")
        self.solver = z3.Solver()
        self._uniform_cache: dict[tuple[int, int], tuple[z3.ExprRef, z3.ExprRef, bool]] = {}
        self.loop_tests: set[str] = set()  # symbols some loop's exit depends on
        self.acquired: list[str] = []  # the symbols atomic loads returned
        # loop (its `where`) -> the fresh-symbol numbers [lo, hi) its latest run created
        self.loop_symbols: dict[tuple, tuple[int, int]] = {}

    # ---- events and thread sets ----------------------------------------------------------------

    def emit(self, st: State, kind: str, line: int, **data: object) -> None:
        ev = Event(kind, st.guard, self.where(line), data)
        st.facts = self.client.event(st.facts, ev)

    def where(self, line: int) -> tuple[tuple[str, int], ...]:
        """The call chain of `line`: (function, the line in it), the kernel entry first."""
        lines = [ln for _, ln in self.chain[1:]] + [line]
        return tuple((f, ln) for (f, _), ln in zip(self.chain, lines, strict=True))

    def tid_range(self, t: z3.ArithRef) -> z3.BoolRef:
        return z3.And(t >= 0, t < self.block)

    def sat(self, *conds: object) -> bool:
        cs = [c for c in conds if c is not True]
        if any(c is False for c in cs):
            return False
        self.solver.push()
        self.solver.add(self.tid_range(TID), *cs)
        r = self.solver.check() != z3.unsat
        self.solver.pop()
        return r

    def uniform(self, c: object, guard: object) -> bool:
        """Whether every thread under `guard` sees the same truth of `c`."""
        if not mentions_tid(c):
            return True
        assert isinstance(c, z3.ExprRef)
        g = guard if isinstance(guard, z3.ExprRef) else z3.BoolVal(True)
        key = (c.get_id(), g.get_id())
        got = self._uniform_cache.get(key)
        if got is not None and got[0].eq(c) and got[1].eq(g):
            return got[2]
        if True:  # a Z3 query: two threads under the guard that disagree on c
            t1, t2 = z3.Ints("t1 t2")
            at = lambda e, t: z3.substitute(e, (TID, t))  # noqa: E731
            self.solver.push()
            self.solver.add(self.tid_range(t1), self.tid_range(t2), at(g, t1), at(g, t2))
            self.solver.add(at(c, t1) != at(c, t2))
            hit = self.solver.check() == z3.unsat
            self.solver.pop()
            self._uniform_cache[key] = (c, g, hit)
        return hit

    # ---- statements ----------------------------------------------------------------------------

    def run(self, name: str) -> State:
        """Interpret kernel entry `name` for the whole CTA; returns the state at its end."""
        fn = self.unit.function(name)
        st = State({}, z3.BoolVal(True), frozenset())
        self.chain = [(name, fn.line)]
        frame = self.new_frame(None)
        for p in fn.params:
            st.env[(frame, p.name)] = self.param_value(p)
        self.frames.append(frame)
        out = self.body(fn.body, st)  # type: ignore[arg-type]
        self.frames.pop()
        return out

    def exec(self, s: n.Stmt, st: State) -> State:
        if st.dead:
            return st
        if isinstance(s, n.Block):
            return self.block_stmt(s.body, st)
        if isinstance(s, n.ExprStmt):
            self.eval(s.expr, st)
            return st
        if isinstance(s, n.Decl):
            self.declare(s, st)
            return st
        if isinstance(s, n.If):
            return self.if_stmt(s, st)
        if isinstance(s, n.For):
            return self.loop(s.init, s.test, s.step, s.body, st)
        if isinstance(s, n.While):
            return self.loop(None, s.test, None, s.body, st)
        if isinstance(s, n.Switch):
            return self.switch(s, st)
        if isinstance(s, n.Asm):
            self.asm(s, st)
            return st
        if isinstance(s, n.Return):
            value = self.eval(s.value, st) if s.value is not None else None
            self.returns[-1].append((st.copy(), value, s.line))
            st.dead = True
            return st
        if isinstance(s, n.Break):
            self.breaks[-1].append(st.copy())
            st.dead = True
            return st
        if isinstance(s, n.Continue):
            self.continues[-1].append(st.copy())
            st.dead = True
            return st
        if isinstance(s, n.StaticAssert):
            return st
        raise InterpError(f"kernel.cu:{s.line}: statement {type(s).__name__} not followed")

    def block_stmt(self, body: tuple[n.Stmt, ...], st: State) -> State:
        frame = self.frames[-1]
        declared = {d.name for s in body if isinstance(s, n.Decl) for d in s.declarators}
        saved = {k: st.env.get((frame, k)) for k in declared}
        for s in body:
            st = self.exec(s, st)
        for k, v in saved.items():
            if v is None:
                st.env.pop((frame, k), None)
            else:
                st.env[(frame, k)] = v
        return st

    def if_stmt(self, s: n.If, st: State) -> State:
        c = as_bool(self.eval(s.test, st))
        k = concrete(c)
        if s.constexpr and k is None:
            raise InterpError(f"kernel.cu:{s.line}: `if constexpr` condition is not a constant")
        if k is None and not self.sat(st.guard, c):
            k = False
        elif k is None and not self.sat(st.guard, z3.Not(c)):
            k = True
        if k is not None:
            if k:
                return self.exec(s.then, st)
            return self.exec(s.other, st) if s.other is not None else st
        g = st.guard
        a = st.copy()
        a.guard = z3.And(g, c)
        a = self.exec(s.then, a)
        if self.uniform(c, g):
            b = st.copy()
        else:  # different threads take the branches: one after the other
            b = st.copy()
            b.facts = a.facts if not a.dead else b.facts | a.facts
        b.guard = z3.And(g, z3.Not(c))
        if s.other is not None:
            b = self.exec(s.other, b)
        out = self.join([a, b], c, g)
        if (a.trapped or b.trapped) and not out.dead:
            out.guard = g  # a thread that traps ends the launch: completed runs never branch there
        return out

    def join(self, states: list[State], c: object = None, guard: object = None) -> State:
        """The state where the paths of `states` meet (c: the condition that chose the first)."""
        live = [s for s in states if not s.dead]
        if not live:
            out = states[0].copy()
            out.facts = frozenset().union(*(s.facts for s in states))
            out.dead = True
            return out
        if len(live) == 1:
            return live[0]
        a, b = live[0], live[1:]
        out = State({}, guard if guard is not None else z3.Or(*(s.guard for s in live)), a.facts)
        for s in b:
            out.facts = out.facts | s.facts
        for key, va in a.env.items():
            others = [s.env.get(key) for s in b]
            if any(v is None for v in others):
                continue
            v = va
            for vb in others:
                v = self.merge(v, vb, c if len(b) == 1 else None)
            out.env[key] = v
        return out

    def switch(self, s: n.Switch, st: State) -> State:
        test = self.eval(s.test, st)
        if mentions_tid(test):
            raise InterpError(f"kernel.cu:{s.line}: switch on a thread-dependent value {test}")
        outs: list[State] = []
        self.breaks.append([])
        labels = []
        for label, body in s.cases:
            b = st.copy()
            if label is not None:
                lv = self.eval(label, st)
                labels.append(lv)
                b.guard = z3.And(st.guard, test == lv)
            else:
                b.guard = z3.And(st.guard, *(test != lv for lv in labels))
            self.chain_case = label
            b = self.block_stmt(body, b)
            outs.append(b)  # a case that falls off its end: treated as leaving the switch
        outs += self.breaks.pop()
        out = self.join(outs)
        out.guard = st.guard
        return out

    def loop(self, init, test, step, body, st: State) -> State:
        frame = self.frames[-1]
        declared = set()
        if isinstance(init, n.Decl):
            declared = {d.name for d in init.declarators}
        saved = {k: st.env.get((frame, k)) for k in declared}
        if init is not None:
            st = self.exec(init, st)
        entry = st
        key = self.where(getattr(body, "line", 0))
        lo = fresh_mark()
        probe, probe_exits, runs, _ = self.iterate(entry.copy(), test, step, body)
        # runs: the test holds on entry, so no path leaves the loop before one pass
        wrong: set = set()
        at_head: object = None  # the test's value at the head (the last round's first pass)
        # the passes from the head are the iterations n >= 1 (the probe was n = 0): they start
        # from what went round the back edge, not from the entry
        for _ in range(3):  # until the head's inductions are inductions
            head = loops.havoc(self, entry, probe, wrong)
            havoc = head.state
            heads = self.client.back_edge(key, probe.facts)
            left = _facts(probe_exits)  # the facts of the breaks
            exits = probe_exits
            bad: set = set()
            for npass in range(
                6 if not probe.dead else 0
            ):  # one more pass, until the facts are stable
                cur = havoc.copy()
                cur.facts = heads
                after, exits, _, c = self.iterate(cur, test, step, body)
                if npass == 0:
                    at_head = c
                bad = head.check(self, after) if npass == 0 else set()
                if bad:
                    break
                left |= _facts(exits)
                new = heads | self.client.back_edge(key, after.facts)
                if new == heads:
                    break
                heads = new
            if not bad:
                break
            wrong |= bad
        if not probe.dead and not bad:
            loops.reached(self, head, at_head, lo)
        self.loop_symbols[key] = (lo, fresh_mark())  # the symbols of this run of the loop
        out = havoc.copy()
        out.guard = entry.guard
        # a loop that runs at least once leaves from the head after a pass, never from its entry
        if runs:
            out.facts = self.client.loop_exit(frozenset(), heads | left)
        else:
            out.facts = self.client.loop_exit(entry.facts, entry.facts | heads | left)
        if exits:
            out = self.join([out, *exits])
            out.guard = entry.guard
        for k, v in saved.items():
            if v is None:
                out.env.pop((frame, k), None)
            else:
                out.env[(frame, k)] = v
        return out

    def iterate(self, st: State, test, step, body) -> tuple[State, list[State], bool, object]:
        """One pass: test, body, step. Returns the state after it, the states that broke out,
        whether the test held for every thread (no thread left at the head) and the test's value
        (None without a test)."""
        g = st.guard
        held = test is None
        c: object = None
        if test is not None:
            before = len(self.acquired)
            c = as_bool(self.eval(test, st))
            if isinstance(c, z3.ExprRef) and len(self.acquired) > before:
                self.loop_tests |= symbols(c)  # the test loaded atomics: does it spin on them?
            held = c is True or (c is not False and not self.sat(st.guard, z3.Not(c)))
            if c is False or (c is not True and not self.sat(st.guard, c)):
                st.dead = True
                return st, [], False, c
            st.guard = z3.And(g, c) if c is not True else g
        self.breaks.append([])
        self.continues.append([])
        st = self.exec(body, st)
        conts = self.continues.pop()
        if conts:
            st = self.join([st, *conts])
        if step is not None and not st.dead:
            self.eval(step, st)
        brks = self.breaks.pop()
        st.guard = g
        return st, brks, held, c

    def body(self, block: n.Block, st: State) -> State:
        self.returns.append([])
        st = self.exec(block, st)
        rets = self.returns.pop()
        states = [st] + [s for s, _, _ in rets]
        self.last_states = [(st, block.end_line if hasattr(block, "end_line") else block.line)]
        self.last_states += [(s, line) for s, _, line in rets]
        self.last_states = [(s, ln) for s, ln in self.last_states if not s.dead or s is not st]
        out = self.join(states)
        self.last_returns = [v for _, v, _ in rets]
        return out

    def declare(self, d: n.Decl, st: State) -> None:
        frame = self.frames[-1]
        for dc in d.declarators:
            st.env[(frame, dc.name)] = self.initial(d, dc, st)

    def asm(self, s: n.Asm, st: State) -> None:
        ops = [self.eval(e, st) for _, e in s.outputs] + [self.eval(e, st) for _, e in s.inputs]
        for _, e in s.outputs:
            self.assign_to(e, Opaque(True), st)
        text = " ".join(s.template.split())
        if text.startswith(("bar.sync", "barrier.sync")):
            args = [a.strip() for a in text.split(None, 1)[1].rstrip(";").split(",")]
            vals = [ops[int(a[1:])] if a.startswith("%") else int(a) for a in args]
            self.emit(
                st,
                "barrier",
                s.line,
                id=concrete(vals[0]),
                count=concrete(vals[1]) if len(vals) > 1 else self.block,
                memory="memory" in s.clobbers,
            )
            return
        self.emit(st, "asm", s.line, text=text, ops=ops, memory="memory" in s.clobbers)

    def ptr_of(self, v: object) -> Ptr | None:
        return v if isinstance(v, Ptr) else None


def _facts(states: list[State]) -> frozenset:
    return frozenset().union(*(s.facts for s in states))
