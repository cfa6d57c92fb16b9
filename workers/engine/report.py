"""The robustness report: environment facts and the final evaluation suite.

Accuracies are fractions in [0, 1], always next to the number of examples they count.
"""

from __future__ import annotations

import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from attacks.evaluation import autoattack_eval, clean_accuracy, fgsm_eval, pgd_eval

REPORT_VERSION = 1


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo`` where there is one)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device: torch.device, seed: int, channels_last: bool,
                precision: str) -> dict[str, Any]:
    return {
        "bulwark": _version("bulwark"),
        "torch": torch.__version__,
        "torchattacks": _version("torchattacks"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "device": str(device),
        "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                        else cpu_model()),
        "threads": torch.get_num_threads(),
        "precision": precision,
        "channels_last": channels_last,
        "seed": seed,
    }


def final_evaluation(model: nn.Module, x: Tensor, y: Tensor, plan, *, eps: float, norm: str,
                     num_classes: int, seed: int,
                     on_phase: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Clean accuracy plus the plan's attacks (FGSM, PGD-k-r, AutoAttack) on (x, y)."""
    phase = on_phase or (lambda name: None)
    model.eval()
    bs = plan.batch_size
    clean = clean_accuracy(model, x, y, batch_size=bs)
    attacks: dict[str, Any] = {}
    if plan.fgsm:
        phase("fgsm")
        r = fgsm_eval(model, x, y, eps=eps, norm=norm, batch_size=bs)
        attacks[r.name] = r.to_dict()
    if plan.pgd is not None:
        phase("pgd")
        r = pgd_eval(model, x, y, eps=eps, norm=norm, steps=plan.pgd.steps,
                     alpha=plan.pgd.alpha * eps, restarts=plan.pgd.restarts, batch_size=bs,
                     seed=seed)
        attacks[r.name] = r.to_dict()
    if plan.autoattack is not None:
        phase("autoattack")
        r = autoattack_eval(model, x, y, eps=eps, norm=norm, version=plan.autoattack.version,
                            num_classes=num_classes, batch_size=bs, seed=seed)
        attacks[r.name] = r.to_dict()
    return {"clean_acc": clean.acc, "n": clean.n, "model": "last", "attacks": attacks}
