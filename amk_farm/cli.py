"""The `amk-farm` command line (Typer). Data goes to stdout, progress and errors to stderr.

Every command has `--json`; a failure prints one line `error: ...` on stderr and exits 1 with
nothing half-written.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from functools import wraps
from pathlib import Path
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from typer.core import TyperGroup

from amk_farm import catalog, config

try:  # typer >= 0.22 carries its own copy of click
    from typer._click.exceptions import ClickException
except ImportError:  # pragma: no cover - older typer, on click itself
    from click.exceptions import ClickException  # type: ignore[assignment]


class _OneLineUsageErrors(TyperGroup):
    """Usage errors (a bad option value, an unknown command, `status abc`) are one line on
    stderr like every other error, exit code 2, instead of click's usage box."""

    def main(
        self,
        args: Sequence[str] | None = None,
        prog_name: str | None = None,
        complete_var: str | None = None,
        standalone_mode: bool = True,
        windows_expand_args: bool = True,
        **extra: Any,
    ) -> Any:
        def run(standalone: bool) -> Any:
            return super(_OneLineUsageErrors, self).main(
                args, prog_name, complete_var, standalone, windows_expand_args, **extra
            )

        if not standalone_mode:
            return run(False)
        try:
            rv = run(False)
        except ClickException as e:
            if type(e).__name__ == "NoArgsIsHelpError":  # the help is printed already
                sys.exit(e.exit_code)
            ctx = getattr(e, "ctx", None)
            where = f"{ctx.command_path}: " if ctx is not None else ""
            hint = f" (see {ctx.command_path} --help)" if ctx is not None else ""
            msg = " ".join(e.format_message().split())
            print(f"error: {where}{msg}{hint}", file=sys.stderr)
            sys.exit(e.exit_code)
        except typer.Abort:
            print("error: aborted", file=sys.stderr)
            sys.exit(1)
        sys.exit(rv if isinstance(rv, int) else 0)


app = typer.Typer(
    name="amk-farm",
    help="Compile LLaMA-family decode steps into verified CUDA megakernels.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    cls=_OneLineUsageErrors,
)
err = Console(stderr=True)
F = TypeVar("F", bound=Callable[..., Any])

JsonOpt = Annotated[bool, typer.Option("--json", help="Print machine-readable JSON on stdout.")]
ForceOpt = Annotated[
    bool,
    typer.Option(
        "--force", help="Write into an existing output: replace only this command's own files."
    ),
]


def _user_errors(fn: F) -> F:
    """Turn the errors a user can cause into one line on stderr and exit code 1."""

    @wraps(fn)
    def run(*args: Any, **kwargs: Any) -> Any:
        from sqlalchemy.exc import SQLAlchemyError

        from amk_farm.registry import RegistryError
        from amk_farm.signing import SignatureError
        from amk_farm.store import StoreError
        from compiler.artifact import ArtifactError
        from compiler.codegen.nvcc import NvccError
        from compiler.frontend.checkpoint import CheckpointError
        from compiler.ir.graph import IRError
        from compiler.runtime.errors import LaunchError, RuntimeUnavailable
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
            RuntimeUnavailable,
            LaunchError,
            NvccError,
            SignatureError,
            StoreError,
            RegistryError,
            SQLAlchemyError,
            ValueError,
            OSError,
        ) as e:  # all user-facing
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"error: {msg}", file=sys.stderr)
            raise typer.Exit(1) from None

    return run  # type: ignore[return-value]


@contextlib.contextmanager
def _stopped_by_signals(what: str, after: str = "") -> Iterator[None]:
    """SIGINT and SIGTERM become one `error:` line and exit code 128 + the signal, raised as an
    exception where the main thread is, so `finally` blocks and `with` exits (which kill
    solver processes and remove temporary files) run first. A second signal is ignored while
    they do."""
    caught = (signal.SIGINT, signal.SIGTERM)

    class Stop(BaseException):
        pass

    def stop(signum: int, frame: object) -> None:
        for s in caught:
            signal.signal(s, signal.SIG_IGN)
        raise Stop(signum)

    before = {s: signal.signal(s, stop) for s in caught}
    try:
        yield
    except Stop as e:
        name = signal.Signals(e.args[0]).name
        print(f"error: {what}: stopped by {name}{after}", file=sys.stderr)
        raise typer.Exit(128 + e.args[0]) from None
    finally:
        for s, handler in before.items():
            signal.signal(s, handler)


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
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Build MODEL's decode-step IR graph and print its model hash."""
    from compiler.ir import well_formed
    from compiler.ir.ops import Op

    spec = catalog.resolve(model)
    if output is not None:
        _check_output_file(output, force)
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


def _check_output_file(path: Path, force: bool) -> None:
    """Refuse to overwrite an existing file (or to write over a directory) unless `force`."""
    if path.is_dir():
        raise IsADirectoryError(f"{path} is a directory; -o takes a file name")
    if (path.exists() or path.is_symlink()) and not force:
        raise FileExistsError(f"{path} exists; use --force to replace it")


def _options(
    pairs: list[str], sm_count: int | None, arch: str, batch: int, model: Any = None
) -> Any:
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
        values[key] = value if fields[key] in (str, "str") else _int(value, key)
    if sm_count is not None:
        values["sm_count"] = sm_count
    return Options.for_target(arch, batch, model, **values)


def _int(text: str, key: str) -> int:
    from compiler.limits import LIMITS, MAX_DIGITS, show, show_digits

    if len(text.strip().lstrip("+-")) > MAX_DIGITS:
        raise ValueError(f"option {key} {show_digits(text)} exceeds the limit {LIMITS.get(key)}")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"--option {key} needs an integer, got {show(text)}") from None


@app.command("compile")
@_user_errors
def compile_(
    model: Annotated[
        str, typer.Argument(help="Catalog name, alias, or path to an HF config.json.")
    ],
    template: Annotated[
        str | None,
        typer.Option(
            "-t",
            "--template",
            help="Shape template b<batch>-s<max_seq> (default b1-s4096, or fewer positions if "
            "the model has fewer).",
        ),
    ] = None,
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
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Compile MODEL into one artifact directory: graph, fused graph, schedule, kernel.cu, cubin.

    An existing non-empty output directory is refused; with --force only the artifact's own
    files in it are replaced (proof/, notes and other files are kept)."""
    from compiler.artifact import check_output
    from compiler.limits import check_compile
    from compiler.pipeline import compile_model, load_stage
    from compiler.spec import ShapeTemplate

    spec = catalog.resolve(model)
    shape = ShapeTemplate.parse(template) if template is not None else ShapeTemplate.default(spec)
    begin = load_stage(start) if start is not None else None
    opts = _options(option or [], sm_count, arch, shape.batch, spec)
    if begin is not None and "schedule" in begin:  # its options are the ones it was built with
        if option or sm_count is not None:
            raise ValueError("--option and --sm-count cannot change a schedule.json's options")
        opts = begin["schedule"].options
    check_compile(spec, shape, opts)  # before any work: the checkpoint digest reads every byte
    out = output or Path(f"{spec.name.replace('/', '_')}-{shape}-{arch}")
    check_output(out, force)
    ckpt = None
    if weights is not None:
        from compiler.frontend.checkpoint import Checkpoint, checkpoint_digest

        Checkpoint.open(weights, spec)  # refuses a checkpoint that does not fit the model
        ckpt = checkpoint_digest(weights)
    manifest, st = compile_model(
        spec,
        shape,
        arch,
        out,
        opts,
        checkpoint_digest=ckpt,
        start=begin,
        progress=lambda stage: _progress(f"{spec.name} {shape} {arch}: {stage}"),
        force=force,
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
        if st.fused is not None and st.schedule is not None:
            from compiler.schedule.report import report

            rep = report(st.fused, st.schedule)  # at KV 128; `amk-farm profile` measures it
            summary["schedule_report"] = {k: v for k, v in rep.items() if k != "longest_chain"}
        print(json.dumps(summary, indent=2))
        return
    print(
        f"{out}: {spec.name} {shape} {arch}, {summary['tasks']} tasks, cubin: {'yes' if st.cubin else 'no'}"
    )
    print(f"model hash  {manifest.model_hash}")
    print("stages      " + ", ".join(f"{k} {v:.1f}s" for k, v in st.timings.items()))


def _prompt_ids(text: str) -> list[int]:
    try:
        ids = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers, got {text!r}") from None
    if not ids:
        raise ValueError("--prompt-ids is empty")
    return ids


def _weights_source(weights: Path | None, synthetic: bool) -> None:
    if (weights is None) == (not synthetic):
        raise ValueError("give exactly one of --weights DIR or --synthetic")


@app.command()
@_user_errors
def generate(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (amk-farm compile).")],
    prompt_ids: Annotated[
        str, typer.Option("--prompt-ids", help="Prompt token ids, comma-separated: 1,2,3.")
    ],
    weights: Annotated[
        Path | None, typer.Option("--weights", help="HF safetensors checkpoint directory.")
    ] = None,
    synthetic: Annotated[
        bool, typer.Option("--synthetic", help="Use seeded synthetic weights.")
    ] = False,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic weights.")] = 0,
    tokens: Annotated[
        int, typer.Option("--tokens", help="New tokens per sequence (the first from the prefill).")
    ] = 32,
    batch: Annotated[
        int | None,
        typer.Option("--batch", help="Sequences (the artifact's batch; the prompt is repeated)."),
    ] = None,
    per_launch: Annotated[
        int, typer.Option("--per-launch", help="Decode steps per kernel launch.")
    ] = 1,
    as_json: JsonOpt = False,
) -> None:
    """Greedy-decode TOKENS tokens with the artifact's megakernel on a GPU.

    The prompt runs through the PyTorch reference (bf16, same weights), whose caches and first
    token are handed to the kernel; the remaining TOKENS-1 tokens are kernel decode steps.
    """
    from compiler.artifact import read_manifest
    from compiler.runtime.session import Session
    from compiler.spec import ShapeTemplate

    _weights_source(weights, synthetic)
    ids = _prompt_ids(prompt_ids)
    if tokens < 1 or per_launch < 1:
        raise ValueError("--tokens and --per-launch must be positive")
    b = ShapeTemplate.parse(read_manifest(artifact).template).batch
    if batch is not None and batch != b:
        raise ValueError(f"the artifact is compiled for batch {b}, not {batch}")
    _progress(f"loading {artifact}")
    s = Session(artifact, weights=weights, synthetic_seed=None if weights else seed)
    _progress("prefill")
    first = s.prefill([ids] * b)
    out = [[t] for t in first.tolist()]
    seconds = None
    if tokens > 1:
        _progress(f"decoding {tokens - 1} steps")
        toks = s.decode(tokens - 1, tokens_per_launch=per_launch)
        seconds = s.last_decode_seconds
        for row, seq in zip(toks.T.tolist(), out, strict=True):
            seq += row
    _progress("")
    rate = b * (tokens - 1) / seconds if seconds else None
    summary = {
        "artifact": str(artifact),
        "model": s.spec.name,
        "device": _device_name(s.device),
        "batch": b,
        "prompt_ids": ids,
        "tokens": out,
        "kernel_steps": tokens - 1,
        "per_launch": per_launch,
        "seconds": seconds,
        "tokens_per_s": rate,
    }
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    for seq in out:
        print(" ".join(str(t) for t in seq))
    if rate is not None and seconds is not None:
        print(
            f"{tokens - 1} kernel steps x {b} sequences in {seconds * 1e3:.1f} ms: "
            f"{rate:.1f} tokens/s ({per_launch} per launch, {summary['device']})"
        )


def _device_name(device: Any) -> str:
    import torch

    return torch.cuda.get_device_name(device) if device.type == "cuda" else str(device)


@app.command()
@_user_errors
def bench(
    target: Annotated[
        str, typer.Argument(help="Artifact directory, or a model to compile first (b1-s4096).")
    ],
    weights: Annotated[
        Path | None,
        typer.Option("--weights", help="HF checkpoint directory (default: synthetic weights)."),
    ] = None,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the synthetic weights.")] = 0,
    kv: Annotated[str, typer.Option("--kv", help="KV lengths to time, comma-separated.")] = (
        "128,2048"
    ),
    steps: Annotated[int, typer.Option("--steps", help="Timed steps (median; >= 100).")] = 100,
    per_launch: Annotated[
        int, typer.Option("--per-launch", help="Steps per launch of the multi-token timing.")
    ] = 32,
    batch16: Annotated[
        str | None,
        typer.Option(
            "--batch16",
            help="Also time batch 16: an artifact directory, or a template to compile (b16-s1024).",
        ),
    ] = None,
    no_compile: Annotated[
        bool, typer.Option("--no-compile", help="Skip the torch.compile baseline.")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Decode latency of the megakernel, side by side with PyTorch eager and torch.compile."""
    from compiler.runtime.bench import report, run_bench

    try:
        kv_lens = tuple(int(x) for x in kv.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--kv must be comma-separated integers, got {kv!r}") from None
    with tempfile.TemporaryDirectory(prefix="amk-bench-") as tmp:
        artifact = _artifact_or_compile(target, "b1-s4096", Path(tmp) / "b1")
        b16 = None
        if batch16 is not None:
            b16 = str(_artifact_or_compile(batch16, None, Path(tmp) / "b16", model=target))
        result = run_bench(
            str(artifact),
            weights=str(weights) if weights else None,
            seed=seed,
            kv_lens=kv_lens,
            reps=steps,
            multi=per_launch,
            batch16=b16,
            compiled=not no_compile,
            log=lambda m: print(m, file=sys.stderr),
        )
    if as_json:
        print(json.dumps(result, indent=2))
        return
    print(report(result))


@app.command()
@_user_errors
def verify(
    artifact: Annotated[Path, typer.Argument(help="Artifact directory (from amk-farm compile).")],
    jobs: Annotated[
        int | None,
        typer.Option(
            "--jobs", "-j", help="Solver processes, 1 to 4 per core (default: 1 per core)."
        ),
    ] = None,
    no_cache: Annotated[
        bool, typer.Option("--no-cache", help="Prove everything again (AMK_HOME/proofs unused).")
    ] = False,
    query_seconds: Annotated[
        float | None,
        typer.Option(
            "--query-seconds",
            help="Wall-clock budget of each query (default: 30 s plus its rlimit at 250k/s).",
        ),
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """Prove ARTIFACT equivalent to its model graph: exit 0 only if every obligation is proved.

    Certificates go into ARTIFACT/proof/; proved obligations are cached in AMK_HOME/proofs by
    structural key, so identical layers and unchanged artifacts are proved once. Each query
    runs under its rlimit and a wall clock (unknown is failure); SIGINT or SIGTERM stops the
    solvers and exits with one line, leaving proof/ as it was."""
    from compiler.artifact import ArtifactError
    from verifier.verify import verify as run_verify

    cores = os.cpu_count() or 1
    jobs = cores if jobs is None else jobs
    if jobs < 1 or jobs > 4 * cores:
        bound = ">= 1" if jobs < 1 else f"<= {4 * cores} (4 per core)"
        raise ValueError(f"--jobs must be {bound}, not {jobs}")
    if query_seconds is not None and not 0 < query_seconds <= 86400:
        raise ValueError(f"--query-seconds must be > 0 and <= 86400, not {query_seconds}")
    if not (artifact / "manifest.json").is_file():
        raise ArtifactError(f"{artifact} is not an artifact directory (no manifest.json)")
    cache = None if no_cache else _proof_cache()

    def progress(done: int, total: int) -> None:
        _progress(f"verify {artifact}: {done}/{total} distinct obligations proved or failed")

    with _stopped_by_signals(f"verify {artifact}", "; proof/ left as it was"):
        report = run_verify(
            artifact, jobs=jobs, cache=cache, progress=progress, seconds=query_seconds
        )
    _progress("")
    unreadable = [why for name, ok, why in report.checks if name.startswith("artifact") and not ok]
    if unreadable:  # nothing could be judged: a user error, not a verdict
        raise ArtifactError(f"{artifact}: {unreadable[0]}")
    summary = report.summary()
    if as_json:
        print(json.dumps(summary, indent=2))
    else:
        state = "verified" if report.ok else "NOT verified"
        print(
            f"{artifact}: {state}: {summary['proved']}/{summary['obligations']} obligations "
            f"proved ({summary['cached']} from the cache) in {summary['seconds']:.1f}s"
        )
        for where, counts in _folded(summary["by_class_and_layer"]):
            print(f"  {where:<24} {counts}")
        for line in report.failures():
            print(f"FAILED {line}")
        for skipped in summary["skipped"]:
            print(f"not run here: {skipped['check']}: {skipped['why']}")
    if not report.ok:
        raise typer.Exit(1)


def _folded(per: dict[str, dict[str, int]]) -> list[tuple[str, str]]:
    """Per class and layer counts as lines, runs of layers with equal counts folded into one:
    ("c layers 1-79 (each)", "proved 1, cached 3")."""
    import re

    rows = []
    for where, n in per.items():
        m = re.fullmatch(r"(\w+) layer (\d+)", where)
        cls, layer = (m.group(1), int(m.group(2))) if m else (where, -1)
        rows.append((cls.split()[0], layer, cls, ", ".join(f"{k} {v}" for k, v in n.items() if v)))
    out: list[tuple[str, int, int, str]] = []  # class, first layer, last layer, counts
    for _, layer, cls, counts in sorted(rows):
        if layer < 0:
            out.append((cls, -1, -1, counts))
            continue
        last = out[-1] if out else None
        if last and last[0] == cls and last[2] == layer - 1 and last[3] == counts:
            out[-1] = (cls, last[1], layer, counts)
        else:
            out.append((cls, layer, layer, counts))
    return [
        (
            cls if a < 0 else f"{cls} layer {a}" if a == b else f"{cls} layers {a}-{b} (each)",
            counts,
        )
        for cls, a, b, counts in out
    ]


keys_app = typer.Typer(
    help="The Ed25519 key that signs published kernels (AMK_SIGNING_KEY).",
    no_args_is_help=True,
)
app.add_typer(keys_app, name="keys")


@keys_app.command("init")
@_user_errors
def keys_init(
    force: Annotated[
        bool, typer.Option("--force", help="Replace an existing key (its signatures go stale).")
    ] = False,
    as_json: JsonOpt = False,
) -> None:
    """Generate the signing key pair: the private key (mode 0600) and its public key (.pub)."""
    from amk_farm import signing

    private_path, public_path = signing.init_keys(force=force)
    kid = signing.key_id(signing.load_public_key(public_path))
    summary = {"key_id": kid, "private_key": str(private_path), "public_key": str(public_path)}
    if as_json:
        print(json.dumps(summary, indent=2))
        return
    print(f"key id       {kid}")
    print(f"private key  {private_path}")
    print(f"public key   {public_path}")


@keys_app.command("show")
@_user_errors
def keys_show(as_json: JsonOpt = False) -> None:
    """Print the public key (PEM) and its key id; never the private key."""
    from amk_farm import signing

    private_path = config.load().signing_key
    public_path = signing.public_key_path(private_path)
    if public_path.is_file():
        key = signing.load_public_key(public_path)
        if private_path.is_file():  # a .pub left over from another key would mislead
            own = signing.key_id(signing.load_private_key(private_path))
            if own != signing.key_id(key):
                raise signing.SignatureError(
                    f"{public_path} is not the public key of {private_path}"
                )
    else:  # only the private key: derive its public half
        key = signing.load_private_key(private_path).public_key()
    kid, pem = signing.key_id(key), signing.public_pem(key)
    if as_json:
        print(json.dumps({"key_id": kid, "public_key": pem, "path": str(public_path)}, indent=2))
        return
    print(f"key id  {kid}")
    print(pem, end="")


def _artifact_or_compile(
    target: str, template: str | None, out: Path, model: str | None = None
) -> Path:
    """`target` if it is an artifact directory, else compile it (a model, or for `--batch16` a
    template of `model`) into `out` for sm_90a."""
    from compiler.pipeline import compile_model
    from compiler.spec import ShapeTemplate

    path = Path(target)
    if (path / "manifest.json").is_file():
        return path
    if template is None:  # --batch16 TEMPLATE of the benchmarked model
        template, target = target, model or target
        if (Path(target) / "manifest.json").is_file():
            from compiler.artifact import read_manifest

            target = read_manifest(Path(target)).model
    spec = catalog.resolve(target)
    print(f"compiling {spec.name} {template} for sm_90a into {out}", file=sys.stderr)
    compile_model(spec, ShapeTemplate.parse(template), "sm_90a", out)
    return out


def _proof_cache() -> Any:
    """AMK_HOME/proofs, its entries MACed with the secret beside the signing key."""
    from amk_farm import signing
    from verifier.cache import ProofCache

    return ProofCache(config.load().home / "proofs", signing.cache_secret())


def _registry() -> tuple[Any, Any]:
    """The registry's database (migrated to head on first use) and blob store, from the config."""
    from amk_farm import db
    from amk_farm.store import open_store

    cfg = config.load()
    return db.engine(cfg.db_url), open_store(cfg.store_url)


@app.command()
@_user_errors
def publish(
    artifact: Annotated[
        Path, typer.Argument(help="Verified artifact directory (amk-farm verify).")
    ],
    as_json: JsonOpt = False,
) -> None:
    """Publish a verified ARTIFACT: blobs to the store, signed rows to the registry.

    The verdict signed is derived again from ARTIFACT as it is on disk (the verifier, with the
    proof cache of AMK_HOME/proofs: an artifact verified here is not proved twice). Refuses an
    artifact that does not verify as it is, whose proof/ is not the proof of its manifest (run
    `verify` again), or whose files do not match the manifest. Publishing a key that is there
    already is not an error: it says so."""
    from amk_farm import registry, signing

    private_key = signing.load_private_key(config.load().signing_key)
    engine, store = _registry()
    _progress(f"publishing {artifact}: verifying it as it is")
    result = registry.publish(
        artifact,
        engine=engine,
        store=store,
        private_key=private_key,
        cache=_proof_cache(),
        jobs=os.cpu_count() or 1,
    )
    _progress("")
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    print(
        f"{artifact}: {result.status}: {result.model} {result.template} {result.arch} "
        f"(compiler {result.compiler_version}), {result.files} files, "
        f"manifest {result.manifest_digest[:12]}, signed by {(result.key_id or '?')[:16]}"
    )


@app.command("list")
@_user_errors
def list_(
    model: Annotated[
        str | None, typer.Option("--model", help="Only this model (name, alias or model hash).")
    ] = None,
    as_json: JsonOpt = False,
) -> None:
    """List the published artifacts, newest first."""
    from amk_farm import registry

    engine, _ = _registry()
    rows = registry.list_artifacts(engine, model)
    if as_json:
        print(json.dumps(rows, indent=2))
        return
    for r in rows:
        print(
            f"{r['model']:<16} {r['template']:<10} {r['arch']:<7} {r['compiler_version']:<8} "
            f"{r['model_hash'][:12]}  manifest {r['manifest_digest'][:12]}  {r['files']} files  "
            f"{r['created'][:19]}"
        )


@app.command()
@_user_errors
def pull(
    model: Annotated[str, typer.Argument(help="Model name, alias or model hash.")],
    template: Annotated[str, typer.Option("-t", "--template", help="Shape template b<B>-s<S>.")],
    arch: Annotated[str, typer.Option("--arch", help="CUDA target: sm_80 or sm_90a.")],
    output: Annotated[Path, typer.Option("-o", "--output", help="Artifact directory to write.")],
    key: Annotated[
        list[Path] | None,
        typer.Option("--key", help="Also trust this public key (PEM file); repeatable."),
    ] = None,
    force: ForceOpt = False,
    as_json: JsonOpt = False,
) -> None:
    """Fetch a published artifact, checking signature, key, attestation and every sha256 before
    writing.

    Trusted, and nothing else: this user's own public key (AMK_SIGNING_KEY's .pub, made by
    `keys init`), the keys in AMK_HOME/trusted/*.pem (this user's own choice, `keys trust`),
    and each --key. Never a key from the registry database. The attestation must say that
    every obligation was proved for the very manifest handed out. The newest compiler version
    wins if several are published. On any failure DIR is left as it was. An existing non-empty
    DIR is refused; with --force only the artifact's own files in it are replaced (other files
    are kept)."""
    from amk_farm import registry, signing

    trusted = signing.trusted_keys(key or [])
    engine, store = _registry()
    _progress(f"pulling {model} {template} {arch}")
    result = registry.pull(
        model, template, arch, output, engine=engine, store=store, trusted=trusted, force=force
    )
    _progress("")
    if as_json:
        print(json.dumps(result.to_json(), indent=2))
        return
    print(
        f"{output}: {result.model} {result.template} {result.arch} (compiler "
        f"{result.compiler_version}), {len(result.files)} files verified, signed by "
        f"{result.key_id[:16]}"
    )


@keys_app.command("trust")
@_user_errors
def keys_trust(
    pem_file: Annotated[Path, typer.Argument(help="Ed25519 public key (PEM) to trust.")],
    as_json: JsonOpt = False,
) -> None:
    """Trust PEM_FILE's key: this user's `pull` accepts artifacts it signed.

    PEM_FILE must be one Ed25519 public key in PEM and nothing else (not a private key). A copy
    goes to AMK_HOME/trusted/ (this user's own trust; the registry database is not touched)."""
    from amk_farm import signing

    kid, path, new = signing.trust(pem_file)
    if as_json:
        print(json.dumps({"key_id": kid, "added": new, "path": str(path)}))
        return
    print(f"{'trusted' if new else 'already trusted'}: {kid} ({path})")


db_app = typer.Typer(help="The registry database.", no_args_is_help=True)
app.add_typer(db_app, name="db")


@db_app.command("upgrade")
@_user_errors
def db_upgrade(as_json: JsonOpt = False) -> None:
    """Migrate the registry database (AMK_DB_URL) to the newest schema."""
    from amk_farm import db

    url = config.load().db_url
    before, after = db.upgrade(db.create(url))
    if as_json:
        print(json.dumps({"url": _redacted(url), "from": before, "to": after}))
        return
    state = "up to date" if before == after else f"{before or 'empty'} -> {after}"
    print(f"{_redacted(url)}: {state}")


def _redacted(url: str) -> str:
    from sqlalchemy import make_url

    return make_url(url).render_as_string(hide_password=True)


# the command groups defined in their own modules register themselves on `app`
from amk_farm import cli_farm, cli_profile  # noqa: E402, F401


def main() -> None:
    app()


if __name__ == "__main__":
    main()
