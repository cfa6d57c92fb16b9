"""Certified robustness for a job: CERTIFY over the test set, plus an empirical attack on the
smoothed classifier. Writes ``certify.tsv`` (Cohen's columns; resumable) next to the report."""

from __future__ import annotations

import datetime as _dt
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from bulwark.contract.artifacts import CERTIFY_TSV
from bulwark.contract.files import write_text
from bulwark.defenses.smoothing import Exchange, Row, Smooth, certify_dataset, summarize

TSV_COLUMNS = ("idx", "label", "predict", "radius", "correct", "time")


class CertifyTSV:
    """``certify_dataset``'s rows in a TSV file, the reference's ``certify.py`` format (columns
    ``idx label predict radius correct time``; ``time`` in seconds, ``radius`` at full
    precision), appended and fsync'ed after every chunk. The settings that change the rows
    (σ, n0, n, α, num_classes) are kept beside it in ``<path>.json``; rows made with other
    settings are refused (``ValueError``), never mixed."""

    def __init__(self, path: Path | str):
        self.path = Path(path)

    def __str__(self) -> str:
        return str(self.path)

    def load(self, settings: dict[str, Any], *, writer: bool) -> list[Row]:
        self._check_meta(settings, write=writer)
        return self._read(repair=writer)

    def append(self, rows: list[Row]) -> None:
        if not self.path.exists() or self.path.stat().st_size == 0:
            write_text(self.path, "\t".join(TSV_COLUMNS) + "\n")
        with open(self.path, "a") as f:
            for i, label, pred, radius, correct, t in rows:
                f.write(f"{i}\t{label}\t{pred}\t{radius!r}\t{correct}\t{t:.6f}\n")
            f.flush()
            os.fsync(f.fileno())

    def _check_meta(self, meta: dict[str, Any], write: bool = True) -> None:
        meta_path = self.path.with_name(self.path.name + ".json")
        if meta_path.exists():
            old = json.loads(meta_path.read_text())
            diff = {k: (old.get(k), v) for k, v in meta.items() if old.get(k) != v}
            if diff:
                raise ValueError(f"{self.path} was written with other settings (was, now): "
                                 f"{diff}")
            return
        if write:
            write_text(meta_path, json.dumps(meta, indent=1) + "\n")

    def _read(self, repair: bool = True) -> list[Row]:
        """The complete rows (a missing file has none). A trailing line cut short by a crash
        is dropped (``repair``: from the file too, so that the next append starts on a fresh
        line)."""
        if not self.path.exists():
            return []
        text = self.path.read_text()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]
            if repair:
                write_text(self.path, text)
        lines = text.splitlines()
        if not lines:
            return []
        if tuple(lines[0].split("\t")) != TSV_COLUMNS:
            raise ValueError(f"{self.path}: header {lines[0]!r}, expected "
                             f"{chr(9).join(TSV_COLUMNS)!r}")
        rows = []
        for line in lines[1:]:
            i, label, pred, radius, correct, t = line.split("\t")
            rows.append((int(i), int(label), int(pred), float(radius), int(correct),
                         _parse_seconds(t)))
        return rows


def _parse_seconds(s: str) -> float:
    """Seconds, or the reference's ``str(timedelta)`` ("0:00:14.123456")."""
    if ":" not in s:
        return float(s)
    h, mnt, sec = s.split(":")
    return _dt.timedelta(hours=int(h), minutes=int(mnt), seconds=float(sec)).total_seconds()


def select_points(n_test: int, plan) -> Tensor:
    idx = torch.arange(0, n_test, plan.skip)
    return idx[:plan.num_points] if plan.num_points else idx


def smoothed_pgd_accuracy(model: nn.Module, smooth: Smooth, x: Tensor, y: Tensor, plan, *,
                          alpha: float, batch_size: int) -> dict[str, Any]:
    """torchattacks' PGDRSL2 (Salman et al. 2019) against the base model under Gaussian noise,
    then PREDICT on the adversarial inputs: accuracy of the smoothed classifier g; abstentions
    count as wrong."""
    import torchattacks

    from bulwark.attacks.evaluation import check_image_range

    check_image_range(x)
    attack = torchattacks.PGDRSL2(model, eps=plan.eps, alpha=2 * plan.eps / plan.steps,
                                  steps=plan.steps, noise_type="guassian",
                                  noise_sd=smooth.sigma, noise_batch_size=plan.noise_samples,
                                  batch_max=max(batch_size, plan.noise_samples))
    was_training = model.training
    model.eval()
    try:
        x_adv = torch.cat([attack(x[i:i + 64], y[i:i + 64]) for i in range(0, len(x), 64)])
    finally:
        model.train(was_training)
    pred = smooth.predict_batch(x_adv, plan.predict_n, alpha, batch_size)
    correct = int((pred == y.to(pred.device)).sum())
    return {"acc": correct / len(x), "n": len(x),
            "params": {"attack": "PGDRSL2 (torchattacks)", "eps": plan.eps, "norm": "l2",
                       "steps": plan.steps, "alpha": 2 * plan.eps / plan.steps,
                       "noise_samples": plan.noise_samples, "predict_n": plan.predict_n,
                       "predict_alpha": alpha}}


def run_certification(model: nn.Module, x: Tensor, y: Tensor, plan, *, num_classes: int,
                      out: Path, precision: str, channels_last: bool, seed: int,
                      emit: Callable[[str, dict], None],
                      check: Callable[[], None] | None = None,
                      ranks: tuple[int, int, Exchange] | None = None) -> dict[str, Any] | None:
    """CERTIFY every selected test point (resumable through ``certify.tsv``), then the
    smoothed-PGD attack; ``check()`` runs every few noise batches and may raise to stop.
    ``ranks`` (rank, world, exchange): certify with the job's other ranks (see
    ``certify_dataset``); rank 0 alone then runs the attack and returns the report."""
    idx = select_points(len(x), plan)
    smooth = Smooth(model, num_classes, plan.sigma, precision=precision,
                    channels_last=channels_last, check=check)
    t0 = time.perf_counter()
    result = certify_dataset(smooth, x[idx], y[idx], n0=plan.n0, n=plan.n, alpha=plan.alpha,
                             batch_size=plan.batch_size, chunk=plan.chunk,
                             store=CertifyTSV(out / CERTIFY_TSV), seed=seed, idx=idx.tolist(),
                             on_progress=lambda p: emit("certification", p), ranks=ranks)
    if ranks is not None and ranks[0] != 0:
        return None
    seconds = time.perf_counter() - t0
    summary = summarize(result, plan.radii)
    samples = len(idx) * (plan.n0 + plan.n)
    report: dict[str, Any] = {
        "sigma": plan.sigma, "n0": plan.n0, "n": plan.n, "alpha": plan.alpha,
        "num_points": summary["num_points"], "skip": plan.skip,
        "radii": list(plan.radii),
        "certified_accuracy": [summary["certified_accuracy"][r] for r in plan.radii],
        "acr": summary["acr"], "abstain_rate": summary["abstain_rate"],
        "samples_per_second": samples / max(sum(result.seconds), 1e-9),
        "seconds": seconds, "precision": precision, "per_point": CERTIFY_TSV,
        "empirical": None,
    }
    if plan.empirical is not None:
        emit("phase", {"phase": "smoothed_attack"})
        m = min(plan.empirical.num_points, len(x))
        torch.manual_seed(seed)
        report["empirical"] = smoothed_pgd_accuracy(
            model, smooth, x[:m], y[:m], plan.empirical, alpha=plan.alpha,
            batch_size=plan.batch_size)
    return report
