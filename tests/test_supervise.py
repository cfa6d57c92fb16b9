"""The Celery task's supervision of a trainer process (bulwark.workers.jobs.tasks.supervise), with a
real process standing in for the trainer and a real job store (SQLite).

The race it guards: the trainer marks the row succeeded, then publishes the stream's
terminal event. A heartbeat landing between the two finds the lease gone; killing the
trainer there left a finished job whose event stream never ended (a CI failure: the SDK's
event list ended without ``succeeded``)."""

from __future__ import annotations

import subprocess
import sys
import time

import pytest

from bulwark.store.db import QUEUED, RUNNING, SUCCEEDED
from bulwark.store.settings import get_settings
from bulwark.store.store import Store

STAND_IN = """
import sys, time
from bulwark.store.store import Store
store = Store(sys.argv[1])
job_id, owner, action = sys.argv[2], sys.argv[3], sys.argv[4]
if action == "finish":
    assert store.finish(job_id, owner, "succeeded")
    time.sleep(2.0)  # what follows the row's mark: the terminal event, the cleanup
    sys.exit(0)
time.sleep(60)  # "work": until stopped
"""


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path / 'bulwark.db'}"
    monkeypatch.setenv("BULWARK_DATABASE_URL", url)
    monkeypatch.setenv("BULWARK_HEARTBEAT_SECONDS", "0.1")
    from bulwark.workers.jobs import tasks as module

    for cached in (get_settings, module.store, module.lifecycle):
        cached.cache_clear()
    yield module, url
    for cached in (get_settings, module.store, module.lifecycle):
        cached.cache_clear()


def _claimed(url: str) -> tuple[Store, str, str]:
    store = Store(url)
    store.migrate()
    store.create_api_key("t")
    job, _ = store.create_job("t", {"name": "x"}, max_attempts=2, max_queued=10)
    assert store.claim(job.id, "w1", stale_after=60) is not None
    return store, job.id, "w1"


def _stand_in(url: str, job_id: str, owner: str, action: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STAND_IN, url, job_id, owner, action],
                            start_new_session=True)


def test_a_trainer_that_finished_its_row_is_let_exit_on_its_own(tasks):
    module, url = tasks
    store, job_id, owner = _claimed(url)
    proc = _stand_in(url, job_id, owner, "finish")
    t0 = time.monotonic()
    code = module.supervise(proc, job_id, owner)
    assert code == 0, "not killed while it wrote its terminal event"
    assert time.monotonic() - t0 >= 2.0
    assert store.get_job("t", job_id).state == SUCCEEDED


def test_a_trainer_whose_job_was_taken_is_stopped_at_once(tasks):
    module, url = tasks
    store, job_id, owner = _claimed(url)
    proc = _stand_in(url, job_id, owner, "work")
    time.sleep(0.5)
    assert store.get_job("t", job_id).state == RUNNING
    assert store.finish(job_id, owner, QUEUED, error="re-queued")  # as the reaper does
    t0 = time.monotonic()
    code = module.supervise(proc, job_id, owner)
    assert code < 0, "killed"
    assert time.monotonic() - t0 < 10.0
