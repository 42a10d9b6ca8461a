"""Buffer regions a task reads and writes: the single source of truth for dependencies.

A region is a `Box`: one half-open index range `(lo, hi)` per dimension of the named buffer (or
weight), in that buffer's own layout (fused.py). `task_access` gives, for one task (an
instruction plus its tile parameters, see schedule.py) and one binding of the split symbols,
every region the task reads and every region it writes. The scheduler derives its dependencies
from these regions, the interpreter checks every access against them, and `tiles.py` touches
nothing outside them (tests/test_interpret.py poisons everything else with NaN to show it).

Runtime position. The schedule is static but `pos` is a runtime value, so `task_access` has two
modes:

* `pos=None` (static, conservative; what the scheduler uses): a QKV task's cache write covers
  its elements' `[0:B, g, 0:S, e0:e1]` slab of each KV head (all of `0:D` for a whole head; for
  part of a head, its two element ranges, one in each half: schedule.py's pair order), and an
  attention task's cache read covers the whole `[0, S)`: its partition is cut from the visible
  keys at run time, so over all `pos` it may read any key. Every runtime access is inside these
  boxes, so dependencies derived from them hold at every `pos`.
* `pos=<int>` (exact; what the interpreter checks): the cache write is the single position
  `[pos, pos+1)`, and the attention read is `[lo + p*c, min(lo + (p+1)*c, pos+1))` with
  `lo = max(0, pos - window + 1)` and `c = ceil((pos + 1 - lo) / P)`, omitted when empty.

Weights and constants (`rope_inv_freq`) appear as reads too: they are never written, so they
carry no hazards, but their sizes are the balanced policy's cost model. The embedding gather
reads rows chosen by the tokens at run time; its region is conservatively every row.
"""

from __future__ import annotations

import math
from collections.abc import Container, Iterable, Mapping
from dataclasses import dataclass

from compiler.ir.fused import FusedGraph, Instr, Kind

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Geometry:
    """Model dimensions and bound split symbols: every size a tile needs.

    B batch, S cache capacity, P KV partitions, KS down-projection chunks, NT LM-head tiles,
    H hidden, I intermediate, V vocab, Hq query heads, KV key/value heads, D head dim.
    """

    B: int
    S: int
    P: int
    KS: int
    NT: int
    H: int
    I: int  # noqa: E741 (the intermediate size, as in the docstrings)
    V: int
    Hq: int
    KV: int
    D: int
    window: int | None
    eps: float

    @classmethod
    def of(cls, fg: FusedGraph, binding: Mapping[str, int]) -> Geometry:
        return cls(
            B=binding["B"], S=binding["S"], P=binding["P"], KS=binding["KS"], NT=binding["NT"],
            H=fg.dim("hidden"), I=fg.dim("intermediate"), V=fg.dim("vocab"),
            Hq=fg.dim("heads"), KV=fg.dim("kv_heads"), D=fg.dim("head_dim"),
            window=fg.dim("sliding_window"), eps=float(fg.dim("eps")),
        )  # fmt: skip

    @property
    def G(self) -> int:
        """Query heads per KV head."""
        return self.Hq // self.KV

    @property
    def CI(self) -> int:
        """Intermediate columns per down-projection chunk."""
        return self.I // self.KS

    @property
    def CV(self) -> int:
        """Vocabulary rows per LM-head tile."""
        return math.ceil(self.V / self.NT)

    @property
    def qkv_rows(self) -> int:
        """Rows of the stacked [Wq; Wk; Wv]."""
        return (self.Hq + 2 * self.KV) * self.D

    def lo(self, pos: int) -> int:
        """First key position visible from `pos` (sliding window, else 0)."""
        return 0 if self.window is None else max(0, pos - self.window + 1)

    def chunk(self, pos: int) -> int:
        """Keys per attention partition at pos: ceil(n / P) of the n = pos + 1 - lo visible."""
        return -(-(pos + 1 - self.lo(pos)) // self.P)

    def keys(self, p: int, pos: int | None = None) -> tuple[int, int]:
        """Key positions partition p reads from pos (fused.py), or every key it may read at
        some pos (pos None: the whole cache)."""
        if pos is None:
            return 0, self.S
        c = self.chunk(pos)
        a = self.lo(pos) + p * c
        return a, max(a, min(a + c, pos + 1))

    def vocab_rows(self, t: int) -> tuple[int, int]:
        """Vocabulary rows of LM-head tile t (empty past the vocabulary)."""
        a = t * self.CV
        return a, max(a, min((t + 1) * self.CV, self.V))


@dataclass(frozen=True)
class Access:
    """The regions one task reads and writes, as (buffer or weight name, box) pairs."""

    reads: tuple[tuple[str, Box], ...]
    writes: tuple[tuple[str, Box], ...]


# -- boxes ----------------------------------------------------------------------------------


def volume(box: Box) -> int:
    return math.prod(max(0, b - a) for a, b in box)


def intersect(a: Box, b: Box) -> Box | None:
    """The common part of two boxes, or None if they do not overlap."""
    out = []
    for (x0, x1), (y0, y1) in zip(a, b, strict=True):
        lo, hi = (x0 if x0 > y0 else y0), (x1 if x1 < y1 else y1)
        if lo >= hi:
            return None
        out.append((lo, hi))
    return tuple(out)


def subtract(a: Box, b: Box) -> list[Box]:
    """`a` minus `b` as disjoint boxes (at most two per dimension)."""
    if intersect(a, b) is None:
        return [a]
    out: list[Box] = []
    rest = list(a)
    for d, ((lo, hi), (blo, bhi)) in enumerate(zip(a, b, strict=True)):
        if lo < blo:
            out.append((*rest[:d], (lo, blo), *rest[d + 1 :]))
        if bhi < hi:
            out.append((*rest[:d], (bhi, hi), *rest[d + 1 :]))
        rest[d] = (max(lo, blo), min(hi, bhi))
    return out


def coalesce(boxes: Iterable[Box]) -> list[Box]:
    """Fewer boxes covering the same disjoint union: neighbours along one dimension merge.

    One pass per dimension joins runs of boxes that agree everywhere else and touch along it,
    so the tiles of one instruction usually collapse into the single box of its output.
    """
    out = sorted(set(boxes))
    if not out:
        return out
    for d in reversed(range(len(out[0]))):
        groups: dict[Box, list[tuple[int, int]]] = {}
        for box in out:
            groups.setdefault(box[:d] + box[d + 1 :], []).append(box[d])
        out = []
        for rest, spans in groups.items():
            spans.sort()
            lo, hi = spans[0]
            for start, stop in spans[1:]:
                if start == hi:
                    hi = stop
                else:
                    out.append((*rest[:d], (lo, hi), *rest[d:]))
                    lo, hi = start, stop
            out.append((*rest[:d], (lo, hi), *rest[d:]))
        out.sort()
    return out


def local(box: Box, within: Box) -> tuple[slice, ...]:
    """Index of `box` inside an array holding the region `within`."""
    return tuple(slice(a - w, b - w) for (a, b), (w, _) in zip(box, within, strict=True))


def index(box: Box) -> tuple[slice, ...]:
    return tuple(slice(a, b) for a, b in box)


# -- accesses per kind ----------------------------------------------------------------------


def qkv_pairs(g: Geometry, r0: int, r1: int) -> list[tuple[int, int, int, int]]:
    """The RoPE pairs of QKV rows [r0, r1) in pair order (schedule.py), as (part, head, i0, i1):
    pairs (i, i + D/2) for i in [i0, i1) of head `head` of part 0 q, 1 k, 2 v, per head the
    rows meet.

    Raises:
        ValueError: r0 or r1 is odd (a task would hold half of a RoPE pair).
    """
    D = g.D
    if not 0 <= r0 < r1 <= g.qkv_rows:
        raise ValueError(f"QKV rows [{r0}, {r1}) outside [0, {g.qkv_rows})")
    if r0 % 2 or r1 % 2:
        raise ValueError(f"QKV rows [{r0}, {r1}) split a RoPE pair (rows 2i, 2i + 1)")
    spans = [
        (h, (max(r0, h * D) - h * D) // 2, (min(r1, (h + 1) * D) - h * D) // 2)
        for h in range(r0 // D, -(-r1 // D))
    ]
    out = []
    for h, i0, i1 in spans:
        part, head = (
            (0, h) if h < g.Hq else (1, h - g.Hq) if h < g.Hq + g.KV else (2, h - g.Hq - g.KV)
        )
        out.append((part, head, i0, i1))
    return out


def _qkv_elements(g: Geometry, r0: int, r1: int) -> dict[int, list[tuple[int, int]]]:
    """Per part, the element ranges (rows of its weight, columns of q) of QKV rows [r0, r1):
    a head's pairs [i0, i1) are its elements [i0, i1) and [i0 + D/2, i1 + D/2); whole heads
    coalesce into one range."""
    half = g.D // 2
    out: dict[int, list[tuple[int, int]]] = {}
    for part, head, i0, i1 in qkv_pairs(g, r0, r1):
        base = head * g.D
        out.setdefault(part, []).extend(((base + i0, base + i1),
                                         (base + half + i0, base + half + i1)))  # fmt: skip
    return {p: [b[0] for b in coalesce((r,) for r in rs)] for p, rs in out.items()}


def task_access(
    instr: Instr, params: tuple[int, ...], g: Geometry, pos: int | None = None
) -> Access:
    """Regions read and written by the task `params` of `instr` (see the module docstring).

    Args:
        instr: the instruction; operand names are taken from its inputs/outputs by position.
        params: the task's tile parameters (schedule.py lists them per kind).
        g: dimensions and bound symbols.
        pos: None for the static conservative regions, else the runtime position.
    """
    ins, outs, k = instr.inputs, instr.outputs, instr.kind
    B, H, D = (0, g.B), (0, g.H), g.D
    reads: list[tuple[str, Box]] = []
    writes: list[tuple[str, Box]] = []
    if k is Kind.EMBED:
        c0, c1 = params
        reads += [(ins[0], (B,)), (ins[1], ((0, g.V), (c0, c1)))]
        writes += [(outs[0], (B, (c0, c1)))]
    elif k is Kind.QKV_ROPE_APPEND:
        r0, r1 = params
        reads += [(ins[0], (B, H)), (ins[1], (H,)), (ins[5], ((0, D // 2),))]
        cache_pos = (0, g.S) if pos is None else (pos, pos + 1)
        for part, spans in sorted(_qkv_elements(g, r0, r1).items()):
            for a, b in spans:
                reads.append((ins[2 + part], ((a, b), H)))
                if part == 0:
                    writes.append((outs[0], (B, (a, b))))
        for part, head, i0, i1 in qkv_pairs(g, r0, r1):  # the cache rows, head by head
            if part > 0:
                halves = (
                    [(0, D)] if (i0, i1) == (0, D // 2) else [(i0, i1), (D // 2 + i0, D // 2 + i1)]
                )
                for els in halves:
                    writes.append((outs[part], (B, (head, head + 1), cache_pos, els)))
    elif k is Kind.ATTN_PARTIAL:
        kv, p = params
        h0, h1 = kv * g.G, (kv + 1) * g.G
        reads.append((ins[0], (B, (h0 * D, h1 * D))))
        a, b = g.keys(p, pos)
        if a < b:
            reads += [(ins[1], (B, (kv, kv + 1), (a, b), (0, D))),
                      (ins[2], (B, (kv, kv + 1), (a, b), (0, D)))]  # fmt: skip
        writes += [(outs[0], (B, (h0, h1), (p, p + 1), (0, D))),
                   (outs[1], (B, (h0, h1), (p, p + 1))),
                   (outs[2], (B, (h0, h1), (p, p + 1)))]  # fmt: skip
    elif k is Kind.ATTN_MERGE:
        (kv,) = params
        h0, h1 = kv * g.G, (kv + 1) * g.G
        reads += [(ins[0], (B, (h0, h1), (0, g.P), (0, D))),
                  (ins[1], (B, (h0, h1), (0, g.P))),
                  (ins[2], (B, (h0, h1), (0, g.P)))]  # fmt: skip
        writes.append((outs[0], (B, (h0 * D, h1 * D))))
    elif k is Kind.OPROJ_RESIDUAL:
        r0, r1 = params
        reads += [(ins[0], (B, (0, g.Hq * D))), (ins[1], ((r0, r1), (0, g.Hq * D))),
                  (ins[2], (B, (r0, r1)))]  # fmt: skip
        writes.append((outs[0], (B, (r0, r1))))
    elif k is Kind.GATE_UP_SILU:
        r0, r1 = params
        reads += [(ins[0], (B, H)), (ins[1], (H,)), (ins[2], ((r0, r1), H)),
                  (ins[3], ((r0, r1), H))]  # fmt: skip
        writes.append((outs[0], (B, (r0, r1))))
    elif k is Kind.DOWN_PARTIAL:
        r0, r1, c = params
        cols = (c * g.CI, (c + 1) * g.CI)
        reads += [(ins[0], (B, cols)), (ins[1], ((r0, r1), cols))]
        writes.append((outs[0], ((c, c + 1), B, (r0, r1))))
    elif k is Kind.DOWN_RESIDUAL:
        r0, r1 = params
        reads += [(ins[0], ((0, g.KS), B, (r0, r1))), (ins[1], (B, (r0, r1)))]
        writes.append((outs[0], (B, (r0, r1))))
    elif k is Kind.LMHEAD_ARGMAX:
        (t,) = params
        rows = g.vocab_rows(t)
        reads += [(ins[0], (B, H)), (ins[1], (H,))]
        if rows[0] < rows[1]:  # an empty tile past the vocabulary writes only (-inf, -1)
            reads.append((ins[2], (rows, H)))
            writes.append((outs[0], (B, rows)))
        writes += [(outs[1], (B, (t, t + 1))), (outs[2], (B, (t, t + 1)))]
    elif k is Kind.ARGMAX_REDUCE:
        reads += [(ins[0], (B, (0, g.NT))), (ins[1], (B, (0, g.NT)))]
        writes.append((outs[0], (B,)))
    else:  # pragma: no cover - Kind is closed
        raise ValueError(f"unknown kind {k}")
    return Access(tuple(reads), tuple(writes))


def whole_tiling(kind: Kind, g: Geometry) -> list[tuple[int, ...]]:
    """The coarsest tiling of an instruction: together these tasks compute all of it.

    The union of their write regions is the instruction's output in fused.py's semantics, which
    the interpreter uses as "what a sequential execution writes", independent of any schedule.
    """
    if kind is Kind.EMBED:
        return [(0, g.H)]
    if kind is Kind.QKV_ROPE_APPEND:
        return [(0, g.qkv_rows)]
    if kind is Kind.ATTN_PARTIAL:
        return [(kv, p) for kv in range(g.KV) for p in range(g.P)]
    if kind is Kind.ATTN_MERGE:
        return [(kv,) for kv in range(g.KV)]
    if kind in (Kind.OPROJ_RESIDUAL, Kind.DOWN_RESIDUAL):
        return [(0, g.H)]
    if kind is Kind.GATE_UP_SILU:
        return [(0, g.I)]
    if kind is Kind.DOWN_PARTIAL:
        return [(0, g.H, c) for c in range(g.KS)]
    if kind is Kind.LMHEAD_ARGMAX:
        return [(t,) for t in range(g.NT)]
    return [()]


def instr_writes(instr: Instr, g: Geometry, pos: int | None = None) -> list[tuple[str, Box]]:
    """Everything the whole instruction writes (its tasks' writes partition exactly this)."""
    out: list[tuple[str, Box]] = []
    for params in whole_tiling(instr.kind, g):
        out += task_access(instr, params, g, pos).writes
    return out


def tracked(fg: FusedGraph) -> frozenset[str]:
    """Names whose accesses carry hazards: every buffer but the constants."""
    return frozenset(b.name for b in fg.buffers if b.value is None)


def weight_elements(access: Access, weights: Container[str], batch: int, kind: Kind) -> int:
    """Weight elements a task reads (the embedding gather reads `batch` rows, not all)."""
    n = 0
    for name, box in access.reads:
        if name in weights:
            n += volume(box) if kind is not Kind.EMBED else batch * (box[1][1] - box[1][0])
    return n
