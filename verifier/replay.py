"""Replay a counterexample on the obligation's concrete facts, without the solver.

`replay(ob, values)` takes the solver's assignment and re-derives the violation from
`ob.data` with plain integers: a count of writers that is not what the step must write, a read
outside its buffer, a required dependency the timing leaves unordered, a stuck state, a counter
whose target is not its number of signallers. It returns (confirmed, one-line reason).
"""

from __future__ import annotations

from typing import Any

from verifier.obligation import Obligation


def _inside(spans: list[list[int]], e: list[int], pos: int) -> bool:
    return all(a * pos + b <= x < c * pos + d for (a, b, c, d), x in zip(spans, e, strict=True))


def _element(data: dict[str, Any], values: dict[str, Any]) -> tuple[list[int], int]:
    return [int(values.get(f"e{d}", 0)) for d in range(len(data["shape"]))], int(
        values.get("pos", 0)
    )


def _writes(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    e, pos = _element(data, values)
    by = [t for t, spans in data["regions"] if _inside(spans, e, pos)]
    in_shape = all(0 <= x < n for x, n in zip(e, data["shape"], strict=True))
    expected = 1 if in_shape and any(_inside(r, e, pos) for r in data["ref"]) else 0
    where = f"{data['buffer']}{e} at pos={pos}"
    if len(by) == expected:
        return False, f"{where}: {len(by)} writers, as expected"
    if not in_shape:
        return True, f"{where} is outside the buffer {data['shape']}, written by tasks {by}"
    if expected == 0:
        return True, f"{where} must not be written in this step, but tasks {by} write it"
    if not by:
        return True, f"{where} is written by no task"
    return True, f"{where} is written by {len(by)} tasks: {by}"


def _reads(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    e, pos = _element(data, values)
    by = [t for t, spans in data["regions"] if _inside(spans, e, pos)]
    if by and not all(0 <= x < n for x, n in zip(e, data["shape"], strict=True)):
        return True, f"tasks {by} read {data['buffer']}{e}, outside the buffer {data['shape']}"
    return False, f"{data['buffer']}{e}: not an out-of-bounds read"


def _order(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    local = data["local"]
    done = {int(t): bool(values.get(f"f{i}", False)) for t, i in local.items()}
    for a, b in data["deps"]:
        ready = data["before"].get(str(b)) is None or done[data["before"][str(b)]]
        if not done[a] and (done[b] or ready):  # b's waits: as the solver found them met
            n = sum(done.values())
            return True, (
                f"task {b} may start before task {a} has finished (a required dependency; in "
                f"a state the waits allow, {n} of the shard's {len(done)} tasks have finished, "
                f"{a} has not, and {b}'s waits are met)"
            )
    return False, "no unordered dependency in the assignment"


def _progress(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    left = sorted(int(k[1:]) for k, v in values.items() if k.startswith("d") and v is False)
    if left:
        return True, f"the queues can stop with {len(left)} tasks unfinished, first task {left[0]}"
    return False, "every task finished in the assignment"


def _counts(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    for c, (declared, actual) in enumerate(data["pairs"]):
        if declared != actual:
            return True, f"counter {c}: per_step {declared}, but {actual} tasks signal it"
    return True, "a task signals a counter that does not exist"


REPLAYS = {
    "writes": _writes,
    "reads": _reads,
    "order": _order,
    "progress": _progress,
    "counts": _counts,
}


def replay(ob: Obligation, values: dict[str, Any]) -> tuple[bool, str]:
    how = REPLAYS.get(ob.data.get("mode", ""))
    if how is None:
        return False, f"no replay for {ob.check}"
    return how(ob.data, values)
