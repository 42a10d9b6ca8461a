"""Expressions of one symbolic thread (`verifier.device.execute`): integers as `Aff`s, floats as
real terms, conditions, lvalues, casts, the task params and `p`'s pointers, and the calls: device
functions (inlined by `call`, the executor's) and the CUDA builtins the task bodies use."""

from __future__ import annotations

from typing import Any

from verifier.device import nodes as n
from verifier.device.effects import Trap
from verifier.device.kernel import int_op, number
from verifier.device.lvalues import Elem, LValue, Mem, Var
from verifier.device.memory import LANES, Memory
from verifier.device.values import (
    FALSE,
    NEG_INF,
    NULL,
    TRUE,
    Bool,
    Closure,
    LayerRef,
    Layers,
    Params,
    Ptr,
    Real,
    Struct,
    Unsupported,
    Word,
    and_,
    merge,
    not_,
    or_,
    quotient,
    real,
    word_op,
)
from verifier.terms import Aff, Term, add, app, compare, mul, neg

INT_TYPES = {
    "int",
    "unsigned",
    "long long",
    "unsigned long long",
    "size_t",
    "unsigned short",
    "short",
}
# constant tables of kernel.cu as the model's tables (their values checked against fused.json:
# `verifier.fused_terms`'s INV_FREQ check)
TABLES = {"INV_FREQ": "inv_freq"}
UNARY_FNS = {"expf": "exp", "__expf": "exp", "rsqrtf": "rsqrt", "sqrtf": "sqrt"}


# C's float comparison -> (term condition, operands swapped)
REAL_ORDER = {
    "<": ("r<", False),
    ">": ("r<", True),
    "<=": ("r<=", False),
    ">=": ("r<=", True),
    "==": ("r=", False),
    "!=": ("r=", False),
}


class Expressions(Memory):
    # set by a lemma whose inputs are reals by its contract (`merge_warps`): a Real compared
    # with -INFINITY is then finite; otherwise such a comparison is outside the model
    finite_reals = False

    def call(self, f: n.Function, args: list[LValue], targs: list[Any]) -> Any:
        """Inline device function f (the executor's)."""
        raise NotImplementedError

    def call_closure(self, c: Closure, args: list[Any], line: int) -> Any:
        """Run lambda c on argument values (the executor's)."""
        raise NotImplementedError

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
            g0 = self.guard
            try:  # each side's loads carry its condition
                self.guard = and_(g0, c)
                a = self.expr(e.then)
                self.guard = and_(g0, not_(c))
                b = self.expr(e.other)
            finally:
                self.guard = g0
            return merge(c, a, b, e.line)
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
        if isinstance(e, n.Lambda):
            return Closure(e, tuple(self.scopes))
        raise Unsupported(f"{type(e).__name__} expression in a task body", e.line)

    def name(self, e: n.Name) -> Any:
        lv = self.lookup(e.id, e.line)
        if lv is not None:
            if isinstance(lv, Var):
                lv.line = e.line
            return lv.get()
        if e.id in ("true", "false"):
            return Bool(TRUE if e.id == "true" else FALSE)
        if e.id == "nullptr":
            return NULL
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
        if e.op == "~" and isinstance(v, Aff):
            return v.scale(-1) - 1  # two's complement
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
            if op in REAL_ORDER:  # float comparisons, over the reals (no NaN)
                lt, swap = REAL_ORDER[op]
                c = (lt, y, x) if swap else (lt, x, y)
                return Bool(("not", ("r=", x, y)) if op == "!=" else c)
            if op == "+":
                return Real(add(x, y))
            if op == "-":
                return Real(add(x, neg(y)))
            if op == "*":
                return Real(mul(x, y))
            if op == "/":
                return Real(quotient(x, y))
        if op in ("==", "!=") and (a is NULL or b is NULL):
            same = a is b  # a global pointer is never null
            if not (same or isinstance(a, Ptr) or isinstance(b, Ptr)):
                raise Unsupported(f"{type(a).__name__} {op} nullptr", line)
            return Bool(TRUE if same == (op == "==") else FALSE)
        if op in ("==", "!=") and (a is NEG_INF or b is NEG_INF):
            other = b if a is NEG_INF else a
            if self.finite_reals and isinstance(other, Real):
                return Bool(TRUE if op == "!=" else FALSE)  # a Real is finite, never -inf
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
        if op == "&" and b.is_const() and b.const > 0 and not a.is_const():
            return self.mask(a, b.const, line)
        if a.is_const() and b.is_const():
            bits = {"<<": lambda x, y: x << y, ">>": lambda x, y: x >> y, "&": lambda x, y: x & y}
            if op in bits:
                return Aff(bits[op](a.const, b.const))
        raise Unsupported(f"integer {op} of symbolic values", line)

    def mask(self, a: Aff, k: int, line: int) -> Aff:
        """a & k for a power of two k (the bit it is: k * ((a div k) mod 2)) or k = 2^p - 1 (a
        mod 2^p); floor division is the two's complement shift, so a may be negative."""
        if k & (k - 1) == 0:
            q, _ = a.divmod(k, self.ranges)
            return q.divmod(2, self.ranges)[1].scale(k)
        if (k + 1) & k == 0:
            return a.divmod(k + 1, self.ranges)[1]
        raise Unsupported(f"a symbolic integer & {k:#x}", line)

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
                if self.thread is not None and not self.loop and e.name == "x":
                    return self.thread
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
        if (
            isinstance(e.obj, n.Name)
            and e.obj.id in TABLES
            and self.lookup(e.obj.id, e.line) is None
        ):
            idx = self.expr(e.index)
            if not isinstance(idx, Aff):
                raise Unsupported(f"{e.obj.id} indexed by a non-integer", e.line)
            return Real(("v", TABLES[e.obj.id], (idx,)))
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

    def call_expr(self, e: n.Call) -> Any:
        if not isinstance(e.func, n.Name):
            raise Unsupported("a call of something other than a function name", e.line)
        name = e.func.id
        local = self.lookup(name, e.line)
        if local is not None and isinstance(local.get(), Closure):
            return self.call_closure(local.get(), [self.expr(a) for a in e.args], e.line)
        if name in self.summaries:
            return self.summaries[name](self, e)
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
        if name == "sincosf" and len(e.args) == 3:  # sincosf(x, &sn, &cs)
            x = real(self.expr(e.args[0]))
            for out, fn in zip(e.args[1:], ("sin", "cos"), strict=True):
                if not (isinstance(out, n.Unary) and out.op == "&"):
                    raise Unsupported("sincosf into something other than &local", e.line)
                self.lvalue(out.operand).set(Real(app(fn, x)))
            return None
        args = [self.expr(a) for a in e.args]
        if name == "__float2bfloat16_rn" and len(args) == 1:
            return Real(real(args[0]))  # over the reals, as the model's terms (rounding trusted)
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
