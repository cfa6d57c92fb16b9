"""The final attacks: the report's suite (clean, FGSM, PGD, AutoAttack) on each model, with
its progress and a ledger that resumes a stopped evaluation batch by batch.

Accuracies are fractions in [0, 1], always next to the number of examples they count.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bulwark.attacks.evaluation import Ledger, autoattack_eval, clean_accuracy, fgsm_eval, pgd_eval
from bulwark.contract.files import write_text


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


def weights_digest(model: nn.Module) -> str:
    """sha256 of ``model``'s state (names, dtypes, shapes and bytes)."""
    h = hashlib.sha256()
    for name, t in model.state_dict().items():
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class FinalLedger:
    """The final suite's finished batches, kept in one JSON file (``final.partial.json``) so
    that a stopped evaluation resumes where it stopped: per model, the identity of what was
    evaluated (the weights' digest, the test images, ε, the seed, the plan) and each attack's
    robust masks by batch. A model whose identity changed (trained further, another plan)
    starts over: its old batches are dropped, never mixed in. Rewritten atomically after each
    batch."""

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            state = json.loads(self.path.read_text())
        except (OSError, ValueError):
            state = {}
        self.models: dict[str, dict[str, Any]] = (state.get("models") or {}
                                                  if isinstance(state, dict) else {})

    def model(self, name: str, identity: dict[str, Any]) -> _ModelLedger:
        identity = json.loads(json.dumps(identity))  # as it reads back
        entry = self.models.get(name)
        if not isinstance(entry, dict) or entry.get("identity") != identity:
            self.models[name] = entry = {"identity": identity, "attacks": {}}
        return _ModelLedger(self, entry)

    def save(self) -> None:
        write_text(self.path, json.dumps({"format": 1, "models": self.models}))

    def clear(self) -> None:
        self.path.unlink(missing_ok=True)


class _ModelLedger:
    """One model's entry. ``before``: the seconds earlier processes spent evaluating this model
    (what its kept batches cost); the entry's ``seconds`` grows with this process's time at
    every save, so a resumed run's report counts the whole suite."""

    def __init__(self, owner: FinalLedger, entry: dict[str, Any]):
        self.owner, self.entry = owner, entry
        seconds = entry.get("seconds")
        self.before = float(seconds) if isinstance(seconds, int | float) and seconds >= 0 else 0.0
        self.t0 = time.perf_counter()

    def attack(self, name: str) -> Ledger:
        return _AttackLedger(self, self.entry["attacks"].setdefault(name, {}))

    def save(self) -> None:
        self.entry["seconds"] = round(self.before + time.perf_counter() - self.t0, 3)
        self.owner.save()


class _AttackLedger:
    """One attack's batches: ``"start:stop"`` → the robust mask as a string of 0s and 1s."""

    def __init__(self, owner: _ModelLedger, batches: dict[str, str]):
        self.owner, self.batches = owner, batches

    def get(self, start: int, stop: int) -> list[bool] | None:
        bits = self.batches.get(f"{start}:{stop}")
        if not isinstance(bits, str) or len(bits) != stop - start or set(bits) - {"0", "1"}:
            return None
        return [b == "1" for b in bits]

    def put(self, start: int, stop: int, robust: list[bool]) -> None:
        self.batches[f"{start}:{stop}"] = "".join("1" if r else "0" for r in robust)
        self.owner.save()


def final_evaluation(model: nn.Module, x: Tensor, y: Tensor, plan, *, eps: float, norm: str,
                     num_classes: int, seed: int, model_name: str = "last",
                     on_phase: Callable[[str, int], None] | None = None,
                     on_progress: Callable[[dict[str, Any]], None] | None = None,
                     check: Callable[[], None] | None = None,
                     ledger: _ModelLedger | None = None) -> dict[str, Any]:
    """Clean accuracy plus the plan's attacks (FGSM, PGD-k-r, AutoAttack) on (x, y).

    ``on_phase(attack, n)`` before each attack; ``on_progress`` with the attack's progress;
    ``check()`` after every batch (it raises to stop the evaluation); ``ledger`` (a
    :class:`FinalLedger`'s entry for this model): the batches finished before are taken from
    it, and each batch finished now is added to it."""
    phase = on_phase or (lambda name, n: None)
    report = on_progress or (lambda p: None)
    model.eval()
    bs, n = plan.batch_size, int(x.shape[0])
    clean = clean_accuracy(model, x, y, batch_size=bs)
    attacks: dict[str, Any] = {}

    def run(name: str, fn) -> None:
        phase(name, n)
        r = fn(AttackProgress(report, name, model_name, check=check),
               None if ledger is None else ledger.attack(name))
        attacks[r.name] = r.to_dict()

    if plan.fgsm:
        run("fgsm", lambda p, book: fgsm_eval(model, x, y, eps=eps, norm=norm, batch_size=bs,
                                              progress=p, ledger=book))
    if plan.pgd is not None:
        run(f"pgd{plan.pgd.steps}-{plan.pgd.restarts}", lambda p, book: pgd_eval(
            model, x, y, eps=eps, norm=norm, steps=plan.pgd.steps,
            alpha=plan.pgd.alpha * eps, restarts=plan.pgd.restarts, batch_size=bs, seed=seed,
            progress=p, ledger=book))
    if plan.autoattack is not None:
        run(f"autoattack-{plan.autoattack.version}", lambda p, book: autoattack_eval(
            model, x, y, eps=eps, norm=norm, version=plan.autoattack.version,
            num_classes=num_classes, batch_size=bs, seed=seed, progress=p, ledger=book))
    return {"clean_acc": clean.acc, "n": clean.n, "model": model_name, "attacks": attacks}
