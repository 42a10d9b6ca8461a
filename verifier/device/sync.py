"""Synchronization proved on kernel.cu's code: the cross-CTA counter protocol (issue 16, item 2).

`check(unit)` runs the kernel entry through `verifier.device.interp` (every device function
inlined, all threads of a CTA at once) and follows one automaton over the consumer threads'
collective state, `(acq, dirty)`:

    acq 0   no counter acquired since the last signal (the start; after each signal)
    acq 1   every wait of the task acquired, by some consumer thread, not yet published
    acq 2   the acquires published to every consumer thread by a consumer barrier
    dirty   a global write by some consumer since the last consumer barrier

* an acquire load of a counter (memory_order_acquire or stronger) moves acq to 1; a loop whose
  every iteration acquires leaves acq 1 even after zero iterations (a task with no waits has
  nothing to acquire), and the acquired value must decide a loop's exit (a spin, not one read);
* a consumer barrier (`bar.sync 1, THREADS` with a "memory" clobber, reached by every consumer
  thread and no producer) moves acq 1 to 2 and clears dirty;
* a global data access (anything but the read-only weights through __ldg or the async copies,
  and the `__device__ const` tables) needs acq 2; a write sets dirty;
* a counter release (fetch_add with memory_order_release or stronger, by exactly one consumer
  thread) needs acq 2 and not dirty, and resets acq to 0;
* nothing else touches the counters (no plain loads or stores, no other atomics), every counter
  atomic_ref has device (or system) scope, and no consumer path ends with acq 2 (a task whose
  accesses are never signalled) nor acquires again before signalling.

So a relaxed order, a dropped or misplaced barrier, a signal before the task's accesses, a
return that skips the signal: each is a failed check naming the device function call chain and
the kernel.cu line. A barrier under a thread-dependent condition is a deadlock and fails on its
own (`barriers reached by every consumer`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import z3

from verifier.device import nodes as n
from verifier.device import races
from verifier.device.clients import Clients
from verifier.device.interp import Client, Event, Interp
from verifier.device.races import Races
from verifier.device.sync_values import TID, Ptr

ENTRY = "amk_megakernel"
CONSUMER_BARRIER = 1
ACQUIRE = ("acquire", "acq_rel", "seq_cst")
RELEASE = ("release", "acq_rel", "seq_cst")
SCOPES = ("cuda::thread_scope_device", "cuda::thread_scope_system")
CHECKS = (
    "counter atomics: device scope, acquire/release orders",
    "wait: an acquire spin before a consumer barrier",
    "task accesses after the wait's barrier, before the signal",
    "signal: one release after a consumer barrier",
    "every task signals on every path",
    "barriers reached by every consumer thread",
    "counters touched only by the wait and the signal",
)
S_ORDER, S_WAIT, S_ACCESS, S_SIGNAL, S_EVERY, S_BARRIER, S_ONLY = CHECKS


@dataclass
class Protocol(Client):
    """The automaton of the module docstring; errors go to `errors` (check -> messages)."""

    interp: Interp | None = None
    threads: int = 0
    counter_regions: set[str] = field(default_factory=set)
    errors: dict[str, dict[str, None]] = field(default_factory=dict)
    deferred: list[tuple[Event, frozenset]] = field(default_factory=list)  # global accesses
    last_acquire: str = ""  # the site of the latest acquire load (for messages)
    acquires: dict[str, Event] = field(default_factory=dict)  # loaded symbol -> its load
    stats: dict[str, int] = field(
        default_factory=lambda: {"barriers": 0, "acquires": 0, "releases": 0}
    )

    def fail(self, check: str, ev: Event, msg: str) -> None:
        self.errors.setdefault(check, {})[f"{ev.site()}: {msg}"] = None

    # ---- thread sets (Z3 over TID) -------------------------------------------------------------

    def _solve(self, *cs: object) -> bool:
        assert self.interp is not None
        return self.interp.sat(*cs)

    def consumers_exactly(self, g: object) -> bool:
        """On a path where some thread passes `g`, every consumer thread and no producer does
        (the thread set of barrier 1)."""
        if not isinstance(g, z3.ExprRef):
            return bool(g) is False or self.interp is None or self.interp.block == self.threads
        t0, t1, t2 = z3.Ints("c0 c1 c2")
        at = lambda t: z3.substitute(g, (TID, t))  # noqa: E731
        blk = self.interp.block if self.interp else 0
        live = z3.And(t0 >= 0, t0 < blk, at(t0))
        bad = z3.Or(z3.And(t1 >= self.threads, t1 < blk, at(t1)),
                    z3.And(t2 >= 0, t2 < self.threads, z3.Not(at(t2))))  # fmt: skip
        return not self._solve(live, bad)

    def one_consumer(self, g: object) -> bool:
        t1, t2 = z3.Ints("o1 o2")
        at = lambda t: z3.substitute(g, (TID, t)) if isinstance(g, z3.ExprRef) else g  # noqa: E731
        two = self._solve(t1 >= 0, t2 > t1, t2 < self.threads + 32, at(t1), at(t2))
        producer = self._solve(self.threads <= TID, at(TID))
        return not two and not producer

    def consumer_only(self, g: object) -> bool:
        return not self._solve(self.threads <= TID, g)

    # ---- the automaton -------------------------------------------------------------------------

    def event(self, facts: frozenset, ev: Event) -> frozenset:
        k = ev.kind
        if k == "barrier":
            return self.barrier(facts, ev)
        if k == "atomic":
            return self.atomic(facts, ev)
        if k in ("read", "write"):
            return self.access(facts, ev)
        if k == "asm":
            return self.asm(facts, ev)
        return facts

    def barrier(self, facts: frozenset, ev: Event) -> frozenset:
        d = ev.data
        if not self.consumer_only(ev.guard):
            return facts  # a producer-side barrier (ring_sync): not the consumers' protocol
        if d["id"] != CONSUMER_BARRIER and d["count"] == self.interp.block:  # type: ignore[union-attr]
            return (
                facts  # the ring's lockstep barriers with the producer (THREAD_COPIES): the ring's
            )
        self.stats["barriers"] += 1
        if d["id"] != CONSUMER_BARRIER or d["count"] != self.threads:
            self.fail(S_BARRIER, ev, f"consumer barrier is bar.sync {d['id']}, {d['count']}, not "
                      f"{CONSUMER_BARRIER}, THREADS={self.threads} (a deadlock or a partial barrier)")  # fmt: skip
            return facts
        if not self.consumers_exactly(ev.guard):
            self.fail(S_BARRIER, ev, "barrier not reached by every consumer thread (under a "
                      "thread-dependent condition: a deadlock)")  # fmt: skip
            return facts
        if not d["memory"]:
            self.fail(S_BARRIER, ev, 'barrier asm without the "memory" clobber: the compiler may '
                      "move memory accesses across it")  # fmt: skip
            return facts
        return frozenset((2 if a == 1 else a, False) for a, _ in facts)

    def is_counter(self, p: Ptr) -> bool:
        return p.region in self.counter_regions

    def atomic(self, facts: frozenset, ev: Event) -> frozenset:
        d = ev.data
        p: Ptr = d["ptr"]
        self.counter_regions.add(p.region)
        if d["scope"] not in SCOPES:
            self.fail(S_ORDER, ev, f"counter atomic_ref has scope {d['scope']}, not device")
        if not self.consumer_only(ev.guard):
            self.fail(S_ONLY, ev, f"the producer warp performs {d['op']} on {p.region}")
            return facts
        if d["op"] == "load":
            self.stats["acquires"] += 1
            if d["order"] not in ACQUIRE:
                self.fail(S_ORDER, ev, f"counter load is memory_order_{d['order']}, not acquire")
                return facts
            self.acquires[d["result"]] = ev
            self.last_acquire = ev.site()
            if any(a == 2 for a, _ in facts):
                self.fail(S_EVERY, ev, "a wait while the previous task's accesses are unsignalled")
            return frozenset((1, dirty) for _, dirty in facts)
        if d["op"] == "fetch_add":
            self.stats["releases"] += 1
            if d["order"] not in RELEASE:
                self.fail(
                    S_ORDER, ev, f"counter increment is memory_order_{d['order']}, not release"
                )
                return frozenset((0, False) for _ in facts)
            if not self.one_consumer(ev.guard):
                self.fail(
                    S_SIGNAL, ev, "the counter increment is not done by exactly one consumer thread"
                )
            for a, dirty in facts:
                if dirty:
                    self.fail(S_SIGNAL, ev, "signal not after a consumer barrier following the "
                              "task's writes (another thread's writes may still be in flight)")  # fmt: skip
                if a != 2:
                    self.fail(S_SIGNAL, ev, "signal without a completed wait before it")
            return frozenset({(0, False)})
        self.fail(S_ONLY, ev, f"counter atomic {d['op']}: only load (wait) and fetch_add (signal)")
        return facts

    def access(self, facts: frozenset, ev: Event) -> frozenset:
        p: Ptr = ev.data["ptr"]
        if p.space != "global":
            return facts
        if ev.kind == "read" and ev.data["via"] == "__ldg":
            return facts  # read-only data (weights): written by nobody during the launch
        if not self.consumer_only(ev.guard):
            self.fail(
                S_ACCESS, ev, f"the producer warp accesses {p.region} (only weights, via __ldg)"
            )
            return facts
        self.deferred.append((ev, facts))
        if ev.kind == "write":
            return frozenset((a, True) for a, _ in facts)
        return facts

    def judge(self, ev: Event, facts: frozenset) -> None:
        region = ev.data["ptr"].region
        for a, _ in facts:
            if a == 0:
                self.fail(S_ACCESS, ev, f"{ev.kind} of {region} with no counter wait before it in "
                          "the task (or after the task's signal)")  # fmt: skip
            elif a == 1:
                self.fail(S_WAIT, ev, f"{ev.kind} of {region} before a consumer barrier publishes "
                          f"the wait's acquire ({self.last_acquire}) to every consumer thread")  # fmt: skip

    def asm(self, facts: frozenset, ev: Event) -> frozenset:
        text: str = ev.data["text"]
        for v in ev.data["ops"]:
            if isinstance(v, Ptr) and v.space == "global" and self.is_counter(v):
                self.fail(S_ONLY, ev, f"asm on the counters: {text[:60]}")
        if ev.data["memory"] or not any(w in text for w in ("ld.", "st.", "atom", "red.")):
            return facts
        if ".global" in text:
            self.fail(S_ACCESS, ev, 'global memory asm without a "memory" clobber')
        return facts

    def loop_exit(self, entry: frozenset, iterated: frozenset) -> frozenset:
        # a loop whose every pass acquires (one per wait of the task) has acquired every wait,
        # vacuously so when it ran zero times
        new = iterated - entry
        if new and all(a == 1 for a, _ in new) and all(a == 0 for a, _ in entry):
            return new
        return entry | iterated


def check(unit: n.Unit) -> list[tuple[str, bool, str]]:
    """kernel.cu's synchronization, from one run of its entry: (check, ok, why) for each of
    `CHECKS` (the counter protocol) and of `races.CHECKS` (shared memory within a CTA)."""
    threads = _const(unit, "THREADS")
    proto = Protocol(threads=threads)
    shared = Races(threads, _const(unit, "BLOCK_THREADS"), _work_offset(unit))
    interp = _Recording(unit, Clients(proto, shared), proto)
    proto.interp = shared.interp = interp
    interp.run(ENTRY)
    regions = proto.counter_regions
    _finish(proto, interp)
    shared.judge(interp.loop_symbols)
    out = []
    for c in (*CHECKS, *races.CHECKS):
        errs = list({**proto.errors, **shared.errors}.get(c, {}))
        why = "; ".join(errs[:4]) + (f" (+{len(errs) - 4} more)" if len(errs) > 4 else "")
        out.append((c, not errs, why or _ok_why(c, proto, regions, shared)))
    # what was interpreted (no times: a report's checks are the same on every run)
    out.append(("synchronization interpreted", True,
                f"{ENTRY}: {proto.stats}, {len(shared.pairs)} shared-memory pairs"))  # fmt: skip
    return out


def _work_offset(unit: n.Unit) -> int:
    """Byte offset of the work area (Smem::f) in dynamic shared memory (amk.cuh's smem_plan)."""
    stages = _const(unit, "STAGES")
    return stages * _const(unit, "SLOT_BYTES") + 16 * stages


def _ok_why(c: str, proto: Protocol, regions: set[str], shared: Races) -> str:
    s = proto.stats
    return {
        races.RACE: f"{len(shared.pairs)} pair(s) of consumer accesses with no barrier between: "
        "no two threads touch a common byte",
        S_ORDER: f"{s['acquires']} acquire load(s), {s['releases']} release increment(s) on {sorted(regions)}",
        S_BARRIER: f"{s['barriers']} consumer barrier event(s), each bar.sync 1, THREADS by every consumer",
    }.get(c, "holds on every path of the consumer loop")


def _finish(proto: Protocol, interp: _Recording) -> None:
    for ev, facts in proto.deferred:  # judged once every counter region is known
        p = ev.data["ptr"]
        if proto.is_counter(p):
            proto.fail(S_ONLY, ev, f"plain {ev.kind} of the counters ({p.region})")
        else:
            proto.judge(ev, facts)
    if not proto.acquires:
        ev = Event("exit", True, ((ENTRY, 0),))
        proto.fail(S_WAIT, ev, "no counter acquire anywhere on the consumer path")
    for sym, ev in proto.acquires.items():
        if sym not in interp.loop_tests:
            proto.fail(S_WAIT, ev, "the acquired value decides no loop's exit (a wait must spin)")
    for ev, facts in interp.exits:
        if any(a == 2 for a, _ in facts):
            proto.fail(
                S_EVERY, ev, "a consumer path leaves the kernel with a task's accesses unsignalled"
            )
        if any(a == 1 for a, _ in facts):
            proto.fail(
                S_EVERY, ev, "a consumer path leaves the kernel after a wait, without its task"
            )


class _Recording(Interp):
    """Interp that also records the counter atomics and the kernel's exit states."""

    def __init__(self, unit: n.Unit, client: Clients, proto: Protocol) -> None:
        super().__init__(unit, client)
        self.clients = client
        self.atomics: list[Event] = []
        self.exits: list[tuple[Event, frozenset]] = []
        self.proto = proto

    def atomic(self, a, op, args, line, st):
        from verifier.device.sync_values import Order, fresh

        order = next((x.name for x in args if isinstance(x, Order)), "seq_cst")
        result = fresh(f"{op}@{line}", False)
        self.acquired.append(str(result))
        ev = Event("atomic", st.guard, self.where(line),
                   {"ptr": a.ptr, "op": op, "order": order, "scope": a.scope, "result": str(result)})  # fmt: skip
        self.atomics.append(ev)
        st.facts = self.client.event(st.facts, ev)
        return result

    def body(self, block, st):
        out = super().body(block, st)
        if len(self.chain) == 1:  # the kernel entry itself: every path that ends it
            for s, line in self.last_states:
                if self.proto.consumer_only(s.guard):
                    ev = Event("exit", s.guard, ((ENTRY, line),))
                    self.exits.append((ev, self.clients.part(s.facts, 0)))
        return out


def _const(unit: n.Unit, name: str) -> int:
    from verifier.device.exprs import ExprEval

    return ExprEval(unit).const(name)
