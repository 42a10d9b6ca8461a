"""Every number a kernel is specialized for, from the FusedGraph and the Schedule, as constexprs.

The shared-memory plan lives here too, all of it dynamic shared memory (the launcher opts in
to `smem_bytes`): the weight ring (`stages` slots of `stage_bytes`, Options), one full and one
empty mbarrier per slot, and a work area of at most `work_bytes` (Options) that the instruction
bodies share: a matvec stages `KC` input columns of all `B` rows and keeps its `MAX_VROWS x B`
outputs; attention keeps the queries of one KV-head group and the per-warp softmax states of one
head. `Options.for_target` picks plans that fit the target's opt-in limit per block (sm_80:
163 KiB, sm_90a: 227 KiB); `kernel_dims` refuses one over 227 KiB, the launcher one over the
device's own limit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from compiler.codegen.emit import Emitter
from compiler.ir.fused import FusedGraph, Kind
from compiler.schedule.schedule import Schedule

SMEM_LIMIT = 227 * 1024  # dynamic shared memory one CTA may opt in to (sm_90; sm_80: 163 KiB)


class CodegenError(ValueError):
    """A FusedGraph or Schedule that this code generator cannot (or must not) render."""


def f32(x: float) -> str:
    """A C++ float literal that parses back to exactly float32(x)."""
    s = np.format_float_scientific(np.float32(x), unique=True, exp_digits=2, trim="-")
    return f"{s}f"


@dataclass(frozen=True)
class KernelDims:
    """Model dims (FusedGraph), symbol binding and tiles (Schedule), and the smem plan."""

    hidden: int
    intermediate: int
    vocab: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    eps: float
    window: int | None
    batch: int
    max_seq: int
    partitions: int
    down_splits: int
    vocab_tiles: int
    threads: int
    sm_count: int
    stages: int
    stage_bytes: int
    work_bytes: int
    mma: bool  # tensor-core matvec consumer (Options.matvec == "mma")
    mma_rows: int  # its weight rows a slot
    evict_first: bool  # weight copies with an L2 evict-first policy (Options.weight_l2)
    thread_copies: bool  # the producer lanes fill the slots themselves (Options.ring_copy)
    qkv_tile: int  # rows of the widest QKV task
    row_tile: int  # rows of the widest o-proj / gate-up / down-partial task
    lm_rows: int  # vocab rows of one LM-head tile (CV)
    embed_cols: int  # columns of the widest EMBED task
    max_vrows: int  # most matvec output rows of one task (gate/up rows count twice)
    kc: int  # input columns staged in shared memory at a time
    inv_freq: tuple[float, ...]

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    @property
    def nwarps(self) -> int:
        return self.threads // 32

    @property
    def attn_smem_floats(self) -> int:  # queries of one group + per-warp (o, m, l) of one head
        return self.group * self.head_dim + self.nwarps * (self.head_dim + 2)

    @property
    def red_floats(self) -> int:  # mma: the per-warp accumulators of a row block
        return self.nwarps * -(-self.batch // 8) * 128 if self.mma else 0

    @property
    def matvec_smem_floats(self) -> int:
        b = self.batch
        return b * self.kc + self.max_vrows * b + self.nwarps + b + self.red_floats

    @property
    def smem_floats(self) -> int:  # the work area, in floats
        n = max(self.attn_smem_floats, self.matvec_smem_floats)
        return -(-n // 4) * 4

    @property
    def block_threads(self) -> int:  # consumers + the producer warp
        return self.threads + 32

    @property
    def smem_bytes(self) -> int:  # dynamic shared memory of a CTA: ring, barriers, work area
        return self.stages * self.stage_bytes + 16 * self.stages + 4 * self.smem_floats


def mma_slice(stage_bytes: int, rows: int = 64) -> int:
    """Columns of one mma slot slice (amk.cuh MWC): `rows` rows, each padded by 16 bytes."""
    return ((stage_bytes // rows - 16) // 2) // 16 * 16


def _widest(sched: Schedule, kind: Kind) -> int:
    """Rows (or columns) of the widest (r0, r1) task of `kind`."""
    return max((t.params[1] - t.params[0] for t in sched.tasks if t.kind == kind), default=0)


def kernel_dims(fg: FusedGraph, sched: Schedule) -> KernelDims:
    """The dims of `fg` under `sched`, checked against what the kernel supports."""
    bound = sched.bound()
    o = sched.options
    d, b = int(fg.dim("head_dim")), bound["B"]
    vocab, tiles = int(fg.dim("vocab")), bound["NT"]
    qkv, rows = _widest(sched, Kind.QKV_ROPE_APPEND), _widest(sched, Kind.OPROJ_RESIDUAL)
    gate_up, down = _widest(sched, Kind.GATE_UP_SILU), _widest(sched, Kind.DOWN_PARTIAL)
    lm_rows = -(-vocab // tiles)
    max_vrows = max(qkv, rows, 2 * gate_up, down, lm_rows, 1)
    nwarps = o.threads // 32
    widest_k = max(
        int(fg.dim("hidden")), int(fg.dim("heads")) * d, int(fg.dim("intermediate")) // bound["KS"]
    )
    mma = o.matvec == "mma"
    red = nwarps * -(-b // 8) * 128 if mma else 0
    free = o.work_bytes // 4 - max_vrows * b - nwarps - b - red
    # mma: a chunk shorter than the widest K is whole slices, so the slices (and the summation
    # order) are the same whatever the chunk
    unit = mma_slice(o.stage_bytes, o.mma_rows) if mma else 8
    kc = widest_k if free // b >= widest_k else free // b // unit * unit
    if kc < 8:
        raise CodegenError(
            f"work_bytes {o.work_bytes} at batch {b} leave no room to stage {unit} input columns "
            f"({max_vrows} output rows); raise work_bytes"
            + (" or lower stage_bytes (mma: the chunk is whole slot slices)" if mma else "")
        )
    inv = fg.buffer("rope_inv_freq").value
    if inv is None:
        raise CodegenError("rope_inv_freq has no value")
    window = fg.dim("sliding_window")
    dims = KernelDims(
        hidden=int(fg.dim("hidden")),
        intermediate=int(fg.dim("intermediate")),
        vocab=vocab,
        layers=int(fg.dim("layers")),
        heads=int(fg.dim("heads")),
        kv_heads=int(fg.dim("kv_heads")),
        head_dim=d,
        eps=float(fg.dim("eps")),
        window=None if window is None else int(window),
        batch=b,
        max_seq=bound["S"],
        partitions=bound["P"],
        down_splits=bound["KS"],
        vocab_tiles=tiles,
        threads=o.threads,
        sm_count=o.sm_count,
        stages=o.stages,
        stage_bytes=o.stage_bytes,
        work_bytes=o.work_bytes,
        mma=mma,
        mma_rows=o.mma_rows,
        evict_first=o.weight_l2 == "evict_first",
        thread_copies=o.ring_copy == "threads",
        qkv_tile=qkv,
        row_tile=max(rows, gate_up, down),
        lm_rows=lm_rows,
        embed_cols=_widest(sched, Kind.EMBED),
        max_vrows=max_vrows,
        kc=kc,
        inv_freq=tuple(float(x) for x in inv),
    )
    _check(dims)
    return dims


def _check(d: KernelDims) -> None:
    """Refuse dims the instruction bodies do not handle (rather than emit a wrong kernel)."""
    need = [
        (d.hidden % 8 == 0, f"hidden {d.hidden} must be a multiple of 8 (16-byte loads)"),
        (
            d.intermediate % d.down_splits == 0,
            f"intermediate {d.intermediate} must split into KS={d.down_splits} chunks",
        ),
        (
            (d.intermediate // d.down_splits) % 8 == 0,
            "down-projection chunks must be multiples of 8 columns",
        ),
        (
            d.head_dim % 8 == 0 and 8 <= d.head_dim <= 256 and 32 % (d.head_dim // 8) == 0,
            f"head_dim {d.head_dim} must be 8 x a power of two <= 32",
        ),
        (d.heads % d.kv_heads == 0, "heads must be a multiple of kv_heads"),
        (
            d.smem_floats * 4 <= d.work_bytes,
            f"shared work area {d.smem_floats * 4} B exceeds work_bytes {d.work_bytes} B",
        ),
        (
            d.stage_bytes % (16 * d.nwarps) == 0,
            f"stage_bytes {d.stage_bytes} must be a multiple of 16 x {d.nwarps} consumer warps",
        ),
        (
            d.smem_bytes <= SMEM_LIMIT,
            f"shared memory plan {d.smem_bytes} B ({d.stages} x {d.stage_bytes} B ring + work "
            f"area) exceeds {SMEM_LIMIT} B",
        ),
        (
            d.max_seq < 2**31 and d.batch * d.kv_heads * d.max_seq * d.head_dim < 2**62,
            "cache too large",
        ),
        (len(d.inv_freq) == d.head_dim // 2, "rope_inv_freq must have head_dim/2 values"),
        (32 <= d.threads <= 992, "1 to 31 consumer warps"),
        (
            not d.mma
            or (
                d.mma_rows in (16, 32, 64)
                and d.nwarps % (d.mma_rows // 16) == 0
                and mma_slice(d.stage_bytes, d.mma_rows) >= 16
            ),
            "matvec=mma needs mma_rows 16, 32 or 64, consumer warps a multiple of mma_rows / 16, "
            "and slots of at least mma_rows x 48 B",
        ),
        (
            not d.mma
            or all(
                k % 16 == 0
                for k in (d.hidden, d.heads * d.head_dim, d.intermediate // d.down_splits)
            ),
            "matvec=mma needs every matvec K (hidden, heads x head_dim, down chunk) % 16 == 0",
        ),
    ]
    for ok, why in need:
        if not ok:
            raise CodegenError(why)


def render_dims(e: Emitter, d: KernelDims) -> None:
    """The constexpr block of kernel.cu."""

    def const(name: str, value: str | int, what: str, ty: str = "int") -> None:
        e.line(f"constexpr {ty} {name} = {value};".ljust(40) + f"// {what}")

    e.comment("---- model dims (FusedGraph) ----")
    const("H", d.hidden, "hidden size")
    const("I", d.intermediate, "MLP intermediate size")
    const("V", d.vocab, "vocabulary")
    const("L", d.layers, "decoder layers")
    const("HQ", d.heads, "query heads")
    const("KV", d.kv_heads, "key/value heads")
    const("D", d.head_dim, "head dim")
    const("G", "HQ / KV", "query heads per KV head")
    const("QD", "HQ * D", "q rows")
    const("KVD", "KV * D", "k rows = v rows")
    const("EPS", f32(d.eps), "RMSNorm epsilon", "float")
    const("SM_SCALE", f32(1.0 / math.sqrt(d.head_dim)), "softmax scale 1/sqrt(D)", "float")
    if d.window is None:
        const("WINDOW", 0, "no sliding window: keys [0, pos]")
    else:
        const("WINDOW", d.window, "sliding window: keys [pos - WINDOW + 1, pos]")
    e.line('static_assert(WINDOW >= 0 && HQ % KV == 0 && D % 8 == 0, "model dims");')
    e.blank()
    e.comment("---- shape template and schedule binding ----")
    const("B", d.batch, "batch rows")
    const("S", d.max_seq, "KV-cache capacity (positions)")
    const("P", d.partitions, "KV partitions per KV head")
    const("KS", d.down_splits, "split-K chunks of the down projection")
    const("NT", d.vocab_tiles, "LM-head vocabulary tiles")
    const("CI", "I / KS", "columns per down-projection chunk")
    const("CV", "(V + NT - 1) / NT", "vocabulary rows per LM-head tile")
    e.blank()
    e.comment("---- launch shape and tiles (Options) ----")
    const("SM_COUNT", d.sm_count, "CTAs: one per SM, all co-resident")
    const("THREADS", d.threads, "consumer threads per CTA (+ one producer warp)")
    const("NWARPS", "THREADS / 32", "consumer warps per CTA")
    const("STAGES", d.stages, "slots of the shared-memory weight ring")
    const("SLOT_BYTES", d.stage_bytes, "bytes of one slot")
    const(
        "MMA", "true" if d.mma else "false", "matvec on tensor cores (else CUDA-core FMA)", "bool"
    )
    const("MMA_ROWS", d.mma_rows, "mma: weight rows of a ring slot")
    flag = "true" if d.evict_first else "false"
    const("WEIGHT_EVICT_FIRST", flag, "weight copies with an L2 evict-first policy", "bool")
    flag = "true" if d.thread_copies else "false"
    const("THREAD_COPIES", flag, "the producer lanes fill the ring slots (no async copies)", "bool")
    const("QKV_TILE", d.qkv_tile, "rows of the widest QKV task")
    const("ROW_TILE", d.row_tile, "rows of the widest o-proj/gate-up/down task")
    const("EMBED_COLS", d.embed_cols, "columns of the widest EMBED task")
    const("MAX_VROWS", d.max_vrows, "most matvec output rows of one task")
    const("KC", d.kc, "matvec input columns staged per chunk")
    const("SMEM_FLOATS", d.smem_floats, "work area in shared memory, in floats")
    e.line(
        "static_assert((QKV_TILE % D == 0 || (QKV_TILE < D && QKV_TILE % 2 == 0)) && QKV_TILE <= MAX_VROWS"
        ' && ROW_TILE <= MAX_VROWS, "matvec tiles");'
    )
    e.line('static_assert(EMBED_COLS % 8 == 0 && EMBED_COLS <= H, "EMBED: 16-byte column groups");')
    e.line('static_assert(I % KS == 0 && CI % 8 == 0 && H % 8 == 0, "16-byte rows");')
    e.line('static_assert(P >= 1, "KV partitions: P runs of the visible keys");')
    e.blank()
    e.comment(
        "RoPE inverse frequencies (FusedGraph rope_inv_freq, rounded to fp32); angle = pos * INV_FREQ[i]"
    )
    with e.block("__device__ constexpr float INV_FREQ[D / 2] =", close="};"):
        vals = [f32(x) for x in d.inv_freq]
        for i in range(0, len(vals), 8):
            e.line(", ".join(vals[i : i + 8]) + ",")
