"""Planted bugs for classes (g) batch invariance, (h) cross-step state and (i) provenance.

`MUTANTS` edit schedule.json or kernel.cu and go through `verifier.mutate.apply`, like the
CATALOG's. `BINARY_MUTANTS` edit the cubin, which `mutate.apply` cannot (it reads text): their
`file` is "kernel.cubin" (the artifact's kernel.<arch>.cubin), their edit gets {"bytes": ...},
and `apply` here copies the artifact with them applied (it hands text files to `mutate.apply`).
"""

from __future__ import annotations

import re
import shutil
from collections.abc import Callable
from pathlib import Path

from verifier.mutate import Mutant, Sched, _kernel
from verifier.mutate import apply as apply_text


def _scaled(name: str, by: str) -> Callable[[Sched], str | None]:
    """`name` made proportional to `by` (B or SM_COUNT), equal to its value at the artifact's."""

    def edit(s: Sched) -> str | None:
        at = re.search(rf"^constexpr int {by} = (\d+);", s["text"], re.M)
        if at is None:
            return None
        rhs = lambda m: f"constexpr int {name} = {m.group(1)} * {by} / {at.group(1)};"  # noqa: E731
        return _kernel(rf"^constexpr int {name} = (\d+);", rhs, f"{name} scales with {by}")(s)

    return edit


def _inverse(name: str, by: str) -> Callable[[Sched], str | None]:
    """`name` inversely proportional to `by`, equal to its value at the artifact's."""

    def edit(s: Sched) -> str | None:
        at = re.search(rf"^constexpr int {by} = (\d+);", s["text"], re.M)
        if at is None:
            return None
        n = lambda m: int(m.group(1)) * int(at.group(1))  # noqa: E731
        rhs = lambda m: f"constexpr int {name} = {n(m)} / {by};"  # noqa: E731
        return _kernel(rf"^constexpr int {name} = (\d+);", rhs, f"{name} shrinks as {by} grows")(s)

    return edit


def _keys_by_batch(s: Sched) -> str | None:
    """attn_partial's keys per partition scaled by B / (the artifact's B): the same keys at
    this batch, other keys at another."""
    at = re.search(r"^constexpr int B = (\d+);", s["text"], re.M)
    if at is None:
        return None
    rhs = lambda m: f"c = (n + P - 1) / P * B / {at.group(1)};"  # noqa: E731
    return _kernel(r"c = \(n \+ P - 1\) / P;", rhs, "keys per partition scale with B")(s)


def _last_qkv_elsewhere(s: Sched) -> str | None:
    """The last QKV task of layer 1 (it appends the v cache) runs with layer 0's caches."""
    found = [t for t in s["tasks"] if t[2] == "qkv_rope_append" and t[3] == 1]
    if not found:
        return None
    found[-1][3] = 0
    return f"task {found[-1][0]} (qkv_rope_append, layer 1) appends to layer 0's cache"


def _argmax_twice(s: Sched) -> str | None:
    """A second ARGMAX_REDUCE task, bookkeeping consistent: the token has two writers."""
    t = next((t for t in s["tasks"] if t[2] == "argmax_reduce"), None)
    if t is None:
        return None
    copy = [len(s["tasks"]), *t[1:]]
    s["tasks"].append(copy)
    s["queues"][0].append(copy[0])
    s["counters"][copy[6]][1] += 1
    return f"task {t[0]} (argmax_reduce) runs twice (new task {copy[0]})"


def _float(name: str, how: Callable[[float, str], float], what: str) -> Mutant:
    return Mutant(
        f"kernel.cu: {what}",
        "i",
        _kernel(
            rf"^constexpr float {name} = ([-+.\deE]+)f;",
            lambda m: f"constexpr float {name} = {how(float(m.group(1)), m.string):.6e}f;",
            what,
        ),
        "kernel.cu",
    )


def _head_dim(text: str) -> int:
    m = re.search(r"^constexpr int D = (\d+);", text, re.M)
    return int(m.group(1)) if m else 1


MUTANTS: tuple[Mutant, ...] = (
    Mutant("kernel.cu: KV partitions scale with the batch", "g", _scaled("P", "B"), "kernel.cu"),
    Mutant("kernel.cu: KV partitions cut by the batch", "g", _keys_by_batch, "kernel.cu"),
    Mutant(
        "kernel.cu: fewer split-K chunks at larger batch", "g", _inverse("KS", "B"), "kernel.cu"
    ),
    Mutant("kernel.cu: LM-head tiles fill the SMs", "g", _scaled("NT", "SM_COUNT"), "kernel.cu"),
    Mutant(
        "kernel.cu: KV append at row pos + 1",
        "h",
        _kernel(r"\* S \+ pos\) \* D", lambda m: "* S + pos + 1) * D", "cache row pos + 1"),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: KV append head kr % KV",
        "h",
        _kernel(r"(cache\[.*)kr / D\)", lambda m: f"{m.group(1)}kr % KV)", "cache head kr % KV"),
        "kernel.cu",
    ),
    Mutant("v-cache append on another layer", "h", _last_qkv_elsewhere),
    Mutant("token written twice", "h", _argmax_twice),
    _float("EPS", lambda v, _: v * 10, "RMSNorm epsilon x 10"),
    _float("SM_SCALE", lambda v, text: 1.0 / _head_dim(text), "softmax scale 1/D"),
)


def _flip(s: Sched) -> str | None:
    data = bytearray(s["bytes"])
    at = len(data) // 2
    data[at] ^= 0x01
    s["bytes"] = bytes(data)
    return f"cubin byte {at} flipped"


BINARY_MUTANTS: tuple[Mutant, ...] = (Mutant("cubin byte flipped", "i", _flip, "kernel.cubin"),)


def apply(
    src: Path, dst: Path, edit: Callable[[Sched], str | None], file: str = "schedule.json"
) -> str | None:
    """`mutate.apply`, plus "kernel.cubin": the artifact's cubin, edited as {"bytes": ...}."""
    if file != "kernel.cubin":
        return apply_text(src, dst, edit, file)
    cubin = next(src.glob("kernel.*.cubin"), None)
    if cubin is None:
        return None
    doc = {"bytes": cubin.read_bytes()}
    what = edit(doc)
    if what is None:
        return None
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("proof"))
    (dst / cubin.name).write_bytes(doc["bytes"])
    return what
