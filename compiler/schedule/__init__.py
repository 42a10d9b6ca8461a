"""Scheduler: fused instructions -> tasks on per-SM queues with (counter, target) dependencies."""
