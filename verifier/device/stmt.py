"""Statements and declarations of kernel.cu's functions (and the declarations of its top level).

A statement is a declaration when it starts with a qualifier, `const`, or a known type followed by
a name (cursor.py says which names are types); `#pragma unroll` must come right before a `for`,
which keeps it (`For.pragma`). `goto`, `do`-`while`, unions, classes, exceptions and the like are
refused naming their line.
"""

from __future__ import annotations

from verifier.device.cursor import KEYWORDS, words
from verifier.device.expr import ExprParser
from verifier.device.nodes import (
    Asm,
    Block,
    Break,
    Call,
    Continue,
    Decl,
    Declarator,
    Expr,
    ExprStmt,
    For,
    If,
    Name,
    ParseError,
    Return,
    StaticAssert,
    Stmt,
    Str,
    Switch,
    Type,
    While,
)

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


class StmtParser(ExprParser):
    """Statements over `ExprParser`."""

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
                init = self.brace(None) if self.at_brace() else self.assign()
            elif self.at_brace():
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
                value = self.brace(None) if self.at_brace() else self.expr()
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
        self.unknown_type()
        e = self.expr()
        self.expect(";")
        return ExprStmt(e.line, e)

    def unknown_type(self) -> None:
        """`T x` or `T* x` where T is no type kernel.cu declares: say so, not "expected ';'"."""
        k, t, i = self.kinds, self.texts, self.i
        if k[i] != "id" or t[i] in KEYWORDS:
            return
        j = i + 1
        while t[j] in ("*", "&"):
            j += 1
        if k[j] == "id" and t[j] not in KEYWORDS and t[j + 1] in ("=", ";", ",", "[", "(", "{"):
            if j > i + 1 and t[j + 1] not in ("=", ";"):
                return  # `a * b(..)`, `a & b[..]`: an expression
            raise self.error(f"'{t[i]}' is not a type kernel.cu declares (nor a builtin)", i)

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
