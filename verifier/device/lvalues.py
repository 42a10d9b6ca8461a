"""The places one symbolic thread assigns (`verifier.device.execute`): a local's cell, an element
or field of one, and a global array element (stored through the executor's memory)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from verifier.device.values import Cell, Ptr, Undef, Unsupported

if TYPE_CHECKING:
    from verifier.device.memory import Memory


class LValue:
    def get(self) -> Any:
        raise NotImplementedError

    def set(self, v: Any) -> None:
        raise NotImplementedError


class Var(LValue):
    def __init__(self, cell: Cell, line: int = 0):
        self.cell, self.line = cell, line

    def get(self) -> Any:
        v = self.cell.value
        if isinstance(v, Undef):
            raise Unsupported(f"{v.name} is read before it is assigned", self.line)
        return v

    def set(self, v: Any) -> None:
        if self.cell.readonly:
            raise Unsupported(f"{self.cell.name} is assigned inside its strided loop", self.line)
        self.cell.value = v


class Elem(LValue):
    def __init__(self, parent: LValue, key: int | str, line: int):
        self.parent, self.key, self.line = parent, key, line

    def get(self) -> Any:
        whole = self.parent.get()
        v = whole.get(self.key, self.line) if isinstance(self.key, str) else whole[self.key]
        if isinstance(v, Undef):
            raise Unsupported(f"{v.name} is read before it is assigned", self.line)
        return v

    def set(self, v: Any) -> None:
        whole = self.parent.get()
        if isinstance(self.key, str):
            self.parent.set(whole.set(self.key, v))
        else:
            self.parent.set((*whole[: self.key], v, *whole[self.key + 1 :]))


class Mem(LValue):
    def __init__(self, ex: Memory, ptr: Ptr, line: int):
        self.ex, self.ptr, self.line = ex, ptr, line

    def get(self) -> Any:
        return self.ex.load(self.ptr, self.line)

    def set(self, v: Any) -> None:
        self.ex.store(self.ptr, v, self.line)
