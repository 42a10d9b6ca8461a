"""The verifier's own model of a decode step: the reference program and what each task touches.

Written from the model spec and the kernel's instruction semantics (`compiler/ir/fused.py`,
`compiler/codegen/device.py`), not from the compiler's bookkeeping: the scheduler has its own
region model (`compiler/schedule/regions.py`) and the verifier must not inherit its mistakes.
Nothing here reads `fused.json`; a schedule is judged by what its tasks make the kernel do.

* `Geometry`: every size, from the ModelSpec, the shape template and the split symbols the
  schedule binds (P KV partitions, KS down-projection chunks, NT LM-head tiles).
* `program`: the decode step as the reference computes it, one `Step` per (kind, layer), in
  order. Each step writes whole buffers, except the KV-cache append (position `pos` only).
* `touches`: what the kernel does for one task, given its kind, layer and parameters (the
  kernel picks weights and caches by the task's layer): the regions read and written.

A region is a `Region(buffer, spans)`, one half-open span per dimension. A span bound is affine
in the decode position: `Bound(at_pos, const)` is `at_pos * pos + const`, so the KV-cache write
`[pos, pos + 1)` is exact, while the attention reads use every key up to pos (a superset of a
partition's keys, which are cut from the visible ones at run time; dependencies derived from
supersets are stronger, never weaker).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.ir.fused import Kind
from compiler.spec import ModelSpec, ShapeTemplate


@dataclass(frozen=True)
class Bound:
    """at_pos * pos + const."""

    at_pos: int
    const: int

    @classmethod
    def of(cls, value: int) -> Bound:
        return cls(0, value)


Span = tuple[Bound, Bound]  # [lo, hi)


@dataclass(frozen=True)
class Region:
    buffer: str
    spans: tuple[Span, ...]

    def concrete(self) -> tuple[tuple[int, int], ...] | None:
        """(lo, hi) per dimension, or None if a bound depends on pos."""
        if any(b.at_pos for s in self.spans for b in s):
            return None
        return tuple((lo.const, hi.const) for lo, hi in self.spans)


def _spans(*pairs: tuple[int, int]) -> tuple[Span, ...]:
    return tuple((Bound.of(a), Bound.of(b)) for a, b in pairs)


def region(buffer: str, *pairs: tuple[int, int]) -> Region:
    return Region(buffer, _spans(*pairs))


@dataclass(frozen=True)
class Geometry:
    """Sizes: B batch, S cache positions, P KV partitions, KS down chunks, NT LM-head tiles."""

    spec: ModelSpec
    B: int
    S: int
    P: int
    KS: int
    NT: int

    @classmethod
    def of(cls, spec: ModelSpec, template: ShapeTemplate, binding: dict[str, int]) -> Geometry:
        return cls(
            spec, template.batch, template.max_seq, binding["P"], binding["KS"], binding["NT"]
        )

    @property
    def H(self) -> int:
        return self.spec.hidden_size

    @property
    def I(self) -> int:  # noqa: E743 (the intermediate size)
        return self.spec.intermediate_size

    @property
    def V(self) -> int:
        return self.spec.vocab_size

    @property
    def D(self) -> int:
        return self.spec.head_dim

    @property
    def HQ(self) -> int:
        return self.spec.num_heads

    @property
    def KV(self) -> int:
        return self.spec.num_kv_heads

    @property
    def layers(self) -> int:
        return self.spec.num_layers

    @property
    def CV(self) -> int:
        """Vocabulary rows per LM-head tile: ceil(V / NT)."""
        return -(-self.V // self.NT)

    def buffers(self) -> dict[str, tuple[int, ...]]:
        """Every buffer and weight a step touches, with its shape."""
        B, H, V, D, HQ, KV = self.B, self.H, self.V, self.D, self.HQ, self.KV
        inter = self.I
        out: dict[str, tuple[int, ...]] = {
            "token": (B,),
            "x": (B, H),
            "q": (B, HQ * D),
            "attn_o": (B, HQ, self.P, D),
            "attn_m": (B, HQ, self.P),
            "attn_l": (B, HQ, self.P),
            "attn": (B, HQ * D),
            "act": (B, inter),
            "down": (self.KS, B, H),
            "logits": (B, V),
            "amax_val": (B, self.NT),
            "amax_idx": (B, self.NT),
            "embed": (V, H),
            "norm": (H,),
            "lm_head": (V, H),
            "inv_freq": (D // 2,),
        }
        for layer in range(self.layers):
            out |= {
                f"k_cache.{layer}": (B, KV, self.S, D),
                f"v_cache.{layer}": (B, KV, self.S, D),
                f"w_in.{layer}": (H,),
                f"wq.{layer}": (HQ * D, H),
                f"wk.{layer}": (KV * D, H),
                f"wv.{layer}": (KV * D, H),
                f"wo.{layer}": (H, HQ * D),
                f"w_post.{layer}": (H,),
                f"wg.{layer}": (inter, H),
                f"wu.{layer}": (inter, H),
                f"wd.{layer}": (H, inter),
            }
        return out


WEIGHT_PREFIXES: tuple[str, ...] = ("embed", "norm", "lm_head", "inv_freq", "w_in.", "wq.")
WEIGHT_PREFIXES += ("wk.", "wv.", "wo.", "w_post.", "wg.", "wu.", "wd.")


def is_weight(buffer: str) -> bool:
    """Weights and constants: never written, so they carry no hazards."""
    return buffer.startswith(WEIGHT_PREFIXES)


LAYER_KINDS = (
    Kind.QKV_ROPE_APPEND,
    Kind.ATTN_PARTIAL,
    Kind.ATTN_MERGE,
    Kind.OPROJ_RESIDUAL,
    Kind.GATE_UP_SILU,
    Kind.DOWN_PARTIAL,
    Kind.DOWN_RESIDUAL,
)


@dataclass(frozen=True)
class Step:
    """One instruction of the reference decode step and the regions it writes whole."""

    kind: Kind
    layer: int  # -1 outside the layers
    writes: tuple[Region, ...]


def program(g: Geometry) -> list[Step]:
    """The reference decode step: EMBED, the layers in order, the LM head, the argmax."""
    full = g.buffers()

    def whole(name: str) -> Region:
        return region(name, *((0, n) for n in full[name]))

    def append(name: str) -> Region:  # cache[:, :, pos, :]
        b, kv, _, d = full[name]
        pos = (Bound(1, 0), Bound(1, 1))
        return Region(name, (*_spans((0, b), (0, kv)), pos, *_spans((0, d))))

    steps = [Step(Kind.EMBED, -1, (whole("x"),))]
    for layer in range(g.layers):
        k, v = f"k_cache.{layer}", f"v_cache.{layer}"
        steps += [
            Step(Kind.QKV_ROPE_APPEND, layer, (whole("q"), append(k), append(v))),
            Step(Kind.ATTN_PARTIAL, layer, (whole("attn_o"), whole("attn_m"), whole("attn_l"))),
            Step(Kind.ATTN_MERGE, layer, (whole("attn"),)),
            Step(Kind.OPROJ_RESIDUAL, layer, (whole("x"),)),
            Step(Kind.GATE_UP_SILU, layer, (whole("act"),)),
            Step(Kind.DOWN_PARTIAL, layer, (whole("down"),)),
            Step(Kind.DOWN_RESIDUAL, layer, (whole("x"),)),
        ]
    steps += [
        Step(Kind.LMHEAD_ARGMAX, -1, (whole("logits"), whole("amax_val"), whole("amax_idx"))),
        Step(Kind.ARGMAX_REDUCE, -1, (whole("token"),)),
    ]
    return steps


@dataclass(frozen=True)
class Touch:
    """The regions one task reads and writes."""

    reads: tuple[Region, ...]
    writes: tuple[Region, ...]


class ParamError(ValueError):
    """A task's parameters do not fit its kind."""


def _qkv_rows(r0: int, r1: int, g: Geometry) -> list[tuple[str, int, int, int]]:
    """The elements device.py's qkv_rope_append writes for rows [r0, r1) of [Wq; Wk; Wv], as
    (name, head, lo, hi): elements [lo, hi) of head `head` of q, k or v (and those rows of the
    head in its weight).

    The kernel takes task row v as row j = (r0 + v) mod D of head (r0 + v) / D, the head's
    element e(j) = j / 2 + (j mod 2) * D/2, and pairs it with task row v ^ 1 for RoPE. That is
    the RoPE pair (e, e + D/2) only if r0 and r1 are even (D is even, so rows 2i, 2i + 1 are
    one head's pair; with r0 odd task row v ^ 1 is global row (r0 + v) ^ 1 only by accident,
    and with r1 odd the last row's partner lies outside the task): any other tile is a
    ParamError. Rows [j0, j1) of a head are then elements [j0/2, j1/2) and
    [j0/2 + D/2, j1/2 + D/2), for each head the range meets.
    """
    D, rows = g.D, (g.HQ + 2 * g.KV) * g.D
    if not 0 <= r0 < r1 <= rows:
        raise ParamError(f"qkv_rope_append rows [{r0}, {r1}) outside [0, {rows})")
    if r0 % 2 or r1 % 2:
        raise ParamError(
            f"qkv_rope_append rows [{r0}, {r1}) are not an even range: the kernel would pair "
            "rows of different RoPE pairs"
        )
    out = []
    for h in range(r0 // D, -(-r1 // D)):
        j0, j1 = max(r0 - h * D, 0), min(r1 - h * D, D)
        name, head = (
            ("q", h) if h < g.HQ else ("k", h - g.HQ) if h < g.HQ + g.KV else ("v", h - g.HQ - g.KV)
        )
        if (j0, j1) == (0, D):
            out.append((name, head, 0, D))
        else:
            out += [
                (name, head, j0 // 2, j1 // 2),
                (name, head, j0 // 2 + D // 2, j1 // 2 + D // 2),
            ]
    return out


def touches(kind: Kind, layer: int, params: tuple[int, ...], g: Geometry) -> Touch:
    """What the kernel's device function for `kind` does with these parameters (device.py)."""
    want = {Kind.ATTN_MERGE: 1, Kind.LMHEAD_ARGMAX: 1, Kind.DOWN_PARTIAL: 3, Kind.ARGMAX_REDUCE: 0}
    if len(params) != want.get(kind, 2):
        raise ParamError(f"{kind.value} takes {want.get(kind, 2)} parameters, got {list(params)}")
    if kind in LAYER_KINDS and not 0 <= layer < g.layers:
        raise ParamError(f"{kind.value} task names layer {layer} of {g.layers}")
    B, H, D, G = (0, g.B), (0, g.H), g.D, g.HQ // g.KV
    n = layer
    if kind is Kind.EMBED:
        c0, c1 = params
        return Touch(
            (region("token", B), region("embed", (0, g.V), (c0, c1))), (region("x", B, (c0, c1)),)
        )
    if kind is Kind.QKV_ROPE_APPEND:
        r0, r1 = params
        reads = [region("x", B, H), region(f"w_in.{n}", H), region("inv_freq", (0, D // 2))]
        writes: list[Region] = []
        pos = (Bound(1, 0), Bound(1, 1))
        for name, head, lo, hi in _qkv_rows(r0, r1, g):
            reads.append(region(f"w{name}.{n}", (head * D + lo, head * D + hi), H))
            if name == "q":
                writes.append(region("q", B, (head * D + lo, head * D + hi)))
            else:  # element range [lo, hi) of one cache head, at position pos
                heads = _spans(B, (head, head + 1))
                writes.append(Region(f"{name}_cache.{n}", (*heads, pos, *_spans((lo, hi)))))
        return Touch(tuple(reads), tuple(writes))
    if kind is Kind.ATTN_PARTIAL:
        kvh, p = params
        h0, h1 = kvh * G, (kvh + 1) * G
        # keys [lo + p*c, min(lo + (p+1)*c, pos + 1)), c = ceil((pos + 1 - lo) / P) <= ceil(S / P):
        # within [0, pos + 1) for p >= 0 (empty for p >= P), from p*ceil(S/P) for p < 0
        keys = (Bound.of(min(0, p * -(-g.S // g.P))), Bound(1, 1))
        reads = [region("q", B, (h0 * D, h1 * D))]
        reads += [
            Region(f"{c}_cache.{n}", (*_spans(B, (kvh, kvh + 1)), keys, *_spans((0, D))))
            for c in "kv"
        ]
        parts = (B, (h0, h1), (p, p + 1))
        outs = (
            region("attn_o", *parts, (0, D)),
            region("attn_m", *parts),
            region("attn_l", *parts),
        )
        return Touch(tuple(reads), outs)
    if kind is Kind.ATTN_MERGE:
        (kvh,) = params
        h0, h1 = kvh * G, (kvh + 1) * G
        parts = (B, (h0, h1), (0, g.P))
        inputs: tuple[Region, ...] = (
            region("attn_o", *parts, (0, D)),
            region("attn_m", *parts),
            region("attn_l", *parts),
        )
        return Touch(inputs, (region("attn", B, (h0 * D, h1 * D)),))
    if kind is Kind.OPROJ_RESIDUAL:
        r0, r1 = params
        inputs = (
            region("attn", B, (0, g.HQ * D)),
            region(f"wo.{n}", (r0, r1), (0, g.HQ * D)),
            region("x", B, (r0, r1)),
        )
        return Touch(inputs, (region("x", B, (r0, r1)),))
    if kind is Kind.GATE_UP_SILU:
        r0, r1 = params
        inputs = (
            region("x", B, H),
            region(f"w_post.{n}", H),
            region(f"wg.{n}", (r0, r1), H),
            region(f"wu.{n}", (r0, r1), H),
        )
        return Touch(inputs, (region("act", B, (r0, r1)),))
    if kind is Kind.DOWN_PARTIAL:
        r0, r1, k = params
        if g.I % g.KS:
            raise ParamError(f"KS = {g.KS} does not divide the intermediate size {g.I}")
        cols = (k * (g.I // g.KS), (k + 1) * (g.I // g.KS))
        inputs = (region("act", B, cols), region(f"wd.{n}", (r0, r1), cols))
        return Touch(inputs, (region("down", (k, k + 1), B, (r0, r1)),))
    if kind is Kind.DOWN_RESIDUAL:
        r0, r1 = params
        return Touch(
            (region("down", (0, g.KS), B, (r0, r1)), region("x", B, (r0, r1))),
            (region("x", B, (r0, r1)),),
        )
    if kind is Kind.LMHEAD_ARGMAX:
        (t,) = params
        rows = (min(t * g.CV, g.V), min((t + 1) * g.CV, g.V))
        reads = [region("x", B, H), region("norm", H)]
        writes = [region("amax_val", B, (t, t + 1)), region("amax_idx", B, (t, t + 1))]
        if rows[0] < rows[1]:
            reads.append(region("lm_head", rows, H))
            writes.append(region("logits", B, rows))
        return Touch(tuple(reads), tuple(writes))
    if kind is Kind.ARGMAX_REDUCE:
        return Touch(
            (region("amax_val", B, (0, g.NT)), region("amax_idx", B, (0, g.NT))),
            (region("token", B),),
        )
    raise ParamError(f"unknown kind {kind}")  # pragma: no cover - Kind is closed


def volume(box: tuple[tuple[int, int], ...]) -> int:
    return math.prod(max(0, hi - lo) for lo, hi in box)
