"""render_kernel: a FusedGraph and its Schedule -> kernel.cu, one persistent CUDA megakernel.

kernel.cu, top to bottom: the model's dims as constexprs (dims.py), the primitives (amk.cuh,
pasted verbatim), `Params` (params.py), the schedule as `__device__ const` tables (tables.py),
one `__device__` function per instruction kind (device.py), and the one `__global__` function:

    producer warp:
        for step in 0 .. steps-1: for task in this CTA's queue:
            stream the task's weight rows into the ring (matvec kinds; slots freed by consumers)
    consumer threads:
        for step in 0 .. steps-1:                (position pos0 + step, global step step0 + step)
            for task in this CTA's queue:
                thread 0 waits (acquire) for the task's counters; consumer barrier
                run the kind's device function over the task's tile (weights from the ring)
                consumer barrier; thread 0 increments the task's counter (release)

Rendering is a pure function of its inputs: the same FusedGraph and Schedule give the same bytes.
With `profile=True` (the build `amk-farm profile` runs, never an artifact's kernel.cu) the kernel
also records global-timer stamps per task (PROFILE_DOC); without it not one line of that code is
emitted, so the timed kernel carries nothing of it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from compiler.codegen.device import function_name, render_device, streams_weights
from compiler.codegen.dims import CodegenError, kernel_dims, render_dims
from compiler.codegen.emit import Emitter
from compiler.codegen.params import render_params
from compiler.codegen.tables import OPS, check_schedule, op_name, render_tables
from compiler.ir.fused import FusedGraph, Kind
from compiler.schedule.schedule import Schedule

PRELUDE = Path(__file__).with_name("amk.cuh")
KERNEL_NAME = "amk_megakernel"
OVERVIEW = f"""\
ONE persistent kernel, {KERNEL_NAME}: grid = SM_COUNT CTAs (one per SM, launched
cooperatively so all are co-resident), BLOCK_THREADS threads each: THREADS consumer threads
and one producer warp. CTA s runs queue s of the schedule every decode step; tasks wait on and
signal u64 counters in global memory (acquire/release), which are never reset: a wait's target
grows with the global step. The producer warp walks the same queue without waiting on any
counter and streams each matvec task's weights into a ring of STAGES shared-memory slots, so
weight reads run ahead of the consumers across task boundaries and dependency waits."""
PROFILE_DOC = """\
profile build: the host points amk_prof at PROF_WORDS u64 words, zeroed before each launch:
  [id * 4 + 0..3]                consumer thread 0 of task id: start, counter waits done, end
                                 (after its signal), and the SM it ran on (%smid)
  [NTASKS * 4 + id * 2 + 0..1]   producer lane 0: start and end of issuing the task's weights
  [NTASKS * 6 + id * 5 + 0..4]   marks inside the task body (0: not reached), amk.cuh's
                                 `// @mark k` lines: 0 matvec: RMSNorm statistics done (or
                                 matvec entered); 1 matvec: the last input chunk staged,
                                 attention: a batch row's keys folded; 2 matvec: every weight
                                 slot consumed, attention: key slots merged in each warp;
                                 3 mma matvec: the warps' sums reduced, attention: the warps
                                 merged; 4 the body done, before its signal (each mark the last
                                 time the task reached it)
stamps are %globaltimer nanoseconds of the last step the launch ran"""
# amk.cuh's `// @profile-defs` line becomes these in the profile build (before any mark)
PROFILE_EARLY = """\
__device__ u64* amk_prof;  // PROF_WORDS words, set by the host (profile build only)
__device__ u64 amk_marks[SM_COUNT * 5];  // per CTA: the marks of the task it is running
__device__ __forceinline__ u64 prof_now() {
  u64 t;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t)::"memory");
  return t;
}
__device__ __forceinline__ unsigned prof_smid() {
  unsigned s;
  asm volatile("mov.u32 %0, %%smid;" : "=r"(s));
  return s;
}
__device__ __forceinline__ void prof_mark(int k) {
  if (threadIdx.x == 0) amk_marks[blockIdx.x * 5 + k] = prof_now();
}"""
PROFILE_DEFS = "constexpr int PROF_WORDS = NTASKS * 11;"
MARK = re.compile(r"^(\s*)// @mark (\d)$", re.M)


def prelude(profile: bool) -> str:
    """amk.cuh as pasted into kernel.cu: verbatim, or with its profile lines filled in."""
    text = PRELUDE.read_text()
    if not profile:
        return text
    return MARK.sub(r"\1prof_mark(\2);", text.replace("// @profile-defs", PROFILE_EARLY))


ENTRY = f"""\
{KERNEL_NAME}(p, steps, pos0, step0): runs `steps` decode steps at positions pos0 ..
pos0+steps-1; step0 = the steps this counter array has already run. Each step embeds token[b],
runs the layers, the LM head and the argmax -> token[b] and tokens_out[step][b] (step counted
from this launch). Needs gridDim.x == SM_COUNT, blockDim.x == THREADS and
0 <= pos0 <= pos0 + steps <= S, else it traps."""


def _whole_pairs(r0: int, r1: int) -> bool:
    """QKV rows [r0, r1) (pair order) hold both rows of each RoPE pair they touch: r0 and r1
    even (device.py pairs task rows v and v ^ 1; heads are D rows, D even)."""
    return r0 % 2 == 0 and r1 % 2 == 0


def _check_tiles(fg: FusedGraph, sched: Schedule) -> None:
    """Every task's tile lies inside its buffers, QKV tiles are whole heads or an even sub-range
    of one head (in pair order both halves of each RoPE pair are in the task), EMBED columns come
    in 16-byte groups, and no LM-head tile is empty."""
    d, h, i = int(fg.dim("head_dim")), int(fg.dim("hidden")), int(fg.dim("intermediate"))
    kv, qkv_rows = int(fg.dim("kv_heads")), (int(fg.dim("heads")) + 2 * int(fg.dim("kv_heads"))) * d
    b = sched.bound()
    vocab, nt = int(fg.dim("vocab")), b["NT"]
    if (nt - 1) * -(-vocab // nt) >= vocab:
        raise CodegenError(
            f"NT={nt} vocabulary tiles of {-(-vocab // nt)} rows leave the last one empty"
        )
    ranges = {  # kinds whose params start with rows (or columns) [r0, r1) of a buffer of this size
        Kind.EMBED: h, Kind.QKV_ROPE_APPEND: qkv_rows, Kind.OPROJ_RESIDUAL: h,
        Kind.GATE_UP_SILU: i, Kind.DOWN_PARTIAL: h, Kind.DOWN_RESIDUAL: h,
    }  # fmt: skip
    indices = {  # kinds whose params are indices below these bounds
        Kind.ATTN_PARTIAL: (kv, b["P"]), Kind.ATTN_MERGE: (kv,), Kind.LMHEAD_ARGMAX: (nt,),
    }  # fmt: skip
    for t in sched.tasks:
        ps = t.params
        if t.kind in ranges and not 0 <= ps[0] < ps[1] <= ranges[t.kind]:
            raise CodegenError(f"task {t.id}: rows {ps[:2]} outside [0, {ranges[t.kind]})")
        if t.kind in indices and not all(
            0 <= p < n for p, n in zip(ps, indices[t.kind], strict=True)
        ):
            raise CodegenError(f"task {t.id}: params {ps} outside {indices[t.kind]}")
        if t.kind == Kind.DOWN_PARTIAL and not 0 <= ps[2] < b["KS"]:
            raise CodegenError(f"task {t.id}: split-K chunk {ps[2]} outside [0, {b['KS']})")
        if t.kind == Kind.QKV_ROPE_APPEND and not _whole_pairs(ps[0], ps[1]):
            raise CodegenError(
                f"task {t.id}: QKV rows {ps} are not an even range (RoPE pairs would be split)"
            )
        if t.kind == Kind.EMBED and (ps[0] % 8 or ps[1] % 8):
            raise CodegenError(f"task {t.id}: EMBED columns {ps} are not multiples of 8")


def _header(e: Emitter, fg: FusedGraph, sched: Schedule) -> None:
    e.comment("kernel.cu: generated by amk-farm (compiler/codegen). Regenerate; do not edit.")
    e.comment(f"model hash {fg.graph_digest or '-'}")
    e.comment(f"fused {fg.digest()}")
    e.comment(f"schedule {sched.digest()}  template {sched.template}")
    e.comment(f"options {json.dumps(sched.options.to_json(), sort_keys=True)}")
    e.comment("")
    e.comment(OVERVIEW)
    e.line("#include <cuda_bf16.h>")
    e.line("#include <cuda/atomic>")
    e.blank()


def _kernel(e: Emitter, profile: bool) -> None:
    e.comment(ENTRY)
    e.line('extern "C" __global__ void __launch_bounds__(BLOCK_THREADS, 1)')
    with e.block(
        f"{KERNEL_NAME}(const __grid_constant__ Params p, const int steps, const int pos0, const unsigned long long step0)"
    ):
        e.line("extern __shared__ __align__(128) unsigned char smem_raw[];")
        e.line(
            "if (gridDim.x != SM_COUNT || blockDim.x != BLOCK_THREADS || dynamic_smem_size() < SMEM_BYTES ||"
        )
        e.line("    pos0 < 0 || steps < 0 || pos0 > S - steps)")
        e.line("  __trap();")
        e.line("const Smem sm = smem_plan(smem_raw);")
        e.line("if (threadIdx.x == 0) ring_init(sm);")
        e.line("__syncthreads();  // the last CTA-wide barrier: from here on, two roles")
        e.line("const int q0 = QUEUE_OFF[blockIdx.x], q1 = QUEUE_OFF[blockIdx.x + 1];")
        e.line("Ring ring;")
        with e.block("if (threadIdx.x >= THREADS)"):
            e.comment("the producer warp: weights only, no counter waits")
            with (
                e.block("for (int step = 0; step < steps; ++step)"),
                e.block("for (int qi = q0; qi < q1; ++qi)"),
            ):
                e.line("const int id = QUEUE[qi];")
                e.line("const Task t = TASKS[id];")
                if profile:
                    e.line("const u64 t0 = prof_now();")
                with e.block("switch (t.op)"):
                    for k in OPS:
                        if streams_weights(k):
                            e.line(
                                f"case {op_name(k)}: load_{function_name(k)}(p, t, sm, ring); break;"
                            )
                    e.line("default: break;  // reads no weights through the ring")
                if profile:
                    e.line("if (lane_id() == 0 && step == steps - 1)")
                    e.line(
                        "  amk_prof[NTASKS * 4 + id * 2] = t0, amk_prof[NTASKS * 4 + id * 2 + 1] = prof_now();"
                    )
            e.line("return;")
        with e.block("for (int step = 0; step < steps; ++step)"):
            e.line("const int pos = pos0 + step;")
            e.line("const i64 gstep = static_cast<i64>(step0) + step;")
            with e.block("for (int qi = q0; qi < q1; ++qi)"):
                e.line("const int id = QUEUE[qi];")
                e.line("const Task t = TASKS[id];")
                if profile:
                    e.line("const u64 t0 = prof_now();")
                e.line("wait_task(p.counters, t, WAITS, PER_STEP, gstep);")
                if profile:
                    e.line("const u64 t1 = prof_now();")
                    e.line("if (threadIdx.x == 0)")
                    e.line("  for (int k = 0; k < 5; ++k) amk_marks[blockIdx.x * 5 + k] = 0;")
                with e.block("switch (t.op)"):
                    for k in OPS:
                        e.line(
                            f"case {op_name(k)}: {function_name(k)}(p, t, pos, step, sm, ring); break;"
                        )
                    e.line("default: __trap();")
                if profile:
                    e.line("prof_mark(4);")
                e.line("signal_task(p.counters, t);")
                if profile:
                    with e.block("if (threadIdx.x == 0 && step == steps - 1)"):
                        e.line("u64* r = amk_prof + id * 4;")
                        e.line("r[0] = t0, r[1] = t1, r[2] = prof_now(), r[3] = prof_smid();")
                        e.line("for (int k = 0; k < 5; ++k)")
                        e.line(
                            "  amk_prof[NTASKS * 6 + id * 5 + k] = amk_marks[blockIdx.x * 5 + k];"
                        )


def render_kernel(fg: FusedGraph, sched: Schedule, profile: bool = False) -> str:
    """The whole kernel.cu for `fg` under `sched`.

    Args:
        fg: the fused graph (instructions, buffers, dims).
        sched: a schedule of `fg` (tasks, counters, per-SM queues, options).
        profile: the instrumented build of `amk-farm profile` (PROFILE_DOC); an artifact's
            kernel.cu is always rendered without it.

    Returns:
        CUDA C++ source with exactly one `__global__` function, `amk_megakernel`.

    Raises:
        CodegenError: the schedule is inconsistent with `fg`, or uses a tile or dim the device
            functions do not support.
    """
    if sched.fused_digest and sched.fused_digest != fg.digest():
        raise CodegenError("schedule was built from another fused graph")
    check_schedule(fg, sched)
    _check_tiles(fg, sched)
    dims = kernel_dims(fg, sched)
    e = Emitter()
    _header(e, fg, sched)
    render_dims(e, dims)
    e.blank()
    e.raw(prelude(profile))
    e.blank()
    render_params(e, fg)
    e.blank()
    render_tables(e, sched)
    e.blank()
    if profile:
        e.comment(PROFILE_DOC)
        e.raw(PROFILE_DEFS)
        e.blank()
    e.comment("---- instruction bodies, one per kind ----")
    for k in OPS:
        render_device(e, k)
    _kernel(e, profile)
    return e.text()
