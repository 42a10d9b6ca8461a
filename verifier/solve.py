"""Run obligations with Z3 and judge the answers.

Two queries in a fresh context each: the assumptions alone (must be sat: otherwise anything
would follow, and the obligation fails as vacuous), then assumptions and goal (unsat: proved;
sat: a counterexample, replayed concretely before it is believed; unknown: failed).

Two budgets bound an obligation (`verifier.solvers` runs it in a child process): Z3's
deterministic `rlimit` (`Obligation.rlimit`), which decides every proof, and a wall clock,
`wall_seconds(ob)` unless given, a safety net for what the rlimit does not count (nonlinear
arithmetic stuck in factorization). The wall clock is set so that the rlimit ends a query
first at any rate seen here: WALL plus the time to spend the whole rlimit at RATE units per
second, a quarter of the slowest rate measured on nonlinear (f) queries (~1 M/s). A failed
query's `limit` says which budget ended it: "rlimit", "wall clock" (Z3 stopped at its
timeout) or "wall clock, killed" (it did not; the child was killed `GRACE` seconds later).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import z3

from verifier.obligation import Obligation
from verifier.replay import replay
from verifier.solvers import GRACE, Solvers

Z3_VERSION = z3.get_full_version()
WALL = 30.0  # seconds every obligation gets on the wall clock...
RATE = 250_000  # ... plus its rlimit at this many units per second (20 M units: 80 s more)


def wall_seconds(ob: Obligation) -> float:
    """The wall-clock budget of `ob` (see the module docstring)."""
    return WALL + ob.rlimit / RATE


@dataclass(frozen=True)
class Result:
    status: str  # proved | failed | vacuous | unknown
    reason: str  # one line: why it failed ("" when proved)
    counterexample: dict[str, Any] = field(default_factory=dict)
    rlimit_used: int = 0
    seconds: float = 0.0
    z3_version: str = Z3_VERSION
    limit: str = ""  # the budget that ended an unknown query: rlimit | wall clock[, killed]

    @property
    def proved(self) -> bool:
        return self.status == "proved"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        return cls(**d)


def _unknown(where: str, answer: dict[str, Any], ob: Obligation, budget: float) -> Result:
    why, used, seconds = answer.get("why", ""), answer.get("used", 0), answer["seconds"]
    if answer["answer"] == "killed":
        limit = "wall clock, killed"
        why = f"wall-clock budget of {budget:.0f}s spent; Z3 ignored its timeout and was killed"
    elif answer["answer"] == "died":
        limit, why = "", f"the solver process died ({why})"
    elif "resource limit" in why:
        limit, why = "rlimit", f"rlimit of {ob.rlimit} units spent"
    elif why in ("timeout", "canceled"):
        limit, why = "wall clock", f"wall-clock budget of {budget:.0f}s spent ({why})"
    else:
        limit = ""
    return Result("unknown", f"{where}: {why}", rlimit_used=used, seconds=seconds, limit=limit)


def judge(ob: Obligation, answer: dict[str, Any], budget: float) -> Result:
    """The result of `ob` from a solver child's `answer` (`verifier.solvers`)."""
    kind, used, seconds = answer["answer"], answer.get("used", 0), answer["seconds"]
    if kind == "vacuous":
        return Result("vacuous", "assumptions unsatisfiable", rlimit_used=used, seconds=seconds)
    if kind == "unsat":
        return Result("proved", "", rlimit_used=used, seconds=seconds)
    if kind != "sat":
        where = "assumptions" if answer.get("on") == "assumptions" else "solver gave up"
        return _unknown(where, answer, ob, budget)
    values = answer["values"]
    confirmed, reason = replay(ob, values)
    if not confirmed:  # the encoding and the facts disagree: a verifier bug, never a proof
        reason = f"counterexample not confirmed by the replay: {reason}"
    return Result("failed", reason, values, used, seconds)


def prove_all(
    obs: Iterable[Obligation], jobs: int = 1, seconds: float | None = None, grace: float = GRACE
) -> Iterator[tuple[Obligation, Result]]:
    """(obligation, result) of each of `obs` as they finish, on `jobs` solver processes, each
    obligation within `seconds` on the wall clock (None: `wall_seconds`)."""

    def budget(ob: Obligation) -> float:
        return wall_seconds(ob) if seconds is None else seconds

    with Solvers(jobs, budget, grace) as pool:
        for ob, answer in pool.map(obs):
            yield ob, judge(ob, answer, budget(ob))


def run(ob: Obligation, seconds: float | None = None) -> Result:
    """Prove `ob` (see the module docstring) in a solver process of its own."""
    ((_, result),) = prove_all([ob], 1, seconds)  # the pool closes with the generator
    return result
