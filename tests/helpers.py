"""Small shared test helpers (oracle models)."""

from __future__ import annotations

import numpy as np
import torch
from torch import nn


def linear_model(w: np.ndarray, b: np.ndarray) -> nn.Module:
    """logits = W·flatten(x) + b in float64, with the given W and b."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(w.shape[1], w.shape[0])).double()
    with torch.no_grad():
        model[1].weight.copy_(torch.from_numpy(w))
        model[1].bias.copy_(torch.from_numpy(b))
    return model
