"""Class (f): each fused instruction computes, over ℝ, what the model graph's ops compute.

The verifier walks fused.json's instructions in program order and keeps a map from buffer
versions to model-graph nodes, starting from the graph's inputs (token, the KV caches, pos).
For each output buffer of an instruction it looks, among the graph nodes fused.json says the
instruction covers (only a hint: a wrong hint finds no match and fails), for the node whose
element equals the instruction's (`verifier.fused_terms`) when the instruction's input buffers
are cut points (`verifier.graph_terms`): first numerically at a few points, then by a proof.
Each proof is, per case of the index conditions the terms hold (d < D/2, j = pos), two SMT
queries over a symbolic output element (every batch row, head, column, cache row and position
at once), weights and activations arbitrary reals:

* the arguments of the uninterpreted functions (rsqrt of the RMSNorm, cos/sin of RoPE,
  sigmoid of SiLU) pair up and are equal (the decomposition of verification.md E7b: the
  polynomial under an rsqrt is proved separately, so "sum instead of mean" is a fast sat);
* with each pair replaced by one shared atom, the two elements are equal.

Where no covered node agrees numerically, the artifact fails, and the likeliest node's claim
is also sent to the solver pinned at a point where the two differ (`pinned`), so the report
carries a solver counterexample replayed in float64.

A buffer the graph has no value for (the split-K partials) is inlined into its reader's term;
attention (whose graph form is a masked softmax) is linked by `verifier.attention_link`; the
next token is the graph's argmax of the logits matched here. Queries use role names, so the
layers of a model share one proof.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import replace
from fractions import Fraction
from typing import Any

from compiler.ir.fused import FusedGraph, Instr, Kind
from compiler.ir.graph import Graph
from compiler.ir.ops import Op
from verifier import attention_link
from verifier.fused_terms import Fused, flat_shape, index_vars, role
from verifier.graph_terms import GraphTerms, Unsupported, row_major, unflatten
from verifier.model import Geometry
from verifier.obligation import Obligation
from verifier.terms import (
    Aff,
    Ranges,
    Term,
    encode,
    evaluate,
    instances,
    smt,
    smt_cond,
    truth,
)

UNMATCHED = {"down", "amax_val", "amax_idx", "attn_o", "attn_m", "attn_l"}  # no graph value
POINTS = 3


# ---- term utilities --------------------------------------------------------------------------


def walk(t: Any) -> Iterator[Any]:
    """Every sub-term of t (tuples and the atoms of its Affs), t first."""
    yield t
    if isinstance(t, tuple):
        for x in t:
            yield from walk(x)
    elif isinstance(t, Aff):
        for a, _ in t.terms:
            yield from walk(a)


def free_vars(t: Any, ranges: Ranges) -> list[str]:
    out: set[str] = set()
    bound: set[str] = set()
    for x in walk(t):
        if isinstance(x, tuple) and x and x[0] == "sum":
            bound.add(x[1])
        if isinstance(x, Aff):
            out |= {a for a, _ in x.terms if isinstance(a, str)}
    return sorted(v for v in out - bound if v in ranges or v == "pos")


def _apps(t: Any, fn_free: bool) -> list[Term]:
    """UF applications in t ("f", ...); with fn_free, only those whose argument has none."""
    found = []
    for x in walk(t):
        if not (isinstance(x, tuple) and x and x[0] == "f"):
            continue
        if not fn_free or not any(isinstance(y, tuple) and y and y[0] == "f" for y in walk(x[2])):
            found.append(x)
    return list(dict.fromkeys(found))


def substitute(t: Any, table: dict[Term, Term]) -> Any:
    """t with each subterm that is a key of `table` replaced by its value."""
    if isinstance(t, tuple):
        if t in table:
            return table[t]
        return tuple(substitute(x, table) for x in t)
    return t


def _points(ranges: Ranges, seed: int) -> list[dict[str, int]]:
    rnd = random.Random(seed)
    out = []
    for p in range(POINTS):
        env = {v: rnd.randrange(*ranges[v]) for v in ranges}
        if p == 0 and "j" in env and "pos" in env and env["pos"] < ranges["j"][1]:
            env["j"] = env["pos"]  # a cache row: the appended one
        out.append(env)
    return out


def _close(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * (1.0 + abs(a) + abs(b))


def differ(
    lhs: Term, rhs: Term, ranges: Ranges, tables: dict[str, Any], seed: int = 1
) -> dict[str, int] | None:
    """A point where the two differ in float64 (arrays pseudo-random), or None."""
    for env in _points(ranges, seed):
        if not _close(evaluate(lhs, env, tables, seed), evaluate(rhs, env, tables, seed)):
            return env
    return None


def agree(lhs: Term, rhs: Term, ranges: Ranges, tables: dict[str, Any], seed: int = 1) -> bool:
    return differ(lhs, rhs, ranges, tables, seed) is None


def _replay_data(
    lhs: Term, rhs: Term, ranges: Ranges, tables: dict[str, list[Fraction]]
) -> dict[str, Any]:
    """What `verifier.replay` needs to evaluate both sides in float64."""
    return {
        "mode": "algebra",
        "lhs": encode(lhs),
        "rhs": encode(rhs),
        "ranges": {k: list(v) for k, v in ranges.items()},
        "tables": {k: [str(x) for x in v] for k, v in tables.items()},
    }


def pinned(
    lhs: Term,
    rhs: Term,
    ranges: dict[str, tuple[int, int]],
    tables: dict[str, list[Fraction]],
    env: dict[str, int],
    check: str,
    subject: str,
    layer: int,
    cls: str = "f",
) -> Obligation:
    """The claim at one point where the two differ numerically: index variables and array
    elements fixed to that point's values, the uninterpreted functions left free. Its
    counterexample is that point (a general query over a wrong pair can be beyond the solver's
    budget); it is made only for pairs already known to disagree, which fail the artifact
    whatever it answers."""
    left, right, _ = _decompose(lhs, rhs, ranges, tables)
    conds = _conditions((left, right), ranges)
    case = {c: truth(c, env, tables) for c in conds}
    left, right = _resolve(left, case), _resolve(right, case)
    seed = 1
    values = instances(lhs, env, tables, seed) | instances(rhs, env, tables, seed)
    at = {v: env[v] for v in free_vars((lhs, rhs), ranges) if v in env}
    pins = [f"(assert (= {v} {n}))" for v, n in at.items()]
    for (name, *idx), value in sorted(values.items(), key=repr):
        num = str(value) if isinstance(value, int) else smt(("c", Fraction(value)))
        pins.append(f"(assert (= ({name} {' '.join(map(str, idx))}) {num}))")
    data = _replay_data(lhs, rhs, ranges, tables) | {"at": at}
    where = ", ".join(f"{k} = {n}" for k, n in at.items())
    return Obligation(
        cls,
        f"{check}, at {where}",
        layer,
        subject,
        _declarations([lhs, rhs, left, right], ranges, tables) + "\n".join(pins) + "\n",
        f"(assert (not (= {smt(left)} {smt(right)})))\n",
        data=data,
    )


# ---- queries ---------------------------------------------------------------------------------


def _declarations(terms: list[Any], ranges: Ranges, tables: dict[str, list[Fraction]]) -> str:
    arrays: dict[str, tuple[int, str]] = {}
    fns: set[str] = set()
    for x in walk(tuple(terms)):
        if isinstance(x, tuple) and x and x[0] == "v" and x[1] not in tables:
            arrays[x[1]] = (len(x[2]), "Real")
        elif isinstance(x, tuple) and x and x[0] == "vi":
            arrays[x[1]] = (len(x[2]), "Int")
        elif isinstance(x, tuple) and x and x[0] == "f":
            fns.add(x[1])
    lines = []
    for v in free_vars(tuple(terms), ranges):
        lines.append(f"(declare-const {v} Int)")
        lo, hi = ranges[v]
        lines.append(f"(assert (and (<= {lo} {v}) (< {v} {hi})))")
    for name, (arity, sort) in sorted(arrays.items()):
        lines.append(f"(declare-fun {name} ({' '.join(['Int'] * arity)}) {sort})")
    for fn in sorted(fns):
        lines.append(f"(declare-fun {fn} (Real) Real)")
    for name, values in sorted(tables.items()):
        if not any(isinstance(x, tuple) and x[:2] == ("v", name) for x in walk(tuple(terms))):
            continue
        body = "0.0"
        for i in reversed(range(len(values))):
            body = f"(ite (= i {i}) {smt(('c', values[i]))} {body})"
        lines.append(f"(define-fun {name} ((i Int)) Real {body})")
    return "\n".join(lines) + "\n"


def _conditions(t: Any, ranges: Ranges) -> list[Term]:
    """The atomic index conditions of t's ites that read only free variables."""
    found = []
    for x in walk(t):
        if isinstance(x, tuple) and x and x[0] == "ite":
            for c in walk(x[1]):
                if not (isinstance(c, tuple) and c and c[0] in ("<", "<=", "=")):
                    continue
                named = {a for a, _ in c[1].terms + c[2].terms if isinstance(a, str)}
                if set(free_vars(c, ranges)) >= named:
                    found.append(c)
    return list(dict.fromkeys(found))


def _decide(c: Term, case: dict[Term, bool]) -> bool | None:
    if c in case:
        return case[c]
    if c[0] == "not":
        v = _decide(c[1], case)
        return None if v is None else not v
    if c[0] in ("and", "or"):
        vals = [_decide(x, case) for x in c[1:]]
        if c[0] == "and":
            return False if False in vals else None if None in vals else True
        return True if True in vals else None if None in vals else False
    if c[0] in ("true", "false"):
        return c[0] == "true"
    return None


def _resolve(t: Any, case: dict[Term, bool]) -> Any:
    if isinstance(t, tuple) and t:
        if t[0] == "ite":
            v = _decide(t[1], case)
            if v is not None:
                return _resolve(t[2] if v else t[3], case)
        return tuple(_resolve(x, case) for x in t)
    return t


def _cases(conds: list[Term]) -> list[dict[Term, bool]]:
    out: list[dict[Term, bool]] = [{}]
    for c in conds:
        out = [case | {c: v} for case in out for v in (True, False)]
    return out


def _case_text(case: dict[Term, bool]) -> tuple[str, str]:
    """(an assertion of the case, its words)"""
    if not case:
        return "", ""
    parts = [smt_cond(c, {}) if v else f"(not {smt_cond(c, {})})" for c, v in case.items()]
    return f"(assert (and {' '.join(parts)}))\n", " when " + " and ".join(parts)


def _decompose(
    lhs: Term, rhs: Term, ranges: Ranges, tables: dict[str, list[Fraction]]
) -> tuple[Term, Term, list[tuple[Term, Term]]]:
    """Innermost first, uninterpreted applications whose arguments agree numerically share one
    atom: (lhs, rhs with the atoms, the argument pairs to prove equal)."""
    pairs: list[tuple[Term, Term]] = []
    left, right = lhs, rhs
    n = 0
    while True:
        la, ra = _apps(left, True), _apps(right, True)
        if not la and not ra:
            break
        table: dict[Term, Term] = {}
        groups: list[list[Term]] = []  # applications with equal arguments share one atom
        for a in la + ra:
            same = next(
                (
                    grp
                    for grp in groups
                    if grp[0][1] == a[1] and agree(grp[0][2], a[2], ranges, tables)
                ),
                None,
            )
            if same is None:
                groups.append([a])
            else:
                same.append(a)
        for grp in groups:
            kernel_only = all(a not in la for a in grp)
            name = f"u{n}_{grp[0][1]}" + ("_kernel" if kernel_only else "")
            n += 1
            atom_vars = free_vars(tuple(a[2] for a in grp), ranges)
            atom: Term = ("v", name, tuple(Aff.of(v) for v in atom_vars))
            for a in grp:
                table[a] = atom
            pairs += [(grp[0][2], a[2]) for a in grp[1:]]
        left, right = substitute(left, table), substitute(right, table)
    return left, right, pairs


def equal_obligations(
    lhs: Term,
    rhs: Term,
    ranges: dict[str, tuple[int, int]],
    tables: dict[str, list[Fraction]],
    check: str,
    subject: str,
    layer: int,
    cls: str = "f",
) -> list[Obligation]:
    """lhs (the model graph) = rhs (the kernel) for every value of the free index variables:
    the UF-argument query and the main query."""
    left, right, pairs = _decompose(lhs, rhs, ranges, tables)
    data = _replay_data(lhs, rhs, ranges, tables)
    obs = []
    conds = _conditions((left, right, tuple(pairs)), ranges)
    for case in _cases(conds):
        assume, words = _case_text(case)
        cl, cr = _resolve(left, case), _resolve(right, case)
        cpairs = [(a, b) for a, b in _resolve(tuple(pairs), case) if a != b]
        if cpairs:
            every = tuple(x for p in cpairs for x in p)
            eqs = " ".join(f"(= {smt(a)} {smt(b)})" for a, b in cpairs)
            obs.append(
                Obligation(
                    cls,
                    f"{check}: the arguments of rsqrt, cos, sin and sigmoid agree{words}",
                    layer,
                    subject,
                    _declarations([*every, tuple(case)], ranges, tables) + assume,
                    f"(assert (not (and {eqs} true)))\n",
                    data=data | {"pairs": [[encode(a), encode(b)] for a, b in cpairs]},
                )
            )
        obs.append(
            Obligation(
                cls,
                check + words,
                layer,
                subject,
                _declarations([cl, cr, tuple(case)], ranges, tables) + assume,
                f"(assert (not (= {smt(cl)} {smt(cr)})))\n",
                data=data,
            )
        )
    return obs


# ---- the walk --------------------------------------------------------------------------------


class Walk:
    """The program-order walk: which graph node holds each buffer version."""

    def __init__(self, graph: Graph, fused: FusedGraph, g: Geometry):
        self.graph, self.fused, self.g = graph, fused, g
        self.env = {"B": g.B, "S": g.S}
        self.holds: dict[str, int] = {}  # buffer -> graph node of its current version
        self.fresh: set[str] = set()  # buffers still holding the step's input
        for i, n in enumerate(graph.nodes):
            if n.op is Op.INPUT:
                self.holds[n.name] = i
                self.fresh.add(n.name)
        self.obligations: list[Obligation] = []
        self.failures: list[tuple[str, str]] = []  # (class, why)
        self.memo: dict[Any, list[Obligation] | None] = {}  # None: the pair disagrees

    def shape(self, n: int) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else self.env[d] for d in self.graph.nodes[n].shape)

    def cuts(self, instr: Instr) -> tuple[dict[int, tuple[str, tuple[int, ...]]], dict[str, str]]:
        """Every buffer's current graph node is a cut (the graph's term stops there and reads
        the buffer); a buffer the instruction does not read then shows up as an array the
        kernel's term lacks, and the match fails."""
        cuts: dict[int, tuple[str, tuple[int, ...]]] = {}
        names: dict[str, str] = {"pos": "pos"}
        for name, at in self.holds.items():
            if name in self.fresh:
                names[name] = role(name, instr.layer)
            else:
                cuts[at] = (role(name, instr.layer), flat_shape(name, self.g))
        for node in self.graph.nodes:
            if node.op is Op.WEIGHT:
                names[node.name] = role(node.name, instr.layer)
        return cuts, names

    def run(self) -> None:
        inline: dict[str, Instr] = {}
        partials: list[Instr] = []
        for instr in self.fused.instrs:
            if instr.kind is Kind.ATTN_PARTIAL:
                partials.append(instr)
                continue
            if instr.kind is Kind.ATTN_MERGE:
                self.attention(partials, instr)
                partials = []
                continue
            if instr.kind is Kind.ARGMAX_REDUCE:
                continue  # see final()
            for out in instr.outputs:
                if out in UNMATCHED:
                    if out == "down":
                        inline[out] = instr
                    continue
                self.match(instr, out, inline)
        self.final()

    def match(self, instr: Instr, out: str, inline: dict[str, Instr]) -> None:
        g = self.g
        where = f"{instr.kind.name} {out}"
        ivars = index_vars(out, g)
        numel = 1
        for _, n in ivars:
            numel *= n
        cuts, names = self.cuts(instr)
        covered = set(instr.covers)
        # the covered nodes read outside the cover (or graph outputs) first: the likely ones
        escaping = {j for i, n in enumerate(self.graph.nodes) if i not in covered for j in n.inputs}
        escaping |= {n for _, n in self.graph.outputs}
        candidates = sorted(
            (c for c in covered if c < len(self.graph.nodes) and _numel(self.shape(c)) == numel),
            key=lambda c: (c not in escaping, -c),
        )
        check = f"{instr.kind.name} computes the model's {out.split('.')[0]}"
        first: tuple[int, Any] | None = None  # the likeliest node, for the counterexample
        for c in candidates:
            ranges: dict[str, tuple[int, int]] = {v: (0, n) for v, n in ivars if n > 1}
            ranges["pos"] = (0, g.S)
            tables: dict[str, list[Fraction]] = {}
            idx = tuple(Aff.of(v) if n > 1 else Aff(0) for v, n in ivars)
            flat = row_major(tuple(n for _, n in ivars), idx)
            try:
                gt = GraphTerms(self.graph, self.env, cuts, names, ranges, tables)
                lhs = gt.real(c, unflatten(flat, self.shape(c), ranges))
                rhs = Fused(instr, g, ranges, tables, self._inv_freq(), inline).output(out, idx)
            except (Unsupported, KeyError, ValueError):
                continue
            key = (lhs, rhs, tuple(sorted(ranges.items())))
            if first is None:
                first = (c, (lhs, rhs, ranges, tables, key))
            if key not in self.memo:  # an earlier layer's identical pair needs no second look
                agreed = agree(lhs, rhs, ranges, tables)
                self.memo[key] = (
                    equal_obligations(lhs, rhs, ranges, tables, check, where, instr.layer)
                    if agreed
                    else None
                )
            found = self.memo[key]
            if found is not None:
                self.bind(out, c, [_at(ob, instr.layer, where) for ob in found])
                return
        if first is None:
            self.failures.append(
                (
                    "f",
                    f"{where}, layer {instr.layer}: no node the instruction claims to cover"
                    " has its shape and algebra",
                )
            )
            self.holds.pop(out, None)
            self.fresh.discard(out)
            return
        # nothing agrees: the likeliest node's claim, pinned at a point where it fails
        c, (lhs, rhs, ranges, tables, key) = first
        env = differ(lhs, rhs, ranges, tables) or {}
        ob = pinned(lhs, rhs, ranges, tables, env, check, where, instr.layer)
        self.failures.append(
            ("f", f"{where}, layer {instr.layer}: the model graph's value differs")
        )
        self.bind(out, c, [ob])

    def bind(self, out: str, node: int, obs: list[Obligation]) -> None:
        self.obligations += obs
        self.holds[out] = node
        self.fresh.discard(out)

    def attention(self, partials: list[Instr], merge: Instr) -> None:
        layer = merge.layer
        want = (
            ("q", f"k_cache.{layer}", f"v_cache.{layer}", "pos"),
            ("attn_o", "attn_m", "attn_l"),
        )
        got = [(p.inputs, p.outputs) for p in partials] + [(merge.inputs, merge.outputs)]
        if got != [want, (want[1], ("attn",))]:
            self.failures.append(
                ("e", f"attention of layer {layer}: its instructions read or write {got}")
            )
        covers = set(merge.covers).union(*(p.covers for p in partials))
        obs, why, out = attention_link.obligations(
            self.graph, self.g, merge, covers, self.holds, self.env
        )
        self.obligations += obs
        if why:
            self.failures.append(("e", why))
        if out is None:
            self.holds.pop("attn", None)
        else:
            self.holds["attn"] = out
        self.fresh.discard("attn")

    def final(self) -> None:
        """The graph's outputs are the final buffers: logits, the caches, and the next token as
        the argmax of the matched logits."""
        outputs = dict(self.graph.outputs)
        for name, node in outputs.items():
            if name == "next_token":
                arg = self.graph.nodes[node]
                src = arg.inputs[0] if arg.op is Op.ARGMAX else None
                ok = (
                    src is not None
                    and self.holds.get("logits") == src
                    and arg.attr("axis") in (-1, 1)
                )
                reduces = any(
                    i.kind is Kind.ARGMAX_REDUCE and i.outputs == ("token",)
                    for i in self.fused.instrs
                )
                if not (ok and reduces):
                    self.failures.append(("f", "the next token is not the argmax of the logits"))
            elif self.holds.get(name) != node:
                self.failures.append(("f", f"the graph's {name} is not the final buffer {name}"))

    def _inv_freq(self) -> tuple[float, ...]:
        try:
            value = self.fused.buffer("rope_inv_freq").value
        except KeyError:
            return ()
        return tuple(value or ())


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _at(ob: Obligation, layer: int, subject: str) -> Obligation:
    return replace(ob, layer=layer, subject=subject)


def obligations(
    graph: Graph, fused: FusedGraph, g: Geometry
) -> tuple[list[Obligation], list[tuple[str, str]]]:
    """The (f) and (e) obligations of the artifact, and the (class, failure)s met while
    matching."""
    w = Walk(graph, fused, g)
    w.run()
    return w.obligations, w.failures


__all__ = ["equal_obligations", "obligations"]
