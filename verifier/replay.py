"""Replay a counterexample on the obligation's concrete facts, without the solver.

`replay(ob, values)` takes the solver's assignment and re-derives the violation from
`ob.data` with plain integers: a count of writers that is not what the step must write, a read
outside its buffer, a required dependency the timing leaves unordered, a stuck state, a counter
whose target is not its number of signallers, two elements of the algebra that differ in
float64 with the real functions. It returns (confirmed, one-line reason).
"""

from __future__ import annotations

import math
from fractions import Fraction
from typing import Any

import z3

from verifier import batch_invariance, kv_invariant
from verifier.obligation import Obligation
from verifier.terms import decode, evaluate


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
    for b, need in data["needs"].items():
        pre = data["before"].get(b)
        if not (done[int(b)] or pre is None or done[pre]):
            continue  # b cannot start yet: its queue predecessor has not finished
        waiting = [a for c in need["all"] for a in data["signallers"][str(c)] if not done[a]]
        waiting += [a for a in need["some"] if not done[a]]
        if waiting:  # b's waits: as the solver found them met
            return True, (
                f"task {b} may start before task {waiting[0]} has finished (a required "
                f"dependency; in a state the waits allow, {sum(done.values())} of the shard's "
                f"{len(done)} tasks have finished, and {b}'s waits are met)"
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


def _split_k(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    j, ci = int(values.get("j", 0)), data.get("CI", data["I"] // data["KS"])
    n = sum(k * ci <= j < (k + 1) * ci for k in range(data["KS"]))
    return (
        n != 1,
        f"column {j} of {data['I']} lies in {n} of the {data['KS']} split-K chunks (CI = {ci})",
    )


def _split_kv(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    pos, j = int(values.get("pos", 0)), int(values.get("j", 0))
    w = data["window"]
    keys = batch_invariance.Constants("", batch_invariance.KEY_VARS)
    keys.text = dict(data["defs"])
    lo, ranges = max(0, pos - w + 1) if w else 0, []
    try:
        for p in range(data["P"]):
            at = {"pos": pos, "part": p}
            ranges.append(tuple(keys.value(r, at) for r in batch_invariance.KEY_RANGE))
    except ZeroDivisionError:
        return True, f"at pos {pos}, partition {len(ranges)}'s key range divides by 0"
    n = sum(j0 <= j < j1 for j0, j1 in ranges)
    want = 1 if lo <= j <= pos else 0
    return (
        n != want,
        f"at pos {pos}, key {j} is read by {n} partitions; the mask lets it through {want} "
        f"time(s) (partitions' keys {ranges})",
    )


def _lm_tiles(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    v, V, NT = int(values.get("v", 0)), data["V"], data["NT"]
    cv = data.get("CV", -(-V // NT))
    n = sum(t * cv <= v < min((t + 1) * cv, V) for t in range(NT))
    return n != 1, f"vocabulary row {v} lies in {n} LM-head tiles"


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def _merge(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    m1, m2, S1, S2, T1, T2 = (
        float(values.get(k, 0.0)) for k in ("m1", "m2", "S1", "S2", "T1", "T2")
    )
    M = max(m1, m2) if data["use_max"] else min(m1, m2)
    try:
        a1, a2 = math.exp(m1 - M), math.exp(m2 - M)
        lm = S1 * math.exp(-m1) * a1 + S2 * math.exp(-m2) * a2
        o = T1 * math.exp(-m1) * a1 + T2 * math.exp(-m2) * (a2 if data["o_rescaled"] else 1.0)
        want_l, want_o = (S1 + S2) * math.exp(-M), (T1 + T2) * math.exp(-M)
    except OverflowError:
        return False, "exp overflows on the solver's values"
    bad = not (_close(lm, want_l) and _close(o, want_o))
    return bad, (
        f"m = ({m1:g}, {m2:g}), S = ({S1:g}, {S2:g}), T = ({T1:g}, {T2:g}): the merged (l, o) = "
        f"({lm:g}, {o:g}), the union's ({want_l:g}, {want_o:g})"
    )


def _push(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    m, S, T, s, v = (float(values.get(k, 0.0)) for k in ("m", "S", "T", "s", "v"))
    mn = max(m, s)
    try:
        lp = S * math.exp(-m) * math.exp(m - mn) + math.exp(s - mn)
        o = T * math.exp(-m) * math.exp(m - mn) + math.exp(s - mn) * v
        want_l, want_o = (S + math.exp(s)) * math.exp(-mn), (T + math.exp(s) * v) * math.exp(-mn)
    except OverflowError:
        return False, "exp overflows on the solver's values"
    bad = not (_close(lp, want_l) and _close(o, want_o))
    return (
        bad,
        f"m = {m:g}, s = {s:g}: the pushed state ({lp:g}, {o:g}) is not the keys' ({want_l:g}, {want_o:g})",
    )


def _float_safety(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    m1, m2 = float(values.get("m1", 0.0)), float(values.get("m2", 0.0))
    M = max(m1, m2) if data["use_max"] else min(m1, m2)
    if m1 - M > 0 or m2 - M > 0:
        return (
            True,
            f"m = ({m1:g}, {m2:g}), M = {M:g}: a rescale exponent is {max(m1, m2) - M:g} > 0",
        )
    return False, "exponents <= 0 on the solver's values"


def _cross_step(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    if data["loose"]:
        return True, f"tasks {data['loose']} have no chain of dependencies to the token's writers"
    if data["early"]:
        return True, f"tasks {data['early']} have no chain of dependencies from the token's readers"
    for c, n in data["per_step"].items():
        got = values.get(f"n_prev{c}")
        if got is not None and got < n:
            return True, f"EMBED of the next step may start with {got} of counter {c}'s {n} signals"
    return False, "no early start in the assignment"


def _algebra(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    """Both elements in float64 at the counterexample's indices (arrays pseudo-random, the
    functions real): confirmed when they differ, or when a paired argument does."""
    ranges = {k: tuple(v) for k, v in data["ranges"].items()}
    at = data.get("at", {})  # a pinned query's point
    env = {v: int(values.get(v, at.get(v, lo))) for v, (lo, _) in ranges.items()}
    tables = {k: [Fraction(x) for x in v] for k, v in data["tables"].items()}
    where = ", ".join(f"{k}={env[k]}" for k in sorted(env) if k in values or k in at)
    for seed in (1, 2, 3):
        for a, b in data.get("pairs", []):
            x, y = evaluate(decode(a), env, tables, seed), evaluate(decode(b), env, tables, seed)
            if not _close_rel(x, y):
                fn = "an uninterpreted function"
                return (
                    True,
                    f"at {where}: the argument of {fn} is {x:.9g} in the model, {y:.9g} in the kernel",
                )
        x = evaluate(decode(data["lhs"]), env, tables, seed)
        y = evaluate(decode(data["rhs"]), env, tables, seed)
        if not _close_rel(x, y):
            return True, f"at {where}: the model graph gives {x:.9g}, the kernel {y:.9g}"
    return False, f"equal at {where}"


def _close_rel(a: float, b: float) -> bool:
    return abs(a - b) <= 1e-9 * (1.0 + abs(a) + abs(b))


def _mask(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    j, pos, window = int(values.get("j", 0)), int(values.get("pos", 0)), data["window"]
    cj, cp = z3.Ints("j pos")
    masked = z3.parse_smt2_string(
        f"(declare-const j Int)(declare-const pos Int)(assert {data['graph']})"
    )[0]
    graph = z3.is_true(z3.simplify(z3.substitute(masked, (cj, z3.IntVal(j)), (cp, z3.IntVal(pos)))))
    kernel = not (j <= pos and (not window or j > pos - window))
    if graph != kernel:
        say = lambda m: "masks" if m else "keeps"  # noqa: E731
        return (
            True,
            f"at pos={pos}: key {j}: the model {say(graph)} it, the kernel {say(kernel)} it",
        )
    return False, "the masks agree at the assignment"


def _device(data: dict[str, Any], values: dict[str, Any]) -> tuple[bool, str]:
    """A finding of the task-body executor (`verifier.device.symexec`) stands as found."""
    return True, str(data.get("why", "the device check failed"))


REPLAYS = {
    "algebra": _algebra,
    "device": _device,
    "mask": _mask,
    "writes": _writes,
    "reads": _reads,
    "order": _order,
    "progress": _progress,
    "counts": _counts,
    "split_k": _split_k,
    "split_kv": _split_kv,
    "lm_tiles": _lm_tiles,
    "merge": _merge,
    "push": _push,
    "float_safety": _float_safety,
    "cross_step": _cross_step,
    "batch": batch_invariance.replay,
    "batch_kv": batch_invariance.replay_kv,
    **kv_invariant.REPLAYS,
}


def replay(ob: Obligation, values: dict[str, Any]) -> tuple[bool, str]:
    how = REPLAYS.get(ob.data.get("mode", ""))
    if how is None:
        return False, f"no replay for {ob.check}"
    return how(ob.data, values)
