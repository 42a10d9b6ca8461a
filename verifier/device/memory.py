"""One symbolic thread's state (`verifier.device.execute`): its scopes of locals, their cells,
the path guard, the inlined calls, and its global memory: loads read the thread's own earlier
stores or the array's element term, stores are recorded (`effects.Store`) with their guard."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from verifier.device.effects import Load, Store, Strided, Trap
from verifier.device.kernel import Kernel
from verifier.device.lvalues import LValue
from verifier.device.values import FALSE, TRUE, Cell, Ptr, Real, Struct, Unsupported, Word
from verifier.terms import Aff, Term

WIDTH = {"float4": 4, "float2": 2, "uint4": 8, "uint2": 4, "unsigned": 2, "int4": 8}
LANES = ("x", "y", "z", "w")


class Memory:
    """One consumer thread of one task body. `pointer(field, layer offset)` names a global
    pointer (`Ptr`) for a field of `p` ("x", offset -1) or of a layer (offset from the task's);
    `element(array, offset)` turns a flat element offset into its term's index tuple."""

    def __init__(
        self,
        kernel: Kernel,
        pointer: Callable[[str, int], Ptr],
        element: Callable[[str, Aff], tuple[Aff, ...]],
        ranges: dict[str, tuple[int, int]],
    ):
        self.k, self.pointer, self.element, self.ranges = kernel, pointer, element, ranges
        self.scopes: list[dict[str, LValue]] = []
        self.cells: list[Cell] = []
        self.guard: Term = TRUE
        self.stores: list[Store] = []
        self.loads: list[Load] = []
        self.traps: list[Trap] = []
        self.strided: list[Strided] = []
        self.loop = ""  # the strided loop being executed
        self.functions: list[str] = []
        self.entry: list[Term] = []  # the path guard at each inlined call's entry
        self.returns: list[list[tuple[Term, Any]]] = []  # each call's returns under a condition
        # calls summarized rather than inlined (`verifier.device.matvec`): name -> (executor, call)
        self.summaries: dict[str, Callable[[Any, Any], Any]] = {}
        # shared arrays whose content a summary defines: name -> (offset, line) -> value
        self.shared: dict[str, Callable[[Aff, int], Any]] = {}
        # (offset, guard, store, line) of loads that may alias an earlier store, where the
        # caller proves them apart (`verifier.device.fma`); None: such a load is refused
        self.apart: list[tuple[Aff, Term, Store, int]] | None = None
        self.thread: Aff | None = None  # threadIdx.x outside a strided loop, where modelled
        self.own: set[str] = set()  # shared arrays whose resolver also finds the own stores

    @property
    def function(self) -> str:
        return self.functions[-1] if self.functions else ""

    def cell(self, v: Any, name: str, readonly: bool = False) -> Cell:
        c = Cell(v, name, readonly)
        self.cells.append(c)
        return c

    def lookup(self, name: str, line: int) -> LValue | None:
        for scope in reversed(self.scopes):
            if name in scope:
                return scope[name]
        return None

    def load(self, p: Ptr, line: int) -> Any:
        width = 1 if p.view == p.elem else WIDTH.get(p.view, 0)
        if not width:
            raise Unsupported(f"a {p.view} load from the {p.elem} array {p.array}", line)
        elems = [self.load_elem(p, p.offset + k, line) for k in range(width)]
        if p.view == p.elem:
            return elems[0]
        if p.elem == "float" and p.view in ("float4", "float2"):
            return Struct(p.view, tuple(zip(LANES, elems, strict=False)))
        if p.elem == "bf16":
            words = [Word(elems[k].term, elems[k + 1].term) for k in range(0, width, 2)]
            return (
                words[0]
                if p.view == "unsigned"
                else Struct(p.view, tuple(zip(LANES, words, strict=False)))
            )
        raise Unsupported(f"a {p.view} load from the {p.elem} array {p.array}", line)

    def load_elem(self, p: Ptr, offset: Aff, line: int) -> Any:
        if p.array in self.own:
            self.loads.append(Load(p.array, offset, self.guard, line, self.loop))
            return self.shared[p.array](offset, line)
        for s in reversed(self.stores):  # this thread's own earlier store
            if s.array != p.array or s.loop != self.loop or s.guard == FALSE:
                continue
            d = offset - s.offset
            if d == Aff(0):
                return s.value
            lo, hi = d.bounds(self.ranges)
            if not d.is_const() and lo <= 0 <= hi:
                if self.apart is None:
                    raise Unsupported(f"a load of {p.array} that may alias an earlier store", line)
                self.apart.append((offset, self.guard, s, line))  # an obligation proves it apart
        self.loads.append(Load(p.array, offset, self.guard, line, self.loop))
        if p.array in self.shared:
            return self.shared[p.array](offset, line)
        idx = self.element(p.array, offset)
        if p.elem in ("i64", "int"):
            return Aff.of(("vi", p.array, idx))
        return Real(("v", p.array, idx))

    def store(self, p: Ptr, v: Any, line: int) -> None:
        if p.view == p.elem:
            parts = [v]
        elif p.elem == "float" and p.view in ("float4", "float2") and isinstance(v, Struct):
            parts = [v.get(x, line) for x in LANES[: WIDTH[p.view]]]
        else:
            raise Unsupported(f"a {p.view} store into the {p.elem} array {p.array}", line)
        for k, x in enumerate(parts):
            if p.elem == "float" and not isinstance(x, Real):
                raise Unsupported(f"a store of a {type(x).__name__} into {p.array}", line)
            self.stores.append(
                Store(p.array, p.offset + k, x, self.guard, line, self.function, self.loop)
            )
