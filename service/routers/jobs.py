"""/v1/jobs: submit, list, show, cancel, delete, and follow a job's events."""

from __future__ import annotations

import asyncio
import shutil
import time
from typing import Annotated

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.requests import Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from bulwark.contract.api import JobList, JobOut, JobState
from bulwark.contract.spec import JobSpec
from bulwark.service.deps import Svc, Tenant, owned_job, resume_from, stream_slot
from bulwark.service.limits import Slot
from bulwark.service.schemas import errors, job_out
from bulwark.service.streams import Entry, follow, stream_event, terminal_event
from bulwark.service.submission import admit, enqueue
from bulwark.store.artifacts import job_dir, job_key
from bulwark.store.db import TERMINAL, Job
from bulwark.store.events import stream_key
from bulwark.store.store import StoreError

router = APIRouter(tags=["jobs"])


@router.post("/v1/jobs", response_model=JobOut, status_code=201,
             responses={200: {"model": JobOut, "description": "idempotent replay"},
                        **errors(400, 401, 409, 413, 422, 429, 503)})
def submit(spec: JobSpec, tenant_id: Tenant, svc: Svc, response: Response,
           idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
    model_id = admit(svc, tenant_id, spec)
    s = svc.settings
    job, created = svc.store.create_job(tenant_id, spec.model_dump(mode="json"),
                                        max_attempts=s.max_attempts,
                                        max_queued=s.max_queued_per_tenant,
                                        idempotency_key=idempotency_key, model_id=model_id)
    if created:
        enqueue(svc, [job], discard=lambda: svc.store.discard_unsent(tenant_id, job.id))
    else:
        response.status_code = 200
    return job_out(job)


@router.get("/v1/jobs", response_model=JobList, responses=errors(401, 422))
def list_jobs(tenant_id: Tenant, svc: Svc, state: JobState | None = None,
              id_prefix: Annotated[str | None, Query(
                  min_length=1, max_length=36,
                  description="only jobs whose id starts with this (CLIs resolve short "
                              "ids with it)")] = None,
              limit: Annotated[int, Query(ge=1, le=500)] = 50,
              offset: Annotated[int, Query(ge=0)] = 0) -> JobList:
    rows, total = svc.store.list_jobs(tenant_id, state=state, id_prefix=id_prefix,
                                      limit=limit, offset=offset)
    return JobList(items=[job_out(j) for j in rows], total=total, limit=limit, offset=offset)


@router.get("/v1/jobs/{job_id}", response_model=JobOut, responses=errors(401, 404))
def get_job(job_id: str, tenant_id: Tenant, svc: Svc) -> JobOut:
    return job_out(svc.store.get_job(tenant_id, job_id))


@router.post("/v1/jobs/{job_id}/cancel", response_model=JobOut, status_code=202,
             responses=errors(401, 404, 409))
def cancel(job_id: str, tenant_id: Tenant, svc: Svc) -> JobOut:
    before = svc.store.get_job(tenant_id, job_id)
    if before.state in TERMINAL:
        raise HTTPException(409, f"job {job_id} already {before.state}; nothing to cancel")
    return job_out(svc.lifecycle.cancel(tenant_id, before))


@router.delete("/v1/jobs/{job_id}", status_code=204, responses=errors(401, 404, 409))
def delete(job_id: str, tenant_id: Tenant, svc: Svc) -> Response:
    job = svc.store.delete_job(tenant_id, job_id)
    shutil.rmtree(job_dir(svc.settings, job.tenant_id, job.id), ignore_errors=True)
    svc.blobs.delete_prefix(job_key(job.tenant_id, job.id))
    svc.events.delete(job.id)
    return Response(status_code=204)


@router.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse,
            responses=errors(400, 401, 404, 429, 503))
async def job_events(job: Annotated[Job, Depends(owned_job)], request: Request, svc: Svc,
                     slot: Annotated[Slot, Depends(stream_slot)],
                     last_event_id: Annotated[str | None, Depends(resume_from)] = None):
    """Server-sent events: a ``snapshot`` of the job (unless resuming with
    ``Last-Event-ID``), then every event from the job's Redis stream, until the terminal
    event (``succeeded``, ``failed`` or ``cancelled``). Keep-alive comments while idle.
    A tenant may follow ``MAX_STREAMS_PER_TENANT`` streams at once (429 beyond)."""
    try:
        if last_event_id is None:
            yield ServerSentEvent(event="snapshot", data=job_out(job).model_dump(mode="json"))
        key = stream_key(job.id)
        # a finished job's stream is read at once, and for the grace period at most
        ended = {key: time.monotonic()} if job.state in TERMINAL else None
        async for item in follow(request, {key: last_event_id or "0"},
                                 lambda: {key: svc.store.get_job(None, job.id)}, ended=ended):
            if isinstance(item, Entry):
                yield stream_event(item.fields, event_id=item.event_id)
            elif item.row is not None:  # its terminal event was never published: the row's
                yield terminal_event(item.row, await asyncio.to_thread(svc.job_report,
                                                                       item.row))
    except StoreError:  # deleted meanwhile
        return
    finally:
        slot.release()
