"""The staged inputs of the fma matvec, for the symbolic executor (`verifier.device.fma`):
`stage(xs, ldx, src, ld, k0, n, rstd, norm_w)` copies xin[b][k0 : k0 + n] into the split layout

    L(b, k) = b * ldx + (k & 4) * (ldx / 8) + k / 8 * 4 + k % 4

(of the 8 columns of group k / 8, the first 4 at 4 (k / 8), the last 4 at ldx / 2 + 4 (k / 8)).
stage's body runs (its thread-strided loop summarized as usual); the obligations prove that each
of its stores puts xin[b][k0 + k] at L(b, k) for some b < B, k < n, that the iterations store
disjoint places, and that they are B * n: so after the barrier every place of L's image holds
its element, once. A consumer's read of the staged area at x is then xin[L^-1(x)], noted as
("v", "@xin", (b, k0 + k)), once an obligation proves x inside the image: L^-1(x) in [0, B) x
[0, n) and L(L^-1(x)) = x.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from verifier.device import nodes as n
from verifier.device.effects import Store, Strided
from verifier.device.facts import int_decls
from verifier.device.values import NULL, TRUE, Ptr, Real, Unsupported, rename
from verifier.obligation import Obligation
from verifier.terms import Aff, Term, smt_aff, smt_cond

Ranges = dict[str, tuple[int, int]]

XIN = "@xin"  # xin(b, c): column c of input row b
RSTD = "@rstd"  # rstd(b): the RMSNorm scale of row b (`verifier.device.rms`)


def layout(b: Aff, k: Aff, ldx: int, r: Ranges) -> Aff:
    bit = k.divmod(4, r)[0].divmod(2, r)[1]  # (k & 4) / 4
    return b.scale(ldx) + bit.scale(ldx // 2) + k.divmod(8, r)[0].scale(4) + k.divmod(4, r)[1]


def inverse(x: Aff, ldx: int, r: Ranges) -> tuple[Aff, Aff]:
    b, rest = x.divmod(ldx, r)
    half, q = rest.divmod(ldx // 2, r)
    g, e = q.divmod(4, r)
    return b, g.scale(8) + half.scale(4) + e


@dataclass
class Staged:
    """One stage call: its arguments and the stores of its strided loop."""

    src: Ptr
    ld: int
    k0: int
    n: int
    ldx: int
    base: Aff  # xs's offset in the work area
    line: int
    stores: list[Store] = field(default_factory=list)
    loops: list[Strided] = field(default_factory=list)
    norm: Ptr | None = None  # the RMSNorm weight: xin = src * rstd(b) * norm


@dataclass(frozen=True)
class XsRead:
    staged: Staged
    x: Aff
    guard: Term
    line: int


class Staging:
    """The stage calls of one run and the reads of their staged inputs."""

    def __init__(self, B: int):
        self.B = B
        self.calls: list[Staged] = []
        self.reads: list[XsRead] = []

    def install(self, ex: Any) -> None:
        def stage(ex: Any, e: n.Call) -> None:
            if len(e.args) != 8:
                raise Unsupported("stage(xs, ldx, src, ld, k0, n, rstd, norm_w) expected", e.line)
            xs, ldx, src, ld, k0, cols, _, norm = (ex.expr(a) for a in e.args)
            if norm is not NULL and not (isinstance(norm, Ptr) and norm.elem == "bf16"):
                raise Unsupported("stage of a norm weight that is not a bf16 array", e.line)
            if not isinstance(xs, Ptr) or not isinstance(src, Ptr) or src.elem != "float":
                raise Unsupported("stage of something other than float rows", e.line)
            iv = [ex.int_value(v, e.line) for v in (ldx, ld, k0, cols)]
            if iv[0] % 8:
                raise Unsupported(f"a staged row of {iv[0]} floats, not whole 8-groups", e.line)
            st = Staged(src, iv[1], iv[2], iv[3], iv[0], xs.offset, e.line)
            st.norm = norm if isinstance(norm, Ptr) else None
            n0, l0 = len(ex.stores), len(ex.strided)
            del ex.summaries["stage"]
            try:
                ex.call_expr(e)
            finally:
                ex.summaries["stage"] = stage
            st.stores, st.loops = ex.stores[n0:], ex.strided[l0:]
            self.calls.append(st)

        ex.summaries["stage"] = stage

    def read(self, ex: Any, off: Aff, line: int) -> Real:
        if not self.calls:
            raise Unsupported("a read of the staged inputs before stage", line)
        st = self.calls[-1]
        x = off - st.base
        self.reads.append(XsRead(st, x, ex.guard, line))
        b, k = inverse(x, st.ldx, ex.ranges)
        return Real(("v", XIN, (b, k + st.k0)))

    def obligations(
        self, shapes: dict[str, tuple[int, ...]], ranges: Ranges, check: str, where: str
    ) -> list[Obligation]:
        out: list[Obligation] = []
        for st in self.calls:
            out += self._stage(st, shapes, ranges, check, where)
        bad = []
        for rd in self.reads:
            b, k = inverse(rd.x, rd.staged.ldx, ranges)
            ok = self._inside(b, k, rd.x, rd.staged, ranges)
            bad.append(f"(and {smt_cond(rd.guard, {})} (not {ok}))")
        things = [(rd.x, rd.guard) for rd in self.reads]
        lines = sorted({rd.line for rd in self.reads})
        out.append(
            _ob(
                f"{check}: every read of the staged inputs lies in what stage wrote",
                f"{where}, the reads at kernel.cu lines {lines}",
                int_decls(things, ranges),
                f"(assert (or false {' '.join(bad)}))\n",
                "a read of the staged inputs misses what stage wrote",
            )
        )
        return out

    def _inside(self, b: Aff, k: Aff, x: Aff, st: Staged, r: Ranges) -> str:
        back = layout(b, k, st.ldx, r)
        return (
            f"(and (<= 0 {smt_aff(b, {})}) (< {smt_aff(b, {})} {self.B}) (<= 0 {smt_aff(k, {})})"
            f" (< {smt_aff(k, {})} {st.n}) (= {smt_aff(back, {})} {smt_aff(x, {})}))"
        )

    def _stage(
        self, st: Staged, shapes: dict[str, tuple[int, ...]], ranges: Ranges, check: str, where: str
    ) -> list[Obligation]:
        subject = f"{where}, stage at kernel.cu line {st.line}"
        count = sum(lp.count for lp in st.loops) * len(st.stores) // max(len(st.loops), 1)
        if len(st.loops) != 1 or count != self.B * st.n:
            why = f"stage stores {count} floats in {len(st.loops)} loops, B * n is {self.B * st.n}"
            return [
                _ob(f"{check}: stage stores every input once", subject, "", "(assert true)\n", why)
            ]
        bad, things = [], []
        for s in st.stores:
            v = s.value.term if isinstance(s.value, Real) else ("c",)
            x, others = _source(v, st, s.line)
            if s.guard != TRUE:
                raise Unsupported("stage stores under a condition", s.line)
            at = flat(x[2], shapes[st.src.array])
            b, k = (at - st.src.offset - st.k0).divmod(st.ld, ranges)
            ok = [self._inside(b, k, s.offset - st.base, st, ranges)]
            if st.norm is not None:  # the factors rstd(b) and norm[k0 + k]
                r, w = others
                wat = flat(w[2], shapes[st.norm.array]) - st.norm.offset - st.k0
                ok += [f"(= {smt_aff(r[2][0], {})} {smt_aff(b, {})})"]
                ok += [f"(= {smt_aff(wat, {})} {smt_aff(k, {})})"]
                things.append((r[2][0], wat))
            bad.append(f"(not (and {' '.join(ok)}))")
            things.append((s.offset, at))
        out = [
            _ob(
                f"{check}: stage puts xin[b][k0 + k] at its split-layout place L(b, k)",
                subject,
                int_decls(things, ranges),
                f"(assert (or false {' '.join(bad)}))\n",
                f"stage (kernel.cu line {st.line}) stores an input off its split-layout place",
            )
        ]
        i = st.loops[0].symbol
        j = f"{i}_other"
        pairs = [
            f"(= {smt_aff(s.offset, {})} {smt_aff(rename(t.offset, {i: j}), {})})"
            for s in st.stores
            for t in st.stores
        ]
        both: Ranges = {**ranges, j: ranges[i]}
        things2 = [(s.offset, rename(s.offset, {i: j})) for s in st.stores]
        out.append(
            _ob(
                f"{check}: the iterations of stage's loop store disjoint places",
                subject,
                int_decls(things2, both),
                f"(assert (and (not (= {i} {j})) (or false {' '.join(pairs)})))\n",
                f"two iterations of stage (kernel.cu line {st.line}) store one place",
            )
        )
        return out


def _source(v: Term, st: Staged, line: int) -> tuple[Term, list[Term]]:
    """(the source element, the other factors: rstd then norm) of a stored value."""
    fs = list(v[1:]) if v[0] == "*" else [v]
    xs = [f for f in fs if f[:2] == ("v", st.src.array)]
    want = 1 if st.norm is None else 3
    if len(xs) != 1 or len(fs) != want:
        raise Unsupported("stage stores something other than its (normed) source's elements", line)
    if st.norm is None:
        return xs[0], []
    r = [f for f in fs if f[:2] == ("v", RSTD)]
    w = [f for f in fs if f[:2] == ("v", st.norm.array)]
    if len(r) != 1 or len(w) != 1:
        raise Unsupported("a normed input that is not x * rstd(b) * norm[k]", line)
    return xs[0], [r[0], w[0]]


def flat(idx: tuple[Aff, ...], shape: tuple[int, ...]) -> Aff:
    out, stride = Aff(0), 1
    for i, d in zip(reversed(idx), reversed(shape), strict=True):
        out, stride = out + i.scale(stride), stride * d
    return out


def _ob(check: str, subject: str, facts: str, goal: str, why: str) -> Obligation:
    return Obligation("f", check, -1, subject, facts, goal, data={"mode": "device", "why": why})
