"""Session: one artifact's kernel with its weights, KV cache, counters and buffers on a device.

    s = Session("llama-2-7b-b1-s4096-sm_90a", synthetic_seed=0)
    first = s.prefill([[1, 2, 3]])        # PyTorch reference (bf16) fills the kernel's caches
    tokens = s.decode(32)                  # [32, B] from the megakernel, one launch per token
    tokens = s.decode(32, tokens_per_launch=32)   # or all 32 steps in one launch
    s.logits                               # [B, V] float32, the last step's

Device memory, allocated once from `params_layout`: the weights (shared with the bf16
`Reference` that does the prefill), every FusedGraph buffer (fp32 scratch is filled with NaN
so that a read of something no task wrote poisons the result), the per-layer KV caches
[B, KV, S, D] bf16, and the u64 counters, zeroed once and never reset: `step0` (steps run on
this counter array so far) keeps growing across launches and prefills, as the kernel's
execution model requires (schedule.py).

Positions: `prefill` of P tokens leaves `pos = P` and the first token (argmax of the prefill's
last logits) in the kernel's `token` buffer; each kernel step embeds `token` at `pos`, appends
its K/V there, and writes the next token back to `token` and to `tokens_out`.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from compiler import __version__
from compiler.artifact import ArtifactError, check_files, read_manifest
from compiler.codegen.dims import kernel_dims
from compiler.codegen.params import params_layout
from compiler.ir.fused import FusedGraph
from compiler.reference import Reference
from compiler.runtime.launch import CpuLauncher, CudaLauncher, Launcher, RuntimeUnavailable
from compiler.runtime.weights import load_reference
from compiler.schedule.schedule import Schedule
from compiler.spec import ModelSpec

DTYPES = {"bf16": torch.bfloat16, "f32": torch.float32, "i64": torch.int64, "u64": torch.int64}
# compute capability a cubin of each arch runs on (an sm_XY cubin runs on X.Y and later X.*;
# the "a" targets only on exactly X.Y)
ARCH_CAPABILITY = {"sm_80": ((8, 0), False), "sm_90a": ((9, 0), True)}


def _launch_interface(version: str) -> str:
    """major.minor of a compiler version: what the kernel's launch interface depends on."""
    return ".".join(version.split(".")[:2])


def _check_device(arch: str, device: int) -> None:
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("no CUDA device is visible to PyTorch (the kernel needs a GPU)")
    if device >= torch.cuda.device_count():
        raise RuntimeUnavailable(f"no CUDA device {device} ({torch.cuda.device_count()} visible)")
    cap = torch.cuda.get_device_capability(device)
    want, exact = ARCH_CAPABILITY.get(arch, ((0, 0), False))
    ok = cap == want if exact else (cap[0] == want[0] and cap >= want)
    if not ok:
        name = torch.cuda.get_device_name(device)
        raise RuntimeUnavailable(
            f"artifact is built for {arch}, but device {device} ({name}) is sm_{cap[0]}{cap[1]}"
        )


class Session:
    """A compiled artifact made runnable: weights, KV cache, counters and buffers on a device.

    Args:
        artifact_dir: directory written by `amk-farm compile` (manifest, fused.json,
            schedule.json, kernel.<arch>.cubin).
        weights: HF safetensors checkpoint directory; exclusive with `synthetic_seed`.
        synthetic_seed: seed of synthetic weights (`compiler.frontend.synthetic`).
        device: CUDA device index, or "cpu" to run the schedule through the CPU interpreter
            (float64, slow: for tests of the runtime without a GPU).
        synthetic_on: "cpu" draws synthetic weights on the host (the frontend's values),
            "device" on the GPU (fast, for benchmarks of large models; other values).
        reference: share the weights of an already loaded `Reference` of the same model
            (e.g. a batch-16 session beside a batch-1 one) instead of loading them again.
        poison: fill the fp32 scratch buffers with NaN at allocation.
        cubin: run this cubin of the artifact's kernel instead of kernel.<arch>.cubin (the
            profile build, `compiler.runtime.profile`).

    Raises:
        ArtifactError: missing or inconsistent artifact files.
        RuntimeUnavailable: no CuPy, driver or suitable GPU.
        LaunchError: the cubin cannot be loaded or the grid cannot be co-resident.
    """

    def __init__(
        self,
        artifact_dir: str | Path,
        weights: str | Path | None = None,
        synthetic_seed: int | None = None,
        device: int | str = 0,
        synthetic_on: str = "cpu",
        reference: Reference | None = None,
        poison: bool = True,
        cubin: Path | None = None,
    ):
        d = Path(artifact_dir)
        self.manifest = read_manifest(d)
        check_files(d, self.manifest)
        if _launch_interface(self.manifest.compiler_version) != _launch_interface(__version__):
            raise ArtifactError(
                f"{d}: compiled by amk-farm {self.manifest.compiler_version}, whose kernel this "
                f"runtime ({__version__}) cannot launch; recompile it"
            )
        self.spec = ModelSpec.from_json(self.manifest.spec)
        self.fused = FusedGraph.loads((d / "fused.json").read_text())
        self.schedule = Schedule.loads((d / "schedule.json").read_text())
        if self.schedule.fused_digest != self.fused.digest():
            raise ArtifactError(f"{d}: schedule.json was not built from fused.json")
        bound = self.schedule.bound()
        self.batch, self.max_seq = bound["B"], bound["S"]
        binding = dict(bound, NCOUNTERS=len(self.schedule.counters), steps=self.max_seq)
        self.layout: dict[str, Any] = params_layout(self.fused, binding)
        opts = self.schedule.options

        self.launcher: Launcher
        if device == "cpu":
            self.device = torch.device("cpu")
            self.launcher = CpuLauncher(self.fused, self.schedule, self.layout)
        else:
            index = int(device)
            _check_device(self.manifest.arch, index)
            self.device = torch.device("cuda", index)
            cubin = cubin or d / f"kernel.{self.manifest.arch}.cubin"
            if not cubin.is_file():
                raise ArtifactError(f"{d}: no {cubin.name} (was nvcc on PATH at compile time?)")
            dims = kernel_dims(self.fused, self.schedule)
            self.launcher = CudaLauncher(
                cubin, self.layout, opts.sm_count, dims.block_threads, dims.smem_bytes, index
            )

        if reference is not None:
            if reference.spec != self.spec or reference.max_seq < self.max_seq:
                raise ValueError("the shared Reference is of another model or a shorter cache")
            self.model = reference
        else:
            self.model = load_reference(
                self.spec, self.max_seq, self.device, weights, synthetic_seed, synthetic_on
            )
        self.tensors = self._allocate(poison)
        # [S, B]: a launch's tokens land at its start (a 16-byte aligned Params pointer)
        self.tokens_out = torch.zeros(
            (self.max_seq, self.batch), dtype=torch.int64, device=self.device
        )
        self.pos: int | None = None  # next decode position; None before the first prefill
        self.step0 = 0  # steps run on this counter array (never reset)
        self.prefill_logits: Tensor | None = None
        self.last_decode_seconds: float | None = None

    def _allocate(self, poison: bool) -> dict[str, Tensor]:
        """Every Params field but tokens_out: weights from the model, the rest allocated."""
        params = dict(self.model.named_parameters())
        out: dict[str, Tensor] = {}
        for f in self.layout["fields"]:
            name, shape = f["name"], f["shape"]
            if f["role"] == "tokens_out":
                continue
            if any(isinstance(s, str) for s in shape):
                raise ArtifactError(f"Params field {name}: unbound shape {shape}")
            if f["role"] == "weight":
                w = params[f["binds"]]
                if tuple(w.shape) != tuple(shape) or w.dtype != torch.bfloat16:
                    raise ArtifactError(f"weight {f['binds']}: {list(w.shape)} {w.dtype}")
                out[name] = w.contiguous()
                continue
            dtype = DTYPES[f["dtype"]]
            t = torch.zeros(shape, dtype=dtype, device=self.device)
            if poison and dtype == torch.float32:
                t.fill_(float("nan"))
            out[name] = t
        return out

    def caches(self) -> tuple[list[Tensor], list[Tensor]]:
        """The kernel's K and V caches per layer, [B, KV, S, D] bf16 (live views)."""
        n = self.spec.num_layers
        return (
            [self.tensors[f"layers[{i}].k_cache"] for i in range(n)],
            [self.tensors[f"layers[{i}].v_cache"] for i in range(n)],
        )

    @torch.no_grad()
    def prefill(self, prompt_ids: Sequence[Sequence[int]] | Tensor) -> Tensor:
        """Run the prompt through the bf16 PyTorch reference and hand its caches to the kernel.

        Args:
            prompt_ids: [B, P] token ids, B the artifact's batch, 1 <= P < S.

        Returns:
            The first generated token per sequence [B] (argmax of the last prompt position's
            logits), which the next `decode` step embeds.
        """
        prompt = torch.as_tensor(prompt_ids, dtype=torch.int64, device=self.device)
        if prompt.dim() != 2 or prompt.shape[0] != self.batch:
            raise ValueError(f"prompt must be [B={self.batch}, P] ids, got {list(prompt.shape)}")
        p = int(prompt.shape[1])
        if not 1 <= p < self.max_seq:
            raise ValueError(f"prompt length {p} must be in [1, {self.max_seq - 1}]")
        if int(prompt.min()) < 0 or int(prompt.max()) >= self.spec.vocab_size:
            raise ValueError(f"prompt ids must be in [0, {self.spec.vocab_size})")
        ks, vs = self.model.empty_cache(self.batch, self.device)
        logits, ks, vs = self.model(prompt, torch.tensor(0, device=self.device), ks, vs)
        kc, vc = self.caches()
        for dst, src in zip([*kc, *vc], [*ks, *vs], strict=True):
            dst.copy_(src)
        del ks, vs
        self.prefill_logits = logits[:, -1].float()
        first = torch.argmax(logits[:, -1], dim=-1)
        self.tensors["token"].copy_(first)
        self.pos = p
        return first

    @torch.no_grad()
    def prefill_random(self, length: int, seed: int = 0) -> None:
        """Benchmark state without a prompt: positions [0, length) of every cache hold
        N(0, 1) bf16 values, the token is random, and decoding resumes at `length`."""
        if not 1 <= length < self.max_seq:
            raise ValueError(f"length {length} must be in [1, {self.max_seq - 1}]")
        g = torch.Generator(device=self.device).manual_seed(seed)
        kc, vc = self.caches()
        for c in [*kc, *vc]:
            c.zero_()
            c[:, :, :length] = torch.randn(
                c[:, :, :length].shape, generator=g, device=self.device
            ).to(torch.bfloat16)
        tok = torch.randint(0, self.spec.vocab_size, (self.batch,), generator=g, device=self.device)
        self.tensors["token"].copy_(tok)
        self.pos = length

    def launch(self, steps: int, pos0: int, tokens_out: Tensor | None = None) -> None:
        """Enqueue one kernel launch of `steps` steps at positions pos0.. (no sync, `pos` kept).

        Tokens go to `tokens_out` [steps, B] (default: the start of the session's buffer; its
        pointer must be 16-byte aligned).
        """
        if steps < 1 or pos0 < 0 or pos0 + steps > self.max_seq:
            raise ValueError(
                f"steps {steps} from position {pos0} do not fit the cache capacity {self.max_seq}"
            )
        out = self.tokens_out if tokens_out is None else tokens_out
        self.launcher.launch(self.tensors, out, steps, pos0, self.step0)
        self.step0 += steps

    @torch.no_grad()
    def decode(self, n: int, tokens_per_launch: int = 1) -> Tensor:
        """Run `n` decode steps on the kernel from the current position.

        Args:
            n: steps; each embeds the previous token and chooses the next.
            tokens_per_launch: steps per kernel launch (1: one launch per token; n: all in
                one launch, the multi-token mode with no host round trip).

        Returns:
            tokens [n, B] int64: step i's argmax (the first step's input is the prefill's token).
        """
        if self.pos is None:
            raise RuntimeError("call prefill() before decode()")
        if n < 1 or tokens_per_launch < 1:
            raise ValueError("n and tokens_per_launch must be positive")
        if self.pos + n > self.max_seq:
            raise ValueError(
                f"{n} steps from position {self.pos} exceed the cache capacity {self.max_seq}"
            )
        result = torch.empty((n, self.batch), dtype=torch.int64, device=self.device)
        t0 = time.perf_counter()
        done = 0
        while done < n:
            k = min(tokens_per_launch, n - done)
            self.launch(k, self.pos)
            result[done : done + k].copy_(self.tokens_out[:k])
            self.pos += k
            done += k
        self.launcher.synchronize()
        self.last_decode_seconds = time.perf_counter() - t0
        return result

    @property
    def logits(self) -> Tensor:
        """The last kernel step's logits [B, V], float32 (a copy)."""
        return self.tensors["logits"].float().clone()
