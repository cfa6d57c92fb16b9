"""The Celery worker app (docs/design.md, "Broker settings"): the shared broker settings plus
the task module.

Torch-free: neither the worker's parent nor its prefork child imports torch; every job trains
in its own process (``bulwark.workers.jobs.trainer``), started and supervised by the task. Start a
worker with ``bulwark worker`` (prefork, concurrency 1, a fresh child per job).
"""

from __future__ import annotations

import atexit
import os
import threading
import time

from celery.signals import worker_ready, worker_shutdown

from bulwark.contract.files import private_files
from bulwark.store.queue import WORKER_KEY, WORKER_TTL_SECONDS, announce_worker, make_celery

private_files()  # this worker's children and trainers write the service's state: 0600 / 0700
app = make_celery(include=["bulwark.workers.jobs.tasks"])
_stop = threading.Event()


@worker_ready.connect
def _announce(sender=None, **_kwargs) -> None:
    """From the worker's main process: refresh this worker's liveness key every TTL/3 while it
    runs, so /healthz can say how many workers serve the queue."""
    import redis

    from bulwark.store.settings import get_settings

    name = getattr(sender, "hostname", None) or f"worker-{os.getpid()}"
    atexit.register(_release_jobs, name, os.getpid())
    client = redis.Redis.from_url(get_settings().redis_url)
    info = {"pid": os.getpid(), "since": time.time(),
            "devices": get_settings().worker_devices}  # what it offers one job

    def beat() -> None:
        while not _stop.is_set():
            try:
                announce_worker(client, name, info)
            except redis.exceptions.RedisError:
                pass  # Redis is away: the key lapses, /healthz reports no worker
            _stop.wait(WORKER_TTL_SECONDS / 3)
        try:
            client.delete(WORKER_KEY + name)
        except redis.exceptions.RedisError:
            pass

    threading.Thread(target=beat, daemon=True, name="bulwark-liveness").start()


@worker_shutdown.connect
def _retire(**_kwargs) -> None:
    _stop.set()


def _release_jobs(name: str, main_pid: int) -> None:
    """At the exit of the worker's main process, once its pool has stopped (warm or cold
    shutdown, e.g. SIGTERM under REMAP_SIGTERM=SIGQUIT; a cold shutdown skips the
    ``worker_shutdown`` signal, not atexit): the jobs its children held go back to the queue
    at once, uncounted, and resume from their checkpoints on the next worker — not after the
    reaper's stale-heartbeat timeout."""
    if os.getpid() != main_pid:  # a pool child inherits the handler: only the main releases
        return
    from bulwark.store.lifecycle import Lifecycle
    from bulwark.store.settings import get_settings

    Lifecycle.from_settings(get_settings()).release_worker(
        name, f"the worker {name} stopped; resumed on the next worker")
