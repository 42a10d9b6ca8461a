"""What kernel.cu declares at top level, as the symbolic executor reads it: constexprs (evaluated
to their values), enums, type aliases, structs, device functions (with overloads), the task
table TASKS and which device function the megakernel's switch runs for each opcode."""

from __future__ import annotations

from fractions import Fraction
from typing import Any

from compiler.ir.ops import DType
from verifier.device import nodes as n
from verifier.device.values import FALSE, TRUE, Bool, Real, Unsupported
from verifier.graph_terms import round_to
from verifier.terms import Aff, const


class Kernel:
    def __init__(self, unit: n.Unit):
        self.unit = unit
        self.aliases: dict[str, str] = {}
        self.structs: dict[str, n.Struct] = {}
        self.enums: dict[str, int] = {}
        self.enum_members: dict[str, dict[str, int]] = {}
        self.decls: dict[str, tuple[n.Decl, n.Declarator]] = {}
        self.functions: dict[str, list[n.Function]] = {}
        self._values: dict[str, Any] = {}
        for item in unit.items:
            if isinstance(item, n.Using):
                self.aliases[item.name] = item.type.text
            elif isinstance(item, n.Struct):
                self.structs[item.name] = item
            elif isinstance(item, n.Function) and item.body is not None:
                self.functions.setdefault(item.name, []).append(item)
            elif isinstance(item, n.Decl):
                for d in item.declarators:
                    self.decls[d.name] = (item, d)
            elif isinstance(item, n.Enum):
                members: dict[str, int] = {}
                nxt = 0
                for name, e in item.members:
                    nxt = self.int_const(e) if e is not None else nxt
                    members[name] = nxt
                    nxt += 1
                self.enum_members[item.name] = members
                self.enums.update(members)

    # ---- types ---------------------------------------------------------------------------------

    def base_type(self, text: str) -> str:
        """`text` without const/volatile/references, aliases resolved: "const bf16x8" -> "uint4"."""
        words = [w for w in text.replace("&", " ").split() if w not in ("const", "volatile")]
        t = " ".join(words)
        star = t.count("*")
        t = t.replace("*", "").strip()
        while t in self.aliases:
            t = self.aliases[t].replace("const ", "").strip()
        return t + "*" * star

    def struct_fields(self, name: str) -> list[tuple[str, str]]:
        """(field, type text) of struct `name`, in declaration order."""
        s = self.structs.get(name)
        if s is None:
            raise Unsupported(f"kernel.cu defines no struct {name}")
        return [(d.name, decl.type.text) for decl in s.fields for d in decl.declarators]

    # ---- constants -----------------------------------------------------------------------------

    def constant(self, name: str) -> Any:
        """The value of a top-level constexpr (an Aff, a Real or a Bool), or None."""
        if name in self._values:
            return self._values[name]
        if name in self.enums:
            return Aff(self.enums[name])
        got = self.decls.get(name)
        if got is None:
            return None
        decl, d = got
        if "constexpr" not in decl.qualifiers or d.dims or d.init is None:
            return None
        v = self.evaluate(d.init)
        base = self.base_type(decl.type.text)
        if base == "float" and isinstance(v, Aff):
            v = Real(const(v.const))
        self._values[name] = v
        return v

    def int_const(self, e: n.Expr) -> int:
        v = self.evaluate(e)
        if not isinstance(v, Aff) or not v.is_const():
            raise Unsupported("not an integer constant", e.line)
        return v.const

    def evaluate(self, e: n.Expr) -> Any:
        """A constant expression of the top level (constexpr initializers, table entries)."""
        if isinstance(e, n.Num):
            return number(e)
        if isinstance(e, n.Name):
            if e.id in ("true", "false"):
                return Bool(TRUE if e.id == "true" else FALSE)
            v = self.constant(e.id)
            if v is None:
                raise Unsupported(f"{e.id} is not a constant", e.line)
            return v
        if isinstance(e, n.Unary) and e.op == "-":
            v = self.evaluate(e.operand)
            return v.scale(-1) if isinstance(v, Aff) else Real(("*", const(-1), v.term))
        if isinstance(e, n.Binary) and e.op in ("+", "-", "*", "/", "%"):
            a, b = self.evaluate(e.left), self.evaluate(e.right)
            if isinstance(a, Aff) and isinstance(b, Aff) and a.is_const() and b.is_const():
                return Aff(int_op(e.op, a.const, b.const, e.line))
        if isinstance(e, n.Cast):
            return self.evaluate(e.operand)
        raise Unsupported("not a constant expression", e.line)

    # ---- the task table and the dispatch -------------------------------------------------------

    def tasks(self) -> list[dict[str, int]]:
        """TASKS as {field: value} per task (Task's fields in declaration order)."""
        got = self.decls.get("TASKS")
        if got is None or not isinstance(got[1].init, n.BraceInit):
            raise Unsupported("kernel.cu declares no TASKS table")
        names = [f for f, _ in self.struct_fields("Task")]
        out = []
        for row in got[1].init.items:
            if not isinstance(row, n.BraceInit):
                raise Unsupported("a TASKS entry is not a braced initializer", row.line)
            out.append({f: self.int_const(x) for f, x in zip(names, row.items, strict=False)})
        return out

    def dispatch(self) -> dict[int, str]:
        """opcode -> the device function the consumers' switch calls for it (the calls that
        pass `pos`; the producer's switch calls the load_ functions)."""
        out: dict[int, str] = {}
        for fs in self.functions.values():
            for f in fs:
                if "__global__" not in f.qualifiers or f.body is None:
                    continue
                for sw in _walk_stmts(f.body):
                    if not isinstance(sw, n.Switch):
                        continue
                    for label, body in sw.cases:
                        if label is None:
                            continue
                        for st in body:
                            call = st.expr if isinstance(st, n.ExprStmt) else None
                            if (
                                isinstance(call, n.Call)
                                and isinstance(call.func, n.Name)
                                and any(isinstance(a, n.Name) and a.id == "pos" for a in call.args)
                            ):
                                out[self.int_const(label)] = call.func.id
        return out

    def function(self, name: str, nargs: int, line: int = 0) -> n.Function:
        fits = [
            f
            for f in self.functions.get(name, [])
            if sum(p.default is None for p in f.params) <= nargs <= len(f.params)
        ]
        if len(fits) != 1:
            raise Unsupported(f"no single definition of {name} with {nargs} arguments", line)
        return fits[0]


def number(e: n.Num) -> Any:
    if isinstance(e.value, int):
        return Aff(e.value)
    if e.text.lower().endswith("f"):
        return Real(const(round_to(float(e.value), DType.F32)))
    return Real(const(Fraction(e.value)))


def int_op(op: str, a: int, b: int, line: int = 0) -> int:
    """C integer arithmetic (division truncates toward zero)."""
    if op in ("/", "%") and b == 0:
        raise Unsupported("division by zero", line)
    if op == "+":
        return a + b
    if op == "-":
        return a - b
    if op == "*":
        return a * b
    q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
    return q if op == "/" else a - q * b


def _walk_stmts(s: Any) -> list[Any]:
    out = [s]
    if isinstance(s, n.Block):
        for x in s.body:
            out += _walk_stmts(x)
    elif isinstance(s, n.If):
        out += _walk_stmts(s.then) + (_walk_stmts(s.other) if s.other else [])
    elif isinstance(s, (n.For, n.While)):
        out += _walk_stmts(s.body)
    elif isinstance(s, n.Switch):
        for _, body in s.cases:
            for x in body:
                out += _walk_stmts(x)
    return out
