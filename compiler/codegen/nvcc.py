"""nvcc: kernel.cu -> kernel.<arch>.cubin, with ptxas's resource report parsed.

Every call uses `-cubin -O3 -lineinfo -Xptxas=--warn-on-spills -Xptxas=-v -std=c++17` and one
`-gencode` for the arch (the sm_90a form needs `-gencode`: see HOPPER.md). A spill is an error
unless the caller allows it: a megakernel that spills is a performance bug, not a warning.

Cubins are reproducible: with -lineinfo nvcc records the compile directory and the source's
mtime, and derives internal symbol names from its path, so the source is compiled as `kernel.cu`
(mtime 0) in a directory named by its digest and the arch (under the temp dir).
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import re
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

FLAGS = ("-cubin", "-O3", "-lineinfo", "-Xptxas=--warn-on-spills", "-Xptxas=-v", "-std=c++17")
ARCH_RE = re.compile(r"sm_([0-9]{2,3})(a?)")


class NvccMissing(RuntimeError):
    """nvcc is not on PATH."""


class NvccError(RuntimeError):
    """nvcc failed; the message is the compiler's first error line."""


class SpillError(NvccError):
    """ptxas spilled registers to local memory."""


@dataclass(frozen=True)
class FunctionUsage:
    """ptxas's report for one function."""

    name: str
    registers: int = 0
    stack_frame: int = 0
    spill_stores: int = 0
    spill_loads: int = 0
    smem: int = 0
    barriers: int = 0


@dataclass(frozen=True)
class CompileResult:
    arch: str
    cubin: Path
    entry: FunctionUsage | None  # the __global__ function
    functions: tuple[FunctionUsage, ...]  # every function ptxas reported (entry included)
    seconds: float
    command: tuple[str, ...]
    log: str  # nvcc's stderr (ptxas -v report and warnings)

    @property
    def spills(self) -> int:
        return sum(f.spill_stores + f.spill_loads for f in self.functions)

    def to_json(self) -> dict[str, Any]:
        return {
            "arch": self.arch,
            "cubin": str(self.cubin),
            "entry": asdict(self.entry) if self.entry else None,
            "spills": self.spills,
            "seconds": round(self.seconds, 3),
            "command": list(self.command),
        }


def gencode(arch: str) -> str:
    """`-gencode` for an arch name like sm_80 or sm_90a."""
    m = ARCH_RE.fullmatch(arch)
    if m is None:
        raise ValueError(f"bad arch {arch!r} (expected sm_<NN>[a], e.g. sm_80, sm_90a)")
    return f"-gencode=arch=compute_{m.group(1)}{m.group(2)},code={arch}"


def parse_ptxas(log: str) -> tuple[FunctionUsage, ...]:
    """The per-function resource lines of `ptxas -v` output, in report order."""
    usage: dict[str, dict[str, int]] = {}
    current: str | None = None
    for line in log.splitlines():
        m = re.search(r"(?:Compiling entry function|Function properties for) '?([\w$.]+)'?", line)
        if m:
            current = m.group(1)
            usage.setdefault(current, {})
            continue
        if current is None:
            continue
        u = usage[current]
        m = re.search(
            r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line
        )
        if m:
            u["stack_frame"], u["spill_stores"], u["spill_loads"] = (int(g) for g in m.groups())
        m = re.search(r"Used (\d+) registers", line)
        if m:
            u["registers"] = int(m.group(1))
            for key, pat in (("smem", r"(\d+) bytes smem"), ("barriers", r"used (\d+) barriers")):
                mm = re.search(pat, line)
                if mm:
                    u[key] = int(mm.group(1))
    return tuple(FunctionUsage(name, **u) for name, u in usage.items())


@contextmanager
def _staged(cu_path: Path, arch: str) -> Iterator[Path]:
    """A private copy of the source at a path that depends only on its bytes and the arch."""
    src = cu_path.read_bytes()
    root = Path(tempfile.gettempdir()) / "amk-nvcc"
    root.mkdir(exist_ok=True)
    work = root / f"{hashlib.sha256(src).hexdigest()[:32]}-{arch}"
    with open(root / f"{work.name}.lock", "w") as lock:
        fcntl.flock(
            lock, fcntl.LOCK_EX
        )  # one compile of the same bytes for the same arch at a time
        try:
            work.mkdir(exist_ok=True)
            (work / "kernel.cu").write_bytes(src)
            os.utime(work / "kernel.cu", (0, 0))  # the line table records the source's mtime
            yield work
        finally:
            shutil.rmtree(work, ignore_errors=True)
            fcntl.flock(lock, fcntl.LOCK_UN)


def _first_error(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    for ln in lines:
        if re.search(r"\berror\b", ln, re.I):
            return ln
    return lines[0] if lines else "no output"


def compile_cubin(
    cu_path: str | Path,
    arch: str,
    out: str | Path,
    *,
    entry: str = "amk_megakernel",
    allow_spills: bool = False,
    timeout: float = 900.0,
) -> CompileResult:
    """Compile `cu_path` to the cubin `out` for `arch` ("sm_80", "sm_90a", ...).

    Raises:
        NvccMissing: no nvcc on PATH.
        NvccError: nvcc failed (message: its first error line) or timed out.
        SpillError: ptxas spilled registers and `allow_spills` is false.
    """
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise NvccMissing(
            "nvcc not found on PATH: install the CUDA toolkit or add its bin/ to PATH"
        )
    out = Path(os.path.abspath(out))
    cmd = (nvcc, *FLAGS, gencode(arch), "-o", str(out), "kernel.cu")
    t0 = time.perf_counter()
    with _staged(Path(cu_path), arch) as work:
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=work)
        except subprocess.TimeoutExpired:
            raise NvccError(
                f"nvcc timed out after {timeout:.0f} s compiling {cu_path} for {arch}"
            ) from None
    seconds = time.perf_counter() - t0
    log = proc.stderr + proc.stdout
    if proc.returncode != 0:
        raise NvccError(f"nvcc failed for {arch}: {_first_error(log)}")
    funcs = parse_ptxas(log)
    result = CompileResult(
        arch=arch,
        cubin=out,
        entry=next((f for f in funcs if f.name == entry), None),
        functions=funcs,
        seconds=seconds,
        command=cmd,
        log=log,
    )
    warned = re.search(r"ptxas warning.*spill", log, re.I) is not None  # --warn-on-spills
    if (result.spills or warned) and not allow_spills:
        bad = ", ".join(
            f"{f.name}: {f.spill_stores} B stores / {f.spill_loads} B loads"
            for f in funcs
            if f.spill_stores or f.spill_loads
        )
        raise SpillError(f"ptxas spilled registers for {arch}: {bad or _first_error(log)}")
    return result
