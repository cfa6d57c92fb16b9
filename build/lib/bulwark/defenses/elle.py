"""ELLE and ELLE-A (Abad Rocamora et al., ICLR 2024): Efficient Local Linearity Enforcement.

For x_a, x_b ~ U(x + [-ε, ε]^d) and α ~ U[0, 1], x_c = (1 − α)·x_a + α·x_b:

    E_lin = (1/B) Σ_i [ ℓ(x_c,i) − (1 − α_i)·ℓ(x_a,i) − α_i·ℓ(x_b,i) ]²

For a twice-differentiable ℓ the residual is ≈ −½·α(1 − α)·(x_a − x_b)ᵀ ∇²ℓ (x_a − x_b), so
λ·E_lin penalizes curvature along random chords with one extra forward/backward over the 3B
triplet batch and no double backprop. None of the three losses is detached, and (as in the
official code) the triplet points are not clipped to [0, 1]: they probe the loss surface,
they are not adversarial inputs.

ELLE-A replaces the constant λ by a controller: λ ← λ_max when E_lin spikes above
mean(H) + s·std(H) of its whole history H (population std, |H| > 2), else λ ← γ·λ; E_lin is then
appended to H. The controller lives on the device (no host sync per step) and keeps H as
Welford running moments, which give the same mean and std as the full list.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from bulwark.attacks import shard
from bulwark.attacks.norms import get_norm
from bulwark.attacks.objectives import cross_entropy
from bulwark.defenses.context import Regularizer, StepContext


def linearity_residual(loss_fn: Callable[[Tensor], Tensor], x_a: Tensor, x_b: Tensor,
                       alpha: Tensor) -> Tensor:
    """Per-example ℓ(x_c) − (1−α)ℓ(x_a) − αℓ(x_b), with one call of ``loss_fn`` on 3B inputs."""
    a = alpha.view(-1, *([1] * (x_a.dim() - 1)))
    x_c = (1 - a) * x_a + a * x_b
    l_a, l_b, l_c = loss_fn(torch.cat([x_a, x_b, x_c])).chunk(3)
    return l_c - (1 - alpha) * l_a - alpha * l_b


def uses_batch_statistics(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def local_linearity_error(ctx: StepContext, *, fused: bool = True) -> Tensor:
    """E_lin on one random triplet per example around the clean x (radius ε).

    ``fused``: one forward over the concatenated 3B batch (the official code; with BatchNorm
    the three parts share batch statistics). Without BatchNorm the three B-sized forwards give
    the same values, and on CPU they are faster than one 3B batch, so ``ELLE`` splits there.
    """
    g = get_norm(ctx.norm)
    x, model, target = ctx.x, ctx.model, ctx.target
    x_a, x_b = x + g.uniform(x, ctx.eps), x + g.uniform(x, ctx.eps)
    alpha = shard.rand(x.shape[0], device=x.device, dtype=x.dtype)
    if fused:
        target3 = torch.cat([target] * 3)
        loss_fn = lambda z: cross_entropy(model(z), target3)  # noqa: E731
    else:
        loss_fn = lambda z: torch.cat([cross_entropy(model(c), target)  # noqa: E731
                                       for c in z.chunk(3)])
    return linearity_residual(loss_fn, x_a, x_b, alpha).pow(2).mean()


class _TripletPlan:
    """Decides once per model whether the triplet forward is fused (see above)."""

    def __init__(self):
        self._model_id: int | None = None
        self._fused = True

    def fused(self, model: nn.Module, device: torch.device) -> bool:
        if id(model) != self._model_id:
            self._model_id = id(model)
            self._fused = device.type != "cpu" or uses_batch_statistics(model)
        return self._fused


class ELLE(Regularizer):
    def __init__(self, spec):
        self.lam = spec.lam
        self.double_step = spec.official_double_step
        self.plan = _TripletPlan()

    def __call__(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        e_lin = local_linearity_error(ctx, fused=self.plan.fused(ctx.model, ctx.x.device))
        return self.lam * e_lin, {"elle_e_lin": e_lin.detach(),
                                  "elle_lambda": torch.tensor(self.lam, device=e_lin.device)}


class ELLEAController:
    """λ_t for ELLE-A. ``update(E_lin)`` applies the reset/decay rule, then appends to H."""

    def __init__(self, lam_max: float, sensitivity: float, decay: float, device=None):
        self.lam_max, self.s, self.gamma = lam_max, sensitivity, decay
        f64 = {"dtype": torch.float64, "device": device}
        self.lam = torch.zeros((), **f64)
        self.n = torch.zeros((), **f64)     # |H|
        self.mean = torch.zeros((), **f64)  # mean(H)
        self.m2 = torch.zeros((), **f64)    # Σ (h − mean)²

    def std(self) -> Tensor:
        return (self.m2 / self.n.clamp_min(1)).sqrt()

    def update(self, e_lin: Tensor) -> None:
        e = e_lin.detach().to(self.lam)
        spike = (self.n > 2) & (e > self.mean + self.s * self.std())
        reset = torch.full_like(self.lam, self.lam_max)
        self.lam = torch.where(spike, reset, self.gamma * self.lam)
        self.n = self.n + 1
        d = e - self.mean
        self.mean = self.mean + d / self.n
        self.m2 = self.m2 + d * (e - self.mean)

    def to(self, device) -> ELLEAController:
        for k in ("lam", "n", "mean", "m2"):
            setattr(self, k, getattr(self, k).to(device))
        return self

    def state_dict(self) -> dict:
        return {k: getattr(self, k).clone() for k in ("lam", "n", "mean", "m2")}

    def load_state_dict(self, state: dict) -> None:
        for k in ("lam", "n", "mean", "m2"):
            if k not in state:
                raise ValueError(f"ELLE-A state lacks {k!r}: the checkpoint was written by "
                                 "another recipe")
            setattr(self, k, state[k].to(getattr(self, k)))


class ELLEA(Regularizer):
    def __init__(self, spec):
        self.controller = ELLEAController(spec.lam_max, spec.sensitivity, spec.decay)
        self.double_step = spec.official_double_step
        self.plan = _TripletPlan()
        self._last: Tensor | None = None

    def __call__(self, ctx: StepContext) -> tuple[Tensor, dict[str, Tensor]]:
        if self.controller.lam.device != ctx.x.device:
            self.controller.to(ctx.x.device)
        e_lin = local_linearity_error(ctx, fused=self.plan.fused(ctx.model, ctx.x.device))
        self._last = shard.mean(e_lin.detach())  # every rank's controller sees the global E_lin
        lam = self.controller.lam
        return lam.to(e_lin.dtype) * e_lin, {"elle_e_lin": self._last, "elle_lambda": lam.float()}

    def after_step(self) -> None:
        if self._last is not None:
            self.controller.update(self._last)
            self._last = None

    def abandon_step(self) -> None:
        self._last = None  # a non-finite E_lin never enters the history H

    def state_dict(self) -> dict:
        return self.controller.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.controller.load_state_dict(state)
