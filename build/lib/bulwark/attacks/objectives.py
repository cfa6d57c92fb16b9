"""Per-example objectives an attack ascends: ``objective(logits, target) -> loss [B]``."""

from __future__ import annotations

from collections.abc import Callable

import torch.nn.functional as F
from torch import Tensor

Objective = Callable[[Tensor, Tensor], Tensor]


def cross_entropy(logits: Tensor, target: Tensor) -> Tensor:
    """CE per example; ``target`` is class indices [B] or probabilities [B, K] (soft labels)."""
    return F.cross_entropy(logits.float(), target, reduction="none")


def kl_to_clean(logits: Tensor, p_clean: Tensor) -> Tensor:
    """TRADES' attack objective: KL(p_clean ‖ softmax(logits)) per example."""
    return F.kl_div(F.log_softmax(logits.float(), dim=1), p_clean, reduction="none").sum(dim=1)


def dlr(logits: Tensor, target: Tensor) -> Tensor:
    """Croce & Hein 2020's untargeted Difference of Logits Ratio per example:

        DLR(z, y) = −(z_y − max_{j≠y} z_j) / (z_π1 − z_π3)        (π: logits sorted descending)

    Invariant to the logits' shift and scale, so its gradient does not vanish where a
    saturated softmax zeroes cross-entropy's (gradient masking). Needs ≥ 3 classes."""
    z = logits.float()
    top = z.topk(3, dim=1).values
    z_y = z.gather(1, target[:, None]).squeeze(1)
    other = z.scatter(1, target[:, None], float("-inf")).amax(dim=1)
    return -(z_y - other) / (top[:, 0] - top[:, 2] + 1e-12)
