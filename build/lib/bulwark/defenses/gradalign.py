"""GradAlign (Andriushchenko & Flammarion, NeurIPS 2020), the double-backprop baseline.

    R = λ·(1 − mean_i cos(∇_x ℓ(x_i), ∇_x ℓ(x_i + η_i))),   η ~ U[-ε, ε]^d

The first gradient is a constant; the second is built with ``create_graph=True`` so R can be
differentiated with respect to the weights (double backprop). With a zero-init FGSM adversary
the attack already computed ∇_x ℓ(x) on the same model and labels, and it is reused (exactly
the same tensor the official code recomputes). As in the official code, x + η is not clipped.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from bulwark.attacks.norms import get_norm
from bulwark.attacks.objectives import cross_entropy
from bulwark.attacks.single_step import input_gradient
from bulwark.defenses.context import Regularizer, StepContext


class GradAlign(Regularizer):
    def __init__(self, spec):
        self.lam = spec.lam

    def __call__(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.start is not None and not ctx.start.noisy:
            g1 = ctx.start.grad_init
        else:
            g1 = input_gradient(ctx.model, ctx.x, ctx.target, cross_entropy)[0].detach()
        eta = get_norm(ctx.norm).uniform(ctx.x, ctx.eps)
        g2 = input_gradient(ctx.model, ctx.x + eta, ctx.target, cross_entropy,
                            create_graph=True)[0]
        cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
        reg = self.lam * (1 - cos.mean())
        return reg, {"gradalign_cos": cos.mean().detach()}
