"""Class (e), per layer: the model graph's attention is the one the kernel's split-KV computes.

The online-softmax lemmas (`verifier.attention`) prove that the partitions and their merge
compute softmax(s) · V over the keys the partitions read, and (d) proves those keys are
exactly lo <= j <= pos. What is left is that the model graph's attention has that form with
the same s, the same mask and the same V. The graph's attention output is found among the
nodes fused.json's attention instructions cover (a hint): a matmul of softmax(where(mask, ...))
(casts aside) with the values. Then three queries over a symbolic head h, key j, dim d and
position pos:

* scores: the graph's score of (b, h, j) is SM_SCALE · Σ_d q[b, h·D + d] · k_cache[b, h // G,
  j, d], the current q and the cache after this step's append (the GQA head mapping);
* mask: the graph masks key j exactly when the kernel skips it (not lo <= j <= pos);
* values: the graph's value row of (b, h, j, d) is v_cache[b, h // G, j, d].
"""

from __future__ import annotations

import math
from fractions import Fraction

from compiler.ir.fused import Instr
from compiler.ir.graph import Graph
from compiler.ir.ops import DType, Op
from verifier.fused_terms import flat_shape, role
from verifier.graph_terms import GraphTerms, Unsupported, round_to
from verifier.model import Geometry
from verifier.obligation import Obligation
from verifier.terms import Aff, compare, const, mul, summed


def _strip(graph: Graph, n: int) -> int:
    while graph.nodes[n].op is Op.CAST:
        n = graph.nodes[n].inputs[0]
    return n


def find(graph: Graph, covers: set[int]) -> tuple[int, int, int, int] | None:
    """(output, where, scores, values) of the covered attention, or None."""
    for n in sorted(covers, reverse=True):
        node = graph.nodes[n]
        if node.op is not Op.MATMUL:
            continue
        sm = graph.nodes[_strip(graph, node.inputs[0])]
        if sm.op is not Op.SOFTMAX or sm.attr("axis") not in (-1, 3):
            continue
        w = _strip(graph, sm.inputs[0])
        if graph.nodes[w].op is not Op.WHERE:
            continue
        return n, w, -1, node.inputs[1]
    return None


def _minus_inf(graph: Graph, n: int) -> bool:
    node = graph.nodes[_strip(graph, n)]
    return node.op is Op.CONST and tuple(node.attr("value")) in ((float("-inf"),), ("-inf",))


def obligations(
    graph: Graph,
    g: Geometry,
    merge: Instr,
    covers: set[int],
    holds: dict[str, int],
    env: dict[str, int],
) -> tuple[list[Obligation], str, int | None]:
    """(the obligations, a failure or '', the graph's attention output node)."""
    layer = merge.layer
    kname, vname = f"k_cache.{layer}", f"v_cache.{layer}"
    if not all(b in holds for b in ("q", kname, vname)):
        return [], f"attention of layer {layer}: its inputs were not matched", None
    found = find(graph, covers)
    if found is None:
        return [], f"attention of layer {layer}: no masked softmax among the covered nodes", None
    out, where, _, values = found
    w = graph.nodes[where]
    if _minus_inf(graph, w.inputs[1]):
        masked_when, scores = True, w.inputs[2]
    elif _minus_inf(graph, w.inputs[2]):
        masked_when, scores = False, w.inputs[1]
    else:
        return [], f"attention of layer {layer}: the mask does not select -inf", None
    cuts = {holds[b]: (role(b, layer), flat_shape(b, g)) for b in ("q", kname, vname)}
    hq, kv, dd = g.spec.num_heads, g.spec.num_kv_heads, g.D
    group = hq // kv
    subject = f"attention, layer {layer}"
    b, h, j, d = (Aff.of(v) for v in ("b", "h", "j", "d"))
    base = {"b": (0, g.B), "h": (0, hq), "j": (0, g.S), "pos": (0, g.S)}
    obs: list[Obligation] = []
    from verifier.algebra import equal_obligations

    try:
        # scores
        ranges = dict(base)
        tables: dict[str, list[Fraction]] = {}
        gt = GraphTerms(graph, env, cuts, {}, ranges, tables)
        lhs = gt.real(scores, (b, h, Aff(0), j))
        kh, _ = h.divmod(group, ranges)
        c = "c1"
        ranges[c] = (0, dd)
        dot = summed(
            c,
            dd,
            mul(("v", "q", (b, h.scale(dd) + Aff.of(c))), ("v", "k_cache", (b, kh, j, Aff.of(c)))),
        )
        rhs = mul(const(round_to(1 / math.sqrt(dd), DType.F32)), dot)
        obs += equal_obligations(
            lhs,
            rhs,
            ranges,
            tables,
            "the graph's attention scores are the kernel's",
            subject,
            layer,
            "e",
        )
        # values
        ranges = dict(base) | {"d": (0, dd)}
        gt = GraphTerms(graph, env, cuts, {}, ranges, tables)
        vx = gt.real(values, (b, h, j, d))
        kh, _ = h.divmod(group, ranges)
        obs += equal_obligations(
            vx,
            ("v", "v_cache", (b, kh, j, d)),
            ranges,
            tables,
            "the graph's attention values are the kernel's (GQA)",
            subject,
            layer,
            "e",
        )
        # mask
        ranges = {"j": (0, g.S), "pos": (0, g.S)}
        gt = GraphTerms(graph, env, cuts, {"pos": "pos"}, ranges, tables)
        cond = gt.value(w.inputs[0], gt.operand(w.inputs[0], (Aff(0), Aff(0), Aff(0), j)))
    except (Unsupported, ValueError, KeyError) as e:
        return obs, f"attention of layer {layer}: {e}", None
    window = g.spec.sliding_window or 0
    pos = Aff.of("pos")
    keep = compare("<=", j, pos, ranges)
    if window:
        keep = ("and", keep, compare("<=", pos - (window - 1), j, ranges))
    from verifier.terms import smt_cond

    graph_masked = smt_cond(cond, {}) if masked_when else f"(not {smt_cond(cond, {})})"
    decl = (
        "(declare-const j Int)\n(declare-const pos Int)\n"
        f"(assert (and (<= 0 j) (< j {g.S}) (<= 0 pos) (< pos {g.S})))\n"
    )
    obs.append(
        Obligation(
            "e",
            "the graph's attention mask is the keys the kernel skips",
            layer,
            subject,
            decl,
            f"(assert (not (= {graph_masked} (not {smt_cond(keep, {})}))))\n",
            data={"mode": "mask", "graph": graph_masked, "window": window, "S": g.S},
        )
    )
    return obs, "", out
