"""Split each fused instruction into tasks: tile parameters per kind (see schedule.py).

The split symbols are bound here: P = kv_partitions clamped to S; KS = the largest divisor of
the intermediate size not above down_splits (a chunk must be a whole number of columns);
NT = ceil(V / lm_head_rows), so a tile holds ceil(V / NT) <= lm_head_rows rows and none is
empty.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from compiler.ir.fused import FusedGraph, Kind
from compiler.ir.graph import IRError
from compiler.schedule.regions import Geometry
from compiler.schedule.schedule import Options
from compiler.spec import ShapeTemplate


@dataclass(frozen=True)
class TaskSpec:
    """A task before dependencies and queues: instruction index, kind, layer, tile parameters."""

    instr: int
    kind: Kind
    layer: int
    params: tuple[int, ...]


def largest_divisor(n: int, at_most: int) -> int:
    return max(d for d in range(1, min(n, at_most) + 1) if n % d == 0)


def bind(fg: FusedGraph, template: ShapeTemplate, options: Options) -> dict[str, int]:
    """Values of the symbols B, S, P, KS, NT for this template and these options."""
    vocab, inter = fg.dim("vocab"), fg.dim("intermediate")
    return {
        "B": template.batch,
        "S": template.max_seq,
        "P": min(options.kv_partitions, template.max_seq),
        "KS": largest_divisor(inter, options.down_splits),
        "NT": math.ceil(vocab / options.lm_head_rows),
    }


def _ranges(n: int, step: int) -> list[tuple[int, int]]:
    return [(a, min(a + step, n)) for a in range(0, n, step)]


def row_tile(rows: int, splits: int, options: Options) -> int:
    """Rows per task of an instruction over `rows` rows in `splits` split-K chunks: `row_tile`,
    or with tile_policy=fit the fewest rows (a multiple of 8, one per consumer warp of a block)
    that leave at most sm_count tasks, so no SM runs two tasks of one instruction while another
    runs none (llama-2-7b's 64-row gate/up has 172 tasks on 132 SMs)."""
    if options.tile_policy == "fixed":
        return options.row_tile
    per = max(1, options.sm_count // splits)  # row tiles that fit beside the splits
    fewest = -(-rows // per)
    return min(rows, -(-fewest // 8) * 8)


def qkv_tiles(g: Geometry, options: Options) -> list[tuple[int, ...]]:
    """QKV rows (pair order, schedule.py): qkv_heads_per_task whole heads a task, or with
    qkv_head_split = s each head in s tasks of D/s rows, pairs [k*D/2s, (k+1)*D/2s) of the head,
    or with qkv_rows = n tasks of n rows (even: whole pairs) wherever the heads fall.

    Raises:
        IRError: s does not divide D/2 (a task would hold half of a RoPE pair).
    """
    heads, s = g.Hq + 2 * g.KV, options.qkv_head_split
    if options.qkv_rows:  # even ranges of the pair-ordered rows, across heads
        return list(_ranges(heads * g.D, options.qkv_rows))
    if s == 1:
        return [(a * g.D, b * g.D) for a, b in _ranges(heads, options.qkv_heads_per_task)]
    if (g.D // 2) % s:
        raise IRError(f"option qkv_head_split={s} must divide head_dim / 2 = {g.D // 2}")
    n = g.D // s
    return [(h * g.D + k * n, h * g.D + (k + 1) * n) for h in range(heads) for k in range(s)]


def tiles(kind: Kind, g: Geometry, options: Options) -> list[tuple[int, ...]]:
    """Tile parameters of one instruction of `kind`, in order."""
    if kind is Kind.EMBED:
        return list(_ranges(g.H, options.embed_cols))
    if kind is Kind.QKV_ROPE_APPEND:
        return qkv_tiles(g, options)
    if kind is Kind.ATTN_PARTIAL:
        return [(kv, p) for kv in range(g.KV) for p in range(g.P)]
    if kind is Kind.ATTN_MERGE:
        return [(kv,) for kv in range(g.KV)]
    if kind in (Kind.OPROJ_RESIDUAL, Kind.DOWN_RESIDUAL):
        return list(_ranges(g.H, row_tile(g.H, 1, options)))
    if kind is Kind.GATE_UP_SILU:
        return list(_ranges(g.I, row_tile(g.I, 1, options)))
    if kind is Kind.DOWN_PARTIAL:
        rt = row_tile(g.H, g.KS, options)
        return [(a, b, c) for a, b in _ranges(g.H, rt) for c in range(g.KS)]
    if kind is Kind.LMHEAD_ARGMAX:
        return [(t,) for t in range(g.NT)]
    return [()]


def split(fg: FusedGraph, g: Geometry, options: Options) -> list[TaskSpec]:
    """Every instruction's tasks, in program order (the task id is the list index)."""
    return [
        TaskSpec(i, ins.kind, ins.layer, params)
        for i, ins in enumerate(fg.instrs)
        for params in tiles(ins.kind, g, options)
    ]
