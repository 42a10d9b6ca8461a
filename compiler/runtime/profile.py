"""Profile one artifact's decode step on the GPU: the instrumented build, its stamps, its cost.

    build(artifact, work)      kernel.cu rendered again from the artifact's fused.json and
                               schedule.json with profile=True, compiled with the artifact's arch
    run(artifact, ...)         the artifact's own kernel and the profile build side by side on
                               one set of weights: both timed (so the instrumentation's cost is
                               measured, not guessed), then `steps` profiled one-step launches

The profile build is the same kernel (same tables, bodies and launch shape) plus a global-timer
stamp at three points of every task and around the producer's weight issue (kernel.py
PROFILE_DOC); the artifact's kernel.cu must be exactly what this compiler renders without
profile=True, so that the profile is of the kernel that runs.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from compiler.artifact import ArtifactError, read_manifest
from compiler.codegen.kernel import render_kernel
from compiler.codegen.nvcc import compile_cubin
from compiler.ir.fused import FusedGraph
from compiler.runtime.bench import copy_bandwidth, time_calls, versions
from compiler.runtime.launch import CudaLauncher, RuntimeUnavailable
from compiler.runtime.session import Session
from compiler.runtime.timeline import WORDS, Timeline, analyse
from compiler.schedule.schedule import Schedule


@dataclass
class Profile:
    timelines: list[Timeline]
    analysis: dict[str, Any]
    plain_ms: float  # the artifact's kernel, median of `reps` one-step launches
    profiled_ms: float  # the profile build, the same way
    schedule: Schedule
    meta: dict[str, Any]


def build(artifact: Path, work: Path) -> Path:
    """The profile build of `artifact`'s kernel, compiled into `work`; returns its cubin."""
    man = read_manifest(artifact)
    fg = FusedGraph.loads((artifact / "fused.json").read_text())
    sched = Schedule.loads((artifact / "schedule.json").read_text())
    if render_kernel(fg, sched) != (artifact / "kernel.cu").read_text():
        raise ArtifactError(
            f"{artifact}/kernel.cu is not what this compiler renders from its fused.json and "
            "schedule.json: a profile of it would be of another kernel (recompile the artifact)"
        )
    work.mkdir(parents=True, exist_ok=True)
    src = work / "kernel.profile.cu"
    src.write_text(render_kernel(fg, sched, profile=True))
    cubin = work / f"kernel.profile.{man.arch}.cubin"
    compile_cubin(src, man.arch, cubin)
    return cubin


@torch.no_grad()
def run(
    artifact: Path,
    work: Path,
    weights: Path | None = None,
    seed: int = 0,
    kv_len: int = 128,
    steps: int = 20,
    reps: int = 100,
    log: Callable[[str], None] = lambda _: None,
) -> Profile:
    """Time the artifact's kernel and its profile build at `kv_len`, then record `steps` steps.

    Weights are the checkpoint at `weights` or synthetic (`seed`, drawn on the device). Both
    sessions share them and start from the same random KV cache of `kv_len` positions.
    """
    synthetic = None if weights is not None else seed
    if not torch.cuda.is_available():
        raise RuntimeUnavailable("no CUDA device is visible to PyTorch (the kernel needs a GPU)")
    bw = copy_bandwidth(torch.device("cuda", 0))  # first: its 4 GiB are free before a 70B loads
    plain = Session(artifact, weights=weights, synthetic_seed=synthetic, synthetic_on="device")
    if not 1 <= kv_len < plain.max_seq:
        raise ValueError(f"--kv {kv_len} must be in [1, {plain.max_seq - 1}] for this template")
    cubin = build(artifact, work)
    log(f"profile build: {cubin}")
    prof = Session(artifact, cubin=cubin, reference=plain.model)
    n = len(prof.schedule.tasks) * WORDS  # PROF_WORDS
    words = torch.zeros(n, dtype=torch.int64, device=prof.device)
    assert isinstance(prof.launcher, CudaLauncher)
    prof.launcher.set_pointer("amk_prof", words.data_ptr())
    for s in (plain, prof):
        s.prefill_random(kv_len, seed=1)
    plain_ms = statistics.median(time_calls(lambda: plain.launch(1, kv_len), reps, 10))
    prof_ms = statistics.median(time_calls(lambda: prof.launch(1, kv_len), reps, 10))
    log(f"kernel {plain_ms:.3f} ms, profile build {prof_ms:.3f} ms (median of {reps})")
    tls = []
    for _ in range(steps):
        words.zero_()
        prof.launch(1, kv_len)
        prof.launcher.synchronize()
        tls.append(Timeline.from_stamps(words.cpu().numpy().view(np.uint64), prof.schedule))
    analysis = analyse(tls, prof.fused, prof.schedule, kv_len, bw)
    meta = {
        "artifact": str(artifact),
        "model": plain.spec.name,
        "template": str(plain.schedule.template),
        "kv_len": kv_len,
        "versions": versions(prof.device),
        "copy_bandwidth": bw,
    }
    return Profile(tls, analysis, plain_ms, prof_ms, prof.schedule, meta)
