"""Schedule: the FusedGraph's instructions split into tasks on per-SM queues, with counters.

This is data (`schedule.json`), the contract between the scheduler, the CPU interpreter, the CUDA
codegen and the verifier.

Execution model. The kernel runs `steps` decode steps; in each step every SM runs its queue in
order. Each task, before it starts, waits until for every `(counter, count, step_offset)` in
`waits`: `counters[counter] >= (step + step_offset) * per_step[counter] + count`, where `step`
is the global step index (counting from the allocation of the counters, never reset) and
`per_step[counter]` is the number of tasks that signal that counter (each task signals exactly
one counter, once per step, after its writes are complete). Counters are unsigned 64-bit
integers in device memory, zeroed once at allocation; targets therefore grow monotonically
and no host reset is needed between tokens. `step_offset` is 0 (this step) or -1
(the previous step: satisfied at step 0).

Task parameters by kind (rows are half-open ranges; all tasks cover the whole batch):
    EMBED            (c0, c1)     columns [c0, c1) of x
    QKV_ROPE_APPEND  (r0, r1)     rows of [Wq; Wk; Wv] (Hq*D + 2*KV*D rows) in pair order:
                                  task row j of a head (a block of D rows: q heads, then k, then
                                  v) is the head's element e(j) = j/2 + (j%2)*(D/2), so rows 2i
                                  and 2i+1 are the RoPE pair (i, i + D/2). Whole heads (r0, r1
                                  multiples of D), or an even sub-range of one head h, rows
                                  h*D + [j0, j1): its elements [i0, i1) and [i0+D/2, i1+D/2),
                                  i0 = j0/2, i1 = j1/2 (qkv_head_split)
    ATTN_PARTIAL     (g, p)       KV head g (query heads g*G .. g*G+G-1), partition p
    ATTN_MERGE       (g,)         query heads of KV head g
    OPROJ_RESIDUAL   (r0, r1)     rows of x
    GATE_UP_SILU     (r0, r1)     rows of act
    DOWN_PARTIAL     (r0, r1, k)  rows of x, split-K chunk k
    DOWN_RESIDUAL    (r0, r1)     rows of x
    LMHEAD_ARGMAX    (t,)         vocabulary tile t
    ARGMAX_REDUCE    ()
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass
from typing import Any

from compiler.ir import jsonform
from compiler.ir.fused import Kind
from compiler.ir.graph import IRError
from compiler.limits import LIMITS, check, show
from compiler.spec import ModelSpec, ShapeTemplate

SCHEDULE_VERSION = 1
POLICIES = ("round_robin", "balanced")
MATVECS = ("fma", "mma")  # matvec consumers: CUDA-core FMA (fp32 x) or tensor-core mma
WEIGHT_L2 = ("normal", "evict_first")  # L2 policy of the weight copies
RING_COPIES = ("async", "threads")  # who fills a ring slot: the copy engine or the producer lanes
TILE_POLICIES = ("fixed", "fit")  # row tiles: row_tile everywhere, or sized to the SM count
# defaults that differ by target (compiler/runtime/NOTES.md has the measurements): an A100 has
# 108 SMs and 163 KiB of shared memory per block, an H100/H200 132 SMs and 227 KiB. Batch 1-7:
# the CUDA-core matvec with a deep weight ring (6 slots measured 2% faster than 4 on
# llama-2-7b, H200); batch 8 and up: the tensor-core matvec, with a larger work area to stage
# the batch's inputs, and larger slots (its slots hold 64 short row segments, one bulk copy
# each; llama-2-7b b16 on an H200: 82 ms CUDA-core, 17.5 ms mma with 3 x 32 KiB slots, 14.5 ms
# with 2 x 64 KiB).
ARCH_DEFAULTS: dict[str, dict[str, int]] = {"sm_80": {"sm_count": 108}, "sm_90a": {"sm_count": 132}}
SMALL_BATCH: dict[str, dict[str, Any]] = {"sm_80": {"stages": 4}, "sm_90a": {"stages": 6}}
LARGE_BATCH: dict[str, dict[str, Any]] = {
    "sm_80": {"matvec": "mma", "stages": 2, "work_bytes": 96 * 1024},
    "sm_90a": {"matvec": "mma", "stages": 2, "stage_bytes": 64 * 1024, "work_bytes": 96 * 1024},
}
MMA_BATCH = 8  # the smallest batch that defaults to the tensor-core matvec
# Batch 1-7, by the model's shape (`small_batch_shape`; H200 measurements in NOTES.md v3.2): every
# phase is latency-bound on few SMs unless its tasks cover them, so
#   * o-proj, gate/up and down tiles sized to at most sm_count tasks (tile_policy=fit:
#     smollm2-135m 0.721 -> 0.665 ms, llama-3.2-1b 0.953 -> 0.919, llama-2-7b 3.949 -> 3.669);
#   * QKV tasks of 1/2 to 1/8 of a head while the heads times that fit the SMs (qkv_head_split:
#     smollm2-135m 0.665 -> 0.601 ms at 4, 0.605 -> 0.580 at 8; llama-3.2-1b 0.919 -> 0.886 at 2);
#     never past them: llama-2-7b 3.68 ms at 1, 3.78 at 2, 3.85 at 4, 3.97 at 8 (a CTA running
#     two or three QKV tasks pays each one's fixed cost in turn);
#   * where the heads leave more than a tenth of the SMs idle and a task streams at least
#     QKV_ROWS_BYTES of weights, QKV tasks of qkv_rows rows across heads, as few as fill the SMs
#     (llama-2-70b 35.02 -> 34.36 ms at 80 rows, llama-2-7b 3.72 -> 3.65 at 96, llama-3-8b 4.11
#     -> 4.09 at 48; llama-3.2-1b, 128 KB tasks, 0.886 -> 0.891 at 24: heads; llama-2-13b, 120
#     heads, 6.775 either way);
#   * KV partitions while the KV heads times P fit the SMs, 4 to 8 (runtime-sized partitions:
#     llama-3.2-1b KV 2048 1.037 -> 0.963 ms at P = 8; llama-2-7b, 32 KV heads, 4.20 -> 4.28 ms
#     at 8, so it keeps 4).
MAX_QKV_SPLIT = 8
QKV_ROWS_BYTES = 256 * 1024
ZERO_OK = {"qkv_rows"}  # options where 0 means "not set"
KV_PARTITIONS = (4, 8)  # the range the rule picks P from


def small_batch_shape(model: ModelSpec, sm_count: int) -> dict[str, Any]:
    """The batch 1-7 options for `model`'s shape on `sm_count` SMs (see above)."""
    heads = model.num_heads + 2 * model.num_kv_heads
    half = model.head_dim // 2
    split = max(
        s
        for s in range(1, MAX_QKV_SPLIT + 1)
        if half % s == 0 and (s == 1 or heads * s <= sm_count)
    )
    lo, hi = KV_PARTITIONS
    parts = min(hi, max(lo, sm_count // model.num_kv_heads))
    out: dict[str, Any] = {"tile_policy": "fit", "qkv_head_split": split, "kv_partitions": parts}
    rows = heads * model.head_dim
    task_bytes = rows // (heads * split) * model.hidden_size * 2
    if heads * split * 10 < sm_count * 9 and task_bytes >= QKV_ROWS_BYTES:
        fewest = -(-rows // sm_count)
        out |= {"qkv_head_split": 1, "qkv_rows": -(-fewest // 8) * 8}
    return out


@dataclass(frozen=True)
class Options:
    """Everything that changes the schedule or the kernel; hashed into cache keys."""

    sm_count: int = 132  # one CTA per SM: 132 on H100, 108 on A100
    threads: int = 256  # consumer threads per CTA (the CTA has one more warp: the producer)
    stages: int = 4  # slots of the shared-memory weight ring
    stage_bytes: int = 32768  # bytes of one slot: a multiple of 16 x the consumer warps
    work_bytes: int = 32768  # the consumers' shared work area (staged inputs, outputs)
    qkv_heads_per_task: int = 1  # QKV row tile, in heads of D rows
    qkv_head_split: int = 1  # QKV tasks per head (a divisor of D/2): D/s rows, whole RoPE pairs
    qkv_rows: int = 0  # > 0: QKV tasks of this many rows (even), across heads; 0: by heads
    row_tile: int = 64  # rows per task of the o-proj, gate/up, down and residual instructions
    tile_policy: str = "fixed"  # fixed: row_tile; fit: at most sm_count tasks an instruction
    lm_head_rows: int = (
        128  # at most this many vocabulary rows per LM-head task (NT = ceil(V / it))
    )
    kv_partitions: int = 4  # P: split-KV partitions per KV head
    down_splits: int = 4  # KS: split-K chunks of the down projection
    embed_cols: int = 1024  # columns of x per EMBED task, a multiple of 8 (16-byte rows)
    policy: str = "round_robin"  # queue assignment: round_robin | balanced
    matvec: str = "fma"  # matvec consumer (compiler/codegen/amk.cuh): fma | mma
    mma_rows: int = 64  # mma: weight rows of a ring slot, 16, 32 or 64 (amk.cuh MMA_ROWS)
    weight_l2: str = "normal"  # L2 policy of the weight copies: normal | evict_first
    ring_copy: str = "async"  # slot copies: async (bulk / cp.async) | threads (for racecheck)

    def __post_init__(self) -> None:
        choices = {
            "policy": POLICIES,
            "matvec": MATVECS,
            "weight_l2": WEIGHT_L2,
            "ring_copy": RING_COPIES,
            "tile_policy": TILE_POLICIES,
        }
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if f.name in choices:
                if v not in choices[f.name]:
                    raise ValueError(
                        f"option {f.name} must be one of {', '.join(choices[f.name])}, got {show(v)}"
                    )
            elif not isinstance(v, int) or isinstance(v, bool) or v < (f.name not in ZERO_OK):
                what = "a non-negative" if f.name in ZERO_OK else "a positive"
                raise ValueError(f"option {f.name} must be {what} integer, got {show(v)}")
            elif f.name in LIMITS:
                check(f.name, v, name=f"option {f.name}")
        if self.embed_cols % 8:
            raise ValueError(f"option embed_cols must be a multiple of 8, got {self.embed_cols}")
        if self.threads % 32:
            raise ValueError(f"option threads must be a multiple of 32, got {self.threads}")
        if self.qkv_rows % 2:
            raise ValueError(
                f"option qkv_rows must be even (whole RoPE pairs), got {self.qkv_rows}"
            )
        if self.qkv_rows and (self.qkv_head_split > 1 or self.qkv_heads_per_task > 1):
            raise ValueError(
                f"option qkv_rows={self.qkv_rows} tiles the QKV rows itself: not with "
                "qkv_head_split or qkv_heads_per_task"
            )
        if self.qkv_head_split > 1 and self.qkv_heads_per_task > 1:
            raise ValueError(
                f"options qkv_head_split={self.qkv_head_split} and qkv_heads_per_task="
                f"{self.qkv_heads_per_task}: a task is part of one head or whole heads, not both"
            )

    @classmethod
    def for_target(
        cls, arch: str, batch: int, model: ModelSpec | None = None, **values: Any
    ) -> Options:
        """The defaults for `arch`, `batch` and, below the tensor-core batch, `model`'s shape
        (ARCH_DEFAULTS, SMALL_BATCH, LARGE_BATCH, `small_batch_shape`), with `values` on top."""
        by_batch = LARGE_BATCH if batch >= MMA_BATCH else SMALL_BATCH
        base = ARCH_DEFAULTS.get(arch, {}) | by_batch.get(arch, {})
        sm = (base | values).get("sm_count", cls.sm_count)
        by_model = small_batch_shape(model, sm) if model is not None and batch < MMA_BATCH else {}
        for given, implied in (
            ("row_tile", "tile_policy"),
            ("qkv_heads_per_task", "qkv_head_split"),
            ("qkv_heads_per_task", "qkv_rows"),
            ("qkv_head_split", "qkv_rows"),
            ("qkv_rows", "qkv_head_split"),
        ):
            if given in values:  # a tile asked for is the tile used, not re-fitted
                by_model.pop(implied, None)
        return cls(**(base | by_model | values))

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def hash(self) -> str:
        """Stable digest of the options (sorted JSON)."""
        return hashlib.sha256(json.dumps(self.to_json(), sort_keys=True).encode()).hexdigest()


@dataclass(frozen=True)
class Task:
    """One unit of work on one SM: a tile of one instruction."""

    id: int
    instr: int  # index into FusedGraph.instrs
    kind: Kind
    layer: int
    params: tuple[int, ...]
    waits: tuple[tuple[int, int, int], ...]  # (counter, count, step_offset)
    signal: int

    def to_json(self) -> list[Any]:
        return [
            self.id,
            self.instr,
            self.kind.value,
            self.layer,
            list(self.params),
            [list(w) for w in self.waits],
            self.signal,
        ]

    @classmethod
    def from_json(cls, d: list[Any]) -> Task:
        i, instr, kind, layer, params, waits, signal = d
        return cls(
            int(i),
            int(instr),
            Kind(kind),
            int(layer),
            tuple(params),
            tuple((int(c), int(n), int(o)) for c, n, o in waits),
            int(signal),
        )


@dataclass(frozen=True)
class Schedule:
    """Tasks, counters and per-SM queues for one shape template and one set of options."""

    template: ShapeTemplate
    options: Options
    binding: tuple[tuple[str, int], ...]  # symbol values: B, S, P, KS, NT
    counters: tuple[tuple[str, int], ...]  # (name, per_step)
    tasks: tuple[Task, ...]
    queues: tuple[tuple[int, ...], ...]  # per SM: task ids in order
    fused_digest: str

    def bound(self) -> dict[str, int]:
        return dict(self.binding)

    def to_json(self) -> dict[str, Any]:
        return {
            "schedule_version": SCHEDULE_VERSION,
            "template": str(self.template),
            "options": self.options.to_json(),
            "binding": dict(self.binding),
            "counters": [list(c) for c in self.counters],
            "fused_digest": self.fused_digest,
            "tasks": [t.to_json() for t in self.tasks],
            "queues": [list(q) for q in self.queues],
        }

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Schedule:
        if not isinstance(d, dict) or d.get("schedule_version") != SCHEDULE_VERSION:
            raise IRError(f"not a schedule of version {SCHEDULE_VERSION}")
        try:
            return cls(
                template=ShapeTemplate.parse(d["template"]),
                options=Options(**d["options"]),
                binding=tuple(sorted((k, int(v)) for k, v in d["binding"].items())),
                counters=tuple((str(n), int(p)) for n, p in d["counters"]),
                tasks=tuple(Task.from_json(t) for t in d["tasks"]),
                queues=tuple(tuple(int(i) for i in q) for q in d["queues"]),
                fused_digest=d["fused_digest"],
            )
        except (KeyError, TypeError, ValueError) as e:
            raise IRError(f"bad schedule: {e}") from None

    def canonical(self) -> bytes:
        return jsonform.canonical(self.to_json())

    def digest(self) -> str:
        return jsonform.digest(self.to_json())

    def dumps(self) -> str:
        """One task per line, so a schedule can be read, diffed and hand-edited."""
        return jsonform.readable(self.to_json(), ("tasks", "queues"))

    @classmethod
    def loads(cls, text: str) -> Schedule:
        return cls.from_json(jsonform.parse(text, "schedule"))
