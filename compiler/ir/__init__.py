"""Graph IR: operators, frozen nodes, canonical serialization, well-formedness, evaluation."""

from compiler.ir.evaluate import evaluate
from compiler.ir.graph import Dim, Graph, GraphBuilder, IRError, Node, Shape
from compiler.ir.ops import DType, Op
from compiler.ir.well_formed import well_formed

__all__ = [
    "DType",
    "Dim",
    "Graph",
    "GraphBuilder",
    "IRError",
    "Node",
    "Op",
    "Shape",
    "evaluate",
    "well_formed",
]
