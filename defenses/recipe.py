"""A recipe composes the parts of one training step (docs/spec.md, `recipe`; docs/methods.md):

    target  = labels(x, y)                      hard | adr (rectified soft labels, EMA teacher)
    x_adv   = adversary(model, x, target)       none | fgsm | fgsm_rs | n_fgsm | pgd
    w      += γv                                weight perturbation: awp | awp_sam (optional)
    L       = loss(model, x, x_adv, target)     ce | trades
    L      += Σ regularizer(ctx)                elle | elle_a | aaer | gradalign

``Recipe.step`` returns the scalar loss to backpropagate plus detached per-step metrics
(device tensors; the runner sums them and synchronizes once per epoch). Around the optimizer
step the runner calls ``before_optimizer_step`` and ``after_step``: the weight perturbation is
removed there (after the step for official AWP, before it for the SAM variant), stateful
regularizers update (ELLE-A's λ), and the EMA models (ADR's teacher, the WA model) follow the
new weights. ``bind`` creates the EMA copies once the model exists.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor, nn

from bulwark.defenses.aaer import AAER
from bulwark.defenses.adr import ADRLabels
from bulwark.defenses.adversary import Adversary
from bulwark.defenses.awp import AWP, SAMAWP
from bulwark.defenses.context import Regularizer, StepContext
from bulwark.defenses.elle import ELLE, ELLEA
from bulwark.defenses.ema import EMA
from bulwark.defenses.gradalign import GradAlign
from bulwark.defenses.losses import build_loss

REGULARIZERS: dict[str, type[Regularizer]] = {
    "elle": ELLE, "elle_a": ELLEA, "aaer": AAER, "gradalign": GradAlign,
}
WEIGHT_PERTURBATIONS = {"awp": AWP, "awp_sam": SAMAWP}


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
        wp = spec.weight_perturbation
        self.weight_perturbation = WEIGHT_PERTURBATIONS[wp.kind](wp, self.loss) if wp else None
        self.adr = ADRLabels(spec.labels) if spec.labels.kind == "adr" else None
        self.weight_average: EMA | None = None
        self.epoch = 1
        self._perturbed = False

    def bind(self, model: nn.Module, total_steps: int) -> None:
        """Create the EMA copies (WA model, ADR teacher; one object when the decays agree)."""
        wa = self.spec.weight_average
        if wa is not None:
            self.weight_average = EMA(model, wa.decay)
        if self.adr is not None:
            shared = wa is not None and wa.decay == self.spec.labels.decay
            self.adr.bind(model, total_steps, self.weight_average if shared else None)

    @property
    def teacher_is_weight_average(self) -> bool:
        return self.adr is not None and self.adr.teacher is self.weight_average

    def set_epsilon(self, eps: float) -> None:
        """The training radius for the next steps (ε warm-up); evaluation keeps its own ε."""
        self.eps = self.adversary.eps = eps

    def begin_epoch(self, epoch: int) -> None:
        """``epoch`` counts from 1 (AWP's warm-up is stated in those terms)."""
        self.epoch = epoch

    @property
    def optimizer_steps(self) -> int:
        """1, or 2 when a regularizer asks for the official ELLE code's repeated step."""
        return 2 if any(r.double_step for r in self.regularizers.values()) else 1

    def step(self, model: nn.Module, x: Tensor, y: Tensor) -> StepOutput:
        metrics: dict[str, Tensor] = {}
        if self.adr is not None:
            target, m = self.adr(model, x, y)
            metrics.update(m)
        else:
            target = y
        objective, attack_target = self.loss.attack_objective(model, x, target)
        adv = self.adversary(model, x, attack_target, objective,
                             eval_mode=self.loss.attack_eval_mode, start=self.loss.attack_start)
        wp = self.weight_perturbation
        self._perturbed = wp is not None and wp.active(self.epoch)
        if self._perturbed:
            metrics["awp_norm"] = wp.perturb(model, x, adv.x_adv, target).detach()
        out = self.loss(model, x, adv.x_adv, target)
        loss = out.loss
        metrics["loss_main"] = out.loss.detach()
        if self.regularizers:
            ctx = StepContext(model, x, target, self.eps, self.norm, adv.x_adv, out.logits_adv,
                              out.loss_adv, adv.start)
            for reg in self.regularizers.values():
                term, m = reg(ctx)
                loss = loss + term
                metrics.update(m)
        return StepOutput(loss, out.logits_adv, metrics)

    def before_optimizer_step(self, model: nn.Module) -> None:
        if self._perturbed:
            self.weight_perturbation.before_step(model)

    def abandon_step(self, model: nn.Module) -> None:
        """The runner skipped this step's optimizer update (a non-finite loss or gradient):
        undo the weight perturbation and drop per-step state, updating nothing."""
        if self._perturbed:
            self.weight_perturbation.before_step(model)  # SAM-AWP restores w here,
            self.weight_perturbation.after_step(model)   # AWP here; each no-ops the other
            self._perturbed = False
        for reg in self.regularizers.values():
            reg.abandon_step()

    def after_step(self, model: nn.Module) -> None:
        if self._perturbed:
            self.weight_perturbation.after_step(model)
            self._perturbed = False
        for reg in self.regularizers.values():
            reg.after_step()
        if self.adr is not None:
            self.adr.after_step(model)
        if self.weight_average is not None and not self.teacher_is_weight_average:
            self.weight_average.update(model)

    def state_dict(self) -> dict:
        state: dict = {"regularizers": {k: r.state_dict() for k, r in self.regularizers.items()}}
        if self.adr is not None:
            state["adr"] = self.adr.state_dict()
        if self.weight_average is not None:
            state["weight_average"] = self.weight_average.state_dict()
        return state

    def load_state_dict(self, state: dict) -> None:
        for k, r in self.regularizers.items():
            r.load_state_dict(state["regularizers"].get(k, {}))
        if self.adr is not None:
            self.adr.load_state_dict(state["adr"])
        if self.weight_average is not None:
            self.weight_average.load_state_dict(state["weight_average"])
