"""AAER (Lin, Yu, Liu, NeurIPS 2023): Abnormal Adversarial Examples Regularization.

With x' = clip(x + η) the noisy start and x'' the single-step adversarial example,
ℓ_b = CE(f(x'), y) and ℓ_a = CE(f(x''), y) per example. An abnormal adversarial example (AAE)
is one whose ascent step *lowered* the loss: ℓ_a < ℓ_b. With m AAEs in a batch of B:

    R = λ1·(m/B)·[ λ2·CE_var + λ3·max(V_A − V_N, 0) ]
    CE_var = mean_AAE(ℓ_b − ℓ_a),   V_A / V_N = mean over AAEs / NAEs of ‖z(x'') − z(x')‖²₂

and R applies only when the batch has both AAEs and NAEs.

Gradient flow (``gradient='official'``, the default, as ``CIFAR10/AAER.py``): ℓ_b, ℓ_a, z(x')
and V_N are detached, so m/B and λ2·CE_var are constants and the only gradient is
λ1·λ3·(m/B)·∇V_A when V_A > V_N. ``gradient='paper'`` keeps ℓ_a attached in CE_var, the literal
reading of the formula. No extra forward pass: f(x') comes from the attack's own forward and
f(x'') from the training forward. Computed without host synchronization.
"""

from __future__ import annotations

import torch
from torch import Tensor

from bulwark.defenses.context import Regularizer, StepContext


def abnormal_mask(loss_before: Tensor, loss_after: Tensor) -> Tensor:
    """True where the adversarial step lowered the loss (an AAE)."""
    return loss_after.detach() < loss_before.detach()


class AAER(Regularizer):
    def __init__(self, spec):
        self.lam1, self.lam2, self.lam3 = spec.lam1, spec.lam2, spec.lam3
        self.paper_gradient = spec.gradient == "paper"

    def __call__(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if ctx.start is None:
            raise ValueError("AAER needs a single-step adversary (fgsm, fgsm_rs, n_fgsm)")
        loss_b = ctx.start.loss_init
        loss_a = ctx.loss_adv if self.paper_gradient else ctx.loss_adv.detach()
        aae = abnormal_mask(loss_b, ctx.loss_adv).to(loss_b.dtype)
        nae = 1 - aae
        m, n_nae = aae.sum(), nae.sum()
        batch = loss_b.shape[0]
        v = (ctx.logits_adv.float() - ctx.start.logits_init.float()).pow(2).sum(dim=1)
        v_a = (v * aae).sum() / m.clamp_min(1)
        v_n = ((v * nae).sum() / n_nae.clamp_min(1)).detach()
        ce_var = ((loss_b - loss_a) * aae).sum() / m.clamp_min(1)
        active = ((m > 0) & (n_nae > 0)).to(v.dtype)
        reg = active * self.lam1 * (m / batch) * (
            self.lam2 * ce_var + self.lam3 * torch.relu(v_a - v_n))
        return reg, {"aaer_ratio": (m / batch).detach(), "aaer_reg": reg.detach()}
