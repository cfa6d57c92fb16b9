"""The adversary part of a recipe: which input the training loss is taken at."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bulwark.attacks import FGSM, FGSM_RS, N_FGSM, PGD, shard
from bulwark.attacks.objectives import Objective
from bulwark.attacks.single_step import SingleStep, SingleStepResult


@dataclass
class AdversaryOutput:
    x_adv: Tensor
    start: SingleStepResult | None = None


class Adversary:
    """Builds x_adv for a batch: ``adversary(model, x, target, objective, eval_mode)``."""

    def __init__(self, spec, eps: float, norm: str):
        self.spec, self.eps, self.norm = spec, eps, norm

    def _attack(self, model: nn.Module, objective: Objective, start: str):
        s, eps, norm = self.spec, self.eps, self.norm
        if s.kind == "fgsm":
            return FGSM(model, eps, alpha=s.alpha, norm=norm, objective=objective,
                        clip_adv=s.clip_adv)
        if s.kind == "fgsm_rs":
            return FGSM_RS(model, eps, alpha=s.alpha, norm=norm, objective=objective,
                           clip_start=s.clip_start, clip_adv=s.clip_adv)
        if s.kind == "n_fgsm":
            return N_FGSM(model, eps, k=s.k, alpha=s.alpha, norm=norm, objective=objective,
                          clip_start=s.clip_start, clip_adv=s.clip_adv)
        if s.kind == "pgd":
            return PGD(model, eps, alpha=s.alpha * eps, steps=s.steps, restarts=s.restarts,
                       start=start if s.random_start else "zero", norm=norm, objective=objective)
        raise ValueError(f"unknown adversary kind {s.kind!r}")

    def __call__(self, model: nn.Module, x: Tensor, target: Tensor, objective: Objective,
                 *, eval_mode: bool = False, start: str = "uniform") -> AdversaryOutput:
        if self.spec.kind == "none":
            return AdversaryOutput(x)
        if self.spec.kind == "gaussian":  # Cohen et al.: pixel space, before normalization
            return AdversaryOutput(x + self.spec.sigma * shard.normal(x))
        attack = self._attack(model, objective, start)
        was_training = model.training
        if eval_mode:
            model.eval()
        try:
            if isinstance(attack, SingleStep):
                res = attack.perturb(x, target)
                return AdversaryOutput(res.x_adv, res)
            return AdversaryOutput(attack(x, target))
        finally:
            model.train(was_training)
