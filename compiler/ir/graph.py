"""Graph IR: frozen nodes in topological order, canonical JSON, and the content digest.

A node refers to its inputs by position in `Graph.nodes`. The digest of the canonical JSON of a
weight-free graph is the **model hash**: it covers architecture, shapes and dtypes, and nothing
else (no weights, no file paths, no catalog names).
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from compiler.ir.ops import DType, Op

Dim = int | str  # an int, or a symbol bound per shape template ("B", "S")
Shape = tuple[Dim, ...]
AttrValue = Any  # None | bool | int | float | str | tuple of those

IR_VERSION = 1


class IRError(ValueError):
    """A malformed graph or a graph file that cannot be read."""


def freeze_attr(v: Any) -> AttrValue:
    if isinstance(v, list | tuple):
        return tuple(freeze_attr(x) for x in v)
    if v is None or isinstance(v, bool | int | float | str):
        return v
    raise IRError(f"attribute value of type {type(v).__name__} is not serializable: {v!r}")


def encode_attr(v: AttrValue) -> Any:
    """JSON form of an attribute value; non-finite floats become strings."""
    if isinstance(v, tuple):
        return [encode_attr(x) for x in v]
    if isinstance(v, float) and not math.isfinite(v):
        return "nan" if math.isnan(v) else ("inf" if v > 0 else "-inf")
    return v


def decode_attr(v: Any, floaty: bool) -> AttrValue:
    if isinstance(v, list):
        return tuple(decode_attr(x, floaty) for x in v)
    if floaty and v in ("inf", "-inf", "nan"):
        return float(v)
    return v


FLOAT_ATTRS = frozenset({"value"})


@dataclass(frozen=True)
class Node:
    """One operation. `attrs` is a sorted tuple of (key, value) so nodes hash and compare."""

    op: Op
    inputs: tuple[int, ...]
    shape: Shape
    dtype: DType
    attrs: tuple[tuple[str, AttrValue], ...] = ()
    name: str = ""  # INPUT and WEIGHT names; empty elsewhere

    def attr(self, key: str, default: AttrValue = None) -> AttrValue:
        for k, v in self.attrs:
            if k == key:
                return v
        return default

    def to_json(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "op": self.op.value,
            "in": list(self.inputs),
            "shape": list(self.shape),
            "dtype": self.dtype.value,
        }
        if self.attrs:
            d["attrs"] = {k: encode_attr(v) for k, v in self.attrs}
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Node:
        try:
            attrs = tuple(
                sorted((k, decode_attr(v, k in FLOAT_ATTRS)) for k, v in d.get("attrs", {}).items())
            )
            return cls(
                op=Op(d["op"]),
                inputs=tuple(int(i) for i in d["in"]),
                shape=tuple(d["shape"]),
                dtype=DType(d["dtype"]),
                attrs=attrs,
                name=d.get("name", ""),
            )
        except (KeyError, ValueError, TypeError) as e:
            raise IRError(f"bad node {d!r}: {e}") from None


@dataclass(frozen=True)
class Graph:
    """A whole decode step: nodes in topological order and named outputs."""

    nodes: tuple[Node, ...]
    outputs: tuple[tuple[str, int], ...]
    symbols: tuple[str, ...] = ("B", "S")

    def to_json(self) -> dict[str, Any]:
        return {
            "ir_version": IR_VERSION,
            "symbols": list(self.symbols),
            "nodes": [n.to_json() for n in self.nodes],
            "outputs": [[name, i] for name, i in self.outputs],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Graph:
        if not isinstance(d, dict) or d.get("ir_version") != IR_VERSION:
            raise IRError(f"not an IR graph of version {IR_VERSION}")
        try:
            return cls(
                nodes=tuple(Node.from_json(n) for n in d["nodes"]),
                outputs=tuple((str(name), int(i)) for name, i in d["outputs"]),
                symbols=tuple(d["symbols"]),
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IRError(f"bad graph: {e}") from None

    def canonical(self) -> bytes:
        """Canonical serialization: sorted keys, no whitespace, strict JSON."""
        from compiler.ir import jsonform

        return jsonform.canonical(self.to_json())

    def digest(self) -> str:
        """sha256 of the canonical form: the model hash of a weight-free graph."""
        return hashlib.sha256(self.canonical()).hexdigest()

    def dumps(self) -> str:
        """Readable JSON for files: one node per line, same content as `canonical`."""
        from compiler.ir import jsonform

        return jsonform.readable(self.to_json(), ("nodes",))

    @classmethod
    def loads(cls, text: str) -> Graph:
        from compiler.ir import jsonform

        return cls.from_json(jsonform.parse(text, "graph"))

    def live(self) -> set[int]:
        """Indices of the nodes some output depends on."""
        live = {i for _, i in self.outputs}
        for i in range(len(self.nodes) - 1, -1, -1):
            if i in live:
                live.update(self.nodes[i].inputs)
        return live

    def pruned(self) -> Graph:
        """The graph without nodes that no output depends on, renumbered in order."""
        keep = sorted(self.live())
        new = {old: k for k, old in enumerate(keep)}
        nodes = tuple(
            dataclasses.replace(self.nodes[i], inputs=tuple(new[j] for j in self.nodes[i].inputs))
            for i in keep
        )
        return Graph(nodes, tuple((n, new[i]) for n, i in self.outputs), self.symbols)

    def named(self, op: Op) -> dict[str, int]:
        """Name -> node index for INPUT or WEIGHT nodes."""
        return {n.name: i for i, n in enumerate(self.nodes) if n.op is op}

    def output(self, name: str) -> int:
        for n, i in self.outputs:
            if n == name:
                return i
        raise KeyError(name)


@dataclass
class GraphBuilder:
    """Appends nodes, hash-consing identical ones (same op, inputs, shape, dtype, attrs)."""

    nodes: list[Node] = field(default_factory=list)
    _index: dict[Node, int] = field(default_factory=dict)
    outputs: list[tuple[str, int]] = field(default_factory=list)

    def add(
        self,
        op: Op,
        inputs: Iterable[int],
        shape: Sequence[Dim],
        dtype: DType,
        name: str = "",
        **attrs: Any,
    ) -> int:
        node = Node(
            op=op,
            inputs=tuple(inputs),
            shape=tuple(shape),
            dtype=dtype,
            attrs=tuple(sorted((k, freeze_attr(v)) for k, v in attrs.items())),
            name=name,
        )
        for i in node.inputs:
            if not 0 <= i < len(self.nodes):
                raise IRError(f"{op.value}: input {i} does not exist yet")
        if node in self._index:
            return self._index[node]
        self.nodes.append(node)
        self._index[node] = len(self.nodes) - 1
        return len(self.nodes) - 1

    def const(
        self, value: float | int | bool | Sequence[Any], shape: Sequence[Dim], dtype: DType
    ) -> int:
        flat = value if isinstance(value, list | tuple) else [value]
        return self.add(Op.CONST, (), shape, dtype, value=tuple(flat))

    def output(self, name: str, node: int) -> None:
        self.outputs.append((name, node))

    def build(self, symbols: Sequence[str] = ("B", "S")) -> Graph:
        return Graph(tuple(self.nodes), tuple(self.outputs), tuple(symbols))
