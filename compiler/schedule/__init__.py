"""Scheduler: fused instructions -> tasks on per-SM queues with (counter, target) dependencies."""

from compiler.schedule.build import build_schedule
from compiler.schedule.interpret import interpret

__all__ = ["build_schedule", "interpret"]
