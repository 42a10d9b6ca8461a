"""kernel.cu's text as tokens: comments dropped, directives resolved, every token with its line.

One regular expression walks the whole text once. Comments vanish (a block comment's newlines
still count, so lines stay kernel.cu's). Of the preprocessor only what codegen emits is
accepted, and anything else is a `ParseError` naming its line:

* `#include <name>`: recorded (system headers: the CUDA toolkit's, trusted);
* `#if __CUDA_ARCH__ OP N` (OP one of `>= > <= < == !=`, N an integer), `#elif` of the same
  form, `#else`, `#endif`: resolved for the given arch; the tokens of the branches not taken
  are dropped;
* `#pragma unroll [N]`: kept as one `pragma` token ("unroll", "unroll 4"), which the parser
  attaches to the `for` that follows.

No macros: a `#define` (or any other directive) is refused, so every name the parser sees is
the one written in kernel.cu.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from verifier.device.nodes import ParseError

_PUNCT = str.split(
    "<<= >>= :: -> ++ -- << >> <= >= == != && || += -= *= /= %= &= |= ^= "
    "{ } ( ) [ ] ; , . : ? ~ ! + - * / % < > = & | ^"
)

_TOKEN = re.compile(
    "|".join(
        [
            r"(?P<dir>(?m:^)[ \t]*#[^\n]*)",
            r"(?P<nl>\n)",
            r"(?P<ws>[ \t\r\f\v]+)",
            r"(?P<line_comment>//[^\n]*)",
            r"(?P<block_comment>/\*(?:[^*]|\*(?!/))*\*/)",
            r"(?P<open_comment>/\*)",
            r"(?P<id>[A-Za-z_][A-Za-z_0-9]*)",
            r"(?P<num>0[xX][0-9a-fA-F]+[uUlL]*|(?:\d+\.\d*|\.\d+|\d+)(?:[eE][+-]?\d+)?[fFlLuU]*)",
            r"(?P<nums>\{\s*-?(?:0|[1-9]\d*)(?:\s*,\s*-?(?:0|[1-9]\d*))*\s*,?\s*\})",
            r'(?P<str>"(?:[^"\\\n]|\\.)*")',
            r"(?P<char>'(?:[^'\\\n]|\\.)+')",
            "(?P<op>" + "|".join(re.escape(p) for p in _PUNCT) + ")",
            r"(?P<bad>.)",
        ]
    )
)

_ARCH_IF = re.compile(r"__CUDA_ARCH__\s*(>=|<=|==|!=|>|<)\s*(\d+)")
_COMPARE = {
    ">=": int.__ge__,
    "<=": int.__le__,
    "==": int.__eq__,
    "!=": int.__ne__,
    ">": int.__gt__,
    "<": int.__lt__,
}


@dataclass
class Tokens:
    """kernel.cu after preprocessing: parallel lists, one entry a token, then an `eof` token.

    `kinds[i]` is "id", "num", "str", "char", "op", "nums", "pragma" or "eof"; `texts[i]` the
    token as written (a pragma: its words after `#pragma`); `lines[i]` its 1-based kernel.cu
    line. A `nums` token is a whole brace list of decimal integers, `{0,-1,0,256}` (newlines
    kept in its text): the rows of kernel.cu's tables, lexed in one step so that a 70B
    schedule's hundred thousand rows stay fast.
    """

    kinds: list[str]
    texts: list[str]
    lines: list[int]
    includes: tuple[str, ...]
    arch: int


def arch_of_cubin(name: str) -> int:
    """The `__CUDA_ARCH__` a cubin was built for, from its name: kernel.sm_90a.cubin -> 900."""
    m = re.search(r"sm_(\d+)", name)
    if m is None:
        raise ParseError(f"{name}: no sm_NN in the cubin name")
    return int(m.group(1)) * 10


def _arch_test(cond: str, arch: int, line: int) -> bool:
    m = _ARCH_IF.fullmatch(cond.strip())
    if m is None:
        raise ParseError(
            f"kernel.cu line {line}: #if/#elif must compare __CUDA_ARCH__ with an integer, "
            f"found '{cond.strip()}'"
        )
    return _COMPARE[m.group(1)](arch, int(m.group(2)))


class _Conditionals:
    """The stack of open `#if`s: whether each branch is taken and whether one was."""

    def __init__(self, arch: int) -> None:
        self.arch = arch
        self.stack: list[tuple[int, bool, bool, bool]] = []  # (line, active, taken, else seen)

    @property
    def active(self) -> bool:
        return not self.stack or self.stack[-1][1]

    def directive(self, word: str, rest: str, line: int) -> None:
        outer = all(s[1] for s in self.stack[:-1]) if self.stack else True
        if word == "if":
            live = self.active and _arch_test(rest, self.arch, line)
            self.stack.append((line, live, live, False))
            return
        if not self.stack:
            raise ParseError(f"kernel.cu line {line}: #{word} without an #if")
        start, _, taken, seen_else = self.stack[-1]
        if word == "endif":
            self.stack.pop()
        elif seen_else:
            raise ParseError(f"kernel.cu line {line}: #{word} after #else")
        elif word == "else":
            self.stack[-1] = (start, outer and not taken, True, True)
        else:  # elif
            live = outer and not taken and _arch_test(rest, self.arch, line)
            self.stack[-1] = (start, live, taken or live, False)


def tokenize(text: str, arch: int) -> Tokens:
    """kernel.cu's tokens for `__CUDA_ARCH__ == arch` (e.g. 900 for sm_90a, 800 for sm_80).

    Raises:
        ParseError: a directive outside the subset, an unbalanced `#if`, an unterminated
            comment or a character that starts no token, naming the kernel.cu line.
    """
    kinds: list[str] = []
    texts: list[str] = []
    lines: list[int] = []
    includes: list[str] = []
    cond = _Conditionals(arch)
    line = 1
    active = True
    for m in _TOKEN.finditer(text):
        kind = m.lastgroup
        if kind == "nl":
            line += 1
        elif kind == "ws" or kind == "line_comment":
            pass
        elif kind == "block_comment":
            line += m.group().count("\n")
        elif kind == "dir":
            _directive(m.group(), line, cond, includes, kinds, texts, lines)
            active = cond.active
        elif kind == "open_comment":
            raise ParseError(f"kernel.cu line {line}: a comment that is never closed")
        elif kind == "bad":
            raise ParseError(f"kernel.cu line {line}: {m.group()!r} is not C++ the verifier reads")
        else:
            tok = m.group()
            if active:
                kinds.append(kind)  # type: ignore[arg-type]
                texts.append(tok)
                lines.append(line)
            if kind == "nums":
                line += tok.count("\n")
    if cond.stack:
        raise ParseError(f"kernel.cu line {cond.stack[-1][0]}: #if without #endif")
    kinds.append("eof")
    texts.append("end of file")
    lines.append(line)
    return Tokens(kinds, texts, lines, tuple(includes), arch)


def _directive(
    tok: str,
    line: int,
    cond: _Conditionals,
    includes: list[str],
    kinds: list[str],
    texts: list[str],
    lines: list[int],
) -> None:
    body = tok.strip()[1:].strip()
    body = re.sub(r"/\*.*?\*/|//.*$", "", body).strip()  # a comment after the directive
    word, _, rest = body.partition(" ")
    rest = rest.strip()
    if word in ("if", "elif", "else", "endif"):
        cond.directive(word, rest, line)
        return
    if body.endswith("\\"):
        raise ParseError(f"kernel.cu line {line}: a continued directive is outside the subset")
    if not cond.active:
        if word not in ("include", "pragma"):
            raise ParseError(f"kernel.cu line {line}: #{word} is outside the subset")
        return
    if word == "include":
        m = re.fullmatch(r"<([^<>\s]+)>", rest)
        if m is None:
            raise ParseError(
                f"kernel.cu line {line}: only #include <header> is read, found '#{body}'"
            )
        includes.append(m.group(1))
        return
    if word == "pragma" and re.fullmatch(r"unroll(\s+\d+)?", rest):
        kinds.append("pragma")
        texts.append(" ".join(rest.split()))
        lines.append(line)
        return
    raise ParseError(f"kernel.cu line {line}: '#{body}' is outside the subset (no macros)")
