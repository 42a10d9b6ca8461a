"""ONNX operator rules: each turns one ONNX node into IR nodes, or folds it at import time.

A rule gets the `Emitter`, the node's inputs (IR node ids, `Known` values, None for an absent
optional input) and its attributes, and returns the output value(s). Where every input is Known
a rule folds with numpy, so shape arithmetic never reaches the IR; otherwise it emits through
the Emitter, which infers each node's shape with `well_formed.infer` and applies the local
rewrites listed in `onnx_import`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from onnx import TensorProto, helper, numpy_helper

from compiler.ir.graph import Dim, GraphBuilder, IRError, Node, Shape
from compiler.ir.ops import DType, Op
from compiler.ir.well_formed import _broadcast, infer

ONNX_DTYPES: dict[int, DType] = {
    TensorProto.DOUBLE: DType.F64,
    TensorProto.FLOAT: DType.F32,
    TensorProto.BFLOAT16: DType.BF16,
    TensorProto.FLOAT16: DType.F16,
    TensorProto.INT64: DType.I64,
    TensorProto.INT32: DType.I32,
    TensorProto.BOOL: DType.BOOL,
}
NP_DTYPES = {dt: helper.tensor_dtype_to_np_dtype(e) for e, dt in ONNX_DTYPES.items()}
CONST_LIMIT = 4096  # elements: larger folded values are not turned into CONST nodes
WHOLE = 2**31 - 1  # a Slice end at or past this runs to the end, even of a symbolic dim


@dataclass(frozen=True, eq=False)
class Known:
    """A value computed at import time. `value` has object dtype where an entry is a symbol."""

    value: np.ndarray
    dtype: DType

    @property
    def symbolic(self) -> bool:
        return self.value.dtype == object and any(isinstance(x, str) for x in self.value.flat)


Value = int | Known  # an IR node id, or a value known at import time
Rule = Callable[["Emitter", list[Any], dict[str, Any]], "Value | list[Value]"]


def known(value: Any, dtype: DType) -> Known:
    """A Known of `dtype`; object arrays stay object only while they hold a symbol."""
    v = np.asarray(value)
    if v.dtype.kind in "OU":  # object, or the str array numpy makes of one picked symbol
        v = v.astype(object)
        if any(isinstance(x, str) for x in v.flat):
            return Known(v, dtype)
    return Known(v.astype(NP_DTYPES[dtype]), dtype)


def onnx_dtype(elem: int, what: str) -> DType:
    if elem not in ONNX_DTYPES:
        raise IRError(f"{what}: unsupported ONNX element type {TensorProto.DataType.Name(elem)}")
    return ONNX_DTYPES[elem]


class Emitter:
    """Values of the ONNX graph being converted, and IR emission with local rewrites."""

    def __init__(self, opset: int):
        self.opset = opset  # of the default domain: a few operators changed form over opsets
        self.gb = GraphBuilder()

    def shape(self, v: Value) -> Shape:
        return tuple(v.value.shape) if isinstance(v, Known) else self.gb.nodes[v].shape

    def dtype(self, v: Value) -> DType:
        return v.dtype if isinstance(v, Known) else self.gb.nodes[v].dtype

    def tensor(self, v: Value) -> int:
        """The IR node for a value; a Known becomes a CONST."""
        if not isinstance(v, Known):
            return v
        if v.symbolic:
            raise IRError(
                f"symbolic size {v.value.tolist()} is used as tensor data; bind it with dims="
            )
        flat = v.value.astype(np.float64) if v.dtype.is_float else v.value
        return self.gb.const(flat.ravel().tolist(), v.value.shape, v.dtype)

    def ints(self, v: Value | None, what: str) -> list[Dim]:
        """A Known integer vector (or scalar) as a list of ints and symbols."""
        if not isinstance(v, Known):
            raise IRError(f"{what} must be known at import time, not computed at run time")
        return [x if isinstance(x, str) else int(x) for x in v.value.ravel().tolist()]

    def concrete_ints(self, v: Value | None, what: str) -> list[int]:
        xs = self.ints(v, what)
        out = [x for x in xs if isinstance(x, int)]
        if len(out) != len(xs):
            raise IRError(f"{what} {xs} must not be symbolic")
        return out

    def int1(self, v: Value | None, what: str) -> Dim:
        xs = self.ints(v, what)
        if len(xs) != 1:
            raise IRError(f"{what} must be one value, got {xs}")
        return xs[0]

    # --- emitting IR --------------------------------------------------------------------------

    def emit(
        self, op: Op, inputs: Sequence[int], dtype: DType, shape: Shape | None = None, **attrs: Any
    ) -> int:
        """Add a node whose shape `infer` derives (or checks, for RESHAPE/EXPAND/ARANGE)."""
        frozen = tuple(
            sorted((k, tuple(v) if isinstance(v, list) else v) for k, v in attrs.items())
        )
        probe = Node(op, tuple(inputs), tuple(shape or ()), dtype, frozen)
        inferred = infer(probe, [self.gb.nodes[i] for i in inputs])
        return self.gb.add(op, inputs, inferred, dtype, **attrs)

    def transpose(self, x: int, perm: Sequence[int]) -> int:
        n = self.gb.nodes[x]
        if n.op is Op.TRANSPOSE:  # transpose of a transpose: one permutation
            perm, x = [n.attr("perm")[p] for p in perm], n.inputs[0]
        if list(perm) == list(range(len(perm))):
            return x
        return self.emit(Op.TRANSPOSE, [x], self.gb.nodes[x].dtype, perm=list(perm))

    def reshape(self, x: int, shape: Shape) -> int:
        if self.gb.nodes[x].op is Op.RESHAPE:
            x = self.gb.nodes[x].inputs[0]
        if self.gb.nodes[x].shape == tuple(shape):
            return x
        return self.emit(Op.RESHAPE, [x], self.gb.nodes[x].dtype, tuple(shape))

    def expand(self, x: int, shape: Shape) -> int:
        if self.gb.nodes[x].shape == tuple(shape):
            return x
        return self.emit(Op.EXPAND, [x], self.gb.nodes[x].dtype, tuple(shape))

    def cast(self, x: int, dtype: DType) -> int:
        return x if self.gb.nodes[x].dtype is dtype else self.emit(Op.CAST, [x], dtype)

    def index_copy(self, dst: int, index: int, src: int, axis: int) -> int:
        """dst with dst[.., index[i], ..] = src[.., i, ..]; written through a TRANSPOSE of dst."""
        n = self.gb.nodes[dst]
        if n.op is Op.TRANSPOSE:
            perm = list(n.attr("perm"))
            inverse = [perm.index(i) for i in range(len(perm))]
            out = self.index_copy(n.inputs[0], index, self.transpose(src, inverse), perm[axis])
            return self.transpose(out, perm)
        return self.emit(Op.INDEX_COPY, [dst, index, src], n.dtype, axis=axis)


# --- shape arithmetic ---------------------------------------------------------------------------


def _axis(ax: int, rank: int) -> int:
    if not -rank <= ax < max(rank, 1):
        raise IRError(f"axis {ax} out of range for rank {rank}")
    return ax % rank if rank else 0


def _concrete(shape: Sequence[Dim]) -> tuple[int, ...] | None:
    out = tuple(d for d in shape if isinstance(d, int))
    return out if len(out) == len(shape) else None


def _numel(shape: Sequence[Dim]) -> tuple[int, list[str]]:
    return math.prod(d for d in shape if isinstance(d, int)), sorted(
        d for d in shape if isinstance(d, str)
    )


def _reshape_target(src: Shape, spec: Sequence[Dim], allowzero: bool) -> Shape:
    """ONNX Reshape's output shape: 0 copies the input dim (unless allowzero), -1 is inferred."""
    out = [src[i] if d == 0 and not allowzero else d for i, d in enumerate(spec)]
    if -1 not in out:
        return tuple(out)
    k = out.index(-1)
    (n, nsym), (m, msym) = _numel(src), _numel(out[:k] + out[k + 1 :])
    rest = list(nsym)
    for s in msym:
        if s not in rest:
            raise IRError(f"reshape {list(src)} -> {list(spec)}: symbol {s} does not divide")
        rest.remove(s)
    if m == 0 or n % m or (rest and (n // m != 1 or len(rest) > 1)):
        raise IRError(f"reshape {list(src)} -> {list(spec)}: cannot infer the -1 dim")
    out[k] = rest[0] if rest else n // m
    return tuple(out)


def _slice_range(d: Dim, start: Dim, end: Dim, step: Dim) -> range | None:
    """Indices ONNX Slice takes from a dim of size d (Python's clamping is ONNX's); None: all."""
    if (
        isinstance(d, str)
        and (start, step) == (0, 1)
        and (end == d or (isinstance(end, int) and end >= WHOLE))
    ):
        return None
    if not (
        isinstance(d, int)
        and isinstance(start, int)
        and isinstance(end, int)
        and isinstance(step, int)
    ):
        raise IRError(f"slice {start}:{end}:{step} of a dim of size {d}: bounds must be known ints")
    if step == 0:
        raise IRError("slice step 0")
    r = range(d)[slice(start, end, step)]
    return None if r == range(d) else r


# --- rules: one per ONNX operator ---------------------------------------------------------------

_SYM_IDENTITY = {Op.ADD: 0, Op.SUB: 0, Op.MUL: 1, Op.DIV: 1}


def _sym_scalar(op: Op, fn: Callable[..., Any], x: Any, y: Any) -> Any:
    """`op` on two scalars of a shape vector, where one may be a symbol."""
    if not isinstance(x, str) and not isinstance(y, str):
        return fn(np.asarray(x), np.asarray(y)).item()
    if op in _SYM_IDENTITY and not isinstance(y, str) and y == _SYM_IDENTITY[op]:
        return x
    if op in (Op.ADD, Op.MUL) and not isinstance(x, str) and x == _SYM_IDENTITY[op]:
        return y
    if op is Op.EQ and (x == y or any(isinstance(v, int) and v < 1 for v in (x, y))):
        return x == y  # a dim is never below 1
    raise IRError(f"cannot compute {op.value}({x}, {y}) on a symbolic dim; bind it with dims=")


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    if np.issubdtype(a.dtype, np.integer) and np.issubdtype(b.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)  # ONNX integer Div truncates
    return np.true_divide(a, b)


def _unary(op: Op, fn: Callable[[np.ndarray], np.ndarray]) -> Rule:
    def rule(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
        (x,) = ins
        if isinstance(x, Known) and not x.symbolic:
            return known(fn(x.value), x.dtype)
        return em.emit(op, [em.tensor(x)], em.dtype(x))

    return rule


def _binary(op: Op, fn: Callable[..., np.ndarray], out: DType | None = None) -> Rule:
    def rule(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
        a, b = ins
        dt = out or em.dtype(a)
        if isinstance(a, Known) and isinstance(b, Known):
            if not a.symbolic and not b.symbolic:
                return known(fn(a.value, b.value), dt)
            x, y = np.broadcast_arrays(a.value.astype(object), b.value.astype(object))
            flat = [_sym_scalar(op, fn, p, q) for p, q in zip(x.flat, y.flat, strict=True)]
            return known(np.array(flat, dtype=object).reshape(x.shape), dt)
        ta, tb = em.tensor(a), em.tensor(b)
        if op is Op.DIV and dt.is_int:  # truncating integer division, through float64
            q = em.emit(Op.DIV, [em.cast(ta, DType.F64), em.cast(tb, DType.F64)], DType.F64)
            return em.cast(q, dt)
        return em.emit(op, [ta, tb], dt)

    return rule


def _where(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    c, a, b = ins
    if all(isinstance(v, Known) for v in ins) and not c.symbolic:
        return known(np.where(c.value, a.value.astype(object), b.value.astype(object)), a.dtype)
    return em.emit(Op.WHERE, [em.tensor(c), em.tensor(a), em.tensor(b)], em.dtype(a))


def _matmul(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    a, b = em.tensor(ins[0]), em.tensor(ins[1])
    sa, sb = em.shape(a), em.shape(b)
    if len(sa) == 1:  # numpy matmul: a 1-d operand gains, then loses, a unit dim
        a = em.reshape(a, (1, sa[0]))
    if len(sb) == 1:
        b = em.reshape(b, (sb[0], 1))
    y = em.emit(Op.MATMUL, [a, b], em.dtype(a))
    shape = em.shape(y)
    keep = [i for i in range(len(shape)) if not (len(sa) == 1 and i == len(shape) - 2)]
    keep = [i for i in keep if not (len(sb) == 1 and i == len(shape) - 1)]
    return em.reshape(y, tuple(shape[i] for i in keep))


def _gemm(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    a, b = em.tensor(ins[0]), em.tensor(ins[1])
    a = em.transpose(a, [1, 0]) if at.get("transA", 0) else a
    b = em.transpose(b, [1, 0]) if at.get("transB", 0) else b
    dt = em.dtype(a)
    y = em.emit(Op.MATMUL, [a, b], dt)  # [M, N]
    if at.get("alpha", 1.0) != 1.0:
        y = em.emit(Op.MUL, [y, em.gb.const(at["alpha"], (), dt)], dt)
    if len(ins) > 2 and ins[2] is not None:
        c = em.tensor(ins[2])
        if at.get("beta", 1.0) != 1.0:
            c = em.emit(Op.MUL, [c, em.gb.const(at["beta"], (), dt)], dt)
        y = em.emit(Op.ADD, [y, c], dt)
    return y


def _gather(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    data, idx = ins
    axis = _axis(at.get("axis", 0), len(em.shape(data)))
    d = em.shape(data)[axis]
    if isinstance(idx, Known) and isinstance(d, int):  # ONNX counts negative indices from the end
        idx = known(idx.value.astype(np.int64) % max(d, 1), DType.I64)
    if isinstance(data, Known) and isinstance(idx, Known):
        return known(np.take(data.value, idx.value, axis=axis), data.dtype)
    return em.emit(Op.GATHER, [em.tensor(data), em.tensor(idx)], em.dtype(data), axis=axis)


def _axes(em: Emitter, ins: list[Any], at: dict[str, Any], rank: int) -> list[int] | None:
    """Axes from the attribute (older opsets) or the second input; None when absent."""
    raw = at.get("axes")
    if raw is None and len(ins) > 1 and ins[1] is not None:
        raw = em.concrete_ints(ins[1], "axes")
    return None if raw is None else [_axis(int(a), rank) for a in raw]


def _reduce(op: Op) -> Rule:
    def rule(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
        x = em.tensor(ins[0])
        rank = len(em.shape(x))
        axes = _axes(em, ins, at, rank)
        if not axes:
            if at.get("noop_with_empty_axes", 0):
                return x
            axes = list(range(rank))
        return em.emit(op, [x], em.dtype(x), axes=axes, keepdim=bool(at.get("keepdims", 1)))

    return rule


def _argmax(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    if at.get("select_last_index", 0):
        raise IRError("ArgMax with select_last_index=1 (IR argmax takes the first maximum)")
    x = em.tensor(ins[0])
    axis = _axis(at.get("axis", 0), len(em.shape(x)))
    return em.emit(Op.ARGMAX, [x], DType.I64, axis=axis, keepdim=bool(at.get("keepdims", 1)))


def _softmax(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    x = em.tensor(ins[0])
    rank = len(em.shape(x))
    axis = _axis(at.get("axis", -1 if em.opset >= 13 else 1), rank)
    if em.opset < 13 and axis != rank - 1:  # older Softmax flattens the trailing dims
        raise IRError(f"Softmax (opset {em.opset}) over axes {axis}.. of rank {rank}")
    return em.emit(Op.SOFTMAX, [x], em.dtype(x), axis=axis)


def _rms_norm(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    """RMSNormalization (opset 23): x / sqrt(mean(x^2 over axis..) + epsilon) * scale."""
    x, scale = em.tensor(ins[0]), em.tensor(ins[1])
    rank, dt = len(em.shape(x)), em.dtype(x)
    axes = list(range(_axis(at.get("axis", -1), rank), rank))
    sq = em.emit(Op.POW, [x, em.gb.const(2.0, (), dt)], dt)
    ms = em.emit(Op.MEAN, [sq], dt, axes=axes, keepdim=True)
    ms = em.emit(Op.ADD, [ms, em.gb.const(at.get("epsilon", 1e-5), (), dt)], dt)
    y = em.emit(Op.MUL, [x, em.emit(Op.RSQRT, [ms], dt)], dt)
    return em.emit(Op.MUL, [y, scale], dt)


def _transpose(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    (x,) = ins
    rank = len(em.shape(x))
    perm = list(at.get("perm", range(rank - 1, -1, -1)))
    if isinstance(x, Known):
        return known(np.transpose(x.value, perm), x.dtype)
    return em.transpose(x, perm)


def _to_shape(em: Emitter, x: Value, shape: Shape) -> Value:
    if isinstance(x, Known):
        fixed = _concrete(shape)
        if fixed is None:
            raise IRError(f"reshape of a constant to symbolic shape {list(shape)}")
        return known(x.value.reshape(fixed), x.dtype)
    return em.reshape(x, shape)


def _reshape(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    x, spec = ins
    target = _reshape_target(
        em.shape(x), em.ints(spec, "Reshape shape"), bool(at.get("allowzero", 0))
    )
    return _to_shape(em, x, target)


def _unsqueeze(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    shape = list(em.shape(ins[0]))
    raw = at["axes"] if "axes" in at else em.concrete_ints(ins[1], "Unsqueeze axes")
    rank = len(shape) + len(raw)
    for a in sorted(_axis(int(x), rank) for x in raw):
        shape.insert(a, 1)
    return _to_shape(em, ins[0], tuple(shape))


def _squeeze(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    shape = em.shape(ins[0])
    axes = _axes(em, ins, at, len(shape))
    if axes is None:
        axes = [i for i, d in enumerate(shape) if d == 1]
    if any(shape[a] != 1 for a in axes):
        raise IRError(f"squeeze of dims {axes} of shape {list(shape)}: not all are 1")
    return _to_shape(em, ins[0], tuple(d for i, d in enumerate(shape) if i not in axes))


def _flatten(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    shape = em.shape(ins[0])
    k = _axis(at.get("axis", 1), len(shape) + 1)
    head, tail = (_reshape_target(part, [-1], False)[0] for part in (shape[:k], shape[k:]))
    return _to_shape(em, ins[0], (head, tail))


def _expand(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    x, spec = ins
    shape = _broadcast(em.shape(x), tuple(em.ints(spec, "Expand shape")))
    fixed = _concrete(shape)
    if isinstance(x, Known) and fixed is not None and math.prod(fixed) <= CONST_LIMIT:
        return known(np.broadcast_to(x.value, fixed), x.dtype)
    return em.expand(em.tensor(x), shape)


def _concat(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    xs = [x for x in ins if x is not None]
    axis = _axis(at["axis"], len(em.shape(xs[0])))
    if all(isinstance(x, Known) for x in xs):
        return known(np.concatenate([x.value.astype(object) for x in xs], axis=axis), xs[0].dtype)
    if len(xs) == 1:
        return xs[0]
    return em.emit(Op.CONCAT, [em.tensor(x) for x in xs], em.dtype(xs[0]), axis=axis)


def _slice(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    x = ins[0]
    shape = em.shape(x)
    if "starts" in at:  # opset < 10: attributes
        starts, ends, axes, steps = at["starts"], at["ends"], at.get("axes"), None
    else:
        starts, ends = em.ints(ins[1], "Slice starts"), em.ints(ins[2], "Slice ends")
        axes = (
            em.concrete_ints(ins[3], "Slice axes") if len(ins) > 3 and ins[3] is not None else None
        )
        steps = (
            em.concrete_ints(ins[4], "Slice steps") if len(ins) > 4 and ins[4] is not None else None
        )
    axes = list(range(len(starts))) if axes is None else axes
    steps = [1] * len(starts) if steps is None else steps
    for a, s, e, st in zip(axes, starts, ends, steps, strict=True):
        ax = _axis(a, len(shape))
        r = _slice_range(em.shape(x)[ax], s, e, st)
        if r is None:
            continue
        if isinstance(x, Known):
            idx = [slice(None)] * x.value.ndim
            idx[ax] = slice(r.start, r.stop if r.stop >= 0 else None, r.step)
            x = known(x.value[tuple(idx)], x.dtype)
        elif r.step > 0:
            x = em.emit(
                Op.SLICE, [x], em.dtype(x), axis=ax, start=r.start, stop=r.stop, step=r.step
            )
        else:  # IR slices step forward: a backward slice is a gather of its indices
            idx_node = em.gb.const(list(r), (len(r),), DType.I64)
            x = em.emit(Op.GATHER, [x, idx_node], em.dtype(x), axis=ax)
    return x


def _cast(em: Emitter, x: Value, dt: DType) -> Value:
    if isinstance(x, Known):
        if x.symbolic and not dt.is_int:
            raise IRError(f"cast of symbolic size {x.value.tolist()} to {dt.value}")
        return known(x.value, dt)
    return em.cast(x, dt)


def _range(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    dt = em.dtype(ins[0])
    if all(isinstance(v, Known) and not v.symbolic for v in ins):
        start, limit, delta = (v.value.item() for v in ins)
        if delta == 0:
            raise IRError("Range with delta 0")
        if not dt.is_int or len(range(start, limit, delta)) <= CONST_LIMIT:
            return known(np.arange(start, limit, delta), dt)
        return em.emit(
            Op.ARANGE, [], dt, (len(range(start, limit, delta)),), start=start, step=delta
        )
    start, limit, delta = (em.int1(v, "Range bound") for v in ins)
    if not (dt.is_int and start == 0 and delta == 1 and isinstance(limit, str)):
        raise IRError(
            f"Range({start}, {limit}, {delta}): of run-time ranges only 0..<symbol> is supported"
        )
    return em.emit(Op.ARANGE, [], dt, (limit,), start=0, step=1)


def _constant_of_shape(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    shape = tuple(em.ints(ins[0], "ConstantOfShape shape"))
    t = at.get("value")
    value, dt = (
        (0.0, DType.F32)
        if t is None
        else (numpy_helper.to_array(t).item(), onnx_dtype(t.data_type, "value"))
    )
    fixed = _concrete(shape)
    if fixed is not None and math.prod(fixed) <= CONST_LIMIT:
        return known(np.full(fixed, value), dt)
    return em.expand(em.gb.const(value, (), dt), shape)


def _constant(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    if "value" in at:
        return known(numpy_helper.to_array(at["value"]), onnx_dtype(at["value"].data_type, "value"))
    for key, dt in (("value_float", DType.F32), ("value_floats", DType.F32),
                    ("value_int", DType.I64), ("value_ints", DType.I64)):  # fmt: skip
        if key in at:
            return known(np.asarray(at[key]), dt)
    raise IRError(f"Constant with {sorted(at)} is not supported")


def _shape(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    shape = list(em.shape(ins[0]))
    r = range(len(shape))[slice(at.get("start", 0), at.get("end"))]
    return known(np.array([shape[i] for i in r], dtype=object), DType.I64)


def _size(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    n, syms = _numel(em.shape(ins[0]))
    if syms and (n != 1 or len(syms) > 1):
        raise IRError(f"Size of shape {list(em.shape(ins[0]))} is not a single dim")
    return known(np.array(syms[0] if syms else n, dtype=object), DType.I64)


def _scatter_nd(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    """A write of whole slices along axis 0 (indices [n, 1]) is an INDEX_COPY."""
    data, indices, updates = (em.tensor(v) for v in ins)
    if at.get("reduction", b"none") not in (b"none", "none"):
        raise IRError(f"ScatterND with reduction {at['reduction']!r}")
    ishape = em.shape(indices)
    if len(ishape) != 2 or ishape[1] != 1:
        raise IRError(
            f"ScatterND with indices {list(ishape)}: only whole-slice writes [n, 1] are supported"
        )
    index = em.reshape(em.cast(indices, DType.I64), (ishape[0],))
    return em.index_copy(data, index, updates, 0)


def _scatter_elements(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    """A write whose indices vary only along `axis` (a broadcast 1-d vector) is an INDEX_COPY."""
    if at.get("reduction", b"none") not in (b"none", "none"):
        raise IRError(f"ScatterElements with reduction {at['reduction']!r}")
    data, indices, updates = ins
    rank = len(em.shape(data))
    axis = _axis(at.get("axis", 0), rank)
    if all(isinstance(v, Known) for v in ins):  # shape arithmetic, e.g. a shape with one dim set
        out = data.value.astype(object)
        idx = indices.value.astype(np.int64) % out.shape[axis]
        np.put_along_axis(out, idx, updates.value.astype(object), axis)
        return known(out, data.dtype)
    n = em.shape(indices)[axis]
    if isinstance(indices, Known):
        pick = tuple(slice(None) if i == axis else 0 for i in range(rank))
        line = indices.value[pick]
        line_shape = [len(line) if i == axis else 1 for i in range(rank)]
        if not np.array_equal(
            np.broadcast_to(line.reshape(line_shape), indices.value.shape), indices.value
        ):
            raise IRError("ScatterElements indices vary off the scatter axis")
        index = em.tensor(known(line, DType.I64))
    else:
        node = em.gb.nodes[indices]
        src = node.inputs[0] if node.op is Op.EXPAND else indices
        if any(d != 1 for i, d in enumerate(em.shape(src)) if i != axis):
            raise IRError("ScatterElements indices are not a broadcast 1-d vector along the axis")
        index = em.reshape(em.cast(src, DType.I64), (n,))
    return em.index_copy(em.tensor(data), index, em.tensor(updates), axis)


def _cast_rule(em: Emitter, ins: list[Any], at: dict[str, Any]) -> Value:
    return _cast(em, ins[0], onnx_dtype(at["to"], "Cast"))


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


RULES: dict[str, Rule] = {
    "Add": _binary(Op.ADD, np.add),
    "Sub": _binary(Op.SUB, np.subtract),
    "Mul": _binary(Op.MUL, np.multiply),
    "Div": _binary(Op.DIV, _div),
    "Pow": _binary(Op.POW, np.power),
    "Equal": _binary(Op.EQ, np.equal, DType.BOOL),
    "Less": _binary(Op.LT, np.less, DType.BOOL),
    "LessOrEqual": _binary(Op.LE, np.less_equal, DType.BOOL),
    "Greater": _binary(Op.GT, np.greater, DType.BOOL),
    "GreaterOrEqual": _binary(Op.GE, np.greater_equal, DType.BOOL),
    "And": _binary(Op.AND, np.logical_and, DType.BOOL),
    "Or": _binary(Op.OR, np.logical_or, DType.BOOL),
    "Not": _unary(Op.NOT, np.logical_not),
    "Neg": _unary(Op.NEG, np.negative),
    "Reciprocal": _unary(Op.RECIPROCAL, np.reciprocal),
    "Sqrt": _unary(Op.SQRT, np.sqrt),
    "Exp": _unary(Op.EXP, np.exp),
    "Sin": _unary(Op.SIN, np.sin),
    "Cos": _unary(Op.COS, np.cos),
    "Sigmoid": _unary(Op.SIGMOID, _sigmoid),
    "Where": _where,
    "MatMul": _matmul,
    "Gemm": _gemm,
    "Gather": _gather,
    "ReduceMean": _reduce(Op.MEAN),
    "ReduceSum": _reduce(Op.SUM),
    "ReduceMax": _reduce(Op.MAX),
    "ArgMax": _argmax,
    "Softmax": _softmax,
    "RMSNormalization": _rms_norm,
    "Transpose": _transpose,
    "Reshape": _reshape,
    "Unsqueeze": _unsqueeze,
    "Squeeze": _squeeze,
    "Flatten": _flatten,
    "Expand": _expand,
    "Concat": _concat,
    "Slice": _slice,
    "Cast": _cast_rule,
    "CastLike": lambda em, ins, at: _cast(em, ins[0], em.dtype(ins[1])),
    "Identity": lambda em, ins, at: ins[0],
    "Range": _range,
    "ConstantOfShape": _constant_of_shape,
    "Constant": _constant,
    "Shape": _shape,
    "Size": _size,
    "ScatterND": _scatter_nd,
    "ScatterElements": _scatter_elements,
}
