"""Responses built from store rows; their shapes are ``bulwark.contract.api`` (shared with the
SDK)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from bulwark.contract.api import (
    ArtifactOut,
    DatasetOut,
    ErrorOut,
    JobOut,
    ModelOut,
    SweepChildOut,
    SweepOut,
)
from bulwark.contract.sweep import sweep_state
from bulwark.store.db import STATES, TERMINAL, Job, Sweep, UploadedDataset, UploadedModel

_ERRORS = {
    400: "a malformed request: a body that is not JSON (or not multipart, for uploads), or a "
         "bad header; the message says which",
    401: "missing or invalid API key (send 'Authorization: Bearer <key>' or 'X-API-Key')",
    404: "no such job, sweep, artifact, model or dataset for this tenant",
    409: "conflict: the job's state does not allow it, or an Idempotency-Key was reused "
         "with another body",
    413: "request body too large (the limit is in the message)",
    422: "invalid input: each entry names the field (loc) and the allowed range (msg)",
    429: "the tenant's queued-job quota is full (a sweep counts every child), or, for event "
         "streams, the tenant follows as many streams as it may (see Retry-After)",
    503: "the job queue is unreachable; nothing was stored (see Retry-After)",
}


def errors(*codes: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses`` entries for the error codes a route can answer."""
    return {c: {"model": ErrorOut, "description": _ERRORS[c]} for c in codes}


def job_out(job: Job) -> JobOut:
    progress = dict(job.progress or {})
    if job.state in TERMINAL:  # a finished job is in no phase
        progress.pop("phase", None)
    return JobOut(id=job.id, state=job.state, name=job.name, attempt=job.attempt,
                  max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
                  progress=progress, error=job.error,
                  artifacts=[ArtifactOut(**a) for a in job.artifacts or []],
                  created_at=job.created_at, started_at=job.started_at,
                  finished_at=job.finished_at, spec=job.spec, model_id=job.model_id,
                  verdict=progress.get("verdict"))


def model_out(m: UploadedModel) -> ModelOut:
    return ModelOut(id=m.id, arch=m.arch, meta=m.meta, sha256=m.sha256, size=m.size,
                    created_at=m.created_at)


def dataset_out(d: UploadedDataset) -> DatasetOut:
    return DatasetOut(id=d.id, meta=d.meta, sha256=d.sha256, size=d.size,
                      created_at=d.created_at)


def sweep_out(sweep: Sweep, jobs: list[Job],
              figures: Callable[[Job], dict[str, Any] | None]) -> SweepOut:
    """The sweep with its children in grid order; ``figures`` reads a succeeded child's
    headline figures (None while it has no report)."""
    by_id = {j.id: j for j in jobs}
    children = []
    for c in sweep.children:
        job = by_id.get(c["job_id"])
        if job is None:  # the child job was deleted
            continue
        children.append(SweepChildOut(
            name=c["name"], overrides=c["overrides"], job_id=job.id, state=job.state,
            error=job.error, figures=figures(job) if job.state == "succeeded" else None))
    states = [c.state for c in children]
    counts = {st: states.count(st) for st in STATES}
    return SweepOut(id=sweep.id, name=sweep.name, state=sweep_state(states), counts=counts,
                    children=children, created_at=sweep.created_at, spec=sweep.spec)
