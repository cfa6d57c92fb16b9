"""The Celery task: win the lease, run the trainer in its own process, supervise it.

    worker_process_init: Popen python -m bulwark.workers.jobs.trainer --standby   (the standby: it
      imports torch, the engine and the store, then waits for a job on its stdin)
    run_job(job_id)
      claim the job row (compare-and-set; a duplicate delivery finds it taken and returns)
      hand JOB OWNER to the standby (or, without one, Popen python -m bulwark.workers.jobs.trainer
      JOB OWNER); either way a new process group that dies with this process
      every heartbeat: refresh the lease, read the cancel flag (cancel → SIGTERM, then SIGKILL)
      trainer exit 0 / 3 / 2: it wrote succeeded / cancelled / failed itself
      any other exit (a crash, a kill): back to queued and re-enqueued while attempts remain

Torch never loads in the Celery processes (OpenMP and CUDA do not survive fork); the trainer
process gets a clean CUDA context and frees the GPU when it exits.
"""

from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from functools import lru_cache

from celery.exceptions import SoftTimeLimitExceeded
from celery.signals import worker_process_init

from bulwark.store.db import CANCELLED, FAILED, QUEUED, TERMINAL
from bulwark.store.events import Events
from bulwark.store.lifecycle import Lifecycle
from bulwark.store.queue import TASK_NAME
from bulwark.store.settings import get_settings
from bulwark.store.store import Store
from bulwark.workers.jobs.celery_app import app
from bulwark.workers.jobs.trainer import EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_OK

log = logging.getLogger("bulwark.worker")

CANCEL_GRACE_SECONDS = 30.0
FINISH_GRACE_SECONDS = 30.0  # from the row's terminal mark to the trainer's exit


@lru_cache
def store() -> Store:
    return Store(get_settings().resolved_database_url())


@lru_cache
def lifecycle() -> Lifecycle:
    return Lifecycle(store(), Events.from_settings(get_settings()))


def _die_with_parent() -> None:  # pragma: no cover - runs in the child before exec
    """Linux: the trainer gets SIGKILL when its supervisor dies, so a killed worker never
    leaves an orphan trainer racing the retry."""
    os.setsid()
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def _trainer(*args: str, stdin: int | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "bulwark.workers.jobs.trainer", *args],
                            stdin=stdin, preexec_fn=_die_with_parent, env=dict(os.environ))


_standby: subprocess.Popen | None = None


@worker_process_init.connect
def _warm_trainer(**_kwargs) -> None:
    """In each pool child (one job each), before its job arrives: start the trainer that will
    run it, so that its imports (torch, torchattacks, the engine, SQLAlchemy: ~3 s) are done by
    the time the job is claimed."""
    global _standby
    if get_settings().standby_trainer:
        try:
            _standby = _trainer("--standby", stdin=subprocess.PIPE)
        except OSError as e:
            log.warning("no standby trainer (%s); jobs start cold", e)


def _drop_standby() -> None:
    """No job for this child: its standby goes now, not after its imports."""
    global _standby
    proc, _standby = _standby, None
    if proc is not None:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()


def start_trainer(job_id: str, owner: str) -> subprocess.Popen:
    """The trainer of ``job_id``: the standby, told its job, when it is alive; else a new one."""
    global _standby
    proc, _standby = _standby, None
    if proc is not None and proc.poll() is None:
        try:
            proc.stdin.write(f"{job_id}\n{owner}\n".encode())
            proc.stdin.close()
            return proc
        except OSError:  # it died between poll and write
            _kill_group(proc, signal.SIGKILL)
            proc.wait()
    return _trainer(job_id, owner)


def supervise(proc: subprocess.Popen, job_id: str, owner: str) -> int:
    """Heartbeat until the trainer exits; returns its exit code.

    The lease ends two ways: the trainer itself marked the row terminal (it then publishes
    the terminal event and exits: it gets ``FINISH_GRACE_SECONDS`` to do so), or the job was
    taken from it (re-queued by the reaper, deleted): it is stopped at once."""
    s = get_settings()
    cancel_at: float | None = None
    finished_at: float | None = None
    while True:
        try:
            return proc.wait(timeout=s.heartbeat_seconds)
        except subprocess.TimeoutExpired:
            pass
        still_owner, cancel = store().heartbeat(job_id, owner)
        if not still_owner:
            row = store().get_job_or_none(job_id)
            if row is not None and row.state in TERMINAL:
                finished_at = finished_at or time.monotonic()
                if time.monotonic() - finished_at < FINISH_GRACE_SECONDS:
                    continue
            log.warning("job %s: lease lost; stopping the trainer", job_id)
            _kill_group(proc, signal.SIGKILL)
        elif cancel and cancel_at is None:
            cancel_at = time.monotonic()
        if cancel_at is not None and time.monotonic() - cancel_at > CANCEL_GRACE_SECONDS:
            _kill_group(proc, signal.SIGKILL)


def _exit_text(code: int) -> str:
    if code < 0:
        try:
            return f"was killed by {signal.Signals(-code).name}"
        except ValueError:
            return f"was killed by signal {-code}"
    return f"exited with {code}"


@app.task(name=TASK_NAME, bind=True)
def run_job(self, message_job_id: str) -> str:
    s = get_settings()
    owner = f"{self.request.hostname}/{os.getpid()}/{self.request.id}"
    # the message is a token: the store picks the job it runs (its own, or a fairer one)
    claim = lifecycle().claim(message_job_id, owner, s)
    own = store().get_job_or_none(message_job_id)
    waiting = own is not None and own.state == QUEUED
    if claim is None:
        _drop_standby()
    if waiting and (claim is None or claim.job_id != message_job_id):
        # its job still waits (its tenant is at its cap, or another tenant's job went
        # first): put the message back so that no queued job is left without one
        if claim is None:
            time.sleep(s.defer_seconds)
        lifecycle().requeue_message(message_job_id, own.attempt)
    if claim is None:
        log.info("job %s: nothing claimable now (taken, finished, cancelled or capped)",
                 message_job_id)
        return "deferred" if waiting else "skipped"
    job_id = claim.job_id
    log.info("job %s: attempt %d by %s (message for %s)", job_id, claim.attempt, owner,
             message_job_id)
    proc = start_trainer(job_id, owner)
    try:
        code = supervise(proc, job_id, owner)
    except SoftTimeLimitExceeded:
        _kill_group(proc, signal.SIGKILL)
        proc.wait()
        msg = f"time limit of {s.max_run_seconds} s exceeded"
        lifecycle().end(job_id, owner, FAILED, {"error": msg}, error=msg)
        return "failed"
    if code in (EXIT_OK, EXIT_BAD_INPUT, EXIT_CANCELLED):
        return {EXIT_OK: "succeeded", EXIT_BAD_INPUT: "failed", EXIT_CANCELLED: "cancelled"}[code]
    job = store().get_job(None, job_id)
    if job.cancel_requested:  # killed after the grace period, or crashed while stopping
        lifecycle().end(job_id, owner, CANCELLED, {"exit_code": code},
                        error="cancelled by request")
        return "cancelled"
    # The trainer crashed or was killed: retry from its last checkpoint while attempts remain.
    reason = f"trainer {_exit_text(code)} on attempt {claim.attempt}"
    if job.error:  # what the trainer said of it (an exception's summary)
        reason += f": {job.error}"
    if job.attempt < job.max_attempts and not job.cancel_requested:
        lifecycle().retry(job_id, owner, reason, job.attempt)
        return "requeued"
    lifecycle().end(job_id, owner, FAILED, {"error": reason},
                    error=f"{reason} (max_attempts reached)")
    return "failed"
