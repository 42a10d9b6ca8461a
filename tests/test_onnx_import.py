"""ONNX frontend: the exported decode step imports to a graph that computes the reference model,
symbolically in B and S; shape arithmetic folds away; tricky operators match numpy; refusals are
one line.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch.export import Dim

from compiler.frontend.onnx_import import graph_from_onnx, hf_weight_name
from compiler.frontend.synthetic import synthetic_state_dict
from compiler.frontend.torch_export import graph_from_spec
from compiler.ir import Graph, IRError, Op, evaluate, well_formed
from compiler.reference import DecodeStep, Reference
from compiler.spec import ModelSpec

TINY = ModelSpec(
    name="tiny", arch="llama", hidden_size=128, intermediate_size=256, num_layers=2,
    num_heads=4, num_kv_heads=2, head_dim=64, vocab_size=256, rms_norm_eps=1e-5,
    rope_theta=10000.0, max_position_embeddings=256,
)  # fmt: skip
MISTRAL = dataclasses.replace(TINY, name="tiny-mistral", arch="mistral", sliding_window=8)
INT64_MAX, INT64_MIN = 2**63 - 1, -(2**63)


# -- the exported decode step ----------------------------------------------------------------


def _cache_names(spec: ModelSpec) -> list[str]:
    return [f"{kv}_cache.{i}" for i in range(spec.num_layers) for kv in "kv"]


def _reference(spec: ModelSpec) -> Reference:
    ref = Reference(spec, max_seq=16)  # float64 on the CPU
    ref.load_state_dict(synthetic_state_dict(spec, seed=0, dtype=torch.float64), strict=True)
    return ref.requires_grad_(False).eval()


def _export(spec: ModelSpec, path: Path) -> Path:
    """torch.onnx.export (dynamo) of the float64 decode step, dynamic in batch B and capacity S.

    optimize=False: the exporter's optimizer renames and merges weights (see onnx_import).
    Updated caches get their own names (`new.k_cache.0`): ONNX values are single-assignment.
    """
    pytest.importorskip("onnxscript")
    names = _cache_names(spec)
    caches = [
        torch.zeros(2, spec.num_kv_heads, 16, spec.head_dim, dtype=torch.float64) for _ in names
    ]
    b, s = Dim("B"), Dim("S")
    with warnings.catch_warnings():  # the exporter's own deprecation and axis-naming notes
        warnings.simplefilter("ignore", (UserWarning, FutureWarning))
        torch.onnx.export(
            DecodeStep(_reference(spec)).eval(),
            (torch.zeros(2, dtype=torch.int64), torch.tensor(3), *caches),
            path,
            dynamo=True,
            optimize=False,
            verbose=False,
            input_names=["token", "pos", *names],
            output_names=["next_token", "logits", *[f"new.{n}" for n in names]],
            dynamic_shapes=({0: b}, None, tuple({0: b, 2: s} for _ in names)),
        )
    return path


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("onnx")
    return {spec.name: _export(spec, tmp / f"{spec.name}.onnx") for spec in (TINY, MISTRAL)}


def _import(path: Path, spec: ModelSpec, **kw: Any) -> tuple[Graph, dict[str, np.ndarray]]:
    return graph_from_onnx(path, rename={f"new.{n}": n for n in _cache_names(spec)}, **kw)


def _inputs(
    spec: ModelSpec, batch: int, max_seq: int, pos: int, seed: int
) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    shape = (batch, spec.num_kv_heads, max_seq, spec.head_dim)
    inputs = {
        "token": torch.randint(0, spec.vocab_size, (batch,), generator=gen),
        "pos": torch.tensor(pos),
    }
    for name in _cache_names(spec):
        inputs[name] = torch.randn(shape, generator=gen, dtype=torch.float64)
    return inputs


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _agrees(
    got: dict[str, np.ndarray],
    want: dict[str, np.ndarray],
    inputs: dict[str, torch.Tensor],
    pos: int,
) -> None:
    """Same next token, logits to 1e-10 relative, caches unchanged but for slot `pos`."""
    assert got["next_token"].tolist() == want["next_token"].tolist()
    assert _rel(got["logits"], want["logits"]) < 1e-10
    for name in (n for n in inputs if "_cache." in n):
        new, old = got[name], inputs[name].numpy()
        assert np.array_equal(np.delete(new, pos, axis=2), np.delete(old, pos, axis=2))
        assert _rel(new[:, :, pos], want[name][:, :, pos]) < 1e-10


def _run_reference(ref: Reference, inputs: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    with torch.no_grad():
        out = DecodeStep(ref)(*inputs.values())
    names = ["next_token", "logits", *_cache_names(ref.spec)]
    return dict(zip(names, (t.numpy() for t in out), strict=True))


@pytest.mark.parametrize(
    ("spec", "batch", "max_seq", "pos"),
    [(TINY, 2, 16, 5), (MISTRAL, 1, 20, 11), (MISTRAL, 3, 20, 13)],  # mistral: pos > window 8
    ids=["llama-b2", "mistral-b1", "mistral-b3"],
)
def test_decode_step_matches_torch_frontend_and_reference(
    exported: dict[str, Path], spec: ModelSpec, batch: int, max_seq: int, pos: int
) -> None:
    graph, _ = _import(exported[spec.name], spec)
    well_formed(graph)
    ref = _reference(spec)
    weights = dict(ref.state_dict())
    inputs = _inputs(spec, batch, max_seq, pos, seed=batch + pos)
    got = evaluate(graph, inputs, weights)
    # The exporter stores rms_norm_eps as a float32 constant (1e-5 -> 9.99999974e-06), so the
    # ONNX graph is not bit-identical to the torch frontend's: they agree to ~1e-12.
    _agrees(got, evaluate(graph_from_spec(spec, dtype=torch.float64), inputs, weights), inputs, pos)
    _agrees(got, _run_reference(ref, inputs), inputs, pos)


def test_legacy_torchscript_export_imports_too(tmp_path: Path) -> None:
    """dynamo=False writes Shape/Gather/ScatterElements shape arithmetic, a ScatterElements cache
    write and pre-transposed weights under generated names (WEIGHTs named `onnx::MatMul_..`)."""
    names, ref = _cache_names(MISTRAL), _reference(MISTRAL)
    caches = [torch.zeros(2, 2, 16, 64, dtype=torch.float64) for _ in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            DecodeStep(ref).eval(),
            (torch.zeros(2, dtype=torch.int64), torch.tensor(3), *caches),
            tmp_path / "legacy.onnx",
            dynamo=False,
            input_names=["token", "pos", *names],
            output_names=["next_token", "logits", *[f"new.{n}" for n in names]],
            dynamic_axes={"token": {0: "B"}} | {n: {0: "B", 2: "S"} for n in names},
        )
    graph, params = _import(tmp_path / "legacy.onnx", MISTRAL)
    assert graph.symbols == ("B", "S") and any(n.startswith("onnx::") for n in params)
    cache_inputs = graph.named(Op.INPUT)
    for name in names:
        n = graph.nodes[graph.output(name)]
        assert (n.op, n.attr("axis"), n.inputs[0]) == (Op.INDEX_COPY, 2, cache_inputs[name])
    inputs = _inputs(MISTRAL, 3, 20, 13, seed=4)
    _agrees(evaluate(graph, inputs, params), _run_reference(ref, inputs), inputs, 13)


def test_weights_carry_hf_names_and_values(exported: dict[str, Path]) -> None:
    graph, params = _import(exported[TINY.name], TINY)
    sd = synthetic_state_dict(TINY, seed=0, dtype=torch.float64)
    assert set(params) == set(sd) == set(graph.named(Op.WEIGHT))
    assert all(np.array_equal(params[n], sd[n].numpy()) for n in sd)


def test_shape_arithmetic_folds_and_cache_writes_are_index_copies(
    exported: dict[str, Path],
) -> None:
    graph, _ = _import(exported[MISTRAL.name], MISTRAL)
    inputs = graph.named(Op.INPUT)
    assert graph.symbols == ("B", "S")
    assert graph.nodes[inputs["k_cache.1"]].shape == ("B", 2, "S", 64)
    for name in _cache_names(MISTRAL):  # ScatterND on a transposed cache -> index_copy on axis 2
        n = graph.nodes[graph.output(name)]
        assert (n.op, n.attr("axis"), n.inputs[0]) == (Op.INDEX_COPY, 2, inputs[name])
    # No Shape/Gather/Concat chains survive: the data-movement ops are the model's own.
    ops = (Op.CONCAT, Op.GATHER, Op.EXPAND, Op.SLICE, Op.WHERE, Op.MATMUL, Op.SOFTMAX, Op.ARGMAX)
    count = Counter(n.op for n in graph.nodes)
    want = Counter(n.op for n in graph_from_spec(MISTRAL, dtype=torch.float64).nodes)
    assert {op: count[op] for op in ops} == {op: want[op] for op in ops}


def test_dims_bind_or_rename_symbols(exported: dict[str, Path]) -> None:
    path = exported[TINY.name]
    symbolic, _ = _import(path, TINY)
    bound, _ = _import(path, TINY, dims={"B": 2, "S": 16})
    renamed, _ = _import(path, TINY, dims={"B": "batch"})
    assert bound.symbols == () and renamed.symbols == ("batch", "S")
    assert bound.nodes[bound.named(Op.INPUT)["k_cache.0"]].shape == (2, 2, 16, 64)
    assert renamed.nodes[renamed.named(Op.INPUT)["token"]].shape == ("batch",)
    weights = dict(_reference(TINY).state_dict())
    inputs = _inputs(TINY, 2, 16, 7, seed=1)
    a, b = evaluate(symbolic, inputs, weights), evaluate(bound, inputs, weights)
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_hf_weight_name() -> None:
    assert (
        hf_weight_name("ref.model.layers.0.mlp.up_proj.weight")
        == "model.layers.0.mlp.up_proj.weight"
    )
    assert hf_weight_name("ref.lm_head.weight") == "lm_head.weight"
    assert hf_weight_name("model.norm.weight") == "model.norm.weight"
    assert hf_weight_name("ref.inv_freq") is None
    assert hf_weight_name("val_57") is None


# -- hand-built models -------------------------------------------------------------------------

ELEM = {np.dtype(np.float64): TensorProto.DOUBLE, np.dtype(np.int64): TensorProto.INT64}


def _model(
    nodes: Sequence[onnx.NodeProto],
    inputs: dict[str, np.ndarray],
    outputs: Sequence[str],
    consts: dict[str, np.ndarray] | None = None,
    dim_params: dict[str, Sequence[int | str]] | None = None,
    opset: int = 18,
) -> onnx.ModelProto:
    """A one-graph model; `consts` become initializers, `dim_params` overrides input shapes."""
    shapes = {n: list(v.shape) for n, v in inputs.items()} | dict(dim_params or {})
    graph = helper.make_graph(
        list(nodes),
        "g",
        [helper.make_tensor_value_info(n, ELEM[v.dtype], shapes[n]) for n, v in inputs.items()],
        [helper.make_tensor_value_info(n, TensorProto.UNDEFINED, None) for n in outputs],
        [numpy_helper.from_array(v, n) for n, v in (consts or {}).items()],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])


def _run(
    model: onnx.ModelProto, inputs: dict[str, np.ndarray]
) -> tuple[Graph, dict[str, np.ndarray]]:
    graph, params = graph_from_onnx(model)
    return graph, evaluate(graph, inputs, params)


def _ints(*v: int) -> np.ndarray:
    return np.array(v, dtype=np.int64)


X57 = np.arange(35, dtype=np.float64).reshape(5, 7)


def test_unsupported_operator_is_one_line() -> None:
    node = helper.make_node("LpNormalization", ["x"], ["y"], name="node_lp_3", axis=-1, p=2)
    with pytest.raises(IRError) as e:
        graph_from_onnx(_model([node], {"x": X57}, ["y"]))
    assert str(e.value) == "unsupported ONNX operator 'LpNormalization' at node 'node_lp_3'"


def test_conversion_error_names_the_node() -> None:
    node = helper.make_node("Reshape", ["x", "s"], ["y"], name="node_view_9")
    with pytest.raises(IRError, match=r"^ONNX node 'node_view_9' \(Reshape\): .*-1") as e:
        graph_from_onnx(_model([node], {"x": X57}, ["y"], consts={"s": _ints(4, -1)}))
    assert "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("starts", "ends", "axes", "steps", "want"),
    [
        ((1, 2), (INT64_MAX, -1), (0, 1), (1, 2), X57[1:, 2:-1:2]),
        ((-1,), (INT64_MIN,), (1,), (-2,), X57[:, ::-2]),  # backward to the start
        ((-2, 10), (-100, 3), (0, 1), (-1, 1), X57[-2::-1, 10:3]),  # clamped, empty
        ((0,), (INT64_MAX,), (-1,), (1,), X57),  # whole: no node
    ],
)
def test_slice(starts: tuple, ends: tuple, axes: tuple, steps: tuple, want: np.ndarray) -> None:
    node = helper.make_node("Slice", ["x", "b", "e", "a", "s"], ["y"])
    consts = {"b": _ints(*starts), "e": _ints(*ends), "a": _ints(*axes), "s": _ints(*steps)}
    graph, got = _run(_model([node], {"x": X57}, ["y"], consts), {"x": X57})
    assert got["y"].shape == want.shape and np.array_equal(got["y"], want)
    assert (graph.nodes[graph.output("y")].op is Op.INPUT) == (want is X57)


def test_gather_on_axis_1_with_matrix_indices() -> None:
    idx = np.array([[0, 6], [-1, 3]], dtype=np.int64)
    node = helper.make_node("Gather", ["x", "i"], ["y"], axis=1)
    _, got = _run(_model([node], {"x": X57, "i": idx}, ["y"]), {"x": X57, "i": idx})
    assert np.array_equal(got["y"], np.take(X57, idx, axis=1))  # [5, 2, 2]
    # A constant index is normalized at import: -1 becomes 6.
    graph, got = _run(_model([node], {"x": X57}, ["y"], {"i": idx}), {"x": X57})
    assert graph.nodes[graph.nodes[graph.output("y")].inputs[1]].attr("value") == (0, 6, 6, 3)
    assert np.array_equal(got["y"], np.take(X57, idx, axis=1))


def test_unsqueeze_axes_as_input_then_squeeze() -> None:
    nodes = [
        helper.make_node("Unsqueeze", ["x", "a"], ["u"]),
        helper.make_node("Squeeze", ["u", "s"], ["y"]),
    ]
    consts = {"a": _ints(0, -1), "s": _ints(-1)}
    graph, got = _run(_model(nodes, {"x": X57}, ["u", "y"], consts), {"x": X57})
    assert got["u"].shape == (1, 5, 7, 1) and np.array_equal(got["u"].ravel(), X57.ravel())
    assert got["y"].shape == (1, 5, 7)
    u, y = (graph.nodes[graph.output(o)] for o in ("u", "y"))
    assert u.op is y.op is Op.RESHAPE and u.inputs == y.inputs == (0,)  # reshapes of x compose


def test_transposes_compose_into_one() -> None:
    x = np.arange(2 * 3 * 4 * 5, dtype=np.float64).reshape(2, 3, 4, 5)
    nodes = [
        helper.make_node("Transpose", ["x"], ["t"], perm=[1, 2, 0, 3]),
        helper.make_node("Transpose", ["t"], ["y"], perm=[3, 0, 2, 1]),
    ]
    graph, got = _run(_model(nodes, {"x": x}, ["y"]), {"x": x})
    assert [n.op for n in graph.nodes] == [Op.INPUT, Op.TRANSPOSE]
    assert np.array_equal(got["y"], x.transpose(1, 2, 0, 3).transpose(3, 0, 2, 1))


def test_reshape_with_zero_and_minus_one_on_a_symbolic_dim() -> None:
    x = np.arange(2 * 3 * 4, dtype=np.float64).reshape(2, 3, 4)
    nodes = [
        helper.make_node("Reshape", ["x", "s0"], ["a"]),  # [0, -1]: [N, 12]
        helper.make_node("Reshape", ["a", "s1"], ["c"], allowzero=1),  # [-1, 3, 4]: [N, 3, 4]
    ]
    consts = {"s0": _ints(0, -1), "s1": _ints(-1, 3, 4)}
    dims = {"x": ["N", 3, 4]}
    graph, got = _run(_model(nodes, {"x": x}, ["a", "c"], consts, dims), {"x": x})
    assert graph.nodes[graph.output("a")].shape == ("N", 12)
    assert graph.nodes[graph.output("c")].shape == ("N", 3, 4)
    assert np.array_equal(got["a"], x.reshape(2, 12)) and np.array_equal(got["c"], x)
    bad = helper.make_node("Reshape", ["x", "s"], ["b"])  # [-1, 4]: 3N is not one dim
    with pytest.raises(IRError, match="cannot infer the -1 dim"):
        graph_from_onnx(_model([bad], {"x": x}, ["b"], {"s": _ints(-1, 4)}, dims))


def test_shape_chain_folds_to_one_reshape() -> None:
    """Shape -> Gather -> Concat -> Reshape over a symbolic dim leaves only the reshape."""
    x = np.arange(12, dtype=np.float64).reshape(3, 4)
    nodes = [
        helper.make_node("Shape", ["x"], ["shp"]),
        helper.make_node("Gather", ["shp", "zero"], ["n"], axis=0),
        helper.make_node("Concat", ["n", "two", "two"], ["target"], axis=0),
        helper.make_node("Reshape", ["x", "target"], ["y"]),
    ]
    consts = {"zero": _ints(0), "two": _ints(2)}
    graph, got = _run(_model(nodes, {"x": x}, ["y"], consts, dim_params={"x": ["N", 4]}), {"x": x})
    assert [(n.op, n.shape) for n in graph.nodes] == [
        (Op.INPUT, ("N", 4)),
        (Op.RESHAPE, ("N", 2, 2)),
    ]
    assert np.array_equal(got["y"], x.reshape(3, 2, 2))


def test_range_constant_and_symbolic() -> None:
    x = np.zeros((6, 2))
    nodes = [
        helper.make_node("Range", ["a", "b", "c"], ["r"]),  # 10, 1, -3: folded
        helper.make_node("Shape", ["x"], ["shp"], start=0, end=1),
        helper.make_node("Squeeze", ["shp"], ["n"]),
        helper.make_node("Range", ["zero", "n", "one"], ["s"]),  # 0 ..< N: an arange node
        helper.make_node("Identity", ["x"], ["x_out"]),  # keeps x, which binds N, in the graph
    ]
    consts = {k: np.array(v) for k, v in {"a": 10, "b": 1, "c": -3, "zero": 0, "one": 1}.items()}
    graph, got = _run(
        _model(nodes, {"x": x}, ["r", "s", "x_out"], consts, dim_params={"x": ["N", 2]}), {"x": x}
    )
    assert graph.nodes[graph.output("r")].op is Op.CONST
    assert (graph.nodes[graph.output("s")].op, graph.nodes[graph.output("s")].shape) == (
        Op.ARANGE,
        ("N",),
    )
    assert got["r"].tolist() == [10, 7, 4] and got["s"].tolist() == list(range(6))


def test_scatter_nd_and_scatter_elements_are_index_copies() -> None:
    """The KV-cache write: rows `pos` of axis 2 of a [B, H, S, D] cache."""
    rng = np.random.default_rng(0)
    cache, new = rng.standard_normal((2, 3, 6, 4)), rng.standard_normal((2, 3, 2, 4))
    pos = _ints(4, 1)
    want = cache.copy()
    want[:, :, pos] = new
    nodes = [  # ScatterND along axis 0 of the transposed cache, as torch.onnx writes it
        helper.make_node("Transpose", ["cache"], ["ct"], perm=[2, 0, 1, 3]),
        helper.make_node("Transpose", ["new"], ["nt"], perm=[2, 0, 1, 3]),
        helper.make_node("Unsqueeze", ["pos", "minus1"], ["idx"]),
        helper.make_node("ScatterND", ["ct", "idx", "nt"], ["st"]),
        helper.make_node("Transpose", ["st"], ["y_nd"], perm=[1, 2, 0, 3]),
        helper.make_node("Reshape", ["pos", "col"], ["pcol"]),  # [1, 1, 2, 1]
        helper.make_node("Expand", ["pcol", "nshape"], ["pidx"]),  # [2, 3, 2, 4]
        helper.make_node("ScatterElements", ["cache", "pidx", "new"], ["y_el"], axis=2),
    ]
    consts = {"minus1": _ints(-1), "col": _ints(1, 1, 2, 1), "nshape": _ints(2, 3, 2, 4)}
    inputs = {"cache": cache, "new": new, "pos": pos}
    graph, got = _run(_model(nodes, inputs, ["y_nd", "y_el"], consts), inputs)
    for out in ("y_nd", "y_el"):
        n = graph.nodes[graph.output(out)]
        assert (n.op, n.attr("axis"), graph.nodes[n.inputs[0]].name) == (Op.INDEX_COPY, 2, "cache")
        assert np.array_equal(got[out], want)


def test_gemm_transposed_with_alpha_beta_bias() -> None:
    rng = np.random.default_rng(1)
    a, b, c = rng.standard_normal((3, 4)), rng.standard_normal((5, 4)), rng.standard_normal((5,))
    node = helper.make_node("Gemm", ["a", "b", "c"], ["y"], transB=1, alpha=0.5, beta=2.0)
    inputs = {"a": a, "b": b, "c": c}
    _, got = _run(_model([node], inputs, ["y"]), inputs)
    np.testing.assert_allclose(got["y"], 0.5 * a @ b.T + 2.0 * c, rtol=1e-14)


def test_rms_normalization_decomposes() -> None:
    rng = np.random.default_rng(2)
    x, w = rng.standard_normal((2, 3, 8)), rng.standard_normal((8,))
    node = helper.make_node("RMSNormalization", ["x", "w"], ["y"], epsilon=1e-6)
    _, got = _run(_model([node], {"x": x, "w": w}, ["y"], opset=23), {"x": x, "w": w})
    want = x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + 1e-6) * w
    np.testing.assert_allclose(got["y"], want, rtol=1e-14)


def test_large_unnamed_initializer_is_a_weight_and_small_one_a_const() -> None:
    big, small = np.ones((80, 80)), np.full((80,), 2.0)  # 6400 > CONST_LIMIT >= 80 elements
    nodes = [
        helper.make_node("MatMul", ["x", "val_57"], ["m"]),
        helper.make_node("Mul", ["m", "k"], ["y"]),
    ]
    x = np.ones((1, 80))
    model = _model(nodes, {"x": x}, ["y"], {"val_57": big, "k": small})
    graph, params = graph_from_onnx(model)
    assert list(params) == list(graph.named(Op.WEIGHT)) == ["val_57"]
    assert [n.shape for n in graph.nodes if n.op is Op.CONST] == [(80,)]
    assert np.array_equal(evaluate(graph, {"x": x}, params)["y"], np.full((1, 80), 160.0))
