"""Graph IR: builder, canonical serialization, digest, pruning."""

import json
import math

import pytest

from compiler.ir import DType, Graph, GraphBuilder, IRError, Op


def rmsnorm_graph(eps: float = 1e-5, hidden: int = 8) -> Graph:
    """y = x * rsqrt(mean(x^2) + eps) * w over a [B, hidden] input."""
    gb = GraphBuilder()
    x = gb.add(Op.INPUT, (), ("B", hidden), DType.BF16, name="x")
    w = gb.add(Op.WEIGHT, (), (hidden,), DType.BF16, name="norm.weight")
    sq = gb.add(Op.MUL, (x, x), ("B", hidden), DType.BF16)
    ms = gb.add(Op.MEAN, (sq,), ("B", 1), DType.BF16, axes=[-1], keepdim=True)
    e = gb.const(eps, (), DType.F32)
    r = gb.add(Op.RSQRT, (gb.add(Op.ADD, (ms, e), ("B", 1), DType.BF16),), ("B", 1), DType.BF16)
    y = gb.add(
        Op.MUL, (gb.add(Op.MUL, (x, r), ("B", hidden), DType.BF16), w), ("B", hidden), DType.BF16
    )
    gb.output("y", y)
    return gb.build()


def test_builder_hash_conses_identical_nodes():
    gb = GraphBuilder()
    a = gb.add(Op.INPUT, (), (4,), DType.F32, name="a")
    assert gb.add(Op.NEG, (a,), (4,), DType.F32) == gb.add(Op.NEG, (a,), (4,), DType.F32)
    assert gb.const(2.0, (), DType.F32) == gb.const(2.0, (), DType.F32)
    assert gb.const(2.0, (), DType.F32) != gb.const(3.0, (), DType.F32)
    assert len(gb.nodes) == 4


def test_builder_refuses_forward_reference():
    gb = GraphBuilder()
    with pytest.raises(IRError, match="does not exist"):
        gb.add(Op.NEG, (3,), (4,), DType.F32)


def test_json_round_trip_is_exact():
    g = rmsnorm_graph()
    back = Graph.loads(g.dumps())
    assert back == g
    assert back.digest() == g.digest()
    assert Graph.from_json(json.loads(g.canonical())) == g


def test_canonical_form_is_strict_json_with_non_finite_constants():
    gb = GraphBuilder()
    x = gb.add(Op.INPUT, (), (2,), DType.F32, name="x")
    c = gb.const([-math.inf, math.inf], (2,), DType.F32)
    gb.output("y", gb.add(Op.ADD, (x, c), (2,), DType.F32))
    g = gb.build()

    def refuse(name: str) -> None:
        raise AssertionError(f"non-standard JSON constant {name}")

    json.loads(g.canonical(), parse_constant=refuse)
    back = Graph.loads(g.dumps())
    assert back.nodes[1].attr("value") == (-math.inf, math.inf)
    assert back == g


def test_digest_is_stable_and_sensitive_to_every_part():
    base = rmsnorm_graph().digest()
    assert rmsnorm_graph().digest() == base
    assert rmsnorm_graph(eps=1e-6).digest() != base  # a constant
    assert rmsnorm_graph(hidden=16).digest() != base  # a shape
    g = rmsnorm_graph()
    renamed = Graph(g.nodes, (("z", g.outputs[0][1]),), g.symbols)
    assert renamed.digest() != base  # an output name
    n = g.nodes[2]
    other_dtype = Graph(
        (*g.nodes[:2], type(n)(n.op, n.inputs, n.shape, DType.F32), *g.nodes[3:]), g.outputs
    )
    assert other_dtype.digest() != base  # a dtype


def test_pruned_drops_dead_nodes_and_renumbers():
    gb = GraphBuilder()
    x = gb.add(Op.INPUT, (), (2,), DType.F32, name="x")
    gb.add(Op.EXP, (x,), (2,), DType.F32)  # dead
    y = gb.add(Op.NEG, (x,), (2,), DType.F32)
    gb.output("y", y)
    g = gb.build().pruned()
    assert [n.op for n in g.nodes] == [Op.INPUT, Op.NEG]
    assert g.nodes[1].inputs == (0,)
    assert g.outputs == (("y", 1),)


@pytest.mark.parametrize(
    "text", ["not json", '{"ir_version": 99}', '{"ir_version": 1, "nodes": [{"op": "nope"}]}']
)
def test_loads_rejects_bad_files(text):
    with pytest.raises(IRError):
        Graph.loads(text)
