"""The Celery worker app (SERVICE.md §1): the shared broker settings plus the task module.

Torch-free: neither the worker's parent nor its prefork child imports torch; every job trains
in its own process (``workers.jobs.trainer``), started and supervised by the task. Start a worker
with ``bulwark worker`` (prefork, concurrency 1, a fresh child per job).
"""

from __future__ import annotations

from service.queue import make_celery

app = make_celery(include=["workers.jobs.tasks"])
