"""The job store's state machine on a real database (SQLite; PostgreSQL where reachable)."""

from __future__ import annotations

import datetime as dt
import time

import pytest

from bulwark.store.db import CANCELLED, FAILED, QUEUED, RUNNING, SUCCEEDED, utcnow
from bulwark.store.store import Conflict, NotFound, QuotaExceeded, Store
from tests.service_stack import database_url


class Clock:
    """The wall clock plus an offset that ``advance`` moves: leases go stale without the
    test sleeping past them (rows' creation times, written by the database's defaults, stay
    on the wall clock and so stay in order with it)."""

    def __init__(self):
        self.offset = dt.timedelta(0)

    def __call__(self) -> dt.datetime:
        return utcnow() + self.offset

    def advance(self, seconds: float) -> None:
        self.offset += dt.timedelta(seconds=seconds)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request, tmp_path):
    s = Store(database_url(request.param, tmp_path), clock=Clock())
    s.migrate()
    return s


def new_job(store: Store, tenant: str = "t", **kw):
    store.create_api_key(tenant)
    job, created = store.create_job(tenant, {"name": "x", **kw.pop("spec", {})},
                                    max_attempts=kw.pop("max_attempts", 2),
                                    max_queued=kw.pop("max_queued", 10), **kw)
    assert created
    return job


def test_keys_are_hashed_and_bound_to_tenants(store):
    key = store.create_api_key("acme")
    assert key.startswith("bwk_") and store.authenticate(key) == "acme"
    assert store.authenticate(key + "x") is None
    with store.session() as s:
        from bulwark.store.db import ApiKey

        stored = [k.key_hash for k in s.query(ApiKey).all()]
    assert key not in stored and all(len(h) == 64 for h in stored)


def test_lease_is_exclusive_and_stale_leases_are_reaped(store):
    job = new_job(store, max_attempts=2)
    first = store.claim(job.id, "w1", stale_after=60)
    assert first is not None and first.attempt == 1
    assert store.claim(job.id, "w2", stale_after=60) is None, "a live lease is exclusive"
    assert store.heartbeat(job.id, "w1") == (True, False)
    assert store.heartbeat(job.id, "w2") == (False, False), "only the owner heartbeats"
    store.clock.advance(1.1)
    assert store.reap(stale_after=1.0) == {QUEUED: [job.id], FAILED: [], CANCELLED: []}
    second = store.claim(job.id, "w2", stale_after=60)
    assert second is not None and second.attempt == 2
    assert not store.finish(job.id, "w1", SUCCEEDED), "the old owner can no longer finish"
    store.clock.advance(1.1)
    assert store.reap(stale_after=1.0)[FAILED] == [job.id], "attempts exhausted"
    failed = store.get_job("t", job.id)
    assert failed.state == FAILED and "max_attempts" in failed.error
    assert store.claim(job.id, "w3", stale_after=0) is None
    assert [a.outcome for a in store.attempts(job.id)] == ["lost", "lost"]


def test_taking_over_a_stale_lease_marks_the_old_attempt_lost(store):
    """A redelivered task may claim a stale job before the reaper sees it: the attempt that
    held the lease still ends as lost, never open."""
    job = new_job(store, max_attempts=3)
    assert store.claim(job.id, "w1", stale_after=60) is not None
    store.clock.advance(0.05)
    second = store.claim(job.id, "w2", stale_after=0.01)
    assert second is not None and second.attempt == 2
    assert [(a.owner, a.outcome) for a in store.attempts(job.id)] == [("w1", "lost"),
                                                                      ("w2", None)]
    assert not store.finish(job.id, "w1", SUCCEEDED), "the old owner can no longer finish"
    assert store.finish(job.id, "w2", SUCCEEDED)
    assert [a.outcome for a in store.attempts(job.id)] == ["lost", SUCCEEDED]


def test_finish_records_the_outcome_once(store):
    job = new_job(store)
    store.claim(job.id, "w", stale_after=60)
    assert store.finish(job.id, "w", SUCCEEDED, artifacts=[{"name": "report.json"}])
    assert not store.finish(job.id, "w", FAILED), "terminal states are final"
    done = store.get_job("t", job.id)
    assert done.state == SUCCEEDED and done.artifacts == [{"name": "report.json"}]
    assert [a.outcome for a in store.attempts(job.id)] == [SUCCEEDED]


def test_cancel_queued_running_and_reaped(store):
    queued = new_job(store)
    assert store.request_cancel("t", queued.id).state == CANCELLED
    assert store.claim(queued.id, "w", stale_after=0) is None, "a cancelled job never runs"
    running = new_job(store, spec={"name": "r"})
    store.claim(running.id, "w", stale_after=60)
    job = store.request_cancel("t", running.id)
    assert (job.state, job.cancel_requested) == (RUNNING, True)
    assert store.heartbeat(running.id, "w") == (True, True), "the worker learns of it"
    store.clock.advance(1.1)
    assert store.reap(stale_after=1.0)[CANCELLED] == [running.id]


def test_tenant_isolation_idempotency_quota_delete(store):
    job = new_job(store, "a", idempotency_key="k")
    with pytest.raises(NotFound):
        store.get_job("b", job.id)
    with pytest.raises(NotFound):
        store.request_cancel("b", job.id)
    same, created = store.create_job("a", {"name": "x"}, max_attempts=2, max_queued=10,
                                     idempotency_key="k")
    assert not created and same.id == job.id
    with pytest.raises(Conflict):
        store.create_job("a", {"name": "y"}, max_attempts=2, max_queued=10,
                         idempotency_key="k")
    store.create_api_key("b")
    other, created = store.create_job("b", {"name": "x"}, max_attempts=2, max_queued=10,
                                      idempotency_key="k")
    assert created and other.id != job.id, "keys are per tenant"
    with pytest.raises(QuotaExceeded):
        store.create_job("a", {"name": "z"}, max_attempts=2, max_queued=1)
    with pytest.raises(Conflict):
        store.delete_job("a", job.id)  # still queued
    store.request_cancel("a", job.id)
    store.delete_job("a", job.id)
    with pytest.raises(NotFound):
        store.get_job("a", job.id)
    assert store.count_by_state()[QUEUED] == 1


def test_quota_and_idempotency_hold_under_concurrent_submissions(store):
    """40 racing submissions against a limit of 20 leave exactly 20 queued; 20 racing requests
    with one Idempotency-Key make one job and all get it (no error)."""
    from concurrent.futures import ThreadPoolExecutor

    store.create_api_key("race")

    def submit(i):
        try:
            return store.create_job("race", {"name": f"j{i}"}, max_attempts=1,
                                    max_queued=20)[0].id
        except QuotaExceeded:
            return "quota"

    with ThreadPoolExecutor(40) as pool:
        out = list(pool.map(submit, range(40)))
    assert out.count("quota") == 20 and len(set(out) - {"quota"}) == 20
    assert store.list_jobs("race", state=QUEUED, limit=100)[1] == 20

    store.create_api_key("idem")

    def same_key(_):
        job, _created = store.create_job("idem", {"name": "one"}, max_attempts=1,
                                         max_queued=100, idempotency_key="k-1")
        return job.id

    with ThreadPoolExecutor(20) as pool:
        ids = list(pool.map(same_key, range(20)))
    assert len(set(ids)) == 1 and store.list_jobs("idem")[1] == 1


def _submit(store: Store, tenant: str, name: str) -> str:
    store.create_api_key(tenant)
    time.sleep(0.002)  # distinct creation times: FIFO within a tenant is by created_at
    return store.create_job(tenant, {"name": name}, max_attempts=2, max_queued=100)[0].id


def test_fair_share_serves_tenants_in_turn_not_first_come(store):
    """One tenant's backlog does not hold a late tenant back: with one worker, the claims
    alternate between tenants (never served first), each tenant first in first out."""
    names = {}
    for i in range(4):
        names[_submit(store, "heavy", f"h{i}")] = f"h{i}"
    for i in range(2):
        names[_submit(store, "light", f"l{i}")] = f"l{i}"
    order = []
    for _ in range(6):
        any_message = next(iter(names))  # the message's own job does not decide
        claim = store.claim(any_message, "w", stale_after=60)
        order.append(names[claim.job_id])
        assert store.finish(claim.job_id, "w", SUCCEEDED)
    assert order == ["h0", "l0", "h1", "l1", "h2", "h3"]
    assert store.claim(any_message, "w", stale_after=60) is None, "nothing left"


def test_fewest_running_goes_first_and_the_cap_holds(store):
    a = [_submit(store, "a", f"a{i}") for i in range(3)]
    b = [_submit(store, "b", f"b{i}") for i in range(2)]
    cap = {"a": 1, "b": 0}.__getitem__  # a may run one job at a time; b has no cap
    first = store.claim(a[0], "w1", stale_after=60, max_running=cap)
    assert first.job_id == a[0]
    second = store.claim(a[1], "w2", stale_after=60, max_running=cap)
    assert second.job_id == b[0], "a is at its cap: b's job runs"
    third = store.claim(a[1], "w3", stale_after=60, max_running=cap)
    assert third.job_id == b[1], "b has no cap"
    assert store.claim(a[2], "w4", stale_after=60, max_running=cap) is None, "only a waits"
    assert store.get_job(None, a[1]).state == QUEUED
    store.finish(a[0], "w1", SUCCEEDED)
    assert store.claim(a[2], "w4", stale_after=60, max_running=cap).job_id == a[1]


def test_racing_claims_never_pass_a_tenant_cap(store):
    """Eight workers claim at once for a tenant capped at two: exactly two win."""
    from concurrent.futures import ThreadPoolExecutor

    jobs = [_submit(store, "capped", f"c{i}") for i in range(8)]

    def claim(i):
        c = store.claim(jobs[i], f"w{i}", stale_after=60, max_running=lambda _t: 2)
        return None if c is None else c.job_id

    with ThreadPoolExecutor(8) as pool:
        won = [j for j in pool.map(claim, range(8)) if j]
    assert len(won) == 2 == len(set(won))
    assert store.list_jobs("capped", state=RUNNING)[1] == 2
    assert sorted(won) == sorted(jobs[:2]), "first in first out"


def test_a_worker_claims_only_jobs_that_fit_its_devices(store):
    big = new_job(store, "big", spec={"compute": {"devices": 4}})
    every = new_job(store, "every", spec={"compute": {"devices": "all"}})
    small = new_job(store, "small")
    assert (big.devices, every.devices, small.devices) == (4, 0, 1)
    # a one-device worker holding the big job's message runs what fits: never the big job
    got = {store.claim(big.id, f"w{i}", stale_after=60, devices=1).job_id for i in range(2)}
    assert got == {every.id, small.id}
    assert store.claim(big.id, "w3", stale_after=60, devices=2) is None, "4 do not fit in 2"
    assert store.claim(big.id, "w4", stale_after=60, devices=4).job_id == big.id
