"""Final robustness evaluation on torchattacks: clean, FGSM, PGD with restarts, AutoAttack.

Conventions shared by every function here:

* Inputs are images in [0, 1] (normalization lives inside the model); :func:`check_image_range`
  runs first and rejects anything else. Labels are integer class indices.
* The model runs in eval mode with its parameters frozen (``requires_grad=False``) for the
  duration of the call; the training flag of every submodule and the ``requires_grad`` of
  every parameter are restored afterwards, even on error. Freezing keeps attacks that call
  ``.backward()`` (torchattacks' FAB, inside standard AutoAttack) from writing ``.grad`` into
  the model's parameters.
* Work is done in batches of ``batch_size`` on the inputs' device (the model must already be
  there). Attacks run under ``torch.enable_grad()``, so calling these from inside a
  ``torch.no_grad()`` block is fine.
* An example counts as robust only if it is classified correctly clean *and* after every
  attack run. Misclassified clean examples are never attacked.
* Randomized evaluations seed torch's RNG inside ``torch.random.fork_rng()``, PGD afresh for
  every batch from (``seed``, the batch's first index): results are reproducible for a given
  (seed, batch_size), a batch's result does not depend on the batches before it, and the
  caller's RNG stream is left untouched (torchattacks' APGD/APGD-T/FAB call
  ``torch.manual_seed`` themselves, at every call).
* ``ledger`` (a :class:`Ledger`): each finished batch's robust mask is handed to it, and a
  batch it already holds is not attacked again: an evaluation stopped half-way resumes where
  it stopped, with the result of an uninterrupted one.

torchattacks notes (3.3.0; the same code in 3.5.1): ``AutoAttack`` does not forward a step
count, so its APGD-CE, APGD-T and FAB run 10 iterations instead of the 100 of the reference
implementation (fra31/auto-attack); :func:`autoattack_eval` sets ``steps`` (default 100) on the
sub-attacks.
APGD-T's targeted DLR loss reads the 4th-largest logit, so it needs at least 4 classes.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torchattacks
from torch import nn

__all__ = [
    "AttackResult",
    "Ledger",
    "autoattack_eval",
    "check_image_range",
    "clean_accuracy",
    "fgsm_eval",
    "pgd_eval",
]

IMAGE_RANGE_TOL = 1e-6
_RANGE_MSG = "inputs must be images in [0,1]; normalization belongs inside the model"
_TA_NORMS = {"linf": "Linf", "l2": "L2"}
AA_VERSIONS = ("standard", "apgd-ce", "apgd-t", "apgd-ce+apgd-t")

# An attack maps (images, labels) of clean-correct examples to adversarial images.
AttackFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# progress(done, total): called after each batch with the points evaluated so far
Progress = Callable[[int, int], None]


class Ledger(Protocol):
    """Where an attack's finished batches are kept: the robust mask of inputs
    [start, stop)."""

    def get(self, start: int, stop: int) -> list[bool] | None: ...

    def put(self, start: int, stop: int, robust: list[bool]) -> None: ...


def _slice_seed(seed: int, start: int) -> int:
    return (seed * 1_000_003 + start * 7_919 + 17) % (2**63 - 1)


@dataclass
class AttackResult:
    """Accuracy of ``model`` under one evaluation: ``acc = correct / n``."""

    name: str
    acc: float
    n: int
    correct: int
    params: dict[str, Any] = field(default_factory=dict)  # JSON-serializable
    # per example: True where the model stayed correct under the attack (not in to_dict)
    robust: torch.Tensor | None = field(default=None, repr=False, compare=False)
    # the adversarial images, with keep_images=True (the clean image where nothing was
    # attacked or the batch came from a ledger; the fooling image where an attack succeeded)
    images: torch.Tensor | None = field(default=None, repr=False, compare=False)

    def to_dict(self) -> dict[str, Any]:
        return {"acc": self.acc, "n": self.n, "params": dict(self.params)}


# ------------------------------------------------------------------------------ validation
def check_image_range(x: torch.Tensor) -> None:
    """Raise ``ValueError`` unless ``x`` is a floating tensor with values in [0, 1] (±1e-6)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{_RANGE_MSG} (got {type(x).__name__}, not a tensor)")
    if not torch.is_floating_point(x):
        raise ValueError(f"{_RANGE_MSG} (got dtype {x.dtype}; convert to float and divide by 255)")
    if x.numel() == 0:
        return
    lo, hi = torch.aminmax(x.detach())
    lo_v, hi_v = float(lo), float(hi)
    # written so that NaN fails the check
    if not (lo_v >= -IMAGE_RANGE_TOL and hi_v <= 1.0 + IMAGE_RANGE_TOL):
        raise ValueError(f"{_RANGE_MSG} (got values in [{lo_v:.6g}, {hi_v:.6g}])")


def _check_inputs(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, images: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    check_image_range(x)
    if x.ndim < 1 or x.shape[0] == 0:
        raise ValueError("cannot evaluate on zero examples")
    if images and x.ndim != 4:
        raise ValueError(f"attacks need NCHW image batches, got shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.ndim != 1 or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"labels must be a 1-D tensor with one entry per input ({x.shape[0]}), "
            f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if torch.is_floating_point(y) or y.dtype == torch.bool or torch.is_complex(y):
        raise ValueError(f"labels must be integer class indices, got dtype {y.dtype}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    first = next(itertools.chain(model.parameters(), model.buffers()), None)
    if first is not None and first.device != x.device:
        raise ValueError(
            f"model is on {first.device} but inputs are on {x.device}; move one of them"
        )
    return x.detach(), y.detach().to(device=x.device, dtype=torch.long)


def _check_eps_norm(eps: float, norm: str) -> str:
    if norm not in _TA_NORMS:
        raise ValueError(f"norm must be one of {sorted(_TA_NORMS)}, got {norm!r}")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")
    return _TA_NORMS[norm]


# --------------------------------------------------------------------------------- plumbing
@contextlib.contextmanager
def _frozen_eval(model: nn.Module) -> Iterator[None]:
    """Eval mode + frozen parameters; restores every module's mode and every requires_grad."""
    modes = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.eval()
    for p, _ in grads:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training
        for p, requires_grad in grads:
            p.requires_grad_(requires_grad)


@contextlib.contextmanager
def _seeded(seed: int, device: torch.device) -> Iterator[None]:
    """Seed torch's RNG inside ``fork_rng`` so the caller's stream is not disturbed."""
    use_cuda = device.type == "cuda" or (torch.cuda.is_available() and torch.cuda.is_initialized())
    cuda_devices = list(range(torch.cuda.device_count())) if use_cuda else []
    with torch.random.fork_rng(devices=cuda_devices):
        torch.default_generator.manual_seed(seed)
        if cuda_devices:  # only the generators fork_rng restores
            torch.cuda.manual_seed_all(seed)
        yield


def _slices(n: int, batch_size: int) -> Iterator[slice]:
    for start in range(0, n, batch_size):
        yield slice(start, min(start + batch_size, n))


@torch.no_grad()
def _correct(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return model(x).argmax(dim=1) == y


def _run_attack(
    model: nn.Module,
    attack: AttackFn,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    restarts: int,
    batch_size: int,
    progress: Progress | None = None,
    seed: int | None = None,
    ledger: Ledger | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Worst case over ``restarts`` runs of ``attack``, per example.

    Restart r is run only on the examples that are still classified correctly after restarts
    0..r-1; examples misclassified clean are not attacked. Returns the adversarial images
    (the clean image where nothing was attacked, or the batch came from ``ledger``; the
    fooling image where an attack succeeded; the last restart's image otherwise) and the
    boolean robust mask. ``seed``: torch's RNG is seeded from it and the batch's first index
    before each batch.
    """
    x_adv = x.clone()
    robust = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for sl in _slices(x.shape[0], batch_size):
        kept = None if ledger is None else ledger.get(sl.start, sl.stop)
        if kept is not None:
            robust[sl] = torch.tensor(kept, dtype=torch.bool, device=x.device)
            if progress is not None:
                progress(sl.stop, x.shape[0])
            continue
        if seed is not None:
            torch.manual_seed(_slice_seed(seed, sl.start))
        xb, yb = x[sl], y[sl]
        rob = _correct(model, xb, yb)
        adv = xb.clone()
        for _ in range(restarts):
            idx = rob.nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            with torch.enable_grad():
                cand = attack(xb[idx], yb[idx]).detach()
            adv[idx] = cand.to(adv.dtype)
            rob[idx] = _correct(model, cand, yb[idx])
            if progress is not None and restarts > 1:
                progress(sl.start, x.shape[0])  # between restarts too: a caller may stop here
        x_adv[sl] = adv
        robust[sl] = rob
        if ledger is not None:
            ledger.put(sl.start, sl.stop, rob.tolist())
        if progress is not None:
            progress(sl.stop, x.shape[0])
    return x_adv, robust


def _result(name: str, robust: torch.Tensor, params: dict[str, Any],
            images: torch.Tensor | None = None) -> AttackResult:
    n = int(robust.numel())
    correct = int(robust.sum().item())
    return AttackResult(name=name, acc=correct / n, n=n, correct=correct, params=params,
                        robust=robust, images=images)


# -------------------------------------------------------------------------------------- clean
def clean_accuracy(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 256
) -> AttackResult:
    """Top-1 accuracy on the unperturbed inputs."""
    x, y = _check_inputs(model, x, y, batch_size, images=False)
    with _frozen_eval(model):
        robust = torch.cat([_correct(model, x[sl], y[sl]) for sl in _slices(len(x), batch_size)])
    return _result("clean", robust, {})


# --------------------------------------------------------------------------------------- FGSM
def _fgsm_attack(model: nn.Module, eps: float, ta_norm: str, device: torch.device) -> AttackFn:
    atk: torchattacks.attack.Attack
    if ta_norm == "Linf":
        atk = torchattacks.FGSM(model, eps=eps)
    else:  # one normalized-gradient step of length eps
        atk = torchattacks.PGDL2(model, eps=eps, alpha=eps, steps=1, random_start=False)
    atk.set_device(device)
    return atk


def fgsm_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    batch_size: int = 256,
    progress: Progress | None = None,
    ledger: Ledger | None = None,
    keep_images: bool = False,
) -> AttackResult:
    """Accuracy under FGSM: ``torchattacks.FGSM`` (L∞) or one L2 step (``PGDL2``, steps=1,
    alpha=eps, no random start). Deterministic. ``keep_images``: the result carries the
    adversarial images (``.images``) beside the robust mask (``.robust``)."""
    x, y = _check_inputs(model, x, y, batch_size, images=True)
    ta_norm = _check_eps_norm(eps, norm)
    with _frozen_eval(model):
        attack = _fgsm_attack(model, float(eps), ta_norm, x.device)
        x_adv, robust = _run_attack(model, attack, x, y, restarts=1, batch_size=batch_size,
                                    progress=progress, ledger=ledger)
    return _result("fgsm", robust, {"eps": float(eps), "norm": norm},
                   x_adv if keep_images else None)


# ---------------------------------------------------------------------------------------- PGD
def pgd_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    steps: int = 50,
    alpha: float | None = None,
    restarts: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    progress: Progress | None = None,
    ledger: Ledger | None = None,
    keep_images: bool = False,
) -> AttackResult:
    """Accuracy under PGD (``torchattacks.PGD`` / ``PGDL2``, random start), worst case over
    ``restarts`` per example. ``alpha`` is the absolute step size (default ``eps / 4``).
    ``keep_images``: the result carries the adversarial images (``.images``)."""
    x, y = _check_inputs(model, x, y, batch_size, images=True)
    ta_norm = _check_eps_norm(eps, norm)
    if steps < 1 or restarts < 1:
        raise ValueError(f"steps and restarts must be >= 1, got {steps} and {restarts}")
    eps = float(eps)
    alpha = eps / 4 if alpha is None else float(alpha)
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    with _frozen_eval(model), _seeded(seed, x.device):
        cls = torchattacks.PGD if ta_norm == "Linf" else torchattacks.PGDL2
        atk = cls(model, eps=eps, alpha=alpha, steps=steps, random_start=True)
        atk.set_device(x.device)
        x_adv, robust = _run_attack(model, atk, x, y, restarts=restarts, batch_size=batch_size,
                                    progress=progress, seed=seed, ledger=ledger)
    params = {
        "eps": eps, "norm": norm, "steps": int(steps), "alpha": alpha,
        "restarts": int(restarts), "random_start": True, "seed": int(seed),
    }
    return _result(f"pgd{steps}-{restarts}", robust, params, x_adv if keep_images else None)


# --------------------------------------------------------------------------------- AutoAttack
def _autoattack(
    model: nn.Module, *, eps: float, ta_norm: str, version: str, num_classes: int, steps: int,
    seed: int, device: torch.device,
) -> torchattacks.attack.Attack:
    atk: torchattacks.attack.Attack
    if version == "standard":
        atk = torchattacks.AutoAttack(
            model, norm=ta_norm, eps=eps, version="standard", n_classes=num_classes, seed=seed
        )
        # torchattacks leaves APGD-CE, APGD-T and FAB-T at 10 iterations (reference: 100)
        for sub in atk._autoattack.attacks:
            if isinstance(sub, torchattacks.APGD | torchattacks.APGDT | torchattacks.FAB):
                sub.steps = steps
    else:
        parts: list[torchattacks.attack.Attack] = []
        if version in ("apgd-ce", "apgd-ce+apgd-t"):
            parts.append(torchattacks.APGD(
                model, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed, loss="ce"
            ))
        if version in ("apgd-t", "apgd-ce+apgd-t"):
            parts.append(torchattacks.APGDT(
                model, norm=ta_norm, eps=eps, steps=steps, n_restarts=1, seed=seed,
                n_classes=num_classes,
            ))
        # AutoAttack's two gradient attacks without FAB-T and Square: APGD-T runs only on
        # what APGD-CE left robust (torchattacks.MultiAttack, as AutoAttack itself chains them)
        atk = parts[0] if len(parts) == 1 else torchattacks.MultiAttack(parts)
    atk.set_device(device)
    return atk


def autoattack_eval(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    norm: str = "linf",
    version: str = "standard",
    num_classes: int = 10,
    batch_size: int = 256,
    seed: int = 0,
    steps: int = 100,
    progress: Progress | None = None,
    ledger: Ledger | None = None,
    keep_images: bool = False,
) -> AttackResult:
    """Accuracy under AutoAttack via torchattacks.

    ``version``: ``"standard"`` (APGD-CE, APGD-T, FAB-T, Square-5000, each run on what the
    previous ones left robust), ``"apgd-ce"`` (``torchattacks.APGD``, CE loss, 1 restart) or
    ``"apgd-t"`` (``torchattacks.APGDT``, all ``num_classes - 1`` targets, 1 restart) or
    ``"apgd-ce+apgd-t"`` (APGD-T on what APGD-CE left robust: AutoAttack less FAB-T and
    Square, for budgets where the standard suite's Square-5000 does not fit).
    ``steps`` is the APGD/APGD-T/FAB iteration count (100 as in the reference AutoAttack;
    torchattacks' own default is 10). ``keep_images``: the result carries the adversarial
    images (``.images``).
    """
    x, y = _check_inputs(model, x, y, batch_size, images=True)
    ta_norm = _check_eps_norm(eps, norm)
    if version not in AA_VERSIONS:
        raise ValueError(
            f"AutoAttack version must be one of {', '.join(AA_VERSIONS)}, got {version!r}"
        )
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if version != "apgd-ce" and num_classes < 4:
        raise ValueError(
            f"AutoAttack version {version!r} runs APGD-T, whose targeted DLR loss needs at least "
            f"4 classes (got num_classes={num_classes}); use version='apgd-ce'"
        )
    with _frozen_eval(model):
        with torch.no_grad():
            width = model(x[:1]).shape[1]
        if width != num_classes:
            raise ValueError(f"num_classes={num_classes} but the model outputs {width} logits")
        with _seeded(seed, x.device):
            atk = _autoattack(
                model, eps=float(eps), ta_norm=ta_norm, version=version,
                num_classes=num_classes, steps=steps, seed=seed, device=x.device,
            )
            x_adv, robust = _run_attack(model, atk, x, y, restarts=1, batch_size=batch_size,
                                        progress=progress, ledger=ledger)
    params = {
        "eps": float(eps), "norm": norm, "version": version, "num_classes": int(num_classes),
        "steps": int(steps), "seed": int(seed),
    }
    return _result(f"autoattack-{version}", robust, params, x_adv if keep_images else None)
