"""ADR (Wu, Wang, Chen, ICLR 2024): Annealing self-Distillation Rectification.

An EMA teacher (decay 0.995, eval mode) looks at the *clean* x. With per-iteration cosine
schedules v(t) = final + ½(base − final)(1 + cos(π t / T)) — temperature τ_t from τ_high
*down* to τ_low, interpolation λ_t from λ_low *up* to λ_high — the rectified soft label is

    p   = softmax(f_ema(x) / τ_t)
    Δ_i = max_j p_ij − p_i,y_i ≥ 0
    λ_i = clip(λ_t − Δ_i, 0, 1)
    ŷ_i = λ_i·p_i + (1 − λ_i)·onehot(y_i)

so the true class always stays the (weak) argmax: ŷ_y − ŷ_j ≥ 1 − λ_i − λ_i·Δ_i ≥ 0. ŷ replaces
y everywhere: in the attack and in the loss. The teacher is updated after every optimizer
step; at step 0 it is the freshly initialized network, as in the official code.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from bulwark.defenses.ema import EMA


def cosine(base: float, final: float, t: int, total: int) -> float:
    """DINO-style cosine schedule: ``base`` at t = 0, ``final`` at t = total."""
    frac = min(max(t / max(total, 1), 0.0), 1.0)
    return final + 0.5 * (base - final) * (1.0 + math.cos(math.pi * frac))


def rectified_labels(teacher_logits: Tensor, y: Tensor, tau: float, lam: float
                     ) -> tuple[Tensor, Tensor]:
    """(ŷ, λ_i) from the teacher's logits on clean inputs."""
    p = F.softmax(teacher_logits.float() / tau, dim=1)
    delta = p.max(dim=1).values - p.gather(1, y[:, None]).squeeze(1)
    lam_i = (lam - delta).clamp(0.0, 1.0)
    onehot = F.one_hot(y, p.shape[1]).to(p.dtype)
    return lam_i[:, None] * p + (1 - lam_i[:, None]) * onehot, lam_i


class ADRLabels:
    def __init__(self, spec):
        self.spec = spec
        self.teacher: EMA | None = None
        self.t, self.total = 0, 1

    def bind(self, model: nn.Module, total_steps: int, teacher: EMA | None = None) -> None:
        self.teacher = teacher or EMA(model, self.spec.decay)
        self.total = total_steps

    def schedule(self, t: int | None = None) -> tuple[float, float]:
        """(τ_t, λ_t) at iteration t (default: the current one)."""
        t = self.t if t is None else t
        s = self.spec
        return (cosine(s.tau_high, s.tau_low, t, self.total),
                cosine(s.lam_low, s.lam_high, t, self.total))

    def __call__(self, model: nn.Module, x: Tensor, y: Tensor) -> tuple[Tensor, dict]:
        tau, lam = self.schedule()
        with torch.no_grad():
            target, lam_i = rectified_labels(self.teacher.module(x), y, tau, lam)
        dev = x.device
        return target, {"adr_tau": torch.tensor(tau, device=dev),
                        "adr_lambda": torch.tensor(lam, device=dev),
                        "adr_lambda_i": lam_i.mean()}

    def after_step(self, model: nn.Module, update_teacher: bool = True) -> None:
        if update_teacher:
            self.teacher.update(model)
        self.t += 1

    def state_dict(self) -> dict:
        return {"t": self.t, "teacher": self.teacher.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.t = int(state["t"])
        self.teacher.load_state_dict(state["teacher"])
