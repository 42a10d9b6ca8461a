"""well_formed: a valid graph passes; each broken invariant is named."""

import dataclasses

import pytest

from compiler.ir import DType, Graph, GraphBuilder, IRError, Node, Op, well_formed
from tests.test_ir_graph import rmsnorm_graph


def replace_node(g: Graph, i: int, **changes) -> Graph:
    nodes = list(g.nodes)
    nodes[i] = dataclasses.replace(nodes[i], **changes)
    return Graph(tuple(nodes), g.outputs, g.symbols)


def test_valid_graph_passes():
    well_formed(rmsnorm_graph())


@pytest.mark.parametrize(
    ("index", "changes", "message"),
    [
        (2, {"shape": ("B", 9)}, "recorded shape"),
        (2, {"inputs": (0,)}, "takes 2 inputs"),
        (2, {"inputs": (0, 5)}, "not an earlier node"),
        (0, {"shape": ("T", 8)}, "unknown symbol"),
        (3, {"attrs": (("axes", (5,)), ("keepdim", True))}, "axis 5 out of range"),
        (1, {"name": "x", "op": Op.INPUT}, "unique"),
        (4, {"attrs": (("value", (1.0, 2.0)),)}, "2 values for shape"),
    ],
)
def test_broken_invariants_are_named(index, changes, message):
    with pytest.raises(IRError, match=message):
        well_formed(replace_node(rmsnorm_graph(), index, **changes))


def small(op: Op, shapes, out_shape, dtype=DType.F32, in_dtypes=None, **attrs) -> Graph:
    gb = GraphBuilder()
    ins = [
        gb.add(Op.INPUT, (), s, (in_dtypes or [DType.F32] * len(shapes))[i], name=f"x{i}")
        for i, s in enumerate(shapes)
    ]
    gb.output("y", gb.add(op, ins, out_shape, dtype, **attrs))
    return gb.build()


@pytest.mark.parametrize(
    ("graph", "message"),
    [
        (small(Op.ADD, [(3, 4), (5, 4)], (3, 4)), "do not broadcast"),
        (small(Op.ADD, [("B", 4), ("S", 4)], ("B", 4)), "do not broadcast"),
        (small(Op.MATMUL, [(3, 4), (5, 6)], (3, 6)), "inner dims"),
        (small(Op.RESHAPE, [(3, 4)], (5, 2)), "element count"),
        (small(Op.WHERE, [(3,), (3,), (3,)], (3,)), "condition must be bool"),
        (small(Op.LT, [(3,), (3,)], (3,)), "must produce bool"),
        (small(Op.TRANSPOSE, [(3, 4)], (4, 3), perm=[0, 0]), "not a permutation"),
        (small(Op.SLICE, [("S", 4)], (2, 4), axis=0, start=0, stop=2, step=1), "symbolic dim"),
        (small(Op.GATHER, [(3, 4), (2,)], (2, 4), axis=0), "indices must be integers"),
        (
            small(
                Op.INDEX_COPY,
                [(2, 8), (1,), (2, 1)],
                (2, 8),
                in_dtypes=[DType.F32, DType.I64, DType.F32],
                axis=0,
            ),
            "does not fit",
        ),
    ],
)
def test_shape_and_dtype_rules(graph, message):
    with pytest.raises(IRError, match=message):
        well_formed(graph)


def test_symbolic_shapes_are_accepted_where_they_are_sound():
    well_formed(small(Op.ADD, [("B", 1, "S"), (1, 4, 1)], ("B", 4, "S")))
    well_formed(small(Op.RESHAPE, [("B", 4, "S")], ("B", 2, 2, "S")))
    well_formed(small(Op.MATMUL, [("B", 2, 3), (3, "S")], ("B", 2, "S")))


def test_dead_nodes_and_bad_outputs_are_refused():
    gb = GraphBuilder()
    x = gb.add(Op.INPUT, (), (2,), DType.F32, name="x")
    gb.add(Op.EXP, (x,), (2,), DType.F32)
    gb.output("y", x)
    with pytest.raises(IRError, match="not used by any output"):
        well_formed(gb.build())
    g = Graph((Node(Op.INPUT, (), (2,), DType.F32, name="x"),), (("y", 0), ("y", 0)))
    with pytest.raises(IRError, match="duplicated"):
        well_formed(g)
