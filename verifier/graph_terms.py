"""One element of a model-graph node as a term (`verifier.terms`), at a symbolic index.

`GraphTerms(graph, env, cuts, names)` reads the rebuilt model graph by its ops' numpy meaning
(`compiler/ir/ops.py`), over ℝ: a cast is the identity (except on constants, which are rounded
to the cast's type as the device rounds them), `pow(x, 2)` is x·x, `mean` a sum times 1/n,
`silu(x)` is x·sigmoid(x) (a definitional axiom, checked numerically by `verifier.rules`),
rsqrt/sqrt/exp/sin/cos/sigmoid stay uninterpreted. A matmul or a reduction is a `sum` binder.

`cuts` maps nodes to arrays: the value of a cut node is not expanded but read from the array
(a buffer of the fused program that was already proved equal to it), at the element with the
same row-major position. `names` renames weights and graph inputs to the array names the
obligation uses (role names shared by every layer). Ops that are not algebra (softmax, max,
argmax) raise `Unsupported`: their nodes must be cuts.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from fractions import Fraction

import numpy as np

from compiler.ir.graph import Graph, Node
from compiler.ir.ops import DType, Op
from verifier.terms import (
    Aff,
    Ranges,
    Term,
    add,
    app,
    compare,
    const,
    ite,
    mul,
    neg,
    summed,
)

COMPARE = {
    Op.LT: ("<", False),
    Op.LE: ("<=", False),
    Op.EQ: ("=", False),
    Op.GT: ("<", True),
    Op.GE: ("<=", True),
}


class Unsupported(ValueError):
    """A node the algebra does not model."""


ROUND = {DType.F32: np.float32, DType.BF16: None, DType.F16: np.float16, DType.F64: np.float64}


def round_to(x: float, dtype: DType) -> Fraction:
    """x rounded to `dtype` (round to nearest even), exactly."""
    if dtype is DType.BF16:
        bits = np.array([x], dtype=np.float32).view(np.uint32)[0]
        bits = (int(bits) + 0x7FFF + ((int(bits) >> 16) & 1)) >> 16 << 16
        return Fraction(float(np.array([bits], dtype=np.uint32).view(np.float32)[0]))
    kind = ROUND.get(dtype)
    return Fraction(float(kind(x))) if kind is not None else Fraction(x)


def row_major(shape: tuple[int, ...], idx: tuple[Aff, ...]) -> Aff:
    flat = Aff(0)
    for n, i in zip(shape, idx, strict=True):
        flat = flat.scale(n) + i
    return flat


def unflatten(flat: Aff, shape: tuple[int, ...], ranges: Ranges) -> tuple[Aff, ...]:
    out: list[Aff] = []
    for n in reversed(shape[1:]):
        flat, r = flat.divmod(n, ranges)
        out.append(r)
    out.append(flat)
    return tuple(reversed(out))


class GraphTerms:
    def __init__(
        self,
        graph: Graph,
        env: Mapping[str, int],
        cuts: Mapping[int, tuple[str, tuple[int, ...]]],
        names: Mapping[str, str],
        ranges: dict[str, tuple[int, int]],
        tables: dict[str, list[Fraction]],
    ):
        self.g, self.env, self.cuts, self.names = graph, env, cuts, names
        self.ranges, self.tables = ranges, tables  # the obligation's; sums add their variables
        self.fresh = 0

    def shape(self, n: int) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else self.env[d] for d in self.g.nodes[n].shape)

    def var(self, n: int) -> str:
        self.fresh += 1
        name = f"k{self.fresh}"
        self.ranges[name] = (0, n)
        return name

    @contextlib.contextmanager
    def narrowed(self, a: Aff, lo: int, hi: int) -> Iterator[None]:
        """Within a branch taken only when lo <= a < hi: a's variable ranges narrowed (so the
        reshapes under the branch simplify)."""
        if len(a.terms) != 1 or a.terms[0][1] != 1 or not isinstance(a.terms[0][0], str):
            yield
            return
        v = a.terms[0][0]
        if v not in self.ranges:
            yield
            return
        saved = self.ranges[v]
        self.ranges[v] = (max(saved[0], lo - a.const), min(saved[1], hi - a.const))
        try:
            yield
        finally:  # only v's range: the sums made inside keep theirs
            self.ranges[v] = saved

    def value(self, n: int, idx: tuple[Aff, ...]) -> Term:
        """Element idx of node n: a real term (an Aff for integer nodes)."""
        node = self.g.nodes[n]
        if n in self.cuts:
            name, shape = self.cuts[n]
            at = unflatten(row_major(self.shape(n), idx), shape, self.ranges)
            if node.dtype.is_int:
                return Aff.of(("vi", name, at))  # type: ignore[return-value]
            return ("v", name, at)
        return self._op(node, n, idx)

    def real(self, n: int, idx: tuple[Aff, ...]) -> Term:
        v = self.value(n, idx)
        return ("r", v) if isinstance(v, Aff) else v

    def operand(self, n: int, out: tuple[Aff, ...]) -> tuple[Aff, ...]:
        """numpy broadcasting: the index of input n for output index `out`."""
        shape = self.shape(n)
        tail = out[len(out) - len(shape) :] if shape else ()
        return tuple(Aff(0) if d == 1 else i for d, i in zip(shape, tail, strict=True))

    def _op(self, node: Node, n: int, idx: tuple[Aff, ...]) -> Term:
        op, ins = node.op, node.inputs
        if op is Op.INPUT:
            if node.name in self.names:
                name = self.names[node.name]
                if node.dtype.is_int:
                    return Aff.of(name) if not idx else Aff.of(("vi", name, idx))  # type: ignore[return-value]
                return ("v", name, idx)
            raise Unsupported(f"graph input {node.name} is not an input of the instruction")
        if op is Op.WEIGHT:
            return ("v", self.names.get(node.name, "foreign_" + _ident(node.name)), idx)
        if op is Op.CONST:
            return self._const(node, n, idx, node.dtype)
        if op is Op.CAST:
            src = self.g.nodes[ins[0]]
            if src.op is Op.CONST and node.dtype.is_float:
                return self._const(src, ins[0], idx, node.dtype)
            v = self.value(ins[0], idx)
            if node.dtype.is_float and isinstance(v, Aff):
                return ("r", v)
            return v
        if op is Op.ARANGE:
            return Aff(node.attr("start")) + idx[0].scale(node.attr("step"))  # type: ignore[return-value]
        if op in (Op.ADD, Op.SUB, Op.MUL):
            a = self.value(ins[0], self.operand(ins[0], idx))
            b = self.value(ins[1], self.operand(ins[1], idx))
            if isinstance(a, Aff) and isinstance(b, Aff):
                return a + b if op is Op.ADD else a - b if op is Op.SUB else a * b
            a, b = _real(a), _real(b)
            return add(a, b) if op is Op.ADD else add(a, neg(b)) if op is Op.SUB else mul(a, b)
        if op is Op.DIV:
            a = self.real(ins[0], self.operand(ins[0], idx))
            b = self.real(ins[1], self.operand(ins[1], idx))
            if b[0] != "c" or b[1] == 0:
                raise Unsupported("division by a non-constant")
            return mul(a, const(1 / b[1]))
        if op is Op.POW:
            a = self.real(ins[0], self.operand(ins[0], idx))
            e = self.real(ins[1], self.operand(ins[1], idx))
            if e == const(2):
                return mul(a, a)
            if e == const(Fraction(1, 2)):
                return app("sqrt", a)
            raise Unsupported(f"pow with exponent {e}")
        if op is Op.NEG:
            return neg(self.real(ins[0], idx))
        if op in (Op.RSQRT, Op.SQRT, Op.EXP, Op.SIN, Op.COS, Op.SIGMOID):
            return app(op.value, self.real(ins[0], idx))
        if op is Op.SILU:
            x = self.real(ins[0], idx)
            return mul(x, app("sigmoid", x))
        if op is Op.RECIPROCAL:
            src = self.g.nodes[ins[0]]
            if src.op is Op.SQRT:
                return app("rsqrt", self.real(src.inputs[0], idx))
            raise Unsupported("reciprocal of anything but a square root")
        if op in (Op.SUM, Op.MEAN):
            return self._reduce(node, ins[0], idx, op is Op.MEAN)
        if op is Op.MATMUL:
            return self._matmul(ins, idx)
        if op is Op.RESHAPE:
            flat = row_major(self.shape(n), idx)
            return self.value(ins[0], unflatten(flat, self.shape(ins[0]), self.ranges))
        if op is Op.EXPAND:
            return self.value(ins[0], self.operand(ins[0], idx))
        if op is Op.TRANSPOSE:
            perm = node.attr("perm")
            src_idx = [Aff(0)] * len(perm)
            for i, p in enumerate(perm):
                src_idx[p] = idx[i]
            return self.value(ins[0], tuple(src_idx))
        if op is Op.SLICE:
            axis = node.attr("axis") % len(idx)
            size = self.shape(ins[0])[axis]
            start = node.attr("start") or 0
            start = start + size if start < 0 else start
            at = list(idx)
            at[axis] = idx[axis].scale(node.attr("step") or 1) + start
            return self.value(ins[0], tuple(at))
        if op in COMPARE:
            a = self.value(ins[0], self.operand(ins[0], idx))
            b = self.value(ins[1], self.operand(ins[1], idx))
            if not (isinstance(a, Aff) and isinstance(b, Aff)):
                raise Unsupported("comparison of reals")
            rel, swap = COMPARE[op]
            return compare(rel, b, a, self.ranges) if swap else compare(rel, a, b, self.ranges)
        if op is Op.NOT:
            return ("not", self.value(ins[0], self.operand(ins[0], idx)))
        if op in (Op.AND, Op.OR):
            parts = [self.value(i, self.operand(i, idx)) for i in ins]
            return (op.value, *parts)
        if op is Op.CONCAT:
            return self._concat(node, ins, idx)
        if op is Op.GATHER:
            return self._gather(node, ins, idx)
        if op is Op.INDEX_COPY:
            return self._index_copy(node, ins, idx)
        raise Unsupported(f"{op.value} is not algebra")

    def _const(self, node: Node, n: int, idx: tuple[Aff, ...], dtype: DType) -> Term:
        values = node.attr("value")
        if node.dtype.is_int and dtype.is_int:
            if len(values) != 1:
                raise Unsupported("integer constant tables")
            return Aff(int(values[0]))  # type: ignore[return-value]
        if any(isinstance(v, str) or not math.isfinite(v) for v in values):
            raise Unsupported("a non-finite constant")
        # the kernel computes in fp32: a constant means its value at fp32, whatever the
        # graph's storage type (a bf16 1/sqrt(128) is the bf16 graph's rounding, not the model)
        if len(values) == 1:
            return const(round_to(values[0], DType.F32))
        name = f"table{n}"
        self.tables[name] = [round_to(v, DType.F32) for v in values]
        return ("v", name, (row_major(self.shape(n), idx),))

    def _reduce(self, node: Node, src: int, idx: tuple[Aff, ...], mean: bool) -> Term:
        shape = self.shape(src)
        axes = sorted(a % len(shape) for a in node.attr("axes"))
        keep = bool(node.attr("keepdim"))
        at: list[Aff | None] = []
        rest = iter(idx)
        for d in range(len(shape)):
            if d in axes:
                if keep:
                    next(rest)
                at.append(None)
            else:
                at.append(next(rest))
        count = 1
        names = []
        for d in axes:
            k = self.var(shape[d])
            at[d] = Aff.of(k)
            names.append((k, shape[d]))
            count *= shape[d]
        body = self.real(src, tuple(a for a in at if a is not None))
        for k, size in reversed(names):
            body = summed(k, size, body)
        return mul(const(Fraction(1, count)), body) if mean else body

    def _matmul(self, ins: tuple[int, ...], idx: tuple[Aff, ...]) -> Term:
        a_shape, b_shape = self.shape(ins[0]), self.shape(ins[1])
        kdim = a_shape[-1]
        k = self.var(kdim)
        batch = idx[:-2]
        a_idx = (*self._operand_batch(a_shape, batch), idx[-2], Aff.of(k))
        b_idx = (*self._operand_batch(b_shape, batch), Aff.of(k), idx[-1])
        return summed(k, kdim, mul(self.real(ins[0], a_idx), self.real(ins[1], b_idx)))

    @staticmethod
    def _operand_batch(shape: tuple[int, ...], batch: tuple[Aff, ...]) -> tuple[Aff, ...]:
        dims = shape[:-2]
        tail = batch[len(batch) - len(dims) :] if dims else ()
        return tuple(Aff(0) if d == 1 else i for d, i in zip(dims, tail, strict=True))

    def _concat(self, node: Node, ins: tuple[int, ...], idx: tuple[Aff, ...]) -> Term:
        axis = node.attr("axis") % len(idx)
        parts = []
        offset = 0
        for src in ins:
            size = self.shape(src)[axis]
            parts.append((offset, size, src))
            offset += size
        out: Term | None = None
        for lo, size, src in reversed(parts):
            at = list(idx)
            at[axis] = idx[axis] - lo
            with self.narrowed(idx[axis], lo, lo + size):
                here = self.real(src, tuple(at))
            if out is None:
                out = here
            else:
                out = ite(compare("<", idx[axis], Aff(lo + size), self.ranges), here, out)
        assert out is not None
        return out

    def _gather(self, node: Node, ins: tuple[int, ...], idx: tuple[Aff, ...]) -> Term:
        axis = node.attr("axis") % len(self.shape(ins[0]))
        ishape = self.shape(ins[1])
        where = self.value(ins[1], idx[axis : axis + len(ishape)])
        if not isinstance(where, Aff):
            raise Unsupported("gather with real indices")
        at = (*idx[:axis], where, *idx[axis + len(ishape) :])
        return self.value(ins[0], at)

    def _index_copy(self, node: Node, ins: tuple[int, ...], idx: tuple[Aff, ...]) -> Term:
        axis = node.attr("axis") % len(idx)
        (count,) = self.shape(ins[1])
        out = self.real(ins[0], idx)
        for i in range(count):  # a later index wins, as numpy's assignment does
            where = self.value(ins[1], (Aff(i),))
            if not isinstance(where, Aff):
                raise Unsupported("index_copy with real indices")
            at = list(idx)
            at[axis] = Aff(i)
            out = ite(
                compare("=", idx[axis], where, self.ranges), self.real(ins[2], tuple(at)), out
            )
        return out


def _real(v: Term | Aff) -> Term:
    return ("r", v) if isinstance(v, Aff) else v


def _ident(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)
