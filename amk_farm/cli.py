"""The `amk-farm` command line (Typer). Data goes to stdout, progress and errors to stderr.

Every command has `--json`; a failure prints one line `error: ...` on stderr and exits 1 with
nothing half-written.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console

from amk_farm import catalog, config

app = typer.Typer(
    name="amk-farm",
    help="Compile LLaMA-family decode steps into verified CUDA megakernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]


def _user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 1."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from compiler.artifact import ArtifactError
        from compiler.frontend.checkpoint import CheckpointError
        from compiler.ir.graph import IRError
        from compiler.spec import SpecError

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # stdout closed early (`| head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except (
            SpecError,
            IRError,
            CheckpointError,
            ArtifactError,
            ValueError,
            OSError,
        ) as e:  # all user-facing
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run  # type: ignore[return-value]


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def _progress(text: str) -> None:
    """A transient status line on stderr, only when stderr is a terminal."""
    if err.is_terminal:
        err.print(f"[dim]{text}[/dim]".ljust(70) if text else " " * 70, end="\r")


def _write_atomic(path: Path, text: str) -> None:
    """Write via a temporary file in the same directory, so readers never see a partial file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@app.command()
@_user_errors
def models(as_json: JsonOpt = False) -> None:
    """List the model catalog: sizes, shapes and model hashes."""
    from amk_farm.model_hash import model_hash

    cache = config.load().home / "cache"
    rows: list[dict[str, Any]] = []
    for i, name in enumerate(catalog.names()):
        _progress(f"tracing {name} ({i + 1}/{len(catalog.names())})")
        s = catalog.resolve(name)
        rows.append(
            {
                "name": name,
                "aliases": sorted(a for a, t in catalog.aliases().items() if t == name),
                "arch": s.arch,
                "params": s.num_params,
                "layers": s.num_layers,
                "hidden": s.hidden_size,
                "heads": s.num_heads,
                "kv_heads": s.num_kv_heads,
                "vocab": s.vocab_size,
                "sliding_window": s.sliding_window,
                "bf16_weight_bytes": s.weight_bytes_bf16,
                "model_hash": model_hash(s, cache),
            }
        )
    _progress("")
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    head = [
        "name",
        "params",
        "layers",
        "hidden",
        "heads",
        "kv heads",
        "vocab",
        "bf16 bytes",
        "model hash",
    ]
    lines = [head] + [
        [
            r["name"] + (f" ({', '.join(r['aliases'])})" if r["aliases"] else ""),
            _count(r["params"]),
            str(r["layers"]),
            str(r["hidden"]),
            str(r["heads"]),
            str(r["kv_heads"]),
            str(r["vocab"]),
            str(r["bf16_weight_bytes"]),
            r["model_hash"][:16],
        ]
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        print(
            "  ".join(
                c.ljust(w) if i == 0 else c.rjust(w)
                for i, (c, w) in enumerate(zip(line, widths, strict=True))
            )
        )


def _onnx_graph(spec: Any, path: Path) -> Any:
    """The graph of an ONNX decode step whose weights must be `spec`'s (HF names and shapes).

    Updated caches may be named `new.k_cache.{l}` (ONNX values are single-assignment).
    """
    import onnx

    from compiler.frontend.checkpoint import expected_tensors
    from compiler.frontend.onnx_import import graph_from_onnx
    from compiler.ir.graph import IRError
    from compiler.ir.ops import Op

    if not path.is_file():
        raise IRError(f"{path}: no such ONNX file")
    try:
        model = onnx.load(str(path))
    except Exception as e:  # protobuf raises its own DecodeError
        raise IRError(f"{path}: not a readable ONNX model ({type(e).__name__})") from None
    caches = [f"{kv}_cache.{i}" for i in range(spec.num_layers) for kv in "kv"]
    g, _ = graph_from_onnx(model, rename={f"new.{n}": n for n in caches})
    expected = expected_tensors(spec)
    for n in g.nodes:
        if n.op is Op.WEIGHT and tuple(expected.get(n.name, ())) != tuple(n.shape):
            want = expected.get(n.name)
            raise IRError(
                f"{path}: weight {n.name} {list(n.shape)} is not a weight of {spec.name}"
                + (f" (expected {list(want)})" if want else "")
            )
    return g


@app.command()
@_user_errors
def graph(
    model: Annotated[
        str, typer.Argument(help="Catalog name, alias, or path to an HF config.json.")
    ],
    onnx: Annotated[
        Path | None,
        typer.Option("--onnx", help="Build the graph from this ONNX file instead of torch.export."),
    ] = None,
    output: Annotated[
        Path | None, typer.Option("-o", "--output", help="Write the graph JSON here.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Build MODEL's decode-step IR graph and print its model hash."""
    from compiler.ir import well_formed
    from compiler.ir.ops import Op

    spec = catalog.resolve(model)
    if onnx is not None:
        g = _onnx_graph(spec, onnx)
        frontend = "onnx"
    else:
        from compiler.frontend.torch_export import graph_from_spec

        _progress(f"tracing {spec.name} with torch.export on the meta device")
        g = graph_from_spec(spec)
        frontend = "torch.export"
    _progress("")
    well_formed(g)
    digest = g.digest()
    if output is not None:
        _write_atomic(output, g.dumps())
    ops = Counter(n.op.value for n in g.nodes)
    summary = {
        "model": spec.name,
        "frontend": frontend,
        "model_hash": digest,
        "nodes": len(g.nodes),
        "inputs": [n.name for n in g.nodes if n.op is Op.INPUT],
        "outputs": [name for name, _ in g.outputs],
        "weights": sum(1 for n in g.nodes if n.op is Op.WEIGHT),
        "ops": dict(sorted(ops.items())),
        "output_file": str(output) if output is not None else None,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"{spec.name}: {len(g.nodes)} nodes, {summary['weights']} weights ({frontend})")
    print(f"model hash  {digest}")
    if output is not None:
        print(f"written     {output}")


def _options(pairs: list[str], sm_count: int | None) -> Any:
    import dataclasses

    from compiler.schedule.schedule import Options

    fields = {f.name: f.type for f in dataclasses.fields(Options)}
    values: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in fields:
            raise ValueError(
                f"bad --option {pair!r} (expected KEY=VALUE, KEY one of {', '.join(fields)})"
            )
        values[key] = value if key == "policy" else _int(value, key)
    if sm_count is not None:
        values["sm_count"] = sm_count
    return Options(**values)


def _int(text: str, key: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--option {key} needs an integer, got {text!r}") from None


@app.command("compile")
@_user_errors
def compile_(
    model: Annotated[
        str, typer.Argument(help="Catalog name, alias, or path to an HF config.json.")
    ],
    template: Annotated[
        str, typer.Option("-t", "--template", help="Shape template b<batch>-s<max_seq>.")
    ] = "b1-s4096",
    arch: Annotated[
        str, typer.Option("--arch", help="CUDA target: sm_80 (A100) or sm_90a (H100/H200).")
    ] = "sm_90a",
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="HF safetensors checkpoint directory to check and record."),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Artifact directory (default MODEL-TEMPLATE-ARCH)."),
    ] = None,
    start: Annotated[
        Path | None,
        typer.Option("--from", help="Start from this graph.json, fused.json or schedule.json."),
    ] = None,
    sm_count: Annotated[
        int | None, typer.Option("--sm-count", help="SMs to schedule for (132 H100, 108 A100).")
    ] = None,
    option: Annotated[
        list[str] | None, typer.Option("--option", help="Schedule option KEY=VALUE; repeatable.")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Compile MODEL into one artifact directory: graph, fused graph, schedule, kernel.cu, cubin."""
    from compiler.pipeline import compile_model, load_stage
    from compiler.spec import ShapeTemplate

    spec = catalog.resolve(model)
    shape = ShapeTemplate.parse(template)
    opts = _options(option or [], sm_count)
    ckpt = None
    if weights is not None:
        from compiler.frontend.checkpoint import Checkpoint, checkpoint_digest

        Checkpoint.open(weights, spec)  # refuses a checkpoint that does not fit the model
        ckpt = checkpoint_digest(weights)
    begin = load_stage(start) if start is not None else None
    out = output or Path(f"{spec.name.replace('/', '_')}-{shape}-{arch}")
    manifest, st = compile_model(
        spec,
        shape,
        arch,
        out,
        opts,
        checkpoint_digest=ckpt,
        start=begin,
        progress=lambda stage: _progress(f"{spec.name} {shape} {arch}: {stage}"),
    )
    _progress("")
    for note in st.notes:
        print(f"note: {note}", file=sys.stderr)
    summary = {
        "artifact": str(out),
        "model": spec.name,
        "model_hash": manifest.model_hash,
        "template": manifest.template,
        "arch": arch,
        "options_hash": manifest.options_hash,
        "files": manifest.files,
        "tasks": len(st.schedule.tasks) if st.schedule else None,
        "cubin": st.cubin is not None,
        "seconds": {k: round(v, 2) for k, v in st.timings.items()},
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{out}: {spec.name} {shape} {arch}, {summary['tasks']} tasks, cubin: {'yes' if st.cubin else 'no'}"
    )
    print(f"model hash  {manifest.model_hash}")
    print("stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in st.timings.items()))


def main() -> None:
    app()


if __name__ == "__main__":
    main()
