"""The compile pipeline, in one place: named stages, each mapping one on-disk form to the next.

    ModelSpec --frontend--> graph.json --fuse--> fused.json --schedule--> schedule.json
              --codegen--> kernel.cu --nvcc--> kernel.<arch>.cubin

Every stage's output is written to the artifact directory and can be loaded back: `compile`
can start from any of them (`start`), e.g. from a hand-edited schedule.json.
"""

from __future__ import annotations

import platform
import shutil
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import compiler
from compiler.artifact import ArtifactWriter, Manifest
from compiler.ir.fused import FusedGraph
from compiler.ir.graph import Graph, IRError
from compiler.limits import check_compile
from compiler.schedule.schedule import Options, Schedule
from compiler.spec import ModelSpec, ShapeTemplate

ARCHS = ("sm_80", "sm_90a")


@dataclass
class State:
    """What the stages have produced so far; each field is one stage's output."""

    spec: ModelSpec
    template: ShapeTemplate
    arch: str
    options: Options
    graph: Graph | None = None
    fused: FusedGraph | None = None
    schedule: Schedule | None = None
    kernel: str | None = None
    cubin: Path | None = None
    notes: list[str] = field(default_factory=list)
    timings: dict[str, float] = field(default_factory=dict)


def frontend(st: State, out: ArtifactWriter) -> None:
    from compiler.frontend.torch_export import graph_from_spec
    from compiler.ir.well_formed import well_formed

    if st.graph is None:
        st.graph = graph_from_spec(st.spec)
    well_formed(st.graph)
    out.write_text("graph.json", st.graph.dumps())


def fuse(st: State, out: ArtifactWriter) -> None:
    from compiler.passes import check_fused
    from compiler.passes import fuse as run_passes

    assert st.graph is not None
    if st.fused is None:
        st.fused = run_passes(st.graph, st.spec)
    check_fused(st.graph, st.fused)
    out.write_text("fused.json", st.fused.dumps())


def schedule(st: State, out: ArtifactWriter) -> None:
    from compiler.schedule import build_schedule

    assert st.fused is not None
    if st.schedule is None:
        st.schedule = build_schedule(st.fused, st.template, st.options)
    elif st.schedule.fused_digest != st.fused.digest():
        raise IRError("schedule.json was built from another fused graph")
    out.write_text("schedule.json", st.schedule.dumps())


def codegen(st: State, out: ArtifactWriter) -> None:
    from compiler.codegen.kernel import render_kernel

    assert st.fused is not None and st.schedule is not None
    if st.kernel is None:
        st.kernel = render_kernel(st.fused, st.schedule)
    out.write_text("kernel.cu", st.kernel)


def nvcc(st: State, out: ArtifactWriter) -> None:
    from compiler.codegen.nvcc import compile_cubin

    if shutil.which("nvcc") is None:
        st.notes.append("nvcc not found on PATH: kernel.cu written, no cubin")
        return
    st.cubin = out.path(f"kernel.{st.arch}.cubin")
    compile_cubin(out.path("kernel.cu"), st.arch, st.cubin)


STAGES: list[tuple[str, Callable[[State, ArtifactWriter], None]]] = [
    ("frontend", frontend),
    ("fuse", fuse),
    ("schedule", schedule),
    ("codegen", codegen),
    ("nvcc", nvcc),
]


def load_stage(path: Path) -> dict[str, Any]:
    """Load a stage file (graph.json, fused.json or schedule.json) as a `start` for compile_model.

    Earlier stages' files beside it in the same directory are loaded too, so a hand-edited
    schedule.json in an artifact directory recompiles with that artifact's graph and fused graph.
    """
    import json

    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise IRError(f"{path}: cannot read stage file: {e}") from None
    kinds = {"ir_version": "graph", "fused_version": "fused", "schedule_version": "schedule"}
    kind = next((k for key, k in kinds.items() if isinstance(data, dict) and key in data), None)
    if kind is None:
        raise IRError(f"{path}: not a graph.json, fused.json or schedule.json")
    start: dict[str, Any] = {}
    order = ["graph", "fused", "schedule"]
    loaders = {
        "graph": Graph.from_json,
        "fused": FusedGraph.from_json,
        "schedule": Schedule.from_json,
    }
    for earlier in order[: order.index(kind)]:
        sibling = path.parent / f"{earlier}.json"
        if not sibling.is_file():
            raise IRError(f"{path}: starting from {kind} needs {sibling.name} beside it")
        start[earlier] = _load(sibling, loaders[earlier])
    start[kind] = _load(path, loaders[kind], data)
    return start


def _load(path: Path, loader: Callable[[Any], Any], data: Any = None) -> Any:
    """`loader(data)` (data: the file's JSON), its errors naming the file."""
    import json

    try:
        return loader(json.loads(path.read_text()) if data is None else data)
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:  # IRError too
        first = (str(e).splitlines() or [type(e).__name__])[0]
        raise IRError(f"{path}: {first.removeprefix(f'{path}: ')}") from None


def toolchain() -> dict[str, str]:
    import torch

    tools = {"python": platform.python_version(), "torch": torch.__version__}
    if shutil.which("nvcc"):
        out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
        tools["nvcc"] = out.strip().splitlines()[-1] if out.strip() else "unknown"
    return tools


def compile_model(
    spec: ModelSpec,
    template: ShapeTemplate,
    arch: str,
    out_dir: Path,
    options: Options | None = None,
    checkpoint_digest: str | None = None,
    start: dict[str, Any] | None = None,
    progress: Callable[[str], None] = lambda _: None,
    force: bool = False,
) -> tuple[Manifest, State]:
    """Run every stage into `out_dir` (written atomically) and return its manifest.

    `start` may hold a loaded `graph`, `fused` or `schedule` to begin from instead of recomputing.
    Before any stage runs, the inputs are checked against compiler/limits.py and `out_dir`
    must be absent or empty; with `force` a non-empty one gets only the artifact's own files
    replaced (compiler/artifact.py `install`).
    """
    if arch not in ARCHS:
        raise IRError(f"unsupported arch {arch!r} (supported: {', '.join(ARCHS)})")
    given = (start or {}).get("schedule")
    if given is not None:  # a schedule carries the options it was built with
        if options is not None and options != given.options:
            raise IRError("schedule.json was built with other options than the ones given")
        options = given.options
    st = State(
        spec,
        template,
        arch,
        options or Options.for_target(arch, template.batch, spec),
        **(start or {}),
    )
    check_compile(spec, template, st.options)
    writer = ArtifactWriter(out_dir, force)
    try:
        for name, stage in STAGES:
            progress(name)
            t0 = time.perf_counter()
            stage(st, writer)
            st.timings[name] = time.perf_counter() - t0
        assert st.graph is not None
        manifest = Manifest(
            model=spec.name,
            spec=spec.to_json(),
            model_hash=st.graph.digest(),
            template=str(template),
            arch=arch,
            compiler_version=compiler.__version__,
            options=st.options.to_json(),
            options_hash=st.options.hash(),
            toolchain=toolchain(),
            files=writer.digests(),
            checkpoint_digest=checkpoint_digest,
        )
        writer.commit(manifest)
    except BaseException:
        writer.abort()
        raise
    return manifest, st
