"""What the routes share: the service's parts, the caller's tenant, the tenant's own jobs and
sweeps, event-stream slots, and the one helper for a hand-built 422."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import Depends, Header, HTTPException, Request
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CollectorRegistry

from bulwark.contract.artifacts import REPORT
from bulwark.contract.tracking import TrackingServers
from bulwark.service.limits import Slot
from bulwark.store.artifacts import job_key
from bulwark.store.db import Job, Sweep
from bulwark.store.events import Events
from bulwark.store.lifecycle import Lifecycle
from bulwark.store.settings import Settings
from bulwark.store.storage import Artifacts
from bulwark.store.store import Store

STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")


@dataclass
class Services:
    """The parts every route works with, built once by ``create_app``."""
    settings: Settings
    store: Store
    events: Events
    lifecycle: Lifecycle
    blobs: Artifacts  # the artifact root, or the bucket of BULWARK_ARTIFACT_URL
    servers: TrackingServers  # the operator's MLflow servers a job may name
    registry: CollectorRegistry

    def job_report(self, job: Job) -> dict[str, Any] | None:
        """The job's report.json, read from the artifact store; None before it has one."""
        if not any(a["name"] == REPORT for a in job.artifacts or []):
            return None
        try:
            raw = self.blobs.read(f"{job_key(job.tenant_id, job.id)}/{REPORT}")
            return None if raw is None else json.loads(raw)
        except (OSError, ValueError):
            return None


def services(request: Request) -> Services:
    return request.app.state.services


Svc = Annotated[Services, Depends(services)]


def unprocessable(loc: Sequence[str], msg: str, value: Any) -> HTTPException:
    """A 422 shaped as FastAPI's own: one problem, its field path, what is wrong, the input."""
    return HTTPException(422, [{"loc": list(loc), "type": "value_error", "msg": msg,
                                "input": value}])


BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="the API key in an X-API-Key header")
NO_KEY = ("missing or invalid API key: send it as 'Authorization: Bearer <key>' or "
          "'X-API-Key: <key>' (`bulwark serve` prints one; `bulwark keys create` makes more)")


def current_tenant(svc: Svc,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
                   x_api_key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> str:
    """The tenant of the request's API key (``Authorization: Bearer`` or ``X-API-Key``)."""
    key = x_api_key or (bearer.credentials.strip() if bearer else None)
    tenant_id = svc.store.authenticate(key) if key else None
    if tenant_id is None:
        raise HTTPException(401, NO_KEY, headers={"WWW-Authenticate": "Bearer"})
    return tenant_id


Tenant = Annotated[str, Depends(current_tenant)]


def resume_from(last_event_id: Annotated[str | None, Header()] = None) -> str | None:
    """The ``Last-Event-ID`` to resume a stream after (400 unless it is a stream id); checked
    before the stream starts."""
    if last_event_id is not None and not STREAM_ID.fullmatch(last_event_id):
        raise HTTPException(400, "Last-Event-ID must be the id of an event this stream sent "
                                 "(like 1764612345678-0)")
    return last_event_id


def owned_job(job_id: str, svc: Svc, tenant_id: Tenant) -> Job:
    """The tenant's job ``job_id`` (404 for anyone else's), resolved before a stream starts."""
    return svc.store.get_job(tenant_id, job_id)


def take_slot(request: Request, tenant_id: str) -> Slot:
    """One of the tenant's event-stream slots: 429 over the tenant's limit, 503 over the
    server's. The stream gives it back when it ends (or the client goes)."""
    slot = request.app.state.stream_slots.acquire(tenant_id)
    if isinstance(slot, str):
        status = 429 if slot.startswith("this tenant") else 503
        raise HTTPException(status, slot, headers={"Retry-After": "5"})
    return slot


def stream_slot(request: Request, tenant_id: Tenant, job: Annotated[Job, Depends(owned_job)],
                _resume: Annotated[str | None, Depends(resume_from)]) -> Slot:
    """A stream slot, taken once the job and ``Last-Event-ID`` are known good."""
    return take_slot(request, tenant_id)


def owned_sweep(sweep_id: str, svc: Svc, tenant_id: Tenant) -> tuple[Sweep, list[Job]]:
    """The tenant's sweep and its children (404 for anyone else's)."""
    return svc.store.get_sweep(tenant_id, sweep_id)


def sweep_stream_slot(request: Request, tenant_id: Tenant,
                      _sweep: Annotated[tuple[Sweep, list[Job]], Depends(owned_sweep)]) -> Slot:
    """A stream slot, taken once the sweep is known to be the tenant's."""
    return take_slot(request, tenant_id)
