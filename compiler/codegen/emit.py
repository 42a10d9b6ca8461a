"""A tiny line emitter for generated CUDA: indentation, braces, comments. Nothing else."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

INDENT = "  "


class Emitter:
    """Collects lines of C++ at the current indentation; `block` opens and closes braces."""

    def __init__(self) -> None:
        self._lines: list[str] = []
        self._depth = 0

    def line(self, text: str = "") -> None:
        """One line at the current depth (an empty `text` gives an empty line, unindented)."""
        self._lines.append(INDENT * self._depth + text if text else "")

    def lines(self, *texts: str) -> None:
        for t in texts:
            self.line(t)

    def comment(self, text: str) -> None:
        """A `//` comment; multi-line text becomes several comment lines."""
        for t in text.splitlines() or [""]:
            self.line(f"// {t}".rstrip())

    def blank(self) -> None:
        if self._lines and self._lines[-1] != "":
            self._lines.append("")

    def raw(self, text: str) -> None:
        """Verbatim text (a prelude file), kept as is, whatever the depth."""
        self._lines.extend(text.rstrip("\n").split("\n"))

    @contextmanager
    def block(self, head: str, close: str = "}") -> Iterator[None]:
        """`head {` ... `close`, with the body one level deeper."""
        self.line(f"{head} {{")
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self.line(close)

    def text(self) -> str:
        return "\n".join(self._lines).rstrip("\n") + "\n"
