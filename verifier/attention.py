"""Class (e) obligations: the online softmax of the attention tasks, over the reals.

exp is an uninterpreted function E with ground instances of E(x + y) = E(x) E(y) on the terms
at hand (never a quantifier); the instances are also checked numerically with real exp, on a
fixed grid to a tolerance derived from exp's error (`axioms`; a failure fails class (e)).

A state (m, l, o) over a set of keys with scores s_j and values v_j stands for l = S E(-m) and
o = T E(-m), S = sum_j E(s_j), T = sum_j E(s_j) v_j. The lemmas, for the kernel's formulas
(`softmax_push` adds one key; `softmax_merge` joins two states; ATTN_MERGE joins P states the
same way and divides):
* push: the state after adding key (s, v) stands for S + E(s), T + E(s) v;
* merge: the joined state stands for S1 + S2, T1 + T2; so any split into partitions, warps
  and key slots, merged in any tree, stands for the whole sum, and o / l = T / S;
* float safety: every rescale exponent (m_i - max) is <= 0, and the final denominator is >= 1.

The lemmas cover the formulas as written below; `reviewed` checks that kernel.cu's
`softmax_push` and `softmax_merge` are, character for character (whitespace aside), the
implementations these formulas were written from.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re

from verifier.obligation import Obligation

# sha256 of each function's text in kernel.cu with runs of whitespace collapsed
REVIEWED = {
    "softmax_push": "a51a6d9acfbdcd433400df3b68a907c43e0a6700b83ef7fa5e81edef7909c7c1",
    "softmax_merge": "2710573d100235112c92a2d4d2d31947fbb5496cfd3bf90ee2fb6dca0aad61ff",
}


def fingerprint(kernel: str, name: str) -> str | None:
    m = re.search(rf"__device__ __forceinline__ void {name}\(.*?\n\}}\n", kernel, re.S)
    return hashlib.sha256(" ".join(m.group(0).split()).encode()).hexdigest() if m else None


def reviewed(kernel: str) -> str:
    """'' if kernel.cu's softmax functions are the reviewed ones, else which is not."""
    for name, want in REVIEWED.items():
        got = fingerprint(kernel, name)
        if got != want:
            return f"{name} in kernel.cu is {'missing' if got is None else 'not the reviewed implementation'}"
    return ""


EPS = 2.0**-52  # the spacing of float64 at 1


def axioms() -> list[tuple[str, str]]:
    """(axiom, '' if it holds, else where it fails and the two values): the ground instances
    of E(x + y) = E(x) E(y) the lemmas assume, with real exp (`math.exp`), on a fixed grid:
    x, y, s each over 20 points evenly spaced on [-20, 20] (spacing 40/19, not a power of
    two, so the differences round; every one is in [-40, 40]; 8000 triples, the same on every
    run).

    Tolerance (relative to the right side): the left sides round one subtraction t = x - y
    (an absolute error of at most |t| * EPS / 2, which exp turns into a relative error of
    |t| * EPS / 2 <= 20 EPS) and take one or two exps (<= 1 ulp each) and one product (0.5
    ulp); the right side is one or two exps and perhaps a product. Together at most
    20 EPS + 5 ulps, under 64 EPS: the tolerance. A wrong identity (a missing E(-x), a sign
    flip) is off by a factor e^2 or more at some grid point.
    """
    grid = [-20.0 + 40.0 * i / 19 for i in range(20)]
    checks: dict[str, tuple[str, tuple[float, float]] | None] = {
        "E(x - y) E(-x) = E(-y)": None,
        "E(s - y) = E(s) E(-y)": None,
    }
    for x in grid:
        for y in grid:
            for s in grid:
                pairs = {
                    "E(x - y) E(-x) = E(-y)": (math.exp(x - y) * math.exp(-x), math.exp(-y)),
                    "E(s - y) = E(s) E(-y)": (math.exp(s - y), math.exp(s) * math.exp(-y)),
                }
                for name, (a, b) in pairs.items():
                    if checks[name] is None and not abs(a - b) <= 64 * EPS * abs(b):
                        checks[name] = (f"x = {x}, y = {y}, s = {s}", (a, b))
    out = []
    for name, bad in checks.items():
        why = "" if bad is None else f"fails at {bad[0]}: {bad[1][0]!r} against {bad[1][1]!r}"
        out.append((name, why))
    return out


@functools.lru_cache(maxsize=1)
def _axioms_hold() -> bool:
    return not any(why for _, why in axioms())


HEAD = "(declare-fun E (Real) Real)\n"


def _reals(*names: str) -> str:
    return "".join(f"(declare-const {n} Real)\n" for n in names)


def merge(o_rescaled: bool = True, use_max: bool = True) -> Obligation:
    """The kernel's softmax_merge joins two states into the state of the union. (The flags
    plant the bugs the tests expect this lemma, or the float-safety one, to catch.)"""
    pick = ">=" if use_max else "<="
    a2 = "a2" if o_rescaled else "1.0"
    facts = (
        HEAD
        + _reals("m1", "m2", "S1", "S2", "T1", "T2", "M", "a1", "a2", "l", "o")
        + f"(assert (= M (ite ({pick} m1 m2) m1 m2)))\n"
        + "(assert (= a1 (E (- m1 M))))\n(assert (= a2 (E (- m2 M))))\n"
        + "(assert (= l (+ (* S1 (E (- m1)) a1) (* S2 (E (- m2)) a2))))\n"
        + f"(assert (= o (+ (* T1 (E (- m1)) a1) (* T2 (E (- m2)) {a2}))))\n"
        # ground instances of E(x + y) = E(x) E(y)
        + "(assert (= (* (E (- m1 M)) (E (- m1))) (E (- M))))\n"
        + "(assert (= (* (E (- m2 M)) (E (- m2))) (E (- M))))\n"
    )
    goal = "(assert (or (not (= l (* (+ S1 S2) (E (- M))))) (not (= o (* (+ T1 T2) (E (- M)))))))\n"
    return Obligation(
        "e",
        "online-softmax merge of two states is the state of the union",
        -1,
        "softmax_merge (attention slots, warps, partitions)",
        facts,
        goal,
        data={
            "mode": "merge",
            "axioms_checked": _axioms_hold(),
            "o_rescaled": o_rescaled,
            "use_max": use_max,
        },
    )


def push() -> Obligation:
    """The kernel's softmax_push adds one key (s, v) to a state."""
    facts = (
        HEAD
        + _reals("m", "S", "T", "s", "v", "mn", "a", "e", "l", "o")
        + "(assert (= mn (ite (>= m s) m s)))\n"
        + "(assert (= a (E (- m mn))))\n(assert (= e (E (- s mn))))\n"
        + "(assert (= l (+ (* S (E (- m)) a) e)))\n"
        + "(assert (= o (+ (* T (E (- m)) a) (* e v))))\n"
        + "(assert (= (* (E (- m mn)) (E (- m))) (E (- mn))))\n"
        + "(assert (= (E (- s mn)) (* (E s) (E (- mn)))))\n"
    )
    goal = "(assert (or (not (= l (* (+ S (E s)) (E (- mn))))) (not (= o (* (+ T (* (E s) v)) (E (- mn)))))))\n"
    return Obligation(
        "e",
        "online-softmax push of one key",
        -1,
        "softmax_push (attention keys)",
        facts,
        goal,
        data={"mode": "push", "axioms_checked": _axioms_hold()},
    )


def float_safety(use_max: bool = True) -> Obligation:
    """Every rescale exponent is <= 0 (exp never overflows) and the final denominator is >= 1
    (each non-empty state's l is >= 1: its own maximum key contributes E(0) = 1)."""
    pick = ">=" if use_max else "<="
    facts = (
        HEAD
        + _reals("m1", "m2", "l1", "l2", "M", "den")
        + f"(assert (= M (ite ({pick} m1 m2) m1 m2)))\n"
        + "(assert (>= l1 1.0))\n(assert (>= l2 1.0))\n"
        + "(assert (= (E 0.0) 1.0))\n(assert (>= (E (- m1 M)) 0.0))\n(assert (>= (E (- m2 M)) 0.0))\n"
        + "(assert (= den (+ (* l1 (E (- m1 M))) (* l2 (E (- m2 M))))))\n"
    )
    goal = "(assert (or (> (- m1 M) 0.0) (> (- m2 M) 0.0) (< den 1.0)))\n"
    return Obligation(
        "e",
        "float safety: rescale exponents <= 0, denominator >= 1",
        -1,
        "softmax_merge and ATTN_MERGE",
        facts,
        goal,
        data={"mode": "float_safety", "axioms_checked": _axioms_hold(), "use_max": use_max},
    )


def obligations() -> list[Obligation]:
    return [push(), merge(), float_safety()]
