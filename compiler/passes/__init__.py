"""Fusion passes: the model Graph rewritten into the megakernel's instructions (a FusedGraph).

Each pass is a pure, named function `Fusion -> Fusion` in its own file. It anchors a declarative
pattern at nodes it can name (HF-named weights, the cache inputs, the graph outputs), appends
one instruction of its kind per layer (or one in all) with `covers` = the model-graph nodes the
instruction computes, and records the model dimensions it learned on the way. `fuse` runs them
in pipeline order, puts the instructions in program order, checks that the program threads the
graph's values through its buffers, and declares buffers and weights from the learned dims.

Design choice: dims are read back from the graph (weight and cache shapes, the eps, window and
inv_freq constants) rather than passed in, so `graph.json` alone is an entry point to this stage.
A ModelSpec may be passed as well; it is then only a cross-check of what the graph says.
"""

from __future__ import annotations

from collections.abc import Callable

from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.fused_layout import buffers_of, dims_of, weights_of
from compiler.ir.graph import Graph, IRError
from compiler.ir.ops import LEAVES, Op
from compiler.ir.well_formed import well_formed
from compiler.passes.argmax_reduce import argmax_reduce
from compiler.passes.attention_merge import attention_merge
from compiler.passes.attention_partial import attention_partial
from compiler.passes.down_split import down_split
from compiler.passes.embed import embed
from compiler.passes.gate_up_silu import gate_up_silu
from compiler.passes.lm_head_argmax import lm_head_argmax
from compiler.passes.match import Fusion, Step, describe, num_layers, same_value, strip
from compiler.passes.oproj_residual import oproj_residual
from compiler.passes.qkv_rope_append import qkv_rope_append
from compiler.reference import rope_inv_freq
from compiler.spec import ModelSpec

PASSES: list[tuple[str, Callable[[Fusion], Fusion]]] = [
    ("embed", embed),
    ("qkv_rope_append", qkv_rope_append),
    ("attention_partial", attention_partial),
    ("attention_merge", attention_merge),
    ("oproj_residual", oproj_residual),
    ("gate_up_silu", gate_up_silu),
    ("down_split", down_split),
    ("lm_head_argmax", lm_head_argmax),
    ("argmax_reduce", argmax_reduce),
]
KIND_ORDER = {k: i for i, k in enumerate(Kind)}  # Kind lists a layer's instructions in order
# The keys of `fused_layout.dims_of`: all but `layers` are facts the passes learn.
DIMS = (
    "hidden",
    "intermediate",
    "vocab",
    "heads",
    "kv_heads",
    "head_dim",
    "eps",
    "sliding_window",
    "tied",
)


def program_order(step: Step) -> tuple[int, int, int]:
    """EMBED, then each layer's instructions in Kind order, then the LM head and the reduce."""
    i = step.instr
    group = 0 if i.kind is Kind.EMBED else (1 if i.layer >= 0 else 2)
    return group, i.layer, KIND_ORDER[i.kind]


def _output_buffer(name: str) -> str:
    return "token" if name == "next_token" else name


def check_dataflow(graph: Graph, steps: tuple[Step, ...]) -> None:
    """Run the program symbolically: each buffer holds a graph node; every read must see the
    node the pass matched, and at the end the buffers must hold the graph's outputs."""
    held: dict[str, int] = {}
    for name, i in graph.named(Op.INPUT).items():
        held[name] = i
    for s in steps:
        label = f"{s.instr.kind.name} (layer {s.instr.layer})"
        for buf, node in s.reads:
            if buf not in held and graph.nodes[strip(graph, node)].op is Op.CONST:
                held[buf] = node  # a constant buffer (rope_inv_freq) is bound at its first read
            if buf not in held:
                raise IRError(f"{label} reads {buf} before any instruction writes it")
            if not same_value(graph, held[buf], node):
                raise IRError(
                    f"{label} reads {buf} as {describe(graph, node)}, but the program "
                    f"holds {describe(graph, held[buf])} in {buf} there"
                )
        held.update(s.writes)
    for name, i in graph.outputs:
        buf = _output_buffer(name)
        if buf not in held or strip(graph, held[buf]) != strip(graph, i):
            raise IRError(f"graph output {name} is not what the program leaves in buffer {buf}")


def check_fused(graph: Graph, fg: FusedGraph) -> None:
    """Every live non-leaf node is covered, and each graph output is covered by the last
    instruction that writes its buffer (next_token: token, logits, k_cache.l, v_cache.l)."""
    covered = {i for instr in fg.instrs for i in instr.covers}
    loose = sorted(i for i in graph.live() if graph.nodes[i].op not in LEAVES and i not in covered)
    if loose:
        raise IRError(
            f"no instruction covers {', '.join(describe(graph, i) for i in loose[:8])}"
            + (f" and {len(loose) - 8} more" if len(loose) > 8 else "")
        )
    for name, i in graph.outputs:
        buf = _output_buffer(name)
        writers = [instr for instr in fg.instrs if buf in instr.outputs]
        if not writers:
            raise IRError(f"graph output {name}: no instruction writes buffer {buf}")
        if graph.nodes[i].op not in LEAVES and i not in writers[-1].covers:
            raise IRError(
                f"graph output {name} ({describe(graph, i)}) is not computed by "
                f"{writers[-1].kind.name} (layer {writers[-1].layer}), the last writer of {buf}"
            )


def fuse(graph: Graph, spec: ModelSpec | None = None) -> FusedGraph:
    """Rewrite the decode-step graph into the megakernel program.

    Args:
        graph: the model graph (from a frontend or `graph.json`).
        spec: optional; when given, the dims and RoPE frequencies read from the graph must be
            the spec's (a graph built for another model is refused).

    Raises:
        IRError: naming the layer and instruction whose pattern the graph does not hold, or the
            dataflow, weights or coverage check that failed.
    """
    well_formed(graph)
    f = Fusion.start(graph)
    for _, run in PASSES:
        f = run(f)
    steps = tuple(sorted(f.steps, key=program_order))
    check_dataflow(graph, steps)
    facts = dict(f.facts)
    missing = [k for k in (*DIMS, "rope_inv_freq") if k not in facts]
    if missing:
        raise IRError(f"the passes did not learn {missing} from the graph (has it no layers?)")
    dims = {**{k: facts[k] for k in DIMS}, "layers": num_layers(graph)}
    inv_freq = facts["rope_inv_freq"]
    if spec is not None:
        want = {**dims_of(spec), "rope_inv_freq": tuple(rope_inv_freq(spec).tolist())}
        got = {**dims, "rope_inv_freq": inv_freq}
        odd = sorted(k for k in want if want[k] != got[k])
        if odd:
            raise IRError(f"the graph's {', '.join(odd)} differ from model {spec.name!r}'s")
    declared = dict(weights_of(dims))
    actual = {n.name: n.shape for i in graph.live() if (n := graph.nodes[i]).op is Op.WEIGHT}
    if declared != actual:
        diff = sorted(set(declared.items()) ^ set(actual.items()))
        raise IRError(f"the graph's weights differ from the model's declared weights: {diff[:6]}")
    fg = FusedGraph(
        dims=tuple(sorted(dims.items())),
        buffers=buffers_of(dims, inv_freq),
        weights=weights_of(dims),
        instrs=tuple(s.instr for s in steps),
        graph_digest=graph.digest(),
    )
    check_fused(graph, fg)
    return fg


__all__ = ["PASSES", "Fusion", "check_dataflow", "check_fused", "fuse", "program_order"]
