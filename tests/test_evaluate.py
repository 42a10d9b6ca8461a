"""The float64 graph evaluator, on structured inputs first, then seeded random ones."""

import numpy as np
import pytest

from compiler.ir import DType, GraphBuilder, IRError, Op, evaluate
from tests.test_ir_graph import rmsnorm_graph


def test_rmsnorm_on_ones_and_arange():
    g = rmsnorm_graph(eps=0.0, hidden=4)
    out = evaluate(g, {"x": np.ones((2, 4))}, {"norm.weight": np.arange(4.0)})["y"]
    np.testing.assert_allclose(out, np.tile(np.arange(4.0), (2, 1)))
    x = np.arange(8.0).reshape(2, 4)
    out = evaluate(g, {"x": x}, {"norm.weight": np.ones(4)})["y"]
    np.testing.assert_allclose(out, x / np.sqrt((x**2).mean(-1, keepdims=True)))


def test_rmsnorm_random_matches_numpy():
    rng = np.random.default_rng(0)
    x, w = rng.normal(size=(3, 8)), rng.normal(size=8)
    out = evaluate(rmsnorm_graph(), {"x": x}, {"norm.weight": w})["y"]
    np.testing.assert_allclose(
        out, x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-5) * w, rtol=1e-14
    )


def test_symbols_bind_consistently():
    g = rmsnorm_graph(hidden=4)
    with pytest.raises(IRError, match="expected shape"):
        evaluate(g, {"x": np.ones((2, 5))}, {"norm.weight": np.ones(4)})
    with pytest.raises(IRError, match="missing input 'x'"):
        evaluate(g, {}, {"norm.weight": np.ones(4)})


def test_masked_softmax_index_copy_gather_argmax():
    gb = GraphBuilder()
    cache = gb.add(Op.INPUT, (), (1, "S", 2), DType.BF16, name="cache")
    pos = gb.add(Op.INPUT, (), (1,), DType.I64, name="pos")
    new = gb.add(Op.INPUT, (), (1, 1, 2), DType.BF16, name="new")
    written = gb.add(Op.INDEX_COPY, (cache, pos, new), (1, "S", 2), DType.BF16, axis=1)
    keys = gb.add(Op.ARANGE, (), ("S",), DType.I64, start=0, step=1)
    mask = gb.add(Op.LE, (keys, pos), ("S",), DType.BOOL)
    scores = gb.add(Op.SUM, (written,), (1, "S"), DType.F32, axes=[-1], keepdim=False)
    masked = gb.add(
        Op.WHERE, (mask, scores, gb.const(float("-inf"), (), DType.F32)), (1, "S"), DType.F32
    )
    probs = gb.add(Op.SOFTMAX, (masked,), (1, "S"), DType.F32, axis=-1)
    table = gb.add(Op.WEIGHT, (), (5, 3), DType.BF16, name="table")
    gb.output("cache", written)
    gb.output("probs", probs)
    gb.output("argmax", gb.add(Op.ARGMAX, (probs,), (1,), DType.I64, axis=-1, keepdim=False))
    gb.output("rows", gb.add(Op.GATHER, (table, pos), (1, 3), DType.BF16, axis=0))
    out = evaluate(
        gb.build(),
        {"cache": np.zeros((1, 4, 2)), "pos": np.array([2]), "new": np.full((1, 1, 2), 1.0)},
        {"table": np.arange(15.0).reshape(5, 3)},
    )
    np.testing.assert_array_equal(out["cache"][0, :, 0], [0, 0, 1, 0])
    e = np.exp(1.0)
    np.testing.assert_allclose(
        out["probs"][0], [1 / (2 + e**2), 1 / (2 + e**2), e**2 / (2 + e**2), 0]
    )
    assert out["argmax"].tolist() == [2]
    np.testing.assert_array_equal(out["rows"], [[6.0, 7.0, 8.0]])


def test_casts_to_int_are_real_and_float_casts_are_identity():
    gb = GraphBuilder()
    x = gb.add(Op.INPUT, (), (3,), DType.F32, name="x")
    gb.output("bf", gb.add(Op.CAST, (x,), (3,), DType.BF16))
    gb.output("i", gb.add(Op.CAST, (x,), (3,), DType.I64))
    out = evaluate(gb.build(), {"x": np.array([1.25, -2.75, 3.0])}, {})
    np.testing.assert_array_equal(out["bf"], [1.25, -2.75, 3.0])
    np.testing.assert_array_equal(out["i"], [1, -2, 3])
