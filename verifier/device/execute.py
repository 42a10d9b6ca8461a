"""Symbolic execution of one consumer thread of a task body, over the reals.

`Executor.run(function, args)` interprets a device function of the tree (`verifier.device.nodes`)
statement by statement: device functions are inlined (templates instantiated with their int
arguments), loops with constant bounds are unrolled, and a thread-strided loop

    for (int i = threadIdx.x; i < N; i += THREADS) body

(N a constant) is summarized: the THREADS consumer threads together run body once for every i
in [0, N), so the body runs once with i a fresh symbol ranging over [0, N). Its global stores
and loads are recorded (`Store`, `Load`) with the symbol; `verifier.device.symexec` then proves
that different iterations touch disjoint outputs (so the summary is the loop's effect) and that
each store holds the instruction's value. A condition the ranges do not decide forks the
thread: stores carry the path's guard, locals assigned differently merge as ite terms, and
`__trap()` ends its path (its guard is recorded: valid inputs must never reach it). Anything
outside this model raises `Unsupported` naming the kernel.cu line, never a guess.
"""

from __future__ import annotations

from typing import Any

from verifier.device import nodes as n
from verifier.device.effects import Load, Store, Strided, Trap, _Return
from verifier.device.lvalues import LValue, Var
from verifier.device.statements import Statements
from verifier.device.values import FALSE, Choice, Closure, Ptr, Unsupported, merge

__all__ = ["Executor", "Load", "Store", "Strided", "Trap"]


class Executor(Statements):
    """One consumer thread of one task body (the modules: `memory` its state and global memory,
    `expressions`, `statements`, and here the entry and the inlining of device functions)."""

    def run(self, name: str, args: list[Any]) -> None:
        f = self.k.function(name, len(args))
        self.call(f, [Var(self.cell(a, p.name)) for a, p in zip(args, f.params, strict=False)], [])

    def call(self, f: n.Function, args: list[LValue], targs: list[Any]) -> Any:
        saved = self.scopes
        frame: dict[str, LValue] = {}
        for tp, v in zip(f.template, targs, strict=False):
            frame[tp.name] = Var(self.cell(v, tp.name, True))
        for tp in f.template[len(targs) :]:
            if tp.kind == "class":
                continue  # a type deduced from the arguments: their values carry it
            if tp.default is None or isinstance(tp.default, n.Type):
                raise Unsupported(f"template {f.name} instantiated without {tp.name}", f.line)
            frame[tp.name] = Var(self.cell(self.expr(tp.default), tp.name, True))
        for p, a in zip(f.params, args, strict=False):
            if "&" in p.type.text:
                frame[p.name] = a
            else:
                frame[p.name] = Var(self.cell(self.coerce(a.get(), p.type.text, p.line), p.name))
        self.scopes = [frame]
        self.functions.append(f.name)
        self.entry.append(self.guard)
        self.returns.append([])
        try:
            assert f.body is not None
            self.block(f.body)
            out = None
        except _Return as r:
            out = r.value
        finally:
            self.scopes = saved
            self.functions.pop()
        return self.returned(out, f.line)

    def call_closure(self, c: Closure, args: list[Any], line: int) -> Any:
        lam = c.node
        if len(args) != len(lam.params):
            raise Unsupported(f"a lambda of {len(lam.params)} parameters given {len(args)}", line)
        saved = self.scopes
        frame: dict[str, LValue] = {}
        for p, a in zip(lam.params, args, strict=True):
            frame[p.name] = Var(self.cell(self.coerce(a, p.type.text, p.line), p.name))
        self.scopes = [*c.scopes, frame]
        self.entry.append(self.guard)
        self.returns.append([])
        try:
            self.block(lam.body)
            out = None
        except _Return as r:
            out = r.value
        finally:
            self.scopes = saved
        return self.returned(out, line)

    def returned(self, last: Any, line: int) -> Any:
        """The value of a call whose paths returned under conditions: the first return a path
        reaches (pointers as a `Choice`, values merged); `last` where the others fell through."""
        g0, early = self.entry.pop(), self.returns.pop()
        fell = self.guard != FALSE
        self.guard = g0
        if not early:
            return last
        options = [*early, *([(g0, last)] if fell else [])]
        if any(isinstance(v, (Ptr, Choice)) for _, v in options):
            return Choice(tuple(options))
        out = options[-1][1]
        for c, v in reversed(options[:-1]):
            out = merge(c, v, out, line)
        return out
