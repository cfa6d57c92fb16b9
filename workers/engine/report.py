"""The robustness report: environment facts and the final evaluation suite.

Accuracies are fractions in [0, 1], always next to the number of examples they count.
"""

from __future__ import annotations

import platform
import sys
import time
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
                precision: str, compiled: bool = False) -> dict[str, Any]:
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
        "compile": compiled,
        "seed": seed,
    }


class AttackProgress:
    """``progress(done, total)`` for one attack: reports ``{attack, model, done, total,
    eta_seconds}`` through ``emit`` at most every ``every`` seconds (and at the end)."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], attack: str, model: str,
                 every: float = 2.0, check: Callable[[], None] | None = None):
        self.emit, self.attack, self.model, self.every = emit, attack, model, every
        self.check = check or (lambda: None)
        self.t0 = time.perf_counter()
        self.last = -1e9

    def __call__(self, done: int, total: int) -> None:
        self.check()  # after every batch: a cancel request stops the attack here
        now = time.perf_counter()
        if done < total and now - self.last < self.every:
            return
        self.last = now
        rate = done / max(now - self.t0, 1e-9)
        self.emit({"attack": self.attack, "model": self.model, "done": done, "total": total,
                   "eta_seconds": (total - done) / rate if rate > 0 else None})


def final_evaluation(model: nn.Module, x: Tensor, y: Tensor, plan, *, eps: float, norm: str,
                     num_classes: int, seed: int, model_name: str = "last",
                     on_phase: Callable[[str, int], None] | None = None,
                     on_progress: Callable[[dict[str, Any]], None] | None = None,
                     check: Callable[[], None] | None = None) -> dict[str, Any]:
    """Clean accuracy plus the plan's attacks (FGSM, PGD-k-r, AutoAttack) on (x, y).

    ``on_phase(attack, n)`` before each attack; ``on_progress`` with the attack's progress;
    ``check()`` after every batch (it raises to stop the evaluation)."""
    phase = on_phase or (lambda name, n: None)
    report = on_progress or (lambda p: None)
    model.eval()
    bs, n = plan.batch_size, int(x.shape[0])
    clean = clean_accuracy(model, x, y, batch_size=bs)
    attacks: dict[str, Any] = {}

    def run(name: str, fn) -> None:
        phase(name, n)
        r = fn(AttackProgress(report, name, model_name, check=check))
        attacks[r.name] = r.to_dict()

    if plan.fgsm:
        run("fgsm", lambda p: fgsm_eval(model, x, y, eps=eps, norm=norm, batch_size=bs,
                                        progress=p))
    if plan.pgd is not None:
        run(f"pgd{plan.pgd.steps}-{plan.pgd.restarts}", lambda p: pgd_eval(
            model, x, y, eps=eps, norm=norm, steps=plan.pgd.steps,
            alpha=plan.pgd.alpha * eps, restarts=plan.pgd.restarts, batch_size=bs, seed=seed,
            progress=p))
    if plan.autoattack is not None:
        run(f"autoattack-{plan.autoattack.version}", lambda p: autoattack_eval(
            model, x, y, eps=eps, norm=norm, version=plan.autoattack.version,
            num_classes=num_classes, batch_size=bs, seed=seed, progress=p))
    return {"clean_acc": clean.acc, "n": clean.n, "model": model_name, "attacks": attacks}
