"""`matvec<K>` with the CUDA-core consumer `matvec_fma`, proved from the code: after it, part[v][b]
(the work area at XS_FLOATS + v * B + b) is

    y[v][b] = sum_{c < K} xin(b, c) * W(v, c),   xin(b, c) = src[b * ld + c],  W(v, c) = row(v)[c]

for v < nrows, b < B: the summary `verifier.device.matvec` gives the epilogue.

`matvec` runs for one symbolic consumer thread standing for every warp and lane (`warp` in
[0, NWARPS), the lane as five bits, `verifier.device.lanes`), every loop of constant bounds
unrolled, a lane's `k < width` loop run iteration by iteration under its condition. The staged
inputs resolve through stage's split layout (`verifier.device.staging`, with its obligations),
the weights through the ring (`verifier.device.ring`: the producer `load_<name>` runs too, its
slot sequence is the consumer's), `__shfl_xor_sync` flips a lane bit, `cta_sync` is the barrier
that orders stage's stores before the reads. Each final store of part (the last chunk's, by lane
0 of its warp) then holds a sum of products, each checked here:

* pairing (an obligation): every product is xin(b, c) * W(v, c) for the store's own v and b,
  one column c for both factors;
* partition (enumerated): the columns of the products are [0, K), each once: the lanes' columns
  8 l + 256 m + e, the slices j and the chunks k0 (accumulated, `part + s`) together;
* coverage (enumerated over the warps): the final stores are part[v][b] for v < nrows, b < B,
  each once, by one lane;
* the consumer reads as many slots as the producer fills.

Trusted: produce's copy (its contract, the asm of cp.async), the barriers' placement (cta_sync,
the ring's mbarriers), fmaf as + and * over the reals.
"""

from __future__ import annotations

import copy
from collections import Counter
from typing import Any

from verifier.device import contracts, lanes, rms
from verifier.device import nodes as n
from verifier.device.effects import Store
from verifier.device.execute import Executor
from verifier.device.facts import int_decls
from verifier.device.lvalues import Var
from verifier.device.ring import Ring, W, consumer
from verifier.device.staging import XIN, Staging
from verifier.device.values import FALSE, TRUE, Ptr, Real, Struct, Unsupported
from verifier.device.workarea import WORK, WorkArea
from verifier.obligation import Obligation
from verifier.terms import ZERO, Aff, Term, smt_aff, smt_cond


def prove(
    k: Any,
    bind: Any,
    ranges: dict[str, tuple[int, int]],
    call: tuple[int, Aff, Ptr, int, Any],
    ring: Ring,
    B: int,
    where: str,
) -> tuple[list[Obligation], rms.Form | None]:
    """The obligations that `matvec<K>(nrows, src, ld, norm, ...)` (`call`) computes its summary,
    and for a normed input the form of rstd (`verifier.device.rms`); `ring` holds the slots the
    producer's run filled. Where a sum fails, the reduction helper that broke it is named too
    (`verifier.device.contracts.blame`)."""
    pristine = copy.deepcopy(ring)
    out, form = _prove(k, bind, ranges, call, ring, B, where)
    if not any(failed(ob) for ob in out):
        return out, form

    def fails(kernel: Any) -> bool:
        again, _ = _prove(kernel, bind, ranges, call, copy.deepcopy(pristine), B, where)
        return any(failed(ob) for ob in again)

    check = f"{where.split(',')[0]}: matvec_fma<{call[0]}>"
    for name, first, last in contracts.blame(k, fails):
        why = (
            f"{name} (kernel.cu lines {first}-{last}) breaks its sum: its reference in its place"
            " makes the sums hold"
        )
        out.append(_fails(check, where, first, why))
    return out, form


def _prove(
    k: Any,
    bind: Any,
    ranges: dict[str, tuple[int, int]],
    call: tuple[int, Aff, Ptr, int, Any],
    ring: Ring,
    B: int,
    where: str,
) -> tuple[list[Obligation], rms.Form | None]:
    K, nrows, src, ld, norm = call
    nwarps = _int(k, "NWARPS")
    xs_floats = _int(k, "XS_FLOATS")
    r = {**ranges, **lanes.bit_ranges(), lanes.WARP: (0, nwarps)}
    ex = Executor(k, bind.pointer, bind.element, r)
    staging = Staging(B)
    staging.install(ex)
    consumer(ex, ring)
    _warp_builtins(ex)

    part_floats = _int(k, "PART_FLOATS")
    tail = xs_floats + part_floats
    area = WorkArea(ex, staging, xs_floats, tail, tail + nwarps, B)
    ex.shared[WORK] = area.read
    ex.own = {WORK}
    ex.apart = []
    ex.thread = Aff.of(lanes.WARP).scale(32) + lanes.lane()
    sm = Struct("Smem", (("f", Ptr(WORK, "float", Aff(0), "float")),))
    f = k.function("matvec", 6)
    args = [nrows, src, Aff(ld), norm, sm, Struct("Ring", ())]
    ex.call(f, [Var(ex.cell(a, p.name)) for a, p in zip(args, f.params, strict=True)], [Aff(K)])
    check = f"{where.split(',')[0]}: matvec_fma<{K}>"
    out = staging.obligations(bind.shapes, r, check, where)
    out += _ring(ring, r, check, where)
    out.append(_apart(ex.apart, r, check, where))
    for st in staging.calls:
        if B * st.ldx > xs_floats:
            out.append(_fails(check, where, st.line, "the staged rows overflow XS_FLOATS"))
    finals: dict[Aff, Store] = {}
    for s in ex.stores:
        if s.array == WORK and not s.loop and s.offset.bounds(r)[1] < tail:  # part, not the tail
            finals[s.offset] = s
    if not isinstance(nrows, Aff) or not nrows.is_const():
        raise Unsupported("a matvec of a row count that is not constant per tile")
    out += _outputs(list(finals.values()), K, nrows.const, B, nwarps, xs_floats, r, check, where)
    form = None
    if isinstance(norm, Ptr):
        form, problems = rms.check(area.table(), tail + nwarps, src, ld, K, B, bind.shapes, r)
        if form is not None:
            problems += rms.against_model(form, K, float(bind.fused.dim("eps")))
        at = [s.line for s in ex.stores if s.array == WORK and s.offset.bounds(r)[0] >= tail]
        out += [_fails(check, where, max(at, default=0), f"rms_rstd: {p}") for p in problems]
    return out, form


def _warp_builtins(ex: Any) -> None:
    def warp_id(ex: Any, e: n.Call) -> Aff:
        return Aff.of(lanes.WARP)

    def lane_id(ex: Any, e: n.Call) -> Aff:
        return lanes.lane()

    def barrier(ex: Any, e: n.Call) -> None:
        if ex.guard != TRUE:
            raise Unsupported("cta_sync under a condition", e.line)

    def shfl_xor(ex: Any, e: n.Call) -> Real:
        mask, v, o = (ex.expr(a) for a in e.args)
        if not (isinstance(mask, Aff) and mask == Aff(0xFFFFFFFF)):
            raise Unsupported("__shfl_xor_sync of a partial warp", e.line)
        o = ex.int_value(o, e.line)
        if o <= 0 or o >= 32 or o & (o - 1) or not isinstance(v, Real):
            raise Unsupported("__shfl_xor_sync of a float by a power of two below 32", e.line)
        if lanes.symbols(ex.guard) & set(lanes.BITS):
            raise Unsupported("__shfl_xor_sync where some lanes of the warp are off", e.line)
        return Real(("xor", o, v.term))  # resolved once a lane is chosen (`lanes.at`)

    ex.summaries.update(
        warp_id=warp_id, lane_id=lane_id, cta_sync=barrier, __shfl_xor_sync=shfl_xor
    )


def _outputs(
    finals: list[Store],
    K: int,
    nrows: int,
    B: int,
    nwarps: int,
    xs: int,
    r: dict[str, tuple[int, int]],
    check: str,
    where: str,
) -> list[Obligation]:
    out: list[Obligation] = []
    eqs: list[str] = []
    things: list[Any] = []
    stored: Counter[int] = Counter()
    for s in finals:
        subject = f"{where}, the store of part at kernel.cu line {s.line}"
        at_lanes = [v for v in range(32) if lanes.at(s.guard, lanes.lane_env(v), r) != FALSE]
        if len(at_lanes) != 1:
            out.append(_fails(check, where, s.line, f"part is stored by {len(at_lanes)} lanes"))
            continue
        env = lanes.lane_env(at_lanes[0])
        guard, off = lanes.at(s.guard, env, r), lanes.at(s.offset, env, r)
        v, b = (off - xs).divmod(B, r)
        facts = set(guard[1:]) if guard[0] == "and" else {guard}
        value = s.value.term if isinstance(s.value, Real) else ZERO
        cols: Counter[int] = Counter()
        for prod in _summands(_assume(lanes.at(value, env, r), facts)):
            x, w = _factors(prod, s.line)
            (bx, cx), (vw, cw) = x[2], w[2]
            for a, c in ((bx, b), (vw, v), (cx, cw)):
                if a != c:
                    eqs.append(
                        f"(and {smt_cond(guard, {})} (not (= {smt_aff(a, {})} {smt_aff(c, {})})))"
                    )
                    things.append((a, c, guard))
            if not cx.is_const():
                raise Unsupported("a product's column that depends on more than the lane", s.line)
            cols[cx.const] += 1
        wrong = sorted(c for c in set(cols) | set(range(K)) if cols[c] != (0 <= c < K))
        if wrong:
            why = f"part sums columns {_few(wrong)} other than once each of [0, {K})"
            out.append(_fails(check, subject, s.line, why))
        for w_ in range(nwarps):
            g = lanes.at(guard, {lanes.WARP: Aff(w_)}, r)
            if g not in (TRUE, FALSE):
                raise Unsupported("a store of part whose warps the executor cannot count", s.line)
            o = lanes.at(off, {lanes.WARP: Aff(w_)}, r)
            if g == TRUE:
                stored[o.const] += 1
    wrong = sorted(o - xs for o in set(stored) | set(range(xs, xs + nrows * B)) if stored[o] != 1)
    if wrong:
        line = finals[0].line if finals else 0
        out.append(_fails(check, where, line, f"part elements {_few(wrong)} not stored once"))
    out.append(
        _ob(
            f"{check}: each product of part[v][b] is xin(b, c) * W(v, c)",
            f"{where}, the stores of part at kernel.cu lines {sorted({s.line for s in finals})}",
            int_decls(things, r),
            f"(assert (or false {' '.join(eqs)}))\n",
            "a product of part pairs the wrong input, weight row or column",
        )
    )
    return out


def _ring(ring: Ring, r: dict[str, tuple[int, int]], check: str, where: str) -> list[Obligation]:
    out = []
    if ring.position != len(ring.slots):
        why = f"the consumer reads {ring.position} slots, the producer fills {len(ring.slots)}"
        out.append(_fails(check, where, 0, why))
    bad, things = [], []
    for rd in ring.reads:
        s = ring.slots[rd.slot]
        seg, col = smt_aff(rd.segment, {}), smt_aff(rd.column, {})
        inside = (
            f"(and (<= 0 {seg}) (< {seg} {smt_aff(s.rows, {})}) (<= 0 {col})"
            f" (< {col} {smt_aff(s.width, {})}))"
        )
        bad.append(f"(and {smt_cond(rd.guard, {})} (not {inside}))")
        things.append((rd.segment, rd.column, rd.guard, s.rows))
    lines = sorted({rd.line for rd in ring.reads})
    out.append(
        _ob(
            f"{check}: every weight read lies in a segment the producer copied",
            f"{where}, the reads at kernel.cu lines {lines}",
            int_decls(things, r),
            f"(assert (or false {' '.join(bad)}))\n",
            "a weight read misses the segment its slot holds",
        )
    )
    return out


def _apart(
    apart: list[tuple[Aff, Term, Store, int]], r: dict[str, tuple[int, int]], check: str, where: str
) -> Obligation:
    bad = [
        f"(and {smt_cond(g, {})} {smt_cond(s.guard, {})} (= {smt_aff(o, {})} {smt_aff(s.offset, {})}))"
        for o, g, s, _ in apart
    ]
    lines = sorted({line for *_, line in apart})
    return _ob(
        f"{check}: no read of the staged inputs meets a store of part",
        f"{where}, the reads at kernel.cu lines {lines}",
        int_decls([(o, g, s.offset, s.guard) for o, g, s, _ in apart], r),
        f"(assert (or false {' '.join(bad)}))\n",
        "a read of the staged inputs may hit a store of part",
    )


def _assume(t: Term, facts: set[Term]) -> Term:
    """t with the ites whose condition is one of `facts` (the store's guard) resolved."""
    if not isinstance(t, tuple) or not t or t[0] in ("v", "c"):
        return t
    if t[0] == "ite":
        if t[1] in facts:
            return _assume(t[2], facts)
        if ("not", t[1]) in facts:
            return _assume(t[3], facts)
    return tuple(_assume(x, facts) if isinstance(x, tuple) else x for x in t)


def _summands(t: Term) -> list[Term]:
    if t == ZERO:
        return []
    if t[0] == "+":
        return [x for y in t[1:] for x in _summands(y)]
    return [t]


def _factors(t: Term, line: int) -> tuple[Term, Term]:
    fs = list(t[1:]) if t[0] == "*" else [t]
    x = [f for f in fs if f[:2] == ("v", XIN)]
    w = [f for f in fs if f[:2] == ("v", W)]
    if len(fs) != 2 or len(x) != 1 or len(w) != 1:
        raise Unsupported("a term of part that is not a staged input times a weight", line)
    return x[0], w[0]


def _few(xs: list[int]) -> str:
    return ", ".join(map(str, xs[:6])) + (", ..." if len(xs) > 6 else "")


def _int(k: Any, name: str) -> int:
    v = k.constant(name)
    if not isinstance(v, Aff) or not v.is_const():
        raise Unsupported(f"{name} is not an integer constexpr")
    return v.const


def _ob(check: str, subject: str, facts: str, goal: str, why: str) -> Obligation:
    return Obligation("f", check, -1, subject, facts, goal, data={"mode": "device", "why": why})


def failed(ob: Obligation) -> bool:
    """Whether `ob` is a failure found by enumeration (`_fails`), not a query left to the solver."""
    return ob.goal == FAILS


FAILS = "(assert true)\n"


def _fails(check: str, where: str, line: int, why: str) -> Obligation:
    at = f", kernel.cu line {line}" if line else ""
    return _ob(f"{check}: computes its summary", f"{where}{at}: {why}", "", FAILS, why)
