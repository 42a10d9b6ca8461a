"""The parser's position in kernel.cu's tokens, the type names it knows, and types as text.

Which names are types is decided as the parser goes, C-style: the builtin scalar and CUDA
vector types, then every `struct`, `enum` and `using` name once declared, and a template's
`class` parameters inside that template. A statement that starts with a type name followed by a
name (`Ring ring;`, `counter_ref c(x);`) is a declaration; a type name followed by `(` or `{`
(`counter_ref(x).fetch_add(..)`, `ArgMax{a, b}`) is an expression.
"""

from __future__ import annotations

from verifier.device.nodes import ParseError, Type
from verifier.device.source import Tokens


def words(text: str) -> frozenset[str]:
    """The space-separated words of `text`, as a set."""
    return frozenset(text.split())


BUILTIN_WORDS = words("void bool char short int long float double unsigned signed auto")
CV_WORDS = words("const volatile")
_SCALARS = words("char uchar short ushort int uint long ulong longlong ulonglong float double")
_VECTOR = " ".join(f"{base}{n}" for base in _SCALARS for n in (1, 2, 3, 4))
BUILTIN_TYPES = words(
    _VECTOR + " size_t ptrdiff_t int8_t int16_t int32_t int64_t uint8_t uint16_t uint32_t"
    " uint64_t __nv_bfloat16 __nv_bfloat162 __half __half2 dim3"
)
# names after which `<` opens template arguments from the start (see parse.py)
TEMPLATE_TYPES = frozenset(("cuda::atomic_ref", "cuda::std::atomic_ref"))
KEYWORDS = words(
    "if else for while do switch case default break continue return goto struct class "
    "union enum template typename using static const constexpr volatile extern inline asm "
    "__asm__ sizeof static_cast reinterpret_cast const_cast dynamic_cast true false "
    "nullptr this new delete operator namespace public private protected virtual"
)
_NO_SPACE_BEFORE = frozenset((",", ")", "]", "[", "::", ".", "->", ";"))
_NO_SPACE_AFTER = frozenset(("(", "[", "::", ".", "->", "~", "!"))


class Cursor:
    """A position in `Tokens`, with helpers that raise `ParseError` naming the line."""

    def __init__(self, toks: Tokens) -> None:
        self.kinds = toks.kinds
        self.texts = toks.texts
        self.lines = toks.lines
        self.i = 0
        self.types: set[str] = set(BUILTIN_TYPES)
        self.template_types: set[str] = set(TEMPLATE_TYPES)
        self.template_funcs: set[str] = set()
        self.no_gt = False  # inside template arguments: `>` closes them

    # ---- tokens ---------------------------------------------------------------------------

    @property
    def tok(self) -> str:
        return self.texts[self.i]

    @property
    def line(self) -> int:
        return self.lines[self.i]

    def at_brace(self) -> bool:
        """At a `{` or a `nums` token (a brace list of integers, see source.py)."""
        return self.texts[self.i][:1] == "{"

    def error(self, what: str, at: int | None = None) -> ParseError:
        j = self.i if at is None else at
        found = self.texts[j] if self.kinds[j] != "pragma" else "#pragma " + self.texts[j]
        if len(found) > 40:
            found = found[:37] + "..."
        return ParseError(f"kernel.cu line {self.lines[j]}: {what}, found '{found}'")

    def expect(self, text: str) -> int:
        """Consume `text` (an operator or keyword); returns its line."""
        if self.texts[self.i] != text or self.kinds[self.i] not in ("op", "id"):
            raise self.error(f"expected '{text}'")
        self.i += 1
        return self.lines[self.i - 1]

    def accept(self, text: str) -> bool:
        if self.texts[self.i] == text and self.kinds[self.i] in ("op", "id"):
            self.i += 1
            return True
        return False

    def ident(self, what: str = "a name") -> str:
        if self.kinds[self.i] != "id" or self.texts[self.i] in KEYWORDS:
            raise self.error(f"expected {what}")
        self.i += 1
        return self.texts[self.i - 1]

    def qualified_at(self, j: int) -> tuple[str, int]:
        """The (possibly `::`-qualified) name starting at token j, and the index after it."""
        t, k = self.texts, self.kinds
        parts = []
        if t[j] == "::":
            parts.append("")
            j += 1
        while True:
            if k[j] != "id" or t[j] in KEYWORDS:
                raise self.error("expected a name", j)
            parts.append(t[j])
            j += 1
            if t[j] == "::" and k[j + 1] == "id":
                j += 1
                continue
            return "::".join(parts), j

    def qualified(self) -> str:
        name, self.i = self.qualified_at(self.i)
        return name

    def split_shift(self) -> None:
        """`>>` closing two template argument lists: make it two `>` tokens."""
        j = self.i
        self.texts[j] = ">"
        self.texts.insert(j + 1, ">")
        self.kinds.insert(j + 1, "op")
        self.lines.insert(j + 1, self.lines[j])

    def span_text(self, a: int, b: int) -> str:
        """Tokens [a, b) as text, single-spaced the usual way: "D / 2", "f(x, 1)"."""
        out: list[str] = []
        prev = ""
        for j in range(a, b):
            t = self.texts[j]
            glue = t in _NO_SPACE_BEFORE or prev in _NO_SPACE_AFTER
            if t == "(" and (self.kinds[j - 1] == "id" or prev in (")", "]")):
                glue = True
            if out and not glue:
                out.append(" ")
            out.append(t)
            prev = t
        return "".join(out)

    def balanced(self) -> int:
        """Skip a parenthesized token group starting at `(`; returns the index after `)`."""
        start = self.i
        self.expect("(")
        depth = 1
        while depth:
            t = self.texts[self.i]
            if self.kinds[self.i] == "eof":
                raise self.error("'(' never closed", start)
            depth += (t == "(") - (t == ")")
            self.i += 1
        return self.i

    # ---- types ----------------------------------------------------------------------------

    def starts_type(self, j: int) -> bool:
        t = self.texts[j]
        if t in CV_WORDS or t in BUILTIN_WORDS:
            return True
        if self.kinds[j] != "id" and t != "::":
            return False
        if t in self.types:
            return self.texts[j + 1] != "::"
        if self.texts[j + 1] != "::" and t != "::":
            return False
        try:
            name, _ = self.qualified_at(j)
        except ParseError:
            return False
        return name in self.types or name in self.template_types

    def type_(self, cv: tuple[str, ...] = (), line: int = 0) -> Type:
        """A type: cv words, a builtin or known name (with template arguments), `*`/`&` marks.

        `cv` and `line`: cv words the caller has already consumed, and the line of the first.
        """
        t = self.texts
        line = line or self.line
        words = list(cv)
        while t[self.i] in CV_WORDS:
            words.append(t[self.i])
            self.i += 1
        if t[self.i] in BUILTIN_WORDS:
            while t[self.i] in BUILTIN_WORDS or t[self.i] in CV_WORDS:
                words.append(t[self.i])
                self.i += 1
        elif self.starts_type(self.i):
            name = self.qualified()
            if name in self.template_types and t[self.i] == "<":
                name += "<" + self.type_args_text() + ">"
            words.append(name)
            while t[self.i] in CV_WORDS:
                words.append(t[self.i])
                self.i += 1
        else:
            raise self.error("expected a type")
        suffix = ""
        while t[self.i] in ("*", "&", "&&"):
            suffix += t[self.i]
            self.i += 1
            while t[self.i] in ("const", "volatile", "__restrict__"):
                suffix += " " + t[self.i]
                self.i += 1
        return Type(line, " ".join(words) + suffix)

    def type_args_text(self) -> str:
        """`<...>` of a template type, consumed, as text (without the brackets)."""
        self.expect("<")
        a = self.i
        depth = 1
        while True:
            tx = self.texts[self.i]
            if self.kinds[self.i] == "eof" or tx in (";", "{", "}"):
                raise self.error("template arguments never closed by '>'")
            if tx == "<":
                depth += 1
            elif tx == ">":
                depth -= 1
            elif tx == ">>":
                if depth <= 2:
                    self.split_shift()
                    depth -= 1
                else:
                    depth -= 2
            if depth == 0:
                b = self.i
                self.i += 1
                return self.span_text(a, b)
            self.i += 1
