"""Evaluate any IR graph on the CPU in float64.

Float storage types (bf16, f32) are all computed in float64, so CAST between float types is the
identity; casts to integer or bool types are real. Symbols are bound from the shapes of the
inputs and weights that carry them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compiler.ir.graph import Graph, IRError, Node, Shape
from compiler.ir.ops import DType, Op

Array = np.ndarray


def _np_dtype(dt: DType) -> Any:
    if dt.is_float:
        return np.float64
    return np.int64 if dt.is_int else np.bool_


def _bind(shape: Shape, actual: tuple[int, ...], env: dict[str, int], what: str) -> None:
    if len(shape) != len(actual):
        raise IRError(f"{what}: expected rank {len(shape)} {list(shape)}, got shape {list(actual)}")
    for d, a in zip(shape, actual, strict=True):
        if isinstance(d, str):
            if env.setdefault(d, a) != a:
                raise IRError(f"{what}: symbol {d} is {env[d]} elsewhere but {a} here")
        elif d != a:
            raise IRError(f"{what}: expected shape {list(shape)}, got {list(actual)}")


def concrete(shape: Shape, env: Mapping[str, int]) -> tuple[int, ...]:
    """The shape with every symbol replaced by its bound value."""
    return tuple(env[d] if isinstance(d, str) else d for d in shape)


def _axes(n: Node) -> tuple[int, ...]:
    a = n.attr("axes")
    return tuple(a) if isinstance(a, tuple) else (a,)


def _softmax(x: Array, axis: int) -> Array:
    m = np.max(x, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    e = np.exp(x - m)
    return e / np.sum(e, axis=axis, keepdims=True)


def _index_copy(dst: Array, index: Array, src: Array, axis: int) -> Array:
    out = dst.copy()
    idx: list[Any] = [slice(None)] * dst.ndim
    idx[axis] = index.astype(np.int64)
    out[tuple(idx)] = src
    return out


def _slice(x: Array, n: Node) -> Array:
    idx = [slice(None)] * x.ndim
    idx[n.attr("axis")] = slice(n.attr("start"), n.attr("stop"), n.attr("step", 1))
    return x[tuple(idx)]


def _sigmoid(x: Array) -> Array:
    return 1.0 / (1.0 + np.exp(-x))


_UNARY: dict[Op, Callable[[Array], Array]] = {
    Op.NEG: np.negative,
    Op.RECIPROCAL: lambda x: 1.0 / x,
    Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: 1.0 / np.sqrt(x),
    Op.EXP: np.exp,
    Op.SIN: np.sin,
    Op.COS: np.cos,
    Op.SIGMOID: _sigmoid,
    Op.SILU: lambda x: x * _sigmoid(x),
    Op.NOT: np.logical_not,
}

_BINARY: dict[Op, Callable[[Array, Array], Array]] = {
    Op.ADD: np.add,
    Op.SUB: np.subtract,
    Op.MUL: np.multiply,
    Op.DIV: np.true_divide,
    Op.POW: np.power,
    Op.EQ: np.equal,
    Op.LT: np.less,
    Op.LE: np.less_equal,
    Op.GT: np.greater,
    Op.GE: np.greater_equal,
    Op.AND: np.logical_and,
    Op.OR: np.logical_or,
}


def _step(n: Node, xs: list[Array], env: Mapping[str, int]) -> Array:
    op = n.op
    if op in _UNARY:
        return _UNARY[op](xs[0])
    if op in _BINARY:
        return _BINARY[op](xs[0], xs[1])
    if op is Op.CONST:
        return np.asarray(n.attr("value"), dtype=_np_dtype(n.dtype)).reshape(concrete(n.shape, env))
    if op is Op.CAST:
        return xs[0].astype(_np_dtype(n.dtype))
    if op is Op.WHERE:
        return np.where(xs[0], xs[1], xs[2])
    if op is Op.SUM:
        return np.sum(xs[0], axis=_axes(n), keepdims=bool(n.attr("keepdim")))
    if op is Op.MEAN:
        return np.mean(xs[0], axis=_axes(n), keepdims=bool(n.attr("keepdim")))
    if op is Op.MAX:
        return np.max(xs[0], axis=_axes(n), keepdims=bool(n.attr("keepdim")))
    if op is Op.ARGMAX:
        return np.argmax(xs[0], axis=n.attr("axis"), keepdims=bool(n.attr("keepdim")))
    if op is Op.SOFTMAX:
        return _softmax(xs[0], n.attr("axis"))
    if op is Op.MATMUL:
        return np.matmul(xs[0], xs[1])
    if op is Op.RESHAPE:
        return xs[0].reshape(concrete(n.shape, env))
    if op is Op.EXPAND:
        return np.broadcast_to(xs[0], concrete(n.shape, env))
    if op is Op.TRANSPOSE:
        return np.transpose(xs[0], n.attr("perm"))
    if op is Op.SLICE:
        return _slice(xs[0], n)
    if op is Op.CONCAT:
        return np.concatenate(xs, axis=n.attr("axis"))
    if op is Op.GATHER:
        return np.take(xs[0], xs[1].astype(np.int64), axis=n.attr("axis"))
    if op is Op.INDEX_COPY:
        return _index_copy(xs[0], xs[1], xs[2], n.attr("axis"))
    if op is Op.ARANGE:
        length = concrete(n.shape, env)[0]
        return n.attr("start") + n.attr("step") * np.arange(length, dtype=np.int64)
    raise IRError(f"evaluator has no rule for {op.value}")


def evaluate(
    graph: Graph, inputs: Mapping[str, Any], weights: Mapping[str, Any]
) -> dict[str, Array]:
    """Run `graph` on named inputs and weights (arrays or torch tensors); returns named outputs.

    Every value is float64, int64 or bool; an output's shape is checked against the graph.
    """
    env: dict[str, int] = {}
    values: list[Array | None] = [None] * len(graph.nodes)
    last_use = {i: i for i in range(len(graph.nodes))}
    for i, n in enumerate(graph.nodes):
        for j in n.inputs:
            last_use[j] = i
    keep = {i for _, i in graph.outputs}
    for i, n in enumerate(graph.nodes):
        if n.op in (Op.INPUT, Op.WEIGHT):
            table = inputs if n.op is Op.INPUT else weights
            if n.name not in table:
                raise IRError(f"missing {n.op.value} {n.name!r}")
            v = _as_array(table[n.name], n.dtype)
            _bind(n.shape, v.shape, env, f"{n.op.value} {n.name!r}")
        else:
            xs = [values[j] for j in n.inputs]
            v = _step(n, xs, env)  # type: ignore[arg-type]
            want = concrete(n.shape, env)
            if tuple(v.shape) != want:
                raise IRError(
                    f"node {i} ({n.op.value}) produced shape {list(v.shape)}, graph says {list(want)}"
                )
        values[i] = v
        for j in n.inputs:  # free what no later node reads
            if last_use[j] == i and j not in keep:
                values[j] = None
    return {name: values[i] for name, i in graph.outputs}  # type: ignore[misc]


def _as_array(v: Any, dt: DType) -> Array:
    if hasattr(v, "detach"):  # torch tensor
        v = v.detach().cpu()
        v = v.double() if v.is_floating_point() else v
        v = v.numpy()
    return np.asarray(v, dtype=_np_dtype(dt))
