"""AWP (Wu, Xia, Wang, NeurIPS 2020): Adversarial Weight Perturbation, the official rule
(``AT_AWP/utils_awp.py``).

Per batch, with x_adv already built at the unperturbed weights w:
1. a proxy copy of the model (train mode, so the main model's BatchNorm statistics are
   untouched) takes one plain-SGD step that *ascends* the training loss at x_adv;
2. for every state-dict entry named ``*weight`` with ≥ 2 dimensions (conv and linear weights;
   BatchNorm weights and all biases are skipped), v_l = ‖w_l‖·Δ_l/‖Δ_l‖ with Δ_l = proxy_l − w_l
   (= lr_proxy·∇_l L, so Bulwark computes it from the gradient; see ``AWP.direction``);
3. w_l ← w_l + γ·v_l; the training loss is taken there; the optimizer steps;
4. w_l ← w_l − γ·v_l, *after* the step, so the net update is w − lr·∇L(w + γv).

The perturbation is per layer and relative: ‖γ·v_l‖ = γ‖w_l‖. The proxy's learning rate only
scales Δ, which is renormalized.

``SAMAWP`` is ADR's SAM-style variant (``src/util/awp.py``), kept apart under its own name:
e_p = ρ·‖p‖/‖∇p‖·∇p for every parameter with a gradient (BatchNorm and biases included), the
gradient taken at w by a first forward/backward, the second pass with BatchNorm running
statistics frozen.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from bulwark.attacks import shard

EPS = 1e-20


def perturbable(name: str, w: Tensor) -> bool:
    return "weight" in name and w.dim() > 1


class AWP:
    def __init__(self, spec, loss):
        self.gamma, self.warmup = spec.gamma, spec.warmup
        self.loss = loss
        self._v: dict[str, Tensor] | None = None

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup

    def direction(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor
                  ) -> dict[str, Tensor]:
        """v_l = ‖w_l‖·Δ_l/‖Δ_l‖ for the ≥2-D weights.

        The official proxy takes one plain-SGD step on −L, so Δ = proxy − w = lr_proxy·∇_w L
        exactly: Δ_l/‖Δ_l‖ = ∇_l L/‖∇_l L‖ whatever the proxy's learning rate. Bulwark takes that
        gradient on the model itself (train mode, as the proxy) and puts its buffers back
        afterwards, so the BatchNorm running statistics are untouched, as with the proxy —
        the same direction without copying the model every step."""
        named = [(n, p) for n, p in model.named_parameters() if perturbable(n, p)]
        buffers = [(b, b.clone()) for b in model.buffers()]
        was_training = model.training
        model.train()
        try:
            loss = self.loss(model, x, x_adv, target).loss
            # the global batch's gradient on every rank: one perturbation for all of them
            grads = shard.mean_grads(torch.autograd.grad(loss, [p for _, p in named]))
        finally:
            model.train(was_training)
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
        with torch.no_grad():
            return {n: g * (p.norm() / (g.norm() + EPS))
                    for (n, p), g in zip(named, grads, strict=True)}

    @torch.no_grad()
    def _add(self, model: nn.Module, v: dict[str, Tensor], coeff: float) -> None:
        params = dict(model.named_parameters())
        for name, d in v.items():
            params[name].add_(d, alpha=coeff)

    def perturb(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> Tensor:
        """Move the weights to w + γv; returns ‖γv‖ (all layers) for the report."""
        v = self.direction(model, x, x_adv, target)
        self._add(model, v, self.gamma)
        self._v = v
        return self.gamma * torch.sqrt(sum(d.pow(2).sum() for d in v.values()))

    def before_step(self, model: nn.Module) -> None:
        pass

    def after_step(self, model: nn.Module) -> None:
        """Official rule: the perturbation is removed *after* the optimizer step."""
        if self._v is not None:
            self._add(model, self._v, -self.gamma)
            self._v = None


class SAMAWP:
    """ADR's SAM-style variant; see the module docstring. Used by the runner's step hooks."""

    def __init__(self, spec, loss):
        self.rho, self.warmup, self.loss = spec.rho, spec.warmup, loss
        self._e: dict[str, Tensor] | None = None

    def active(self, epoch: int) -> bool:
        return epoch >= self.warmup

    def perturb(self, model: nn.Module, x: Tensor, x_adv: Tensor, target: Tensor) -> Tensor:
        params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        loss = self.loss(model, x, x_adv, target).loss
        grads = torch.autograd.grad(loss, [p for _, p in params], allow_unused=True)
        used = [i for i, g in enumerate(grads) if g is not None]
        grads = list(grads)
        for i, g in zip(used, shard.mean_grads([grads[i] for i in used]), strict=True):
            grads[i] = g
        e = {}
        with torch.no_grad():
            for (name, p), g in zip(params, grads, strict=True):
                if g is not None:
                    e[name] = self.rho * p.norm() / (g.norm() + 1e-12) * g
                    p.add_(e[name])
        self._e = e
        _freeze_bn_stats(model, True)
        return torch.sqrt(sum(d.pow(2).sum() for d in e.values()))

    def after_step(self, model: nn.Module) -> None:
        pass

    def before_step(self, model: nn.Module) -> None:
        """SAM: back to w (keeping the gradient taken at w + e) before the base step."""
        _freeze_bn_stats(model, False)
        if self._e is not None:
            with torch.no_grad():
                params = dict(model.named_parameters())
                for name, d in self._e.items():
                    params[name].sub_(d)
            self._e = None


def _freeze_bn_stats(model: nn.Module, freeze: bool) -> None:
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            if freeze:
                m._saved_momentum = m.momentum
                m.momentum = 0.0
            elif hasattr(m, "_saved_momentum"):
                m.momentum = m._saved_momentum
                del m._saved_momentum
