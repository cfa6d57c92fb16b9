"""No job is ever stranded by the broker, and nothing follows a terminal event: real
redis-server, uvicorn, Celery workers and trainers (SQLite)."""

from __future__ import annotations

import time

import httpx
import pytest

from bulwark.store.events import Events
from bulwark.store.store import Store
from tests.service_stack import Stack, tiny_spec, wait_event, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("outbox")
    s = Stack(home, f"sqlite:///{home / 'bulwark.db'}").start()
    yield s
    s.stop()


def test_submit_while_the_broker_is_down_is_a_503_and_stores_nothing(stack, alice):
    before = alice.get("/v1/jobs").json()["total"]
    stack.stop_redis()
    try:
        t0 = time.monotonic()
        r = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="while-down"),
                       timeout=httpx.Timeout(60))
        assert r.status_code == 503, r.text
        assert "nothing was stored" in r.json()["detail"] and r.headers["Retry-After"]
        assert time.monotonic() - t0 < 30, "answers promptly"
        assert alice.get("/v1/jobs").json()["total"] == before, "no row left behind"
        assert alice.get("/healthz").status_code == 503
    finally:
        stack.start_redis()
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="after")).json()
    assert wait_state(alice, job["id"], ("succeeded", "failed"))["state"] == "succeeded"


def test_a_queued_job_without_a_broker_message_is_sent_by_the_reaper(stack, alice):
    """As when the API died between commit and send: the row exists, no message does."""
    store = Store(stack.database_url)
    job, _ = store.create_job("alice", tiny_spec(epochs=1, name="orphan"), max_attempts=3,
                              max_queued=100)
    assert store.get_job(None, job.id).enqueued_at is None
    done = wait_state(alice, job.id, ("succeeded", "failed"), timeout=120)
    assert done["state"] == "succeeded" and done["attempt"] == 1
    assert store.get_job(None, job.id).enqueued_at is not None
    assert len(store.attempts(job.id)) == 1, "sent once, run once"


def test_nothing_is_published_after_a_terminal_event(stack, alice):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name="ends")).json()
    wait_state(alice, job["id"], ("succeeded",))
    count = len(wait_event(stack, job["id"], "succeeded"))
    events = Events(stack.env["BULWARK_REDIS_URL"])
    assert events.publish(job["id"], "cancel_requested", {}) is None
    assert events.publish(job["id"], "epoch", {"epoch": 99}) is None
    kinds = [k for _, k, _ in events.read(job["id"], count=10_000)]
    assert len(kinds) == count and kinds[-1] == "succeeded"


def test_bad_last_event_id_is_a_400_before_the_stream(stack, alice):
    job = alice.get("/v1/jobs").json()["items"][0]
    r = alice.get(f"/v1/jobs/{job['id']}/events", headers={"Last-Event-ID": "not-an-id"})
    assert r.status_code == 400 and "Last-Event-ID" in r.json()["detail"]


def test_non_finite_numbers_are_422_with_a_json_body(stack, alice):
    before = alice.get("/v1/jobs").json()["total"]
    for body in ('{"threat": {"epsilon": NaN}}', '{"schedule": {"lr": {"lr_max": Infinity}}}',
                 '{"evaluation": {"certification": {"sigma": 0.25, "radii": [0.5, NaN]}}}'):
        r = alice.post("/v1/jobs", content=body, headers={"content-type": "application/json"})
        assert r.status_code == 422, (body, r.text)
        assert r.json()["detail"], "a readable, JSON-encodable body"
    assert alice.get("/v1/jobs").json()["total"] == before


def test_oversized_chunked_upload_is_a_413_and_deep_headers_a_422(stack, alice):
    boundary = "bulwarkboundary"

    def chunks():  # a multipart body sent without Content-Length: chunked transfer encoding
        for name, value in (("arch", b"small_cnn"), ("num_classes", b"10")):
            yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n"
                   .encode() + value + b"\r\n")
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; "
               'filename="m.safetensors"\r\nContent-Type: application/octet-stream\r\n\r\n'
               .encode())
        for _ in range(3):
            yield b"\0" * (512 * 1024)  # 1.5 MiB over the stack's 1 MiB cap
        yield f"\r\n--{boundary}--\r\n".encode()

    r = alice.post("/v1/models", content=chunks(),
                   headers={"content-type": f"multipart/form-data; boundary={boundary}"})
    assert r.status_code == 413, r.text
    assert "larger than" in r.json()["detail"]
    import struct

    header = b"[" * 100_000 + b"]" * 100_000
    deep = struct.pack("<Q", len(header)) + header
    r = alice.post("/v1/models", files={"file": ("m.safetensors", deep)},
                   data={"arch": "small_cnn", "num_classes": "10"})
    assert r.status_code == 422 and "nested too deeply" in r.json()["detail"]


@pytest.mark.parametrize("phase, evaluation", [
    ("final_evaluation", {"monitor": {"size": 0},
                          "final": {"n": 64, "pgd": {"steps": 3000, "restarts": 20},
                                    "autoattack": None}}),
    ("certification", {"monitor": {"size": 0}, "final": {"n": 16, "pgd": None,
                                                         "autoattack": None, "fgsm": False},
                       "certification": {"sigma": 0.25, "n0": 10, "n": 2_000_000,
                                         "batch_size": 1000, "chunk": 1, "empirical": None}}),
])
def test_cancel_in_any_phase_ends_cancelled_promptly(stack, alice, phase, evaluation):
    job = alice.post("/v1/jobs", json=tiny_spec(epochs=1, name=f"cancel-{phase}",
                                                evaluation=evaluation)).json()
    deadline = time.monotonic() + 120
    while alice.get(f"/v1/jobs/{job['id']}").json()["progress"].get("phase") != phase:
        assert time.monotonic() < deadline, f"never reached {phase}"
        time.sleep(0.2)
    assert alice.post(f"/v1/jobs/{job['id']}/cancel").status_code == 202
    done = wait_state(alice, job["id"], ("cancelled", "failed", "succeeded"), timeout=90)
    assert done["state"] == "cancelled", done
    assert [a.outcome for a in Store(stack.database_url).attempts(job["id"])] == ["cancelled"]
    (last,) = [d for _, k, d in Events(stack.env["BULWARK_REDIS_URL"]).read(job["id"])
               if k == "cancelled"]
    assert "exit_code" not in last, "the trainer stopped itself; it was not killed"


def test_the_private_redis_wants_its_password(stack):
    from urllib.parse import urlsplit

    import redis as redis_lib

    url = urlsplit(stack.env["BULWARK_REDIS_URL"])
    assert url.password, "the stack's URL carries the password"
    bare = redis_lib.Redis(host="127.0.0.1", port=url.port)
    with pytest.raises(redis_lib.exceptions.AuthenticationError):
        bare.ping()
