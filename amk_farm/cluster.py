"""The Ray cluster a farm job runs on: the one at RAY_ADDRESS, or an embedded local one.

The embedded default is sized to the machine: every core offers the `smt` resource (CPU work:
frontend, fusion, proofs), one `codegen` slot takes builds (nvcc on a small machine wants
its memory to itself), and its GPUs, if any, are Ray's to find (with their accelerator type,
so benchmarks run there). Workers get the store's settings through the job's runtime
environment; S3 credentials come from each node's own environment, never from the submitter.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from amk_farm import config

OBJECT_STORE_BYTES = 256 * 1024**2  # tasks pass digests; blobs go to the store, not to Ray
FORWARDED = ("AMK_STORE_URL", "AMK_S3_ENDPOINT_URL")
LOOPBACK = "127.0.0.2"  # the embedded cluster's address: Ray would turn 127.0.0.1 into the
# machine's network address, and an embedded cluster has no business there


def connect(address: str | None = None) -> dict[str, Any]:
    """Join the cluster at `address` (default RAY_ADDRESS) or start the embedded one; returns
    what the cluster offers (`ray.cluster_resources()`)."""
    import ray

    from workers.tasks import CODEGEN, SMT

    if not ray.is_initialized():
        cfg = config.load()
        address = address or cfg.ray_address
        env = {k: v for k, v in cfg.as_env().items() if k in FORWARDED and v}
        common: dict[str, Any] = {
            "runtime_env": {"env_vars": env},
            "log_to_driver": False,
            "logging_level": logging.WARNING,
            "configure_logging": False,
        }
        if address:
            ray.init(address=address, **common)
        else:
            cores = os.cpu_count() or 1
            ray.init(
                _node_ip_address=LOOPBACK,
                num_cpus=cores,
                resources={SMT: cores, CODEGEN: 1},
                include_dashboard=False,
                object_store_memory=OBJECT_STORE_BYTES,
                **common,
            )
    return dict(ray.cluster_resources())


def disconnect() -> None:
    import ray

    if ray.is_initialized():
        ray.shutdown()
