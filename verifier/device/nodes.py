"""The syntax tree of kernel.cu's device code, as `verifier.device.parse` reads it.

kernel.cu is written in a small subset of CUDA C++ (what `compiler.codegen` emits, amk.cuh
included): constexpr ints and tables, structs with fields and inline methods, `__device__`
functions (templates over ints and classes), lambdas, `for`/`while`/`if` (and `if constexpr`),
`asm volatile` statements and C++ casts. The verifier judges the code through this tree, so
every node keeps the kernel.cu line it came from: a counterexample names its function and line.
Anything outside the subset is a `ParseError` naming the line, never skipped.

Types stay text (`Type.text`, e.g. "const float*", "float (&)[8]"), normalized to single spaces;
the symbolic executor reads the few it needs (pointer element types, array extents).
"""

from __future__ import annotations

from dataclasses import dataclass, field


class ParseError(ValueError):
    """kernel.cu (or a header it includes) is not in the subset the verifier reads."""


@dataclass(frozen=True)
class Node:
    line: int  # 1-based line in kernel.cu


# ---- expressions ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Name(Node):
    id: str  # may be qualified: "cuda::memory_order_acquire"


@dataclass(frozen=True)
class Num(Node):
    value: int | float
    text: str  # as written: "0.f", "0xffffffffu", "1e-5f"


@dataclass(frozen=True)
class Str(Node):
    value: str  # adjacent literals joined, escapes decoded


@dataclass(frozen=True)
class Unary(Node):
    op: str  # "-", "+", "!", "~", "*", "&", "++", "--"
    operand: Expr
    postfix: bool = False  # x++ / x--


@dataclass(frozen=True)
class Binary(Node):
    op: str  # "+", "-", "*", "/", "%", "<<", ">>", "&", "|", "^", "&&", "||", "<", "<=", ...
    left: Expr
    right: Expr


@dataclass(frozen=True)
class Assign(Node):
    op: str  # "=", "+=", "-=", "*=", "/=", "^=", "|=", "&=", "<<=", ">>="
    target: Expr
    value: Expr


@dataclass(frozen=True)
class Cond(Node):
    test: Expr
    then: Expr
    other: Expr


@dataclass(frozen=True)
class Comma(Node):
    items: tuple[Expr, ...]  # `a = x, b = y`: evaluated left to right


@dataclass(frozen=True)
class Call(Node):
    func: Expr  # Name, Member (method call) or any callee expression
    args: tuple[Expr, ...]
    template_args: tuple[Expr | Type, ...] = ()  # group_sum<LPK>(..), load_matvec<K>(..)


@dataclass(frozen=True)
class Member(Node):
    obj: Expr
    name: str
    arrow: bool = False  # obj->name


@dataclass(frozen=True)
class Index(Node):
    obj: Expr
    index: Expr


@dataclass(frozen=True)
class Cast(Node):
    kind: str  # "static_cast", "reinterpret_cast", "const_cast", "c" (a C-style cast)
    type: Type
    operand: Expr


@dataclass(frozen=True)
class BraceInit(Node):
    type: Type | None  # ArgMax{a, b}; None for a bare {a, b} initializer
    items: tuple[Expr, ...]


@dataclass(frozen=True)
class Lambda(Node):
    captures: str  # "&", "=", ""
    params: tuple[Param, ...]
    ret: Type | None
    body: Block


@dataclass(frozen=True)
class SizeOf(Node):
    type: Type


Expr = (
    Name
    | Num
    | Str
    | Unary
    | Binary
    | Assign
    | Cond
    | Comma
    | Call
    | Member
    | Index
    | Cast
    | BraceInit
    | Lambda
    | SizeOf
)


# ---- types and declarations -----------------------------------------------------------------


@dataclass(frozen=True)
class Type(Node):
    text: str  # normalized: "const float*", "unsigned", "float (&)[G][8]", "counter_ref"


@dataclass(frozen=True)
class Declarator(Node):
    name: str
    dims: tuple[Expr, ...] = ()  # float acc[NRB][NB][4]: (NRB, NB, 4)
    # `= e`, `= {...}` or `{...}` (a BraceInit of type None), `(args)` (a Call of the type)
    init: Expr | None = None
    unsized: bool = False  # `extern __shared__ unsigned char smem_raw[];`: first extent not given


@dataclass(frozen=True)
class Decl(Node):
    type: Type
    declarators: tuple[Declarator, ...]
    # "static", "constexpr", "__device__", "__shared__", "extern", "__align__(128)"
    qualifiers: tuple[str, ...] = ()


@dataclass(frozen=True)
class Param(Node):
    type: Type
    name: str  # "" for an unnamed parameter
    default: Expr | None = None
    qualifiers: tuple[str, ...] = ()  # "__grid_constant__"


# ---- statements -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ExprStmt(Node):
    expr: Expr


@dataclass(frozen=True)
class Block(Node):
    body: tuple[Stmt, ...]


@dataclass(frozen=True)
class If(Node):
    test: Expr
    then: Stmt
    other: Stmt | None = None
    constexpr: bool = False


@dataclass(frozen=True)
class For(Node):
    init: Decl | ExprStmt | None
    test: Expr | None
    step: Expr | None
    body: Stmt
    pragma: str = ""  # "unroll", "unroll 4": the `#pragma` line right before (semantics-free)


@dataclass(frozen=True)
class While(Node):
    test: Expr
    body: Stmt


@dataclass(frozen=True)
class Return(Node):
    value: Expr | None = None


@dataclass(frozen=True)
class Break(Node):
    pass


@dataclass(frozen=True)
class Continue(Node):
    pass


@dataclass(frozen=True)
class Asm(Node):
    template: str  # the instruction text, e.g. "bar.sync 1, %0;"
    outputs: tuple[tuple[str, Expr], ...]  # (constraint, lvalue): ("=r", done), ("+f", d[0])
    inputs: tuple[tuple[str, Expr], ...]
    clobbers: tuple[str, ...] = ()
    volatile: bool = True


@dataclass(frozen=True)
class Switch(Node):
    test: Expr
    cases: tuple[tuple[Expr | None, tuple[Stmt, ...]], ...]  # (label or None for default, body)


@dataclass(frozen=True)
class StaticAssert(Node):
    test: Expr
    message: str


Stmt = (
    ExprStmt
    | Block
    | If
    | For
    | While
    | Return
    | Break
    | Continue
    | Asm
    | Switch
    | Decl
    | StaticAssert
)


# ---- top level ------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemplateParam(Node):
    kind: str  # "int" (a value) or "class" (a type)
    name: str
    default: Expr | Type | None = None


@dataclass(frozen=True)
class Function(Node):
    name: str
    ret: Type
    params: tuple[Param, ...]
    body: Block | None  # None: a declaration only
    template: tuple[TemplateParam, ...] = ()
    # "static", "__device__", "__global__", "__forceinline__", 'extern "C"', "__launch_bounds__(..)"
    qualifiers: tuple[str, ...] = ()
    end_line: int = 0  # the closing brace


@dataclass(frozen=True)
class Struct(Node):
    name: str
    fields: tuple[Decl, ...]
    methods: tuple[Function, ...] = ()


@dataclass(frozen=True)
class Using(Node):
    name: str
    type: Type


@dataclass(frozen=True)
class Enum(Node):
    name: str  # "" for an anonymous enum
    members: tuple[tuple[str, Expr | None], ...]
    base: Type | None = None  # `enum Op : unsigned short`


@dataclass(frozen=True)
class Unit:
    """kernel.cu as parsed: its top-level items in order, and the system headers it includes
    (trusted: the CUDA toolkit's)."""

    items: tuple[Function | Struct | Using | Enum | Decl | StaticAssert, ...]
    includes: tuple[str, ...] = ()
    arch: int = 0  # the __CUDA_ARCH__ the `#if` branches were resolved for, e.g. 900
    functions: dict[str, Function] = field(default_factory=dict)  # by name (templates once)
    # every definition of each name, in kernel.cu order (dot8 has two); functions[name] is the
    # first of them
    overloads: dict[str, tuple[Function, ...]] = field(default_factory=dict)

    def function(self, name: str) -> Function:
        try:
            return self.functions[name]
        except KeyError:
            raise ParseError(f"kernel.cu defines no device function {name}") from None

    def overload(self, name: str, nargs: int) -> Function:
        """The definition of `name` a call with `nargs` arguments picks (by count alone, which
        tells kernel.cu's overloads apart)."""
        fits = [
            f
            for f in self.overloads.get(name, ())
            if sum(p.default is None for p in f.params) <= nargs <= len(f.params)
        ]
        if len(fits) != 1:
            what = "no" if not fits else "more than one"
            raise ParseError(f"kernel.cu has {what} {name} taking {nargs} arguments")
        return fits[0]
