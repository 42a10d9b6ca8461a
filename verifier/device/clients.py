"""Several `verifier.device.interp` clients over one interpreter run.

The run costs the most of a check, so the counter protocol, the shared-memory races and the ring
follow the same walk: `Clients` tags each client's facts with its index and hands every client
its own part of the state.
"""

from __future__ import annotations

from verifier.device.interp import Client, Event


class Clients(Client):
    """The product of `parts`: facts are (index, fact) pairs."""

    def __init__(self, *parts: Client) -> None:
        self.parts = parts

    def part(self, facts: frozenset, i: int) -> frozenset:
        """Client i's facts."""
        return frozenset(f for k, f in facts if k == i)

    def _each(self, facts: frozenset, step) -> frozenset:
        out: set = set()
        for i, c in enumerate(self.parts):
            out |= {(i, f) for f in step(c, self.part(facts, i))}
        return frozenset(out)

    def event(self, facts: frozenset, ev: Event) -> frozenset:
        return self._each(facts, lambda c, f: c.event(f, ev))

    def loop_exit(self, entry: frozenset, iterated: frozenset) -> frozenset:
        out: set = set()
        for i, c in enumerate(self.parts):
            out |= {(i, f) for f in c.loop_exit(self.part(entry, i), self.part(iterated, i))}
        return frozenset(out)

    def back_edge(self, loop: tuple, facts: frozenset) -> frozenset:
        return self._each(facts, lambda c, f: c.back_edge(loop, f))
