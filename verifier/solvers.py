"""Solver processes: every Z3 query runs in a child process under a wall clock as well as its
rlimit, and no child outlives the process that started it.

    with Solvers(jobs=2) as pool:
        for ob, answer in pool.map(obligations):
            ...

The rlimit is the deterministic budget: a query that proves, proves within it on any machine.
The wall clock is the safety net for what the rlimit does not count (Z3's nonlinear
arithmetic can spend many minutes in polynomial factorization while its resource counter
barely moves). Each query's budget is enforced twice: Z3's own `timeout` (the query ends as
unknown, "timeout"), and, `grace` seconds later, a SIGKILL of the child that still has not
answered (Z3 does not poll its timeout everywhere); a fresh child takes the next query.

A child dies with its parent: it asks Linux for SIGKILL on the parent's death
(PR_SET_PDEATHSIG), checks that the parent it was started by is still its parent (the
parent may have died before that call), and a watchdog thread polls the same every second
(other systems, and a parent thread that exits before its process). It ignores SIGINT, so a
terminal's ^C reaches only the parent, which kills its children on the way out.

The child is `python -m verifier.solvers PARENT_PID`; it imports nothing but z3. One request
per line on its stdin, one answer per line on its stdout, both JSON:
{"assumptions", "goal", "rlimit", "seconds"} -> {"answer", "used", "why", "values", "seconds"}
where answer is "vacuous" (assumptions unsat), "unsat" (proved), "sat" (with the model's
values) or "unknown" (with Z3's reason, and "on": "assumptions" when the first query gave up).
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from verifier.obligation import Obligation

GRACE = 5.0  # seconds between Z3's own timeout and the SIGKILL of a child that ignored it
PR_SET_PDEATHSIG = 1


class _Child:
    """One solver process and the query it is on."""

    def __init__(self) -> None:
        path = os.pathsep.join(p for p in sys.path if p)  # the child finds `verifier` as we do
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "verifier.solvers", str(os.getpid())],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=os.environ | {"PYTHONPATH": path},
            close_fds=True,
        )
        self.ob: Obligation | None = None
        self.deadline = 0.0
        self.started = 0.0

    def send(self, ob: Obligation, seconds: float, grace: float) -> None:
        assert self.proc.stdin is not None
        request = {"assumptions": ob.assumptions, "goal": ob.goal, "rlimit": ob.rlimit}
        self.ob, self.started = ob, time.monotonic()
        self.deadline = self.started + seconds + grace
        self.proc.stdin.write((json.dumps(request | {"seconds": seconds}) + "\n").encode())
        self.proc.stdin.flush()

    def receive(self) -> dict[str, Any] | None:
        """The answer to the query sent, None if the child died."""
        assert self.proc.stdout is not None
        try:
            answer = json.loads(self.proc.stdout.readline() or "null")
        except ValueError:  # not one of our lines: nothing it says can be trusted
            return None
        return answer if isinstance(answer, dict) else None

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                f.close()


class Solvers:
    """Up to `jobs` solver processes, started as needed and all killed on close (or at the
    end of a `with` block, however it ends). `seconds(ob)` is an obligation's wall-clock
    budget; `grace` how much longer a child may take before it is killed."""

    def __init__(
        self, jobs: int, seconds: Callable[[Obligation], float], grace: float = GRACE
    ) -> None:
        self.jobs, self.seconds, self.grace = max(1, jobs), seconds, grace
        self._idle: list[_Child] = []
        self._busy: list[_Child] = []

    def __enter__(self) -> Solvers:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        for child in self._idle + self._busy:
            child.kill()
        self._idle, self._busy = [], []

    def map(self, obs: Iterable[Obligation]) -> Iterator[tuple[Obligation, dict[str, Any]]]:
        """(obligation, answer) for each of `obs`, in the order they finish. A child killed
        at its deadline answers {"answer": "killed"}, one that died {"answer": "died"}."""
        todo = deque(obs)
        while todo or self._busy:
            while todo and len(self._busy) < self.jobs:
                child = self._idle.pop() if self._idle else _Child()
                first = todo.popleft()
                with contextlib.suppress(OSError):  # died before reading: EOF says so
                    child.send(first, float(self.seconds(first)), self.grace)
                self._busy.append(child)
            wait = max(0.0, min(c.deadline for c in self._busy) - time.monotonic())
            fds = [c.proc.stdout.fileno() for c in self._busy if c.proc.stdout]
            ready, _, _ = select.select(fds, [], [], wait)
            now = time.monotonic()
            for child in list(self._busy):
                ob = child.ob
                assert ob is not None
                if child.proc.stdout and child.proc.stdout.fileno() in ready:
                    answer = child.receive()
                elif now >= child.deadline:
                    child.kill()
                    answer = {"answer": "killed", "seconds": now - child.started}
                else:
                    continue
                self._busy.remove(child)
                if answer is None:  # EOF, or a line that is no answer (then it is killed)
                    try:
                        why = f"exit code {child.proc.wait(timeout=1.0)}"
                    except subprocess.TimeoutExpired:
                        why = "it wrote something that is not an answer"
                    child.kill()
                    answer = {"answer": "died", "why": why}
                elif answer["answer"] != "killed":
                    self._idle.append(child)
                answer.setdefault("seconds", now - child.started)
                yield ob, answer


# ---- the child -------------------------------------------------------------------------


def _die_with(parent: int) -> None:
    """Be killed when `parent` goes (see the module docstring)."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent:
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, daemon=True).start()


def _values(model: Any) -> dict[str, Any]:
    import z3

    out: dict[str, Any] = {}
    for d in model.decls():
        v = model[d]
        if z3.is_int_value(v):
            out[d.name()] = v.as_long()
        elif z3.is_rational_value(v):
            out[d.name()] = float(v.as_fraction())
        elif z3.is_algebraic_value(v):
            out[d.name()] = float(v.approx(20).as_fraction())
        elif z3.is_true(v) or z3.is_false(v):
            out[d.name()] = z3.is_true(v)
        else:
            out[d.name()] = str(v)
    return out


def _check(text: str, rlimit: int, ms: int) -> tuple[str, int, str, Any]:
    import z3

    ctx = z3.Context()
    s = z3.Solver(ctx=ctx)
    s.set("rlimit", rlimit)
    s.set("timeout", max(1, ms))
    s.add(z3.parse_smt2_string(text, ctx=ctx))
    answer = s.check()
    used = int(s.statistics().get_key_value("rlimit count"))
    why = s.reason_unknown() if answer == z3.unknown else ""
    return str(answer), used, why, s.model() if answer == z3.sat else None


def answer(request: dict[str, Any]) -> dict[str, Any]:
    """The two queries of an obligation (see `verifier.solve`), within request["seconds"]."""
    t0 = time.monotonic()
    ms = int(request["seconds"] * 1000)
    got, used, why, _ = _check(request["assumptions"], request["rlimit"], ms)
    if got != "sat":
        kind = "vacuous" if got == "unsat" else "unknown"
        out = {"answer": kind, "used": used, "why": why, "on": "assumptions"}
        return out | {"seconds": time.monotonic() - t0}
    left = ms - int((time.monotonic() - t0) * 1000)
    text = request["assumptions"] + request["goal"]
    got, used2, why, model = _check(text, request["rlimit"], left)
    out = {"answer": got, "used": used + used2, "why": why}
    if model is not None:
        out["values"] = _values(model)
    return out | {"seconds": time.monotonic() - t0}


def serve(parent: int) -> None:
    """Answer requests on stdin until it closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _die_with(parent)
    for line in sys.stdin.buffer:
        sys.stdout.write(json.dumps(answer(json.loads(line))) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    serve(int(sys.argv[1]))
