"""Response bodies of the API (the request body of POST /v1/jobs is ``contract.spec.JobSpec``)."""

from __future__ import annotations

import datetime as dt
from typing import Any

from pydantic import BaseModel

from service.db import Job, UploadedModel


class ArtifactOut(BaseModel):
    name: str
    size: int
    sha256: str


class JobOut(BaseModel):
    id: str
    state: str
    name: str | None
    attempt: int
    max_attempts: int
    cancel_requested: bool
    progress: dict[str, Any]
    error: str | None
    artifacts: list[ArtifactOut]
    created_at: dt.datetime
    started_at: dt.datetime | None
    finished_at: dt.datetime | None
    spec: dict[str, Any]
    model_id: str | None = None

    @classmethod
    def of(cls, job: Job) -> JobOut:
        return cls(id=job.id, state=job.state, name=job.name, attempt=job.attempt,
                   max_attempts=job.max_attempts, cancel_requested=job.cancel_requested,
                   progress=job.progress or {}, error=job.error,
                   artifacts=[ArtifactOut(**a) for a in job.artifacts or []],
                   created_at=job.created_at, started_at=job.started_at,
                   finished_at=job.finished_at, spec=job.spec, model_id=job.model_id)


class JobList(BaseModel):
    items: list[JobOut]
    total: int
    limit: int
    offset: int


class ModelOut(BaseModel):
    id: str
    arch: str
    meta: dict[str, Any]
    sha256: str
    size: int
    created_at: dt.datetime

    @classmethod
    def of(cls, m: UploadedModel) -> ModelOut:
        return cls(id=m.id, arch=m.arch, meta=m.meta, sha256=m.sha256, size=m.size,
                   created_at=m.created_at)


class Health(BaseModel):
    status: str
    database: bool
    redis: bool
