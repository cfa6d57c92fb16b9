"""This process's share of a data-parallel training step (``compute.devices`` > 1).

Under DistributedDataParallel each rank steps on a contiguous slice ``[start, stop)`` of the
global batch of ``total`` examples, and DDP averages the ranks' weight gradients. Three things
a recipe does are not weight gradients through DDP, and they ask this module:

- **random draws** (random starts, N-FGSM noise, ELLE's triplets, Gaussian noise): ``uniform``,
  ``normal`` and ``rand`` draw the *global* batch's tensor from the same-seeded generator on
  every rank and return this rank's slice, so every example gets the number it gets in a
  one-process run with the same global batch;
- **batch means that steer the run** (ELLE-A's E_lin, which feeds its λ controller): ``mean``
  all-reduces them, weighted by the shard sizes;
- **gradients taken with ``torch.autograd.grad``** (AWP's direction): ``mean_grads``.

``weight()`` is the factor the runner puts on this rank's loss so that DDP's plain average of
the ranks' gradients equals the global batch mean even when the shards differ in size. Outside
``sharing`` (one process, evaluation, certification) every function is the plain operation.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Share:
    rank: int
    world: int
    start: int
    stop: int
    total: int

    @property
    def size(self) -> int:
        return self.stop - self.start


def split(total: int, world: int, rank: int) -> tuple[int, int]:
    """Rank ``rank``'s contiguous slice of ``total`` examples: sizes differ by at most one."""
    base, extra = divmod(total, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (rank < extra)


_share: Share | None = None


@contextlib.contextmanager
def sharing(share: Share | None) -> Iterator[None]:
    """Within the block, draws and means follow ``share`` (None: no-op)."""
    global _share
    previous, _share = _share, share
    try:
        yield
    finally:
        _share = previous


def current() -> Share | None:
    return _share


def weight() -> float:
    """N·b_r/B: this rank's loss factor (1.0 outside a shared step)."""
    s = _share
    return 1.0 if s is None else s.world * s.size / s.total


def _global_shape(like: Tensor) -> tuple[int, ...] | None:
    s = _share
    if s is None or like.dim() == 0 or like.shape[0] != s.size:
        return None
    return (s.total, *like.shape[1:])


def uniform(like: Tensor, low: float, high: float) -> Tensor:
    """``torch.empty_like(like).uniform_(low, high)``, drawn for the global batch."""
    shape = _global_shape(like)
    if shape is None:
        return torch.empty_like(like).uniform_(low, high)
    full = torch.empty(shape, dtype=like.dtype, device=like.device).uniform_(low, high)
    return full[_share.start:_share.stop]


def normal(like: Tensor) -> Tensor:
    """``torch.randn_like(like)``, drawn for the global batch."""
    shape = _global_shape(like)
    if shape is None:
        return torch.randn_like(like)
    return torch.randn(shape, dtype=like.dtype, device=like.device)[_share.start:_share.stop]


def rand(n: int, *, device, dtype) -> Tensor:
    """``torch.rand(n)`` for ``n`` examples of the batch, drawn for the global batch."""
    s = _share
    if s is None or n != s.size:
        return torch.rand(n, device=device, dtype=dtype)
    return torch.rand(s.total, device=device, dtype=dtype)[s.start:s.stop]


def mean(value: Tensor) -> Tensor:
    """A per-example mean over this rank's shard → the mean over the global batch."""
    s = _share
    if s is None:
        return value
    import torch.distributed as dist

    out = value.detach().float() * (s.size / s.total)
    dist.all_reduce(out)
    return out.to(value.dtype)


def mean_grads(grads: Sequence[Tensor]) -> list[Tensor]:
    """Gradients of a per-example mean over the shard → those of the global batch mean."""
    s = _share
    if s is None:
        return list(grads)
    import torch.distributed as dist

    flat = torch.cat([g.reshape(-1).float() for g in grads]) * (s.size / s.total)
    dist.all_reduce(flat)
    out, i = [], 0
    for g in grads:
        out.append(flat[i:i + g.numel()].view_as(g).to(g.dtype))
        i += g.numel()
    return out
