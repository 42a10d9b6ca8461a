"""The farm's stages as Ray tasks, and where each may run.

Routing uses logical resources (they gate admission, nothing else):

    smt                          CPU work: frontend, fusion, obligation building, proofs
    codegen                      schedule, codegen, nvcc; on a cluster without it, a GPU
    accelerator_type:<A100|...>  benchmarks (Ray puts it on nodes with that GPU)

A node offers `smt` only if it should take CPU work, so a GPU node started without it never has
its CPU slots filled by proofs. Every task returns digests and small summaries only
(`workers.stages`); its files are in the blob store, so a task lost with its worker is simply
run again (Ray retries it) with the same result.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import ray

from workers import stages

SMT = "smt"
CODEGEN = "codegen"
ACCELERATORS = {"sm_80": ("A100",), "sm_90a": ("H100", "H200")}  # cards an arch is benched on
RETRIES = 3  # per task, on worker or node loss (not on errors the task raises)

front = ray.remote(stages.front)
build = ray.remote(stages.build)
obligations = ray.remote(stages.obligations)
prove = ray.remote(stages.prove)
bench = ray.remote(stages.bench)


class RoutingError(ValueError):
    """The cluster has no node that may run a stage: the message says what to start."""


def cpu() -> dict[str, Any]:
    """Options of a CPU task: one core and one `smt` slot."""
    return {"num_cpus": 1, "resources": {SMT: 1}, "max_retries": RETRIES}


def codegen(cluster: Mapping[str, float]) -> dict[str, Any]:
    """Options of a build task on `cluster` (`ray.cluster_resources()`)."""
    if cluster.get(CODEGEN, 0) > 0:
        return {"num_cpus": 1, "resources": {CODEGEN: 1}, "max_retries": RETRIES}
    if cluster.get("GPU", 0) > 0:
        return {"num_cpus": 1, "num_gpus": 1, "max_retries": RETRIES}
    raise RoutingError(
        f"no node of the Ray cluster offers a GPU or the '{CODEGEN}' resource for schedule, "
        f"codegen and nvcc; start one with `ray start --resources='{{\"{CODEGEN}\": 1}}'`"
    )


def check_cpu(cluster: Mapping[str, float]) -> None:
    if cluster.get(SMT, 0) <= 0:
        raise RoutingError(
            f"no node of the Ray cluster offers the '{SMT}' resource for frontend, fusion and "
            f"proofs; start CPU nodes with `ray start --resources='{{\"{SMT}\": N}}'` (N: cores)"
        )


def accelerator(arch: str, cluster: Mapping[str, float]) -> str | None:
    """The accelerator type a benchmark of `arch` runs on in `cluster`, or None: no such node."""
    for card in ACCELERATORS.get(arch, ()):
        if cluster.get(f"accelerator_type:{card}", 0) > 0:
            return card
    return None


def bench_options(card: str) -> dict[str, Any]:
    return {"num_gpus": 1, "accelerator_type": card, "max_retries": RETRIES}
