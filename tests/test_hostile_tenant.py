"""A tenant tries what a hostile tenant would (second pass), against the real stack: a
redis-server process, uvicorn, a Celery prefork worker and trainer processes, and a hostile
MLflow tracking server running as a process of its own (tests/fake_mlflow.py).

- A tracking server answers ``runs/create`` with another tenant's job folder as the artifact
  URI: not one byte of that tenant's files changes; the tracking step fails, the job does not.
- A spec names one of the operator's tracking servers; a URI through the API is a 422.
- A 300-byte YAML alias bomb and JSON nested up to 100 000 deep: 4xx at once, never a 5xx,
  while another client is served.
- Uploads bounded when they arrive: labels of 2**40, tensor shapes of [2**40, 2**40] or [-1];
  ``compute.devices`` no worker offers.
- /metrics behind the operator's token; everything the service writes 0600 / 0700; HTML
  responses never framed by another site, reports sandboxed.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save

from bulwark.store.events import Events
from bulwark.store.queue import announce_worker
from bulwark.workers.client.serve import free_port, wait_for_port
from tests.service_stack import REPO, Stack, tiny_spec, wait_event, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane

pytest.importorskip("mlflow")
METRICS_TOKEN = "metrics-token-for-the-test"


@pytest.fixture(scope="module")
def tracker():
    """The hostile tracking server: its URL; ``POST /control`` sets its answers."""
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(REPO / "tests" / "fake_mlflow.py"), str(port)],
                            start_new_session=True)
    wait_for_port(port, proc, "the fake tracking server")
    yield f"http://127.0.0.1:{port}"
    proc.kill()
    proc.wait()


@pytest.fixture(scope="module")
def stack(tmp_path_factory, tracker):
    home = tmp_path_factory.mktemp("hostile")
    s = Stack(home, f"sqlite:///{home / 'bulwark.db'}")
    s.extra.update({"BULWARK_MLFLOW_TARGETS": json.dumps({"team": tracker}),
                    "BULWARK_METRICS_TOKEN": METRICS_TOKEN})
    s.start()
    yield s
    s.stop()


def snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


# ------------------------------------------------------------------------------ tracking
def test_a_tracking_server_cannot_make_the_worker_write_into_another_tenants_folder(
        stack, alice, bob, tracker):
    victim = bob.post("/v1/jobs", json=tiny_spec(epochs=1, name="bobs")).json()
    assert wait_state(bob, victim["id"], ("succeeded", "failed"))["state"] == "succeeded"
    folder = stack.home / "artifacts" / "tenants" / "bob" / "jobs" / victim["id"]
    before = snapshot(folder)
    assert {"report.json", "report.html", "model.safetensors"} <= set(before)
    listed = {a["name"]: a["sha256"] for a in bob.get(f"/v1/jobs/{victim['id']}").json()[
        "artifacts"]}

    httpx.post(f"{tracker}/control", json={"artifact_uri": folder.as_uri()})
    spec = tiny_spec(epochs=1, name="tracked", tracking={"mlflow": {"target": "team"}})
    job = alice.post("/v1/jobs", json=spec).json()
    done = wait_state(alice, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", "a tracking failure never fails the job"
    events = wait_event(stack, job["id"], "succeeded")
    (failed,) = [d for k, d in events if k == "tracking_failed"]
    assert failed["while"] == "start" and "artifact URI" in failed["error"]
    assert snapshot(folder) == before, "not one byte of bob's job changed"
    for name, sha in listed.items():
        assert before[name] == sha, "the download header still matches the file"
    calls = [p for _m, p in httpx.get(f"{tracker}/calls").json()["calls"]]
    assert "/api/2.0/mlflow/runs/create" in calls
    assert not httpx.get(f"{tracker}/uploads").json(), "nothing uploaded either"

    # the server's own proxied store: the artifacts go to it (over HTTP), nothing is local
    httpx.post(f"{tracker}/control", json={"artifact_uri": "mlflow-artifacts:/0/r/artifacts"})
    job = alice.post("/v1/jobs", json=spec).json()
    assert wait_state(alice, job["id"], ("succeeded", "failed"))["state"] == "succeeded"
    events = wait_event(stack, job["id"], "succeeded")
    assert not [d for k, d in events if k == "tracking_failed"], events
    uploads = httpx.get(f"{tracker}/uploads").json()
    assert {"0/r/artifacts/report.json", "0/r/artifacts/model.safetensors"} <= set(uploads)
    assert snapshot(folder) == before


def test_a_spec_names_a_tracking_server_and_never_gives_a_uri(stack, alice):
    before = alice.get("/v1/jobs").json()["total"]
    for uri in ("http://169.254.169.254/", "http://127.0.0.1:5000", "https://mlflow.evil.com",
                "file:///etc", "sqlite:////tmp/x.db"):
        r = alice.post("/v1/jobs", json=tiny_spec(tracking={"mlflow": {"uri": uri}}))
        assert r.status_code == 422, (uri, r.text)
        (d,) = r.json()["detail"]
        assert d["loc"] == ["body", "tracking", "mlflow", "uri"]
        assert "BULWARK_MLFLOW_TARGETS" in d["msg"] and "team" in d["msg"]
    r = alice.post("/v1/jobs", json=tiny_spec(tracking={"mlflow": {"target": "other"}}))
    assert r.status_code == 422
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "tracking", "mlflow", "target"] and "'team'" not in d["msg"]
    assert "team" in d["msg"]
    assert alice.get("/v1/jobs").json()["total"] == before, "nothing was stored"


# ------------------------------------------------------------------------------ parsing
def alias_bomb() -> str:
    lines = ['a: &a ["x","x","x","x","x","x","x","x","x"]']
    for prev, name in zip("abcdefg", "bcdefgh", strict=True):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return "\n".join([*lines, "name: *h"])


def test_a_yaml_alias_bomb_is_refused_at_once_while_others_are_served(stack, alice):
    bomb = alias_bomb()
    assert len(bomb) < 400  # 9**8 = 43 million strings once expanded
    timings: dict[str, float] = {}

    def health() -> None:
        t0 = time.perf_counter()
        assert httpx.get(f"{stack.url}/healthz", timeout=30).status_code == 200
        timings["healthz"] = time.perf_counter() - t0

    other = threading.Thread(target=health)
    t0 = time.perf_counter()
    other.start()
    r = alice.post("/v1/specs/resolve", content=bomb,
                   headers={"content-type": "application/yaml"})
    timings["bomb"] = time.perf_counter() - t0
    other.join()
    assert 400 <= r.status_code < 500, r.text[:300]
    assert "anchors and aliases" in r.json()["detail"]
    assert len(r.content) < 2000, "an excerpt of the input at most"
    assert timings["bomb"] < 1.0 and timings["healthz"] < 1.0, timings


@pytest.mark.parametrize("depth", [10, 60, 100, 900, 1000, 10_000, 100_000])
def test_no_nesting_depth_gives_a_server_error(stack, alice, depth):
    deep = "[" * depth + "]" * depth
    bodies = [("/v1/jobs", f'{{"name": {deep}}}', "application/json"),
              ("/v1/jobs", f'{{"name": "x", "threat": {{"epsilon": {deep}}}}}', None),
              ("/v1/sweeps", f'{{"base": {{}}, "grid": {{"seed": {deep}}}}}',
               "application/json"),
              ("/v1/specs/resolve", f'{{"name": {deep}}}', "application/json"),
              ("/v1/specs/resolve", f"name: {deep}", "application/yaml")]
    for route, body, ctype in bodies:
        headers = {"content-type": ctype} if ctype else {}
        r = alice.post(route, content=body.encode(), headers=headers)
        assert 400 <= r.status_code < 500, (route, depth, r.status_code, r.text[:300])
        assert len(r.content) < 4000, (route, depth, "an excerpt of the input at most")
        assert r.json()["detail"]


# ------------------------------------------------------------------------------ uploads
def npz(**arrays) -> bytes:
    rng = np.random.default_rng(0)
    base = {"x_train": rng.integers(0, 256, (32, 8, 8), dtype=np.uint8),
            "y_train": np.arange(32) % 4, "x_test": rng.integers(0, 256, (8, 8, 8),
                                                                  dtype=np.uint8),
            "y_test": np.arange(8) % 4}
    buf = io.BytesIO()
    np.savez(buf, **{**base, **arrays})
    return buf.getvalue()


def safetensors_with(shape: list[int]) -> bytes:
    header = json.dumps({"w": {"dtype": "F32", "shape": shape, "data_offsets": [0, 4]}})
    header += " " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header.encode() + b"\x00" * 4


def test_uploads_are_bounded_when_they_arrive(stack, alice):
    labels = np.arange(32) % 4
    labels[3] = 2**40
    for arrays, words in (({"y_train": labels}, "y_train must be in 0..999"),
                          ({"y_test": np.full(8, 1000)}, "y_test must be in 0..999")):
        r = alice.post("/v1/datasets", files={"file": ("d.npz", npz(**arrays))})
        assert r.status_code == 422 and words in r.json()["detail"], r.text
    top = np.arange(32) % 4
    top[0] = 998  # the largest label there may be
    r = alice.post("/v1/datasets", files={"file": ("d.npz", npz(y_train=top))})
    assert r.status_code == 201 and r.json()["meta"]["num_classes"] == 999, r.text

    form = {"arch": "small_cnn", "num_classes": "10"}
    for shape, words in (([2**40, 2**40], "needs 4835703278458516698824704 bytes"),
                         ([-1], "non-negative"), ([2, 3], "needs 24 bytes"),
                         ([1] * 9, "at most 8"), (["1"], "non-negative")):
        r = alice.post("/v1/models", files={"file": ("m.safetensors", safetensors_with(shape))},
                       data=form)
        assert r.status_code == 422 and words in r.json()["detail"], (shape, r.text)
    r = alice.post("/v1/models", files={"file": ("m.safetensors", safetensors_with([1]))},
                   data=form)
    assert r.status_code == 201, r.text
    r = alice.post("/v1/models", files={"file": ("m.safetensors", st_save(
        {"w": np.zeros((4, 4), np.float32), "b": np.zeros(3, np.int64)}))}, data=form)
    assert r.status_code == 201, r.text


def test_devices_no_worker_offers_are_refused_at_submit(stack, alice):
    deadline = time.monotonic() + 60
    while httpx.get(f"{stack.url}/healthz").json()["workers"] < 1:  # it has announced itself
        assert time.monotonic() < deadline
        time.sleep(0.2)
    before = alice.get("/v1/jobs").json()["total"]
    r = alice.post("/v1/jobs", json=tiny_spec(compute={"devices": 2}))
    assert r.status_code == 422, r.text
    (d,) = r.json()["detail"]
    assert d["loc"] == ["body", "compute", "devices"]
    assert "the most any has offered: 1" in d["msg"] and "BULWARK_WORKER_DEVICES" in d["msg"]
    sweep = {"base": tiny_spec(), "grid": {"compute.devices": [1, 4]}}
    assert alice.post("/v1/sweeps", json=sweep).status_code == 422
    assert alice.get("/v1/jobs").json()["total"] == before, "nothing was stored"

    # a worker that offers 2 (it announces itself in Redis, as a real one does): accepted
    announce_worker(Events(stack.env["BULWARK_REDIS_URL"]).redis, "big@test", {"devices": 2})
    r = alice.post("/v1/jobs", json=tiny_spec(compute={"devices": 2}))
    assert r.status_code == 201, r.text
    assert alice.post(f"/v1/jobs/{r.json()['id']}/cancel").json()["state"] == "cancelled"


# ------------------------------------------------------------------------------ smaller items
def test_metrics_need_the_operators_token(stack, alice):
    assert httpx.get(f"{stack.url}/metrics").status_code == 401
    assert alice.get("/metrics").status_code == 401, "an API key is not the metrics token"
    bad = httpx.get(f"{stack.url}/metrics", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and "BULWARK_METRICS_TOKEN" in bad.json()["detail"]
    ok = httpx.get(f"{stack.url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert ok.status_code == 200 and "bulwark_jobs" in ok.text


def test_everything_the_service_writes_is_its_owners_alone(stack, alice):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="modes")).json()
    assert wait_state(alice, job["id"], ("succeeded", "failed"))["state"] == "succeeded"
    assert alice.post("/v1/datasets", files={"file": ("d.npz", npz())}).status_code == 201
    kinds = {"aof": 0, "db": 0, "artifact": 0, "upload": 0}
    loose = []
    for p in [stack.home, *stack.home.rglob("*")]:
        mode = stat.S_IMODE(os.lstat(p).st_mode)
        if mode & 0o077:
            loose.append(f"{oct(mode)} {p.relative_to(stack.home)}")
        name = str(p.relative_to(stack.home))
        kinds["aof"] += "appendonly" in name and p.is_file()
        kinds["db"] += name == "bulwark.db"
        kinds["artifact"] += name.endswith(("report.json", "model.safetensors"))
        kinds["upload"] += name.endswith(".npz")
    assert all(kinds.values()), kinds
    assert not loose, "readable by others:\n" + "\n".join(loose)


def test_html_is_never_framed_by_another_site_and_reports_are_sandboxed(stack, alice):
    for path in ("/ui", "/docs"):
        csp = httpx.get(f"{stack.url}{path}").headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp, (path, csp)
    assert "<iframe id=\"viewer-frame\" title=\"report\" sandbox>" in httpx.get(
        f"{stack.url}/ui").text
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="framed")).json()
    assert wait_state(alice, job["id"], ("succeeded", "failed"))["state"] == "succeeded"
    for r in (alice.get(f"/v1/jobs/{job['id']}/artifacts/report.html"),
              alice.get("/v1/compare", params={"jobs": job["id"]})):
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
        csp = r.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in csp and "sandbox" in csp
        assert "default-src 'none'" in csp, "a report fetches nothing and runs no script"
