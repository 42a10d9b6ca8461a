"""rms_rstd's outputs, proved from the code for the fma proof (`verifier.device.fma`): after it,
rstd[b] (the work area's single-writer tail, `verifier.device.workarea`) is

    rstd(b) = rsqrt(f * sum_{c < K} src[b][c]^2 + e)

for the constants f and e of the code (1/K and EPS when it is right: the value obligations hold
them to the model's 1/H and eps). The store of thread 0 for each b is matched against that form,
its squares' columns enumerated: [0, K), each once, every square x[b][c] * x[b][c] of its own
row (the threads' strided columns 4 t + 4 THREADS m + e, the lanes' butterfly, the warps' sum
through scratch).
"""

from __future__ import annotations

from collections import Counter
from fractions import Fraction
from typing import Any

from verifier.device.staging import flat
from verifier.device.values import Ptr
from verifier.terms import Aff, Term, add, app, const, mul, summed

Form = tuple[Fraction, Fraction]  # (f, e)


def check(
    table: dict[int, tuple[Term, int]],
    base: int,
    src: Ptr,
    ld: int,
    K: int,
    B: int,
    shapes: dict[str, tuple[int, ...]],
    ranges: Any,
) -> tuple[Form | None, list[str]]:
    """((f, e), problems) of rstd[0..B) in `table` (offset -> (value, writers))."""
    forms: set[Form] = set()
    problems: list[str] = []
    for b in range(B):
        got = table.get(base + b)
        if got is None or got[1] != 1:
            problems.append(f"rstd[{b}] is stored by {0 if got is None else got[1]} threads")
            continue
        parsed = _form(got[0])
        if parsed is None:
            problems.append(f"rstd[{b}] is not rsqrt(f * sum of squares + e)")
            continue
        f, e, squares = parsed
        forms.add((f, e))
        cols: Counter[int] = Counter()
        for sq in squares:
            x = sq[1:] if sq[0] == "*" and len(sq) == 3 and sq[1] == sq[2] else ()
            if not x or x[0][:2] != ("v", src.array):
                problems.append(f"rstd[{b}] sums {sq[0]} terms other than squares of its source")
                break
            rb, c = (flat(x[0][2], shapes[src.array]) - src.offset).divmod(ld, ranges)
            if rb != Aff(b) or not c.is_const():
                problems.append(f"rstd[{b}] sums squares of another row")
                break
            cols[c.const] += 1
        wrong = sorted(c for c in set(cols) | set(range(K)) if cols[c] != (0 <= c < K))
        if wrong and not problems:
            problems.append(f"rstd[{b}] sums the squares of columns {wrong[:6]} not once each")
    if len(forms) > 1:
        problems.append("the rows' rstd differ in form")
    return (next(iter(forms)) if len(forms) == 1 else None), problems


def against_model(form: Form, K: int, eps: float) -> list[str]:
    """What in rstd's form (f, e) is not the model's RMSNorm over a row of K: f = 1/K exactly, and
    e the model's eps as the float32 constant the code holds (within its rounding, 2^-24)."""
    f, e = form
    problems = []
    if f != Fraction(1, K):
        problems.append(f"rstd scales the square sum by {f}, not 1/{K} (the mean over the row)")
    if abs(float(e) - eps) > abs(eps) * 2.0**-23:
        problems.append(f"rstd adds {float(e):.9g}, not the model's eps {eps:.9g}")
    return problems


def term(form: Form, src: Ptr, ld: int, K: int, b: Aff, element: Any, fresh: str) -> Term:
    """rstd(b) as the model's terms write it (a sum binder over a fresh column)."""
    f, e = form
    x = ("v", src.array, element(src.array, src.offset + b.scale(ld) + Aff.of(fresh)))
    return app("rsqrt", add(mul(const(f), summed(fresh, K, mul(x, x))), const(e)))


def _form(v: Term) -> tuple[Fraction, Fraction, list[Term]] | None:
    if v[:2] != ("f", "rsqrt"):
        return None
    arg = v[2]
    parts = list(arg[1:]) if arg[0] == "+" else [arg]
    consts = [p for p in parts if p[0] == "c"]
    rest = [p for p in parts if p[0] != "c"]
    if len(consts) != 1 or not rest:
        return None
    if len(rest) == 1 and rest[0][0] == "*" and rest[0][1][0] == "c":
        f, s = rest[0][1][1], rest[0][2:]
        if len(s) != 1:
            return None
        return f, consts[0][1], list(s[0][1:]) if s[0][0] == "+" else [s[0]]
    return Fraction(1), consts[0][1], rest  # the sum itself, unscaled
