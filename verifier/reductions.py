"""Class (d) obligations: the split reductions partition their domains.

With the kernel's own integer formulas (kernel.cu's constants, C and CI as it computes them)
and a symbolic index:

* split-K of the down projection: chunk k of KS covers columns [k*CI, (k+1)*CI), CI = I / KS
  (integer division); every column j of [0, I) lies in exactly one chunk. (The combiner reads
  chunks 0..KS-1 of every row, and (b) proves each chunk's partial written exactly once, so the
  combined sum is the sum over all columns.)
* split-KV: partition p of P reads keys [max(p*C, lo), min((p+1)*C, S, pos+1)), C = ceil(S/P),
  lo = max(0, pos - WINDOW + 1) with a sliding window, else 0; for every position 0 <= pos < S
  every key j is read by exactly one partition if lo <= j <= pos (the keys the model's mask
  lets through), by none otherwise.
* LM-head tiles: tile t of NT covers vocabulary rows [t*CV, min((t+1)*CV, V)), CV = ceil(V/NT);
  every row in exactly one tile (the argmax reduces tiles 0..NT-1 in order).
"""

from __future__ import annotations

from verifier.model import Geometry
from verifier.obligation import Obligation


def _count(cases: list[str]) -> str:
    return "(+ " + " ".join(f"(ite {c} 1 0)" for c in cases) + " 0)"


def _tiling(
    var: str,
    n: int,
    tiles: list[tuple[int, int]],
    check: str,
    subject: str,
    data: dict[str, int | str],
) -> Obligation:
    """Every index `var` of [0, n) lies in exactly one of the half-open `tiles`."""
    facts = f"(declare-const {var} Int)\n(assert (and (>= {var} 0) (< {var} {n})))\n"
    cases = [f"(and (<= {lo} {var}) (< {var} {hi}))" for lo, hi in tiles]
    return Obligation(
        "d", check, -1, subject, facts, f"(assert (not (= {_count(cases)} 1)))\n", data=data
    )


def split_k(g: Geometry, ci: int | None = None) -> Obligation:
    ci = g.I // g.KS if ci is None else ci  # the kernel's CI = I / KS
    return _tiling(
        "j",
        g.I,
        [(k * ci, (k + 1) * ci) for k in range(g.KS)],
        "split-K chunks partition the reduced columns",
        f"down projection, KS = {g.KS}, I = {g.I}",
        {"mode": "split_k", "I": g.I, "KS": g.KS, "CI": ci},
    )


def split_kv(g: Geometry, c: int | None = None) -> Obligation:
    c = g.C if c is None else c
    window = g.spec.sliding_window or 0
    lo = f"(ite (> (- pos {window - 1}) 0) (- pos {window - 1}) 0)" if window else "0"
    facts = (
        "(declare-const pos Int)\n(declare-const j Int)\n"
        f"(assert (and (>= pos 0) (< pos {g.S}) (>= j 0) (< j {g.S})))\n"
    )
    cases = []
    for p in range(g.P):
        j0 = f"(ite (> {p * c} {lo}) {p * c} {lo})"
        end = min((p + 1) * c, g.S)
        j1 = f"(ite (< {end} (+ pos 1)) {end} (+ pos 1))"
        cases.append(f"(and (<= {j0} j) (< j {j1}))")
    visible = f"(and (<= {lo} j) (<= j pos))"
    goal = f"(assert (not (= {_count(cases)} (ite {visible} 1 0))))\n"
    return Obligation(
        "d",
        "split-KV partitions read exactly the visible keys",
        -1,
        f"attention, P = {g.P}, S = {g.S}, window = {window or 'none'}",
        facts,
        goal,
        data={"mode": "split_kv", "P": g.P, "S": g.S, "window": window, "C": c},
    )


def lm_tiles(g: Geometry, cv: int | None = None) -> Obligation:
    cv = g.CV if cv is None else cv
    return _tiling(
        "v",
        g.V,
        [(t * cv, min((t + 1) * cv, g.V)) for t in range(g.NT)],
        "LM-head tiles partition the vocabulary",
        f"LM head, NT = {g.NT}, V = {g.V}",
        {"mode": "lm_tiles", "V": g.V, "NT": g.NT, "CV": cv},
    )


def obligations(g: Geometry, chunks: dict[str, int] | None = None) -> list[Obligation]:
    """The three partitions; `chunks` gives C, CI and CV as kernel.cu declares them (by
    default, as the schedule's split symbols imply)."""
    k = chunks or {}
    return [split_k(g, k.get("CI")), split_kv(g, k.get("C")), lm_tiles(g, k.get("CV"))]
