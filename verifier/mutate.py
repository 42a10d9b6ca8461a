"""Planted bugs and equivalent edits of an artifact, for testing the verifier.

Each `Mutant` edits a copy of an artifact's files the way a bug in the compiler (or a careless
hand) would, and names the obligation class that must reject it; `EQUIVALENT` edits change the
files without changing what the kernel computes, and must still prove (apart from the files'
hashes, which any edit changes). `kill_rates` runs a catalog against an artifact and reports,
per class, how many mutants the intended class rejected.

Operators take the parsed schedule.json (a dict, edited in place), or for kernel.cu's constants
and task table {"text": kernel.cu}, and return a short description of the edit, or None where
the artifact offers no place for it. `full_catalog` adds the mutants of the other modules
(`verifier.mutants_state`, `verifier.mutants_algebra`), whose rule mutants (class a) break a
fusion pass rather than a file.
"""

from __future__ import annotations

import json
import re
import shutil
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

Sched = dict[str, Any]


@dataclass(frozen=True)
class Mutant:
    name: str
    cls: str  # the obligation class that must reject it
    edit: Callable[[Sched], str | None]
    file: str = "schedule.json"  # or "kernel.cu": then `edit` gets {"text": ...} to rewrite


def _tasks(s: Sched, kind: str, layer: int | None = None) -> list[list[Any]]:
    return [t for t in s["tasks"] if t[2] == kind and (layer is None or t[3] == layer)]


def _first(s: Sched, kind: str, layer: int | None = None) -> list[Any] | None:
    found = _tasks(s, kind, layer)
    return found[0] if found else None


def _param(
    kind: str, i: int, delta: int, which: str = "first", layer: int = 0
) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        found = _tasks(s, kind, layer if kind not in ("embed", "lmhead_argmax") else None)
        if not found:
            return None
        t = found[0] if which == "first" else found[-1]
        t[4][i] += delta
        return f"task {t[0]} ({kind}): parameter {i} {delta:+d}"

    return edit


def _layer(kind: str) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        t = _first(s, kind, 1)
        if t is None:
            return None
        t[3] = 0
        return f"task {t[0]} ({kind}, layer 1) runs with layer 0's weights and buffers"

    return edit


def _duplicate(kind: str) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        t = _first(s, kind, 0)
        if t is None:
            return None
        copy = [len(s["tasks"]), *json.loads(json.dumps(t[1:]))]
        s["tasks"].append(copy)
        s["queues"][-1].append(copy[0])
        s["counters"][copy[6]][1] += 1  # bookkeeping kept consistent: only the write is wrong
        return f"task {t[0]} ({kind}) runs twice (new task {copy[0]})"

    return edit


def _drop_waits(kind: str, layer: int) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        found = [t for t in _tasks(s, kind, layer) if t[5]]
        if not found:
            return None
        for t in found:
            t[5] = []
        return f"{len(found)} {kind} tasks of layer {layer} wait for nothing"

    return edit


def _wait_edit(kind: str, how: str) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        for t in _tasks(s, kind, 1):
            if not t[5]:
                continue
            w = t[5][0]
            if how == "counter":  # every task of the kind waits on the wrong counter
                for u in _tasks(s, kind, 1):
                    u[5] = [[(x[0] + 1) % len(s["counters"]), x[1], x[2]] for x in u[5]]
                return f"{kind} tasks of layer 1 wait on the next counter"
            if how == "count" and w[1] > 1:
                for u in _tasks(s, kind, 1):
                    u[5] = [[x[0], 1, x[2]] for x in u[5]]
                return f"{kind} tasks of layer 1 wait for one signal instead of all"
            if how == "offset":
                for u in _tasks(s, kind, 1):
                    u[5] = [[x[0], x[1], -1] for x in u[5]]
                return f"{kind} tasks of layer 1 wait on the previous step's signals"
        return None

    return edit


def _per_step(delta: int) -> Callable[[Sched], str | None]:
    def edit(s: Sched) -> str | None:
        s["counters"][1][1] += delta
        return f"counter 1's per-step target {delta:+d}"

    return edit


def _signal_elsewhere(s: Sched) -> str | None:
    t = _first(s, "qkv_rope_append", 1)
    if t is None:
        return None
    t[6] = (t[6] + 1) % len(s["counters"])
    return f"task {t[0]} signals counter {t[6]}"


def _queue_before_producer(s: Sched) -> str | None:
    """Put a consumer ahead of its producer in the producer's queue: a deadlock."""
    producer = _first(s, "embed")
    consumer = _first(s, "qkv_rope_append", 0)
    if producer is None or consumer is None:
        return None
    for q in s["queues"]:
        if consumer[0] in q:
            q.remove(consumer[0])
    for q in s["queues"]:
        if producer[0] in q:
            q.insert(q.index(producer[0]), consumer[0])
    return f"task {consumer[0]} queued ahead of its producer {producer[0]} on one SM"


def _kernel(
    pattern: str, repl: Callable[[re.Match[str]], str], what: str
) -> Callable[[Sched], str | None]:
    """An edit of kernel.cu's text: the first match of `pattern` rewritten by `repl`."""

    def edit(s: Sched) -> str | None:
        new, n = re.subn(pattern, repl, s["text"], count=1, flags=re.M)
        if not n:
            return None
        s["text"] = new
        return f"kernel.cu: {what}"

    return edit


def _task_row(op: int, field: int, delta: int) -> Callable[[re.Match[str]], str]:
    def repl(m: re.Match[str]) -> str:
        row = [int(x) for x in m.group(1).split(",")]
        row[field] += delta
        return "  {" + ",".join(map(str, row)) + "},"

    return repl


def _template(s: Sched) -> str | None:
    batch, seq = s["template"][1:].split("-s")
    s["template"] = f"b{int(batch) + 1}-s{seq}"
    return f"schedule.json says template {s['template']}"


CATALOG: tuple[Mutant, ...] = (
    Mutant("tile end +1 (overlap)", "b", _param("oproj_residual", 1, 1)),
    Mutant("tile end -1 (gap)", "b", _param("gate_up_silu", 1, -1)),
    Mutant("last tile past the buffer", "b", _param("down_residual", 1, 8, "last")),
    Mutant("tile start -1 (overlap)", "b", _param("down_partial", 0, -1, "last")),
    Mutant("embed columns shifted", "b", _param("embed", 0, 8)),
    Mutant("QKV rows shifted by a head", "b", _param("qkv_rope_append", 0, 8)),
    Mutant("QKV rows split a RoPE pair", "i", _param("qkv_rope_append", 0, 1)),
    Mutant("attention partition index +1", "b", _param("attn_partial", 1, 1)),
    Mutant("attention KV head +1", "b", _param("attn_partial", 0, 1)),
    Mutant("merge KV head +1", "b", _param("attn_merge", 0, 1)),
    Mutant("split-K chunk +1", "b", _param("down_partial", 2, 1)),
    Mutant("LM-head tile +1", "b", _param("lmhead_argmax", 0, 1)),
    Mutant("QKV task on another layer", "b", _layer("qkv_rope_append")),
    Mutant("o-proj task on another layer", "b", _layer("oproj_residual")),
    Mutant("down task on another layer", "b", _layer("down_partial")),
    Mutant("task run twice", "b", _duplicate("gate_up_silu")),
    Mutant("attention waits dropped", "c", _drop_waits("attn_partial", 1)),
    Mutant("merge waits dropped", "c", _drop_waits("attn_merge", 1)),
    Mutant("residual waits dropped", "c", _drop_waits("down_residual", 0)),
    Mutant("waits on the wrong counter", "c", _wait_edit("oproj_residual", "counter")),
    Mutant("waits for one signal of many", "c", _wait_edit("attn_merge", "count")),
    Mutant("waits on the previous step", "c", _wait_edit("gate_up_silu", "offset")),
    Mutant("per-step target +1", "c", _per_step(1)),
    Mutant("per-step target -1", "c", _per_step(-1)),
    Mutant("signals the wrong counter", "c", _signal_elsewhere),
    Mutant("consumer queued before its producer", "c", _queue_before_producer),
    Mutant("schedule for another template", "i", _template),
    Mutant("EMBED does not wait for the previous token", "c", _drop_waits("embed", -1)),
    Mutant(
        "kernel.cu: a wait made trivial",
        "c",
        _kernel(
            r"^  \{(\d+),(\d+),0\},$",
            lambda m: f"  {{{m.group(1)},0,0}},",
            "first same-step wait needs 0 signals",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: o-proj tile end +1",
        "b",
        _kernel(
            r"^  \{(4,0,[^}]*)\},$",
            _task_row(4, 3, 1),
            "first o-proj task of layer 0 ends a row late",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: split-K constant halved",
        "b",
        _kernel(
            r"^constexpr int KS = (\d+);",
            lambda m: f"constexpr int KS = {max(1, int(m.group(1)) // 2)};",
            "KS halved",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: split-K count not dividing the columns",
        "d",
        _kernel(r"^constexpr int KS = (\d+);", lambda m: "constexpr int KS = 3;", "KS = 3"),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: KV partitions end a key late",
        "d",
        _kernel(
            r"j1 = min\(j0 \+ c, pos \+ 1\);",
            lambda m: "j1 = min(j0 + c + 1, pos + 1);",
            "j1 = min(j0 + c + 1, pos + 1): each partition's last key is the next one's first",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: KV partitions of floor(n / P) keys",
        "d",
        _kernel(
            r"c = \(n \+ P - 1\) / P;",
            lambda m: "c = n / P;",
            "c = n / P: the visible keys past P * floor(n / P) are read by none",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: LM-head tiles one row short",
        "d",
        _kernel(
            r"^constexpr int CV = \(V \+ NT - 1\) / NT;",
            lambda m: "constexpr int CV = (V + NT - 1) / NT - 1;",
            "CV = ceil(V / NT) - 1: a vocabulary row in no tile",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: merge does not rescale the second state",
        "e",
        _kernel(r"o2\[i\] \* a2;", lambda m: "o2[i];", "softmax_merge adds o2 unscaled"),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: push with the old maximum",
        "e",
        _kernel(
            r"const float mn = fmaxf\(m, s\);",
            lambda m: "const float mn = m;",
            "softmax_push keeps m",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: a float atomic in the residual",
        "g",
        _kernel(
            r"(\*xr = ld_act\(xr\) \+ y\[v \* B \+ b\];)",
            lambda m: "atomicAdd(xr, y[v * B + b]);",
            "o-proj residual by atomicAdd",
        ),
        "kernel.cu",
    ),
    Mutant(
        "kernel.cu: per-step count +1",
        "c",
        _kernel(
            r"(PER_STEP\[NCOUNTERS\] = \{\n  )(\d+)",
            lambda m: f"{m.group(1)}{int(m.group(2)) + 1}",
            "PER_STEP[0] + 1",
        ),
        "kernel.cu",
    ),
)


def _implied_wait(s: Sched) -> str | None:
    """Give each down-residual task of layer 0 a second wait that its first implies: on the
    o-projection's counter, whose signallers the down projection's inputs already waited for.
    (The compiler leaves implied waits out, so the fresh schedule is this one with them removed:
    both must prove.)"""
    oproj = _first(s, "oproj_residual", 0)
    found = _tasks(s, "down_residual", 0)
    if oproj is None or not found:
        return None
    counter = oproj[6]
    for t in found:
        t[5].append([counter, s["counters"][counter][1], 0])
    return f"{len(found)} down-residual tasks also wait on counter {counter} (implied)"


def _swap_independent(s: Sched) -> str | None:
    """Swap two neighbouring tasks of one instruction in a queue (they do not conflict); where
    no queue holds such a pair, move the last task of the step to the end of another queue."""
    for q in s["queues"]:
        for i in range(len(q) - 1):
            a, b = s["tasks"][q[i]], s["tasks"][q[i + 1]]
            if a[2:4] == b[2:4]:
                q[i], q[i + 1] = q[i + 1], q[i]
                return f"tasks {a[0]} and {b[0]} swapped in their queue"
    last = len(s["tasks"]) - 1
    src = next(q for q in s["queues"] if last in q)
    dst = next((q for q in s["queues"] if q is not src), None)
    if dst is None:
        return None
    src.remove(last)
    dst.append(last)
    return f"task {last} moved to the end of another queue"


EQUIVALENT: tuple[tuple[str, Callable[[Sched], str | None]], ...] = (
    ("transitively implied wait added (the fresh schedule has it removed)", _implied_wait),
    ("independent tasks reordered", _swap_independent),
)


def apply(
    src: Path, dst: Path, edit: Callable[[Sched], str | None], file: str = "schedule.json"
) -> str | None:
    """Copy the artifact `src` to `dst` with `file` edited; None if `edit` found no place (then
    `dst` is not created)."""
    text = (src / file).read_text()
    doc = json.loads(text) if file.endswith(".json") else {"text": text}
    what = edit(doc)
    if what is None:
        return None
    shutil.copytree(src, dst, ignore=shutil.ignore_patterns("proof"))
    (dst / file).write_text(json.dumps(doc) if file.endswith(".json") else doc["text"])
    return what


def rejected_by(report: Any) -> set[str]:
    """Classes whose obligations (or, for i, checks) failed."""
    out = {ob.cls for ob, r, _ in report.results if not r.proved}
    hashes = "every file's sha256 is the manifest's"
    for name, ok, _ in report.checks:
        if not ok and name != hashes:
            out.add(name[1] if name.startswith("(") else "i")
    return out


def full_catalog() -> tuple[Mutant, ...]:
    """Every artifact-file mutant: this module's (b, c, d, e, g, i), the state classes' (g, h,
    i, `verifier.mutants_state`) and the algebra's (e, f, `verifier.mutants_algebra`)."""
    from verifier import mutants_algebra, mutants_state

    return CATALOG + mutants_state.MUTANTS + mutants_state.BINARY_MUTANTS + mutants_algebra.MUTANTS


def kill_rates(
    artifact: Path, work: Path, catalog: tuple[Mutant, ...] | None = None, rules: bool = True
) -> dict[str, Any]:
    """Run every mutant of `catalog` (default `full_catalog()`) on `artifact` (copies under
    `work`), and with `rules` every planted bug of the fusion rules (class a): per class, how
    many were rejected by their intended class, and each mutant's outcome."""
    from verifier import mutants_algebra, mutants_state
    from verifier.verify import verify

    per: dict[str, list[int]] = defaultdict(lambda: [0, 0])
    rows = []

    def record(name: str, cls: str, what: str, report: Any) -> None:
        classes = rejected_by(report)
        killed = cls in classes
        per[cls][0] += killed
        per[cls][1] += 1
        row = {"mutant": name, "class": cls, "applied": True, "edit": what}
        rows.append(row | {"rejected_by": sorted(classes), "killed": killed})

    cache = work / "proof-cache"  # proved queries are shared; only failures are re-run
    for i, m in enumerate(full_catalog() if catalog is None else catalog):
        dst = work / f"mutant{i}"
        what = mutants_state.apply(artifact, dst, m.edit, m.file)
        if what is None:
            rows.append({"mutant": m.name, "class": m.cls, "applied": False})
            continue
        record(m.name, m.cls, what, verify(dst, write_proof=False, cache=cache))
        shutil.rmtree(dst)
    for rule in mutants_algebra.RULE_MUTANTS if rules else ():
        with mutants_algebra.patched_rule(rule):
            report = verify(artifact, write_proof=False, cache=cache)
        record(rule.name, "a", f"pass {rule.rule} broken", report)
    return {
        "per_class": {c: {"killed": k, "of": n} for c, (k, n) in sorted(per.items())},
        "mutants": rows,
    }
