"""Frontend (b): an ONNX model -> IR graph, plus the parameter values the model carries.

The import is one walk over the ONNX nodes in order. Every ONNX value becomes either an IR node
or a `Known`: a small numpy array computed at import time. Shape computations (Shape -> Gather
-> Concat -> Reshape, Range bounds, Slice starts, Cast of constants) fold into Knowns, so the IR
holds only tensor compute. A Known shape vector may hold symbols (`Shape(k_cache)` is
["B", 2, "S", 64]); such vectors can be gathered, sliced, concatenated, reshaped and cast, and
become IR shapes, but arithmetic on a symbol beyond the identities (x*1, x+0, x-0, x/1) is
refused: bind that dim with `dims` instead.

Dims: each `dim_param` of a graph input becomes an IR symbol of the same name, unless `dims`
maps it to an int (bound: the graph is specialized to that size) or to another name (renamed:
`{"batch": "B", "seq": "S"}`). Inputs and outputs keep their ONNX names unless `rename` maps
them; ONNX values are single-assignment, so an updated KV cache cannot share its input's name
in ONNX, and `{"present.k.0": "k_cache.0"}` restores the IR convention. (torch.onnx does write
such models when told to: a later node's output then shadows the input, as in the exporter.)

Weights: an initializer that `weight_names` maps to a name is a WEIGHT of that name; the default,
`hf_weight_name`, turns module paths such as `ref.model.layers.0.mlp.up_proj.weight` into HF
names. Other initializers and Constant nodes are Knowns (CONST nodes where tensor compute reads
them) up to CONST_LIMIT elements, and WEIGHTs under their ONNX names beyond that.

Export with `torch.onnx.export(..., dynamo=True, optimize=False)`: the default optimizer folds
`Transpose(weight)` into new initializers named `val_57` and merges initializers with equal
contents (every RMSNorm weight starts as ones), so parameters lose their names.

A few local rewrites keep the IR close to the torch frontend's: identity Reshape/Expand/Cast/
Transpose are dropped, Transpose of Transpose and Reshape of Reshape compose, and a slice write
(ScatterND on a transposed cache, or ScatterElements with broadcast indices) becomes INDEX_COPY
on the untransposed tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np
import onnx
import onnx.inliner
from onnx import helper, numpy_helper

from compiler.frontend.onnx_rules import CONST_LIMIT, RULES, Emitter, Value, known, onnx_dtype
from compiler.ir.graph import Dim, Graph, IRError, Shape
from compiler.ir.ops import DType, Op
from compiler.ir.well_formed import well_formed


def hf_weight_name(onnx_name: str) -> str | None:
    """HF name of an exported parameter: its path from the first `model` or `lm_head` part on.

    `ref.model.layers.0.self_attn.q_proj.weight` -> `model.layers.0.self_attn.q_proj.weight`;
    names that do not end in `.weight` or `.bias` (buffers such as `ref.inv_freq`) give None.
    """
    parts = onnx_name.split(".")
    if parts[-1] not in ("weight", "bias"):
        return None
    for i, p in enumerate(parts[:-1]):
        if p in ("model", "lm_head"):
            return ".".join(parts[i:])
    return None


def graph_from_onnx(
    model: str | Path | onnx.ModelProto,
    dims: Mapping[str, int | str] | None = None,
    weight_names: Callable[[str], str | None] | None = None,
    rename: Mapping[str, str] | None = None,
) -> tuple[Graph, dict[str, np.ndarray]]:
    """Convert an ONNX model to a weight-free IR graph and its parameter values.

    Args:
        model: a path (external data is loaded from beside it) or a loaded ModelProto.
        dims: per ONNX `dim_param`: an int binds it, a str renames the IR symbol.
        weight_names: initializer name -> WEIGHT name, or None for a non-parameter;
            `hf_weight_name` by default.
        rename: ONNX graph input/output name -> IR input/output name.

    Returns:
        The pruned, well-formed graph, and the value of each of its WEIGHT nodes by name.

    Raises:
        IRError: one line naming the ONNX node that could not be converted.
    """
    proto = onnx.load(str(model)) if isinstance(model, str | Path) else model
    if proto.functions:
        proto = onnx.inliner.inline_local_functions(proto)
    opset = next((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), 0)
    imp = _Importer(opset, dict(dims or {}), weight_names or hf_weight_name, dict(rename or {}))
    return imp.run(proto.graph)


class _Importer(Emitter):
    """The walk: graph inputs and initializers, then each node through its rule, then outputs."""

    def __init__(
        self,
        opset: int,
        dims: dict[str, int | str],
        weight_names: Callable[[str], str | None],
        rename: dict[str, str],
    ):
        super().__init__(opset)
        self.dims, self.weight_names, self.rename = dims, weight_names, rename
        self.env: dict[str, Value] = {}  # ONNX value name -> value
        self.params: dict[str, np.ndarray] = {}  # WEIGHT name -> value
        self.symbols: list[str] = []  # IR symbols, in order of first appearance
        self.input_dims: set[str] = set()  # dim_params seen on graph inputs

    def dim(self, d: onnx.TensorShapeProto.Dimension, what: str) -> Dim:
        """An input dim: its size, or its dim_param as bound or renamed by `dims`."""
        if d.HasField("dim_value"):
            return int(d.dim_value)
        if not d.dim_param:
            raise IRError(f"{what} has a dynamic dim without a name; name it or bind it with dims=")
        self.input_dims.add(d.dim_param)
        out = self.dims.get(d.dim_param, d.dim_param)
        if isinstance(out, str) and out not in self.symbols:
            self.symbols.append(out)
        return out

    def initializer(self, t: onnx.TensorProto) -> Value:
        value = numpy_helper.to_array(t)
        dt = onnx_dtype(t.data_type, f"initializer {t.name!r}")
        name = self.weight_names(t.name)
        if name is None and value.size <= CONST_LIMIT:
            return known(value, dt)
        name = name or t.name
        if name in self.params and not np.array_equal(self.params[name], value):
            raise IRError(f"initializers map to one weight {name!r} but differ")
        self.params[name] = value
        return self.gb.add(Op.WEIGHT, (), value.shape, dt, name=name)

    def graph_input(self, v: onnx.ValueInfoProto) -> int:
        t = v.type.tensor_type
        if not v.type.HasField("tensor_type") or not t.HasField("shape"):
            raise IRError(f"graph input {v.name!r} is not a tensor of known rank")
        shape = tuple(self.dim(d, f"input {v.name!r}") for d in t.shape.dim)
        dt = onnx_dtype(t.elem_type, f"input {v.name!r}")
        return self.gb.add(Op.INPUT, (), shape, dt, name=self.rename.get(v.name, v.name))

    def run(self, graph: onnx.GraphProto) -> tuple[Graph, dict[str, np.ndarray]]:
        if graph.sparse_initializer:
            raise IRError("sparse initializers are not supported")
        for t in graph.initializer:
            self.env[t.name] = self.initializer(t)
        for v in graph.input:
            if v.name not in self.env:  # old exporters list initializers as inputs too
                self.env[v.name] = self.graph_input(v)
        for node in graph.node:
            key = (
                node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}.{node.op_type}"
            )
            name = node.name or (node.output[0] if node.output else "")
            if key not in RULES:
                raise IRError(f"unsupported ONNX operator {key!r} at node {name!r}")
            try:
                ins = [self.env[n] if n else None for n in node.input]
                attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
                out = RULES[key](self, ins, attrs)
            except KeyError as e:
                raise IRError(f"ONNX node {name!r} ({key}): undefined input {e}") from None
            except (ValueError, TypeError, IndexError) as e:  # IRError is a ValueError
                raise IRError(f"ONNX node {name!r} ({key}): {e}") from None
            for value, v in zip(node.output, out if isinstance(out, list) else [out], strict=False):
                if value:  # the last writer of a name wins: exporters may reuse an input's name
                    self.env[value] = v
        for v in graph.output:
            node = self.tensor(self.env[v.name])
            self.check_output(v, self.gb.nodes[node].shape, self.gb.nodes[node].dtype)
            self.gb.output(self.rename.get(v.name, v.name), node)
        g = self.gb.build(self.symbols).pruned()
        well_formed(g)
        return g, {n.name: self.params[n.name] for n in g.nodes if n.op is Op.WEIGHT}

    def check_output(self, v: onnx.ValueInfoProto, shape: Shape, dtype: DType) -> None:
        """The declared output type must be the converted one, where it speaks of input dims."""
        t = v.type.tensor_type
        if t.elem_type and onnx_dtype(t.elem_type, f"output {v.name!r}") is not dtype:
            raise IRError(f"output {v.name!r} is declared {t.elem_type}, converted {dtype.value}")
        if not t.HasField("shape"):
            return
        dims = t.shape.dim
        ok = len(dims) == len(shape) and all(
            (d.dim_value == s) if d.HasField("dim_value")
            else (d.dim_param not in self.input_dims or self.dims.get(d.dim_param, d.dim_param) == s)
            for d, s in zip(dims, shape, strict=False)
        )  # fmt: skip
        if not ok:
            declared = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in dims]
            raise IRError(f"output {v.name!r} is declared {declared}, converted {list(shape)}")
