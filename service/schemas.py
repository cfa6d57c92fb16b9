"""Responses built from store rows; their shapes are ``contract.api`` (shared with the SDK)."""

from __future__ import annotations

from typing import Any

from contract.api import ArtifactOut, DatasetOut, ErrorOut, JobOut, ModelOut
from service.db import TERMINAL, Job, UploadedDataset, UploadedModel

_ERRORS = {
    400: "a malformed request: a body that is not JSON (or not multipart, for uploads), or a "
         "bad header; the message says which",
    401: "missing or invalid API key (send 'Authorization: Bearer <key>' or 'X-API-Key')",
    404: "no such job, artifact, model or dataset for this tenant",
    409: "conflict: the job's state does not allow it, or an Idempotency-Key was reused "
         "with another body",
    413: "request body too large (the limit is in the message)",
    422: "invalid input: each entry names the field (loc) and the allowed range (msg)",
    429: "the tenant's queued-job quota is full",
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
                  finished_at=job.finished_at, spec=job.spec, model_id=job.model_id)


def model_out(m: UploadedModel) -> ModelOut:
    return ModelOut(id=m.id, arch=m.arch, meta=m.meta, sha256=m.sha256, size=m.size,
                    created_at=m.created_at)


def dataset_out(d: UploadedDataset) -> DatasetOut:
    return DatasetOut(id=d.id, meta=d.meta, sha256=d.sha256, size=d.size,
                      created_at=d.created_at)
