"""Projected gradient descent (Madry et al. 2018) for ℓ∞ and ℓ2, with random restarts.

    δ⁰ ~ start;  δᵗ⁺¹ = Π_ε( clip_[0,1](x + δᵗ + α·ascent(∇ℓ(x + δᵗ))) − x )

Each restart draws a fresh start; per example the restart with the highest final objective is
kept (the worst case for the model). Used for training (PGD-AT, TRADES' KL attack) and the
per-epoch monitor; the final evaluation suite uses torchattacks (``bulwark.attacks.evaluation``).
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

from bulwark.attacks import shard
from bulwark.attacks.norms import get_norm
from bulwark.attacks.objectives import Objective, cross_entropy
from bulwark.attacks.single_step import input_gradient

Start = Literal["uniform", "normal", "zero"]


class PGD:
    def __init__(self, model: nn.Module, eps: float, *, alpha: float, steps: int,
                 restarts: int = 1, start: Start = "uniform", norm: str = "linf",
                 objective: Objective = cross_entropy):
        """``alpha`` is the absolute step size; ``start='normal'`` is TRADES' 0.001·N(0, I)."""
        self.model, self.eps, self.alpha, self.steps = model, eps, alpha, steps
        self.restarts, self.start = restarts, start
        self.geometry = get_norm(norm)
        self.objective = objective

    def _start(self, x: Tensor) -> Tensor:
        if self.start == "uniform":
            return self.geometry.uniform(x, self.eps)
        if self.start == "normal":
            return self.geometry.project(0.001 * shard.normal(x), self.eps)
        return torch.zeros_like(x)

    def _run(self, x: Tensor, target: Tensor) -> Tensor:
        g = self.geometry
        x_adv = (x + self._start(x)).clamp(0, 1)
        for _ in range(self.steps):
            grad, _, _ = input_gradient(self.model, x_adv, target, self.objective)
            x_adv = x_adv.detach() + self.alpha * g.ascent(grad)
            x_adv = (x + g.project(x_adv - x, self.eps)).clamp(0, 1)
        return x_adv.detach()

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        x = x.detach()
        best = self._run(x, target)
        if self.restarts == 1:
            return best
        with torch.no_grad():
            best_loss = self.objective(self.model(best), target)
        for _ in range(self.restarts - 1):
            cand = self._run(x, target)
            with torch.no_grad():
                loss = self.objective(self.model(cand), target)
            better = loss > best_loss
            best = torch.where(better.view(-1, *([1] * (x.dim() - 1))), cand, best)
            best_loss = torch.maximum(loss, best_loss)
        return best
