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


def epsilon_at(epsilon: float, warmup: float, t: float) -> float:
    """Training ε at fractional epoch t: a linear ramp 0 → ε over ``warmup`` epochs, then ε."""
    if warmup <= 0:
        return epsilon
    return epsilon * min(max(t / warmup, 0.0), 1.0)


def warmed_up(epoch: int, warmup: float) -> bool:
    """Whether training ε has reached the threat's ε by the end of epoch ``epoch`` (1-based):
    the watchdog judges only such epochs. Before that the monitor attacks at an ε the model
    is not trained at yet, and PGD far under FGSM there is the warm-up, not an overfit."""
    return epoch >= warmup


def build_optimizer(params, schedule):
    """The optimizer of ``schedule.optimizer``; its lr is set by the runner every iteration."""
    import torch

    if schedule.optimizer == "adam":
        return torch.optim.Adam(params, lr=0.0, weight_decay=schedule.weight_decay)
    return torch.optim.SGD(params, lr=0.0, momentum=schedule.momentum,
                           weight_decay=schedule.weight_decay, nesterov=schedule.nesterov)
