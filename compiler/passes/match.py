"""Declarative matching over the model graph, shared by the fusion passes.

A pass describes the formula its instruction computes as a pattern (a tree of `Pat`), anchors it
at a node it can name (an HF-named WEIGHT, a cache INPUT, a graph output), and gets back the
nodes the pattern bound: the instruction's operands. Its `covers` are then every node between
those operands and its results (`region`), and the op multiset of that region must be the one
the pass declares (`check_ops`).

Layout ops (RESHAPE, TRANSPOSE, EXPAND and casts to a float type: value-preserving in the
float64 semantics) are transparent to patterns: each pattern position first walks down through
them unless it asks for that op itself. So a buffer's value is the last non-layout node that
computed it, and the layout ops between it and a reader are covered by the reader.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

from compiler.ir.fused import Instr
from compiler.ir.graph import AttrValue, Graph, IRError, Node
from compiler.ir.ops import Op

Bindings = dict[str, int]
LAYOUT = frozenset({Op.RESHAPE, Op.TRANSPOSE, Op.EXPAND})
COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.AND, Op.OR, Op.EQ})
HOPS = 16  # how far downstream of its anchor a pattern's root may lie


def is_layout(n: Node) -> bool:
    return n.op in LAYOUT or (n.op is Op.CAST and n.dtype.is_float)


def strip(g: Graph, i: int) -> int:
    """The first non-layout node at or below `i`."""
    while is_layout(g.nodes[i]):
        i = g.nodes[i].inputs[0]
    return i


def describe(g: Graph, i: int) -> str:
    n = g.nodes[i]
    return f"node {i} ({n.op.value}{' ' + n.name if n.name else ''})"


@dataclass(frozen=True)
class Pat:
    """One pattern position: an op (None: any node), argument patterns, a name to bind."""

    op: Op | None = None
    args: tuple[Pat, ...] = ()
    bind: str = ""
    where: Callable[[Graph, Node], bool] | None = None
    label: str = ""

    def text(self) -> str:
        what = self.label or (self.op.value if self.op else "any node")
        return f"{what} '{self.bind}'" if self.bind else what


def op(
    o: Op,
    *args: Pat,
    bind: str = "",
    where: Callable[[Graph, Node], bool] | None = None,
    label: str = "",
) -> Pat:
    return Pat(o, args, bind, where, label)


def any_(bind: str) -> Pat:
    return Pat(None, (), bind)


def weight(bind: str) -> Pat:
    return Pat(Op.WEIGHT, (), bind)


def inp(bind: str) -> Pat:
    return Pat(Op.INPUT, (), bind)


def scalar(n: Node) -> AttrValue:
    v = n.attr("value")
    return v[0] if isinstance(v, tuple) and len(v) == 1 else None


def const(bind: str = "", value: float | None = None) -> Pat:
    """A CONST; with `value`, a scalar equal to it."""
    if value is None:
        return Pat(Op.CONST, (), bind, label="constant")
    return Pat(Op.CONST, (), bind, lambda g, n: scalar(n) == value, f"constant {value}")


def last_axis(g: Graph, n: Node) -> bool:
    """A CONCAT/SOFTMAX/ARGMAX axis or a MEAN's axes are the last axis of the input."""
    rank = len(g.nodes[n.inputs[0]].shape)
    ax = n.attr("axes", n.attr("axis"))
    ax = ax if isinstance(ax, tuple) else (ax,)
    return len(ax) == 1 and ax[0] % rank == rank - 1


def transposed(g: Graph, n: Node) -> bool:
    return n.attr("perm") == (1, 0)


def linear(x: str, w: str, bind: str = "") -> Pat:
    """x @ W^T for an HF weight W [out, in]."""
    return op(Op.MATMUL, any_(x), op(Op.TRANSPOSE, weight(w), where=transposed), bind=bind)


def _float(g: Graph, n: Node) -> bool:
    return isinstance(scalar(n), float)


def rmsnorm(x: str, w: str, eps: str, bind: str) -> Pat:
    """w * (x * rsqrt(mean(x^2, last axis) + eps))."""
    ms = op(
        Op.MEAN,
        op(Op.POW, any_(x), const(value=2.0)),
        where=lambda g, n: last_axis(g, n) and n.attr("keepdim") is True,
    )
    return op(
        Op.MUL,
        weight(w),
        op(Op.MUL, any_(x), op(Op.RSQRT, op(Op.ADD, ms, Pat(Op.CONST, (), eps, _float, "eps")))),
        bind=bind,
        label="RMSNorm",
    )


def _arange0(g: Graph, n: Node) -> bool:
    return n.attr("start") == 0 and n.attr("step") == 1


POSITIONS = op(
    Op.ADD,
    inp("pos"),
    op(Op.ARANGE, where=lambda g, n: _arange0(g, n) and n.shape == (1,)),
    bind="positions",
    label="positions pos + arange(1)",
)
KEY_POSITIONS = op(Op.ARANGE, where=_arange0, bind="key_positions", label="arange(S)")


class Matcher:
    """Matches patterns at nodes, remembering the deepest mismatch to explain a failure."""

    def __init__(self, g: Graph):
        self.g = g
        self.why: tuple[int, str] = (-1, "")

    def _fail(self, depth: int, msg: str) -> None:
        if depth > self.why[0]:
            self.why = (depth, msg)

    def match(self, p: Pat, i: int, env: Mapping[str, int] | None = None) -> Bindings | None:
        return self._m(p, i, dict(env or {}), 0)

    def _m(self, p: Pat, i: int, env: Bindings, depth: int) -> Bindings | None:
        g = self.g
        while is_layout(g.nodes[i]) and g.nodes[i].op is not p.op:
            i = g.nodes[i].inputs[0]
        n = g.nodes[i]
        if p.op is not None and n.op is not p.op:
            self._fail(depth, f"{describe(g, i)} where {p.text()} was expected")
            return None
        if p.where is not None and not p.where(g, n):
            self._fail(depth, f"{describe(g, i)} has the wrong attributes for {p.text()}")
            return None
        if p.bind:
            if env.get(p.bind, i) != i:
                self._fail(
                    depth,
                    f"{p.text()} is {describe(g, i)} here but {describe(g, env[p.bind])} elsewhere",
                )
                return None
            env = {**env, p.bind: i}
        if not p.args:
            return env
        if len(p.args) != len(n.inputs):
            self._fail(
                depth, f"{describe(g, i)} has {len(n.inputs)} inputs, {p.text()} has {len(p.args)}"
            )
            return None
        orders = [n.inputs]
        if n.op in COMMUTATIVE and len(n.inputs) == 2:
            orders.append(n.inputs[::-1])
        for ins in orders:
            e: Bindings | None = env
            for a, j in zip(p.args, ins, strict=True):
                e = self._m(a, j, e, depth + 1) if e is not None else None
            if e is not None:
                return e
        return None


def _short(v: AttrValue) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:56] + " ..."


@dataclass(frozen=True)
class Step:
    """One matched instruction, with the graph node each buffer operand holds before and after."""

    instr: Instr
    reads: tuple[tuple[str, int], ...]
    writes: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Fusion:
    """The state the passes thread: the graph, matched instructions, and dims learned so far."""

    graph: Graph
    steps: tuple[Step, ...] = ()
    facts: tuple[tuple[str, AttrValue], ...] = ()
    users: tuple[tuple[int, ...], ...] = field(default=(), compare=False, repr=False)
    named: Mapping[tuple[Op, str], int] = field(default_factory=dict, compare=False, repr=False)

    @classmethod
    def start(cls, graph: Graph) -> Fusion:
        users: list[list[int]] = [[] for _ in graph.nodes]
        for i, n in enumerate(graph.nodes):
            for j in n.inputs:
                users[j].append(i)
        named: dict[tuple[Op, str], int] = {
            (n.op, n.name): i for i, n in enumerate(graph.nodes) if n.op in (Op.INPUT, Op.WEIGHT)
        }
        return cls(graph, users=tuple(tuple(u) for u in users), named=named)

    def add(self, steps: Iterable[Step], where: str, **facts: AttrValue) -> Fusion:
        """This state with `steps` appended and `facts` learned (which must agree with earlier ones)."""
        known = dict(self.facts)
        for k, v in facts.items():
            if k in known and known[k] != v:
                raise IRError(
                    f"{where}: {k} is {_short(v)} here but {_short(known[k])} elsewhere in the graph"
                )
            known[k] = v
        steps = self.steps + tuple(steps)
        return dataclasses.replace(self, steps=steps, facts=tuple(sorted(known.items())))

    def node(self, name: str, kind: Op = Op.WEIGHT) -> int:
        """The INPUT or WEIGHT node called `name`."""
        if (kind, name) not in self.named:
            raise IRError(f"the graph has no {kind.value} named {name!r}")
        return self.named[kind, name]

    def downstream(self, i: int, hops: int = HOPS) -> list[int]:
        seen, frontier = {i}, [i]
        for _ in range(hops):
            frontier = [u for j in frontier for u in self.users[j] if u not in seen]
            seen.update(frontier)
        return sorted(seen)

    def find(
        self, p: Pat, anchor: str, at: int, what: str, env: Mapping[str, int] | None = None
    ) -> Bindings:
        """The one match of `p` (rooted downstream of node `at`) that binds `anchor` to `at`."""
        m = Matcher(self.graph)
        found = []
        for root in self.downstream(at):
            if self.graph.nodes[root].op is p.op:
                b = m.match(p, root, {**(env or {}), anchor: at})
                if b is not None:
                    found.append((root, b))
        if not found:
            raise IRError(
                f"{what}: no {p.text()} found downstream of {describe(self.graph, at)}; "
                f"closest mismatch: {m.why[1]}"
            )
        if len(found) > 1:
            raise IRError(f"{what}: {p.text()} matches at several nodes {[r for r, _ in found]}")
        return found[0][1]

    def match_at(self, p: Pat, i: int, what: str, env: Mapping[str, int] | None = None) -> Bindings:
        m = Matcher(self.graph)
        b = m.match(p, i, env)
        if b is None:
            raise IRError(f"{what}: {describe(self.graph, i)} is not {p.text()}: {m.why[1]}")
        return b


def dim(g: Graph, i: int, axis: int, what: str) -> int:
    """A dimension of node `i` that must be a number, not a symbol."""
    d = g.nodes[i].shape[axis]
    if not isinstance(d, int):
        raise IRError(f"{what}: {describe(g, i)} has symbolic size {d!r} on axis {axis}")
    return d


def num_layers(g: Graph) -> int:
    """The number of decoder layers: the `k_cache.{l}` inputs, which must be numbered 0..L-1."""
    names = {n.name for n in g.nodes if n.op is Op.INPUT}
    layers = sum(1 for n in names if n.startswith("k_cache."))
    for layer in range(layers):
        for c in ("k_cache", "v_cache"):
            if f"{c}.{layer}" not in names:
                raise IRError(f"layer {layer}: the graph has no input {c}.{layer}")
    return layers


def region(f: Fusion, outs: Iterable[int], stop: Iterable[int], what: str) -> tuple[int, ...]:
    """The non-leaf nodes `outs` depend on, walking up from them and stopping at `stop`.

    Raises IRError where the walk reaches an INPUT or WEIGHT that is not in `stop`: the
    instruction would read something it does not name as an operand.
    """
    g, stops = f.graph, set(stop)
    covered: set[int] = set()
    todo = list(outs)
    while todo:
        i = todo.pop()
        if i in covered or i in stops:
            continue
        n = g.nodes[i]
        if n.op is Op.CONST:
            continue
        if n.op in (Op.INPUT, Op.WEIGHT):
            raise IRError(
                f"{what}: reads {n.op.value} {n.name!r}, which is not one of its operands"
            )
        covered.add(i)
        todo.extend(n.inputs)
    return tuple(sorted(covered))


def ops(table: str) -> dict[Op, int]:
    """An op multiset from text: `"pow mean mul*2"` is {POW: 1, MEAN: 1, MUL: 2}."""
    out: Counter[Op] = Counter()
    for word in table.split():
        name, _, count = word.partition("*")
        out[Op(name)] += int(count or 1)
    return dict(out)


def op_counts(g: Graph, nodes: Iterable[int]) -> Counter[Op]:
    return Counter(g.nodes[i].op for i in nodes if not is_layout(g.nodes[i]))


def check_ops(g: Graph, nodes: Iterable[int], want: Mapping[Op, int], what: str) -> None:
    """The non-layout ops of `nodes` must be exactly the multiset `want`."""
    got, exp = op_counts(g, nodes), Counter({o: c for o, c in want.items() if c})
    if got != exp:
        extra = ", ".join(f"{o.value} x{c}" for o, c in (got - exp).items()) or "none"
        missing = ", ".join(f"{o.value} x{c}" for o, c in (exp - got).items()) or "none"
        raise IRError(f"{what}: covers unexpected ops ({extra}); missing ({missing})")


def same_value(g: Graph, a: int, b: int) -> bool:
    """Whether nodes `a` and `b` hold the same value up to layout (equal constants count)."""
    a, b = strip(g, a), strip(g, b)
    na, nb = g.nodes[a], g.nodes[b]
    if a == b:
        return True
    return na.op is Op.CONST and nb.op is Op.CONST and (na.shape, na.attrs) == (nb.shape, nb.attrs)


def isclose(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-12, abs_tol=0.0)
