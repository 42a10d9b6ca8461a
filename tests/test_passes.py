"""Fusion passes: each pass on a stated graph, `fuse` against `fused_layout`, planted wrong graphs.

IR before: the tiny-llama decode-step graph (torch.export frontend), or a hand-built graph where
a test says so. Instructions expected: `fused_layout.layout(spec)`'s instructions of the pass's
kind (the passes add `covers`; the layout has none). Every pass is also shown refusing a graph
with one planted structural error, with an IRError that names the layer and the instruction.
"""

from __future__ import annotations

import dataclasses
import functools
from collections import Counter
from collections.abc import Callable

import pytest

from amk_farm import catalog
from compiler.frontend.torch_export import graph_from_spec
from compiler.ir import DType, Graph, GraphBuilder, IRError, Node, Op
from compiler.ir.fused import FusedGraph, Instr, Kind
from compiler.ir.fused_layout import layout
from compiler.passes import PASSES, Fusion, check_dataflow, check_fused, fuse, program_order
from compiler.passes.match import strip
from compiler.reference import rope_inv_freq
from compiler.spec import ModelSpec, RopeScaling

SPECS: dict[str, ModelSpec] = {
    "tiny-llama": catalog.resolve("tiny-llama"),
    "tiny-mistral": catalog.resolve("tiny-mistral"),  # sliding window 16
    # llama3 RoPE scaling and tied embeddings, at full width but two layers
    "llama-3.2-1b-2l": dataclasses.replace(catalog.resolve("llama-3.2-1b"), num_layers=2),
    # the same two features at tiny-llama's size, small enough for the numeric tests
    "tiny-tied-llama3": dataclasses.replace(
        catalog.resolve("tiny-llama"),
        name="tiny-tied-llama3",
        tie_word_embeddings=True,
        rope_scaling=RopeScaling(32.0, 1.0, 4.0, 64),
    ),
}


@functools.cache
def graph_of(name: str) -> Graph:
    """Each model's graph, built once per test session (seconds each); test_fused_eval shares it."""
    return graph_from_spec(SPECS[name])


@functools.cache
def fused_of(name: str) -> FusedGraph:
    return fuse(graph_of(name))


def bare(instrs: tuple[Instr, ...] | list[Instr]) -> list[Instr]:
    return [dataclasses.replace(i, covers=()) for i in instrs]


def run_pass(name: str, graph: Graph) -> Fusion:
    return dict(PASSES)[name](Fusion.start(graph))


def expected(spec: ModelSpec, *kinds: Kind) -> list[Instr]:
    return [i for i in layout(spec).instrs if i.kind in kinds]


def ops_of(g: Graph, covers: tuple[int, ...]) -> Counter[str]:
    return Counter(g.nodes[i].op.value for i in covers)


# Planted errors: the graph rebuilt node by node, with one edit; still well-formed.

Edit = Callable[[GraphBuilder, int, Node, list[int], dict[int, int]], list[int] | None]


def rebuild(g: Graph, edit: Edit) -> Graph:
    """`g` rebuilt; `edit(gb, i, node, new_inputs, old_to_new)` may return other inputs for node i."""
    gb, new = GraphBuilder(), dict[int, int]()
    for i, n in enumerate(g.nodes):
        ins = [new[j] for j in n.inputs]
        ins = edit(gb, i, n, ins, new) or ins
        new[i] = gb.add(n.op, ins, n.shape, n.dtype, n.name, **dict(n.attrs))
    for name, i in g.outputs:
        gb.output(name, new[i])
    return gb.build(g.symbols)


def replace_input(g: Graph, at: int, k: int, make: Callable[[GraphBuilder], int]) -> Graph:
    def edit(gb: GraphBuilder, i: int, n: Node, ins: list[int], new: dict[int, int]):
        if i == at:
            ins[k] = make(gb)
            return ins
        return None

    return rebuild(g, edit)


def with_op(g: Graph, at: int, op: Op) -> Graph:
    nodes = list(g.nodes)
    nodes[at] = dataclasses.replace(nodes[at], op=op)
    return Graph(tuple(nodes), g.outputs, g.symbols)


def users(g: Graph, i: int, op: Op) -> list[int]:
    return [j for j, n in enumerate(g.nodes) if i in n.inputs and n.op is op]


def weight_matmul(g: Graph, name: str) -> int:
    """The MATMUL x @ W^T of the weight called `name`."""
    w = g.named(Op.WEIGHT)[name]
    return users(g, users(g, w, Op.TRANSPOSE)[0], Op.MATMUL)[0]


def rope_muls(g: Graph, layer: int, which: str) -> tuple[int, int]:
    """The (y * cos, rotate_half(y) * sin) MULs of layer `layer`'s RoPE of "q" or "k"."""
    mm = weight_matmul(g, f"model.layers.{layer}.self_attn.{which}_proj.weight")
    mul_cos = next(
        j for j, n in enumerate(g.nodes) if n.op is Op.MUL and strip(g, n.inputs[0]) == mm
    )
    root = users(g, mul_cos, Op.ADD)[0]
    return mul_cos, next(m for m in g.nodes[root].inputs if m != mul_cos)


def nth(g: Graph, op: Op, k: int, pred: Callable[[Node], bool] = lambda n: True) -> int:
    return [i for i, n in enumerate(g.nodes) if n.op is op and pred(n)][k]


# EMBED


def test_embed_on_a_hand_built_graph():
    gb = GraphBuilder()
    token = gb.add(Op.INPUT, (), ("B",), DType.I64, name="token")
    table = gb.add(Op.WEIGHT, (), (10, 4), DType.BF16, name="model.embed_tokens.weight")
    idx = gb.add(Op.RESHAPE, (token,), ("B", 1), DType.I64)
    x = gb.add(Op.GATHER, (table, idx), ("B", 1, 4), DType.BF16, axis=0)
    gb.output("x", x)
    f = run_pass("embed", gb.build())
    assert [s.instr for s in f.steps] == [
        Instr(Kind.EMBED, -1, ("token", "model.embed_tokens.weight"), ("x",), covers=(idx, x))
    ]
    assert dict(f.facts) == {"vocab": 10, "hidden": 4}


def test_embed_on_tiny_llama():
    g = graph_of("tiny-llama")
    (step,) = run_pass("embed", g).steps
    assert bare([step.instr]) == expected(SPECS["tiny-llama"], Kind.EMBED)
    assert ops_of(g, step.instr.covers) == Counter({"gather": 1, "reshape": 1})


def test_embed_refuses_a_lookup_of_the_wrong_axis():
    g = graph_of("tiny-llama")
    i = users(g, g.named(Op.WEIGHT)["model.embed_tokens.weight"], Op.GATHER)[0]
    nodes = list(g.nodes)
    nodes[i] = dataclasses.replace(nodes[i], attrs=(("axis", 1),))
    with pytest.raises(IRError, match="EMBED: no embedding lookup 'x' found"):
        run_pass("embed", Graph(tuple(nodes), g.outputs, g.symbols))


# QKV_ROPE_APPEND


def test_qkv_rope_append_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    f = run_pass("qkv_rope_append", g)
    assert bare([s.instr for s in f.steps]) == expected(spec, Kind.QKV_ROPE_APPEND)
    facts = dict(f.facts)
    assert (facts["heads"], facts["kv_heads"], facts["head_dim"], facts["eps"]) == (4, 2, 64, 1e-5)
    assert facts["rope_inv_freq"] == tuple(rope_inv_freq(spec).tolist())
    for s in f.steps:
        got = ops_of(g, s.instr.covers)
        assert (got["matmul"], got["index_copy"], got["cos"], got["sin"], got["neg"]) == (
            3,
            2,
            1,
            1,
            2,
        )
    # the prologue's RoPE tables are covered by each layer's instruction
    shared = set(f.steps[0].instr.covers) & set(f.steps[1].instr.covers)
    assert {g.nodes[i].op for i in shared} == {
        Op.ARANGE,
        Op.ADD,
        Op.CAST,
        Op.RESHAPE,
        Op.MUL,
        Op.CONCAT,
        Op.COS,
        Op.SIN,
    }


@pytest.mark.parametrize("which", ["k", "q"])
def test_qkv_refuses_a_layer_whose_rope_lost_its_sin(which):
    g = graph_of("tiny-llama")
    bad = replace_input(g, rope_muls(g, 1, which)[1], 1, lambda gb: gb.const(0.0, (), DType.BF16))
    with pytest.raises(
        IRError, match=r"layer 1: QKV_ROPE_APPEND.*\(const\) where sin was expected"
    ):
        run_pass("qkv_rope_append", bad)


def test_qkv_refuses_layers_with_different_eps():
    g = graph_of("tiny-llama")
    third_norm = nth(g, Op.ADD, 2, lambda n: g.nodes[n.inputs[0]].op is Op.MEAN)  # layer 1 input
    bad = replace_input(g, third_norm, 1, lambda gb: gb.const(1e-6, (), DType.F32))
    with pytest.raises(IRError, match=r"layer 1: QKV_ROPE_APPEND: eps is 1e-06 here but 1e-05"):
        fuse(bad)


def test_qkv_refuses_layers_with_different_rope_frequencies():
    """Layer 1's q and k RoPE read tables recomputed from another inv_freq constant."""
    g = graph_of("tiny-llama")
    inv = nth(g, Op.CONST, 0, lambda n: n.shape == (32,))
    targets = {*rope_muls(g, 1, "q"), *rope_muls(g, 1, "k")}
    prologue_end = users(g, g.named(Op.WEIGHT)["model.embed_tokens.weight"], Op.GATHER)[0]
    alt: dict[int, int] = {}

    def edit(gb: GraphBuilder, i: int, n: Node, ins: list[int], new: dict[int, int]):
        if i not in targets:
            return None
        if not alt:  # a second copy of the tables, from inv_freq / 2
            alt[inv] = gb.const([v / 2 for v in g.nodes[inv].attr("value")], (32,), DType.F64)
            for j in range(inv + 1, prologue_end):
                m = g.nodes[j]
                if any(k in alt for k in m.inputs):
                    args = [alt.get(k, new[k]) for k in m.inputs]
                    alt[j] = gb.add(m.op, args, m.shape, m.dtype, **dict(m.attrs))
        return [alt.get(j, new[j]) for j in n.inputs]

    with pytest.raises(IRError, match="layer 1: QKV_ROPE_APPEND: rope_inv_freq is"):
        fuse(rebuild(g, edit))


# ATTN_PARTIAL


def test_attention_partial_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    f = run_pass("attention_partial", g)
    assert bare([s.instr for s in f.steps]) == expected(spec, Kind.ATTN_PARTIAL)
    assert dict(f.facts) == {"sliding_window": None}
    for s in f.steps:  # the (shared) causal mask is covered by every layer's attention
        got = ops_of(g, s.instr.covers)
        assert (got["le"], got["not"], got["where"], got["softmax"], got["matmul"]) == (
            1,
            1,
            1,
            1,
            2,
        )
        assert got["expand"] == 2  # GQA broadcast of K and V


def test_attention_partial_reads_the_sliding_window():
    g, spec = graph_of("tiny-mistral"), SPECS["tiny-mistral"]
    f = run_pass("attention_partial", g)
    assert bare([s.instr for s in f.steps]) == expected(spec, Kind.ATTN_PARTIAL)
    assert dict(f.facts) == {"sliding_window": 16}
    assert all(ops_of(g, s.instr.covers)["and"] == 1 for s in f.steps)


def test_attention_partial_refuses_a_wrong_scale():
    g = graph_of("tiny-llama")
    scale = nth(
        g,
        Op.MUL,
        1,
        lambda n: g.nodes[n.inputs[0]].op is Op.MATMUL and g.nodes[n.inputs[1]].op is Op.CONST,
    )
    bad = replace_input(g, scale, 1, lambda gb: gb.const(0.25, (), DType.BF16))
    with pytest.raises(
        IRError, match=r"layer 1: ATTN_PARTIAL: scores are scaled by 0.25, not 1/sqrt\(64\)"
    ):
        run_pass("attention_partial", bad)


def test_attention_partial_refuses_a_mask_that_hides_the_current_token():
    g = graph_of("tiny-llama")
    bad = with_op(g, nth(g, Op.LE, 0), Op.LT)  # keys < pos instead of keys <= pos
    with pytest.raises(IRError, match=r"layer 0: ATTN_PARTIAL.*\(lt\) where causal mask"):
        run_pass("attention_partial", bad)


# ATTN_MERGE


def test_attention_merge_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    merge = run_pass("attention_merge", g).steps
    partial = run_pass("attention_partial", g).steps
    assert bare([s.instr for s in merge]) == expected(spec, Kind.ATTN_MERGE)
    for m, p in zip(merge, partial, strict=True):
        got = ops_of(g, m.instr.covers)
        assert (got["softmax"], got["matmul"]) == (1, 1)
        assert set(m.instr.covers) < set(p.instr.covers)  # the split softmax and PV product


# OPROJ_RESIDUAL


def test_oproj_residual_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    steps = run_pass("oproj_residual", g).steps
    assert bare([s.instr for s in steps]) == expected(spec, Kind.OPROJ_RESIDUAL)
    for s in steps:  # the attention output's transpose and reshape are read as [B, Hq*D]
        assert ops_of(g, s.instr.covers) == Counter(
            {"matmul": 1, "add": 1, "transpose": 2, "reshape": 1}
        )


def test_oproj_residual_refuses_a_skip_from_the_normed_stream():
    g = graph_of("tiny-llama")
    mm = weight_matmul(g, "model.layers.1.self_attn.o_proj.weight")
    add = users(g, mm, Op.ADD)[0]
    h = g.nodes[weight_matmul(g, "model.layers.1.self_attn.q_proj.weight")].inputs[0]
    bad = rebuild(g, lambda gb, i, n, ins, new: [new[h], ins[1]] if i == add else None)
    run_pass("oproj_residual", bad)  # the pass binds its x operand to whatever the ADD reads,
    with pytest.raises(
        IRError,
        match=r"OPROJ_RESIDUAL \(layer 1\) reads x as node \d+ \(mul\), "
        r"but the program holds node \d+ \(add\) in x there",
    ):
        fuse(bad)  # and the dataflow check finds it is not the residual stream


# GATE_UP_SILU


def test_gate_up_silu_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    f = run_pass("gate_up_silu", g)
    assert bare([s.instr for s in f.steps]) == expected(spec, Kind.GATE_UP_SILU)
    assert dict(f.facts) == {"eps": 1e-5, "intermediate": 512}


def test_gate_up_silu_refuses_sigmoid_for_silu():
    g = graph_of("tiny-llama")
    bad = with_op(g, nth(g, Op.SILU, 1), Op.SIGMOID)
    with pytest.raises(
        IRError, match=r"layer 1: GATE_UP_SILU.*\(sigmoid\) where silu was expected"
    ):
        run_pass("gate_up_silu", bad)


# DOWN_PARTIAL, DOWN_RESIDUAL


def test_down_split_on_tiny_llama():
    g, spec = graph_of("tiny-llama"), SPECS["tiny-llama"]
    steps = run_pass("down_split", g).steps
    assert bare([s.instr for s in steps]) == expected(spec, Kind.DOWN_PARTIAL, Kind.DOWN_RESIDUAL)
    for p, r in zip(steps[0::2], steps[1::2], strict=True):
        assert ops_of(g, p.instr.covers) == Counter({"matmul": 1, "transpose": 1})
        assert ops_of(g, r.instr.covers) == Counter({"matmul": 1, "add": 1})


def test_down_split_refuses_a_subtracted_residual():
    g = graph_of("tiny-llama")
    add = users(g, weight_matmul(g, "model.layers.0.mlp.down_proj.weight"), Op.ADD)[0]
    with pytest.raises(IRError, match=r"layer 0: DOWN_PARTIAL/DOWN_RESIDUAL: no x \+ act Wd\^T"):
        run_pass("down_split", with_op(g, add, Op.SUB))


# LMHEAD_ARGMAX


@pytest.mark.parametrize(
    ("name", "head"),
    [("tiny-llama", "lm_head.weight"), ("llama-3.2-1b-2l", "model.embed_tokens.weight")],
)
def test_lm_head_argmax(name, head):
    g, spec = graph_of(name), SPECS[name]
    f = run_pass("lm_head_argmax", g)
    assert bare([s.instr for s in f.steps]) == expected(spec, Kind.LMHEAD_ARGMAX)
    assert f.steps[0].instr.inputs[2] == head
    assert dict(f.facts)["tied"] is spec.tie_word_embeddings
    covers = f.steps[0].instr.covers
    assert {g.output("logits"), g.output("next_token")} <= set(covers)


def test_lm_head_refuses_logits_without_the_final_norm():
    g = graph_of("tiny-llama")
    mm = weight_matmul(g, "lm_head.weight")
    x = nth(g, Op.ADD, -1, lambda n: g.nodes[n.inputs[1]].op is Op.MATMUL)  # the last residual
    bad = rebuild(g, lambda gb, i, n, ins, new: [new[x], ins[1]] if i == mm else None)
    with pytest.raises(
        IRError, match=r"LMHEAD_ARGMAX \(final norm\): node \d+ \(add\) is not RMSNorm"
    ):
        run_pass("lm_head_argmax", bad)


# ARGMAX_REDUCE, on a hand-built graph


def test_argmax_reduce_on_a_hand_built_graph():
    gb = GraphBuilder()
    logits = gb.add(Op.INPUT, (), ("B", 7), DType.F32, name="logits")
    nxt = gb.add(Op.ARGMAX, (logits,), ("B",), DType.I64, axis=-1, keepdim=False)
    gb.output("next_token", nxt)
    gb.output("logits", logits)
    (step,) = run_pass("argmax_reduce", gb.build()).steps
    assert step.instr == Instr(
        Kind.ARGMAX_REDUCE, -1, ("amax_val", "amax_idx"), ("token",), covers=(nxt,)
    )


# fuse: the whole pipeline of passes


@pytest.mark.parametrize(
    "name", ["tiny-llama", "tiny-mistral", "llama-3.2-1b-2l", "tiny-tied-llama3"]
)
def test_fuse_equals_the_canonical_layout(name):
    g, spec = graph_of(name), SPECS[name]
    fg = fused_of(name)
    assert dataclasses.replace(fg, instrs=tuple(bare(fg.instrs))) == layout(spec, g.digest())
    assert fuse(g, spec) == fg  # the spec, when given, only cross-checks
    assert FusedGraph.loads(fg.dumps()) == fg
    check_fused(g, fg)


def test_fuse_refuses_a_graph_of_another_model():
    other = dataclasses.replace(SPECS["tiny-llama"], rms_norm_eps=1e-6)
    with pytest.raises(IRError, match=r"the graph's eps differ from model 'tiny-llama'"):
        fuse(graph_of("tiny-llama"), other)


def test_check_fused_wants_every_node_covered_and_outputs_from_their_writers():
    g, fg = graph_of("tiny-llama"), fused_of("tiny-llama")
    instrs = list(fg.instrs)
    k = next(i for i, s in enumerate(instrs) if s.kind is Kind.GATE_UP_SILU and s.layer == 1)
    instrs[k] = dataclasses.replace(instrs[k], covers=())
    with pytest.raises(IRError, match=r"no instruction covers node \d+ \(cast\)"):
        check_fused(g, dataclasses.replace(fg, instrs=tuple(instrs)))
    instrs = list(fg.instrs)
    logits = g.output("logits")
    instrs[-2] = dataclasses.replace(
        instrs[-2], covers=tuple(c for c in instrs[-2].covers if c != logits)
    )
    instrs[-1] = dataclasses.replace(instrs[-1], covers=(*instrs[-1].covers, logits))
    with pytest.raises(IRError, match=r"graph output logits .* is not computed by LMHEAD_ARGMAX"):
        check_fused(g, dataclasses.replace(fg, instrs=tuple(instrs)))


def test_dataflow_refuses_a_program_out_of_order():
    g = graph_of("tiny-llama")
    f = Fusion.start(g)
    for _, run in PASSES:
        f = run(f)
    steps = sorted(f.steps, key=program_order)
    check_dataflow(g, tuple(steps))
    swapped = list(steps)
    merge = next(i for i, s in enumerate(steps) if s.instr.kind is Kind.ATTN_MERGE)
    swapped[merge : merge + 2] = steps[merge + 1], steps[merge]  # OPROJ before the first merge
    with pytest.raises(IRError, match=r"OPROJ_RESIDUAL \(layer 0\) reads attn before any"):
        check_dataflow(g, tuple(swapped))
    late = list(steps)
    down = next(i for i, s in enumerate(steps) if s.instr.kind is Kind.DOWN_RESIDUAL)
    late[down : down + 2] = steps[down + 1], steps[down]  # layer 1 starts before layer 0 ends
    with pytest.raises(
        IRError,
        match=r"QKV_ROPE_APPEND \(layer 1\) reads x as node \d+ \(add\), "
        r"but the program holds node \d+ \(add\) in x there",
    ):
        check_dataflow(g, tuple(late))
