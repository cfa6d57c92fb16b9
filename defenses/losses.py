"""The loss part of a recipe: the training objective and the attack objective it implies.

- CE (Madry et al. 2018; FGSM-family AT):  L = CE(f(x_adv), y); the attack ascends CE.
- TRADES (Zhang et al. 2019):  L = CE(f(x), y) + β·(1/B)·Σ_i KL(p(x_i) ‖ p(x_adv,i)),
  where the attack ascends the same KL with p(x) fixed, the model in eval mode and a start of
  0.001·N(0, I), as in the official ``trades.py``. Gradients of the training loss flow through
  both f(x) and f(x_adv).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bulwark.attacks.objectives import Objective, cross_entropy, kl_to_clean


@dataclass
class LossOutput:
    loss: Tensor        # scalar
    logits_adv: Tensor  # f(x_adv)
    loss_adv: Tensor    # per-example CE at x_adv (for AAER and logging)


class CELoss:
    name = "ce"
    attack_eval_mode = False
    attack_start = "uniform"

    def attack_objective(self, model: nn.Module, x: Tensor, target: Tensor
                         ) -> tuple[Objective, Tensor]:
        return cross_entropy, target

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> LossOutput:
        logits = model(x_adv)
        per_ex = cross_entropy(logits, target)
        return LossOutput(per_ex.mean(), logits, per_ex)


class TradesLoss:
    name = "trades"
    attack_eval_mode = True
    attack_start = "normal"

    def __init__(self, beta: float):
        self.beta = beta

    def attack_objective(self, model: nn.Module, x: Tensor, target: Tensor
                         ) -> tuple[Objective, Tensor]:
        was_training = model.training
        model.eval()
        with torch.no_grad():
            p_clean = F.softmax(model(x).float(), dim=1)
        model.train(was_training)
        return kl_to_clean, p_clean

    def __call__(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> LossOutput:
        logits = model(x)
        logits_adv = model(x_adv)
        natural = cross_entropy(logits, target).mean()
        robust = F.kl_div(F.log_softmax(logits_adv.float(), dim=1),
                          F.softmax(logits.float(), dim=1), reduction="sum") / x.shape[0]
        return LossOutput(natural + self.beta * robust, logits_adv,
                          cross_entropy(logits_adv.detach(), target))


def build_loss(spec) -> CELoss | TradesLoss:
    if spec.kind == "ce":
        return CELoss()
    if spec.kind == "trades":
        return TradesLoss(spec.beta)
    raise ValueError(f"unknown loss kind {spec.kind!r}")
