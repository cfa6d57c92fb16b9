"""Artifacts in an S3-compatible bucket (BULWARK_ARTIFACT_URL), against a real S3-speaking
server process: moto's standalone server (``python -m moto.server``), started here. The API
and the worker get different artifact roots, so nothing reaches the API but through the bucket;
a worker host killed mid-run is replaced by one with a disk of its own, which resumes from the
checkpoint the first left in the bucket."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time

import pytest

from bulwark.store.settings import Settings
from bulwark.store.storage import S3Artifacts, artifacts
from bulwark.store.store import Store
from tests.service_stack import Stack, tiny_spec, wait_event, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane

pytest.importorskip("boto3")
pytest.importorskip("moto.server")

BUCKET = "bulwark-test"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "bulwark", "AWS_SECRET_ACCESS_KEY": "bulwark-secret",
               "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server process on a free port, with an empty bucket; yields its endpoint."""
    import boto3

    from bulwark.workers.client.serve import free_port, wait_for_port

    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1",
                                 "-p", str(port)], stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
    try:
        wait_for_port(port, proc, "moto's S3 server", timeout=60)
        endpoint = f"http://127.0.0.1:{port}"
        client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                              aws_access_key_id=CREDENTIALS["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=CREDENTIALS["AWS_SECRET_ACCESS_KEY"])
        client.create_bucket(Bucket=BUCKET)
        yield endpoint, client
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def objects(client, prefix: str = "") -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["Size"] for page in pages for o in page.get("Contents", [])}


def test_settings_refuse_an_url_that_is_not_s3():
    with pytest.raises(ValueError, match="s3://bucket/prefix"):
        Settings(artifact_url="https://example.com/bucket")
    assert Settings(artifact_url="").artifact_url == ""


def test_store_round_trip(s3, tmp_path, monkeypatch):
    endpoint, client = s3
    for k, v in CREDENTIALS.items():
        monkeypatch.setenv(k, v)
    store = artifacts(Settings(home=tmp_path, artifact_url=f"s3://{BUCKET}/unit/",
                               s3_endpoint_url=endpoint))
    assert isinstance(store, S3Artifacts) and store.remote and store.prefix == "unit"
    blob = os.urandom(3 * (1 << 20) + 17)  # more than one chunk
    src = tmp_path / "src.bin"
    src.write_bytes(blob)
    store.push("tenants/t/jobs/j/model.safetensors", src)
    store.push("tenants/t/jobs/j2/report.json", src)
    assert objects(client, "unit/") == {"unit/tenants/t/jobs/j/model.safetensors": len(blob),
                                        "unit/tenants/t/jobs/j2/report.json": len(blob)}
    size, chunks = store.open("tenants/t/jobs/j/model.safetensors")
    assert size == len(blob) and b"".join(chunks) == blob
    assert store.read("tenants/t/jobs/j/model.safetensors") == blob
    assert store.read("tenants/t/jobs/j/none.json") is None
    dest = tmp_path / "scratch" / "model.safetensors"
    assert store.pull("tenants/t/jobs/j/model.safetensors", dest) and dest.read_bytes() == blob
    assert not store.pull("tenants/t/jobs/j/checkpoint.pt", tmp_path / "scratch" / "c.pt")
    assert not (tmp_path / "scratch" / "c.pt").exists()
    assert [p.name for p in dest.parent.iterdir()] == ["model.safetensors"], "no partial file"
    store.delete_prefix("tenants/t/jobs/j")  # a sibling with the same leading letters stays
    assert objects(client, "unit/") == {"unit/tenants/t/jobs/j2/report.json": len(blob)}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_job_runs_resumes_and_delivers_through_the_bucket(s3, tmp_path):
    endpoint, client = s3
    prefix = "svc"
    env = {**CREDENTIALS, "BULWARK_ARTIFACT_URL": f"s3://{BUCKET}/{prefix}",
           "BULWARK_S3_ENDPOINT_URL": endpoint,
           "BULWARK_ARTIFACT_ROOT": str(tmp_path / "api-host")}
    stack = Stack(tmp_path, f"sqlite:///{tmp_path / 'bulwark.db'}")
    stack.extra.update(env)
    scratch = tmp_path / "worker-host"  # the worker's own disk: the API never sees it
    elsewhere = tmp_path / "other-worker-host"
    try:
        stack.start(workers=0)
        stack.start_worker("w-s3", env={"BULWARK_ARTIFACT_ROOT": str(scratch)})
        alice = stack.client(stack.key("alice"))
        store = Store(stack.database_url)
        job = alice.post("/v1/jobs", json=tiny_spec(6, name="s3")).json()["id"]
        key = f"{prefix}/tenants/{store.get_job(None, job).tenant_id}/jobs/{job}"
        deadline = time.monotonic() + 120
        while f"{key}/checkpoint.pt" not in objects(client, key):
            assert time.monotonic() < deadline, "no checkpoint reached the bucket"
            time.sleep(0.1)
        # the worker's host dies (worker, task and trainer at once); another host, with a
        # disk of its own, takes the job over from the reaper
        stack.kill("w-s3")
        stack.start_worker("w-s3-b", env={"BULWARK_ARTIFACT_ROOT": str(elsewhere)})

        row = wait_state(alice, job, ("succeeded", "failed", "cancelled"), timeout=180)
        assert row["state"] == "succeeded", row["error"]
        # the row says succeeded first (a crash before it retries from the checkpoint); the
        # worker then forgets the checkpoint, drops its scratch copy and publishes the event
        kinds = wait_event(stack, job, "succeeded")
        resumed = [d for k, d in kinds if k == "resumed"]
        assert resumed and resumed[0]["epoch"] >= 1, "the retry read the bucket's checkpoint"
        report = alice.get(f"/v1/jobs/{job}/report").json()
        assert [h["epoch"] for h in report["history"]] == list(range(1, 7))

        in_bucket = objects(client, key)
        names = {k.rsplit("/", 1)[1] for k in in_bucket}
        assert {"report.json", "report.html", "model.safetensors"} <= names
        assert "checkpoint.pt" not in names, "a finished job's checkpoint is deleted"
        for art in row["artifacts"]:
            r = alice.get(f"/v1/jobs/{job}/artifacts/{art['name']}")
            assert r.status_code == 200 and _sha(r.content) == art["sha256"] \
                == r.headers["x-checksum-sha256"], art["name"]
            assert int(r.headers["content-length"]) == art["size"] == in_bucket[
                f"{key}/{art['name']}"]
        assert not any(elsewhere.rglob("*.*")), "the scratch copy goes once the bucket has it"
        assert not any((tmp_path / "api-host").rglob("report.json")), "nothing on the API host"

        # an uploaded model goes to the bucket and a worker elsewhere reads it from there
        weights = alice.get(f"/v1/jobs/{job}/artifacts/model.safetensors").content
        up = alice.post("/v1/models", files={"file": ("m.safetensors", weights)},
                        data={"arch": "small_cnn", "num_classes": "4", "in_channels": "1",
                              "image_size": "8"}).json()
        assert any(k.endswith(f"models/{up['id']}.safetensors") for k in objects(client))
        spec = {**row["spec"], "mode": "evaluate", "name": "s3-eval",
                "model": {"arch": "small_cnn", "weights": f"models/{up['id']}"}}
        ev = alice.post("/v1/jobs", json=spec).json()["id"]
        done = wait_state(alice, ev, ("succeeded", "failed"), timeout=120)
        assert done["state"] == "succeeded", done["error"]
        again = alice.get(f"/v1/jobs/{ev}/report").json()
        assert again["final"]["clean_acc"] == report["final"]["clean_acc"], "same weights"

        assert alice.delete(f"/v1/jobs/{job}").status_code == 204
        assert objects(client, key + "/") == {}, "deleting the job empties its prefix"
        assert alice.get(f"/v1/jobs/{ev}/report").status_code == 200, "the other job stays"
    finally:
        stack.stop()

