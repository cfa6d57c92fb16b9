"""A tenant never reaches a server path (issue: "tenants can read server files"), against the
real stack: a redis-server process, uvicorn, Celery prefork workers and trainer processes, on
SQLite and PostgreSQL. Through the API a job names a dataset the server has or one the tenant
uploaded; paths and downloads are `bulwark run` features; errors show no server path."""

from __future__ import annotations

import io
import re

import numpy as np
import pytest

from bulwark.store.queue import make_celery
from bulwark.store.settings import Settings
from bulwark.store.store import Store
from bulwark.workers.jobs.trainer import scrub_paths
from tests.cli import CLI
from tests.service_stack import (
    tiny_spec,
    wait_state,
)

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane

ABS_PATH = re.compile(r"(?<![:\w/.~-])/(?!v1/)[A-Za-z0-9_.-]+/")  # a server path, not a route


def npz_bytes(n_train=96, n_test=32, classes=4, **extra) -> bytes:
    rng = np.random.default_rng(0)
    arrays = {"x_train": rng.integers(0, 256, (n_train, 8, 8, 1), dtype=np.uint8),
              "y_train": np.arange(n_train) % classes,
              "x_test": rng.integers(0, 256, (n_test, 8, 8, 1), dtype=np.uint8),
              "y_test": np.arange(n_test) % classes, **extra}
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


def _npz_job(path: str, **over) -> dict:
    spec = tiny_spec(epochs=1, name="npz", dataset={"name": "npz", "path": path, "val_size": 16})
    spec.update(over)
    return spec


def test_server_paths_and_downloads_are_refused_and_store_nothing(stack, alice):
    before = alice.get("/v1/jobs").json()["total"]
    home = str(stack.home)
    cases = [
        ({**tiny_spec(), "dataset": {"name": "cifar10", "root": home}}, "root"),
        ({**tiny_spec(), "dataset": {"name": "mnist", "download": True}}, "download"),
        (_npz_job(f"{home}/artifacts/tenants/bob/jobs/x/checkpoint.pt"), "path"),
        (_npz_job("../../etc/passwd"), "path"),
        (_npz_job("datasets/00000000-0000-0000-0000-000000000000"), "path"),
    ]
    for spec, field in cases:
        r = alice.post("/v1/jobs", json=spec)
        assert r.status_code == 422, (field, r.text)
        (d,) = r.json()["detail"]
        assert d["loc"] == ["body", "dataset", field]
        assert "POST /v1/datasets" in d["msg"] or "operator" in d["msg"]
    for uri in ("sqlite:////etc/mlflow.db", f"file://{home}/mlruns", "./mlruns"):
        r = alice.post("/v1/jobs", json={**tiny_spec(), "tracking": {"mlflow": {"uri": uri}}})
        assert r.status_code == 422, (uri, r.text)
        (d,) = r.json()["detail"]
        assert d["loc"] == ["body", "tracking", "mlflow", "uri"]
        assert "BULWARK_MLFLOW_TARGETS" in d["msg"]
    assert alice.get("/v1/jobs").json()["total"] == before, "nothing was stored"


def test_an_uploaded_dataset_trains_and_only_for_its_owner(stack, alice, bob):
    r = alice.post("/v1/datasets", files={"file": ("d.npz", npz_bytes())})
    assert r.status_code == 201, r.text
    up = r.json()
    assert up["meta"] == {"train": 96, "test": 32, "shape": [1, 8, 8], "num_classes": 4}
    ref = f"datasets/{up['id']}"
    assert bob.post("/v1/jobs", json=_npz_job(ref)).status_code == 422, "alice's data"
    job = alice.post("/v1/jobs", json=_npz_job(ref)).json()
    done = wait_state(alice, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    report = alice.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["spec"]["dataset"]["path"] == ref, "the report names the upload, not a path"
    assert report["dataset"]["train"] == 96 - 16 and report["dataset"]["test"] == 32
    assert str(stack.home) not in alice.get(f"/v1/jobs/{job['id']}/report").text


@pytest.mark.parametrize("content, status, words", [
    (npz_bytes(x_train=np.array([{"a": 1}] * 96, dtype=object)), 422, "cannot read npz"),
    (b"PK\x03\x04 not really a zip", 422, "cannot read npz"),
    (npz_bytes(y_train=np.full(96, -1)), 422, "y_train must be in 0..999"),
    (npz_bytes(n_train=20000), 413, "larger than"),  # the stack caps uploads at 1 MiB
])
def test_bad_dataset_uploads_are_refused_without_a_trace(stack, alice, content, status, words):
    r = alice.post("/v1/datasets", files={"file": ("d.npz", content)})
    assert r.status_code == status, r.text
    assert words in r.json()["detail"]
    assert not ABS_PATH.search(r.json()["detail"]), "no server path in the message"
    folder = stack.home / "artifacts" / "tenants" / "alice" / "datasets"
    assert not list(folder.glob("*.upload")), "the spooled file is gone"


def test_a_missing_server_dataset_fails_without_showing_server_paths(stack, alice):
    job = alice.post("/v1/jobs", json={**tiny_spec(), "dataset": {"name": "cifar10"}}).json()
    done = wait_state(alice, job["id"], ("succeeded", "failed"))
    assert done["state"] == "failed" and done["attempt"] == 1, "bad input: not retried"
    assert "is not on this server" in done["error"] and "POST /v1/datasets" in done["error"]
    assert not ABS_PATH.search(done["error"]), done["error"]


def test_the_worker_rechecks_a_job_that_bypassed_the_api(stack, alice):
    """A row written straight into the store (another client of the database) still cannot
    make the worker open a server path."""
    store = Store(stack.database_url)
    victim = str(stack.home / "bulwark.db")
    job, _ = store.create_job("alice", _npz_job(victim), max_attempts=3, max_queued=100)
    app = make_celery(Settings(redis_url=stack.env["BULWARK_REDIS_URL"]))
    app.send_task("bulwark.run_job", args=[job.id], task_id=f"{job.id}.0", queue="bulwark")
    done = wait_state(alice, job.id, ("succeeded", "failed"))
    assert done["state"] == "failed" and "dataset.path" in done["error"]
    assert victim not in done["error"] and not ABS_PATH.search(done["error"])


def test_scrub_paths_keeps_urls_and_fractions():
    msg = ("Looked in:\n  /srv/data/cifar-10-batches-py (missing)\n"
           "(e.g. /work/x/data/mnist), published at https://www.cs.toronto.edu/~kriz/; ε 8/255;"
           " upload with POST /v1/datasets")
    out = scrub_paths(msg)
    assert "/srv" not in out and "/work" not in out and out.count("<server path>") == 2
    assert "https://www.cs.toronto.edu/~kriz/" in out and "8/255" in out
    assert "POST /v1/datasets" in out


def test_sdk_and_cli_upload_a_dataset(stack, alice, tmp_path):
    import subprocess

    import bulwark
    from tests.service_stack import REPO

    key = stack.key("erin")
    path = tmp_path / "mine.npz"
    path.write_bytes(npz_bytes())
    up = bulwark.Client(stack.url, key).upload_dataset(path)
    assert up.meta["num_classes"] == 4 and up.size == path.stat().st_size
    out = subprocess.run([*CLI, "upload", str(path),
                          "--url", stack.url, "--key", key], capture_output=True, text=True,
                         cwd=REPO, timeout=60)
    assert out.returncode == 0 and '"path": "datasets/' in out.stdout, out.stderr
