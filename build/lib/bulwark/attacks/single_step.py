"""Single-step attacks: one signed-gradient step from a (possibly noisy) start.

    x' = clip_[0,1](x + η),            η ~ U[-kε, kε]        (k = 0: FGSM; clip optional: FGSM-RS)
    x'' = clip_[0,1](x + Π(x' - x + α·sign(∇ℓ(x'))))    Π = projection onto the ε-ball, or none
                                                        (the clip optional: ELLE's code omits it)

| attack  | k | α     | Π   |
|---------|---|-------|-----|
| FGSM    | 0 | ε     | n/a |
| FGSM-RS | 1 | 1.25ε | yes |
| N-FGSM  | 2 | ε     | no  |   (‖x'' − x‖∞ ≤ (k+1)ε)

The input gradient is taken with ``torch.autograd.grad`` with respect to the input only, so no
weight gradients are computed for the attack pass. The model runs in whatever mode the caller
left it in: training attacks run in train mode (BatchNorm uses and updates batch statistics,
as in the reference codes); evaluation attacks are in ``bulwark.attacks.evaluation`` (eval mode).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from bulwark.attacks.norms import get_norm
from bulwark.attacks.objectives import Objective, cross_entropy


@dataclass
class SingleStepResult:
    x_adv: Tensor       # x'', detached
    x_init: Tensor      # x' (the noisy start), detached
    logits_init: Tensor  # f(x'), detached
    loss_init: Tensor   # ℓ(f(x'), y) per example, detached
    grad_init: Tensor   # ∇_x ℓ at x', detached
    noisy: bool         # False when x' = x (FGSM): then grad_init is the clean input gradient


def input_gradient(model: nn.Module, x: Tensor, target: Tensor, objective: Objective,
                   create_graph: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """(∇_x Σ ℓ, logits, per-example ℓ) at x; only the input gradient is computed."""
    x = x.detach().requires_grad_(True)
    logits = model(x)
    loss = objective(logits, target)
    (grad,) = torch.autograd.grad(loss.sum(), x, create_graph=create_graph)
    return grad, logits, loss


class SingleStep:
    """One ascent step of size α·ε from x + U[-kε, kε], optionally projected onto the ε-ball."""

    def __init__(self, model: nn.Module, eps: float, *, k: float, alpha: float, project: bool,
                 norm: str = "linf", objective: Objective = cross_entropy,
                 clip_start: bool = True, clip_adv: bool = True):
        self.model, self.eps, self.k, self.alpha, self.project = model, eps, k, alpha, project
        self.clip_start, self.clip_adv = clip_start, clip_adv
        self.geometry = get_norm(norm)
        self.objective = objective

    def perturb(self, x: Tensor, target: Tensor) -> SingleStepResult:
        g = self.geometry
        x = x.detach()
        if self.k == 0:
            x_init = x
        else:
            x_init = x + g.uniform(x, self.k * self.eps)
            if self.clip_start:
                x_init = x_init.clamp(0, 1)
        grad, logits, loss = input_gradient(self.model, x_init, target, self.objective)
        delta = x_init - x + self.alpha * self.eps * g.ascent(grad)
        if self.project:
            delta = g.project(delta, self.eps)
        x_adv = x + delta
        if self.clip_adv:
            x_adv = x_adv.clamp(0, 1)
        return SingleStepResult(x_adv.detach(), x_init, logits.detach(), loss.detach(),
                                grad.detach(), self.k != 0)

    def __call__(self, x: Tensor, target: Tensor) -> Tensor:
        return self.perturb(x, target).x_adv


def FGSM(model: nn.Module, eps: float, *, alpha: float = 1.0, norm: str = "linf",
         objective: Objective = cross_entropy, clip_adv: bool = True) -> SingleStep:
    """FGSM (Goodfellow et al. 2015): zero init, step α = ε. ``clip_adv=False`` leaves x'' as
    the step leaves it (ELLE's official code), not clipped to the image box."""
    return SingleStep(model, eps, k=0.0, alpha=alpha, project=True, norm=norm, objective=objective,
                      clip_adv=clip_adv)


def FGSM_RS(model: nn.Module, eps: float, *, alpha: float = 1.25, norm: str = "linf",
            objective: Objective = cross_entropy, clip_start: bool = True,
            clip_adv: bool = True) -> SingleStep:
    """RS-FGSM (Wong et al. 2020): η ~ U[-ε, ε], step 1.25ε, projected. ``clip_start=False``
    takes the gradient at the unclipped x + η, as their MNIST code does (their CIFAR-10 code
    clips the start to the image box first)."""
    return SingleStep(model, eps, k=1.0, alpha=alpha, project=True, norm=norm, objective=objective,
                      clip_start=clip_start, clip_adv=clip_adv)


def N_FGSM(model: nn.Module, eps: float, *, k: float = 2.0, alpha: float = 1.0,
           norm: str = "linf", objective: Objective = cross_entropy,
           clip_start: bool = True, clip_adv: bool = True) -> SingleStep:
    """N-FGSM (de Jorge et al. 2022): η ~ U[-kε, kε], step ε, no projection; their code clips
    the start to the image box (``clip_start=False`` does not)."""
    return SingleStep(model, eps, k=k, alpha=alpha, project=False, norm=norm, objective=objective,
                      clip_start=clip_start, clip_adv=clip_adv)
