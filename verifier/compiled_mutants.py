"""Mutants as a buggy compiler makes them: kernel.cu edited, its cubin rebuilt, the hashes updated.

A text edit alone leaves the cubin and the manifest's sha256 of kernel.cu behind, so the hash
check and the provenance check (`verifier.provenance.cubin`) reject it as tampering before the
code is judged. A compiler with a bug in its code generator instead writes the wrong kernel.cu,
compiles it with its own nvcc call (`compiler.codegen.nvcc.compile_cubin`, as
`compiler.pipeline` does) and records every file's sha256 in the manifest, the only place the
manifest binds the files. `rebuild` does that after the edit: the artifact is self-consistent,
so only the judgement of the code can reject it. An edit nvcc refuses (or whose cubin spills,
which the compiler refuses too) is reported as not compiling, never as killed.

`run` applies a catalog (`verifier.mutants_device`) that way and reports, per class of bug,
how many the mutants' obligation class rejected, and for each mutant what rejected it and
whether the message names the edited device function and a kernel.cu line inside it.
"""

from __future__ import annotations

import json
import re
import shutil
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from compiler.artifact import MANIFEST, read_manifest, sha256_file
from verifier.mutants_device import EQUIVALENT, MUTANTS, DeviceMutant, lines
from verifier.mutate import Sched, rejected_by
from verifier.mutate import apply as apply_text

HASHES = "every file's sha256 is the manifest's"
CUBIN = "the cubin is kernel.cu compiled by the manifest's nvcc"


def rebuild(directory: Path) -> str:
    """Recompile the artifact's cubin from its kernel.cu and rewrite the manifest's file hashes;
    '' on success, else nvcc's first error line (the artifact is then left as it was)."""
    from compiler.codegen.nvcc import NvccError, compile_cubin

    manifest = read_manifest(directory)
    name = f"kernel.{manifest.arch}.cubin"
    tmp = directory / f".{name}.new"
    try:
        compile_cubin(directory / "kernel.cu", manifest.arch, tmp)
    except NvccError as e:
        tmp.unlink(missing_ok=True)
        return str(e).splitlines()[0]
    tmp.replace(directory / name)
    files = {f: sha256_file(directory / f) for f in manifest.files}
    fresh = replace(manifest, files=files).to_json()
    (directory / MANIFEST).write_text(json.dumps(fresh, indent=1, sort_keys=True) + "\n")
    return ""


def apply(
    src: Path, dst: Path, edit: Callable[[Sched], str | None], file: str = "kernel.cu"
) -> tuple[str | None, str]:
    """Copy `src` to `dst` with `file` edited and the artifact rebuilt: (what the edit did, or
    None where it found no place; nvcc's error, or '')."""
    what = apply_text(src, dst, edit, file)
    return what, rebuild(dst) if what is not None else ""


LINE = re.compile(r"kernel\.cu(?::| line )(\d+)")


def _rejections(report: Any, cls: str) -> list[str]:
    """The failure messages of class `cls` in `report` (checks' and obligations')."""
    out = []
    for name, ok, why in report.checks:
        label = name[1] if name.startswith("(") else "i"
        if not ok and label == cls and name != HASHES:
            out.append(f"{name}: {why}")
    for ob, r, _ in report.results:
        if not r.proved and ob.cls == cls:
            out.append(f"{ob.name} [{ob.subject}]: {r.status}: {r.reason}")
    return out


def outcome(m: DeviceMutant, text: str, report: Any) -> dict[str, Any]:
    """What rejected mutant `m` (kernel.cu's mutated `text`), and whether the rejection names
    its device function and a line inside it."""
    failed = {name: why for name, ok, why in report.checks if not ok}
    msgs = _rejections(report, m.cls)
    inside = set(lines(text, m.fn))
    cited = [int(n) for msg in msgs for n in LINE.findall(msg)]
    return {
        "integrity": not any(c in failed for c in (HASHES, CUBIN)),
        "rejected_by": sorted(rejected_by(report)),
        "killed": bool(msgs),
        "names_function": any(m.fn in msg for msg in msgs),
        "names_line": any(n in inside for n in cited),
        "rejections": [msg[:300] for msg in msgs[:4]],
    }


def run(
    artifact: Path,
    work: Path,
    mutants: tuple[DeviceMutant, ...] = MUTANTS,
    equivalent: tuple[DeviceMutant, ...] = EQUIVALENT,
    jobs: int = 1,
) -> dict[str, Any]:
    """Each mutant and equivalent edit applied to `artifact` in buggy-compiler mode (copies
    under `work`) and verified: per class of bug, killed (rejected by the mutant's obligation
    class) of applied; each mutant's outcome; each equivalent edit's verdict."""
    from verifier.verify import verify

    cache = work / "proof-cache"  # the unchanged obligations are proved once
    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rows: list[dict[str, Any]] = []
    same: list[dict[str, Any]] = []
    for i, m in enumerate(mutants + equivalent):
        dst = work / f"device{i}"
        t0 = time.perf_counter()
        what, nvcc = apply(artifact, dst, m.edit, m.file)
        row: dict[str, Any] = {"mutant": m.name, "class": m.cls, "bug": m.bug, "edit": what}
        if what is None or nvcc:
            row |= {"applied": what is not None, "compiles": not nvcc, "nvcc": nvcc}
        else:
            report = verify(dst, jobs=jobs, write_proof=False, cache=cache)
            text = (dst / "kernel.cu").read_text()
            row |= {"applied": True, "compiles": True} | outcome(m, text, report)
            if not m.bug:
                row |= {"proves": report.ok, "failures": report.failures()[:4]}
        row["seconds"] = round(time.perf_counter() - t0, 1)
        if m.bug and row.get("compiles") and row["applied"]:
            per[m.bug][0] += row["killed"]
            per[m.bug][1] += 1
        (rows if m.bug else same).append(row)
        shutil.rmtree(dst, ignore_errors=True)
    return {
        "artifact": str(artifact),
        "per_bug": {b: {"killed": k, "of": n} for b, (k, n) in per.items()},
        "mutants": rows,
        "equivalent": same,
    }


if __name__ == "__main__":
    import sys
    import tempfile

    with tempfile.TemporaryDirectory(prefix="amk-mutants.") as tmp:
        print(json.dumps(run(Path(sys.argv[1]), Path(tmp), jobs=2), indent=1))
