"""The geometry of a threat model: sampling, ascent direction and projection per norm.

Every attack is written once against this small interface, so ℓ∞ and ℓ2 share their code.
All operations are batched over the first dimension and keep the input's dtype and device.
"""

from __future__ import annotations

from torch import Tensor

from bulwark.attacks import shard


def _expand(v: Tensor, like: Tensor) -> Tensor:
    """Reshape a per-example vector [B] to broadcast over [B, ...]."""
    return v.view(-1, *([1] * (like.dim() - 1)))


class Linf:
    name = "linf"

    @staticmethod
    def uniform(like: Tensor, radius: float) -> Tensor:
        """η ~ U[-r, r]^d."""
        return shard.uniform(like, -radius, radius)

    @staticmethod
    def ascent(grad: Tensor) -> Tensor:
        """The steepest-ascent unit step for ‖·‖∞: sign(∇)."""
        return grad.sign()

    @staticmethod
    def project(delta: Tensor, eps: float) -> Tensor:
        return delta.clamp(-eps, eps)

    @staticmethod
    def norm(delta: Tensor) -> Tensor:
        return delta.flatten(1).abs().amax(dim=1)


class L2:
    name = "l2"

    @staticmethod
    def uniform(like: Tensor, radius: float) -> Tensor:
        """η uniform in the ℓ2 ball of radius r: Gaussian direction, radius r·U^(1/d)."""
        d = like[0].numel()
        direction = shard.normal(like)
        direction = direction / _expand(direction.flatten(1).norm(dim=1).clamp_min(1e-12), like)
        r = shard.rand(like.shape[0], device=like.device, dtype=like.dtype).pow(1.0 / d) * radius
        return direction * _expand(r, like)

    @staticmethod
    def ascent(grad: Tensor) -> Tensor:
        """The steepest-ascent unit step for ‖·‖2: ∇/‖∇‖2."""
        n = grad.flatten(1).norm(dim=1).clamp_min(1e-12)
        return grad / _expand(n, grad)

    @staticmethod
    def project(delta: Tensor, eps: float) -> Tensor:
        n = delta.flatten(1).norm(dim=1)
        factor = (eps / n.clamp_min(1e-12)).clamp(max=1.0)
        return delta * _expand(factor, delta)

    @staticmethod
    def norm(delta: Tensor) -> Tensor:
        return delta.flatten(1).norm(dim=1)


NORMS = {"linf": Linf, "l2": L2}


def get_norm(name: str) -> type[Linf] | type[L2]:
    try:
        return NORMS[name]
    except KeyError:
        raise ValueError(f"unknown norm {name!r}; choose one of {sorted(NORMS)}") from None
