"""What each fused instruction computes, one output element as a term (`verifier.terms`).

The verifier's own reading of the instruction semantics (`compiler/ir/fused.py`, implemented by
kernel.cu's device functions), with the instruction's operands as fused.json names them and
its parameters as fused.json gives them (eps, the RoPE inverse frequencies; kernel.cu's
constants are checked against these separately). Arrays are named by role (`role`): a buffer
or weight of the instruction's own layer loses its layer number, so every layer's terms are the
same text and share one proof; an operand of another layer keeps its number and cannot match.

`Fused(instr, g, ...).output(buffer, idx)` is element idx of an output buffer. Reads of a
buffer listed in `inline` are replaced by its defining instruction's term (the split-K partials
`down`, which the model graph has no value for).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from fractions import Fraction

from compiler.ir.fused import FusedGraph, Instr, Kind
from compiler.ir.ops import DType
from verifier.graph_terms import round_to
from verifier.model import Geometry
from verifier.terms import Aff, Term, add, app, compare, const, ite, mul, neg, summed


def role(name: str, layer: int) -> str:
    """The array name of an operand: layer-free for the instruction's own layer."""
    own = f"model.layers.{layer}."
    if name.startswith(own):
        name = name[len(own) :]
    if name.endswith(f".{layer}") and name.split(".")[0] in ("k_cache", "v_cache"):
        name = name.rsplit(".", 1)[0]
    return "".join(c if c.isalnum() else "_" for c in name)


# the output buffers' index variables: (name, extent) per dimension of the buffer's shape
def index_vars(buffer: str, g: Geometry) -> list[tuple[str, int]]:
    hq, kv, d = g.spec.num_heads, g.spec.num_kv_heads, g.D
    base = buffer.split(".")[0]
    return {
        "x": [("b", g.B), ("i", g.H)],
        "q": [("b", g.B), ("h", hq), ("d", d)],
        "k_cache": [("b", g.B), ("g", kv), ("j", g.S), ("d", d)],
        "v_cache": [("b", g.B), ("g", kv), ("j", g.S), ("d", d)],
        "attn": [("b", g.B), ("h", hq), ("d", d)],
        "act": [("b", g.B), ("j", g.I)],
        "down": [("s", g.KS), ("b", g.B), ("i", g.H)],
        "logits": [("b", g.B), ("v", g.V)],
    }[base]


def flat_shape(buffer: str, g: Geometry) -> tuple[int, ...]:
    """The buffer's shape as kernel.cu lays it out (row-major)."""
    hq, kv, d = g.spec.num_heads, g.spec.num_kv_heads, g.D
    base = buffer.split(".")[0]
    return {
        "x": (g.B, g.H),
        "q": (g.B, hq * d),
        "k_cache": (g.B, kv, g.S, d),
        "v_cache": (g.B, kv, g.S, d),
        "attn": (g.B, hq * d),
        "act": (g.B, g.I),
        "down": (g.KS, g.B, g.H),
        "logits": (g.B, g.V),
        "token": (g.B,),
    }[base]


class Fused:
    def __init__(
        self,
        instr: Instr,
        g: Geometry,
        ranges: dict[str, tuple[int, int]],
        tables: dict[str, list[Fraction]],
        inv_freq: tuple[float, ...],
        inline: Mapping[str, Instr] | None = None,
    ):
        self.i, self.g, self.ranges, self.tables = instr, g, ranges, tables
        self.inv_freq, self.inline = inv_freq, inline or {}
        self.fresh = 0

    def arr(self, slot: int) -> str:
        return role(self.i.inputs[slot], self.i.layer)

    def var(self, n: int) -> str:
        self.fresh += 1
        name = f"c{self.fresh}"
        self.ranges[name] = (0, n)
        return name

    def read(self, slot: int, *idx: Aff) -> Term:
        name = self.i.inputs[slot]
        if name in self.inline:
            sub = Fused(self.inline[name], self.g, self.ranges, self.tables, self.inv_freq)
            sub.fresh = self.fresh + 100
            out = sub.output(name, idx)
            self.fresh = sub.fresh
            return out
        return ("v", self.arr(slot), idx)

    def rms(self, xs: int, ws: int, b: Aff) -> tuple[Term, str]:
        """(x[b, k] * rstd[b] * w[k], k) for a fresh k: the RMSNorm of row b, element k."""
        eps = const(round_to(float(self.i.attr("eps")), DType.F32))
        k = self.var(self.g.H)
        sq = summed(k, self.g.H, mul(self.read(xs, b, Aff.of(k)), self.read(xs, b, Aff.of(k))))
        rstd = app("rsqrt", add(mul(const(Fraction(1, self.g.H)), sq), eps))
        j = self.var(self.g.H)
        return mul(self.read(xs, b, Aff.of(j)), rstd, ("v", self.arr(ws), (Aff.of(j),))), j

    def matvec(self, xs: int, ws: int, wslot: int, b: Aff, row: Aff) -> Term:
        h, k = self.rms(xs, ws, b)
        return summed(k, self.g.H, mul(h, ("v", self.arr(wslot), (row, Aff.of(k)))))

    def rope(self, y_at: Callable[[Aff], Term], d: Aff) -> Term:
        """rope(y)[d] = y[d] cos(a) + rotate_half(y)[d] sin(a), a = pos * inv_freq[d mod D/2],
        rotate_half(y)[d] = -y[d + D/2] for d < D/2, else y[d - D/2]."""
        half = self.g.D // 2
        self.tables["inv_freq"] = [round_to(v, DType.F32) for v in self.inv_freq]

        def angle(i: Aff) -> Term:
            return mul(("r", Aff.of("pos")), ("v", "inv_freq", (i,)))

        first = add(
            mul(y_at(d), app("cos", angle(d))), mul(neg(y_at(d + half)), app("sin", angle(d)))
        )
        second = add(
            mul(y_at(d), app("cos", angle(d - half))),
            mul(y_at(d - half), app("sin", angle(d - half))),
        )
        return ite(compare("<", d, Aff(half), self.ranges), first, second)

    def output(self, buffer: str, idx: tuple[Aff, ...]) -> Term:
        kind, g = self.i.kind, self.g
        if kind is Kind.EMBED:
            b, i = idx
            tok = Aff.of(("vi", self.arr(0), (b,)))
            return ("v", self.arr(1), (tok, i))
        if kind is Kind.QKV_ROPE_APPEND:
            b = idx[0]
            if buffer == "q":
                _, h, d = idx
                row = lambda dd: h.scale(g.D) + dd  # noqa: E731
                y = lambda dd: self.matvec(0, 1, 2, b, row(dd))  # noqa: E731
                return self.rope(y, d)
            _, gg, j, d = idx
            is_k = buffer.startswith("k_cache")
            row = lambda dd: gg.scale(g.D) + dd  # noqa: E731
            y = lambda dd: self.matvec(0, 1, 3 if is_k else 4, b, row(dd))  # noqa: E731
            new = self.rope(y, d) if is_k else y(d)
            old = ("v", self.arr(7 if is_k else 8), idx)
            return ite(compare("=", j, Aff.of("pos"), self.ranges), new, old)
        if kind is Kind.OPROJ_RESIDUAL:
            b, i = idx
            k = self.var(g.spec.num_heads * g.D)
            proj = summed(
                k,
                g.spec.num_heads * g.D,
                mul(self.read(0, b, Aff.of(k)), ("v", self.arr(1), (i, Aff.of(k)))),
            )
            return add(self.read(2, b, i), proj)
        if kind is Kind.GATE_UP_SILU:
            b, j = idx
            gate = self.matvec(0, 1, 2, b, j)
            up = self.matvec(0, 1, 3, b, j)
            return mul(gate, app("sigmoid", gate), up)
        if kind is Kind.DOWN_PARTIAL:
            s, b, i = idx
            ci = g.I // g.KS
            c = self.var(ci)
            col = s.scale(ci) + Aff.of(c)
            return summed(c, ci, mul(self.read(0, b, col), ("v", self.arr(1), (i, col))))
        if kind is Kind.DOWN_RESIDUAL:
            b, i = idx
            chunk = self.var(g.KS)
            return add(self.read(1, b, i), summed(chunk, g.KS, self.read(0, Aff.of(chunk), b, i)))
        if kind is Kind.ATTN_MERGE:
            # M = max_p m_p; attn = sum_p exp(m_p - M) o_p / sum_p exp(m_p - M) l_p (fused.py)
            b, h, d = idx
            ms = [self.read(1, b, h, Aff(p)) for p in range(g.P)]
            top = ms[0]
            for m in ms[1:]:
                top = ("max", top, m)
            w = [app("exp", add(m, neg(top))) for m in ms]
            num = add(*(mul(w[p], self.read(0, b, h, Aff(p), d)) for p in range(g.P)))
            den = add(*(mul(w[p], self.read(2, b, h, Aff(p))) for p in range(g.P)))
            return mul(num, app("recip", den))
        if kind is Kind.LMHEAD_ARGMAX and buffer == "logits":
            b, v = idx
            return self.matvec(0, 1, 2, b, v)
        raise KeyError(f"{kind.value} has no algebra for {buffer}")


def rope_table(kernel: str, fused: FusedGraph) -> str:
    """'' if kernel.cu's INV_FREQ holds fused.json's rope_inv_freq rounded to fp32, else why."""
    try:
        want = [round_to(v, DType.F32) for v in fused.buffer("rope_inv_freq").value or ()]
    except KeyError:
        return "fused.json has no rope_inv_freq"
    m = re.search(r"INV_FREQ\[[^\]]*\]\s*=\s*\{([^}]*)\}", kernel)
    if m is None:
        return "kernel.cu declares no INV_FREQ table"
    got = [
        round_to(float(x.strip().rstrip("f")), DType.F32)
        for x in m.group(1).split(",")
        if x.strip()
    ]
    if got == want:
        return ""
    bad = next(
        (i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b),
        min(len(got), len(want)),
    )
    return f"INV_FREQ[{bad}] is not fused.json's (of {len(want)} entries, kernel.cu has {len(got)})"
