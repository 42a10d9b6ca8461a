"""Run one obligation with Z3 and make a certificate of it.

Two queries in a fresh context each: the assumptions alone (must be sat: otherwise anything
would follow, and the obligation fails as vacuous), then assumptions and goal (unsat: proved;
sat: a counterexample, replayed concretely before it is believed; unknown or over the rlimit:
failed). The budget is Z3's deterministic `rlimit`, not a clock.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import z3

from verifier.obligation import Obligation
from verifier.replay import replay

Z3_VERSION = z3.get_full_version()


@dataclass(frozen=True)
class Result:
    status: str  # proved | failed | vacuous | unknown
    reason: str  # one line: why it failed ("" when proved)
    counterexample: dict[str, Any] = field(default_factory=dict)
    rlimit_used: int = 0
    seconds: float = 0.0
    z3_version: str = Z3_VERSION

    @property
    def proved(self) -> bool:
        return self.status == "proved"

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Result:
        return cls(**d)


def _check(text: str, rlimit: int) -> tuple[z3.CheckSatResult, z3.ModelRef | None, int, str]:
    ctx = z3.Context()
    s = z3.Solver(ctx=ctx)
    s.set("rlimit", rlimit)
    s.add(z3.parse_smt2_string(text, ctx=ctx))
    answer = s.check()
    used = int(s.statistics().get_key_value("rlimit count"))
    model = s.model() if answer == z3.sat else None
    return answer, model, used, s.reason_unknown() if answer == z3.unknown else ""


def _values(model: z3.ModelRef) -> dict[str, Any]:
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


def run(ob: Obligation) -> Result:
    """Prove `ob` (see the module docstring)."""
    t0 = time.perf_counter()
    answer, _, used, why = _check(ob.assumptions, ob.rlimit)
    if answer != z3.sat:
        reason = "assumptions unsatisfiable" if answer == z3.unsat else f"assumptions: {why}"
        status = "vacuous" if answer == z3.unsat else "unknown"
        return Result(status, reason, rlimit_used=used, seconds=time.perf_counter() - t0)
    answer, model, used2, why = _check(ob.assumptions + ob.goal, ob.rlimit)
    used += used2
    seconds = time.perf_counter() - t0
    if answer == z3.unsat:
        return Result("proved", "", rlimit_used=used, seconds=seconds)
    if answer == z3.unknown:
        return Result("unknown", f"solver gave up: {why}", rlimit_used=used, seconds=seconds)
    assert model is not None
    values = _values(model)
    confirmed, reason = replay(ob, values)
    if not confirmed:  # the encoding and the facts disagree: a verifier bug, never a proof
        reason = f"counterexample not confirmed by the replay: {reason}"
    return Result("failed", reason, values, used, seconds)
