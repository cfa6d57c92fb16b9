"""The run's report: built from a finished ``Training`` (runner.py) and its final figures,
written as report.json and report.html beside the weights (contract/report.py's ``Report``
reads it back)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import torch

from bulwark.contract.artifacts import (
    BEST,
    CERTIFY_TSV,
    FINAL_STATE,
    REPORT,
    REPORT_HTML,
    WA,
    WEIGHTS,
)
from bulwark.contract.files import write_json, write_text
from bulwark.contract.report import REPORT_VERSION, Report
from bulwark.contract.verdict import verdict
from bulwark.workers.engine.checkpoint import save_weights
from bulwark.workers.engine.environment import environment
from bulwark.workers.engine.html_report import render as render_html


def majority_share(labels: torch.Tensor, n: int | None) -> float:
    """The largest class's share of the first ``n`` labels (the images the final suite
    evaluates): the accuracy of always predicting it."""
    y = labels[:n] if n is not None else labels
    return round(float(torch.bincount(y.long()).max()) / max(int(y.numel()), 1), 6)


def selection(job: Any) -> dict[str, Any] | None:
    """The monitor's best epoch against the last (early stopping's choice and the robust
    generalization gap); None without a monitor."""
    if job.best is None:
        return None
    last = job.history[-1]["monitor"] if job.history else None
    last_pgd = last["pgd_acc"] if last else None
    return {**job.best, "last_epoch": job.spec.schedule.epochs,
            "last_monitor_pgd_acc": last_pgd,
            "robust_generalization_gap": None if last_pgd is None
            else job.best["monitor_pgd_acc"] - last_pgd,
            "note": "best = the epoch with the highest monitor PGD accuracy (validation "
                    "slice); the gap is best minus last"}


def build_report(job: Any, finals: dict[str, dict[str, Any]],
                 certification: dict[str, Any] | None, timing: Any,
                 world: int) -> dict[str, Any]:
    """The report of ``job`` (a runner ``Training`` that has trained and been evaluated),
    its last weights (and the weight average's) saved beside it first."""
    spec, data, out = job.spec, job.data, job.out
    save_weights(out / WEIGHTS, job.model, job.meta)
    if job.recipe.weight_average is not None:
        save_weights(out / WA, job.recipe.weight_average.module, {**job.meta, "model": "wa"})
    env = environment(job.dev, spec.schedule.seed, job.channels_last, spec.compute.precision,
                      job.compiled)
    report = {
        "report_version": REPORT_VERSION,
        "spec": spec.model_dump(mode="json"),
        "environment": {**env, "training_ranks": world},
        "dataset": {"name": data.name, "num_classes": data.num_classes, **job.sizes,
                    "test": int(data.test_x.shape[0]), "monitor": job.n_mon,
                    "shape": list(data.train_x.shape[1:]),
                    "final_split": spec.evaluation.final.split,
                    # the chance level of the final figures (contract/verdict.py)
                    "majority_share": majority_share(job.eval_y, spec.evaluation.final.n)},
        "history": job.history,
        "events": job.watchdog.events,
        "final": finals.get("last") or next(iter(finals.values())),
        "final_models": finals,
        "selection": selection(job),
        "stopped_early": job.stopped_early,
        "remediations": job.remediations,
        "certification": certification,
        "timing": {k: round(v, 3) for k, v in timing.snapshot().items()},
        "artifacts": [n for n in (REPORT, REPORT_HTML, WEIGHTS, BEST, WA, CERTIFY_TSV)
                      if n in (REPORT, REPORT_HTML) or (out / n).exists()],
        "finished_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
    }
    report["verdict"] = verdict(report)  # what the job made, beside its state
    Report.model_validate(report)  # the runner writes only what the contract reads
    return report


def write_report(out: Path, report: dict[str, Any], *, certified: bool) -> None:
    """report.json, then report.html (with the certification's rows when it ran); the final
    evaluation's ledger goes, the report holding what it kept."""
    write_json(out / REPORT, report)
    (out / FINAL_STATE).unlink(missing_ok=True)
    tsv = out / CERTIFY_TSV
    write_text(out / REPORT_HTML, render_html(
        report, tsv.read_text() if certified and tsv.is_file() else None))
