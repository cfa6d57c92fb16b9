"""The yardstick of bench/step_cost.py: each recipe's training step written as the official
repositories write it — plain fp32 eager PyTorch, no Bulwark parts — so that Bulwark's step
can be timed against it in the same run (the "speed-up" column).

What the official code does and Bulwark does not (where the speed-up comes from):

- single-step attacks (Wong et al. ``fast_adversarial``, de Jorge et al. N-FGSM, ELLE, AAER,
  GradAlign) and PGD (Rice et al. ``robust_overfitting``, the base of AWP's code) take the input
  gradient with ``loss.backward()`` on a ``requires_grad`` delta, which computes every weight
  gradient too and throws it away at ``opt.zero_grad()``; Bulwark asks autograd for the input
  gradient only;
- TRADES (``trades.py``) recomputes softmax(f(x)) inside every attack step; Bulwark once;
- GradAlign recomputes ∇ℓ(x) for the alignment although its FGSM attack just computed it;
- AWP (``utils_awp.py``) copies the model into a proxy every step and takes a proxy SGD step to
  find the direction; Bulwark takes the same normalized direction from one gradient;
- ELLE (official) runs the 3B triplet batch as one concatenated forward, as here; on the CPU
  Bulwark runs three B-sized forwards (no BatchNorm: the same values, faster there).

Hyper-parameters come from the same ``JobSpec`` as Bulwark's step, so both do the same
mathematics; ``tests`` do not run this file (it is a benchmark, not an oracle).
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def _clamp01(x: Tensor) -> Tensor:
    return x.clamp(0, 1)


def _single_step(model, x, y, *, kind: str, eps: float, alpha: float, k: float,
                 clip: bool) -> tuple[Tensor, Tensor, Tensor]:
    """fast_adversarial-style FGSM / FGSM-RS / N-FGSM: (x_adv, logits at the start, loss at
    the start per example)."""
    if kind == "fgsm":
        delta = torch.zeros_like(x)
    else:
        delta = torch.empty_like(x).uniform_(-k * eps, k * eps)
        delta = _clamp01(x + delta) - x
    delta.requires_grad_(True)
    out = model(x + delta)
    loss = F.cross_entropy(out, y, reduction="none")
    loss.mean().backward()  # input and (wasted) weight gradients
    delta = delta.detach() + alpha * delta.grad.sign()
    if clip:
        delta = delta.clamp(-eps, eps)
    return _clamp01(x + delta).detach(), out.detach(), loss.detach()


def _pgd(model, x, y, *, eps: float, alpha: float, steps: int,
         loss_fn: Callable[[Tensor, Tensor], Tensor]) -> Tensor:
    """robust_overfitting's attack_pgd: uniform start, ``loss.backward()`` every step."""
    delta = (_clamp01(x + torch.empty_like(x).uniform_(-eps, eps)) - x).requires_grad_(True)
    for _ in range(steps):
        loss = loss_fn(model(x + delta), y)
        loss.backward()
        d = delta.detach() + alpha * delta.grad.sign()
        delta = (_clamp01(x + d.clamp(-eps, eps)) - x).requires_grad_(True)
    return (x + delta).detach()


def _soft_ce(logits: Tensor, target: Tensor) -> Tensor:
    if target.dim() == 1:
        return F.cross_entropy(logits, target)
    return -(target * F.log_softmax(logits, dim=1)).sum(1).mean()


def _trades_attack(model, x, *, eps: float, alpha: float, steps: int) -> Tensor:
    """trades.py: eval mode, x + 0.001·N(0, 1), KL to softmax(f(x)) recomputed every step."""
    model.eval()
    x_adv = x.detach() + 0.001 * torch.randn_like(x)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        with torch.enable_grad():
            loss_kl = F.kl_div(F.log_softmax(model(x_adv), dim=1),
                               F.softmax(model(x), dim=1), reduction="sum")
        grad = torch.autograd.grad(loss_kl, [x_adv])[0]
        x_adv = x_adv.detach() + alpha * grad.sign()
        x_adv = _clamp01(torch.min(torch.max(x_adv, x - eps), x + eps))
    model.train()
    return x_adv.detach()


def _trades_loss(model, x, x_adv, y, beta: float) -> Tensor:
    logits = model(x)
    kl = F.kl_div(F.log_softmax(model(x_adv), dim=1), F.softmax(logits, dim=1),
                  reduction="batchmean")
    return _soft_ce(logits, y) + beta * kl


class AWPReference:
    """utils_awp.py: a proxy copy, one SGD step on −L, per-layer relative diff, w += γ·diff."""

    def __init__(self, model: nn.Module, gamma: float):
        self.proxy = copy.deepcopy(model)
        self.opt = torch.optim.SGD(self.proxy.parameters(), lr=0.01)
        self.gamma = gamma
        self.diff: dict[str, Tensor] = {}

    def perturb(self, model: nn.Module, loss_of: Callable[[nn.Module], Tensor]) -> None:
        self.proxy.load_state_dict(model.state_dict())
        self.proxy.train()
        loss = -loss_of(self.proxy)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        model_w, proxy_w = model.state_dict(), self.proxy.state_dict()
        self.diff = {}
        for name, w in model_w.items():
            if "weight" in name and w.dim() > 1:
                d = proxy_w[name] - w
                self.diff[name] = w.norm() / (d.norm() + 1e-20) * d
        self._add(model, self.gamma)

    def restore(self, model: nn.Module) -> None:
        self._add(model, -self.gamma)

    @torch.no_grad()
    def _add(self, model: nn.Module, coeff: float) -> None:
        params = dict(model.named_parameters())
        for name, d in self.diff.items():
            params[name].add_(coeff * d)


def reference_step(spec, model: nn.Module, optimizer: torch.optim.Optimizer
                   ) -> Callable[[Tensor, Tensor], Tensor]:
    """The official-style step of ``spec`` (a JobSpec) for ``model``: step(x, y) → loss."""
    r, eps = spec.recipe, spec.threat.epsilon
    adv, loss_spec = r.adversary, r.loss
    regs = {g.kind: g for g in r.regularizers}
    awp = AWPReference(model, r.weight_perturbation.gamma) if (
        r.weight_perturbation is not None and r.weight_perturbation.kind == "awp") else None
    teacher = None
    if r.labels.kind == "adr":
        teacher = copy.deepcopy(model).eval()
        for p in teacher.parameters():
            p.requires_grad_(False)
    trades = loss_spec.kind == "trades"
    beta = getattr(loss_spec, "beta", 6.0)
    steps_twice = any(getattr(g, "official_double_step", False) for g in r.regularizers)

    def step(x: Tensor, y: Tensor) -> Tensor:
        target: Tensor = y
        if teacher is not None:
            from bulwark.defenses.adr import rectified_labels
            with torch.no_grad():
                target, _ = rectified_labels(teacher(x), y, r.labels.tau_high, r.labels.lam_low)
        start = None
        if adv.kind in ("fgsm", "fgsm_rs", "n_fgsm"):
            k = getattr(adv, "k", 1.0)
            x_adv, logits0, loss0 = _single_step(
                model, x, y, kind=adv.kind, eps=eps, alpha=adv.alpha * eps, k=k,
                clip=adv.kind != "n_fgsm")
            start = (logits0, loss0)
        elif adv.kind == "pgd" and trades:
            x_adv = _trades_attack(model, x, eps=eps, alpha=adv.alpha * eps, steps=adv.steps)
        elif adv.kind == "pgd":
            x_adv = _pgd(model, x, target, eps=eps, alpha=adv.alpha * eps, steps=adv.steps,
                         loss_fn=_soft_ce)
        else:
            x_adv = x
        if awp is not None:
            awp.perturb(model, (lambda m: _trades_loss(m, x, x_adv, target, beta)) if trades
                        else (lambda m: _soft_ce(m(x_adv), target)))
        if trades:
            loss = _trades_loss(model, x, x_adv, target, beta)
            logits_adv = None
        else:
            logits_adv = model(x_adv)
            loss = _soft_ce(logits_adv, target)
        if "elle" in regs or "elle_a" in regs:
            lam = regs["elle"].lam if "elle" in regs else regs["elle_a"].lam_max
            x_a = x + torch.empty_like(x).uniform_(-eps, eps)
            x_b = x + torch.empty_like(x).uniform_(-eps, eps)
            a = torch.rand(x.shape[0], 1, 1, 1, device=x.device)
            x_c = (1 - a) * x_a + a * x_b
            la, lb, lc = F.cross_entropy(model(torch.cat([x_a, x_b, x_c])), y.repeat(3),
                                         reduction="none").chunk(3)
            a = a.view(-1)
            loss = loss + lam * (lc - (1 - a) * la - a * lb).pow(2).mean()
        if "gradalign" in regs:
            d1 = torch.zeros_like(x, requires_grad=True)
            g1 = torch.autograd.grad(F.cross_entropy(model(x + d1), y), d1)[0].detach()
            d2 = torch.empty_like(x).uniform_(-eps, eps).requires_grad_(True)
            g2 = torch.autograd.grad(F.cross_entropy(model(x + d2), y), d2,
                                     create_graph=True)[0]
            cos = F.cosine_similarity(g1.flatten(1), g2.flatten(1), dim=1)
            loss = loss + regs["gradalign"].lam * (1 - cos.mean())
        if "aaer" in regs and start is not None:
            g = regs["aaer"]
            logits0, loss0 = start
            loss_a = F.cross_entropy(logits_adv, y, reduction="none")
            aae = (loss_a.detach() < loss0).float()
            m = aae.sum()
            if 0 < m < len(y):
                v = (logits_adv - logits0).pow(2).sum(1)
                v_a, v_n = (v * aae).sum() / m, ((v * (1 - aae)).sum() / (len(y) - m)).detach()
                ce_var = ((loss0 - loss_a.detach()) * aae).sum() / m
                loss = loss + g.lam1 * (m / len(y)) * (g.lam2 * ce_var + g.lam3 * F.relu(
                    v_a - v_n))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if steps_twice:
            optimizer.step()
        if awp is not None:
            awp.restore(model)
        if teacher is not None:
            with torch.no_grad():
                for t, s in zip(teacher.state_dict().values(), model.state_dict().values(),
                                strict=True):
                    if t.dtype.is_floating_point:
                        t.mul_(r.labels.decay).add_(s, alpha=1 - r.labels.decay)
        return loss.detach()

    return step
