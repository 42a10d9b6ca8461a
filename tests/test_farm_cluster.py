"""The farm on a multi-node Ray cluster: a head and two worker nodes started as separate
processes on 127.0.0.1 (`infra/local-cluster.sh`), one offering the `codegen` resource, one
CPU-only with `smt` slots. `amk-farm submit` joins it through RAY_ADDRESS; each stage must have
run on the node its resources name, and nothing on the head."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.test_farm import _assert_complete, _home, amk, ok

pytestmark = pytest.mark.slow
SCRIPT = Path(__file__).resolve().parents[1] / "infra" / "local-cluster.sh"
PORT = "6391"


def _script(*args: str) -> str:
    env = os.environ | {"PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    p = subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, capture_output=True, text=True, timeout=180
    )
    assert p.returncode == 0, p.stderr[-3000:]
    return p.stdout.strip()


@pytest.fixture
def cluster() -> Iterator[str]:
    _script("stop")  # nothing of an earlier run left over
    address = _script("start", PORT, "2")
    try:
        yield address
    finally:
        _script("stop")


def _nodes(address: str) -> dict[str, dict[str, float]]:
    """Node id -> resources, as the cluster reports them."""
    code = (
        "import json, sys, ray; ray.init(address=sys.argv[1], logging_level='ERROR'); "
        "print(json.dumps({n['NodeID']: n['Resources'] for n in ray.nodes() if n['Alive']}))"
    )
    p = subprocess.run(
        [sys.executable, "-c", code, address], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr[-2000:]
    return dict(json.loads(p.stdout.strip().splitlines()[-1]))


def test_each_stage_runs_on_the_node_its_resources_name(cluster: str, tmp_path: Path):
    nodes = _nodes(cluster)
    assert len(nodes) == 3
    codegen = next(n for n, r in nodes.items() if r.get("codegen"))
    cpu = next(n for n, r in nodes.items() if r.get("smt"))
    head = next(n for n in nodes if n not in (codegen, cpu))

    env = _home(tmp_path, RAY_ADDRESS=cluster)
    p = ok(amk(env, "submit", "tiny-llama", "-t", "b2-s64", "--wait", "--json"))
    (snap,) = json.loads(p.stdout)["jobs"]
    _assert_complete(snap)
    ran = {s["stage"]: s["node"] for s in snap["stages"] if s["status"] == "done"}

    def on(node_id: str) -> set[str]:
        return {stage for stage, where in ran.items() if where and node_id[:8] in where}

    assert on(codegen) == {"schedule", "codegen", "nvcc"}
    assert on(cpu) == {"frontend", "fuse", "obligations", "prove"}
    assert on(head) == set()
