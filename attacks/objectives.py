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
