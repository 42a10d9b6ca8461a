"""Class (c) obligations: the counters order every conflicting pair of accesses, and never stall.

Execution model (schedule.py): in every decode step each SM runs its queue in order; a task
starts once each of its waits `counters[c] >= (step + offset) * per_step[c] + count` holds and
signals its counter once when done. Within one step, with earlier steps complete:

* required dependencies, from the verifier's own regions (`verifier.model`, cache regions
  widened to every position): for each region a task b touches, the tasks of the latest earlier
  reference step that write it (read after write, write after write), continuing further back
  while those writes do not cover it, and, if b writes it, the readers since then (write after
  read); tasks of one step that conflict are required in id order (no order exists: a race).
* ordered (per layer, `ordering`): no state the queues and waits allow has a required a
  unfinished while its b could start (each wait a pseudo-boolean count of finished signallers). A shard holds the tasks of layer l (the b side)
  and of layer l - 1; a signaller outside the shard counts as finished at any time, which only
  allows more executions, so a proof of the shard holds for the whole step.
* no deadlock (`progress`): no set of finished tasks, closed under queue order and with every
  finished task's waits met by it, leaves some task unfinished while the next task of every
  queue has an unmet wait.
* per-step counts (`counts`): each counter's per_step is the number of tasks signalling it.

* steps do not overlap (`cross_step`): with the above, by induction over decode steps.
"""

from __future__ import annotations

import itertools
from collections import defaultdict
from collections.abc import Callable, Iterable, Mapping

import numpy as np

from compiler.schedule.schedule import Schedule, Task
from verifier.index_maps import group_key
from verifier.model import Geometry, Region, Touch, is_weight, program, volume
from verifier.obligation import Obligation

Box = tuple[tuple[int, int], ...]


def static_box(r: Region, shape: tuple[int, ...]) -> Box:
    """The region at every pos: a pos-dependent span becomes its whole dimension."""
    out = []
    for (lo, hi), n in zip(r.spans, shape, strict=True):
        out.append((0, n) if lo.at_pos or hi.at_pos else (lo.const, hi.const))
    return tuple(out)


class _Boxes:
    """The (task, box) pairs of one step on one buffer, as arrays for overlap queries."""

    def __init__(self, pairs: list[tuple[int, Box]]) -> None:
        self.ids = np.array([t for t, _ in pairs], dtype=np.int64)
        self.lo = np.array([[lo for lo, _ in box] for _, box in pairs], dtype=np.int64)
        self.hi = np.array([[hi for _, hi in box] for _, box in pairs], dtype=np.int64)

    def hits(self, box: Box) -> tuple[np.ndarray, int]:
        """Ids of the boxes overlapping `box`, and the volume of their overlaps with it."""
        blo = np.array([lo for lo, _ in box], dtype=np.int64)
        bhi = np.array([hi for _, hi in box], dtype=np.int64)
        lo, hi = np.maximum(self.lo, blo), np.minimum(self.hi, bhi)
        hit = np.all(lo < hi, axis=1)
        return self.ids[hit], int(np.prod(hi[hit] - lo[hit], axis=1).sum())


Needs = dict[int, set[int]]  # task b -> the tasks a that must end before b starts (never empty)


def dependencies(sched: Schedule, touched: dict[int, Touch], g: Geometry) -> Needs:
    """Required (a, b): a must end before b starts (see the module docstring), by b."""
    shapes = g.buffers()
    order = {(s.kind, s.layer): i for i, s in enumerate(program(g))}
    # per reference step and buffer: the (task, box) pairs written and read
    w: dict[tuple[int, str], list[tuple[int, Box]]] = defaultdict(list)
    r: dict[tuple[int, str], list[tuple[int, Box]]] = defaultdict(list)
    mine: dict[int, list[tuple[str, str, Box]]] = defaultdict(list)  # task -> (mode, buffer, box)
    step_of: dict[int, int] = {}
    for t in sched.tasks:
        key = group_key((t.kind, t.layer))
        if t.id not in touched or key not in order:
            continue
        i = step_of[t.id] = order[key]
        for mode, regions, into in (("w", touched[t.id].writes, w), ("r", touched[t.id].reads, r)):
            for reg in regions:
                if not is_weight(reg.buffer):
                    box = static_box(reg, shapes[reg.buffer])
                    into[i, reg.buffer].append((t.id, box))
                    mine[t.id].append((mode, reg.buffer, box))
    wb = {k: _Boxes(v) for k, v in w.items()}
    rb = {k: _Boxes(v) for k, v in r.items()}
    needs: Needs = {}
    for b, i in step_of.items():
        on: set[int] = set()
        for mode, buf, box in mine[b]:
            # same step: any conflict is a race, required in id order
            same = [wb[i, buf].hits(box)[0]] if (i, buf) in wb else []
            if mode == "w" and (i, buf) in rb:
                same.append(rb[i, buf].hits(box)[0])
            for ids in same:
                on.update(ids[ids < b].tolist())
            for j in range(i - 1, -1, -1):
                if mode == "w" and (j, buf) in rb:  # write after read
                    on.update(rb[j, buf].hits(box)[0].tolist())
                if (j, buf) in wb:
                    ids, covered = wb[j, buf].hits(box)
                    on.update(ids.tolist())
                    if covered >= volume(box):
                        break
        if on:
            needs[b] = on
    return needs


class _Done:
    """Per query: "every signaller of counter c inside the query has finished", one defined
    boolean per counter (`all0`, `all1`, ... in order of first use, so that layers of the same
    shape give the same text), instead of the list of its signallers at every use."""

    def __init__(self, var: Callable[[int], str | None], signallers: dict[int, list[int]]) -> None:
        self.var, self.signallers = var, signallers
        self.names: dict[int, str] = {}
        self.lines: list[str] = []

    def inside(self, c: int) -> list[str]:
        return [n for n in (self.var(p) for p in self.signallers.get(c, [])) if n is not None]

    def all(self, c: int) -> str:
        if c not in self.names:
            self.names[c] = f"all{len(self.names)}"
            self.lines.append(f"(define-fun {self.names[c]} () Bool {_and(self.inside(c))})")
        return self.names[c]


def _waits_met(t: Task, done: _Done, per_step: dict[int, int]) -> str:
    """SMT-LIB: every wait of t met, each as at least `need` finished signallers (a task
    outside the query counts as finished)."""
    out = []
    for c, count, offset in t.waits:
        need = count + offset * per_step.get(c, 0)
        inside = done.inside(c)
        need -= len(done.signallers.get(c, [])) - len(inside)
        if need <= 0:
            continue
        if need > len(inside):
            out.append("false")
        elif need == len(inside):
            out.append(done.all(c))
        else:
            out.append(f"((_ at-least {need}) {' '.join(inside)})")
    return _and(out)


def _and(parts: list[str]) -> str:
    return "true" if not parts else parts[0] if len(parts) == 1 else f"(and {' '.join(parts)})"


def _or(parts: list[str]) -> str:
    return "false" if not parts else parts[0] if len(parts) == 1 else f"(or {' '.join(parts)})"


def _signallers(sched: Schedule) -> tuple[dict[int, list[int]], dict[int, int]]:
    signallers: dict[int, list[int]] = defaultdict(list)
    for t in sched.tasks:
        signallers[t.signal].append(t.id)
    return signallers, {c: n for c, (_, n) in enumerate(sched.counters)}


def ordering(sched: Schedule, shard: set[int], needs: Needs, layer: int) -> Obligation:
    """Every dependency (a, b) of `needs` (its b in the shard) is ordered (module docstring).

    States, not times: booleans f_i (task i has finished) describe a state of the step; a
    state is allowed when finished tasks are closed under queue order and each finished task's
    waits are met by finished tasks. (a, b) is violated iff some allowed state has a unfinished
    while b could start: its queue predecessor finished and its waits met. Allowed states
    over-approximate the reachable ones, so unsat proves the order in every execution. The
    a's of one b that are every signaller of a counter appear as that counter's `all`."""
    local = {t: i for i, t in enumerate(sorted(shard))}  # query-local numbers: layers share text
    signallers, per_step = _signallers(sched)
    done = _Done(lambda p: f"f{local[p]}" if p in local else None, signallers)
    lines = [f"(declare-const f{i} Bool)" for i in range(len(local))]
    before: dict[int, int] = {}
    for q in sched.queues:
        inq = [t for t in q if t in shard]
        for a, b in itertools.pairwise(inq):
            before[b] = a
            lines.append(f"(assert (=> f{local[b]} f{local[a]}))")
    met = {t: _waits_met(sched.tasks[t], done, per_step) for t in sorted(shard)}
    lines += [f"(assert (=> f{local[t]} {met[t]}))" for t in sorted(shard) if met[t] != "true"]
    cases, grouped = [], {}
    for b in sorted(needs):
        by_counter: dict[int, set[int]] = defaultdict(set)
        for a in needs[b]:
            by_counter[sched.tasks[a].signal].add(a)
        whole = sorted(
            c for c, xs in by_counter.items() if xs == {p for p in signallers[c] if p in local}
        )
        some = sorted(a for c, xs in by_counter.items() if c not in whole for a in xs)
        unmet = [f"(not {done.all(c)})" for c in whole] + [f"(not f{local[a]})" for a in some]
        ready = [met[b]] + ([f"f{local[before[b]]}"] if b in before else [])
        cases.append(_and([*ready, _or(unmet)]))
        grouped[str(b)] = {"all": whole, "some": some}
    return Obligation(
        "c",
        "every required dependency ordered by the counters",
        layer,
        f"{len(shard)} tasks, {sum(map(len, needs.values()))} dependencies",
        "\n".join(lines[: len(local)] + done.lines + lines[len(local) :]) + "\n",
        f"(assert {_or(cases)})\n",
        data={
            "mode": "order",
            "local": {str(t): i for t, i in local.items()},
            "needs": grouped,
            "signallers": {str(c): [p for p in signallers[c] if p in local] for c in done.names},
            "before": {str(b): a for b, a in before.items()},
        },
        tasks=tuple(sorted(shard)),
    )


def progress(sched: Schedule) -> Obligation:
    """No allowed state where some task is unfinished and the next task of every queue has an
    unmet wait (module docstring)."""
    signallers, per_step = _signallers(sched)
    done = _Done(lambda p: f"d{p}", signallers)
    lines = [f"(declare-const d{t.id} Bool)" for t in sched.tasks]
    met = {t.id: _waits_met(t, done, per_step) for t in sched.tasks}
    lines += done.lines
    stuck = []
    for q in sched.queues:
        lines += [f"(assert (=> d{b} d{a}))" for a, b in itertools.pairwise(q)]
        for i, tid in enumerate(q):  # the first unfinished task of the queue cannot start
            first = _and([f"(not d{tid})", *([f"d{q[i - 1]}"] if i else [])])
            stuck.append(f"(=> {first} (not {met[tid]}))")
    lines += [f"(assert (=> d{t} {m}))" for t, m in met.items() if m != "true"]
    unfinished = _or([f"(not d{t.id})" for t in sched.tasks])
    return Obligation(
        "c",
        "no deadlock: some queue can always go on",
        -1,
        f"{len(sched.tasks)} tasks on {len(sched.queues)} queues",
        "\n".join(lines) + "\n",
        f"(assert {_and([unfinished, *stuck])})\n",
        data={"mode": "progress"},
        tasks=tuple(t.id for t in sched.tasks),
    )


def counts(sched: Schedule) -> Obligation:
    """Each counter's declared per_step equals the number of tasks that signal it."""
    actual: dict[int, int] = defaultdict(int)
    for t in sched.tasks:
        actual[t.signal] += 1
    n = len(sched.counters)
    pairs = [(declared, actual.get(c, 0)) for c, (_, declared) in enumerate(sched.counters)]
    lines = [
        f"(declare-const per_step{c} Int)\n(assert (= per_step{c} {d}))"
        for c, (d, _) in enumerate(pairs)
    ]
    wrong = [f"(not (= per_step{c} {a}))" for c, (_, a) in enumerate(pairs)]
    wrong += ["true" for t in sched.tasks if not 0 <= t.signal < n]  # signals no counter
    return Obligation(
        "c",
        "per-step counts: each counter's target per step is its number of signallers",
        -1,
        f"{n} counters",
        "\n".join(lines) + "\n",
        f"(assert {_or(wrong)})\n",
        data={"mode": "counts", "pairs": pairs},
    )


def obligations(
    sched: Schedule, touched: dict[int, Touch], g: Geometry, share: tuple[int, int] = (0, 1)
) -> list[Obligation]:
    """The schedule's obligations; `share` = (k, n): only layers l with l % n == k, and for
    k == 0 the step-wide ones (counts, progress, EMBED/LM head/argmax order, cross-step)."""
    k, n = share
    needs = dependencies(sched, touched, g)
    layer_of = {
        t.id: (t.layer if group_key((t.kind, t.layer))[1] >= 0 else None)
        for t in sched.tasks
        if t.id in touched
    }
    by_layer: dict[int, set[int]] = defaultdict(set)
    globals_ = {t for t, layer in layer_of.items() if layer is None}
    for t, layer in layer_of.items():
        if layer is not None:
            by_layer[layer].add(t)
    out = [counts(sched), progress(sched)] if k == 0 else []
    of_b: dict[int | None, Needs] = defaultdict(dict)  # by the layer of b
    for b, on in needs.items():
        of_b[layer_of.get(b)][b] = on
    for layer in range(k, g.layers, n):
        b_side = by_layer[layer]
        shard = b_side | by_layer.get(layer - 1, set()) | (globals_ if layer == 0 else set())
        mine = of_b.get(layer, {})
        shard = shard.union(*mine.values())
        out.append(ordering(sched, shard, mine, layer))
    if k != 0:
        return out
    # EMBED, the LM head and the argmax, with the last layer: a dependency that a chain of
    # other required dependencies implies (the argmax's write of the token after EMBED's read
    # of it: through every layer) needs no query, since each link is proved in its own shard
    succ: dict[int, list[int]] = defaultdict(list)
    for b, on in needs.items():
        for a in on:
            succ[a].append(b)
    mine = {}
    for b, on in of_b.get(None, {}).items():
        kept = {a for a in on if not _chained(a, b, succ)}
        if kept:
            mine[b] = kept
    shard = (globals_ | by_layer.get(g.layers - 1, set())).union(*mine.values())
    out.append(ordering(sched, shard, mine, -1))
    return [*out, cross_step(sched, touched, needs, succ)]


def cross_step(
    sched: Schedule, touched: dict[int, Touch], needs: Needs, succ: dict[int, list[int]]
) -> Obligation:
    """Steps do not overlap: every task of step s ends before any task of step s + 1 starts.

    Composed from facts proved elsewhere and one query. R, the tasks that write the token,
    and E, the tasks that read it (EMBED): (1) every task has a chain of required dependencies
    to some R, so ends before R ends; (2) every task but E has a chain from some E, so starts
    after E ends; both chains are graph facts over dependencies each proved in its shard. (3)
    The query: at step s + 1 an E task cannot start before every signal that R gives in step
    s: with n_prev of R's per-step signals from step s and none yet from step s + 1 (R of
    step s + 1 comes after E by (2)), some wait of E would be met with n_prev < per_step.
    With (1)-(3), by induction over steps, each step runs as the single-step obligations
    assume (earlier steps complete)."""
    writes_token = {t for t, x in touched.items() if any(r.buffer == "token" for r in x.writes)}
    reads_token = {t for t, x in touched.items() if any(r.buffer == "token" for r in x.reads)}
    before_r = _closure(writes_token, needs)
    after_e = _closure(reads_token, succ)
    loose = sorted(set(touched) - before_r)
    early = sorted(set(touched) - after_e)
    signals = sorted({sched.tasks[t].signal for t in writes_token})
    per_step = {c: n for c, (_, n) in enumerate(sched.counters)}
    lines = []
    for c in signals:  # n_prev{c}: signals on c that step s has given when E of step s + 1 asks
        lines += [
            f"(declare-const n_prev{c} Int)",
            f"(assert (and (>= n_prev{c} 0) (<= n_prev{c} {per_step.get(c, 0)})))",
        ]
    cases = []
    for e in sorted(reads_token):
        met = [
            f"(>= n_prev{c} {(1 + offset) * per_step.get(c, 0) + count})"
            for c, count, offset in sched.tasks[e].waits
            if c in signals
        ]
        cases.append(_and(met))
    missing = _or([f"(< n_prev{c} {per_step.get(c, 0)})" for c in signals])
    chained = not loose and not early and bool(writes_token) and bool(reads_token)
    goal = f"(and {missing} {_or(cases)})" if chained else "true"
    return Obligation(
        "c",
        "steps do not overlap: the next step's EMBED waits for all of the token's writers",
        -1,
        f"{len(reads_token)} readers, {len(writes_token)} writers of the token",
        "\n".join(lines) + "\n" if lines else "(assert true)\n",
        f"(assert {goal})\n",
        data={
            "mode": "cross_step",
            "loose": loose[:5],
            "early": early[:5],
            "per_step": {str(c): per_step.get(c, 0) for c in signals},
        },
        tasks=tuple(sorted(writes_token | reads_token)),
    )


def _closure(start: set[int], edges: Mapping[int, Iterable[int]]) -> set[int]:
    seen, todo = set(start), list(start)
    while todo:
        for y in edges.get(todo.pop(), ()):
            if y not in seen:
                seen.add(y)
                todo.append(y)
    return seen


def _chained(a: int, b: int, succ: dict[int, list[int]]) -> bool:
    """Is there a path a -> ... -> b of at least two required dependencies (`succ`: each task's
    dependents)? They all point forward in program order, so no such path can use (a, b)
    itself, nor a dependency that is implied through (a, b): the composition is sound."""
    seen, todo = {a}, [a]
    while todo:
        x = todo.pop()
        for y in succ.get(x, ()):
            if y == b and x != a:
                return True
            if y not in seen and y != b:
                seen.add(y)
                todo.append(y)
    return False
