"""What a farm worker does for each stage, as plain functions of plain values.

Every input and output file lives in the blob store, named by its sha256; a function gets
digests and returns digests (and small summaries), so its result is cheap to send, a retry on
another node redoes the same work from the same inputs, and nothing is lost with a worker.

    front(spec)                      graph.json, fused.json
    build(spec, template, arch, ...) schedule.json, kernel.cu, kernel.<arch>.cubin, manifest.json
    obligations(manifest, part)      one part's obligations, each as JSON, and their index
    prove(batch)                     one certificate per obligation
    bench(manifest)                  bench.json

`workers.tasks` wraps them as Ray tasks; they run as they are in tests and on one machine.
"""

from __future__ import annotations

import json
import socket
import tempfile
import time
from pathlib import Path
from typing import Any

from amk_farm.store import BlobStore, open_store


def node() -> str:
    """Where this runs: the host and, inside Ray, the node id (first 8 hex digits)."""
    host = socket.gethostname()
    try:
        import ray

        if ray.is_initialized():
            return f"{host}/{ray.get_runtime_context().get_node_id()[:8]}"
    except ImportError:  # pragma: no cover - ray is a dependency
        pass
    return host


def _store(url: str) -> BlobStore:
    return open_store(url)


def _put_json(store: BlobStore, data: Any) -> str:
    return store.put_bytes(json.dumps(data, sort_keys=True).encode())


def fetch_artifact(store: BlobStore, manifest_digest: str, directory: Path) -> Path:
    """Write the artifact whose manifest is the blob `manifest_digest` into `directory`."""
    from compiler.artifact import MANIFEST

    manifest = json.loads(store.get_bytes(manifest_digest))
    directory.mkdir(parents=True, exist_ok=True)
    for name, digest in manifest["files"].items():
        (directory / name).parent.mkdir(parents=True, exist_ok=True)
        store.get_file(digest, directory / name)
    (directory / MANIFEST).write_bytes(store.get_bytes(manifest_digest))
    return directory


def front(store_url: str, spec: dict[str, Any]) -> dict[str, Any]:
    """The frontend and fusion stages: graph.json and fused.json into the store."""
    from compiler.artifact import ArtifactWriter
    from compiler.pipeline import State, frontend, fuse
    from compiler.schedule.schedule import Options
    from compiler.spec import ModelSpec, ShapeTemplate

    store = _store(store_url)
    st = State(ModelSpec.from_json(spec), ShapeTemplate(1, 1), "sm_90a", Options())
    with tempfile.TemporaryDirectory(prefix="amk-front-") as tmp:
        out = ArtifactWriter(Path(tmp) / "front")
        try:
            for name, stage in (("frontend", frontend), ("fuse", fuse)):
                t0 = time.perf_counter()
                stage(st, out)
                st.timings[name] = time.perf_counter() - t0
            digests = {n: store.put_file(out.path(f"{n}.json")) for n in ("graph", "fused")}
        finally:
            out.abort()
    assert st.graph is not None
    return {
        "files": digests,
        "model_hash": st.graph.digest(),
        "timings": st.timings,
        "node": node(),
    }


def build(
    store_url: str,
    spec: dict[str, Any],
    template: str,
    arch: str,
    options: dict[str, Any] | None,
    files: dict[str, str],
    checkpoint_digest: str | None = None,
) -> dict[str, Any]:
    """Schedule, codegen and nvcc for one (template, arch), from the stored graph.json and
    fused.json (and schedule.json, when `files` holds one: a job started from that file).
    The whole artifact goes into the store; its manifest's digest names it."""
    from compiler.artifact import MANIFEST
    from compiler.ir.fused import FusedGraph
    from compiler.ir.graph import Graph
    from compiler.pipeline import compile_model
    from compiler.schedule.schedule import Options, Schedule
    from compiler.spec import ModelSpec, ShapeTemplate

    store = _store(store_url)
    loaders = {"graph": Graph.from_json, "fused": FusedGraph.from_json}
    loaders["schedule"] = Schedule.from_json
    start = {k: loaders[k](json.loads(store.get_bytes(d))) for k, d in files.items()}
    with tempfile.TemporaryDirectory(prefix="amk-build-") as tmp:
        out = Path(tmp) / "artifact"
        manifest, st = compile_model(
            ModelSpec.from_json(spec),
            ShapeTemplate.parse(template),
            arch,
            out,
            options=Options(**options) if options else None,
            checkpoint_digest=checkpoint_digest,
            start=start,
        )
        for name in manifest.files:
            store.put_file(out / name)
        digest = store.put_file(out / MANIFEST)
    return {"manifest": digest, "timings": st.timings, "notes": st.notes, "node": node()}


def obligations(
    store_url: str, manifest_digest: str, part: str, share: tuple[int, int] = (0, 1)
) -> dict[str, Any]:
    """Read the stored artifact as the verifier reads a directory and make one part of its
    obligations (`verifier.verify.obligations_of`), each stored as JSON (identical ones once).
    Returns the part's index: per obligation its key, class, check, layer, subject, digest and
    size; the checks it made (part "maps": the integrity checks); and the verifier that made
    them (`verifier.identity`)."""
    from verifier import identity
    from verifier.verify import Report, obligations_of

    store = _store(store_url)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="amk-obligations-") as tmp:
        directory = fetch_artifact(store, manifest_digest, Path(tmp) / "artifact")
        report = Report(str(directory))
        obs = obligations_of(directory, report, part, share)
    stored: dict[str, str] = {}
    index = []
    for ob in obs:
        if ob.key not in stored:
            stored[ob.key] = _put_json(store, ob.to_json())
        index.append(
            {
                "key": ob.key,
                "cls": ob.cls,
                "check": ob.check,
                "layer": ob.layer,
                "subject": ob.subject,
                "digest": stored[ob.key],
                "size": len(ob.assumptions) + len(ob.goal),
            }
        )
    return {
        "obligations": index,
        "checks": [{"check": n, "ok": ok, "why": why} for n, ok, why in report.checks],
        "skipped": [{"check": n, "why": why} for n, why in report.skipped],
        "verifier": identity(),
        "seconds": time.perf_counter() - t0,
        "node": node(),
    }


def prove(store_url: str, batch: list[tuple[str, str]]) -> list[dict[str, Any]]:
    """Prove each (key, obligation digest) of `batch`; each certificate (the obligation, its
    key and result) goes into the store. Returns, per obligation: key, result, certificate.
    The queries run in one solver process (`verifier.solve.prove_all`: rlimit and wall clock),
    which dies with this worker."""
    from verifier.obligation import Obligation
    from verifier.solve import prove_all

    store = _store(store_url)
    where = node()
    obs = []
    for key, digest in batch:
        ob = Obligation.from_json(json.loads(store.get_bytes(digest)))
        if ob.key != key:
            raise ValueError(f"obligation blob {digest[:12]} is not obligation {key[:12]}")
        obs.append(ob)
    results = {ob.key: result for ob, result in prove_all(obs)}
    out = []
    for ob in obs:
        result = results[ob.key]
        cert = {"obligation": ob.to_json(), "key": ob.key, "result": result.to_json()}
        out.append(
            {
                "key": ob.key,
                "result": result.to_json(),
                "certificate": _put_json(store, cert),
                "node": where,
            }
        )
    return out


def bench(store_url: str, manifest_digest: str, weights: str | None = None) -> dict[str, Any]:
    """`amk-farm bench` of the stored artifact on this node's GPU, with the checkpoint at
    `weights` (a path this node sees) or synthetic weights (seed 0); bench.json goes into the
    store."""
    from compiler.runtime.bench import run_bench

    store = _store(store_url)
    with tempfile.TemporaryDirectory(prefix="amk-bench-") as tmp:
        directory = fetch_artifact(store, manifest_digest, Path(tmp) / "artifact")
        result = run_bench(str(directory), weights=weights, seed=0, log=lambda _: None)
    return {"bench": _put_json(store, result), "node": node()}
