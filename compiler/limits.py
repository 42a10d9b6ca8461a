"""The stated limits on every input, in one place, checked before any work starts.

Model dimensions (an HF config.json, a catalog entry, a manifest's spec), shape templates, the
schedule's options, and two estimates: the memory the compile itself would take (it grows with
the schedule's task count) and the device memory the kernel would need (bf16 weights plus its KV
cache). Every refusal is one line naming the field, its value and the limit.

The model limits are about four times the largest public LLaMA-family model (Llama-3.1-405B:
hidden 16384, intermediate 53248, 126 layers, 128 heads, vocabulary 128256, 131072 positions),
so real models pass and a typo or an attack (hidden_size 10**12) is refused in microseconds.
head_dim 256 is what the kernel's attention body handles (codegen/dims.py). The compile-memory
estimate is calibrated on measured compiles (llama-3-70b b1-s8192: 107891 tasks, 1.5 GB peak;
the estimate says 2.2 GB): the largest accepted compile is about ten times the 70B's tasks.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from compiler.spec import ModelSpec, ShapeTemplate

GiB = 1 << 30

# field -> the largest accepted value. ModelSpec's field names; HF_NAMES maps config.json's.
LIMITS: dict[str, int] = {
    "hidden_size": 65536,
    "intermediate_size": 262144,
    "num_layers": 512,
    "num_heads": 1024,
    "num_kv_heads": 1024,
    "head_dim": 256,
    "vocab_size": 1 << 20,
    "max_position_embeddings": 1 << 20,
    "sliding_window": 1 << 20,
    "original_max_position_embeddings": 1 << 20,
    # shape template b<batch>-s<max_seq>; max_seq is also at most the model's positions
    "batch": 256,
    "max_seq": 1 << 20,
    # schedule options (compiler/schedule/schedule.py Options); each also at least 1 (qkv_rows 0)
    "sm_count": 1024,
    "threads": 1024,
    "stages": 64,
    "stage_bytes": 1 << 20,
    "work_bytes": 1 << 20,
    "qkv_heads_per_task": 1 << 12,
    "qkv_head_split": 128,  # a divisor of head_dim / 2 (head_dim is at most 256)
    "qkv_rows": 1 << 20,  # rows of [Wq; Wk; Wv] a QKV task (0: not set)
    "row_tile": 1 << 16,
    "lm_head_rows": 1 << 20,
    "kv_partitions": 1 << 12,
    "down_splits": 1 << 12,
    "embed_cols": 1 << 16,
    "mma_rows": 1024,  # codegen takes 16, 32 or 64; this bounds only the work
}
# real-valued fields: the largest accepted value (each is also positive and finite). An eps
# above 1 or a RoPE base above 1e12 is no model's; 1e-30 keeps the eps a normal float32.
FLOAT_LIMITS: dict[str, float] = {
    "rms_norm_eps": 1.0,
    "rope_theta": 1e12,
    "factor": 1e6,
    "low_freq_factor": 1e6,
    "high_freq_factor": 1e6,
}
MIN_RMS_NORM_EPS = 1e-30
HF_NAMES = {
    "num_layers": "num_hidden_layers",
    "num_heads": "num_attention_heads",
    "num_kv_heads": "num_key_value_heads",
}
COMPILE_MEMORY_LIMIT = 16 * GiB  # the compile's own peak (graph, schedule, kernel.cu)
COMPILE_BASE_BYTES = 512 << 20  # torch, the graph and the passes of a small model
COMPILE_TASK_BYTES = 16 << 10  # per schedule task: its spec, accesses, waits and JSON
DEVICE_MEMORY_LIMIT = 144 * GiB  # the largest card amk-farm targets: the H200's 144 GiB HBM
MAX_DIGITS = 12  # a number written with more digits is over every limit; never converted


class LimitError(ValueError):
    """An input over one of the stated limits."""


def show(value: Any, width: int = 40) -> str:
    """`repr(value)`, cut to `width` characters (a 5000-digit number stays one short line)."""
    text = repr(value) if not isinstance(value, int) or abs(value) < 10**width else "<huge int>"
    return text if len(text) <= width else text[: width - 3] + "..."


def show_digits(digits: str) -> str:
    """A number as written, cut to a short line if it is very long."""
    return digits if len(digits) <= 40 else f"{digits[:20]}... ({len(digits)} digits)"


def check(field: str, value: int, where: str = "", name: str | None = None) -> int:
    """`value` if it is within the limit of `field`; else LimitError naming `name or field`."""
    limit = LIMITS[field]
    if value > limit:
        prefix = f"{where}: " if where else ""
        raise LimitError(f"{prefix}{name or field} {show(value)} exceeds the limit {limit}")
    return value


def schedule_tasks(spec: ModelSpec, template: ShapeTemplate, options: Any) -> int:
    """The number of tasks `build_schedule` makes (compiler/schedule/split.py, counted)."""
    h, i, rows = spec.hidden_size, spec.intermediate_size, options.row_tile
    kv = spec.num_kv_heads
    ks = max(k for k in range(1, min(i, options.down_splits) + 1) if i % k == 0)
    per_layer = (
        (  # qkv_rope_append
            math.ceil((spec.num_heads + 2 * kv) * spec.head_dim / options.qkv_rows)
            if options.qkv_rows
            else math.ceil((spec.num_heads + 2 * kv) / options.qkv_heads_per_task)
            * options.qkv_head_split
        )
        + kv * min(options.kv_partitions, template.max_seq)  # attn_partial
        + kv  # attn_merge
        + math.ceil(h / rows) * (2 + ks)  # oproj_residual, down_partial x KS, down_residual
        + math.ceil(i / rows)  # gate_up_silu
    )
    embed = math.ceil(h / options.embed_cols)
    return (
        embed + spec.num_layers * per_layer + math.ceil(spec.vocab_size / options.lm_head_rows) + 1
    )


def compile_bytes(tasks: int) -> int:
    """Estimated peak memory of a compile whose schedule has `tasks` tasks."""
    return COMPILE_BASE_BYTES + COMPILE_TASK_BYTES * tasks


def device_bytes(spec: ModelSpec, template: ShapeTemplate) -> int:
    """The kernel's device memory: bf16 weights plus the K and V caches of every layer."""
    cache = 2 * spec.num_layers * template.batch * spec.kv_size * template.max_seq * 2
    return spec.weight_bytes_bf16 + cache


def check_compile(spec: ModelSpec, template: ShapeTemplate, options: Any) -> None:
    """Refuse a compile of `spec` for `template` with `options` that is over a limit.

    Raises:
        LimitError: the template's capacity exceeds the model's positions, or the compile's
            or the kernel's estimated memory is over its limit. (Options check their own
            limits when they are made.)
    """
    where = f"{spec.name} {template}"
    if template.max_seq > spec.max_position_embeddings:
        raise LimitError(
            f"shape template {template}: max_seq {template.max_seq} exceeds {spec.name}'s "
            f"max_position_embeddings {spec.max_position_embeddings}"
        )
    tasks = schedule_tasks(spec, template, options)
    need = compile_bytes(tasks)
    if need > COMPILE_MEMORY_LIMIT:
        raise LimitError(
            f"{where}: the compile would take about {need / GiB:.1f} GiB ({tasks} schedule tasks), "
            f"over the limit {COMPILE_MEMORY_LIMIT / GiB:.0f} GiB"
        )
    device = device_bytes(spec, template)
    if device > DEVICE_MEMORY_LIMIT:
        raise LimitError(
            f"{where}: the kernel would need {device / GiB:.1f} GiB of device memory (bf16 "
            f"weights and KV cache), over the limit {DEVICE_MEMORY_LIMIT / GiB:.0f} GiB"
        )
