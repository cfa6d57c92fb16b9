"""MLflow tracking against a real tracking store (MLflow's SQLite backend, read back with its
own client): params, per-epoch metrics, final figures, artifacts and tags of a real run; a
store that cannot be written is an event, never a failed job."""

from __future__ import annotations

import pytest

from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.runner import run_job
from bulwark.workers.engine.tracking import flatten

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


@pytest.mark.stack  # starts MLflow's own server: not in the fast lane
def test_mlflow_ui_shows_a_run_bulwark_logged(tmp_path):
    """`mlflow ui` (the `mlflow` package the `bulwark[mlflow]` extra installs) serves its page
    and, through its API, the run a Bulwark job logged to the same store."""
    import subprocess
    import sys
    import time

    import httpx

    from bulwark.workers.client.serve import free_port

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    run_job(spec(uri), tmp_path / "run", progress=False)
    port = free_port()
    ui = subprocess.Popen([sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", uri,
                           "--host", "127.0.0.1", "--port", str(port)], cwd=tmp_path,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert ui.poll() is None, f"mlflow ui exited: {ui.stderr.read()[-2000:]}"
            try:
                page = httpx.get(base + "/", timeout=5)
                break
            except httpx.TransportError:
                assert time.monotonic() < deadline, "mlflow ui did not answer in 180 s"
                time.sleep(1)
        assert page.status_code == 200 and "<html" in page.text.lower()
        exp = httpx.get(base + "/ajax-api/2.0/mlflow/experiments/get-by-name",
                        params={"experiment_name": "bulwark-test"}, timeout=30).json()
        runs = httpx.post(base + "/ajax-api/2.0/mlflow/runs/search", timeout=30,
                          json={"experiment_ids": [exp["experiment"]["experiment_id"]]}).json()
        (run,) = runs["runs"]
        assert run["info"]["run_name"] == "tracked" and run["info"]["status"] == "FINISHED"
    finally:
        ui.terminate()
        try:
            ui.wait(timeout=30)
        except subprocess.TimeoutExpired:
            ui.kill()


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


# ------------------------------------------------------------------ where a server may write
@pytest.mark.parametrize("uri, roots, ok", [
    ("mlflow-artifacts:/1/abc/artifacts", (), True),
    ("mlflow-artifacts://mlflow.internal:5000/1/abc/artifacts", (), True),
    ("mlflow-artifacts://evil.example:5000/1/abc", (), False),  # another host: not the server
    ("mlflow-artifacts:/1/../../x", (), False),
    ("file:///srv/bulwark/artifacts/tenants/bob/jobs/1", (), False),
    ("s3://team-mlflow/artifacts/1/abc", ("s3://team-mlflow/artifacts",), True),
    ("s3://team-mlflow/artifacts-evil/1", ("s3://team-mlflow/artifacts",), False),
    ("s3://team-mlflow/artifacts/../private/1", ("s3://team-mlflow/artifacts",), False),
    ("s3://team-mlflow/artifacts/%2e%2e/private", ("s3://team-mlflow/artifacts",), False),
    ("s3://other-bucket/artifacts/1", ("s3://team-mlflow/artifacts",), False),
    ("http://169.254.169.254/latest", ("s3://team-mlflow/artifacts",), False),
    ("file:///anything/at/all", None, True),  # bulwark run: the user's own server
])
def test_artifact_uris_a_server_may_answer(uri, roots, ok):
    from bulwark.contract.tracking import artifact_uri_problem

    problem = artifact_uri_problem(uri, "http://mlflow.internal:5000", roots)
    assert (problem is None) == ok, problem


def test_a_file_root_holds_no_symlink_out_of_it(tmp_path):
    from bulwark.contract.tracking import artifact_uri_problem

    root, outside = tmp_path / "mlartifacts", tmp_path / "tenants"
    (root / "1").mkdir(parents=True)
    outside.mkdir()
    (root / "1" / "link").symlink_to(outside)
    roots = (root.as_uri(),)
    assert artifact_uri_problem((root / "1" / "run").as_uri(), "sqlite:///x.db", roots) is None
    assert artifact_uri_problem((root / "1" / "link").as_uri(), "sqlite:///x.db", roots)


def test_a_hostile_server_gets_no_file_written_where_it_points(tmp_path):
    """The fake tracking server process answers runs/create with a folder of someone else's.
    The service's servers (artifact roots checked) write nothing there; `bulwark run`, which
    trusts the server its user named, does write there — which shows the check can fail."""
    import hashlib
    import subprocess
    import sys

    import httpx

    from bulwark.contract.tracking import TrackingServers
    from bulwark.workers.client.serve import free_port, wait_for_port
    from tests.service_stack import REPO

    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "report.json").write_text('{"theirs": true}')

    def snapshot() -> dict[str, str]:
        return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in victim.iterdir()}

    before = snapshot()
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_mlflow.py"), str(port)])
    try:
        wait_for_port(port, proc, "the fake tracking server")
        url = f"http://127.0.0.1:{port}"
        httpx.post(f"{url}/control", json={"artifact_uri": victim.as_uri()})
        named = JobSpec.model_validate({**spec("unused").model_dump(mode="json"),
                                        "tracking": {"mlflow": {"target": "team"}}})
        events = []
        run_job(named, tmp_path / "service", progress=False,
                on_event=lambda k, d: events.append((k, d)),
                tracking=TrackingServers.operator({"team": url}, None, []))
        (failed,) = [d for k, d in events if k == "tracking_failed"]
        assert "artifact URI" in failed["error"] and "finished" in [k for k, _ in events]
        assert snapshot() == before

        run_job(spec(url), tmp_path / "local", progress=False)  # bulwark run: trusted
        assert snapshot() != before and (victim / "model.safetensors").is_file()
    finally:
        proc.kill()
        proc.wait()


def test_a_named_target_resolves_and_an_unknown_one_is_an_event(tmp_path):
    from bulwark.contract.tracking import TrackingServers

    uri = f"sqlite:///{tmp_path / 'team.db'}"
    servers = TrackingServers.operator({"team": uri}, None, [])
    named = {**spec("unused").model_dump(mode="json")}
    named["tracking"] = {"mlflow": {"target": "team", "experiment": "bulwark-test"}}
    events = []
    run_job(JobSpec.model_validate(named), tmp_path / "run", progress=False,
            on_event=lambda k, d: events.append(k), tracking=servers)
    assert "tracking_failed" not in events, "the operator's own SQLite store: artifacts beside it"
    assert list((tmp_path / "mlartifacts").rglob("report.json"))
    named["tracking"] = {"mlflow": {"target": "nobody"}}
    events = []
    run_job(JobSpec.model_validate(named), tmp_path / "run2", progress=False,
            on_event=lambda k, d: events.append((k, d)), tracking=servers)
    (failed,) = [d for k, d in events if k == "tracking_failed"]
    assert "'nobody'" in failed["error"]
    with pytest.raises(ValueError, match="not both"):
        JobSpec.model_validate({"tracking": {"mlflow": {"target": "team", "uri": uri}}})
