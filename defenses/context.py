"""What one training step knows, passed to every regularizer."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from bulwark.attacks.single_step import SingleStepResult


@dataclass
class StepContext:
    model: nn.Module
    x: Tensor             # clean batch in [0, 1]
    target: Tensor        # class indices [B] or soft labels [B, K]
    eps: float
    norm: str
    x_adv: Tensor         # the training input chosen by the adversary
    logits_adv: Tensor    # f(x_adv) from the training forward (carries gradient)
    loss_adv: Tensor      # per-example training CE at x_adv (carries gradient)
    start: SingleStepResult | None = None  # single-step attacks: x', f(x'), ℓ(x'), ∇ℓ(x')


class Regularizer:
    """A term added to the training loss: ``reg(ctx) -> (term, metrics)``.

    Stateful regularizers (ELLE-A) override ``after_step`` (called once after each optimizer
    step) and ``state_dict`` / ``load_state_dict`` (saved in every checkpoint).
    """

    double_step = False  # ELLE's official code repeats optimizer.step(); see docs/methods.md

    def __call__(self, ctx: StepContext):
        raise NotImplementedError

    def after_step(self) -> None:
        pass

    def abandon_step(self) -> None:
        """The step was skipped (a non-finite loss or gradient): forget what it computed."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass
