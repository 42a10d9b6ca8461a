"""Expressions of kernel.cu, with C++ precedence, and the parameter lists they share with
functions (lambdas).

Precedence, loosest first: comma; assignment (right to left) and `?:`; `||`; `&&`; `|`; `^`;
`&`; `==` `!=`; `<` `<=` `>` `>=`; `<<` `>>`; `+` `-`; `*` `/` `%`; prefix unary and casts;
postfix (call, index, `.`, `->`, `++`, `--`). A `-` written right before a numeric literal
that is not unsigned is folded into it (`-1`, `-1.25e-01f` are one `Num`), as tables read best.
"""

from __future__ import annotations

import re

from verifier.device.cursor import Cursor, words
from verifier.device.nodes import (
    Assign,
    Binary,
    Block,
    BraceInit,
    Call,
    Cast,
    Comma,
    Cond,
    Expr,
    Index,
    Lambda,
    Member,
    Name,
    Num,
    Param,
    SizeOf,
    Str,
    Type,
    Unary,
)

PREC = {
    "||": 1,
    "&&": 2,
    "|": 3,
    "^": 4,
    "&": 5,
    "==": 6,
    "!=": 6,
    "<": 7,
    ">": 7,
    "<=": 7,
    ">=": 7,
    "<<": 8,
    ">>": 8,
    "+": 9,
    "-": 9,
    "*": 10,
    "/": 10,
    "%": 10,
}
ASSIGN_OPS = words("= += -= *= /= %= ^= |= &= <<= >>=")
PREFIX_OPS = words("- + ! ~ * & ++ --")
CASTS = frozenset(("static_cast", "reinterpret_cast", "const_cast"))
LITERAL_NAMES = frozenset(("true", "false", "nullptr", "this"))
_ROW_ITEM = re.compile(r"-?\d+|\n")
_ITEM_END = frozenset((",", "}"))
_POSTFIX = frozenset(("(", "[", ".", "->", "++", "--"))
_ESCAPES = {"n": "\n", "t": "\t", "r": "\r", "0": "\0", "\\": "\\", '"': '"', "'": "'"}


def num_value(text: str) -> int | float:
    """The value of a C++ numeric literal: "0.f" -> 0.0, "0xffffu" -> 65535, "2ull" -> 2."""
    if text.isdigit():
        return int(text, 8) if len(text) > 1 and text[0] == "0" else int(text)
    low = text.lower()
    if low.startswith("0x"):
        return int(low.rstrip("ul"), 16)
    if "." in low or "e" in low or low.endswith("f"):
        return float(low.rstrip("fl"))
    digits = low.rstrip("ul")
    return int(digits, 8) if len(digits) > 1 and digits[0] == "0" else int(digits)


def _unescape(body: str) -> str:
    out: list[str] = []
    j = 0
    while j < len(body):
        c = body[j]
        if c == "\\" and j + 1 < len(body):
            out.append(_ESCAPES.get(body[j + 1], body[j + 1]))
            j += 2
        else:
            out.append(c)
            j += 1
    return "".join(out)


class ExprParser(Cursor):
    """Expressions, initializers and parameter lists over a `Cursor`."""

    def block(self) -> Block:  # statements: parse.py
        raise NotImplementedError

    # ---- comma, assignment, conditional, binary ---------------------------------------------

    def expr(self) -> Expr:
        """A full expression, comma operator included."""
        e = self.assign()
        if self.texts[self.i] != ",":
            return e
        items = [e]
        while self.accept(","):
            items.append(self.assign())
        return Comma(e.line, tuple(items))

    def assign(self) -> Expr:
        """An assignment-expression: what a call argument or an initializer is."""
        e = self.cond()
        op = self.texts[self.i]
        if op in ASSIGN_OPS and self.kinds[self.i] == "op":
            self.i += 1
            value = self.brace(None) if self.at_brace() else self.assign()
            return Assign(e.line, op, e, value)
        return e

    def cond(self) -> Expr:
        test = self.binary(1)
        if self.texts[self.i] != "?":
            return test
        self.i += 1
        outer, self.no_gt = self.no_gt, False
        then = self.expr()
        self.no_gt = outer
        self.expect(":")
        return Cond(test.line, test, then, self.assign())

    def binary(self, min_prec: int) -> Expr:
        left = self.unary()
        texts, kinds = self.texts, self.kinds
        while True:
            op = texts[self.i]
            prec = PREC.get(op)
            if prec is None or prec < min_prec or kinds[self.i] != "op":
                return left
            if self.no_gt and op in (">", ">>"):
                return left
            self.i += 1
            right = self.binary(prec + 1)
            left = Binary(left.line, op, left, right)

    # ---- unary, postfix, primary --------------------------------------------------------------

    def unary(self) -> Expr:
        t, k, i = self.texts, self.kinds, self.i
        op = t[i]
        if op in PREFIX_OPS and k[i] == "op":
            line = self.lines[i]
            if op == "-" and k[i + 1] == "num" and t[i + 2] not in _POSTFIX:
                lit = t[i + 1]
                if "u" not in lit.lower():  # -1u is not a literal: the negation wraps
                    self.i += 2
                    return Num(line, -num_value(lit), "-" + lit)
            self.i += 1
            return Unary(line, op, self.unary())
        if op == "sizeof":
            line = self.lines[i]
            self.i += 1
            self.expect("(")
            if not self.starts_type(self.i):
                raise self.error("sizeof of an expression is outside the subset (a type only)")
            ty = self.type_()
            self.expect(")")
            return SizeOf(line, ty)
        if op == "(" and self.starts_type(i + 1):
            self.i += 1
            ty = self.type_()
            if self.texts[self.i] == ")":
                self.i += 1
                return Cast(self.lines[i], "c", ty, self.unary())
            self.i = i  # `(T{..})`, `(T(x))`: a parenthesized expression
        return self.postfix(self.primary())

    def postfix(self, e: Expr) -> Expr:
        t = self.texts
        while True:
            op = t[self.i]
            if op == "(":
                e = Call(e.line, e, self.args())
            elif op == "[":
                self.i += 1
                outer, self.no_gt = self.no_gt, False
                index = self.expr()
                self.no_gt = outer
                self.expect("]")
                e = Index(e.line, e, index)
            elif op in (".", "->"):
                self.i += 1
                e = Member(e.line, e, self.ident("a member name"), op == "->")
            elif op in ("++", "--"):
                self.i += 1
                e = Unary(e.line, op, e, postfix=True)
            else:
                return e

    def args(self) -> tuple[Expr, ...]:
        """`(a, b, ...)` of a call."""
        self.expect("(")
        outer, self.no_gt = self.no_gt, False
        out: list[Expr] = []
        if self.texts[self.i] != ")":
            while True:
                out.append(self.brace(None) if self.at_brace() else self.assign())
                if not self.accept(","):
                    break
        self.no_gt = outer
        self.expect(")")
        return tuple(out)

    def primary(self) -> Expr:
        i, kind, tx, line = self.i, self.kinds[self.i], self.texts[self.i], self.lines[self.i]
        if kind == "num":
            self.i += 1
            return Num(line, num_value(tx), tx)
        if kind == "str":
            parts = []
            while self.kinds[self.i] == "str":
                parts.append(_unescape(self.texts[self.i][1:-1]))
                self.i += 1
            return Str(line, "".join(parts))
        if kind == "char":
            self.i += 1
            return Num(line, ord(_unescape(tx[1:-1])[0]), tx)
        if tx == "(" and kind == "op":
            self.i += 1
            outer, self.no_gt = self.no_gt, False
            e = self.expr()
            self.no_gt = outer
            self.expect(")")
            return e
        if tx == "[" and kind == "op":
            return self.lambda_()
        if self.at_brace():
            return self.brace(None)
        if kind != "id" and tx != "::":
            raise self.error("expected an expression")
        if tx in CASTS:
            self.i += 1
            self.expect("<")
            outer, self.no_gt = self.no_gt, True
            ty = self.type_()
            self.no_gt = outer
            self.close_angle()
            self.expect("(")
            operand = self.expr()
            self.expect(")")
            return Cast(line, tx, ty, operand)
        if tx in LITERAL_NAMES:
            self.i += 1
            return Name(line, tx)
        if self.starts_type(i):
            ty = self.type_()
            if self.at_brace():
                return self.brace(ty)
            if self.texts[self.i] == "(":
                return Call(line, Name(line, ty.text), self.args())
            raise self.error(f"expected '(' or '{{' after the type {ty.text}")
        name = self.qualified()
        if name in self.template_funcs and self.texts[self.i] == "<":
            targs = self.template_args()
            if self.texts[self.i] != "(":
                raise self.error(f"expected '(' after {name}<...>")
            return Call(line, Name(line, name), self.args(), targs)
        return Name(line, name)

    def close_angle(self) -> None:
        if self.texts[self.i] == ">>":
            self.split_shift()
        self.expect(">")

    def template_args(self) -> tuple[Expr | Type, ...]:
        """`<a, T, ...>` after a template name: types where a type starts, else expressions
        in which `>` closes the list."""
        self.expect("<")
        outer, self.no_gt = self.no_gt, True
        out: list[Expr | Type] = []
        while True:
            out.append(self.type_() if self.starts_type(self.i) else self.cond())
            if not self.accept(","):
                break
        self.no_gt = outer
        self.close_angle()
        return tuple(out)

    # ---- initializers, lambdas, parameters ------------------------------------------------------

    def brace(self, ty: Type | None) -> BraceInit:
        """`{a, b, {c, d}, ...}`; numeric items are read without the expression ladder, so that
        a table of tens of thousands of entries parses in about a second; a `nums` token (a
        brace list of integers only, see source.py) becomes its `Num`s directly."""
        if self.kinds[self.i] == "nums":
            return self.num_row(ty)
        line = self.expect("{")
        t, k, lines = self.texts, self.kinds, self.lines
        outer, self.no_gt = self.no_gt, False
        items: list[Expr] = []
        while t[self.i] != "}":
            i = self.i
            if k[i] == "num" and t[i + 1] in _ITEM_END:
                items.append(Num(lines[i], num_value(t[i]), t[i]))
                self.i += 1
            elif t[i] == "-" and k[i + 1] == "num" and t[i + 2] in _ITEM_END:
                items.append(self.unary())
            elif t[i][:1] == "{":
                items.append(self.brace(None))
            else:
                items.append(self.assign())
            if t[self.i] == ",":
                self.i += 1
            elif t[self.i] != "}":
                raise self.error("expected ',' or '}' in a brace initializer")
        self.i += 1
        self.no_gt = outer
        return BraceInit(ty.line if ty else line, ty, tuple(items))

    def num_row(self, ty: Type | None) -> BraceInit:
        i = self.i
        self.i += 1
        line = first = self.lines[i]
        items: list[Expr] = []
        for tok in _ROW_ITEM.findall(self.texts[i]):
            if tok == "\n":
                line += 1
            else:
                items.append(Num(line, int(tok), tok))
        return BraceInit(ty.line if ty else first, ty, tuple(items))

    def lambda_(self) -> Lambda:
        line = self.expect("[")
        a = self.i
        while self.texts[self.i] != "]":
            if self.kinds[self.i] == "eof":
                raise self.error("lambda capture list never closed")
            self.i += 1
        captures = self.span_text(a, self.i)
        self.i += 1
        params = self.params() if self.texts[self.i] == "(" else ()
        ret = None
        if self.accept("->"):
            ret = self.type_()
        return Lambda(line, captures, params, ret, self.block())

    def params(self) -> tuple[Param, ...]:
        """`(T a, const U (&b)[8], V c = 1)` of a function or lambda."""
        self.expect("(")
        out: list[Param] = []
        if self.texts[self.i] == "void" and self.texts[self.i + 1] == ")":
            self.i += 1
        while self.texts[self.i] != ")":
            out.append(self.param())
            if not self.accept(","):
                break
        self.expect(")")
        return tuple(out)

    def param(self) -> Param:
        line = self.line
        cv: list[str] = []
        quals: list[str] = []
        while self.texts[self.i] in ("const", "volatile", "__grid_constant__"):
            (quals if self.texts[self.i] == "__grid_constant__" else cv).append(self.tok)
            self.i += 1
        ty = self.type_(tuple(cv), line)
        name = ""
        text = ty.text
        if self.texts[self.i] == "(" and self.texts[self.i + 1] in ("&", "*"):
            self.i += 1
            mark = self.tok
            self.i += 1
            name = self.ident("a parameter name")
            self.expect(")")
            text += f" ({mark})" + self.dims_text()
        elif self.kinds[self.i] == "id":
            name = self.ident("a parameter name")
            text += self.dims_text()
        default = None
        if self.accept("="):
            default = self.assign()
        return Param(line, Type(line, text), name, default, tuple(quals))

    def dims_text(self) -> str:
        """`[8][G]` after a parameter's name, as text."""
        out = ""
        while self.texts[self.i] == "[":
            a = self.i + 1
            self.i += 1
            self.expr()
            out += "[" + self.span_text(a, self.i) + "]"
            self.expect("]")
        return out
