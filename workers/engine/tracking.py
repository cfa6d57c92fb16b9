"""Experiment tracking: a job's params, per-epoch metrics, final figures and artifacts in
MLflow (the optional extra ``bulwark[mlflow]``; mlflow-skinny is enough).

The tracker follows the runner's events: ``started`` opens the run (params = the resolved
spec flattened to dotted keys; tags = job id, tenant, preset, dataset), every ``epoch`` logs
its row (train loss / accuracy, lr, training ε, monitor clean / FGSM / PGD, the method
traces) at step = epoch, watchdog events become tags, and ``finish`` logs the final figures
and the artifacts (report.json, report.html, the weights). A tracking failure never fails the
job: it is recorded as a ``tracking_failed`` event and tracking stops.

The server's answer is checked before anything is logged (``bulwark.contract.tracking``): an
artifact URI outside the operator's allowed roots (a ``file:`` URI into another tenant's folder,
say) fails tracking at its start. Artifacts go to the URI that was checked, never to one the
server is asked for again.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bulwark.contract.artifacts import BEST, REPORT, REPORT_HTML, WA, WEIGHTS
from bulwark.contract.report import WATCH_EVENTS, Report
from bulwark.contract.tracking import TrackingServers, artifact_location, artifact_uri_problem

Event = Callable[[str, dict[str, Any]], None]


def flatten(data: Any, prefix: str = "") -> dict[str, str]:
    """``{"a": {"b": 1}}`` → ``{"a.b": "1"}``; lists of kind-tagged parts by kind."""
    out: dict[str, str] = {}
    if isinstance(data, dict):
        for k, v in data.items():
            out.update(flatten(v, f"{prefix}{k}."))
    elif isinstance(data, list) and data and all(isinstance(x, dict) and "kind" in x
                                                 for x in data):
        for x in data:
            out.update(flatten(x, f"{prefix}{x['kind']}."))
    else:
        out[prefix.rstrip(".")] = str(data)[:500]  # MLflow's param value limit
    return out


def epoch_metrics(row: dict[str, Any]) -> dict[str, float]:
    m = {"train_loss": row.get("train_loss"), "train_acc": row.get("train_acc"),
         "lr": row.get("lr"), "train_epsilon": row.get("train_epsilon"),
         "epoch_seconds": row.get("seconds")}
    for k, v in (row.get("monitor") or {}).items():
        if k != "n":
            m[f"monitor_{k}"] = v
    for k, v in (row.get("metrics") or {}).items():
        m[f"trace_{k}"] = v
    return {k: float(v) for k, v in m.items()
            if isinstance(v, int | float) and math.isfinite(float(v))}


def final_metrics(report: Report) -> dict[str, float]:
    out: dict[str, float] = {}
    for model, res in report.models.items():
        out[f"final_{model}_clean_acc"] = res.clean_acc
        for attack, a in res.attacks.items():
            out[f"final_{model}_{attack}_acc".replace("-", "_")] = a.acc
    cert = report.certification
    if cert:
        out["certified_acr"] = cert.acr
        for r, acc in zip(cert.radii, cert.certified_accuracy, strict=True):
            out[f"certified_acc_at_{r:g}".replace(".", "_")] = acc
    out["total_seconds"] = report.timing.get("total") or 0.0
    return out


class UnsafeArtifactURI(Exception):
    """The tracking server asked for artifacts where the operator does not allow them."""


class MLflowTracker:
    def __init__(self, uri: str, experiment: str, run_name: str | None, spec: dict[str, Any],
                 tags: dict[str, str], emit: Event,
                 artifact_roots: tuple[str, ...] | None = None):
        self.uri, self.experiment, self.run_name = uri, experiment, run_name
        self.spec, self.tags, self.emit = spec, tags, emit
        self.artifact_roots = artifact_roots
        self.client = self.run_id = self.artifact_uri = None
        self.failed = False

    def _guard(self, what: str, fn: Callable[[], None]) -> None:
        if self.failed:
            return
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - tracking never fails the job
            self.failed = True
            self.emit("tracking_failed", {"tracker": "mlflow", "while": what,
                                          "error": f"{type(e).__name__}: {e}"[:500]})

    def start(self) -> None:
        def go() -> None:
            from mlflow.tracking import MlflowClient

            self.client = MlflowClient(self.uri)
            exp = self.client.get_experiment_by_name(self.experiment)
            exp_id = exp.experiment_id if exp else self.client.create_experiment(
                self.experiment, artifact_location=artifact_location(self.uri))
            run = self.client.create_run(exp_id, run_name=self.run_name, tags=self.tags)
            problem = artifact_uri_problem(run.info.artifact_uri, self.uri, self.artifact_roots)
            if problem is not None:
                raise UnsafeArtifactURI(problem)
            self.run_id, self.artifact_uri = run.info.run_id, run.info.artifact_uri
            params = flatten(self.spec)
            from mlflow.entities import Param

            items = [Param(k, v) for k, v in params.items()]
            for i in range(0, len(items), 100):
                self.client.log_batch(self.run_id, params=items[i:i + 100])
        self._guard("start", go)

    def on_event(self, kind: str, data: dict[str, Any]) -> None:
        if self.run_id is None:
            return
        if kind == "epoch":
            self._guard("epoch", lambda: self._metrics(epoch_metrics(data), data["epoch"]))
        elif kind in (*WATCH_EVENTS, "remediated", "diverged", "stopped_early"):
            self._guard(kind, lambda: self.client.set_tag(
                self.run_id, f"event.{kind}.epoch_{data.get('epoch')}", str(data)[:5000]))

    def _metrics(self, values: dict[str, float], step: int) -> None:
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step)
                                                    for k, v in values.items()])

    def finish(self, report: dict[str, Any] | None, out: Path, status: str) -> None:
        if self.run_id is None:
            return

        def go() -> None:
            if report is not None:
                typed = Report.model_validate(report)
                self._metrics(final_metrics(typed), len(typed.history))
                from mlflow.store.artifact.artifact_repository_registry import (
                    get_artifact_repository,
                )

                # the URI checked at the start, not whatever the server says when asked again
                repo = get_artifact_repository(self.artifact_uri, tracking_uri=self.uri)
                for name in (REPORT, REPORT_HTML, WEIGHTS, BEST, WA):
                    if (out / name).is_file():
                        repo.log_artifact(str(out / name))
            self.client.set_terminated(self.run_id, status=status)
        self._guard("finish", go)


def tracker_for(spec, *, emit: Event, tags: dict[str, str],
                servers: TrackingServers | None = None) -> MLflowTracker | None:
    """The job's tracker: the spec's ``tracking.mlflow`` (its own URI on a local run, a server
    the operator named), else the operator's default; None when neither asks for one. A
    target no server answers to is a ``tracking_failed`` event, as is a missing mlflow."""
    servers = servers or TrackingServers()
    cfg = spec.tracking.mlflow
    uri = servers.uri_for(cfg)
    if not uri:
        if cfg is not None:
            emit("tracking_failed", {"tracker": "mlflow", "while": "start", "error": (
                f"no tracking server named {cfg.target!r} (BULWARK_MLFLOW_TARGETS)"
                if cfg.target else "no tracking server: give tracking.mlflow.uri")})
        return None
    return MLflowTracker(uri, cfg.experiment if cfg else "bulwark",
                         (cfg.run_name if cfg else None) or spec.name,
                         spec.model_dump(mode="json"),
                         {**tags, "bulwark.preset": str(spec.recipe.preset),
                          "bulwark.dataset": spec.dataset.name}, emit,
                         artifact_roots=servers.artifact_roots)
