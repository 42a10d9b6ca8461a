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
        from compiler.frontend.checkpoint import CheckpointError
        from compiler.ir.graph import IRError
        from compiler.spec import SpecError

        try:
            return fn(*args, **kwargs)
        except BrokenPipeError:  # stdout closed early (`| head`): not an error
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(0) from None
        except (SpecError, IRError, CheckpointError, OSError) as e:
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
        from compiler.frontend.onnx_import import graph_from_spec_onnx

        g = graph_from_spec_onnx(spec, onnx)
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


def main() -> None:
    app()


if __name__ == "__main__":
    main()
