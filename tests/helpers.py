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


def report_doc(**parts) -> dict:
    """A minimal report.json that the typed ``Report`` reads, with ``parts`` in place of its
    fields (``dataset`` merged into the default one); what a test does not set stays empty."""
    doc = {"report_version": 1, "spec": {}, "environment": {},
           "dataset": {"name": "mnist", "num_classes": 10, "train": 100, "validation": 0,
                       "test": 100, "monitor": 0, "shape": [1, 28, 28]},
           "history": [], "events": [], "final": {"clean_acc": 0.0, "n": 0, "attacks": {}}}
    for key, value in parts.items():
        doc[key] = {**doc[key], **value} if key == "dataset" else value
    return doc


def history_row(epoch: int, **fields) -> dict:
    """One epoch of a report's history with the required fields filled."""
    return {"epoch": epoch, "lr": 0.0, "train_loss": 0.0, "train_acc": 0.0, "seconds": 0.0,
            "train_seconds": 0.0, **fields}
