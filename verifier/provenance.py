"""Class (i) provenance checks: kernel.cu and the cubin are the ones made from this artifact.

Plain checks, not solver queries (what they compare are concrete values and bytes):

* `constants`: every size kernel.cu declares as a constexpr equals the value implied by the
  manifest's model spec, shape template and options, and schedule.json's tiles, computed here
  from those (not by the compiler's code generator): the model dims (H, I, V, L, HQ, KV, D, EPS
  and SM_SCALE as float32, WINDOW), the template (B, S), the split symbols (P, KS, NT, as the
  scheduler binds them from the options), the launch shape (SM_COUNT, THREADS, STAGES,
  SLOT_BYTES, MMA, MMA_ROWS, WEIGHT_EVICT_FIRST, THREAD_COPIES), the widest tiles (QKV_TILE,
  ROW_TILE, EMBED_COLS, MAX_VROWS), and the derived G, QD, KVD, CI, CV, NWARPS evaluated
  from kernel.cu's own expressions. (KC, SMEM_FLOATS and INV_FREQ are not compared.)
* `cubin`: the artifact's cubin is the compilation of its kernel.cu: kernel.cu is recompiled
  with this machine's nvcc, with the flags and the staging of `compiler.codegen.nvcc` (cubins
  are reproducible there), and the sha256 of the two cubins compared. Without nvcc, or without
  a cubin in the artifact, the check is not run (skipped, never passed); an nvcc of another
  version than the manifest's toolchain fails it.
"""

from __future__ import annotations

import hashlib
import math
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np

from compiler.artifact import Manifest
from compiler.ir.fused import Kind
from compiler.schedule.schedule import Schedule
from compiler.spec import ModelSpec, ShapeTemplate
from verifier.batch_invariance import Constants, ExprError

Value = int | float | bool
_RECOMPILED: dict[tuple[str, str, str], str] = {}  # (kernel.cu sha256, arch, nvcc) -> cubin's


def _widest(sched: Schedule, kind: Kind) -> int:
    return max((t.params[1] - t.params[0] for t in sched.tasks if t.kind is kind), default=0)


def expected(
    manifest: Manifest, spec: ModelSpec, template: ShapeTemplate, sched: Schedule
) -> dict[str, Value]:
    """The constants kernel.cu must declare for this manifest and schedule."""
    o = manifest.options
    H, I, V, D = spec.hidden_size, spec.intermediate_size, spec.vocab_size, spec.head_dim  # noqa: E741
    HQ, KV, S = spec.num_heads, spec.num_kv_heads, template.max_seq
    P = min(o["kv_partitions"], S)
    KS = max(d for d in range(1, min(I, o["down_splits"]) + 1) if I % d == 0)
    NT = -(-V // o["lm_head_rows"])
    qkv, oproj = _widest(sched, Kind.QKV_ROPE_APPEND), _widest(sched, Kind.OPROJ_RESIDUAL)
    gate_up, down = _widest(sched, Kind.GATE_UP_SILU), _widest(sched, Kind.DOWN_PARTIAL)
    return {
        "H": H,
        "I": I,
        "V": V,
        "L": spec.num_layers,
        "HQ": HQ,
        "KV": KV,
        "D": D,
        "G": HQ // KV,
        "QD": HQ * D,
        "KVD": KV * D,
        "EPS": float(np.float32(spec.rms_norm_eps)),
        "SM_SCALE": float(np.float32(1.0 / math.sqrt(D))),
        "WINDOW": spec.sliding_window or 0,
        "B": template.batch,
        "S": S,
        "P": P,
        "KS": KS,
        "NT": NT,
        "CI": I // KS,
        "CV": -(-V // NT),
        "SM_COUNT": o["sm_count"],
        "THREADS": o["threads"],
        "NWARPS": o["threads"] // 32,
        "STAGES": o["stages"],
        "SLOT_BYTES": o["stage_bytes"],
        "MMA": o["matvec"] == "mma",
        "MMA_ROWS": o["mma_rows"],
        "WEIGHT_EVICT_FIRST": o["weight_l2"] == "evict_first",
        "THREAD_COPIES": o["ring_copy"] == "threads",
        "QKV_TILE": qkv,
        "ROW_TILE": max(oproj, gate_up, down),
        "EMBED_COLS": _widest(sched, Kind.EMBED),
        "MAX_VROWS": max(qkv, oproj, 2 * gate_up, down, -(-V // NT), 1),
    }


def declared(kernel: str, name: str, c: Constants) -> Value:
    """kernel.cu's value of the top-level constexpr `name` (ExprError if none)."""
    m = re.search(rf"^constexpr (int|float|bool) {name} = ([^;]*);", kernel, re.M)
    if m is None:
        raise ExprError(f"no constexpr {name}")
    ty, rhs = m.group(1), m.group(2).strip()
    if ty == "bool":
        if rhs not in ("true", "false"):
            raise ExprError(f"constexpr bool {name} = {rhs}")
        return rhs == "true"
    if ty == "float":
        try:
            return float(np.float32(float(rhs.removesuffix("f"))))
        except ValueError:
            raise ExprError(f"constexpr float {name} = {rhs}") from None
    return c.value(name, {})


def constants(
    kernel: str, manifest: Manifest, spec: ModelSpec, template: ShapeTemplate, sched: Schedule
) -> str:
    """'' if kernel.cu's constants are the expected ones, else the differences."""
    c = Constants(kernel, ())
    bad = []
    for name, want in expected(manifest, spec, template, sched).items():
        try:
            got = declared(kernel, name, c)
        except (ExprError, ZeroDivisionError) as e:
            bad.append(f"{name}: {e or 'divides by 0'}")
            continue
        if got != want or type(got) is not type(want):
            bad.append(f"{name} = {got}, expected {want}")
    return "; ".join(bad)


def nvcc_version() -> str | None:
    """The last line of `nvcc --version` (as the compiler records it), None without nvcc."""
    if shutil.which("nvcc") is None:
        return None
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout.strip()
    return out.splitlines()[-1] if out else "unknown"


def recompiled(source: Path, arch: str, version: str) -> str:
    """sha256 of kernel.cu compiled by this machine's nvcc (remembered per source digest)."""
    from compiler.codegen.nvcc import compile_cubin

    key = (hashlib.sha256(source.read_bytes()).hexdigest(), arch, version)
    if key not in _RECOMPILED:
        with tempfile.TemporaryDirectory(prefix="amk-provenance.") as tmp:
            out = Path(tmp) / f"kernel.{arch}.cubin"
            compile_cubin(source, arch, out, allow_spills=True)
            _RECOMPILED[key] = hashlib.sha256(out.read_bytes()).hexdigest()
    return _RECOMPILED[key]


def cubin(directory: Path, manifest: Manifest) -> tuple[bool | None, str]:
    """(True, '') if the cubin is kernel.cu's compilation, (False, why) if not, (None, why) if
    the check cannot run here."""
    from compiler.codegen.nvcc import NvccError

    name = f"kernel.{manifest.arch}.cubin"
    if name not in manifest.files and not (directory / name).exists():
        return None, f"the artifact has no {name} (compiled without nvcc)"
    version = nvcc_version()
    if version is None:
        return None, "nvcc is not on PATH: the cubin cannot be recompiled here"
    recorded = manifest.toolchain.get("nvcc")
    if version != recorded:
        return False, f"this machine's nvcc is {version!r}, the artifact's {recorded!r}"
    try:
        got = hashlib.sha256((directory / name).read_bytes()).hexdigest()
        want = recompiled(directory / "kernel.cu", manifest.arch, version)
    except (OSError, NvccError) as e:
        return False, str(e).splitlines()[0]
    if got != want:
        return False, f"{name} sha256 {got[:12]}, kernel.cu recompiled {want[:12]}"
    return True, ""


def checks(
    directory: Path, manifest: Manifest, spec: ModelSpec, template: ShapeTemplate, sched: Schedule
) -> tuple[list[tuple[str, bool, str]], list[tuple[str, str]]]:
    """The provenance checks (name, ok, why), and those not run (name, why)."""
    name = "kernel.cu's constants are those of the manifest and schedule.json"
    try:
        why = constants((directory / "kernel.cu").read_text(), manifest, spec, template, sched)
    except OSError as e:
        why = str(e)
    out: list[tuple[str, bool, str]] = [(name, not why, why)]
    skipped: list[tuple[str, str]] = []
    name = "the cubin is kernel.cu compiled by the manifest's nvcc"
    ok, why = cubin(directory, manifest)
    if ok is None:
        skipped.append((name, why))
    else:
        out.append((name, ok, why))
    return out, skipped
