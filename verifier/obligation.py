"""Obligations: self-contained, serializable proof jobs, and their structural cache key.

An obligation is one SMT query in SMT-LIB2 text: `assumptions` (what the artifact and the model
say) and `goal` (the negation of the claim). It is proved when the assumptions alone are
satisfiable (the query is not vacuous) and assumptions plus goal are unsatisfiable. A farm
worker needs nothing but the JSON form to run it (`verifier.solve.run`).

`data` holds the concrete facts the query was built from (boxes, waits, queue orders), so a
satisfiable answer can be replayed without the solver (`verifier.replay`): only a counterexample
that the replay confirms is reported as one.

`key` is the sha256 of the class, the check name and the query text, nothing else: the layer
number, task ids and human-readable subject are labels outside the key, so identical layers
(whose queries are the same text, since task and counter numbers are local to the query) share
one proof, and any change to the query text changes the key.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from typing import Any

CLASSES = {
    "a": "fusion rules",
    "b": "index maps",
    "c": "schedule",
    "d": "split reductions",
    "e": "attention",
    "f": "pointwise algebra",
    "g": "determinism",
    "h": "cross-step state",
    "i": "artifact integrity",
}
RLIMIT = 20_000_000  # Z3 resource units per query (deterministic, unlike a time limit)...
RLIMIT_PER_CHAR = 5  # ... plus this much per character of query text (a 70B step's deadlock
# query is 16 MB of text and needs ~48 M units)


def budget(*texts: str) -> int:
    """The rlimit of a query: a fixed part plus a part proportional to its size."""
    return RLIMIT + RLIMIT_PER_CHAR * sum(len(t) for t in texts)


@dataclass(frozen=True)
class Obligation:
    cls: str  # a key of CLASSES
    check: str  # what is claimed, e.g. "one writer per element"
    layer: int  # -1 outside the layers
    subject: str  # e.g. "QKV_ROPE_APPEND k_cache.3"
    assumptions: str  # SMT-LIB2: declarations and asserted facts
    goal: str  # SMT-LIB2: the asserted negation of the claim
    data: dict[str, Any] = field(default_factory=dict)  # concrete facts for the replay
    tasks: tuple[int, ...] = ()  # schedule task ids involved (for the report)
    rlimit: int = 0  # 0: budget(assumptions, goal)

    def __post_init__(self) -> None:
        if not self.rlimit:
            object.__setattr__(self, "rlimit", budget(self.assumptions, self.goal))

    @property
    def key(self) -> str:
        text = json.dumps([self.cls, self.check, self.assumptions, self.goal, self.rlimit])
        return hashlib.sha256(text.encode()).hexdigest()

    @property
    def name(self) -> str:
        return name_of(self.cls, self.check, self.subject, self.layer)

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["tasks"] = list(self.tasks)
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> Obligation:
        return cls(**(d | {"tasks": tuple(d.get("tasks", ()))}))


def name_of(cls: str, check: str, subject: str, layer: int) -> str:
    """How a report names an obligation: "(c) no deadlock: ..., layer 3"."""
    where = f"layer {layer}" if layer >= 0 else "outside the layers"
    return f"({cls}) {check}: {subject}, {where}"
