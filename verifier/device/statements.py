"""Statements of one symbolic thread (`verifier.device.execute`): blocks and declarations, `if`
(decided by the ranges, else a fork whose locals merge as ite terms), loops with constant bounds
(unrolled) and the thread-strided loop (summarized: run once, its index a symbol)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from verifier.device import nodes as n
from verifier.device.effects import Strided, _Break, _Continue, _Return
from verifier.device.expressions import Expressions
from verifier.device.lvalues import Var
from verifier.device.values import FALSE, TRUE, Undef, Unsupported, and_, merge, not_, or_
from verifier.terms import Aff, Term

UNROLL = 4096  # most iterations of a loop with constant bounds


class Statements(Expressions):
    def block(self, b: n.Block) -> None:
        self.scopes.append({})
        try:
            for s in b.body:
                self.stmt(s)
        finally:
            self.scopes.pop()

    def stmt(self, s: n.Stmt) -> None:
        if isinstance(s, n.Block):
            self.block(s)
        elif isinstance(s, n.ExprStmt):
            self.expr(s.expr)
        elif isinstance(s, n.Decl):
            self.decl(s)
        elif isinstance(s, n.If):
            self.if_(s)
        elif isinstance(s, n.For):
            self.for_(s)
        elif isinstance(s, n.Return):
            value = self.expr(s.value) if s.value is not None else None
            if self.guard == self.entry[-1]:
                raise _Return(value)
            if self.guard != FALSE:  # this path returns here; the others go on (`returned`)
                self.returns[-1].append((self.guard, value))
            self.guard = FALSE
        elif isinstance(s, n.Break):
            raise _Break()
        elif isinstance(s, n.Continue):
            raise _Continue()
        elif isinstance(s, n.StaticAssert):
            pass  # checked by the compiler
        else:
            raise Unsupported(f"{type(s).__name__} statement in a task body", s.line)

    def decl(self, d: n.Decl) -> None:
        base = self.k.base_type(d.type.text)
        for x in d.declarators:
            if x.dims:
                dims = [self.int_value(self.expr(e), e.line) for e in x.dims]
                if len(dims) != 1:
                    raise Unsupported("a local array of more than one dimension", x.line)
                items: tuple[Any, ...] = tuple(Undef(f"{x.name}[{i}]") for i in range(dims[0]))
                if isinstance(x.init, n.BraceInit):
                    vals = [self.coerce(self.expr(e), base, x.line) for e in x.init.items]
                    items = tuple(vals) + items[len(vals) :]
                self.scopes[-1][x.name] = Var(self.cell(items, x.name), x.line)
                continue
            if x.init is None:
                v: Any = Undef(x.name)
            elif isinstance(x.init, n.BraceInit):
                v = self.brace(base, x.init)
            elif "&" in d.type.text and not (
                d.type.text.startswith("const ") and isinstance(x.init, n.Index)
            ):
                self.scopes[-1][x.name] = self.lvalue(x.init)
                continue
            elif "&" in d.type.text:  # const T& r = a[i]: the element's value (p.layers[l])
                v = self.expr(x.init)
            else:
                v = self.coerce(self.expr(x.init), d.type.text, x.line)
            self.scopes[-1][x.name] = Var(self.cell(v, x.name), x.line)

    def if_(self, s: n.If) -> None:
        c = self.cond(self.expr(s.test), s.line)
        if c in (TRUE, FALSE):
            branch = s.then if c == TRUE else s.other
            if branch is not None:
                self.stmt(branch)
            return
        if s.constexpr:
            raise Unsupported("if constexpr on a value that is not constant", s.line)
        other = s.other

        def orelse() -> None:
            if other is not None:
                self.stmt(other)

        self.fork(c, lambda: self.stmt(s.then), orelse, s.line)

    def fork(self, c: Term, then: Callable[[], Any], other: Callable[[], Any], line: int) -> None:
        g0, n0 = self.guard, len(self.cells)
        before = [x.value for x in self.cells]
        self.guard = and_(g0, c)
        then()
        g1, after1 = self.guard, [x.value for x in self.cells[:n0]]
        del self.cells[n0:]
        for x, v in zip(self.cells, before, strict=True):
            x.value = v
        self.guard = and_(g0, not_(c))
        other()
        g2, after2 = self.guard, [x.value for x in self.cells[:n0]]
        del self.cells[n0:]
        for x, a, b in zip(self.cells, after1, after2, strict=True):
            x.value = a if g2 == FALSE else b if g1 == FALSE else merge(c, a, b, line)
        whole = g1 == and_(g0, c) and g2 == and_(g0, not_(c))
        self.guard = g0 if whole else or_(g1, g2)

    def for_(self, s: n.For) -> None:
        if self.strided_loop(s):
            return
        self.scopes.append({})
        try:
            if isinstance(s.init, n.Decl):
                self.decl(s.init)
            elif isinstance(s.init, n.ExprStmt):
                self.expr(s.init.expr)
            live: Term = TRUE  # the iterations so far all ran where `live` holds
            for _ in range(UNROLL):
                if s.test is not None:
                    live = and_(live, self.cond(self.expr(s.test), s.line))
                    if live == FALSE:
                        return
                if live != TRUE:
                    self.guarded(s, live)
                else:
                    try:
                        self.stmt(s.body)
                    except _Continue:
                        pass
                    except _Break:
                        return
                if s.step is not None:
                    self.expr(s.step)
            raise Unsupported(f"a loop of more than {UNROLL} iterations", s.line)
        finally:
            self.scopes.pop()

    def guarded(self, s: n.For, live: Term) -> None:
        """An iteration that runs only where `live` (the tests so far) holds, e.g. a lane's
        `k < width` (the loop's own variable, so its value past the loop is never read)."""
        if not isinstance(s.init, n.Decl):
            raise Unsupported("a loop bound the executor cannot decide", s.line)

        def body() -> None:
            try:
                self.stmt(s.body)
            except (_Break, _Continue):
                raise Unsupported(
                    "break or continue under an undecided loop bound", s.line
                ) from None

        self.fork(live, body, lambda: None, s.line)

    def strided_loop(self, s: n.For) -> bool:
        """`for (int i = threadIdx.x; i < N; i += THREADS)`, N constant: run once, i symbolic."""
        if not (isinstance(s.init, n.Decl) and len(s.init.declarators) == 1):
            return False
        d = s.init.declarators[0]
        start = d.init
        if not (
            isinstance(start, n.Member)
            and isinstance(start.obj, n.Name)
            and start.obj.id == "threadIdx"
            and start.name == "x"
        ):
            return False
        step, test = s.step, s.test
        threads = self.k.constant("THREADS")
        ok = (
            isinstance(step, n.Assign)
            and step.op == "+="
            and isinstance(step.target, n.Name)
            and step.target.id == d.name
            and self.expr(step.value) == threads
            and isinstance(test, n.Binary)
            and test.op == "<"
            and isinstance(test.left, n.Name)
            and test.left.id == d.name
        )
        if not ok or test is None or not isinstance(test, n.Binary):
            raise Unsupported("a loop from threadIdx.x that is not strided by THREADS", s.line)
        if self.loop:
            raise Unsupported("a strided loop inside a strided loop", s.line)
        count = self.int_value(self.expr(test.right), s.line)
        if count <= 0:
            return True
        sym = "i" if not self.strided else f"i{len(self.strided)}"
        self.ranges[sym] = (0, count)
        self.strided.append(Strided(sym, count, s.line, self.function))
        self.loop = sym
        self.scopes.append({d.name: Var(self.cell(Aff.of(sym), d.name, True), d.line)})
        try:
            self.stmt(s.body)
        except (_Break, _Continue):
            raise Unsupported("break or continue in a strided loop", s.line) from None
        finally:
            self.scopes.pop()
            self.loop = ""
        return True
