"""Side-by-side decode benchmark: the megakernel against PyTorch, in one process, on one GPU.

For each KV length L (128 and 2048 by default), with the same weights and the same cache
contents (positions [0, L) random N(0, 1) bf16), one decode step at position L is timed for:

* kernel, 1 token per launch: `Session.launch(1, L)` repeated (the step rewrites slot L);
* kernel, K tokens per launch (multi-token mode): positions L .. L+K-1, time / K;
* eager: a static-cache decode step built from `compiler.reference.Reference`'s own modules
  (in-place cache update, SDPA attention over a cache of capacity L + 64, argmax);
* compile: the same step under `torch.compile(mode="reduce-overhead", fullgraph=True)`
  (Inductor + CUDA graphs), compiled once per cache capacity.

Method: warm-up calls first; each timed call is bracketed by CUDA events; calls are issued back
to back and the median of >= 100 per-call times is reported. The floor is the bf16 weight bytes
read per step over the measured device-to-device copy bandwidth (bytes read + written); "floor +
KV" adds the K/V bytes a step at length L must read. Before timing, one step of the kernel and
of the eager baseline from the same state are compared (next token, logits relative error).
"""

from __future__ import annotations

import math
import statistics
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import Tensor, nn

from compiler.reference import DecoderLayer, Reference, rotate_half
from compiler.runtime.session import Session

BASELINE_SLACK = 64  # cache capacity of a baseline beyond the timed position


def versions(device: torch.device) -> dict[str, str]:
    """Card, driver, CUDA (torch's build and the driver's), torch, CuPy versions."""
    out = {
        "card": torch.cuda.get_device_name(device),
        "torch": torch.__version__,
        "torch_cuda": str(torch.version.cuda),
    }
    try:
        smi = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        out["driver"] = smi.stdout.strip().splitlines()[0] if smi.returncode == 0 else "unknown"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        out["driver"] = "unknown"
    try:
        import cupy

        v = cupy.cuda.runtime.driverGetVersion()
        out["driver_cuda"] = f"{v // 1000}.{v % 1000 // 10}"
        out["cupy"] = cupy.__version__
    except Exception:  # CuPy is optional for this table
        pass
    return out


def time_calls(fn: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    """Milliseconds of each of `reps` back-to-back calls (CUDA events), after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(starts, ends, strict=True):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends, strict=True)]


def copy_bandwidth(device: torch.device, nbytes: int = 2 << 30, reps: int = 20) -> float:
    """Device-to-device copy bandwidth in bytes/s, counting bytes read plus bytes written."""
    a = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    b = torch.empty_like(a)
    ms = statistics.median(time_calls(lambda: b.copy_(a), reps, 3))
    a = b = torch.empty(0)
    torch.cuda.empty_cache()
    return 2 * nbytes / (ms * 1e-3)


class StaticCacheStep(nn.Module):
    """One greedy decode step with an in-place static KV cache, from a Reference's modules.

    `forward(token [B], pos [] int64)` -> (next token [B], logits [B, V]); the caches
    [B, KV, cap, D] are updated in place at `pos` (as HF's StaticCache does), attention is SDPA
    over the whole capacity with a causal mask.
    """

    def __init__(self, ref: Reference, batch: int, cap: int, device: torch.device):
        super().__init__()
        s = ref.spec
        self.ref, self.cap = ref, cap
        shape = (batch, s.num_kv_heads, cap, s.head_dim)
        self.k = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in ref.model.layers]
        self.v = [torch.zeros(shape, dtype=torch.bfloat16, device=device) for _ in ref.model.layers]
        for t in [*self.k, *self.v]:
            torch._dynamo.mark_static_address(t)  # CUDA graphs may keep their addresses

    def forward(self, token: Tensor, pos: Tensor) -> tuple[Tensor, Tensor]:
        ref, s = self.ref, self.ref.spec
        x, cos, sin, mask, positions = ref.prologue(token[:, None], pos, self.cap)
        b, d = token.shape[0], s.head_dim
        for module, kc, vc in zip(ref.model.layers, self.k, self.v, strict=True):
            layer = cast(DecoderLayer, module)
            a = layer.self_attn
            h = layer.input_layernorm(x)
            q = a.q_proj(h).view(b, 1, s.num_heads, d).transpose(1, 2)  # [B, H, 1, D]
            k = a.k_proj(h).view(b, 1, s.num_kv_heads, d).transpose(1, 2)  # [B, KV, 1, D]
            v = a.v_proj(h).view(b, 1, s.num_kv_heads, d).transpose(1, 2)
            q = q * cos + rotate_half(q) * sin
            k = k * cos + rotate_half(k) * sin
            kc.index_copy_(2, positions, k)
            vc.index_copy_(2, positions, v)
            o = nn.functional.scaled_dot_product_attention(
                q, kc, vc, attn_mask=mask, enable_gqa=s.num_kv_heads != s.num_heads
            )  # [B, H, 1, D]
            x = x + a.o_proj(o.transpose(1, 2).reshape(b, 1, s.q_size))
            x = x + layer.mlp(layer.post_attention_layernorm(x))
        logits = ref.epilogue(x)[:, 0]
        return torch.argmax(logits, dim=-1), logits


@dataclass
class Row:
    """One (batch, KV length) measurement, milliseconds per decode step."""

    batch: int
    kv_len: int
    kernel_ms: float
    kernel_multi_ms: float
    multi_tokens: int
    eager_ms: float
    compile_ms: float | None
    floor_ms: float
    floor_kv_ms: float
    agree: bool
    logits_rel_err: float

    def to_json(self) -> dict[str, Any]:
        d = dict(self.__dict__)
        best = min(self.kernel_ms, self.kernel_multi_ms)
        d["floor_fraction"] = self.floor_ms / best
        d["speedup_vs_eager"] = self.eager_ms / self.kernel_ms
        d["speedup_vs_compile"] = self.compile_ms / self.kernel_ms if self.compile_ms else None
        d["kernel_tokens_per_s"] = self.batch * 1e3 / self.kernel_ms
        d["compile_tokens_per_s"] = self.batch * 1e3 / self.compile_ms if self.compile_ms else None
        return d


def _kv_bytes(session: Session, kv_len: int) -> int:
    s = session.spec
    return 2 * s.num_layers * session.batch * s.num_kv_heads * (kv_len + 1) * s.head_dim * 2


def _time_at(
    session: Session,
    step: StaticCacheStep,
    token: Tensor,
    pos: Tensor,
    reps: int,
    warmup: int,
    multi: int,
    compiled: bool,
    log: Callable[[str], None],
) -> tuple[float, float, float, float | None]:
    """Median ms per step: kernel (1 and `multi` steps a launch), eager, compiled (or None)."""
    kv = int(pos)

    def one() -> None:
        session.launch(1, kv)

    def many() -> None:
        session.launch(multi, kv)

    def eager_step() -> None:
        step(token, pos)

    kernel = statistics.median(time_calls(one, reps, warmup))
    kernel_multi = statistics.median(time_calls(many, max(4, math.ceil(reps / multi)), 2)) / multi
    eager = statistics.median(time_calls(eager_step, reps, 3))
    log(f"  kernel {kernel:.3f} ms, x{multi} {kernel_multi:.3f} ms, eager {eager:.3f} ms")
    if not compiled:
        return kernel, kernel_multi, eager, None
    fn = torch.compile(step, mode="reduce-overhead", fullgraph=True)

    def compiled_step() -> None:
        torch.compiler.cudagraph_mark_step_begin()
        fn(token, pos)

    try:
        comp = statistics.median(time_calls(compiled_step, reps, warmup))
    except Exception as e:  # report the other columns even if Inductor fails here
        log(f"  compile FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
        return kernel, kernel_multi, eager, None
    skips = torch._dynamo.utils.counters["inductor"].get("cudagraph_skips", 0)
    log(f"  compile {comp:.3f} ms (cudagraph skips so far: {skips})")
    return kernel, kernel_multi, eager, comp


@torch.no_grad()
def bench_session(
    session: Session,
    kv_lens: tuple[int, ...],
    bandwidth: float,
    reps: int = 100,
    warmup: int = 10,
    multi: int = 32,
    compiled: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> list[Row]:
    """Time the kernel and both baselines at each KV length (see the module docstring)."""
    dev = session.device
    session.prefill_random(max(kv_lens) + 1, seed=1)
    torch._dynamo.config.cache_size_limit = max(64, torch._dynamo.config.cache_size_limit)
    torch._dynamo.config.automatic_dynamic_shapes = False  # one static graph per capacity
    rows = []
    kc, vc = session.caches()
    weight_bytes = session.spec.weight_bytes_bf16
    for kv in kv_lens:
        cap = kv + BASELINE_SLACK
        step = StaticCacheStep(session.model, session.batch, cap, dev)
        for dst, src in zip([*step.k, *step.v], [*kc, *vc], strict=True):
            dst.copy_(src[:, :, :cap])
        token = session.tensors["token"].clone()
        pos = torch.tensor(kv, device=dev)
        # the same step from the same state: kernel vs eager baseline
        want_tok, want_logits = step(token, pos)
        session.tensors["token"].copy_(token)
        session.launch(1, kv)
        got_tok, got_logits = session.tensors["token"].clone(), session.logits
        agree = bool(torch.equal(got_tok, want_tok))
        err = float((got_logits - want_logits.float()).norm() / want_logits.float().norm())
        log(f"b{session.batch} L={kv}: kernel vs eager next token agree={agree} rel err {err:.2e}")

        kernel, kernel_multi, eager, comp = _time_at(
            session, step, token, pos, reps, warmup, multi, compiled, log
        )
        rows.append(
            Row(
                batch=session.batch,
                kv_len=kv,
                kernel_ms=kernel,
                kernel_multi_ms=kernel_multi,
                multi_tokens=multi,
                eager_ms=eager,
                compile_ms=comp,
                floor_ms=weight_bytes / bandwidth * 1e3,
                floor_kv_ms=(weight_bytes + _kv_bytes(session, kv)) / bandwidth * 1e3,
                agree=agree,
                logits_rel_err=err,
            )
        )
        del step
        torch.cuda.empty_cache()
    return rows


def table(model: str, rows: list[dict[str, Any]]) -> str:
    """A markdown table of `Row.to_json()` rows."""
    head = (
        "| model | batch | KV len | kernel (1 tok/launch) | kernel (K tok/launch) | eager | "
        "compile (CUDA graphs) | floor (weights) | floor + KV | of floor | vs eager | "
        "vs compile | kernel tok/s | compile tok/s | next token agrees |"
    )
    lines = [head, "|" + "---|" * 15]
    for r in rows:
        comp = r["compile_ms"]
        lines.append(
            f"| {model} | {r['batch']} | {r['kv_len']} | {r['kernel_ms']:.3f} ms | "
            f"{r['kernel_multi_ms']:.3f} ms (K={r['multi_tokens']}) | {r['eager_ms']:.2f} ms | "
            + (f"{comp:.3f} ms" if comp else "-")
            + f" | {r['floor_ms']:.3f} ms | {r['floor_kv_ms']:.3f} ms | "
            f"{100 * r['floor_fraction']:.0f}% | {r['speedup_vs_eager']:.1f}x | "
            + (f"{r['speedup_vs_compile']:.2f}x" if comp else "-")
            + f" | {r['kernel_tokens_per_s']:.0f} | "
            + (f"{r['compile_tokens_per_s']:.0f}" if comp else "-")
            + f" | {'yes' if r['agree'] else 'no'} (logits rel err {r['logits_rel_err']:.1e}) |"
        )
    return "\n".join(lines)


METHOD = (
    "same process, same weights and cache contents; CUDA events around each call, calls back "
    "to back; {warmup} warm-up calls, median of {reps} timed calls (kernel multi-token: median "
    "of launches of K steps, divided by K); baselines: static-cache step built from "
    "compiler.reference.Reference modules (in-place cache, SDPA, capacity L+64), eager and "
    'torch.compile(mode="reduce-overhead", fullgraph=True); floor = bf16 weight bytes / '
    "measured D2D copy bandwidth (read + write)"
)


def run_bench(
    artifact: str,
    weights: str | None = None,
    seed: int = 0,
    kv_lens: tuple[int, ...] = (128, 2048),
    reps: int = 100,
    warmup: int = 10,
    multi: int = 32,
    batch16: str | None = None,
    compiled: bool = True,
    log: Callable[[str], None] = lambda _: None,
) -> dict[str, Any]:
    """The whole benchmark of one artifact (and optionally a batch-16 artifact of the model).

    Synthetic weights are drawn on the device (`synthetic_on="device"`): values do not change
    the timings, and drawing billions of them on the host would dominate the run.
    """
    if reps < 100:
        raise ValueError("the benchmark takes the median of at least 100 steps")
    src = {"weights": weights} if weights else {"synthetic_seed": seed, "synthetic_on": "device"}
    log(f"loading {artifact}")
    session = Session(artifact, **src)
    dev = session.device
    env = versions(dev)
    bw = copy_bandwidth(dev)
    log(f"{env['card']}: device copy {bw / 1e12:.2f} TB/s")
    rows = bench_session(session, kv_lens, bw, reps, warmup, multi, compiled, log)
    if batch16 is not None:
        s16 = Session(batch16, reference=session.model)
        if s16.manifest.model_hash != session.manifest.model_hash:
            raise ValueError(f"{batch16} is not an artifact of {session.spec.name}")
        rows += bench_session(s16, (kv_lens[0],), bw, reps, warmup, multi, compiled, log)
    return {
        "model": session.spec.name,
        "artifact": str(artifact),
        "template": session.manifest.template,
        "options_hash": session.manifest.options_hash,
        "weights": weights or f"synthetic seed {seed} (drawn on the device)",
        "versions": env,
        "copy_bandwidth_Bps": bw,
        "weight_bytes": session.spec.weight_bytes_bf16,
        "method": METHOD.format(warmup=warmup, reps=reps),
        "rows": [r.to_json() for r in rows],
    }


def report(result: dict[str, Any]) -> str:
    """The benchmark as markdown: versions, method, bandwidth, and the table."""
    v = result["versions"]
    return "\n".join(
        [
            f"{result['model']} ({result['template']}, weights: {result['weights']})",
            f"card {v['card']}, driver {v.get('driver')} (CUDA {v.get('driver_cuda', '?')}), "
            f"torch {v['torch']} (CUDA {v['torch_cuda']})",
            f"device copy bandwidth {result['copy_bandwidth_Bps'] / 1e12:.2f} TB/s (read + write); "
            f"bf16 weights {result['weight_bytes'] / 1e9:.2f} GB per step",
            f"method: {result['method']}",
            "",
            table(result["model"], result["rows"]),
        ]
    )
