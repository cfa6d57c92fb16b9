"""A recipe composes the parts of one training step (DESIGN.md):

    target  = labels(x, y)                      hard labels (ADR soft labels: next issue)
    x_adv   = adversary(model, x, target)       none | fgsm | fgsm_rs | n_fgsm | pgd
    L       = loss(model, x, x_adv, target)     ce | trades
    L      += Σ regularizer(ctx)                elle | elle_a | aaer | gradalign

``Recipe.step`` returns the scalar loss to backpropagate plus detached per-step metrics
(device tensors; the runner sums them and synchronizes once per epoch). After the optimizer
step the runner calls ``after_step`` (stateful parts such as ELLE-A's λ controller).
Weight perturbation (AWP) hooks in around ``loss`` in the next issue.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from defenses.aaer import AAER
from defenses.adversary import Adversary
from defenses.context import Regularizer, StepContext
from defenses.elle import ELLE, ELLEA
from defenses.gradalign import GradAlign
from defenses.losses import build_loss

REGULARIZERS: dict[str, type[Regularizer]] = {
    "elle": ELLE, "elle_a": ELLEA, "aaer": AAER, "gradalign": GradAlign,
}


@dataclass
class StepOutput:
    loss: Tensor
    logits: Tensor                      # f(x_adv), for training accuracy
    metrics: dict[str, Tensor] = field(default_factory=dict)


class Recipe:
    def __init__(self, spec, *, eps: float, norm: str):
        self.spec, self.eps, self.norm = spec, eps, norm
        self.adversary = Adversary(spec.adversary, eps, norm)
        self.loss = build_loss(spec.loss)
        self.regularizers = {r.kind: REGULARIZERS[r.kind](r) for r in spec.regularizers}

    @property
    def optimizer_steps(self) -> int:
        """1, or 2 when a regularizer asks for the official ELLE code's repeated step."""
        return 2 if any(r.double_step for r in self.regularizers.values()) else 1

    def labels(self, model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
        return y

    def step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        target = self.labels(model, x, y)
        objective, attack_target = self.loss.attack_objective(model, x, target)
        adv = self.adversary(model, x, attack_target, objective,
                             eval_mode=self.loss.attack_eval_mode, start=self.loss.attack_start)
        out = self.loss(model, x, adv.x_adv, target)
        loss, metrics = out.loss, {"loss_main": out.loss.detach()}
        if self.regularizers:
            ctx = StepContext(model, x, target, self.eps, self.norm, adv.x_adv, out.logits_adv,
                              out.loss_adv, adv.start)
            for reg in self.regularizers.values():
                term, m = reg(ctx)
                loss = loss + term
                metrics.update(m)
        return StepOutput(loss, out.logits_adv, metrics)

    def after_step(self) -> None:
        for reg in self.regularizers.values():
            reg.after_step()

    def state_dict(self) -> dict:
        return {k: r.state_dict() for k, r in self.regularizers.items()}

    def load_state_dict(self, state: dict) -> None:
        for k, r in self.regularizers.items():
            r.load_state_dict(state.get(k, {}))
