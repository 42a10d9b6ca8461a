"""Class (d) obligations: the split reductions partition their domains.

With the kernel's own integer formulas (kernel.cu's constants, CI and CV as it computes them,
and attn_partial's key range) and a symbolic index:

* split-K of the down projection: chunk k of KS covers columns [k*CI, (k+1)*CI), CI = I / KS
  (integer division); every column j of [0, I) lies in exactly one chunk. (The combiner reads
  chunks 0..KS-1 of every row, and (b) proves each chunk's partial written exactly once, so the
  combined sum is the sum over all columns.)
* split-KV: partition p of P reads keys [j0, j1) as attn_partial computes them from the decode
  position (its `const int` locals, read from kernel.cu by `batch_invariance.key_range`; by
  default fused.py's: n = pos + 1 - lo visible keys, c = ceil(n / P), j0 = lo + p*c, j1 =
  min(j0 + c, pos + 1)); for every position 0 <= pos < S every integer j is read by exactly
  one partition if lo <= j <= pos, lo = max(0, pos - WINDOW + 1) with the model's sliding
  window, else 0 (the keys the model's mask lets through), by none otherwise (so none reads
  outside the cache either). With P a constant, p*c is linear.
* LM-head tiles: tile t of NT covers vocabulary rows [t*CV, min((t+1)*CV, V)), CV = ceil(V/NT);
  every row in exactly one tile (the argmax reduces tiles 0..NT-1 in order).
"""

from __future__ import annotations

import re

from verifier.batch_invariance import (
    KEY_RANGE,
    KEY_VARS,
    Constants,
    constexprs,
    key_range,
    literal,
)
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


KEYS = {  # fused.py's partition of the visible keys, in kernel.cu's names (key_range's form)
    "lo": "WINDOW > 0 ? max(0, pos - WINDOW + 1) : 0",
    "n": "pos + 1 - lo",
    "c": "(n + P - 1) / P",
    "j0": "lo + part * c",
    "j1": "min(j0 + c, pos + 1)",
}


def split_kv(g: Geometry, defs: dict[str, str] | None = None, site: str = "") -> Obligation:
    """Partitions 0..P-1 read the visible keys once each; `defs` gives the names the key range
    [j0, j1) is computed from (kernel.cu's constexprs and attn_partial's locals; by default
    KEYS with the schedule's P and the model's window); `site` names where kernel.cu computes
    them."""
    window = g.spec.sliding_window or 0
    if defs is None:
        defs = {"P": str(g.P), "S": str(g.S), "WINDOW": str(window)} | KEYS
    c = Constants("", KEY_VARS)
    c.text = dict(defs)
    facts = [
        "(declare-const pos Int)",
        "(declare-const j Int)",
        f"(assert (and (>= pos 0) (< pos {g.S})))",
    ]
    cases, defined = [], []
    for p in range(g.P):
        lines, divisors = c.definitions(KEY_RANGE, f"_{p}")
        facts += [f"(define-fun pos_{p} () Int pos)", f"(define-fun part_{p} () Int {p})", lines]
        j0, j1 = (f"{r}_{p}" if c.depends(r) else literal(c.value(r, {})) for r in KEY_RANGE)
        cases.append(f"(and (<= {j0} j) (< j {j1}))")
        defined += [f"(not (= {d} 0))" for d in divisors]
    lo = f"(ite (> (- pos {window - 1}) 0) (- pos {window - 1}) 0)" if window else "0"
    visible = f"(and (<= {lo} j) (<= j pos))"
    claim = f"(and true {' '.join(defined)} (= {_count(cases)} (ite {visible} 1 0)))"
    return Obligation(
        "d",
        "split-KV partitions read exactly the visible keys",
        -1,
        f"attention, P = {g.P}, S = {g.S}, window = {window or 'none'}: {site}"
        f"j0 = {defs['j0']}, j1 = {defs['j1']}",
        "\n".join(f for f in facts if f) + "\n",
        f"(assert (not {claim}))\n",
        data={
            "mode": "split_kv",
            "P": g.P,
            "S": g.S,
            "window": window,
            "defs": {m: c.text[m] for m in sorted(c.exprs)},
        },
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


def obligations(g: Geometry, kernel: str | None = None) -> list[Obligation]:
    """The three partitions, with kernel.cu's CI, CV and attn_partial's key range (ExprError,
    ZeroDivisionError: they cannot be read), or by default as the schedule's split symbols and
    fused.py imply."""
    if kernel is None:
        return [split_k(g), split_kv(g), lm_tiles(g)]
    consts = Constants(kernel, ())
    return [
        split_k(g, consts.value("CI", {})),
        split_kv(g, constexprs(kernel) | key_range(kernel), _site(kernel)),
        lm_tiles(g, consts.value("CV", {})),
    ]


def _site(kernel: str) -> str:
    """ "attn_partial, kernel.cu line N: ", N the line that declares j1 (the key range's end)."""
    start = kernel.find("void attn_partial(")
    m = re.compile(r"^\s*const int[^;]*\bj1\s*=", re.M).search(kernel, max(start, 0))
    if start < 0 or m is None:
        return ""
    return f"attn_partial, kernel.cu line {kernel.count(chr(10), 0, m.start()) + 1}: "
