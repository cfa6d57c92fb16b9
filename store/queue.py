"""Enqueueing jobs: the API and the reaper send the task by name with the job id only.

The broker settings (docs/design.md, "Broker settings") live here so producers and workers
agree on them; the worker side (``bulwark.workers.jobs.celery_app``) adds the task module.
Torch-free.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Any

from celery import Celery

from bulwark.store.settings import Settings, get_settings

TASK_NAME = "bulwark.run_job"


def celery_config(s: Settings) -> dict[str, Any]:
    max_run = s.max_run_seconds
    vt = max_run + 3600  # above the hard time limit: Redis must not redeliver a running job
    return dict(
        task_acks_late=True,
        task_reject_on_worker_lost=True,
        worker_prefetch_multiplier=1,
        worker_concurrency=1,
        worker_max_tasks_per_child=1,
        task_soft_time_limit=max_run,
        task_time_limit=max_run + 600,
        broker_transport_options={"visibility_timeout": vt},
        result_backend_transport_options={"visibility_timeout": vt},
        visibility_timeout=vt,
        task_ignore_result=True,
        broker_connection_retry_on_startup=True,
        worker_cancel_long_running_tasks_on_connection_loss=False,
        # REMAP_SIGTERM=SIGQUIT + this: a stopping worker cold-stops in time and its
        # unacknowledged message is restored to the queue (compose stop_grace_period > 60 s)
        worker_soft_shutdown_timeout=s.worker_soft_shutdown_seconds,
        task_serializer="json",
        result_serializer="json",
        accept_content=["json"],
        worker_send_task_events=True,
        task_send_sent_event=True,
        task_default_queue=s.queue,
        worker_hijack_root_logger=False,
    )


def make_celery(s: Settings | None = None, *, include: list[str] | None = None) -> Celery:
    s = s or get_settings()
    app = Celery("bulwark", broker=s.redis_url or "redis://127.0.0.1:6379/0",
                 include=include or [])
    app.conf.update(celery_config(s))
    return app


@lru_cache
def producer() -> Celery:
    return make_celery()


def enqueue(job_id: str, attempt: int = 0, *, app: Celery | None = None) -> None:
    """Send ``run_job(job_id)``; the task id names the job and the attempt it follows."""
    (app or producer()).send_task(TASK_NAME, args=[job_id], task_id=f"{job_id}.{attempt}",
                                  queue=get_settings().queue)


def revoke(job_id: str, attempt: int = 0, *, app: Celery | None = None) -> None:
    """Revoke a queued job's message (never terminate=True: the pid may run another task)."""
    (app or producer()).control.revoke(f"{job_id}.{attempt}")


BROKER_ERRORS: tuple[type[BaseException], ...] = (OSError, ConnectionError)


def _broker_errors() -> tuple[type[BaseException], ...]:
    import kombu.exceptions
    import redis.exceptions

    return (kombu.exceptions.OperationalError, redis.exceptions.ConnectionError,
            redis.exceptions.TimeoutError, *BROKER_ERRORS)


def send(store, job_id: str, attempt: int = 0) -> bool:
    """Enqueue the job and record that the broker took it (the outbox mark). False when the
    broker is unreachable: the row stays unmarked and the reaper sends it later."""
    try:
        enqueue(job_id, attempt)
    except _broker_errors():
        return False
    store.mark_enqueued(job_id)
    return True


def broker_job_ids(client, queue: str) -> set[str]:
    """The job ids that some message in the broker names: waiting in ``queue`` (kombu's Redis
    list, and its priority lists) or delivered and not yet acknowledged (kombu's ``unacked``
    hash, which also holds messages a worker has reserved). Read by the reaper to find queued
    jobs whose message Redis lost (a restart that lost the last second of its AOF)."""
    import json

    def job_of(raw: str | bytes, *, unacked: bool) -> str | None:
        try:
            message = json.loads(raw)
            if unacked:
                message = message[0]
            return str(message["headers"]["id"]).split(".", 1)[0]
        except (ValueError, KeyError, IndexError, TypeError):
            return None

    ids = set()
    lists = [queue, *client.scan_iter(match=f"{queue}\x06\x16*")]
    for name in lists:
        ids.update(job_of(m, unacked=False) for m in client.lrange(name, 0, -1))
    ids.update(job_of(m, unacked=True) for m in client.hvals("unacked"))
    ids.discard(None)
    return ids


# Worker liveness: every worker's main process refreshes ``bulwark:worker:<name>`` (a TTL key)
# while it runs; /healthz counts them.
WORKER_KEY = "bulwark:worker:"
WORKER_TTL_SECONDS = 30


# every number of devices some worker has offered one job (a sorted set: devices -> last seen);
# kept after the worker goes, so a job waiting for its GPUs to come back is not refused
DEVICES_SEEN = "bulwark:worker_devices_seen"


def announce_worker(client, name: str, info: dict[str, Any]) -> None:
    import json
    import time

    client.set(WORKER_KEY + name, json.dumps(info), ex=WORKER_TTL_SECONDS)
    if "devices" in info:
        client.zadd(DEVICES_SEEN, {str(int(info["devices"])): time.time()})


def most_devices(client) -> int:
    """The most devices any worker of this service has ever offered one job (0: none yet)."""
    return max((int(m) for m in client.zrange(DEVICES_SEEN, 0, -1)), default=0)


def live_workers(client) -> list[str]:
    """The names of the workers that announced themselves within the last TTL."""
    return sorted(k.removeprefix(WORKER_KEY) for k in client.scan_iter(WORKER_KEY + "*"))
