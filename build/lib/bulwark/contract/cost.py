"""What a job will cost, estimated from its spec alone (torch-free): the API refuses work past
the operator's limits before anything is queued.

Compute is counted in floating-point operations of the model: every phase's forward passes
and backward passes (a backward ≈ 2 forwards) per image, times the architecture's forward
FLOPs at the dataset's input size. Forward FLOPs were measured with torch's FlopCounterMode
(tests/test_cost.py checks the formulas against it); the estimate is meant to be right within
a factor of two — enough to tell a day of GPU time from a century of it. Memory is the
dataset held on the device as uint8.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from bulwark.contract.spec import JobSpec

# (train images, test images, channels, side) of the datasets a server knows by name
DATASET_SHAPES: dict[str, tuple[int, int, int, int]] = {
    "mnist": (60_000, 10_000, 1, 28),
    "fashion_mnist": (60_000, 10_000, 1, 28),
    "cifar10": (50_000, 10_000, 3, 32),
    "cifar100": (50_000, 10_000, 3, 32),
    "svhn": (73_257, 26_032, 3, 32),
    "digits": (1_437, 360, 1, 8),
}

# forward GFLOP of one image at the reference input (side², channels) of each architecture
_SMALL_CNN = (0.0199, 28 * 28)        # TRADES' MNIST net, 1×28×28
_MNIST_NET = (0.00122, 28 * 28)       # Wong et al.'s MNIST net, 1×28×28
_PREACT_RESNET18 = (1.111, 32 * 32)   # 3×32×32
_WIDE_RESNET_28_10 = (10.49, 32 * 32)

# forward-equivalents per image of AutoAttack's versions (APGD 100 iterations; APGD-T and FAB-T
# over 9 targets; Square 5000 queries, forward only)
_AUTOATTACK = {"standard": 3 * (100 + 900 + 900) + 5000, "apgd-ce": 3 * 100,
               "apgd-t": 3 * 900, "apgd-ce+apgd-t": 3 * (100 + 900)}


def forward_gflop(spec: JobSpec, channels: int, side: int) -> float:
    """One forward pass of ``spec.model`` on one ``channels``×``side``×``side`` image."""
    arch = spec.model.arch
    area = side * side
    if arch == "small_cnn":
        g, ref = _SMALL_CNN
        return g * area / ref * (channels + 20) / 21  # only the first conv sees the channels
    if arch == "mnist_net":
        g, ref = _MNIST_NET
        return g * area / ref * (channels + 11) / 12  # the first conv: ~1/12 of the FLOPs
    if arch == "preact_resnet18":
        g, ref = _PREACT_RESNET18
        return g * area / ref
    g, ref = _WIDE_RESNET_28_10
    depth, width = spec.model.depth, spec.model.widen_factor
    return g * area / ref * (depth - 4) / 24 * (width / 10) ** 2


def _step_units(spec: JobSpec) -> float:
    """Forward-equivalents per training image per step (a backward counts as 2)."""
    r = spec.recipe
    adv = r.adversary
    units = 3.0  # the update: forward + backward
    if adv.kind in ("fgsm", "fgsm_rs", "n_fgsm"):
        units += 3
    elif adv.kind == "pgd":
        units += 3 * adv.steps * adv.restarts
    if r.loss.kind == "trades":
        units += 1  # the clean forward p(x)
    for reg in r.regularizers:
        units += {"elle": 9, "elle_a": 9, "gradalign": 9, "aaer": 1}[reg.kind]
    if r.weight_perturbation is not None:
        units += 3
    if r.labels.kind == "adr":
        units += 1  # the teacher's forward
    return units


@dataclass
class Cost:
    tflop: float                      # all phases
    dataset_bytes: int                # the dataset as uint8 on the device
    phases: dict[str, float] = field(default_factory=dict)   # TFLOP per phase

    def describe(self) -> str:
        parts = ", ".join(f"{k} {v:.3g}" for k, v in self.phases.items() if v > 0)
        return f"about {self.tflop:.3g} TFLOP ({parts})"


def estimate(spec: JobSpec, shape: tuple[int, int, int, int] | None = None) -> Cost:
    """The cost of ``spec``. ``shape`` = (train, test, channels, side) for datasets the table
    does not know (an uploaded npz: its meta; synthetic: its own fields)."""
    d = spec.dataset
    if shape is None:
        if d.name == "synthetic":
            s = d.synthetic
            shape = (s.n_train, s.n_test, s.channels, s.image_size)
        else:
            shape = DATASET_SHAPES.get(d.name, (0, 0, 1, 1))
    n_train, n_test, c, side = shape
    if d.train_limit is not None:
        n_train = min(n_train, d.train_limit)
    if d.test_limit is not None:
        n_test = min(n_test, d.test_limit)
    g = forward_gflop(spec, c, side)
    ev = spec.evaluation
    train = 0.0
    monitor = 0.0
    if spec.mode == "train":
        fit = max(n_train - d.val_size, 0)
        train = spec.schedule.epochs * fit * _step_units(spec) * g
        mon = min(ev.monitor.size, d.val_size)
        monitor = spec.schedule.epochs * mon * (1 + 3 + 3 * ev.monitor.pgd_steps) * g
    f = ev.final
    n_eval = min(f.n or n_test, n_test)
    per_point = 1 + (3 if f.fgsm else 0)
    if f.pgd is not None:
        per_point += 3 * f.pgd.steps * f.pgd.restarts
    if f.autoattack is not None:
        per_point += _AUTOATTACK[f.autoattack.version]
    models = len(f.models)
    final = models * n_eval * per_point * g
    cert = 0.0
    if ev.certification is not None:
        ce = ev.certification
        points = math.ceil(n_test / ce.skip)
        if ce.num_points is not None:
            points = min(points, ce.num_points)
        cert = points * (ce.n0 + ce.n) * g
        if ce.empirical is not None:
            e = ce.empirical
            cert += min(e.num_points, n_test) * (3 * e.steps * e.noise_samples + e.predict_n) * g
    phases = {"training": train / 1e3, "monitor": monitor / 1e3, "evaluation": final / 1e3,
              "certification": cert / 1e3}
    return Cost(tflop=sum(phases.values()), dataset_bytes=(n_train + n_test) * c * side * side,
                phases=phases)


def check_limits(cost: Cost, limits: dict[str, Any]) -> str | None:
    """A readable refusal when ``cost`` passes one of ``limits`` (``max_job_tflop``,
    ``max_dataset_bytes``), else None."""
    if cost.tflop > limits["max_job_tflop"]:
        return (f"the job needs {cost.describe()}; this server allows at most "
                f"{limits['max_job_tflop']:.3g} TFLOP per job — fewer epochs, attack steps, "
                "restarts, test points or certification samples, or a smaller model")
    if cost.dataset_bytes > limits["max_dataset_bytes"]:
        return (f"the dataset needs {cost.dataset_bytes / 2**30:.3g} GiB on the device; this "
                f"server allows at most {limits['max_dataset_bytes'] / 2**30:.3g} GiB")
    return None
