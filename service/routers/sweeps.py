"""/v1/sweeps: a grid of jobs submitted in one go, shown, cancelled and followed as one."""

from __future__ import annotations

import asyncio
from typing import Annotated, Any

from fastapi import APIRouter, Depends, HTTPException, Query
from fastapi.requests import Request
from fastapi.sse import EventSourceResponse, ServerSentEvent

from bulwark.contract.api import SweepList, SweepOut
from bulwark.contract.spec import SpecError
from bulwark.contract.sweep import SweepSpec, expand, headline
from bulwark.service.deps import Services, Svc, Tenant, sweep_stream_slot, unprocessable
from bulwark.service.limits import Slot
from bulwark.service.schemas import errors, sweep_out
from bulwark.service.streams import Entry, follow, stream_event
from bulwark.service.submission import admit, enqueue
from bulwark.store.db import TERMINAL, Job
from bulwark.store.events import stream_key
from bulwark.store.store import StoreError

router = APIRouter(tags=["sweeps"])


def child_figures(svc: Services):
    def figures(job: Job) -> dict[str, Any] | None:
        rep = svc.job_report(job)
        try:
            return headline(rep) if rep else None
        except ValueError:  # a report the typed Report cannot read
            return None
    return figures


def show_sweep(svc: Services, tenant_id: str, sweep_id: str) -> SweepOut:
    return sweep_out(*svc.store.get_sweep(tenant_id, sweep_id), child_figures(svc))


@router.post("/v1/sweeps", response_model=SweepOut, status_code=201,
             responses=errors(400, 401, 413, 422, 429, 503))
def submit_sweep(sweep: SweepSpec, tenant_id: Tenant, svc: Svc) -> SweepOut:
    """A base job spec crossed with a grid over spec fields (and named variants): every
    child is a complete job, checked like ``POST /v1/jobs`` and queued in one go (all or
    none; the tenant's queued quota counts each). ``base`` is a spec mapping here (a file
    path is a `bulwark sweep` feature)."""
    if isinstance(sweep.base, str):
        raise unprocessable(["body", "base"], "must be a job spec mapping through the API (a "
                            "spec file path is a `bulwark sweep` feature)", sweep.base)
    if sweep.variants_from:  # files of the caller's machine, never the server's
        raise unprocessable(["body", "variants_from"], "not accepted through the API (`bulwark "
                            "submit-sweep` reads those files and sends their variants)",
                            [v.file for v in sweep.variants_from])
    if sweep.out is not None:  # a folder of the caller's machine, never one of the server's
        raise unprocessable(["body", "out"], "not accepted through the API (the service keeps "
                            "each child's artifacts; `out` is a `bulwark sweep` feature)",
                            sweep.out)
    try:
        children = expand(sweep)
    except SpecError as e:
        raise unprocessable(["body"], str(e), None) from None
    model_ids = [admit(svc, tenant_id, child.spec) for child in children]
    s = svc.settings
    row, jobs = svc.store.create_sweep(
        tenant_id, sweep.model_dump(mode="json"),
        [(c.name, c.overrides, c.spec.model_dump(mode="json")) for c in children],
        max_attempts=s.max_attempts, max_queued=s.max_queued_per_tenant, model_ids=model_ids)
    enqueue(svc, jobs, data={"sweep_id": row.id},
            discard=lambda: svc.store.discard_sweep(tenant_id, row.id))
    return show_sweep(svc, tenant_id, row.id)


@router.get("/v1/sweeps", response_model=SweepList, responses=errors(401, 422))
def list_sweeps(tenant_id: Tenant, svc: Svc, limit: Annotated[int, Query(ge=1, le=200)] = 20,
                offset: Annotated[int, Query(ge=0)] = 0) -> SweepList:
    rows, total = svc.store.list_sweeps(tenant_id, limit=limit, offset=offset)
    return SweepList(items=[show_sweep(svc, tenant_id, r.id) for r in rows], total=total,
                     limit=limit, offset=offset)


@router.get("/v1/sweeps/{sweep_id}", response_model=SweepOut, responses=errors(401, 404))
def get_sweep(sweep_id: str, tenant_id: Tenant, svc: Svc) -> SweepOut:
    """The sweep's state, per-state counts and each child's state and figures."""
    return show_sweep(svc, tenant_id, sweep_id)


@router.post("/v1/sweeps/{sweep_id}/cancel", response_model=SweepOut, status_code=202,
             responses=errors(401, 404, 409))
def cancel_sweep(sweep_id: str, tenant_id: Tenant, svc: Svc) -> SweepOut:
    """Cancel every child that has not finished (queued ones at once, running ones at
    their trainer's next check); finished children keep their results."""
    _row, jobs = svc.store.get_sweep(tenant_id, sweep_id)
    live = [j for j in jobs if j.state not in TERMINAL]
    if not live:
        raise HTTPException(409, f"every job of sweep {sweep_id} has finished; nothing "
                                 "to cancel")
    for job in live:
        try:
            svc.lifecycle.cancel(tenant_id, job)
        except StoreError:  # deleted meanwhile
            continue
    return show_sweep(svc, tenant_id, sweep_id)


@router.get("/v1/sweeps/{sweep_id}/events", response_class=EventSourceResponse,
            responses=errors(401, 404, 429, 503))
async def sweep_events(sweep_id: str, request: Request, tenant_id: Tenant, svc: Svc,
                       slot: Annotated[Slot, Depends(sweep_stream_slot)]):
    """Server-sent events for the whole sweep: a ``snapshot`` (the sweep), then every
    child's events in arrival order, each with ``job_id`` and ``child`` (its name) in
    its data, and ``sweep_finished`` (the sweep again) once every child is terminal.
    Takes one of the tenant's stream slots. A reconnect starts over with a snapshot."""
    try:
        sweep, jobs = await asyncio.to_thread(svc.store.get_sweep, tenant_id, sweep_id)
        yield ServerSentEvent(event="snapshot", data=sweep_out(sweep, jobs, child_figures(svc))
                              .model_dump(mode="json"))
        names = {c["job_id"]: c["name"] for c in sweep.children}
        job_of = {stream_key(j.id): j.id for j in jobs}

        def rows() -> dict[str, Job | None]:
            return {stream_key(j.id): j for j in svc.store.get_sweep(tenant_id, sweep_id)[1]}

        async for item in follow(request, {key: "0" for key in job_of}, rows):
            if isinstance(item, Entry):
                child = job_of[item.key]
                yield stream_event(item.fields, job_id=child, child=names.get(child))
        if not await request.is_disconnected():
            current = await asyncio.to_thread(show_sweep, svc, tenant_id, sweep_id)
            yield ServerSentEvent(event="sweep_finished", data=current.model_dump(mode="json"))
    except StoreError:  # the sweep was deleted meanwhile
        return
    finally:
        slot.release()
