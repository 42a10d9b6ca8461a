"""`well_formed`: the invariants every graph must hold at a stage boundary.

Checked: topological order, arity, attributes, symbols, dtype rules, and that each node's
recorded shape is the one its op infers from its inputs (with symbolic dims).
"""

from __future__ import annotations

import math

from compiler.ir.graph import Dim, Graph, IRError, Node, Shape
from compiler.ir.ops import BINARY, COMPARISONS, LEAVES, REDUCTIONS, UNARY, DType, Op

ARITY = {
    op: 1
    for op in UNARY
    | REDUCTIONS
    | {Op.ARGMAX, Op.SOFTMAX, Op.RESHAPE, Op.EXPAND, Op.TRANSPOSE, Op.SLICE}
}
ARITY |= {op: 2 for op in BINARY | {Op.MATMUL, Op.GATHER}}
ARITY |= {op: 0 for op in LEAVES | {Op.ARANGE}}
ARITY |= {Op.WHERE: 3, Op.INDEX_COPY: 3}


def _broadcast(a: Shape, b: Shape) -> Shape:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise IRError(f"shapes {list(a)} and {list(b)} do not broadcast")
    return tuple(reversed(out))


def _axis(ax: int, rank: int) -> int:
    if not -rank <= ax < max(rank, 1):
        raise IRError(f"axis {ax} out of range for rank {rank}")
    return ax % rank if rank else 0


def _numel(shape: Shape) -> tuple[int, tuple[str, ...]]:
    """Product of the int dims and the sorted multiset of symbols (exact for monomials)."""
    return math.prod(d for d in shape if isinstance(d, int)), tuple(
        sorted(d for d in shape if isinstance(d, str))
    )


def _reduced(shape: Shape, axes: tuple[int, ...], keep: bool) -> Shape:
    ax = {_axis(a, len(shape)) for a in axes}
    return tuple(1 if i in ax else d for i, d in enumerate(shape) if keep or i not in ax)


def _slice_len(d: Dim, n: Node) -> Dim:
    start, stop, step = n.attr("start"), n.attr("stop"), n.attr("step", 1)
    if step is None or step <= 0:
        raise IRError("slice step must be positive")
    if isinstance(d, str):
        if start in (0, None) and stop is None and step == 1:
            return d
        raise IRError(f"slice of symbolic dim {d} must be whole")
    return len(range(d)[slice(start, stop, step)])


def infer(n: Node, ins: list[Node]) -> Shape:
    """The output shape of `n` implied by its inputs and attributes."""
    op, shapes = n.op, [x.shape for x in ins]
    if op in UNARY:
        return shapes[0]
    if op in BINARY:
        return _broadcast(shapes[0], shapes[1])
    if op is Op.WHERE:
        return _broadcast(_broadcast(shapes[0], shapes[1]), shapes[2])
    if op in REDUCTIONS:
        axes = n.attr("axes")
        return _reduced(
            shapes[0], tuple(axes) if isinstance(axes, tuple) else (axes,), bool(n.attr("keepdim"))
        )
    if op is Op.ARGMAX:
        return _reduced(shapes[0], (n.attr("axis"),), bool(n.attr("keepdim")))
    if op is Op.SOFTMAX:
        _axis(n.attr("axis"), len(shapes[0]))
        return shapes[0]
    if op is Op.MATMUL:
        a, b = shapes
        if len(a) < 2 or len(b) < 2 or a[-1] != b[-2]:
            raise IRError(f"matmul of {list(a)} and {list(b)}: inner dims differ")
        return (*_broadcast(a[:-2], b[:-2]), a[-2], b[-1])
    if op is Op.RESHAPE:
        if _numel(shapes[0]) != _numel(n.shape):
            raise IRError(f"reshape {list(shapes[0])} -> {list(n.shape)} changes the element count")
        return n.shape
    if op is Op.EXPAND:
        if _broadcast(shapes[0], n.shape) != n.shape:
            raise IRError(f"expand {list(shapes[0])} -> {list(n.shape)} is not a broadcast")
        return n.shape
    if op is Op.TRANSPOSE:
        perm = n.attr("perm")
        if sorted(perm) != list(range(len(shapes[0]))):
            raise IRError(
                f"transpose perm {list(perm)} is not a permutation of rank {len(shapes[0])}"
            )
        return tuple(shapes[0][p] for p in perm)
    if op is Op.SLICE:
        s = list(shapes[0])
        ax = _axis(n.attr("axis"), len(s))
        s[ax] = _slice_len(s[ax], n)
        return tuple(s)
    if op is Op.CONCAT:
        ax = _axis(n.attr("axis"), len(shapes[0]))
        rest = [s[:ax] + s[ax + 1 :] for s in shapes]
        if any(r != rest[0] for r in rest) or any(len(s) != len(shapes[0]) for s in shapes):
            raise IRError(f"concat of {[list(s) for s in shapes]} on axis {ax}")
        parts = [s[ax] for s in shapes]
        if not all(isinstance(p, int) for p in parts):
            raise IRError("concat along a symbolic axis")
        return (*shapes[0][:ax], sum(parts), *shapes[0][ax + 1 :])  # type: ignore[arg-type]
    if op is Op.GATHER:
        ax = _axis(n.attr("axis"), len(shapes[0]))
        if not ins[1].dtype.is_int:
            raise IRError("gather indices must be integers")
        return (*shapes[0][:ax], *shapes[1], *shapes[0][ax + 1 :])
    if op is Op.INDEX_COPY:
        dst, idx, src = shapes
        ax = _axis(n.attr("axis"), len(dst))
        if len(idx) != 1 or not ins[1].dtype.is_int:
            raise IRError("index_copy index must be a 1-d integer tensor")
        if src != (*dst[:ax], idx[0], *dst[ax + 1 :]):
            raise IRError(f"index_copy source {list(src)} does not fit {list(dst)} at axis {ax}")
        return dst
    if op is Op.ARANGE:
        if len(n.shape) != 1:
            raise IRError("arange must be 1-d")
        return n.shape
    if op in LEAVES:
        return n.shape
    raise IRError(f"no shape rule for {op.value}")


def _check_dtype(n: Node, ins: list[Node]) -> None:
    if n.op in COMPARISONS and n.dtype is not DType.BOOL:
        raise IRError(f"{n.op.value} must produce bool")
    if n.op in (Op.ARGMAX, Op.ARANGE) and not n.dtype.is_int:
        raise IRError(f"{n.op.value} must produce an integer type")
    if n.op is Op.WHERE and ins[0].dtype is not DType.BOOL:
        raise IRError("where condition must be bool")
    if n.op in (Op.MATMUL, Op.SOFTMAX, Op.SILU, Op.RSQRT, Op.EXP) and not n.dtype.is_float:
        raise IRError(f"{n.op.value} must produce a float type")


def well_formed(graph: Graph) -> None:
    """Raise IRError naming the first node that breaks an invariant."""
    names: set[tuple[str, str]] = set()
    for i, n in enumerate(graph.nodes):
        where = f"node {i} ({n.op.value}{' ' + n.name if n.name else ''})"
        try:
            if n.op is not Op.CONCAT and len(n.inputs) != ARITY[n.op]:
                raise IRError(f"takes {ARITY[n.op]} inputs, has {len(n.inputs)}")
            if n.op is Op.CONCAT and not n.inputs:
                raise IRError("concat of nothing")
            if any(not 0 <= j < i for j in n.inputs):
                raise IRError("input is not an earlier node")
            for d in n.shape:
                if isinstance(d, str) and d not in graph.symbols:
                    raise IRError(f"unknown symbol {d!r}")
                if isinstance(d, int) and d < 0:
                    raise IRError(f"negative dim {d}")
            if n.op in (Op.INPUT, Op.WEIGHT):
                if not n.name or (n.op.value, n.name) in names:
                    raise IRError("leaf names must be unique and non-empty")
                names.add((n.op.value, n.name))
            if n.op is Op.CONST:
                value = n.attr("value")
                if not isinstance(value, tuple) or any(isinstance(d, str) for d in n.shape):
                    raise IRError("const needs a value and a concrete shape")
                if len(value) != math.prod(n.shape):
                    raise IRError(f"const has {len(value)} values for shape {list(n.shape)}")
            ins = [graph.nodes[j] for j in n.inputs]
            _check_dtype(n, ins)
            shape = infer(n, ins)
            if shape != n.shape:
                raise IRError(f"recorded shape {list(n.shape)}, inferred {list(shape)}")
        except IRError as e:
            raise IRError(f"{where}: {e}") from None
    seen: set[str] = set()
    for name, j in graph.outputs:
        if name in seen or not 0 <= j < len(graph.nodes):
            raise IRError(f"output {name!r} is duplicated or points nowhere")
        seen.add(name)
    live = graph.live()
    dead = [i for i in range(len(graph.nodes)) if i not in live]
    if dead:
        raise IRError(f"node {dead[0]} ({graph.nodes[dead[0]].op.value}) is not used by any output")
