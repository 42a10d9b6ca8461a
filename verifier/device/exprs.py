"""Expressions for `verifier.device.interp`: values, lvalues, calls (inlined), memory accesses.

Memory is not modelled as contents: a read through a pointer is an event and gives a fresh
value (varying when its address is), a write is an event. What the checks follow is in the
addresses and in the control flow, and those come from constants, thread ids, task fields and
loop counters, which are terms here.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING, Any

import z3

from verifier.device import nodes as n
from verifier.device.sync_values import (
    TID,
    AtomicRef,
    Closure,
    LocalArr,
    Null,
    Obj,
    Opaque,
    Order,
    Ptr,
    Ref,
    StructV,
    as_bool,
    as_int,
    concrete,
    fresh,
    mentions_tid,
)

if TYPE_CHECKING:
    from verifier.device.interp import State

SIZES = {
    "char": 1, "unsigned char": 1, "short": 2, "unsigned short": 2, "__nv_bfloat16": 2,
    "int": 4, "unsigned": 4, "unsigned int": 4, "float": 4, "__nv_bfloat162": 4,
    "long long": 8, "unsigned long long": 8, "size_t": 8, "double": 8, "uint2": 8, "float2": 8,
    "int2": 8, "uint4": 16, "float4": 16, "int4": 16,
}  # fmt: skip
# device intrinsics and math functions: results the checks do not follow
PURE = {
    "expf", "fmaxf", "fminf", "fmaf", "rsqrtf", "sqrtf", "__expf", "__uint_as_float",
    "__float_as_uint", "make_float4", "make_float2", "make_uint4", "make_uint2", "make_int4",
    "__float2bfloat16_rn", "__floats2bfloat162_rn", "__bfloat1622float2", "__bfloat162float",
    "__shfl_xor_sync", "__shfl_sync", "__shfl_down_sync", "fabsf", "isnan", "isinf",
}  # fmt: skip
ORDERS = {
    f"cuda::memory_order_{o}": o for o in ("relaxed", "acquire", "release", "acq_rel", "seq_cst")
}
BUILTIN_SYMS = ("blockIdx.x", "gridDim.x", "blockDim.x")


def base_type(text: str) -> str:
    """ "const float*" -> "float"; "float (&)[8]" -> "float"."""
    t = re.sub(r"\b(const|volatile|static|__restrict__)\b", " ", text)
    t = re.sub(r"\(.*?\)|\[.*?\]|[*&]", " ", t)
    return " ".join(t.split())


def is_pointer(text: str) -> bool:
    return "*" in text


class ExprEval:
    """The expression half of the interpreter (see `verifier.device.interp.Interp`)."""

    def __init__(self, unit: n.Unit) -> None:
        self.unit = unit
        self.structs = {i.name: i for i in unit.items if isinstance(i, n.Struct)}
        self.usings = {i.name: i.type.text for i in unit.items if isinstance(i, n.Using)}
        self.frames: list[int] = []
        self.parents: dict[int, int | None] = {}
        self.this: dict[int, Ref | None] = {}
        self.chain: list[tuple[str, int]] = []
        self.returns: list[list[Any]] = []
        self.breaks: list[list[Any]] = []
        self.continues: list[list[Any]] = []
        self.last_returns: list[Any] = []
        self.externals: set[str] = set()
        self.globals: dict[str, object] = {}
        self.invariants: dict[str, z3.BoolRef] = {}  # a symbol -> what is proved of it
        self._consts(unit)

    # ---- the file's constants and tables -------------------------------------------------------

    def _consts(self, unit: n.Unit) -> None:
        from verifier.device.interp import State

        st = State({}, True, frozenset())
        self.frames.append(self.new_frame(None))
        for item in unit.items:
            if isinstance(item, n.Enum):
                k = 0
                for name, e in item.members:
                    if e is not None:
                        k = concrete(self.eval(e, st))  # type: ignore[assignment]
                    self.globals[name] = k
                    k += 1
            elif isinstance(item, n.Decl):
                for d in item.declarators:
                    if "__shared__" in item.qualifiers:
                        continue
                    if d.dims or "__device__" in item.qualifiers:
                        self.globals[d.name] = Ptr(
                            "const", d.name, z3.IntVal(0), self.resolve(base_type(item.type.text))
                        )
                    elif d.init is not None:
                        self.globals[d.name] = self.eval(d.init, st)
        self.frames.pop()

    def const(self, name: str) -> int:
        v = concrete(self.globals.get(name))
        if not isinstance(v, int):
            raise n.ParseError(f"kernel.cu has no integer constant {name}")
        return v

    def resolve(self, t: str) -> str:
        seen = 0
        while t in self.usings and seen < 8:
            t, seen = base_type(self.usings[t]), seen + 1
        return t

    def sizeof(self, t: str) -> int:
        t = self.resolve(base_type(t))
        if t in SIZES:
            return SIZES[t]
        if t in self.structs:
            return sum(
                self.sizeof(f.type.text) * len(f.declarators) for f in self.structs[t].fields
            )
        return 1

    def new_frame(self, parent: int | None, this: Ref | None = None) -> int:
        fid = len(self.parents)
        self.parents[fid] = parent
        self.this[fid] = this
        return fid

    def param_value(self, p: n.Param) -> object:
        t = self.resolve(base_type(p.type.text))
        if t in self.structs:
            return Obj(t, "param", p.name, p.name, False)
        return fresh(p.name, False)

    # ---- names and lvalues ---------------------------------------------------------------------

    def lookup(self, name: str, st: State) -> Ref | object:
        """A Ref to the variable `name` is bound to, or a global value."""
        f: int | None = self.frames[-1]
        while f is not None:
            if (f, name) in st.env:
                return self.follow(Ref((f, name)), st)
            this = self.this.get(f)
            if this is not None:
                sv = self.read_ref(this, st)
                if isinstance(sv, StructV) and name in dict(sv.fields):
                    return Ref(this.key, (*this.path, name))
            f = self.parents[f]
        if name in self.globals:
            return self.globals[name]
        if name in ORDERS:
            return Order(ORDERS[name])
        if name in ("true", "false"):
            return name == "true"
        if name == "nullptr":
            return Null()
        if name in ("INFINITY", "NAN"):
            return Opaque(False)
        if name in self.unit.functions:
            return Closure(self.unit.functions[name], -1)
        return ("type", name)

    def follow(self, r: Ref, st: State) -> Ref:
        v = st.env.get(r.key)
        while isinstance(v, Ref) and not r.path:
            r = v
            v = st.env.get(r.key)
        return r

    def read_ref(self, r: Ref, st: State) -> object:
        v = st.env[r.key]
        for p in r.path:
            v = self.member(v, p, st)
        return v

    def write_ref(self, r: Ref, value: object, st: State) -> None:
        def put(v: object, path: tuple[str, ...]) -> object:
            if not path:
                return value
            if isinstance(v, StructV):
                return v.set(path[0], put(v.get(path[0]), path[1:]))
            return v  # a field of a struct read from memory: not followed

        st.env[r.key] = put(st.env[r.key], r.path)

    def lvalue(self, e: n.Expr, st: State) -> object:
        """A Ref (variable or field), a Ptr (memory), or a LocalArr (registers)."""
        if isinstance(e, n.Name):
            return self.lookup(e.id, st)
        if isinstance(e, n.Member) and not e.arrow:
            base = self.lvalue(e.obj, st)
            if isinstance(base, Ref):
                return Ref(base.key, (*base.path, e.name))
            return self.member(self.eval(e.obj, st), e.name, st)
        if isinstance(e, n.Index):
            base = self.eval(e.obj, st)
            idx = as_int(self.eval(e.index, st))
            if isinstance(base, Ptr):
                return self.offset(base, idx)
            return LocalArr("arr")
        if isinstance(e, n.Unary) and e.op == "*":
            return self.eval(e.operand, st)
        if isinstance(e, n.Cast):
            return self.lvalue(e.operand, st)
        raise n.ParseError(f"kernel.cu:{e.line}: not an lvalue the verifier follows")

    def assign_to(self, e: n.Expr, value: object, st: State) -> None:
        lv = self.lvalue(e, st)
        self.store(lv, value, e.line, st)

    def store(self, lv: object, value: object, line: int, st: State) -> None:
        if isinstance(lv, Ref):
            self.write_ref(lv, value, st)
        elif isinstance(lv, Ptr):
            self.emit(st, "write", line, ptr=lv, size=self.sizeof(lv.elem), via="st")  # type: ignore[attr-defined]

    def load(self, lv: object, line: int, st: State, via: str = "ld") -> object:
        if isinstance(lv, Ref):
            return self.read_ref(lv, st)
        if isinstance(lv, Ptr):
            self.emit(st, "read", line, ptr=lv, size=self.sizeof(lv.elem), via=via)  # type: ignore[attr-defined]
            vary = mentions_tid(lv.off)
            if lv.elem in self.structs:
                return Obj(lv.elem, lv.space, lv.region, f"{lv.region}@{line}", vary)
            return fresh(f"{lv.region}@{line}", vary)
        return Opaque(True)

    def offset(self, p: Ptr, k: object) -> Ptr:
        return Ptr(p.space, p.region, p.off + as_int(k) * self.sizeof(p.elem), p.elem)

    def member(self, v: object, name: str, st: State) -> object:
        if isinstance(v, StructV):
            return v.get(name)
        if isinstance(v, Ref):
            return self.member(self.read_ref(v, st), name, st)
        if isinstance(v, Obj):
            s = self.structs.get(v.type)
            for f in s.fields if s else ():
                for d in f.declarators:
                    if d.name == name:
                        t = self.resolve(base_type(f.type.text))
                        region = f"{v.region}.{name}"
                        if d.dims:
                            return Ptr(v.space, region, z3.IntVal(0), t)
                        if is_pointer(f.type.text):
                            return Ptr("global", region, z3.IntVal(0), t)
                        if t in self.structs:
                            return Obj(t, v.space, region, f"{v.name}.{name}", v.varying)
                        return fresh(f"{v.name}.{name}", v.varying)
            return Opaque(v.varying)
        return Opaque(mentions_tid(v))

    # ---- expressions ---------------------------------------------------------------------------

    def eval(self, e: n.Expr, st: State) -> object:
        if isinstance(e, n.Num):
            return e.value if isinstance(e.value, int) else Opaque(False)
        if isinstance(e, n.Str):
            return Opaque(False)
        if isinstance(e, n.Name):
            v = self.lookup(e.id, st)
            return self.read_ref(v, st) if isinstance(v, Ref) else v
        if isinstance(e, n.Member):
            if isinstance(e.obj, n.Name) and f"{e.obj.id}.{e.name}" in BUILTIN_SYMS:
                return z3.Int(f"{e.obj.id}.{e.name}")
            if isinstance(e.obj, n.Name) and e.obj.id == "threadIdx":
                return TID if e.name == "x" else 0
            obj = self.eval(e.obj, st)
            if e.arrow:
                obj = self.load(obj, e.line, st)
            return self.member(obj, e.name, st)
        if isinstance(e, n.Index):
            return self.load(self.lvalue(e, st), e.line, st)
        if isinstance(e, n.Unary):
            return self.unary(e, st)
        if isinstance(e, n.Binary):
            return self.binary(e, st)
        if isinstance(e, n.Assign):
            value = self.eval(e.value, st)
            if e.op != "=":
                lv = self.lvalue(e.target, st)
                value = self.arith(e.op[:-1], self.load(lv, e.line, st), value)
                self.store(lv, value, e.line, st)
            else:
                self.assign_to(e.target, value, st)
            return value
        if isinstance(e, n.Cond):
            c = as_bool(self.eval(e.test, st))
            k = concrete(c)
            if k is not None:
                return self.eval(e.then if k else e.other, st)
            g = st.guard
            st.guard = z3.And(g, c)
            a = self.eval(e.then, st)
            st.guard = z3.And(g, z3.Not(c))
            b = self.eval(e.other, st)
            st.guard = g
            return self.merge(a, b, c)
        if isinstance(e, n.Comma):
            last: object = None
            for x in e.items:
                last = self.eval(x, st)
            return last
        if isinstance(e, n.Call):
            return self.call(e, st)
        if isinstance(e, n.Cast):
            return self.cast(e, st)
        if isinstance(e, n.BraceInit):
            return self.construct(e.type.text if e.type else "", list(e.items), st, e.line)
        if isinstance(e, n.Lambda):
            return Closure(e, self.frames[-1])
        if isinstance(e, n.SizeOf):
            return self.sizeof(e.type.text)
        raise n.ParseError(f"kernel.cu:{e.line}: expression {type(e).__name__} not followed")

    def unary(self, e: n.Unary, st: State) -> object:
        if e.op == "&":
            return self.lvalue(e.operand, st)
        if e.op == "*":
            return self.load(self.eval(e.operand, st), e.line, st)
        if e.op in ("++", "--"):
            lv = self.lvalue(e.operand, st)
            old = self.load(lv, e.line, st)
            new = self.arith("+" if e.op == "++" else "-", old, 1)
            self.store(lv, new, e.line, st)
            return old if e.postfix else new
        v = self.eval(e.operand, st)
        if e.op == "!":
            b = as_bool(v)
            return (not b) if isinstance(b, bool) else z3.Not(b)
        if isinstance(v, Opaque):
            return v
        x = as_int(v)
        return {"-": lambda: -x, "+": lambda: x, "~": lambda: -x - 1}[e.op]()

    def binary(self, e: n.Binary, st: State) -> object:
        a = self.eval(e.left, st)
        if e.op in ("&&", "||"):
            ca = as_bool(a)
            if isinstance(ca, bool) and ca == (e.op == "||"):
                return ca
            g = st.guard
            st.guard = z3.And(g, ca if e.op == "&&" else z3.Not(ca))
            cb = as_bool(self.eval(e.right, st))
            st.guard = g
            if isinstance(ca, bool):
                return cb
            return z3.And(ca, cb) if e.op == "&&" else z3.Or(ca, cb)
        return self.arith(e.op, a, self.eval(e.right, st))

    def arith(self, op: str, a: object, b: object) -> object:
        if op in ("==", "!=") and (isinstance(a, Null) or isinstance(b, Null)):
            same = isinstance(a, Null) and isinstance(b, Null)
            return same if op == "==" else not same
        if isinstance(a, Ptr) and op in ("+", "-") and not isinstance(b, Ptr):
            return self.offset(a, as_int(b) if op == "+" else -as_int(b))
        if isinstance(a, Ptr) and isinstance(b, Ptr):
            d = (a.off - b.off) / self.sizeof(a.elem)
            return d if op == "-" else self.compare(op, a.off, b.off)
        if isinstance(a, (Opaque, Obj)) or isinstance(b, (Opaque, Obj)) or isinstance(a, Ptr):
            vary = mentions_tid(a) or mentions_tid(b)
            if op in ("<", "<=", ">", ">=", "==", "!="):
                return fresh("cmp", vary, "bool")
            return Opaque(vary)
        x, y = as_int(a), as_int(b)
        if op in ("<", "<=", ">", ">=", "==", "!="):
            return self.compare(op, x, y)
        if isinstance(x, int) and isinstance(y, int):
            return _int_op(op, x, y)
        if op == "/" or op == "%":
            return x / y if op == "/" else x % y  # nonnegative operands: C's truncation
        if op in ("&", "|", "^", "<<", ">>"):
            ky = concrete(y)
            if op == "<<" and isinstance(ky, int):
                return x * (1 << ky)
            if op == ">>" and isinstance(ky, int):
                return x / (1 << ky)
            if op == "&" and isinstance(ky, int) and 0 <= ky < 1 << 16:
                return x & ky if isinstance(x, int) else _mask(x, ky)
            return fresh("bits", mentions_tid(x) or mentions_tid(y))
        return {"+": lambda: x + y, "-": lambda: x - y, "*": lambda: x * y}[op]()

    def compare(self, op: str, x: object, y: object) -> object:
        if isinstance(x, int) and isinstance(y, int):
            return _int_op(op, x, y)
        return {"<": lambda: x < y, "<=": lambda: x <= y, ">": lambda: x > y,  # type: ignore[operator]
                ">=": lambda: x >= y, "==": lambda: x == y, "!=": lambda: x != y}[op]()  # type: ignore[operator]  # fmt: skip

    def cast(self, e: n.Cast, st: State) -> object:
        v = self.eval(e.operand, st)
        t = e.type.text
        if isinstance(v, Ptr):
            if is_pointer(t):
                return Ptr(v.space, v.region, v.off, self.resolve(base_type(t)))
            return Ptr(v.space, v.region, v.off, "unsigned char")  # an address as an integer
        if isinstance(v, Ref) and is_pointer(t):
            return v
        if base_type(t) in ("float", "double"):
            return Opaque(mentions_tid(v))
        return v

    # ---- calls ---------------------------------------------------------------------------------

    def call(self, e: n.Call, st: State) -> object:
        f = e.func
        if isinstance(f, n.Member):  # a method
            if isinstance(f.obj, n.Name) and f.obj.id == "threadIdx":
                raise n.ParseError(f"kernel.cu:{e.line}: call of threadIdx")
            objv = self.eval(f.obj, st)
            if isinstance(objv, AtomicRef):
                return self.atomic(objv, f.name, [self.eval(a, st) for a in e.args], e.line, st)
            lv = self.lvalue(f.obj, st)
            sv = self.read_ref(lv, st) if isinstance(lv, Ref) else objv
            if isinstance(sv, StructV) and sv.type in self.structs:
                for m in self.structs[sv.type].methods:
                    if m.name.split("::")[-1] == f.name:
                        return self.inline(m, e, st, this=lv if isinstance(lv, Ref) else None)
            raise n.ParseError(f"kernel.cu:{e.line}: method {f.name} not followed")
        callee = self.lookup(f.id, st) if isinstance(f, n.Name) else self.eval(f, st)
        if isinstance(callee, Ref):
            callee = self.read_ref(callee, st)
        if isinstance(callee, Closure):
            fn = callee.fn
            if isinstance(fn, n.Function) and len(self.unit.overloads.get(fn.name, ())) > 1:
                fn = self.unit.overload(fn.name, len(e.args))
            return self.inline(fn, e, st, frame=callee.frame)
        name = f.id if isinstance(f, n.Name) else ""
        if (isinstance(callee, tuple) and name in self.structs) or self.resolve(
            name
        ) in self.structs:
            return self.construct(name, list(e.args), st, e.line)
        if self.resolve(name).startswith("cuda::atomic_ref"):
            ptr = self.lvalue(e.args[0], st)
            scope = self.resolve(name).split(",")[-1].strip(" >")
            if not isinstance(ptr, Ptr):
                raise n.ParseError(f"kernel.cu:{e.line}: atomic_ref over a non-memory object")
            return AtomicRef(ptr, scope)
        return self.intrinsic(name, e, st)

    def intrinsic(self, name: str, e: n.Call, st: State) -> object:
        args = [self.eval(a, st) for a in e.args]
        vary = any(mentions_tid(a) for a in args)
        if name in ("__ldg", "__ldcg", "__ldca", "__ldcs", "__ldlu", "__ldcv"):
            return self.load(args[0], e.line, st, via=name)
        if name == "__cvta_generic_to_shared":
            return args[0]
        if name in ("min", "max"):
            a, b = as_int(args[0]), as_int(args[1])
            if isinstance(a, int) and isinstance(b, int):
                return min(a, b) if name == "min" else max(a, b)
            return z3.If(a < b, a, b) if name == "min" else z3.If(a > b, a, b)
        if name == "__syncthreads":
            self.emit(st, "barrier", e.line, id=0, count=self.block, memory=True)  # type: ignore[attr-defined]
        elif name in ("__syncwarp", "__nanosleep"):
            self.emit(st, name.strip("_"), e.line)  # type: ignore[attr-defined]
        elif name == "__trap":
            self.emit(st, "trap", e.line)  # type: ignore[attr-defined]
            st.dead = st.trapped = True
        elif name == "sincosf":
            for a in e.args[1:]:
                self.assign_to(n.Unary(a.line, "*", a), Opaque(True), st)
        elif name not in PURE:
            self.externals.add(name)
        return Opaque(vary)

    def atomic(self, a: AtomicRef, op: str, args: list[object], line: int, st: State) -> object:
        order = next((x.name for x in args if isinstance(x, Order)), "seq_cst")
        self.emit(st, "atomic", line, ptr=a.ptr, op=op, order=order, scope=a.scope, args=args)  # type: ignore[attr-defined]
        return fresh(f"{op}@{line}", True)

    def inline(
        self, fn: Any, e: n.Call, st: State, this: Ref | None = None, frame: int = -1
    ) -> object:
        fid = self.new_frame(frame if frame >= 0 else None, this)
        tparams = getattr(fn, "template", ())
        for i, tp in enumerate(tparams):
            arg = e.template_args[i] if i < len(e.template_args) else tp.default
            if tp.kind == "int" and arg is not None and not isinstance(arg, n.Type):
                st.env[(fid, tp.name)] = self.eval(arg, st)
        for i, p in enumerate(fn.params):
            arg_e = e.args[i] if i < len(e.args) else p.default
            if arg_e is None:
                raise n.ParseError(f"kernel.cu:{e.line}: missing argument {p.name}")
            if "&" in p.type.text:
                lv = self.lvalue(arg_e, st) if _is_lvalue(arg_e) else self.eval(arg_e, st)
                if isinstance(lv, Ref):
                    st.env[(fid, p.name)] = self.follow(lv, st) if not lv.path else lv
                    continue
                st.env[(fid, p.name)] = lv
            else:
                st.env[(fid, p.name)] = self.eval(arg_e, st)
        name = getattr(fn, "name", "lambda")
        self.chain.append((name, e.line))
        self.frames.append(fid)
        out = self.body(fn.body, st)  # type: ignore[attr-defined]
        self.frames.pop()
        self.chain.pop()
        rets = [v for v in self.last_returns if v is not None]
        st.env, st.guard, st.facts, st.dead = out.env, out.guard, out.facts, out.dead
        for k in [k for k in st.env if k[0] == fid]:
            del st.env[k]
        if not rets:
            return None
        v = rets[0]
        for r in rets[1:]:
            v = self.merge(v, r, None)
        return v

    def construct(self, tname: str, args: list[n.Expr], st: State, line: int) -> object:
        t = self.resolve(base_type(tname))
        if t not in self.structs:
            vals = [self.eval(a, st) for a in args]
            return Opaque(any(mentions_tid(v) for v in vals))
        fields = []
        k = 0
        for f in self.structs[t].fields:
            for d in f.declarators:
                if k < len(args):
                    v = self.eval(args[k], st)
                elif d.init is not None:
                    v = self.eval(d.init, st)
                else:
                    v = self.default(f.type.text, d, f"{t}.{d.name}")
                fields.append((d.name, v))
                k += 1
        return StructV(t, tuple(fields))

    def default(self, type_text: str, d: n.Declarator, name: str) -> object:
        t = self.resolve(base_type(type_text))
        if d.dims:
            return LocalArr(name)
        if t in self.structs and not is_pointer(type_text):
            return self.construct(t, [], None, d.line)  # type: ignore[arg-type]
        return Opaque(True) if t in ("float", "double") else fresh(name, True)

    def initial(self, decl: n.Decl, d: n.Declarator, st: State) -> object:
        if "__shared__" in decl.qualifiers:
            return Ptr("shared", d.name, z3.IntVal(0), self.resolve(base_type(decl.type.text)))
        if d.dims:
            return LocalArr(d.name)
        t = self.resolve(base_type(decl.type.text))
        if d.init is None:
            return self.default(decl.type.text, d, d.name)
        if isinstance(d.init, n.BraceInit) and d.init.type is None:
            return self.construct(t, list(d.init.items), st, d.line)
        if (
            isinstance(d.init, n.Call)
            and isinstance(d.init.func, n.Name)
            and d.init.func.id == base_type(decl.type.text)
        ):
            return self.call(d.init, st)
        if "&" in decl.type.text and _is_lvalue(d.init):
            lv = self.lvalue(d.init, st)
            if isinstance(lv, Ref):
                return lv
        return self.eval(d.init, st)

    # ---- joins ---------------------------------------------------------------------------------

    def same(self, a: object, b: object) -> bool:
        if isinstance(a, z3.ExprRef) and isinstance(b, z3.ExprRef):
            return a.eq(b)
        if isinstance(a, z3.ExprRef) or isinstance(b, z3.ExprRef):
            return False
        if isinstance(a, Ptr) and isinstance(b, Ptr):
            return (a.space, a.region, a.elem) == (b.space, b.region, b.elem) and self.same(
                a.off, b.off
            )
        if isinstance(a, StructV) and isinstance(b, StructV):
            return a.type == b.type and all(
                self.same(x, y) for (_, x), (_, y) in zip(a.fields, b.fields, strict=True)
            )
        return type(a) is type(b) and a == b

    def merge(self, a: object, b: object, c: object) -> object:
        """One value for `a` (where c holds) or `b` (else; c None: unknown which)."""
        if self.same(a, b):
            return a
        if isinstance(a, Ptr) and isinstance(b, Ptr) and (a.space, a.region) == (b.space, b.region):
            off = z3.If(c, a.off, b.off) if c is not None else self.widen(a.off, b.off)
            return Ptr(a.space, a.region, off, a.elem)
        if isinstance(a, StructV) and isinstance(b, StructV) and a.type == b.type:
            return StructV(
                a.type,
                tuple(
                    (k, self.merge(x, y, c))
                    for (k, x), (_, y) in zip(a.fields, b.fields, strict=True)
                ),
            )
        num = (int, z3.ArithRef)
        if isinstance(a, num) and isinstance(b, num) and c is not None and not isinstance(c, bool):
            return z3.If(c, a, b)
        boo = (bool, z3.BoolRef)
        if isinstance(a, boo) and isinstance(b, boo) and c is not None and not isinstance(c, bool):
            return z3.If(c, a, b)
        if (
            isinstance(a, num)
            and isinstance(b, num)
            and not isinstance(a, bool)
            and not isinstance(b, bool)
        ):
            y = fresh("v", mentions_tid(a) or mentions_tid(b) or mentions_tid(c))
            self.invariants[y.decl().name()] = z3.Or(y == a, y == b)  # one of the paths' values
            return y
        return self.widen(a, b, mentions_tid(c))

    def widen(self, a: object, b: object, vary: bool = False) -> object:
        vary = vary or mentions_tid(a) or mentions_tid(b)
        if isinstance(a, Ptr) and isinstance(b, Ptr) and (a.space, a.region) == (b.space, b.region):
            return Ptr(a.space, a.region, fresh(f"{a.region}.off", vary), a.elem)
        if isinstance(a, StructV) and isinstance(b, StructV) and a.type == b.type:
            return StructV(
                a.type,
                tuple(
                    (k, self.widen(x, y)) for (k, x), (_, y) in zip(a.fields, b.fields, strict=True)
                ),
            )
        if isinstance(a, (bool, z3.BoolRef)):
            return fresh("b", vary, "bool")
        if isinstance(a, (int, z3.ArithRef)):
            return fresh("v", vary)
        if isinstance(a, (LocalArr, Ref, Closure, Null, AtomicRef, Order)):
            return a
        return Opaque(vary)


def _is_lvalue(e: n.Expr) -> bool:
    return isinstance(e, (n.Name, n.Member, n.Index)) or (isinstance(e, n.Unary) and e.op == "*")


def _mask(x: z3.ArithRef | int, m: int) -> z3.ArithRef | int:
    """x & m for a constant m >= 0, bit by bit: bit i of x is floor(x / 2^i) mod 2 (Z3's div and
    mod floor, so this is two's complement for negative x too)."""
    if m & (m + 1) == 0:
        return x % (m + 1)  # the low bits
    out: z3.ArithRef | int = 0
    for i in range(m.bit_length()):
        if m >> i & 1:
            out = out + (x / (1 << i) % 2) * (1 << i)
    return out


def _int_op(op: str, x: int, y: int) -> int | bool:
    if op == "/":
        return int(x / y) if y else 0
    if op == "%":
        return x - int(x / y) * y if y else 0
    return {
        "+": x + y, "-": x - y, "*": x * y, "&": x & y, "|": x | y, "^": x ^ y,
        "<<": x << y if y >= 0 else 0, ">>": x >> y if y >= 0 else 0,
        "<": x < y, "<=": x <= y, ">": x > y, ">=": x >= y, "==": x == y, "!=": x != y,
    }[op]  # fmt: skip


__all__ = ["ExprEval", "as_bool"]
