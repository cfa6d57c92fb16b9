"""Every transition of a job, in one place (docs/design.md, "Job lifecycle").

A transition is three writes, always in this order: the row (the store decides, by
compare-and-set, whether the transition happens at all), then the event on the job's stream,
then the queue message (a token: the store picks the job a worker runs). The API, the Celery
task, the trainer, the worker's shutdown hook and the reaper all call these methods; none of
them writes a state, an event and a message on its own.

    queued ──claim──▶ running ──end──▶ succeeded | failed | cancelled
      ▲                  │
      └──retry / release / reap (attempts left)──┘
    queued ──cancel──▶ cancelled           running ──cancel──▶ (flag; the trainer ends it)

Torch-free; no FastAPI.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from typing import Any

from bulwark.store import queue
from bulwark.store.db import CANCELLED, FAILED, QUEUED, TERMINAL, Job
from bulwark.store.events import Events
from bulwark.store.settings import Settings
from bulwark.store.store import Claim, Store

log = logging.getLogger("bulwark.lifecycle")


class QueueUnavailable(Exception):
    """The broker did not take a new job's message: nothing was stored."""


class Lifecycle:
    def __init__(self, store: Store, events: Events, *,
                 send: Callable[[Store, str, int], bool] | None = None,
                 revoke: Callable[[str, int], None] | None = None):
        self.store, self.events = store, events
        self._send = send or (lambda st, job_id, attempt: queue.send(st, job_id, attempt))
        self._revoke = revoke or (lambda job_id, attempt: queue.revoke(job_id, attempt))

    @classmethod
    def from_settings(cls, s: Settings) -> Lifecycle:
        return cls(Store(s.resolved_database_url()), Events.from_settings(s))

    # -------------------------------------------------------------- new jobs
    def queued(self, jobs: Iterable[Job], *, data: dict[str, Any] | None = None,
               discard: Callable[[], None]) -> None:
        """Freshly stored jobs enter the queue: each its ``queued`` event and its message.
        Should the broker refuse the first message, ``discard`` removes what was stored (one
        job, or a whole sweep) with their streams and ``QueueUnavailable`` is raised; a later
        refusal leaves that row unsent, and the reaper sends it."""
        jobs = list(jobs)
        for i, job in enumerate(jobs):
            self.events.publish(job.id, "queued", dict(data or {}))
            if not self._send(self.store, job.id, 0) and i == 0:  # after the commit
                discard()
                for j in jobs:
                    _quietly(self.events.delete, j.id)
                raise QueueUnavailable("the job queue (Redis) is unreachable, so nothing was "
                                       "stored; submit again in a moment")

    def cancel(self, tenant_id: str, before: Job) -> Job:
        """Cancel a job that is not terminal: a queued one at once (its message may stay: the
        row decides), a running one by its flag, at its trainer's next check."""
        job = self.store.request_cancel(tenant_id, before.id)
        if before.state == QUEUED and job.state != QUEUED:
            self.events.publish(job.id, CANCELLED, {"while": "queued"})
            _quietly(self._revoke, job.id, before.attempt)
        elif job.state not in TERMINAL:
            self.events.publish(job.id, "cancel_requested", {})
        return job

    # -------------------------------------------------------------- a worker's attempt
    def claim(self, message_job_id: str, owner: str, s: Settings) -> Claim | None:
        """A worker's message for ``message_job_id`` claims the fairest claimable job (maybe
        another one: the message is a token), which turns ``running``."""
        claim = self.store.claim(message_job_id, owner, stale_after=s.stale_after_seconds,
                                 max_running=s.max_running, devices=s.worker_devices)
        if claim is not None:
            self.events.publish(claim.job_id, "running", {"attempt": claim.attempt,
                                                          "worker": owner})
        return claim

    def requeue_message(self, job_id: str, attempt: int) -> None:
        """A message that found its job still waiting goes back to the broker."""
        self._send(self.store, job_id, attempt)

    def end(self, job_id: str, owner: str, state: str, data: dict[str, Any] | None = None,
            **row: Any) -> bool:
        """The attempt's terminal transition (succeeded, failed, cancelled), then the stream's
        terminal event, only while ``owner`` still holds the lease (a job the reaper
        re-queued keeps its stream open). False when the lease was lost."""
        if not self.store.finish(job_id, owner, state, **row):
            return False
        self.events.publish(job_id, state, dict(data or {}))
        return True

    def retry(self, job_id: str, owner: str, reason: str, attempt: int) -> bool:
        """A crashed or killed attempt back to ``queued`` (counted), its message sent first:
        should Redis be down now, the reaper sends the unmarked row later."""
        if not self.store.finish(job_id, owner, QUEUED, error=reason):
            return False
        self._send(self.store, job_id, attempt)
        self.events.publish(job_id, "retrying", {"error": reason, "attempt": attempt})
        return True

    def release_worker(self, worker: str, reason: str) -> list[str]:
        """A stopping worker's running jobs back to ``queued``, uncounted, resumed from their
        checkpoints on the next worker."""
        released = self.store.release_worker(worker, reason)
        for job_id, attempt in released:
            log.warning("job %s: %s", job_id, reason)
            self._send(self.store, job_id, attempt)  # Redis away: the reaper sends it later
            self.events.publish(job_id, "retrying", {"error": reason, "attempt": attempt})
        return [job_id for job_id, _ in released]

    # -------------------------------------------------------------- the reaper
    def reap(self, s: Settings) -> list[str]:
        """One reaper pass; returns the job ids (re-)sent. Jobs with a stale heartbeat go back
        to the queue (or end, their attempts spent, or cancelled), with their events so that
        streams end; rows whose message never reached the broker, or that the broker lost,
        are sent again."""
        reaped = self.store.reap(stale_after=s.stale_after_seconds)
        for job_id in reaped[QUEUED]:
            job = self.store.get_job(None, job_id)
            self.events.publish(job_id, "retrying", {"error": "worker lost (stale heartbeat)",
                                                     "attempt": job.attempt})
            self._send(self.store, job_id, job.attempt)
            log.warning("reaper: job %s had a stale heartbeat; re-enqueued", job_id)
        for state in (FAILED, CANCELLED):
            for job_id in reaped[state]:
                self.events.publish(job_id, state, {"error": self.store.get_job(None, job_id)
                                                    .error})
        sent = []
        for job_id, attempt in self.store.unsent(older_than=s.unsent_after_seconds):
            if self._send(self.store, job_id, attempt):  # its message never reached the broker
                sent.append(job_id)
                log.warning("reaper: job %s was queued without a broker message; sent", job_id)
        marked = self.store.sent_before(older_than=s.unsent_after_seconds)
        if marked:  # the broker took their messages: does it still hold them?
            held = queue.broker_job_ids(self.events.redis, s.queue)
            for job_id, attempt in marked:
                if job_id not in held and self._send(self.store, job_id, attempt):
                    sent.append(job_id)
                    log.warning("reaper: the broker lost job %s's message; sent again", job_id)
        return reaped[QUEUED] + sent


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # best effort: the caller already has its answer
        log.exception("ignored error in %s", getattr(fn, "__name__", fn))
