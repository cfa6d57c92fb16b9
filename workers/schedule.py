"""Learning-rate schedules as pure functions of the fractional epoch t ∈ [0, epochs].

The runner sets the lr before every iteration, so a resumed run needs only the step count.
- cyclic (the fast-AT recipe; torch CyclicLR in the papers' code): 0 → lr_max at ``peak`` of
  the run → 0, linear, per iteration.
- piecewise: lr_max, multiplied by γ at each milestone (fractions of the run).
- cosine: lr_max·½(1 + cos(π t / T)).
- constant: lr_max.
"""

from __future__ import annotations

import math


def lr_at(schedule, t: float, epochs: int) -> float:
    frac = min(max(t / epochs, 0.0), 1.0)
    if schedule.kind == "constant":
        return schedule.lr_max
    if schedule.kind == "cyclic":
        p = schedule.peak
        up = frac / p if frac <= p else (1.0 - frac) / (1.0 - p)
        return schedule.lr_max * up
    if schedule.kind == "piecewise":
        passed = sum(1 for m in schedule.milestones if frac >= m)
        return schedule.lr_max * schedule.gamma ** passed
    if schedule.kind == "cosine":
        return schedule.lr_max * 0.5 * (1.0 + math.cos(math.pi * frac))
    raise ValueError(f"unknown lr schedule {schedule.kind!r}")
