"""One job's training process: ``python -m bulwark.workers.jobs.trainer JOB_ID OWNER``, or
``python -m bulwark.workers.jobs.trainer --standby`` (imports first, then reads JOB_ID and OWNER
from stdin: the standby each Celery pool child keeps ready).

Started by the Celery task (``bulwark.workers.jobs.tasks``), which holds the lease and heartbeats.
This process re-validates the spec, runs the job in the job's artifact folder (resuming from its
checkpoint when an earlier attempt left one), publishes progress events, polls the cancel
flag between steps, and writes the terminal state itself. Exit codes: 0 succeeded,
2 bad input (failed, not retried), 3 cancelled; anything else is retried by the task.
"""

from __future__ import annotations

import errno
import re
import shutil
import sys
import time
import traceback
from pathlib import Path
from typing import Any

from bulwark.contract.artifacts import (
    CERTIFY_STATE,
    CHECKPOINT,
    DOWNLOADABLE,
    FINAL_STATE,
    RESUMABLE,
)
from bulwark.contract.files import private_files
from bulwark.store.artifacts import (
    dataset_key,
    dataset_path,
    describe_artifacts,
    job_dir,
    job_key,
    model_key,
    model_path,
)
from bulwark.store.db import CANCELLED, FAILED, SUCCEEDED
from bulwark.store.lifecycle import Lifecycle
from bulwark.store.settings import get_settings
from bulwark.store.storage import Artifacts, artifacts
from bulwark.store.store import Store, StoreError

EXIT_OK, EXIT_BAD_INPUT, EXIT_CANCELLED, EXIT_ERROR = 0, 2, 3, 1
# events that update the job row's ``progress`` (and the keys of theirs it keeps)
PROGRESS_EVENTS = ("started", "resumed", "epoch", "phase", "evaluation", "certification")
PROGRESS_KEYS = ("epoch", "phase", "monitor", "attack", "model", "done", "total",
                 "eta_seconds")


# an absolute path: "/" not after ":", "/", a word character, "." or "~" (so URLs and 8/255
# stay), and not an API route (/v1/...)
_ABS_PATH = re.compile(r"(?<![:\w/.~-])/(?!v1/)[^\s'\":,()\[\]{}]+")


def scrub_paths(text: str) -> str:
    """``text`` with every absolute path replaced by ``<server path>``: what a tenant sees of a
    worker error (the operator's log keeps it whole)."""
    return _ABS_PATH.sub("<server path>", text)


class CancelPoll:
    """``should_stop`` for the runner: reads the job's cancel flag at most every few seconds."""

    def __init__(self, store: Store, job_id: str, every: float):
        self.store, self.job_id, self.every = store, job_id, every
        self._next, self._value = 0.0, False

    def __call__(self) -> bool:
        now = time.monotonic()
        if not self._value and now >= self._next:
            self._next = now + self.every
            self._value = self.store.get_job(None, self.job_id).cancel_requested
        return self._value


class Mirror:
    """Copies a run folder's files to a remote artifact store as they change (a remote
    store only; with the local root the folder is the store). ``every`` throttles the copies
    asked for with ``throttled=True`` (the certification's per-chunk results)."""

    def __init__(self, blobs: Artifacts, key: str, out: Path, every: float = 10.0):
        self.blobs, self.key, self.out, self.every = blobs, key, out, every
        self.seen: dict[str, tuple[int, int]] = {}
        self._next = 0.0

    def __call__(self, names: tuple[str, ...], throttled: bool = False) -> None:
        if not self.blobs.remote or throttled and time.monotonic() < self._next:
            return
        self._next = time.monotonic() + self.every
        for name in names:
            path = self.out / name
            if not path.is_file():
                continue
            st = path.stat()
            if self.seen.get(name) != (st.st_mtime_ns, st.st_size):
                self.blobs.push(f"{self.key}/{name}", path)
                self.seen[name] = (st.st_mtime_ns, st.st_size)

    def forget(self, name: str) -> None:
        """Delete ``name`` here and in the store (the checkpoint of a finished job)."""
        (self.out / name).unlink(missing_ok=True)
        if self.blobs.remote:
            self.blobs.delete(f"{self.key}/{name}")


class InputLost(Exception):
    """An upload the job names is gone (a bad-input failure, not retried)."""


def job_inputs(job, spec, store: Store, settings, blobs: Artifacts
               ) -> tuple[str | None, str | None]:
    """The job's uploaded dataset and weights as files on this host: the recorded paths with
    the local artifact root, else fetched from the bucket into this host's scratch."""

    def local_copy(key: str, local: Path, recorded: str) -> str | None:
        if not blobs.remote:
            return recorded
        return str(local) if blobs.pull(key, local) else None

    data_path = None
    if spec.dataset.name == "npz":
        dataset_id = spec.dataset.path.split("/", 1)[1]
        try:
            row = store.get_dataset(job.tenant_id, dataset_id)
        except StoreError:
            raise InputLost(f"dataset.path {spec.dataset.path}: no such upload of yours") from None
        data_path = local_copy(dataset_key(job.tenant_id, dataset_id),
                               dataset_path(settings, job.tenant_id, dataset_id), row.path)
        if data_path is None:
            raise InputLost(f"dataset.path {spec.dataset.path}: the artifact store has lost the "
                            "upload; upload it again")
    weights = None
    if job.model_id:
        weights = local_copy(model_key(job.tenant_id, job.model_id),
                             model_path(settings, job.tenant_id, job.model_id),
                             store.get_model(job.tenant_id, job.model_id).path)
        if weights is None:
            raise InputLost(f"model.weights: the artifact store has lost model {job.model_id}; "
                            "upload it again")
    return data_path, weights


class Relay:
    """The runner's ``on_event``: new checkpoints and partial results mirrored to the artifact
    store, every event published on the job's stream, and the row's ``progress`` (with the
    lease's heartbeat) kept current."""

    def __init__(self, job_id: str, owner: str, store: Store, events, mirror: Mirror, *,
                 attempt: int):
        self.job_id, self.owner, self.store, self.events = job_id, owner, store, events
        self.mirror = mirror
        self.progress: dict[str, Any] = {"attempt": attempt}

    def __call__(self, kind: str, data: dict[str, Any]) -> None:
        if kind in ("epoch", "remediated"):  # each follows a new checkpoint
            self.mirror((CHECKPOINT,))
        elif kind in ("certification", "evaluation"):  # partial results, every 10 s at most
            self.mirror(RESUMABLE[1:], throttled=True)
        self.events.publish(self.job_id, kind, data)
        if kind not in PROGRESS_EVENTS:
            return
        progress = self.progress
        if kind == "phase":  # a new phase: the previous one's counters are done
            for k in ("attack", "model", "done", "total", "eta_seconds"):
                progress.pop(k, None)
        if kind == "certification":
            progress["phase"] = "certification"
        progress.update({"last_event": kind, **{k: v for k, v in data.items()
                                                if k in PROGRESS_KEYS}})
        if kind == "started":
            progress["epochs"] = data.get("epochs")
        self.store.heartbeat(self.job_id, self.owner, dict(progress))


def standby() -> list[str] | None:
    """``--standby``: import what a job needs, then wait for its id and owner, one line each,
    on stdin (the Celery task's hand-off). None at end of input: the task had no job."""
    import bulwark.contract.spec  # noqa: F401
    import bulwark.workers.engine.runner  # noqa: F401  (torch, torchattacks, the engine)

    lines = [sys.stdin.readline().strip() for _ in range(2)]
    return lines if all(lines) else None


def main(argv: list[str] | None = None) -> int:
    args = argv if argv is not None else sys.argv[1:]
    private_files()  # checkpoints, reports, weights: 0600 in 0700 folders
    if args[:1] == ["--standby"]:
        args = standby()
        if args is None:
            return EXIT_OK
    job_id, owner = args[:2]
    settings = get_settings()
    lifecycle = Lifecycle.from_settings(settings)
    store, events = lifecycle.store, lifecycle.events
    job = store.get_job(None, job_id)

    def end(state: str, data: dict, **row) -> bool:
        """The attempt's terminal transition (store/lifecycle.py), while it holds the lease."""
        if not lifecycle.end(job_id, owner, state, data, **row):
            print(f"job {job_id}: lease lost before it could be marked {state}",
                  file=sys.stderr)
            return False
        return True

    def fail(msg: str, code: int) -> int:
        print(f"job {job_id} failed: {msg}", file=sys.stderr)  # the operator's log: in full
        shown = scrub_paths(msg)  # the tenant's view: no server paths
        end(FAILED, {"error": shown}, error=shown)
        return code

    from pydantic import ValidationError

    from bulwark.contract.spec import JobSpec, format_validation_error

    try:
        spec = JobSpec.model_validate(job.spec)
    except (ValidationError, ValueError) as e:
        return fail(f"invalid job spec: {format_validation_error(e)}", EXIT_BAD_INPUT)

    if spec.compute.devices == "all":  # every device this worker gives a job
        spec = spec.model_copy(update={"compute": spec.compute.model_copy(
            update={"devices": settings.worker_devices})})

    from bulwark.contract.datasets import DataError, DataNotFound, api_dataset_problem
    from bulwark.workers.engine.runner import Cancelled, run_job

    problem = api_dataset_problem(spec.dataset)  # re-checked here: the API is not the only door
    if problem is not None:
        return fail(f"invalid job spec: dataset.{problem[0]}: {problem[1]}", EXIT_BAD_INPUT)
    servers = settings.tracking_servers()
    problem = servers.api_problem(spec.tracking)
    if problem is not None:
        return fail(f"invalid job spec: {problem[0]}: {problem[1]}", EXIT_BAD_INPUT)
    blobs = artifacts(settings)

    try:
        data_path, weights = job_inputs(job, spec, store, settings, blobs)
    except InputLost as e:
        return fail(str(e), EXIT_BAD_INPUT)
    out = job_dir(settings, job.tenant_id, job_id)
    key = job_key(job.tenant_id, job_id)
    for name in RESUMABLE:  # an earlier attempt's state, maybe from another host
        blobs.pull(f"{key}/{name}", out / name)
    mirror = Mirror(blobs, key, out)
    on_event = Relay(job_id, owner, store, events, mirror, attempt=job.attempt)
    progress = on_event.progress

    try:
        # resume=True: continue from the checkpoint an earlier attempt left, if there is one
        report = run_job(spec, out, device=settings.device, resume=True, progress=False,
                         on_event=on_event, weights=weights, data_path=data_path,
                         should_stop=CancelPoll(store, job_id, settings.cancel_poll_seconds),
                         tracking_tags={"bulwark.job_id": job_id,
                                        "bulwark.tenant": job.tenant_id},
                         tracking=servers)
    except Cancelled:
        end(CANCELLED, {}, error="cancelled by request")
        return EXIT_CANCELLED
    except DataNotFound:
        return fail(f"dataset {spec.dataset.name!r} is not on this server: the operator "
                    "places its files under the workers' data root (BULWARK_DATA_ROOT); or "
                    "upload your data as .npz with POST /v1/datasets", EXIT_BAD_INPUT)
    except (DataError, ValueError) as e:
        return fail(str(e), EXIT_BAD_INPUT)
    except MemoryError:
        return fail("out of host memory: the job does not fit this worker (a smaller dataset, "
                    "batch_size or evaluation batch)", EXIT_BAD_INPUT)
    except Exception as e:  # a bug or a resource error: the task decides whether to retry
        first = (str(e).splitlines() or [""])[0]
        if type(e).__name__ == "OutOfMemoryError" or "can't allocate memory" in str(e):
            # torch's, on the accelerator or the host (DefaultCPUAllocator): not retried
            return fail(f"out of memory: {first} — lower schedule.batch_size or the "
                        "evaluation batch sizes, use bf16, or a smaller dataset",
                        EXIT_BAD_INPUT)
        if isinstance(e, OSError) and e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EROFS):
            # the same storage fails a retry the same way: a clear failure, not three
            return fail(f"the artifact storage refused a write ({e.strerror}): the job's last "
                        "checkpoint is intact; the operator frees space on the workers' "
                        "artifact volume, then submit the job again", EXIT_BAD_INPUT)
        traceback.print_exc()
        # the task retries; its reason shows this line (paths scrubbed: tenants read it)
        store.note_error(job_id, owner, scrub_paths(f"{type(e).__name__}: {first}"))
        return EXIT_ERROR
    listed = describe_artifacts(out)
    mirror((*DOWNLOADABLE, CERTIFY_STATE))  # in the store before the row says so
    verdict = {k: report["verdict"][k] for k in ("label", "reason")}
    if end(SUCCEEDED, {"final": report["final"], "verdict": verdict}, artifacts=listed,
           progress={**progress, "verdict": verdict}):
        # only now: a crash before the row said succeeded retries from this checkpoint
        mirror.forget(CHECKPOINT)
        mirror.forget(FINAL_STATE)  # the runner removed it here; the store's copy goes too
        if blobs.remote:  # the bucket holds the run; this host's scratch copy goes
            shutil.rmtree(out, ignore_errors=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
