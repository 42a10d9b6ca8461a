"""What one symbolic thread of a task body does that the obligations judge
(`verifier.device.execute`): its global stores and loads, the traps it may reach, the strided
loops it summarized, and the control transfers of the statements being executed."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from verifier.terms import Aff, Term


@dataclass(frozen=True)
class Store:
    array: str
    offset: Aff  # flat, in elements of the array
    value: Any
    guard: Term
    line: int
    function: str
    loop: str  # the strided loop's index symbol, "" outside one


@dataclass(frozen=True)
class Load:
    array: str
    offset: Aff
    guard: Term
    line: int
    loop: str


@dataclass(frozen=True)
class Trap:
    guard: Term  # the path condition under which __trap() runs
    line: int
    function: str


@dataclass(frozen=True)
class Strided:
    symbol: str
    count: int  # iterations over all threads: the symbol ranges over [0, count)
    line: int
    function: str


class _Return(Exception):
    def __init__(self, value: Any):
        self.value = value


class _Break(Exception):
    pass


class _Continue(Exception):
    pass
