"""MLflow tracking against a real tracking store (MLflow's SQLite backend, read back with its
own client): params, per-epoch metrics, final figures, artifacts and tags of a real run; a
store that cannot be written is an event, never a failed job."""

from __future__ import annotations

import pytest

from contract.spec import JobSpec
from workers.engine.runner import run_job
from workers.engine.tracking import flatten

mlflow = pytest.importorskip("mlflow")


def spec(uri: str) -> JobSpec:
    return JobSpec.model_validate({
        "name": "tracked", "dataset": {"name": "digits", "val_size": 64},
        "threat": {"epsilon": 0.1}, "recipe": "fgsm-elle",
        "schedule": {"epochs": 2, "batch_size": 64},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 64, "pgd": {"steps": 2, "restarts": 1},
                                 "autoattack": None}},
        "tracking": {"mlflow": {"uri": uri, "experiment": "bulwark-test"}}})


def test_a_run_lands_in_a_real_mlflow_store(tmp_path):
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    events = []
    report = run_job(spec(uri), tmp_path / "run", progress=False,
                     tracking_tags={"bulwark.job_id": "job-1", "bulwark.tenant": "alice"},
                     on_event=lambda k, d: events.append(k))
    assert "tracking_failed" not in events
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bulwark-test")
    (run,) = client.search_runs([exp.experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    tags = run.data.tags
    assert (tags["bulwark.job_id"], tags["bulwark.tenant"]) == ("job-1", "alice")
    assert tags["bulwark.preset"] == "fgsm-elle" and tags["bulwark.dataset"] == "digits"
    params = run.data.params
    assert params["recipe.regularizers.elle.lam"] == "10000.0"  # ε 0.1 = 25.5/255
    assert params["schedule.epochs"] == "2" and params["threat.epsilon"] == "0.1"
    history = client.get_metric_history(run.info.run_id, "monitor_pgd_acc")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == [h["monitor"]["pgd_acc"] for h in report["history"]]
    lam = client.get_metric_history(run.info.run_id, "trace_elle_lambda")
    assert [m.value for m in lam] == [10000.0, 10000.0]
    final = run.data.metrics
    assert final["final_last_clean_acc"] == report["final"]["clean_acc"]
    assert final["final_last_pgd2_1_acc"] == report["final"]["attacks"]["pgd2-1"]["acc"]
    names = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"report.json", "report.html", "model.safetensors"} <= names
    stored = list((tmp_path / "mlartifacts").rglob("report.json"))
    assert len(stored) == 1, "artifacts beside the store, not in the working directory"


def test_a_tracking_failure_is_an_event_and_the_job_still_succeeds(tmp_path):
    events = []
    report = run_job(spec("sqlite:////proc/no/such/mlflow.db"), tmp_path / "run",
                     progress=False, on_event=lambda k, d: events.append((k, d)))
    failed = [d for k, d in events if k == "tracking_failed"]
    assert len(failed) == 1 and failed[0]["tracker"] == "mlflow" and failed[0]["error"]
    assert report["final"]["n"] == 64 and "finished" in [k for k, _ in events]


def test_flatten_names_parts_by_kind():
    assert flatten({"a": {"b": 1}, "regs": [{"kind": "elle", "lam": 2}], "x": [1, 2]}) == {
        "a.b": "1", "regs.elle.kind": "elle", "regs.elle.lam": "2", "x": "[1, 2]"}
