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

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from verifier.device import nodes as n
from verifier.device.kernel import Kernel, int_op, number
from verifier.device.values import (
    FALSE,
    NEG_INF,
    TRUE,
    Bool,
    Cell,
    LayerRef,
    Layers,
    NegInf,
    Params,
    Ptr,
    Real,
    Struct,
    Undef,
    Unsupported,
    Word,
    and_,
    not_,
    or_,
)
from verifier.terms import Aff, Term, add, app, compare, const, ite, mul, neg

UNROLL = 4096  # most iterations of a loop with constant bounds
WIDTH = {"float4": 4, "float2": 2, "uint4": 8, "uint2": 4, "unsigned": 2, "int4": 8}
LANES = ("x", "y", "z", "w")
INT_TYPES = {
    "int",
    "unsigned",
    "long long",
    "unsigned long long",
    "size_t",
    "unsigned short",
    "short",
}
UNARY_FNS = {"expf": "exp", "__expf": "exp", "rsqrtf": "rsqrt", "sqrtf": "sqrt"}


@dataclass(frozen=True)
class Store:
    array: str
    offset: Aff  # flat, in elements of the array
    value: Any
    guard: Term
    line: int
    function: str
    loop: str  # the strided loop's index symbol, "" outside one


@dataclass(frozen=True)
class Load:
    array: str
    offset: Aff
    guard: Term
    line: int
    loop: str


@dataclass(frozen=True)
class Trap:
    guard: Term  # the path condition under which __trap() runs
    line: int
    function: str


@dataclass(frozen=True)
class Strided:
    symbol: str
    count: int  # iterations over all threads: the symbol ranges over [0, count)
    line: int
    function: str


class _Return(Exception):
    def __init__(self, value: Any):
        self.value = value


class _Break(Exception):
    pass


class _Continue(Exception):
    pass


# ---- lvalues ---------------------------------------------------------------------------------


class LValue:
    def get(self) -> Any:
        raise NotImplementedError

    def set(self, v: Any) -> None:
        raise NotImplementedError


class Var(LValue):
    def __init__(self, cell: Cell, line: int = 0):
        self.cell, self.line = cell, line

    def get(self) -> Any:
        v = self.cell.value
        if isinstance(v, Undef):
            raise Unsupported(f"{v.name} is read before it is assigned", self.line)
        return v

    def set(self, v: Any) -> None:
        if self.cell.readonly:
            raise Unsupported(f"{self.cell.name} is assigned inside its strided loop", self.line)
        self.cell.value = v


class Elem(LValue):
    def __init__(self, parent: LValue, key: int | str, line: int):
        self.parent, self.key, self.line = parent, key, line

    def get(self) -> Any:
        whole = self.parent.get()
        v = whole.get(self.key, self.line) if isinstance(self.key, str) else whole[self.key]
        if isinstance(v, Undef):
            raise Unsupported(f"{v.name} is read before it is assigned", self.line)
        return v

    def set(self, v: Any) -> None:
        whole = self.parent.get()
        if isinstance(self.key, str):
            self.parent.set(whole.set(self.key, v))
        else:
            self.parent.set((*whole[: self.key], v, *whole[self.key + 1 :]))


class Mem(LValue):
    def __init__(self, ex: Executor, ptr: Ptr, line: int):
        self.ex, self.ptr, self.line = ex, ptr, line

    def get(self) -> Any:
        return self.ex.load(self.ptr, self.line)

    def set(self, v: Any) -> None:
        self.ex.store(self.ptr, v, self.line)


# ---- the executor ----------------------------------------------------------------------------


class Executor:
    """One consumer thread of one task body. `arrays(field path)` names a global pointer
    (`Ptr`) for a field of `p` ("x") or of the task's layer ("layer+0.down_proj");
    `element(array, offset)` turns a flat element offset into its term's index tuple."""

    def __init__(
        self,
        kernel: Kernel,
        pointer: Callable[[str, int], Ptr],
        element: Callable[[str, Aff], tuple[Aff, ...]],
        ranges: dict[str, tuple[int, int]],
    ):
        self.k, self.pointer, self.element, self.ranges = kernel, pointer, element, ranges
        self.scopes: list[dict[str, LValue]] = []
        self.cells: list[Cell] = []
        self.guard: Term = TRUE
        self.stores: list[Store] = []
        self.loads: list[Load] = []
        self.traps: list[Trap] = []
        self.strided: list[Strided] = []
        self.loop = ""  # the strided loop being executed
        self.functions: list[str] = []
        self.entry: list[Term] = []  # the path guard at each inlined call's entry

    # ---- entry and calls ---------------------------------------------------------------------

    def run(self, name: str, args: list[Any]) -> None:
        f = self.k.function(name, len(args))
        self.call(f, [Var(self.cell(a, p.name)) for a, p in zip(args, f.params, strict=False)], [])

    def call(self, f: n.Function, args: list[LValue], targs: list[Any]) -> Any:
        saved = self.scopes
        frame: dict[str, LValue] = {}
        for tp, v in zip(f.template, targs, strict=False):
            frame[tp.name] = Var(self.cell(v, tp.name, True))
        for tp in f.template[len(targs) :]:
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
        try:
            assert f.body is not None
            self.block(f.body)
            out = None
        except _Return as r:
            out = r.value
        finally:
            self.scopes = saved
            self.functions.pop()
            self.entry.pop()
        return out

    @property
    def function(self) -> str:
        return self.functions[-1] if self.functions else ""

    def cell(self, v: Any, name: str, readonly: bool = False) -> Cell:
        c = Cell(v, name, readonly)
        self.cells.append(c)
        return c

    # ---- statements --------------------------------------------------------------------------

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
            if self.guard != self.entry[-1]:
                raise Unsupported("return under a condition the executor cannot decide", s.line)
            raise _Return(self.expr(s.value) if s.value is not None else None)
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
            elif "&" in d.type.text:
                self.scopes[-1][x.name] = self.lvalue(x.init)
                continue
            else:
                v = self.coerce(self.expr(x.init), d.type.text, x.line)
            self.scopes[-1][x.name] = Var(self.cell(v, x.name), x.line)

    def brace(self, base: str, b: n.BraceInit) -> Any:
        fields = self.k.struct_fields(base)
        vals = [self.expr(e) for e in b.items]
        if len(vals) != len(fields):
            raise Unsupported(
                f"{base} initialized with {len(vals)} of {len(fields)} fields", b.line
            )
        return Struct(
            base,
            tuple((f, self.coerce(v, t, b.line)) for (f, t), v in zip(fields, vals, strict=True)),
        )

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
            for _ in range(UNROLL):
                if s.test is not None:
                    c = self.cond(self.expr(s.test), s.line)
                    if c not in (TRUE, FALSE):
                        raise Unsupported("a loop bound the executor cannot decide", s.line)
                    if c == FALSE:
                        return
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

    # ---- expressions -------------------------------------------------------------------------

    def lookup(self, name: str, line: int) -> LValue | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def expr(self, e: n.Expr) -> Any:
        if isinstance(e, n.Num):
            return number(e)
        if isinstance(e, n.Name):
            return self.name(e)
        if isinstance(e, n.Unary):
            return self.unary(e)
        if isinstance(e, n.Binary):
            return self.binary(e.op, self.expr(e.left), self.expr(e.right), e.line)
        if isinstance(e, n.Assign):
            lv = self.lvalue(e.target)
            v = self.expr(e.value)
            if e.op != "=":
                v = self.binary(e.op[:-1], lv.get(), v, e.line)
            lv.set(v)
            return v
        if isinstance(e, n.Cond):
            c = self.cond(self.expr(e.test), e.line)
            if c in (TRUE, FALSE):
                return self.expr(e.then if c == TRUE else e.other)
            return merge(c, self.expr(e.then), self.expr(e.other), e.line)
        if isinstance(e, n.Comma):
            out = None
            for x in e.items:
                out = self.expr(x)
            return out
        if isinstance(e, n.Call):
            return self.call_expr(e)
        if isinstance(e, (n.Member, n.Index)):
            return self.member_or_index(e)
        if isinstance(e, n.Cast):
            return self.cast(e)
        if isinstance(e, n.BraceInit) and e.type is not None:
            return self.brace(self.k.base_type(e.type.text), e)
        raise Unsupported(f"{type(e).__name__} expression in a task body", e.line)

    def name(self, e: n.Name) -> Any:
        lv = self.lookup(e.id, e.line)
        if lv is not None:
            if isinstance(lv, Var):
                lv.line = e.line
            return lv.get()
        if e.id in ("true", "false"):
            return Bool(TRUE if e.id == "true" else FALSE)
        v = self.k.constant(e.id)
        if v is None:
            raise Unsupported(f"{e.id} is neither a local nor a constexpr", e.line)
        return v

    def unary(self, e: n.Unary) -> Any:
        if e.op == "-" and isinstance(e.operand, n.Name) and e.operand.id == "INFINITY":
            return NEG_INF
        if e.op in ("++", "--"):
            lv = self.lvalue(e.operand)
            old = lv.get()
            lv.set(self.binary("+" if e.op == "++" else "-", old, Aff(1), e.line))
            return old if e.postfix else lv.get()
        if e.op == "*":
            return self.lvalue(e).get()
        v = self.expr(e.operand)
        if e.op == "-":
            if isinstance(v, Aff):
                return v.scale(-1)
            if isinstance(v, Real):
                return Real(neg(v.term))
        if e.op == "+" and isinstance(v, (Aff, Real)):
            return v
        if e.op == "!":
            return Bool(not_(self.cond(v, e.line)))
        raise Unsupported(f"unary {e.op} of {type(v).__name__}", e.line)

    def binary(self, op: str, a: Any, b: Any, line: int) -> Any:
        if op in ("&&", "||"):
            ca, cb = self.cond(a, line), self.cond(b, line)
            return Bool(and_(ca, cb) if op == "&&" else or_(ca, cb))
        if isinstance(a, Ptr) and isinstance(b, Aff) and op in ("+", "-"):
            return Ptr(a.array, a.elem, a.offset + (b if op == "+" else b.scale(-1)), a.view)
        if isinstance(b, Ptr) and isinstance(a, Aff) and op == "+":
            return Ptr(b.array, b.elem, b.offset + a, b.view)
        if isinstance(a, Word) and isinstance(b, Aff) and b.is_const():
            return word_op(op, a, b.const, line)
        if isinstance(a, Aff) and isinstance(b, Aff):
            return self.int_binary(op, a, b, line)
        if isinstance(a, (Aff, Real)) and isinstance(b, (Aff, Real)):
            x, y = real(a), real(b)
            if op == "+":
                return Real(add(x, y))
            if op == "-":
                return Real(add(x, neg(y)))
            if op == "*":
                return Real(mul(x, y))
            if op == "/":
                return Real(mul(x, app("recip", y)))
        if op in ("==", "!=") and (a is NEG_INF or b is NEG_INF):
            raise Unsupported("a comparison with -INFINITY", line)
        raise Unsupported(f"{type(a).__name__} {op} {type(b).__name__}", line)

    def int_binary(self, op: str, a: Aff, b: Aff, line: int) -> Any:
        if op in ("+", "-"):
            return a + b if op == "+" else a - b
        if op == "*":
            try:
                return a * b
            except ValueError:
                raise Unsupported("a product of two symbolic integers", line) from None
        if op in ("/", "%"):
            if a.is_const() and b.is_const():
                return Aff(int_op(op, a.const, b.const, line))
            if not b.is_const() or b.const <= 0:
                raise Unsupported("division by a symbolic or non-positive integer", line)
            lo, _ = a.bounds(self.ranges)
            if lo < 0:  # C truncates toward zero, the terms floor
                raise Unsupported("division of an integer that may be negative", line)
            q, r = a.divmod(b.const, self.ranges)
            return q if op == "/" else r
        cmp = {"<": ("<", a, b), "<=": ("<=", a, b), ">": ("<", b, a), ">=": ("<=", b, a)}
        if op in cmp:
            o, x, y = cmp[op]
            return Bool(compare(o, x, y, self.ranges))
        if op in ("==", "!="):
            c = compare("=", a, b, self.ranges)
            return Bool(c if op == "==" else not_(c))
        if a.is_const() and b.is_const():
            bits = {"<<": lambda x, y: x << y, ">>": lambda x, y: x >> y, "&": lambda x, y: x & y}
            if op in bits:
                return Aff(bits[op](a.const, b.const))
        raise Unsupported(f"integer {op} of symbolic values", line)

    def cond(self, v: Any, line: int) -> Term:
        if isinstance(v, Bool):
            return v.cond
        if isinstance(v, Aff):
            return not_(compare("=", v, Aff(0), self.ranges))
        raise Unsupported(f"a {type(v).__name__} used as a condition", line)

    def int_value(self, v: Any, line: int) -> int:
        if not isinstance(v, Aff) or not v.is_const():
            raise Unsupported("an extent or bound that is not constant", line)
        return v.const

    def lvalue(self, e: n.Expr) -> LValue:
        if isinstance(e, n.Name):
            lv = self.lookup(e.id, e.line)
            if lv is None:
                raise Unsupported(f"assignment to {e.id}, which is not a local", e.line)
            return lv
        if isinstance(e, n.Unary) and e.op == "*":
            p = self.expr(e.operand)
            if not isinstance(p, Ptr):
                raise Unsupported("a dereference of something not a global pointer", e.line)
            return Mem(self, p, e.line)
        if isinstance(e, n.Index):
            base = self.expr(e.obj)
            idx = self.expr(e.index)
            if isinstance(base, Ptr):
                if not isinstance(idx, Aff):
                    raise Unsupported("a pointer indexed by a non-integer", e.line)
                return Mem(self, self.binary("+", base, idx, e.line), e.line)
            if isinstance(base, tuple):
                k = self.int_value(idx, e.line)
                if not 0 <= k < len(base):
                    raise Unsupported(f"index {k} outside a local array of {len(base)}", e.line)
                return Elem(self.lvalue(e.obj), k, e.line)
        if isinstance(e, n.Member) and not e.arrow:
            return Elem(self.lvalue(e.obj), e.name, e.line)
        raise Unsupported(f"{type(e).__name__} is not an lvalue the executor models", e.line)

    def member_or_index(self, e: n.Member | n.Index) -> Any:
        if isinstance(e, n.Member):
            if isinstance(e.obj, n.Name) and e.obj.id == "threadIdx":
                if self.loop:
                    raise Unsupported("threadIdx inside a strided loop", e.line)
                raise Unsupported("a task body that depends on threadIdx outside a loop", e.line)
            obj = self.expr(e.obj)
            if isinstance(obj, Params):
                return Layers() if e.name == "layers" else self.pointer(e.name, -1)
            if isinstance(obj, LayerRef):
                return self.pointer(e.name, obj.offset)
            if isinstance(obj, Struct):
                return obj.get(e.name, e.line)
            raise Unsupported(f"member {e.name} of a {type(obj).__name__}", e.line)
        obj = self.expr(e.obj)
        if isinstance(obj, Layers):
            idx = self.expr(e.index)
            layer = Aff.of("layer")
            if not isinstance(idx, Aff) or not (idx - layer).is_const():
                raise Unsupported(
                    "p.layers indexed by something other than the task's layer", e.line
                )
            return LayerRef((idx - layer).const)
        return self.lvalue(e).get()

    def cast(self, e: n.Cast) -> Any:
        v = self.expr(e.operand)
        t = self.k.base_type(e.type.text)
        if isinstance(v, Ptr) and t.endswith("*"):
            return Ptr(v.array, v.elem, v.offset, t[:-1])
        if t in INT_TYPES and isinstance(v, Aff):
            return v
        if t == "float" and isinstance(v, (Aff, Real)):
            return Real(real(v))
        raise Unsupported(f"{e.kind}<{e.type.text}> of a {type(v).__name__}", e.line)

    def coerce(self, v: Any, type_text: str, line: int) -> Any:
        t = self.k.base_type(type_text)
        if t == "float" and isinstance(v, Aff):
            return Real(real(v))
        if t in INT_TYPES and isinstance(v, Real):
            raise Unsupported("a float converted to an integer", line)
        return v

    # ---- calls -------------------------------------------------------------------------------

    def call_expr(self, e: n.Call) -> Any:
        if not isinstance(e.func, n.Name):
            raise Unsupported("a call of something other than a function name", e.line)
        name = e.func.id
        if name in self.k.functions:
            f = self.k.function(name, len(e.args), e.line)
            args: list[LValue] = []
            for p, a in zip(f.params, e.args, strict=False):
                if "&" in p.type.text and not p.type.text.startswith("const "):
                    args.append(self.lvalue(a))  # a reference the callee writes through
                elif "&" in p.type.text and isinstance(a, (n.Name, n.Index, n.Member)):
                    args.append(self.lvalue(a))
                else:
                    args.append(Var(self.cell(self.expr(a), p.name)))
            targs = [self.expr(x) for x in e.template_args if not isinstance(x, n.Type)]
            return self.call(f, args, targs)
        return self.builtin(name, e)

    def builtin(self, name: str, e: n.Call) -> Any:
        """The CUDA toolkit's functions the task bodies use (trusted, as the terms state them)."""
        if name == "__trap":
            self.traps.append(Trap(self.guard, e.line, self.function))
            self.guard = FALSE
            return None
        args = [self.expr(a) for a in e.args]
        if name in ("__ldcg", "__ldg") and len(args) == 1 and isinstance(args[0], Ptr):
            return self.load(args[0], e.line)
        if name in UNARY_FNS and len(args) == 1:
            return Real(app(UNARY_FNS[name], real(args[0])))
        if name == "fmaxf" and len(args) == 2:
            a, b = args
            if a is NEG_INF:
                return b
            if b is NEG_INF:
                return a
            return Real(("max", real(a), real(b)))
        if name == "fmaf" and len(args) == 3:
            return Real(add(mul(real(args[0]), real(args[1])), real(args[2])))
        if name == "make_float4" and len(args) == 4:
            return Struct("float4", tuple(zip(LANES, (Real(real(a)) for a in args), strict=True)))
        if name == "__uint_as_float" and len(args) == 1 and isinstance(args[0], Word):
            w = args[0]
            if w.lo is not None or w.hi is None:
                raise Unsupported("__uint_as_float of a word that is not a bf16 high half", e.line)
            return Real(w.hi)
        if name in ("max", "min") and len(args) == 2 and all(isinstance(a, Aff) for a in args):
            a, b = args
            c = compare("<=", a, b, self.ranges)
            if c not in (TRUE, FALSE):
                raise Unsupported(f"{name} of integers the ranges do not order", e.line)
            return (b if c == TRUE else a) if name == "max" else (a if c == TRUE else b)
        raise Unsupported(f"call of {name}, which the executor does not model", e.line)

    # ---- memory ------------------------------------------------------------------------------

    def load(self, p: Ptr, line: int) -> Any:
        width = 1 if p.view == p.elem else WIDTH.get(p.view, 0)
        if not width:
            raise Unsupported(f"a {p.view} load from the {p.elem} array {p.array}", line)
        elems = [self.load_elem(p, p.offset + k, line) for k in range(width)]
        if p.view == p.elem:
            return elems[0]
        if p.elem == "float" and p.view in ("float4", "float2"):
            return Struct(p.view, tuple(zip(LANES, elems, strict=False)))
        if p.elem == "bf16":
            words = [Word(elems[k].term, elems[k + 1].term) for k in range(0, width, 2)]
            return (
                words[0]
                if p.view == "unsigned"
                else Struct(p.view, tuple(zip(LANES, words, strict=False)))
            )
        raise Unsupported(f"a {p.view} load from the {p.elem} array {p.array}", line)

    def load_elem(self, p: Ptr, offset: Aff, line: int) -> Any:
        for s in reversed(self.stores):  # this thread's own earlier store
            if s.array != p.array or s.loop != self.loop or s.guard == FALSE:
                continue
            d = offset - s.offset
            if d == Aff(0):
                return s.value
            if not d.is_const():
                raise Unsupported(f"a load of {p.array} that may alias an earlier store", line)
        self.loads.append(Load(p.array, offset, self.guard, line, self.loop))
        idx = self.element(p.array, offset)
        if p.elem in ("i64", "int"):
            return Aff.of(("vi", p.array, idx))
        return Real(("v", p.array, idx))

    def store(self, p: Ptr, v: Any, line: int) -> None:
        if p.view == p.elem:
            parts = [v]
        elif p.elem == "float" and p.view in ("float4", "float2") and isinstance(v, Struct):
            parts = [v.get(x, line) for x in LANES[: WIDTH[p.view]]]
        else:
            raise Unsupported(f"a {p.view} store into the {p.elem} array {p.array}", line)
        for k, x in enumerate(parts):
            if p.elem == "float" and not isinstance(x, Real):
                raise Unsupported(f"a store of a {type(x).__name__} into {p.array}", line)
            self.stores.append(
                Store(p.array, p.offset + k, x, self.guard, line, self.function, self.loop)
            )


# ---- helpers ---------------------------------------------------------------------------------


def real(v: Any) -> Term:
    if isinstance(v, Real):
        return v.term
    if isinstance(v, Aff):
        return const(v.const) if v.is_const() else ("r", v)
    if isinstance(v, NegInf):
        raise Unsupported("-INFINITY in arithmetic")
    raise Unsupported(f"a {type(v).__name__} used as a float")


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
