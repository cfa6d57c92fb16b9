"""An exponential moving average of a model's weights (timm's ModelEmaV2 rule).

    θ_ema ← d·θ_ema + (1 − d)·θ        for every floating-point entry of the state dict
                                       (BatchNorm running statistics included); integer
                                       buffers such as num_batches_tracked are copied.

The copy stays in eval mode. ADR's teacher and the weight-averaged ("WA") model are both this.
"""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    def __init__(self, model: nn.Module, decay: float):
        self.decay = decay
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        pairs = list(zip(self.module.state_dict().values(), model.state_dict().values(),
                         strict=True))
        ema_f = [e for e, _ in pairs if e.dtype.is_floating_point]
        new_f = [v for e, v in pairs if e.dtype.is_floating_point]
        if ema_f:  # one fused multi-tensor op for all floating entries: θ_e += (1−d)(θ − θ_e)
            torch._foreach_lerp_(ema_f, new_f, 1.0 - self.decay)
        for e, v in pairs:
            if not e.dtype.is_floating_point:
                e.copy_(v)

    def state_dict(self) -> dict:
        return self.module.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.module.load_state_dict(state)
