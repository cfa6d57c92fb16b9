"""Integration tests of the service with real parts: a redis-server process, the API under
uvicorn, Celery worker processes (prefork) and trainer processes, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import httpx
import numpy as np
import pytest
from safetensors.numpy import save as st_save

from bulwark.store.queue import TASK_NAME
from bulwark.store.store import Store
from tests.cli import CLI
from tests.service_stack import (
    tiny_spec,
    wait_broker_done,
    wait_state,
)

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


def _events(client: httpx.Client, job_id: str, last_event_id: str | None = None):
    headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
    out, cur = [], {}
    with client.stream("GET", f"/v1/jobs/{job_id}/events", headers=headers,
                       timeout=httpx.Timeout(120)) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line:
                if cur:
                    out.append(cur)
                cur = {}
            elif not line.startswith(":"):
                k, _, v = line.partition(": ")
                cur[k] = v
    return out


def test_submit_to_report_and_weights(stack, alice):
    r = alice.post("/v1/jobs", json=tiny_spec())
    assert r.status_code == 201, r.text
    job = r.json()
    assert job["state"] == "queued" and job["spec"]["recipe"]["preset"] == "fgsm-elle"
    done = wait_state(alice, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    assert {a["name"] for a in done["artifacts"]} == {"report.json", "report.html",
                                                      "model.safetensors", "best.safetensors"}
    report = alice.get(f"/v1/jobs/{job['id']}/report").json()
    assert report["final"]["n"] == 64 and len(report["history"]) == 2
    w = alice.get(f"/v1/jobs/{job['id']}/artifacts/model.safetensors")
    assert w.status_code == 200
    (n,) = np.frombuffer(w.content[:8], "<u8")
    assert json.loads(w.content[8:8 + int(n)])  # a safetensors header
    import hashlib

    listed = {a["name"]: a for a in done["artifacts"]}
    assert hashlib.sha256(w.content).hexdigest() == listed["model.safetensors"]["sha256"]
    assert alice.get(f"/v1/jobs/{job['id']}/artifacts/..%2Fbulwark.db").status_code == 404
    assert alice.get(f"/v1/jobs/{job['id']}/artifacts/checkpoint.pt").status_code == 404

    # events: snapshot, queued ... epochs ... succeeded; replay from an id gives the rest only
    evs = _events(alice, job["id"])
    kinds = [e["event"] for e in evs]
    assert kinds[0] == "snapshot" and kinds[-1] == "succeeded"
    assert kinds.count("epoch") == 2 and "running" in kinds
    mid = next(e for e in evs if e["event"] == "epoch")
    rest = _events(alice, job["id"], last_event_id=mid["id"])
    assert [e["event"] for e in rest] == kinds[kinds.index("epoch") + 1:]
    assert all(e["id"] > mid["id"] for e in rest)

    # a finished job whose terminal event never reached the stream (the trainer died right
    # after the row's mark): the stream still ends with it, read from the row
    import redis

    from bulwark.store.events import stream_key

    r = redis.Redis.from_url(stack.env["BULWARK_REDIS_URL"], decode_responses=True)
    (last_id, last), = r.xrevrange(stream_key(job["id"]), count=1)
    assert last["type"] == "succeeded" and r.xdel(stream_key(job["id"]), last_id) == 1
    t0 = time.monotonic()
    evs = _events(alice, job["id"])
    assert [e["event"] for e in evs] == kinds and "id" not in evs[-1]
    end = json.loads(evs[-1]["data"])
    assert end["from_row"] and end["final"] == report["final"]
    assert time.monotonic() - t0 < 12, "a finished job's stream is not held for a keep-alive"

    # delete: the job and its files go; a second delete is a 404
    assert alice.delete(f"/v1/jobs/{job['id']}").status_code == 204
    assert alice.get(f"/v1/jobs/{job['id']}").status_code == 404


def test_tenant_isolation_and_auth(stack, alice, bob):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1)).json()
    assert bob.get(f"/v1/jobs/{job['id']}").status_code == 404
    assert bob.post(f"/v1/jobs/{job['id']}/cancel").status_code == 404
    assert bob.get(f"/v1/jobs/{job['id']}/events").status_code == 404
    assert job["id"] not in [j["id"] for j in bob.get("/v1/jobs").json()["items"]]
    anon = httpx.Client(base_url=stack.url)
    assert anon.get("/v1/jobs").status_code == 401
    assert anon.get("/v1/jobs", headers={"Authorization": "Bearer bwk_forged"}).status_code == 401
    wait_state(alice, job["id"], ("succeeded",))
    assert bob.get(f"/v1/jobs/{job['id']}/report").status_code == 404
    assert alice.get(f"/v1/jobs/{job['id']}/report").status_code == 200


def test_idempotency_key(stack, alice):
    spec = tiny_spec(epochs=1, name="idem")
    h = {"Idempotency-Key": "run-42"}
    first = alice.post("/v1/jobs", json=spec, headers=h)
    again = alice.post("/v1/jobs", json=spec, headers=h)
    assert (first.status_code, again.status_code) == (201, 200)
    assert first.json()["id"] == again.json()["id"]
    other = alice.post("/v1/jobs", json=tiny_spec(epochs=2, name="idem"), headers=h)
    assert other.status_code == 409
    wait_state(alice, first.json()["id"], ("succeeded",))


def test_bad_specs_are_422_with_field_and_range(stack, alice):
    before = alice.get("/v1/jobs").json()["total"]
    r = alice.post("/v1/jobs", json=tiny_spec(threat={"epsilon": 3}))
    assert r.status_code == 422
    detail = r.json()["detail"]
    assert any("(0, 1]" in d["msg"] for d in detail)
    r = alice.post("/v1/jobs", json=tiny_spec(threat={"epsilon": 0.3, "train_epsilon": 2}))
    assert r.status_code == 422
    assert any("threat.train_epsilon must be in (0, 1]" in d["msg"] for d in r.json()["detail"])
    r = alice.post("/v1/jobs", json={**tiny_spec(), "schedule": {"epochs": 0}})
    assert r.status_code == 422
    assert any(d["loc"][-2:] == ["schedule", "epochs"] and "greater than or equal to 1"
               in d["msg"] for d in r.json()["detail"])
    assert alice.post("/v1/jobs", json={**tiny_spec(), "bogus": 1}).status_code == 422
    assert alice.post("/v1/jobs", json=tiny_spec(recipe="magic")).status_code == 422
    assert alice.post("/v1/jobs", content=b"{not json",
                      headers={"content-type": "application/json"}).status_code == 422
    assert alice.get("/v1/jobs").json()["total"] == before, "bad input stores nothing"


def test_upload_model_rules(stack, alice):
    good = st_save({"w": np.zeros((4, 4), np.float32)})
    r = alice.post("/v1/models", files={"file": ("m.safetensors", good)},
                   data={"arch": "small_cnn", "num_classes": "10"})
    assert r.status_code == 201, r.text
    assert r.json()["size"] == len(good)
    pickle_like = b"\x80\x04\x95" + b"\x00" * 64
    r = alice.post("/v1/models", files={"file": ("m.pt", pickle_like)},
                   data={"arch": "small_cnn", "num_classes": "10"})
    assert r.status_code == 422 and "safetensors" in r.json()["detail"]
    r = alice.post("/v1/models", files={"file": ("m.safetensors", good)},
                   data={"arch": "resnet1000", "num_classes": "10"})
    assert r.status_code == 422 and "small_cnn" in r.json()["detail"]
    big = st_save({"w": np.zeros((1024, 512), np.float32)})  # 2 MiB > the 1 MiB cap
    r = alice.post("/v1/models", files={"file": ("m.safetensors", big)},
                   data={"arch": "small_cnn", "num_classes": "10"})
    assert r.status_code == 413


def test_cancel_queued_and_running(stack, alice):
    long = alice.post("/v1/jobs", json=tiny_spec(epochs=200, name="long")).json()
    wait_state(alice, long["id"], ("running",))
    queued = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="behind")).json()
    r = alice.post(f"/v1/jobs/{queued['id']}/cancel")
    assert r.status_code == 202 and r.json()["state"] == "cancelled"

    deadline = time.monotonic() + 60
    while (alice.get(f"/v1/jobs/{long['id']}").json()["progress"].get("epoch") or 0) < 1:
        assert time.monotonic() < deadline
        time.sleep(0.2)
    r = alice.post(f"/v1/jobs/{long['id']}/cancel")
    assert r.status_code == 202 and r.json()["cancel_requested"]
    done = wait_state(alice, long["id"], ("cancelled", "succeeded", "failed"), timeout=60)
    assert done["state"] == "cancelled"
    store = Store(stack.database_url)
    assert [a.outcome for a in store.attempts(long["id"])] == ["cancelled"]
    wait_broker_done(stack, queued["id"])  # its message (if any reached a worker) is consumed
    assert alice.get(f"/v1/jobs/{queued['id']}").json()["attempt"] == 0, "never ran"
    assert store.attempts(queued["id"]) == []


def test_duplicate_delivery_runs_once(stack, alice):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="dup")).json()
    from bulwark.store.queue import make_celery
    from bulwark.store.settings import Settings

    app = make_celery(Settings(redis_url=stack.env["BULWARK_REDIS_URL"]))
    app.send_task(TASK_NAME, args=[job["id"]], task_id=f"{job['id']}.dup", queue="bulwark")
    wait_state(alice, job["id"], ("succeeded",))
    wait_broker_done(stack, job["id"])  # the duplicate delivery too is consumed and acked
    assert len(Store(stack.database_url).attempts(job["id"])) == 1


def test_killed_worker_child_resumes_and_succeeds(stack, alice):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=8, name="killme")).json()
    deadline = time.monotonic() + 90
    while (alice.get(f"/v1/jobs/{job['id']}").json()["progress"].get("epoch") or 0) < 2:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    store = Store(stack.database_url)
    owner = store.attempts(job["id"])[0].owner
    os.kill(int(owner.split("/")[1]), signal.SIGKILL)  # the prefork child running the task
    done = wait_state(alice, job["id"], ("succeeded", "failed"), timeout=180)
    assert done["state"] == "succeeded", done["error"]
    attempts = store.attempts(job["id"])
    assert [a.outcome for a in attempts] == ["lost", "succeeded"]
    kinds = [e["event"] for e in _events(alice, job["id"])]
    assert "resumed" in kinds
    report = alice.get(f"/v1/jobs/{job['id']}/report").json()
    assert [h["epoch"] for h in report["history"]] == list(range(1, 9))


def test_health_metrics_and_listing(stack, alice):
    h = httpx.get(f"{stack.url}/healthz")
    assert h.status_code == 200 and h.json() == {"status": "ok", "database": True,
                                                 "workers": 1,
                                                 "redis": True}
    m = httpx.get(f"{stack.url}/metrics").text
    assert 'bulwark_jobs{state="succeeded"}' in m
    assert "bulwark_http_request_duration_seconds_bucket" in m
    page = alice.get("/v1/jobs", params={"state": "succeeded", "limit": 2}).json()
    assert page["limit"] == 2 and len(page["items"]) <= 2
    assert all(j["state"] == "succeeded" for j in page["items"])
    assert alice.get("/v1/jobs", params={"state": "bogus"}).status_code == 422
    schema = httpx.get(f"{stack.url}/openapi.json").json()
    assert {"/v1/jobs", "/v1/jobs/{job_id}/events", "/v1/models", "/healthz"} <= set(
        schema["paths"])
    assert httpx.get(f"{stack.url}/docs").status_code == 200


def test_evaluation_only_job_certifies_an_uploaded_model(stack, alice, bob):
    trained = alice.post("/v1/jobs", json=tiny_spec(
        epochs=2, name="noise", recipe={"preset": "gaussian-smoothing",
                                        "adversary": {"kind": "gaussian", "sigma": 0.25}},
        evaluation={"monitor": {"size": 0}, "final": {"n": 32, "pgd": None, "autoattack": None,
                                                      "fgsm": False},
                    "certification": {"n0": 20, "n": 200, "batch_size": 500,
                                      "num_points": 8, "empirical": None}})).json()
    done = wait_state(alice, trained["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    report = alice.get(f"/v1/jobs/{trained['id']}/report").json()
    assert report["certification"]["num_points"] == 8
    tsv = alice.get(f"/v1/jobs/{trained['id']}/artifacts/certify.tsv").text.splitlines()
    assert tsv[0].split("\t") == ["idx", "label", "predict", "radius", "correct", "time"]
    assert len(tsv) == 9

    weights = alice.get(f"/v1/jobs/{trained['id']}/artifacts/model.safetensors").content
    up = alice.post("/v1/models", files={"file": ("m.safetensors", weights)},
                    data={"arch": "small_cnn", "num_classes": "4", "in_channels": "1",
                          "image_size": "8"}).json()
    spec = {**trained["spec"], "mode": "evaluate", "name": "eval-only",
            "model": {"arch": "small_cnn", "weights": f"models/{up['id']}"}}
    assert bob.post("/v1/jobs", json=spec).status_code == 422, "another tenant's model"
    bad = {**spec, "model": {"arch": "small_cnn", "weights": "/etc/passwd"}}
    r = alice.post("/v1/jobs", json=bad)
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "model", "weights"]
    wrong_arch = {**spec, "model": {"arch": "preact_resnet18", "weights": f"models/{up['id']}"}}
    assert alice.post("/v1/jobs", json=wrong_arch).status_code == 422
    job = alice.post("/v1/jobs", json=spec).json()
    assert job["model_id"] == up["id"]
    done = wait_state(alice, job["id"], ("succeeded", "failed"))
    assert done["state"] == "succeeded", done["error"]
    again = alice.get(f"/v1/jobs/{job['id']}/report").json()
    assert again["history"] == []
    assert again["certification"]["certified_accuracy"] == \
        report["certification"]["certified_accuracy"], "same weights, same seed"


def test_queued_job_quota_per_tenant(stack):
    carol = stack.client(stack.key("carol"))
    long = carol.post("/v1/jobs", json=tiny_spec(epochs=500, name="hog")).json()
    wait_state(carol, long["id"], ("running",))
    ids = [carol.post("/v1/jobs", json=tiny_spec(epochs=1)).json()["id"] for _ in range(5)]
    r = carol.post("/v1/jobs", json=tiny_spec(epochs=1))
    assert r.status_code == 429 and "limit is 5" in r.json()["detail"]
    for job_id in [*ids, long["id"]]:
        carol.post(f"/v1/jobs/{job_id}/cancel")
    wait_state(carol, long["id"], ("cancelled",))


def _sse(client: httpx.Client, path: str, until: str, timeout: float = 180) -> list[dict]:
    """The events of an SSE stream up to and including the first ``until`` event."""
    out, cur = [], {}
    with client.stream("GET", path, timeout=httpx.Timeout(timeout)) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if not line:
                if cur:
                    out.append({**cur, "data": json.loads(cur.get("data", "{}"))})
                    if cur.get("event") == until:
                        return out
                cur = {}
            elif not line.startswith(":"):
                k, _, v = line.partition(": ")
                cur[k] = v
    return out


def test_sweep_queues_its_children_streams_them_and_summarizes(stack, alice, bob, tmp_path):
    sweep = {"base": tiny_spec(epochs=1, name="grid"), "grid": {"schedule.seed": [0, 1]},
             "variants": {"fgsm": {"recipe": "fgsm"}, "n-fgsm": {"recipe": "n-fgsm"}}}
    r = alice.post("/v1/sweeps", json=sweep)
    assert r.status_code == 201, r.text
    out = r.json()
    assert out["state"] == "queued" and out["counts"]["queued"] == 4
    names = [c["name"] for c in out["children"]]
    assert names == ["fgsm_seed=0", "fgsm_seed=1", "n-fgsm_seed=0", "n-fgsm_seed=1"]
    assert out["children"][1]["overrides"] == {"variant": "fgsm", "schedule.seed": 1}
    job = alice.get(f"/v1/jobs/{out['children'][2]['job_id']}").json()
    assert job["name"] == "n-fgsm_seed=0" and job["spec"]["recipe"]["preset"] == "n-fgsm"
    assert job["spec"]["schedule"]["seed"] == 0
    assert bob.get(f"/v1/sweeps/{out['id']}").status_code == 404, "another tenant's sweep"

    events = _sse(alice, f"/v1/sweeps/{out['id']}/events", until="sweep_finished")
    assert events[0]["event"] == "snapshot" and events[0]["data"]["id"] == out["id"]
    finished = [e["data"] for e in events if e["event"] == "succeeded"]
    assert sorted(d["child"] for d in finished) == sorted(names)
    assert {d["job_id"] for d in finished} == {c["job_id"] for c in out["children"]}
    last = events[-1]["data"]
    assert events[-1]["event"] == "sweep_finished" and last["state"] == "succeeded"
    assert last["counts"]["succeeded"] == 4
    for child in last["children"]:
        figures = child["figures"]
        assert figures is not None and 0 <= figures["clean_acc"] <= 1
        assert figures["epochs_run"] == 1 and figures["n"] == 64
    cli = subprocess.run([*CLI, "compare", out["id"],
                          "--url", stack.url,
                          "--key", alice.headers["Authorization"].removeprefix("Bearer "),
                          "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert cli.returncode == 0, cli.stderr
    runs = json.loads((tmp_path / "compare.json").read_text())["runs"]
    assert sorted(r["name"] for r in runs) == sorted(names)
    assert (tmp_path / "compare.html").read_text().count("<img") == 3
    board = alice.get("/v1/leaderboard", params={"dataset": "synthetic", "metric": "pgd",
                                                 "limit": 500}).json()
    mine = {c["job_id"] for c in out["children"]}
    assert mine <= {r["job_id"] for r in board["items"]}
    ranked = [r for r in board["items"] if r["rank"] is not None]  # one threat: synthetic 8/255
    assert {(r["norm"], r["epsilon"]) for r in board["items"]} == {("linf", 8 / 255)}
    assert all(r["verdict"] == "robust" for r in ranked), "only robust verdicts are ranked"
    assert all(r["verdict"] != "robust" for r in board["items"] if r["rank"] is None)
    accs = [(r["robust_acc"], r["clean_acc"]) for r in ranked]
    assert accs == sorted(accs, reverse=True)
    assert [r["rank"] for r in ranked] == list(range(1, len(ranked) + 1))
    assert board["items"][:len(ranked)] == ranked, "the unranked follow the ranked"
    for r in board["items"]:
        if r["job_id"] in mine:
            rep = alice.get(f"/v1/jobs/{r['job_id']}/report").json()
            assert r["robust_acc"] == rep["final"]["attacks"]["pgd3-1"]["acc"]
    assert not {r["job_id"] for r in bob.get("/v1/leaderboard", params={
        "metric": "pgd"}).json()["items"]} & mine, "another tenant's jobs never rank"
    assert alice.get("/v1/leaderboard", params={"metric": "bogus"}).status_code == 422
    card = alice.get(f"/v1/jobs/{out['children'][0]['job_id']}/export").json()
    assert card["dataset"] == "synthetic" and card["architecture"] == "SmallCNN"
    assert card["eps"] == "8/255" and card["autoattack_acc"] is None
    assert len(card["weights"]["sha256"]) == 64
    listed = alice.get("/v1/sweeps").json()
    assert out["id"] in [s["id"] for s in listed["items"]]
    assert out["id"] not in [s["id"] for s in bob.get("/v1/sweeps").json()["items"]]


def test_sweep_cancel_cascades_and_bad_sweeps_store_nothing(stack):
    dave = stack.client(stack.key("dave"))
    before = dave.get("/v1/jobs").json()["total"]
    # a file path as base is a server path: refused; so is a child that fails validation
    r = dave.post("/v1/sweeps", json={"base": "/etc/passwd", "grid": {}})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "base"]
    r = dave.post("/v1/sweeps", json={"base": tiny_spec(), "out": "/tmp/anywhere"})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "out"]
    r = dave.post("/v1/sweeps", json={"base": tiny_spec(),
                                      "variants_from": [{"file": "/etc/bulwark/study.yaml"}]})
    assert r.status_code == 422 and r.json()["detail"][0]["loc"] == ["body", "variants_from"]
    r = dave.post("/v1/sweeps", json={"base": tiny_spec(), "grid": {"threat.epsilon": [0.1, 7]}})
    assert r.status_code == 422 and "epsilon=7" in r.json()["detail"][0]["msg"]
    r = dave.post("/v1/sweeps", json={"base": tiny_spec(), "grid": {"schedule.seed": list(
        range(6))}})
    assert r.status_code == 429 and "limit is 5" in r.json()["detail"], "the quota counts all"
    assert dave.get("/v1/jobs").json()["total"] == before, "nothing stored"

    r = dave.post("/v1/sweeps", json={"base": tiny_spec(epochs=300, name="long"),
                                      "grid": {"schedule.seed": [0, 1, 2]}})
    assert r.status_code == 201, r.text
    sweep = r.json()
    first = sweep["children"][0]["job_id"]
    wait_state(dave, first, ("running",))
    r = dave.post(f"/v1/sweeps/{sweep['id']}/cancel")
    assert r.status_code == 202, r.text
    deadline = time.monotonic() + 90
    while (now := dave.get(f"/v1/sweeps/{sweep['id']}").json())["state"] != "cancelled":
        assert time.monotonic() < deadline, now
        time.sleep(0.5)
    assert now["counts"]["cancelled"] == 3
    assert dave.post(f"/v1/sweeps/{sweep['id']}/cancel").status_code == 409
    store = Store(stack.database_url)
    assert [a.outcome for a in store.attempts(first)] == ["cancelled"]
