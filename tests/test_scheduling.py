"""Fair share and the per-tenant running cap, on the real stack: redis-server, uvicorn,
Celery prefork workers and trainers (SQLite)."""

from __future__ import annotations

import json
import threading
import time

import httpx
import pytest

from bulwark.store.store import Store
from tests.service_stack import Stack, tiny_spec, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("sched")
    s = Stack(home, f"sqlite:///{home / 'bulwark.db'}")
    s.extra.update(BULWARK_TENANT_LIMITS=json.dumps({"capped": {"max_running": 1}}),
                   BULWARK_DEFER_SECONDS="0.5", BULWARK_MAX_QUEUED_PER_TENANT="20",
                   BULWARK_MAX_STREAMS_PER_TENANT="3")
    s.start(workers=0)  # the tests start the workers once their backlog is in place
    yield s
    s.stop()


def _runs(store: Store, job_ids: list[str]) -> list[tuple[str, object, object]]:
    """(job id, started, ended) of every attempt, in start order."""
    rows = [(j, a.started_at, a.ended_at) for j in job_ids for a in store.attempts(j)]
    return sorted(rows, key=lambda r: r[1])


def _open_stream(client: httpx.Client, job_id: str):
    """An open /events stream (its first line read; the line iterator is kept, as dropping it
    would close the connection), or the refusal's response."""
    cm = client.stream("GET", f"/v1/jobs/{job_id}/events", timeout=httpx.Timeout(10, read=60))
    r = cm.__enter__()
    if r.status_code == 200:
        r.lines = r.iter_lines()
        next(r.lines)
    return cm, r


def test_one_tenant_cannot_hold_every_event_stream(stack):
    """Before any worker runs: a tenant past its stream limit gets 429 (with Retry-After);
    another tenant's stream still opens and delivers; a closed stream frees its slot."""
    greedy_key = stack.key("greedy")
    greedy, patient = stack.client(greedy_key), stack.client(stack.key("patient"))
    mine = greedy.post("/v1/jobs", json=tiny_spec(1, name="held")).json()["id"]
    theirs = patient.post("/v1/jobs", json=tiny_spec(1, name="other")).json()["id"]
    held = [_open_stream(greedy, mine) for _ in range(3)]
    assert all(r.status_code == 200 for _, r in held)
    over = greedy.get(f"/v1/jobs/{mine}/events", timeout=10)
    assert over.status_code == 429 and over.headers["Retry-After"]
    assert "3 event streams" in over.json()["detail"]
    cm, r = _open_stream(patient, theirs)
    assert r.status_code == 200, "another tenant is not starved"
    cm.__exit__(None, None, None)
    # the SDK waits its turn (Retry-After) instead of failing, then follows to the end
    from bulwark import Client

    seen: list[str] = []
    sdk = Client(stack.url, greedy_key)
    follower = threading.Thread(target=lambda: seen.extend(
        e.type for e in sdk.job(mine).events()))
    follower.start()
    time.sleep(2)
    assert seen == [] and follower.is_alive(), "refused, waiting"
    held.pop()[0].__exit__(None, None, None)  # the server notices and frees the slot
    deadline = time.monotonic() + 30
    while not seen and time.monotonic() < deadline:
        time.sleep(0.2)
    assert seen[:1] == ["snapshot"], "a closed stream gives its slot back"
    for cm, _ in held:
        cm.__exit__(None, None, None)
    for client, job_id in ((greedy, mine), (patient, theirs)):
        assert client.post(f"/v1/jobs/{job_id}/cancel").json()["state"] == "cancelled"
    follower.join(timeout=30)
    assert seen[-1] == "cancelled"


def test_a_late_tenant_is_served_in_turn_not_after_the_backlog(stack):
    heavy, light = stack.client(stack.key("heavy")), stack.client(stack.key("light"))
    names = {}
    for i in range(3):
        names[heavy.post("/v1/jobs", json=tiny_spec(1, name=f"h{i}")).json()["id"]] = f"h{i}"
    for i in range(2):
        names[light.post("/v1/jobs", json=tiny_spec(1, name=f"l{i}")).json()["id"]] = f"l{i}"
    stack.start_worker("w0")  # one worker: strict FIFO would run h0 h1 h2 l0 l1
    for job_id, name in names.items():
        client = heavy if name.startswith("h") else light
        assert wait_state(client, job_id, ("succeeded", "failed"))["state"] == "succeeded"
    runs = _runs(Store(stack.database_url), list(names))
    assert [names[j] for j, _, _ in runs] == ["h0", "l0", "h1", "l1", "h2"]


def test_a_capped_tenant_never_runs_two_jobs_at_once(stack):
    stack.start_worker("w1")  # two workers now
    capped, free = stack.client(stack.key("capped")), stack.client(stack.key("free"))
    mine = [capped.post("/v1/jobs", json=tiny_spec(1, name=f"c{i}")).json()["id"]
            for i in range(3)]
    theirs = [free.post("/v1/jobs", json=tiny_spec(1, name=f"f{i}")).json()["id"]
              for i in range(2)]
    for job_id in mine:
        assert wait_state(capped, job_id, ("succeeded", "failed"), 240)["state"] == "succeeded"
    for job_id in theirs:
        assert wait_state(free, job_id, ("succeeded", "failed"), 240)["state"] == "succeeded"
    store = Store(stack.database_url)
    runs = _runs(store, mine)
    assert len(runs) == 3, "each ran once"
    for (_, _, end), (_, start, _) in zip(runs, runs[1:], strict=False):
        assert end <= start, "the capped tenant's jobs ran one after another"
    everyone = _runs(store, mine + theirs)
    overlaps = sum(1 for i, (_, s1, e1) in enumerate(everyone)
                   for _, s2, _ in everyone[i + 1:] if s2 < e1)
    assert overlaps >= 1, "the second worker ran the other tenant's jobs meanwhile"
