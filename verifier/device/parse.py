"""kernel.cu -> `Unit`: a recursive-descent parser for the CUDA C++ subset codegen emits.

`parse(text, arch)` reads the whole file (amk.cuh included, as codegen pastes it): constexpr
dims, `using`, `static_assert`, structs with fields and inline methods, `enum Op : unsigned
short {..}`, `__device__ const` tables, `__device__` functions and templates, and the one
`extern "C" __global__` kernel. `source.tokenize` has already dropped comments and resolved
`#if __CUDA_ARCH__` for `arch`; `expr.py` reads expressions. Every node keeps the kernel.cu
line of its first token; anything outside the subset is a `ParseError("kernel.cu line N:
...")` naming the line and what was found there, never skipped.

Templates. `a < b` and `f<K>(x)` look alike; the rule: a name followed by `<` opens template
arguments only if it is a template known at that point: a function declared with
`template <...>` earlier in kernel.cu, a C++ cast (`static_cast` and its kin), or a template
type of the toolkit the subset allows (`cuda::atomic_ref`). Everywhere else `<` is less-than.
kernel.cu declares its templates before their use (C++ demands as much), so the rule reads it
as nvcc does.

Why kernel.cu, not PTX or SASS. A counterexample must name something a person can fix: a
device function and a kernel.cu line of code we generate, not a register in a listing of tens
of thousands of instructions. The code is ours and small (one file, a few hundred lines of
device code in a fixed subset), so a parser for exactly that subset is cheap and refuses the
rest. What runs is tied to what was read by `verifier.provenance`, which recompiles kernel.cu
with nvcc and compares the cubin: nvcc and ptxas stay trusted, as the CUDA toolkit's headers
(`Unit.includes`) are.
"""

from __future__ import annotations

from verifier.device.cursor import words
from verifier.device.expr import ExprParser
from verifier.device.nodes import (
    Asm,
    Block,
    Break,
    Call,
    Continue,
    Decl,
    Declarator,
    Enum,
    Expr,
    ExprStmt,
    For,
    Function,
    If,
    Name,
    ParseError,
    Return,
    StaticAssert,
    Stmt,
    Str,
    Struct,
    Switch,
    TemplateParam,
    Type,
    Unit,
    Using,
    While,
)
from verifier.device.source import Tokens, tokenize

# words before a declaration's type; `const` and `volatile` belong to the type
QUALIFIERS = words(
    "static constexpr __device__ __host__ __global__ __shared__ __constant__ __forceinline__ "
    "__noinline__ inline extern register"
)
_WITH_ARGS = frozenset(("__align__", "__launch_bounds__"))
_REFUSED = {
    "goto": "goto",
    "do": "a do-while loop",
    "try": "exceptions",
    "throw": "exceptions",
    "new": "new",
    "delete": "delete",
    "class": "a class (the subset has structs)",
    "union": "a union",
    "namespace": "a namespace",
    "operator": "operator overloading",
}

Item = Function | Struct | Using | Enum | Decl | StaticAssert


def parse(text: str, arch: int) -> Unit:
    """kernel.cu's syntax tree, its `#if __CUDA_ARCH__` branches resolved for `arch`.

    Args:
        text: the whole kernel.cu.
        arch: `__CUDA_ARCH__` of the cubin being judged, e.g. 900 (sm_90a) or 800 (sm_80);
            `source.arch_of_cubin` reads it from a cubin's name.

    Raises:
        ParseError: the text is outside the subset, naming the kernel.cu line.
    """
    toks = tokenize(text, arch)
    p = Parser(toks)
    items = p.unit_items()
    functions: dict[str, Function] = {}
    overloads: dict[str, list[Function]] = {}
    for f in p.functions:
        defined = overloads.setdefault(f.name, [])
        if f.body is None and any(g.body is not None for g in defined):
            continue
        defined[:] = [g for g in defined if g.body is not None]
        defined.append(f)
    for name, fs in overloads.items():
        functions[name] = fs[0]
    return Unit(
        items=tuple(items),
        includes=toks.includes,
        arch=arch,
        functions=functions,
        overloads={n: tuple(fs) for n, fs in overloads.items()},
    )


class Parser(ExprParser):
    """Statements and top-level items of kernel.cu."""

    def __init__(self, toks: Tokens) -> None:
        super().__init__(toks)
        self.functions: list[Function] = []

    # ---- top level --------------------------------------------------------------------------

    def unit_items(self) -> list[Item]:
        items: list[Item] = []
        while self.kinds[self.i] != "eof":
            items.append(self.item())
        return items

    def item(self) -> Item:
        tx = self.tok
        if self.kinds[self.i] == "pragma":
            raise self.error("#pragma unroll outside a function")
        self.refuse()
        if tx == "template":
            line = self.line
            tparams = self.template_params()
            return self.function_or_decl(line, tparams)
        if tx == "using":
            return self.using()
        if tx == "static_assert":
            return self.static_assert()
        if tx == "struct":
            return self.struct()
        if tx == "enum":
            return self.enum()
        return self.function_or_decl(self.line, ())

    def refuse(self) -> None:
        what = _REFUSED.get(self.tok)
        if what is not None and self.kinds[self.i] == "id":
            raise self.error(f"{what} is outside the subset the verifier reads")

    def qualifiers(self) -> list[str]:
        out: list[str] = []
        t = self.texts
        while True:
            tx = t[self.i]
            if tx == "extern" and self.kinds[self.i + 1] == "str":
                out.append(f"extern {t[self.i + 1]}")
                self.i += 2
            elif tx in QUALIFIERS:
                out.append(tx)
                self.i += 1
            elif tx in _WITH_ARGS:
                a = self.i
                self.i += 1
                out.append(self.span_text(a, self.balanced()))
            else:
                return out

    def template_params(self) -> tuple[TemplateParam, ...]:
        self.expect("template")
        self.expect("<")
        out: list[TemplateParam] = []
        while True:
            line = self.line
            if self.tok in ("class", "typename"):
                self.i += 1
                name = self.ident("a template parameter name")
                self.types.add(name)  # a type inside this template (dropped after it)
                default: Expr | Type | None = self.type_() if self.accept("=") else None
                out.append(TemplateParam(line, "class", name, default))
            else:
                ty = self.type_()
                if ty.text not in ("int", "unsigned", "bool", "long", "short", "size_t"):
                    raise self.error(f"template parameter of type {ty.text}")
                name = self.ident("a template parameter name")
                default = None
                if self.accept("="):
                    outer, self.no_gt = self.no_gt, True
                    default = self.cond()
                    self.no_gt = outer
                out.append(TemplateParam(line, "int", name, default))
            if not self.accept(","):
                break
        self.close_angle()
        return tuple(out)

    def function_or_decl(self, line: int, tparams: tuple[TemplateParam, ...]) -> Function | Decl:
        quals = self.qualifiers()
        ty = self.type_()
        quals += self.qualifiers()  # `void __launch_bounds__(..) amk_megakernel(..)`
        if self.texts[self.i + 1] == "(" or (tparams and self.kinds[self.i] == "id"):
            name = self.ident("a function name")
            if tparams:
                self.template_funcs.add(name)
            f = self.function(line, name, ty, quals, tparams)
            for tp in tparams:
                if tp.kind == "class":
                    self.types.discard(tp.name)
            return f
        if tparams:
            raise self.error("a template that is not a function")
        return self.declaration(line, ty, quals)

    def function(
        self,
        line: int,
        name: str,
        ret: Type,
        quals: list[str],
        tparams: tuple[TemplateParam, ...] = (),
    ) -> Function:
        params = self.params()
        body = None
        end = 0
        if self.accept(";"):
            pass
        else:
            if self.tok != "{":
                raise self.error(f"expected the body of {name}")
            body = self.block()
            end = self.lines[self.i - 1]
        f = Function(line, name, ret, params, body, tparams, tuple(quals), end)
        self.functions.append(f)
        return f

    def using(self) -> Using:
        line = self.expect("using")
        name = self.ident("a type name")
        self.expect("=")
        ty = self.type_()
        self.expect(";")
        self.types.add(name)
        return Using(line, name, ty)

    def static_assert(self) -> StaticAssert:
        line = self.expect("static_assert")
        self.expect("(")
        test = self.assign()
        message = ""
        if self.accept(","):
            msg = self.primary()
            if not isinstance(msg, Str):
                raise self.error("expected the static_assert message")
            message = msg.value
        self.expect(")")
        self.expect(";")
        return StaticAssert(line, test, message)

    def struct(self) -> Struct:
        line = self.expect("struct")
        name = self.ident("a struct name")
        self.types.add(name)
        self.expect("{")
        fields: list[Decl] = []
        methods: list[Function] = []
        while self.tok != "}":
            if self.kinds[self.i] == "eof":
                raise ParseError(f"kernel.cu line {line}: struct {name} is never closed")
            self.refuse()
            mline = self.line
            quals = self.qualifiers()
            ty = self.type_()
            if self.texts[self.i + 1] == "(":
                method = self.ident("a method name")
                methods.append(self.function(mline, f"{name}::{method}", ty, quals))
            else:
                fields.append(self.declaration(mline, ty, quals))
        self.i += 1
        self.expect(";")
        return Struct(line, name, tuple(fields), tuple(methods))

    def enum(self) -> Enum:
        line = self.expect("enum")
        self.accept("class")
        name = self.ident("an enum name") if self.kinds[self.i] == "id" else ""
        base = self.type_() if self.accept(":") else None
        if name:
            self.types.add(name)
        self.expect("{")
        members: list[tuple[str, Expr | None]] = []
        while self.tok != "}":
            member = self.ident("an enumerator")
            members.append((member, self.assign() if self.accept("=") else None))
            if not self.accept(","):
                break
        self.expect("}")
        self.expect(";")
        return Enum(line, name, tuple(members), base)

    # ---- declarations -------------------------------------------------------------------------

    def starts_decl(self) -> bool:
        tx = self.tok
        if tx in QUALIFIERS or tx in _WITH_ARGS or tx in ("const", "volatile"):
            return True
        if not self.starts_type(self.i):
            return False
        i = self.i
        try:
            self.type_()
            return self.kinds[self.i] == "id"
        except ParseError:
            return False
        finally:
            self.i = i

    def declaration(self, line: int, ty: Type, quals: list[str]) -> Decl:
        """The declarators after `quals ty`, up to and including the `;`."""
        out: list[Declarator] = []
        while True:
            dline = self.line
            name = self.ident("a declared name")
            dims: list[Expr] = []
            unsized = False
            while self.accept("["):
                if self.accept("]"):
                    if dims or unsized:
                        raise self.error("only the first extent may be left out")
                    unsized = True
                    continue
                dims.append(self.expr())
                self.expect("]")
            init: Expr | None = None
            if self.accept("="):
                init = self.brace(None) if self.tok == "{" else self.assign()
            elif self.tok == "{":
                init = self.brace(None)
            elif self.tok == "(":
                init = Call(dline, Name(dline, ty.text), self.args())
            out.append(Declarator(dline, name, tuple(dims), init, unsized))
            if not self.accept(","):
                break
        self.expect(";")
        return Decl(line, ty, tuple(out), tuple(quals))

    def decl_stmt(self) -> Decl:
        line = self.line
        quals = self.qualifiers()
        return self.declaration(line, self.type_(), quals)

    # ---- statements ---------------------------------------------------------------------------

    def block(self) -> Block:
        line = self.expect("{")
        body: list[Stmt] = []
        while self.tok != "}" or self.kinds[self.i] != "op":
            if self.kinds[self.i] == "eof":
                raise ParseError(
                    f"kernel.cu line {line}: this '{{' is never closed (found end of file)"
                )
            body.append(self.statement())
        self.i += 1
        return Block(line, tuple(body))

    def statement(self) -> Stmt:
        tx, line = self.tok, self.line
        if self.kinds[self.i] == "pragma":
            self.i += 1
            if self.tok != "for":
                raise self.error(f"'#pragma {tx}' must come right before a for loop")
            return self.for_(tx)
        self.refuse()
        if tx == "{":
            return self.block()
        if tx == ";":
            self.i += 1
            return Block(line, ())
        if tx == "if":
            return self.if_()
        if tx == "for":
            return self.for_("")
        if tx == "while":
            self.i += 1
            test = self.paren()
            return While(line, test, self.statement())
        if tx == "switch":
            return self.switch()
        if tx == "return":
            self.i += 1
            value = None
            if self.tok != ";":
                value = self.brace(None) if self.tok == "{" else self.expr()
            self.expect(";")
            return Return(line, value)
        if tx in ("break", "continue"):
            self.i += 1
            self.expect(";")
            return Break(line) if tx == "break" else Continue(line)
        if tx in ("asm", "__asm__"):
            return self.asm()
        if tx == "static_assert":
            return self.static_assert()
        if tx in ("case", "default"):
            raise self.error(f"'{tx}' outside a switch")
        if tx in ("else", "struct", "enum", "template", "using"):
            raise self.error(f"'{tx}' is outside the subset inside a function")
        if self.starts_decl():
            return self.decl_stmt()
        e = self.expr()
        self.expect(";")
        return ExprStmt(e.line, e)

    def paren(self) -> Expr:
        self.expect("(")
        e = self.expr()
        self.expect(")")
        return e

    def if_(self) -> If:
        line = self.expect("if")
        constexpr = self.accept("constexpr")
        test = self.paren()
        then = self.statement()
        other = self.statement() if self.accept("else") else None
        return If(line, test, then, other, constexpr)

    def for_(self, pragma: str) -> For:
        line = self.expect("for")
        self.expect("(")
        init: Decl | ExprStmt | None = None
        if self.accept(";"):
            pass
        elif self.starts_decl():
            init = self.decl_stmt()
        else:
            e = self.expr()
            init = ExprStmt(e.line, e)
            self.expect(";")
        test = None if self.tok == ";" else self.expr()
        self.expect(";")
        step = None if self.tok == ")" else self.expr()
        self.expect(")")
        return For(line, init, test, step, self.statement(), pragma)

    def switch(self) -> Switch:
        line = self.expect("switch")
        test = self.paren()
        self.expect("{")
        cases: list[tuple[Expr | None, list[Stmt]]] = []
        while self.tok != "}":
            if self.kinds[self.i] == "eof":
                raise ParseError(f"kernel.cu line {line}: the switch is never closed")
            if self.accept("case"):
                label = self.cond()
                self.expect(":")
                cases.append((label, []))
            elif self.accept("default"):
                self.expect(":")
                cases.append((None, []))
            elif not cases:
                raise self.error("a statement before the first case of a switch")
            else:
                cases[-1][1].append(self.statement())
        self.i += 1
        return Switch(line, test, tuple((lab, tuple(body)) for lab, body in cases))

    def asm(self) -> Asm:
        line = self.line
        self.i += 1
        volatile = self.tok in ("volatile", "__volatile__")
        if volatile:
            self.i += 1
        self.expect("(")
        if self.kinds[self.i] != "str":
            raise self.error("expected the asm template string")
        template = self.primary()
        assert isinstance(template, Str)
        sections: list[list[tuple[str, Expr]]] = [[], []]
        clobbers: list[str] = []
        sec = 0
        while self.tok in (":", "::"):
            sec += 1 if self.tok == ":" else 2
            self.i += 1
            if sec > 3:
                raise self.error("asm goto labels are outside the subset")
            if sec == 3:
                while self.kinds[self.i] == "str":
                    clobbers.append(self.texts[self.i][1:-1])
                    self.i += 1
                    if not self.accept(","):
                        break
                continue
            while self.kinds[self.i] == "str":
                constraint = self.texts[self.i][1:-1]
                self.i += 1
                sections[sec - 1].append((constraint, self.paren()))
                if not self.accept(","):
                    break
        self.expect(")")
        self.expect(";")
        return Asm(
            line,
            template.value,
            tuple(sections[0]),
            tuple(sections[1]),
            tuple(clobbers),
            volatile,
        )
