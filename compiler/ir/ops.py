"""The graph IR's operators and element types.

Semantics are numpy's, evaluated over float64 (see `compiler.ir.evaluate`). Shapes are tuples of
ints and symbols ("B" for batch, "S" for KV-cache capacity); a node's recorded shape is its
output shape, so shape-changing ops (RESHAPE, EXPAND, ARANGE) need no shape attribute.
"""

from __future__ import annotations

import enum


class DType(enum.Enum):
    """Element types. Floating types are storage types: evaluation is float64 throughout."""

    F64 = "f64"
    F32 = "f32"
    BF16 = "bf16"
    F16 = "f16"
    I64 = "i64"
    I32 = "i32"
    BOOL = "bool"

    @property
    def is_float(self) -> bool:
        return self in (DType.F64, DType.F32, DType.BF16, DType.F16)

    @property
    def is_int(self) -> bool:
        return self in (DType.I64, DType.I32)


class Op(enum.Enum):
    """Operators. The comment gives inputs -> output and the attributes."""

    # Leaves.
    INPUT = "input"  # () -> runtime input; name
    WEIGHT = "weight"  # () -> model parameter; name (HF tensor name)
    CONST = "const"  # () -> literal; value (flat list, row-major)

    # Elementwise, numpy broadcasting.
    ADD = "add"
    SUB = "sub"
    MUL = "mul"
    DIV = "div"
    POW = "pow"
    NEG = "neg"
    RECIPROCAL = "reciprocal"
    SQRT = "sqrt"
    RSQRT = "rsqrt"
    EXP = "exp"
    SIN = "sin"
    COS = "cos"
    SIGMOID = "sigmoid"
    SILU = "silu"  # x * sigmoid(x)
    EQ = "eq"
    LT = "lt"
    LE = "le"
    GT = "gt"
    GE = "ge"
    AND = "and"
    OR = "or"
    NOT = "not"
    WHERE = "where"  # (cond, a, b)
    CAST = "cast"  # to the node's dtype

    # Reductions.
    SUM = "sum"  # axes, keepdim
    MEAN = "mean"  # axes, keepdim
    MAX = "max"  # axes, keepdim
    ARGMAX = "argmax"  # axis, keepdim; first maximal index
    SOFTMAX = "softmax"  # axis

    # Linear algebra.
    MATMUL = "matmul"  # numpy matmul, batch dims broadcast

    # Data movement.
    RESHAPE = "reshape"  # to the node's shape
    EXPAND = "expand"  # broadcast to the node's shape
    TRANSPOSE = "transpose"  # perm
    SLICE = "slice"  # axis, start, stop (None = end), step
    CONCAT = "concat"  # axis; any number of inputs
    GATHER = "gather"  # (data, indices), axis: numpy take
    INDEX_COPY = (
        "index_copy"  # (dst, index[n], src), axis: dst with dst[.., index[i], ..] = src[.., i, ..]
    )
    ARANGE = "arange"  # (), start, step; length is the node's shape[0]


LEAVES = frozenset({Op.INPUT, Op.WEIGHT, Op.CONST})
UNARY = frozenset(
    {
        Op.NEG,
        Op.RECIPROCAL,
        Op.SQRT,
        Op.RSQRT,
        Op.EXP,
        Op.SIN,
        Op.COS,
        Op.SIGMOID,
        Op.SILU,
        Op.NOT,
        Op.CAST,
    }
)
BINARY = frozenset(
    {Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.POW, Op.EQ, Op.LT, Op.LE, Op.GT, Op.GE, Op.AND, Op.OR}
)
COMPARISONS = frozenset({Op.EQ, Op.LT, Op.LE, Op.GT, Op.GE, Op.AND, Op.OR, Op.NOT})
REDUCTIONS = frozenset({Op.SUM, Op.MEAN, Op.MAX})
