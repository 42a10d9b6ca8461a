"""The call `matvec<K>(nrows, src, ld, norm_w, sm, ring)` of a Matvec kind's task body, summarized
for the symbolic executor (`verifier.device.execute`): its outputs part[v][b] (the work area
`sm.f + XS_FLOATS`, read by the kind's epilogue as y[v * B + b]) are

    y[v][b] = sum_{k < K} xin[b][k] * row(v)[k],   xin[b][k] = src[b * ld + k]

over the reals, for every v < nrows and batch row b; for an RMS-normed input (norm_w given)
xin[b][k] = src[b * ld + k] * rstd(b) * norm_w[k], rstd(b) = rsqrt(f * sum_k src[b][k]^2 + e)
with the code's f and e (`verifier.device.rms`). What is taken from the code: K, nrows, src and
ld from the consumer's call; the weight row map `row(v)` from the kind's producer function
`load_<name>` (whose load_matvec K and nrows must be the consumer's), the lambda then run for
the epilogue's own v (its returns under conditions as a choice of rows; a RoPE neighbour v +- 1
split by the parity of v where the read's guard names it). The summary is proved from the code
by `verifier.device.fma` (its obligations travel with it). Refused (an `Unsupported` naming the
line): the tensor-core consumer (MMA: its bf16 split is not modelled).

`reads` collects the epilogue's reads of the outputs: `symexec` proves each lies in
[0, nrows) x [0, B).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

from verifier.algebra import walk
from verifier.device import fma, lanes, rms
from verifier.device import nodes as n
from verifier.device.ring import Ring
from verifier.device.values import (
    FALSE,
    NULL,
    TRUE,
    Bool,
    Choice,
    Closure,
    Ptr,
    Real,
    Unsupported,
)
from verifier.obligation import Obligation
from verifier.terms import Aff, Term, ite, mul, summed

PART = "smem_part"  # the summarized outputs, as the executor's shared array


@dataclass
class Matvec:
    """One summarized call: what the consumer passed and the producer's row map."""

    K: int = 0
    nrows: Aff = field(default_factory=lambda: Aff(0))
    src: Ptr | None = None
    ld: int = 0
    row: Callable[[Aff], list[tuple[Term, Ptr]]] | None = None
    line: int = 0
    function: str = ""
    fresh: int = 0
    xs: int = 0  # XS_FLOATS: where part begins in the work area
    obligations: list[Obligation] = field(default_factory=list)  # that prove the summary
    norm: Ptr | None = None  # RMSNorm weight: xin = src * rstd(b) * norm
    rms: tuple[Fraction, Fraction] | None = None  # rstd(b) = rsqrt(f * sum src^2 + e): (f, e)


def install(
    ex: Any, producer: Callable[[Ring], Any], B: int, bind: Any, where: str
) -> list[Matvec]:
    """Summarize `matvec` calls in executor ex; `producer(ring)` returns an executor that has run
    the kind's producer function, its slots noted in `ring` (`verifier.device.ring.producer`).
    Each summary carries the obligations that prove it from the code (`verifier.device.fma`).
    Returns the list the summaries of this run go to."""
    done: list[Matvec] = []

    def summary(ex: Any, e: n.Call) -> None:
        if mma(ex.k):
            raise Unsupported("matvec_mma (MMA) is not proved: fma only", e.line)
        targs = [ex.expr(x) for x in e.template_args if not isinstance(x, n.Type)]
        if len(targs) != 1 or len(e.args) != 6:
            raise Unsupported("matvec<K>(nrows, src, ld, norm_w, sm, ring) expected", e.line)
        K = ex.int_value(targs[0], e.line)
        nrows, src, ld, norm = (ex.expr(a) for a in e.args[:4])
        if norm is not NULL and not (isinstance(norm, Ptr) and norm.elem == "bf16"):
            raise Unsupported("matvec of a norm weight that is not a bf16 array", e.line)
        if not isinstance(src, Ptr) or src.elem != "float" or not isinstance(nrows, Aff):
            raise Unsupported("matvec of a source that is not a float array", e.line)
        m = Matvec(K, nrows, src, ex.int_value(ld, e.line), None, e.line, ex.function)
        m.xs = ex.int_value(ex.k.constant("XS_FLOATS"), e.line)
        ring = Ring()
        prod = producer(ring)
        if ring.row is None:
            raise Unsupported("the producer never calls load_matvec", e.line)
        if ring.K != K or ring.nrows != nrows:
            raise Unsupported(
                f"the producer streams load_matvec<{ring.K}> of {_text(ring.nrows)} rows, "
                f"the consumer reads matvec<{K}> of {_text(nrows)}",
                e.line,
            )
        row = ring.row
        m.row = lambda v: _row(prod, row, v, e.line)
        m.obligations, m.rms = fma.prove(
            ex.k, bind, ex.ranges, (K, nrows, src, m.ld, norm), ring, B, where
        )
        m.norm = norm if isinstance(norm, Ptr) else None
        done.append(m)
        if m.norm is not None and m.rms is None:
            raise Unsupported("rms_rstd's outputs are not in the form proved", e.line)
        ex.shared[PART] = lambda off, line: Real(_split(ex, m, off, B, line))

    def unset(off: Aff, line: int) -> Any:
        raise Unsupported("a read of the matvec outputs before matvec", line)

    ex.summaries["matvec"] = summary
    ex.shared[PART] = unset
    return done


def mma(k: Any) -> bool:
    """Whether kernel.cu's matvec runs on tensor cores (the MMA constexpr)."""
    v = k.constant("MMA")
    return not (v is None or v == Aff(0) or (isinstance(v, Bool) and v.cond == FALSE))


def _row(prod: Any, row: Closure, v: Aff, line: int) -> list[tuple[Term, Ptr]]:
    """The weight row of output v: (condition, row) options, the first that holds."""
    p = prod.call_closure(row, [v], line)
    options = list(p.options) if isinstance(p, Choice) else [(TRUE, p)]
    for _, q in options:
        if not isinstance(q, Ptr) or q.elem != "bf16":
            raise Unsupported("a row map that returns no bf16 weight row", line)
    return options


def _split(ex: Any, m: Matvec, off: Aff, B: int, line: int) -> Term:
    """y at `off`; where the row map cannot be run at once (a RoPE neighbour v + 1 whose head
    the bounds do not know), by the parity of the row, each parity the read's guard allows."""
    v = (off - m.xs).divmod(B, ex.ranges)[0]
    base = v - v.const
    half, parity = base.divmod(2, ex.ranges)
    atom = parity.terms[0][0] if len(parity.terms) == 1 and not parity.const else None
    if not v.const or atom is None or atom not in set(walk(ex.guard)):
        return _output(ex, m, off, B, line)
    cases = []
    for p in (0, 1):
        if lanes.at(ex.guard, {atom: Aff(p)}, ex.ranges) == FALSE:
            continue
        shifted = off + (half.scale(2) + p - base).scale(B)
        cases.append((("=", parity, Aff(p)), _output(ex, m, shifted, B, line)))
    if not cases:
        raise Unsupported("a read of the matvec outputs no path reaches", line)
    out = cases[-1][1]
    for c, t in reversed(cases[:-1]):
        out = ite(c, t, out)
    return out


def _output(ex: Any, m: Matvec, off: Aff, B: int, line: int) -> Term:
    """y[v][b] at work-area offset `off` of part (v * B + b)."""
    assert m.src is not None and m.row is not None
    v, b = (off - m.xs).divmod(B, ex.ranges)
    m.fresh += 1
    k = f"mk{m.fresh}"
    ex.ranges[k] = (0, m.K)
    w = m.row(v)
    x: Term = ("v", m.src.array, ex.element(m.src.array, m.src.offset + b.scale(m.ld) + Aff.of(k)))
    if m.norm is not None and m.rms is not None:
        ex.ranges[f"{k}r"] = (0, m.K)
        r = rms.term(m.rms, m.src, m.ld, m.K, b, ex.element, f"{k}r")
        x = mul(x, r, ("v", m.norm.array, ex.element(m.norm.array, m.norm.offset + Aff.of(k))))
    wt = ("v", w[-1][1].array, ex.element(w[-1][1].array, w[-1][1].offset + Aff.of(k)))
    for c, p in reversed(w[:-1]):
        wt = ite(c, ("v", p.array, ex.element(p.array, p.offset + Aff.of(k))), wt)
    return summed(k, m.K, mul(x, wt))


def _text(a: Any) -> str:
    return str(a.const) if isinstance(a, Aff) and a.is_const() else repr(a)
