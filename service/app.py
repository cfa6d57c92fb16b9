"""The REST API. Routes stay thin: validate, call the store, enqueue, shape the response.

Every route below /v1 needs an API key (``Authorization: Bearer KEY`` or ``X-API-Key``) and
sees only its tenant's jobs: another tenant's job is a 404. Torch is never imported here.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import reprlib
import secrets
import shutil
import threading
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any, Literal

import redis.asyncio as aioredis
from fastapi import (
    Depends,
    FastAPI,
    File,
    Form,
    Header,
    HTTPException,
    Query,
    Request,
    Response,
    UploadFile,
)
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse, StreamingResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from fastapi.sse import EventSourceResponse, ServerSentEvent
from fastapi_offline import FastAPIOffline
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Histogram, generate_latest
from pydantic import ValidationError

from bulwark.contract.api import (
    DatasetOut,
    Health,
    JobList,
    JobOut,
    JobState,
    Leaderboard,
    LeaderboardRow,
    ModelOut,
    SweepList,
    SweepOut,
)
from bulwark.contract.artifacts import REPORT
from bulwark.contract.cost import check_limits, estimate
from bulwark.contract.datasets import api_dataset_problem
from bulwark.contract.export import leaderboard_row, rank, robustbench_card
from bulwark.contract.files import private_files
from bulwark.contract.presets import preset_sources
from bulwark.contract.presets import presets as preset_table
from bulwark.contract.spec import MAX_CLASSES, MAX_NESTING, JobSpec, SpecError, parse_spec_text
from bulwark.contract.sweep import SweepSpec, expand, headline
from bulwark.service.artifacts import job_dir, job_key
from bulwark.service.db import CANCELLED, FAILED, QUEUED, TERMINAL, Job, Sweep
from bulwark.service.events import TERMINAL_EVENTS, Events, stream_key
from bulwark.service.limits import BodySizeLimit, NestingLimit, Slot, StreamSlots
from bulwark.service.metrics import JobCollector
from bulwark.service.models import UploadRejected, store_dataset, store_upload
from bulwark.service.queue import broker_job_ids, live_workers, most_devices, revoke, send
from bulwark.service.schemas import dataset_out, errors, job_out, model_out, sweep_out
from bulwark.service.settings import Settings, get_settings
from bulwark.service.storage import artifacts
from bulwark.service.store import Store, StoreError

log = logging.getLogger("bulwark.api")
KEEPALIVE_SECONDS = 15.0
# a job's row turns terminal a moment before its terminal event is published: a stream that
# finds the row terminal reads this long more before it ends
GRACE_SECONDS = 5.0
MODEL_REF = re.compile(r"models/([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})")
SPEC_MAX_BYTES = 1024 * 1024
STREAM_ID = re.compile(r"\d{1,20}-\d{1,20}")

# a report (an artifact, /v1/compare) is one self-contained page: no script may run in it,
# nothing is fetched, and no other site may frame it
REPORT_CSP = {"Content-Security-Policy": "default-src 'none'; img-src data:; style-src "
                                         "'unsafe-inline'; frame-ancestors 'none'; sandbox"}

UI_DIR = Path(__file__).resolve().parent / "ui"
UI_ASSETS = ("app.js", "app.css")


def stream_event(fields: dict[str, str], *, event_id: str | None = None,
                 **extra: Any) -> ServerSentEvent:
    """An entry of a job's Redis event stream as a server-sent event (its time in ``at``,
    ``extra`` merged into its data)."""
    data = json.loads(fields.get("data", "{}"))
    if "at" in fields:
        data["at"] = fields["at"]
    data.update(extra)
    return ServerSentEvent(event=fields["type"], data=data, id=event_id)


def terminal_event(job: Job, report: dict[str, Any] | None) -> ServerSentEvent:
    """A terminal job's last event read from its row, for a stream that lacks it (no id: it
    is not in the Redis stream). Its data as the trainer's would be, with ``from_row``."""
    data: dict[str, Any] = {"from_row": True}
    if (finished := job_out(job).finished_at) is not None:  # UTC, also from SQLite
        data["at"] = finished.isoformat(timespec="milliseconds")
    if job.error:
        data["error"] = job.error
    if report is not None and "final" in report:
        data["final"] = report["final"]
    return ServerSentEvent(event=job.state, data=data)


BEARER = HTTPBearer(auto_error=False, description="Authorization: Bearer <API key>")
API_KEY_HEADER = APIKeyHeader(name="X-API-Key", auto_error=False,
                              description="the API key in an X-API-Key header")
NO_KEY = ("missing or invalid API key: send it as 'Authorization: Bearer <key>' or "
          "'X-API-Key: <key>' (`bulwark serve` prints one; `bulwark keys create` makes more)")


def current_tenant(request: Request,
                   bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)],
                   x_api_key: Annotated[str | None, Depends(API_KEY_HEADER)]) -> str:
    """The tenant of the request's API key (``Authorization: Bearer`` or ``X-API-Key``)."""
    key = x_api_key or (bearer.credentials.strip() if bearer else None)
    tenant_id = request.app.state.store.authenticate(key) if key else None
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


def owned_job(job_id: str, request: Request, tenant_id: Tenant) -> Job:
    """The tenant's job ``job_id`` (404 for anyone else's), resolved before a stream starts."""
    return request.app.state.store.get_job(tenant_id, job_id)


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


def owned_sweep(sweep_id: str, request: Request, tenant_id: Tenant) -> tuple[Sweep, list[Job]]:
    """The tenant's sweep and its children (404 for anyone else's)."""
    return request.app.state.store.get_sweep(tenant_id, sweep_id)


def sweep_stream_slot(request: Request, tenant_id: Tenant,
                      _sweep: Annotated[tuple[Sweep, list[Job]], Depends(owned_sweep)]) -> Slot:
    """A stream slot, taken once the sweep is known to be the tenant's."""
    return take_slot(request, tenant_id)


def reap_once(store: Store, settings: Settings, events: Events) -> list[str]:
    """One reaper pass; returns the re-enqueued job ids. Terminal outcomes are published so
    that event streams end."""
    reaped = store.reap(stale_after=settings.stale_after_seconds)
    for job_id in reaped[QUEUED]:
        job = store.get_job(None, job_id)
        events.publish(job_id, "retrying", {"error": "worker lost (stale heartbeat)",
                                            "attempt": job.attempt})
        send(store, job_id, job.attempt)
        log.warning("reaper: job %s had a stale heartbeat; re-enqueued", job_id)
    for state in (FAILED, CANCELLED):
        for job_id in reaped[state]:
            events.publish(job_id, state, {"error": store.get_job(None, job_id).error})
    sent = []
    for job_id, attempt in store.unsent(older_than=settings.unsent_after_seconds):
        if send(store, job_id, attempt):  # its message never reached the broker
            sent.append(job_id)
            log.warning("reaper: job %s was queued without a broker message; sent", job_id)
    marked = store.sent_before(older_than=settings.unsent_after_seconds)
    if marked:  # the broker took their messages: does it still hold them?
        held = broker_job_ids(events.redis, settings.queue)
        for job_id, attempt in marked:
            if job_id not in held and send(store, job_id, attempt):
                sent.append(job_id)
                log.warning("reaper: the broker lost job %s's message; sent again", job_id)
    return reaped[QUEUED] + sent


def _reaper_loop(store: Store, settings: Settings, events: Events,
                 stop: threading.Event) -> None:
    while not stop.wait(settings.reaper_interval_seconds):
        try:
            reap_once(store, settings, events)
        except Exception:  # keep reaping through transient DB / broker errors
            log.exception("reaper pass failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    private_files()  # uploads, spooled files, a SQLite database: 0600 / 0700
    store = Store(s.resolved_database_url())
    blobs = artifacts(s)  # the artifact root, or the bucket of BULWARK_ARTIFACT_URL
    servers = s.tracking_servers()  # the operator's MLflow servers a job may name
    store.migrate()
    events = Events.from_settings(s)
    registry = CollectorRegistry()
    registry.register(JobCollector(store))
    latency = Histogram("bulwark_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        if s.reaper_enabled:
            threading.Thread(target=_reaper_loop, args=(store, s, events, stop), daemon=True,
                             name="bulwark-reaper").start()
        # the socket timeout must outlast the XREAD block, or an idle stream errors out
        # streams only, one connection each (StreamSlots keeps them within the pool)
        app.state.aredis = aioredis.Redis(connection_pool=aioredis.BlockingConnectionPool
                                          .from_url(s.redis_url, max_connections=s.max_streams,
                                                    timeout=10, decode_responses=True,
                                                    socket_timeout=KEEPALIVE_SECONDS + 30))
        try:
            yield
        finally:
            stop.set()
            await app.state.aredis.aclose()
            await app.state.aredis.connection_pool.disconnect()

    # FastAPIOffline serves Swagger UI from the assets its package ships: /docs works with no
    # internet. (ReDoc is off: its bundle still fetches a logo from a CDN.)
    app = FastAPIOffline(
        title="Bulwark", version="1", lifespan=lifespan, redoc_url=None,
        description="Adversarial-robustness training jobs: submit a job spec, follow its "
                    "events, fetch the robustness report. Every /v1 route needs an API key "
                    "(the Authorize button takes it).",
        swagger_ui_parameters={"persistAuthorization": True})
    app.state.store, app.state.events, app.state.settings = store, events, s
    app.state.stream_slots = StreamSlots(s.max_streams_per_tenant, s.max_streams)
    app.add_middleware(NestingLimit, limit=MAX_NESTING)  # inside the size limit: bounded
    app.add_middleware(BodySizeLimit, limit_for=lambda path: (
        s.max_upload_bytes if path.startswith(("/v1/models", "/v1/datasets"))
        else SPEC_MAX_BYTES))

    @app.middleware("http")
    async def _timing(request: Request, call_next):
        t0 = time.perf_counter()
        response = await call_next(request)
        if "content-security-policy" not in response.headers and \
                response.headers.get("content-type", "").startswith("text/html"):
            response.headers["Content-Security-Policy"] = "frame-ancestors 'none'"  # /docs
        route = request.scope.get("route")
        latency.labels(request.method, getattr(route, "path", "unmatched"),
                       str(response.status_code)).observe(time.perf_counter() - t0)
        return response

    @app.exception_handler(StoreError)
    async def _store_error(request: Request, exc: StoreError):
        return JSONResponse({"detail": str(exc)}, status_code=exc.status)

    def uploaded_model_id(spec: JobSpec, tenant_id: str) -> str | None:
        """``model.weights`` must name one of the tenant's uploads: never a server path."""
        ref = spec.model.weights
        if ref is None:
            return None
        m = MODEL_REF.fullmatch(ref)
        row = None
        if m:
            try:
                row = store.get_model(tenant_id, m.group(1))
            except StoreError:
                row = None
        if row is None:
            raise HTTPException(422, [{"loc": ["body", "model", "weights"], "type": "value_error",
                                       "msg": "must be 'models/<id>' of a model you uploaded "
                                              "with POST /v1/models", "input": ref}])
        if row.arch != spec.model.arch:
            raise HTTPException(422, [{"loc": ["body", "model", "arch"], "type": "value_error",
                                       "msg": f"the uploaded model is a {row.arch}",
                                       "input": spec.model.arch}])
        return row.id

    def check_cost(spec: JobSpec, tenant_id: str, dataset_id: str | None) -> None:
        """422 when the job's estimated work passes the tenant's limits (nothing stored)."""
        shape = None
        if dataset_id is not None:
            m = store.get_dataset(tenant_id, dataset_id).meta
            c, h, _w = m["shape"]
            shape = (m["train"], m["test"], c, h)
        problem = check_limits(estimate(spec, shape), s.limits(tenant_id))
        if problem is not None:
            raise HTTPException(422, [{"loc": ["body"], "type": "value_error", "msg": problem,
                                       "input": None}])

    def check_devices(spec: JobSpec) -> None:
        """422 when the job asks for more devices than any worker of this service has ever
        offered one job: it would wait in the queue for ever, holding a quota slot."""
        want = spec.compute.devices
        if want == "all" or want <= 1:
            return
        try:
            most = most_devices(events.redis)
        except Exception:  # Redis is away: the send that follows answers 503
            return
        if want > most:
            raise HTTPException(422, [{"loc": ["body", "compute", "devices"],
                                       "type": "value_error", "input": want, "msg": (
                f"no worker of this service offers {want} devices to one job (the most any "
                f"has offered: {most or 'none yet'}; BULWARK_WORKER_DEVICES on the worker); "
                f"ask for 1..{max(most, 1)} or 'all'")}])

    def uploaded_dataset_id(spec: JobSpec, tenant_id: str) -> str | None:
        """Through the API a job names a dataset the server has, or one the tenant uploaded:
        never a server path, never a download (both are `bulwark run` features)."""
        problem = api_dataset_problem(spec.dataset)
        if problem is None and spec.dataset.name == "npz":
            try:
                return store.get_dataset(tenant_id, spec.dataset.path.split("/", 1)[1]).id
            except StoreError:
                problem = ("path", "must be 'datasets/<id>' of a dataset you uploaded with "
                           "POST /v1/datasets", spec.dataset.path)
        if problem is not None:
            field, msg, value = problem
            raise HTTPException(422, [{"loc": ["body", "dataset", field],
                                       "type": "value_error", "msg": msg, "input": value}])
        tracking = servers.api_problem(spec.tracking)
        if tracking is not None:
            field, msg, value = tracking
            raise HTTPException(422, [{"loc": ["body", *field.split(".")],
                                       "type": "value_error", "msg": msg, "input": value}])
        return None

    def job_report(job: Job) -> dict[str, Any] | None:
        if not any(a["name"] == REPORT for a in job.artifacts or []):
            return None
        try:
            raw = blobs.read(f"{job_key(job.tenant_id, job.id)}/{REPORT}")
            return None if raw is None else json.loads(raw)
        except (OSError, ValueError):
            return None

    # ------------------------------------------------------------------ jobs
    @app.post("/v1/jobs", tags=["jobs"], response_model=JobOut, status_code=201,
              responses={200: {"model": JobOut, "description": "idempotent replay"},
                         **errors(400, 401, 409, 413, 422, 429, 503)})
    def submit(spec: JobSpec, tenant_id: Tenant, response: Response,
               idempotency_key: Annotated[str | None, Header(max_length=200)] = None) -> JobOut:
        model_id = uploaded_model_id(spec, tenant_id)
        check_cost(spec, tenant_id, uploaded_dataset_id(spec, tenant_id))
        check_devices(spec)
        job, created = store.create_job(tenant_id, spec.model_dump(mode="json"),
                                        max_attempts=s.max_attempts,
                                        max_queued=s.max_queued_per_tenant,
                                        idempotency_key=idempotency_key, model_id=model_id)
        if created:
            events.publish(job.id, "queued", {})
            if not send(store, job.id):  # after the commit: the worker must find the row
                store.discard_unsent(tenant_id, job.id)
                _quietly(events.delete, job.id)
                raise HTTPException(503, "the job queue (Redis) is unreachable, so nothing was "
                                         "stored; submit again in a moment",
                                    headers={"Retry-After": "10"})
        else:
            response.status_code = 200
        return job_out(job)

    @app.get("/v1/jobs", tags=["jobs"], response_model=JobList, responses=errors(401, 422))
    def list_jobs(tenant_id: Tenant, state: JobState | None = None,
                  id_prefix: Annotated[str | None, Query(
                      min_length=1, max_length=36,
                      description="only jobs whose id starts with this (CLIs resolve short "
                                  "ids with it)")] = None,
                  limit: Annotated[int, Query(ge=1, le=500)] = 50,
                  offset: Annotated[int, Query(ge=0)] = 0) -> JobList:
        rows, total = store.list_jobs(tenant_id, state=state, id_prefix=id_prefix,
                                      limit=limit, offset=offset)
        return JobList(items=[job_out(j) for j in rows], total=total, limit=limit,
                       offset=offset)

    @app.get("/v1/jobs/{job_id}", tags=["jobs"], response_model=JobOut, responses=errors(401, 404))
    def get_job(job_id: str, tenant_id: Tenant) -> JobOut:
        return job_out(store.get_job(tenant_id, job_id))

    def cancel_job(tenant_id: str, before: Job) -> Job:
        """Cancel a job that is not terminal: a queued one at once, a running one at its
        trainer's next check."""
        job = store.request_cancel(tenant_id, before.id)
        if before.state == QUEUED and job.state != QUEUED:
            events.publish(job.id, "cancelled", {"while": "queued"})
            _quietly(revoke, job.id, before.attempt)  # the row decides; the message may stay
        elif job.state not in TERMINAL:
            events.publish(job.id, "cancel_requested", {})
        return job

    @app.post("/v1/jobs/{job_id}/cancel", tags=["jobs"], response_model=JobOut, status_code=202,
              responses=errors(401, 404, 409))
    def cancel(job_id: str, tenant_id: Tenant) -> JobOut:
        before = store.get_job(tenant_id, job_id)
        if before.state in TERMINAL:
            raise HTTPException(409, f"job {job_id} already {before.state}; nothing to cancel")
        return job_out(cancel_job(tenant_id, before))

    @app.delete("/v1/jobs/{job_id}", tags=["jobs"], status_code=204,
                responses=errors(401, 404, 409))
    def delete(job_id: str, tenant_id: Tenant) -> Response:
        job = store.delete_job(tenant_id, job_id)
        shutil.rmtree(job_dir(s, job.tenant_id, job.id), ignore_errors=True)
        blobs.delete_prefix(job_key(job.tenant_id, job.id))
        events.delete(job.id)
        return Response(status_code=204)

    @app.get("/v1/jobs/{job_id}/report", tags=["jobs"], responses=errors(401, 404))
    def report(job_id: str, tenant_id: Tenant) -> dict[str, Any]:
        job = store.get_job(tenant_id, job_id)
        found = job_report(job)
        if found is None:
            raise HTTPException(404, f"job {job_id} has no report yet (state: {job.state})")
        return found

    @app.get("/v1/jobs/{job_id}/artifacts/{name}", tags=["jobs"], responses=errors(401, 404))
    def artifact(job_id: str, name: str, tenant_id: Tenant) -> Response:
        job = store.get_job(tenant_id, job_id)
        listed = {a["name"]: a for a in job.artifacts or []}
        if name not in listed:  # only names from the job's own list: no user paths
            raise HTTPException(404, f"job {job_id} has no artifact {name!r}; "
                                     f"it has {sorted(listed)}")
        key, checksum = f"{job_key(tenant_id, job_id)}/{name}", listed[name]["sha256"]
        headers = {"X-Checksum-SHA256": checksum, **REPORT_CSP}
        if not blobs.remote:
            return FileResponse(blobs.local(key), filename=name, headers=headers)
        size, chunks = blobs.open(key)  # streamed from the bucket, never spooled here
        return StreamingResponse(chunks, media_type="application/octet-stream", headers={
            **headers, "Content-Length": str(size),
            "Content-Disposition": f'attachment; filename="{name}"'})

    @app.get("/v1/jobs/{job_id}/events", tags=["jobs"], response_class=EventSourceResponse,
             responses=errors(400, 401, 404, 429, 503))
    async def job_events(job: Annotated[Job, Depends(owned_job)], request: Request,
                         slot: Annotated[Slot, Depends(stream_slot)],
                         last_event_id: Annotated[str | None, Depends(resume_from)] = None):
        """Server-sent events: a ``snapshot`` of the job (unless resuming with
        ``Last-Event-ID``), then every event from the job's Redis stream, until the terminal
        event (``succeeded``, ``failed`` or ``cancelled``). Keep-alive comments while idle.
        A tenant may follow ``MAX_STREAMS_PER_TENANT`` streams at once (429 beyond)."""
        try:
            if last_event_id is None:
                yield ServerSentEvent(event="snapshot", data=job_out(job).model_dump(mode="json"))
            after = last_event_id or "0"
            key = stream_key(job.id)
            r = request.app.state.aredis
            # when the row was first seen terminal (a finished job's stream is read at once)
            ended: float | None = time.monotonic() if job.state in TERMINAL else None
            while not await request.is_disconnected():
                block = GRACE_SECONDS if ended is not None else KEEPALIVE_SECONDS
                res = await r.xread({key: after}, count=100, block=int(block * 1000))
                if not res:
                    try:
                        current = await asyncio.to_thread(store.get_job, None, job.id)
                    except StoreError:  # deleted meanwhile
                        return
                    if current.state in TERMINAL:  # its terminal event follows the row
                        now = time.monotonic()  # closely: read a while longer for it
                        ended = ended or now
                        if now - ended >= GRACE_SECONDS:  # never published (the trainer
                            # died right after the row's mark, Redis was down): the row's
                            yield terminal_event(current, await asyncio.to_thread(
                                job_report, current))
                            return
                    continue  # FastAPI sends the keep-alive comments
                for event_id, fields in res[0][1]:
                    after = event_id
                    yield stream_event(fields, event_id=event_id)
                    if fields["type"] in TERMINAL_EVENTS:
                        return
        finally:
            slot.release()

    @app.get("/v1/jobs/{job_id}/export", tags=["jobs"], responses=errors(401, 404, 422))
    def export(job_id: str, tenant_id: Tenant,
               fmt: Annotated[Literal["robustbench"], Query(alias="format")] = "robustbench"
               ) -> dict[str, Any]:
        """A finished job as a RobustBench model card (its fields, plus threat model,
        training recipe, evaluation and the weights' digest); the weights are the job's
        ``model.safetensors`` artifact."""
        job = store.get_job(tenant_id, job_id)
        report_ = job_report(job)
        if report_ is None:
            raise HTTPException(404, f"job {job_id} has no report yet (state: {job.state})")
        weights = {a["name"]: a for a in job.artifacts or []}.get("model.safetensors")
        return robustbench_card(report_, job_id=job.id,
                                weights_sha256=weights["sha256"] if weights else None)

    @app.get("/v1/leaderboard", tags=["jobs"], response_model=Leaderboard,
             responses=errors(401, 422))
    def leaderboard(tenant_id: Tenant, dataset: str | None = None,
                    norm: Literal["linf", "l2"] | None = None,
                    epsilon: Annotated[float | None, Query(gt=0, le=64)] = None,
                    metric: Literal["autoattack", "pgd", "certified"] = "autoattack",
                    radius: Annotated[float, Query(ge=0, le=64)] = 0.5,
                    limit: Annotated[int, Query(ge=1, le=500)] = 50) -> Leaderboard:
        """The tenant's succeeded jobs (the newest 500) ranked by AutoAttack accuracy, PGD
        accuracy or certified accuracy at ``radius``; ties by clean accuracy, then time."""
        jobs, _ = store.list_jobs(tenant_id, state="succeeded", limit=500)
        rows, skipped = [], 0
        for job in jobs:
            t = job.spec.get("threat") or {}
            if (dataset and (job.spec.get("dataset") or {}).get("name") != dataset) or (
                    norm and t.get("norm") != norm) or (
                    epsilon is not None and not math.isclose(t.get("epsilon", -1), epsilon,
                                                              rel_tol=1e-6)):
                continue
            rep = job_report(job)
            row = leaderboard_row(rep, metric, radius) if rep else None
            if row is None:
                skipped += 1
                continue
            rows.append({**row, "job_id": job.id})
        items = [LeaderboardRow(**r) for r in rank(rows)[:limit]]
        return Leaderboard(metric=metric, radius=radius if metric == "certified" else None,
                           items=items, skipped=skipped)

    @app.get("/v1/presets", tags=["jobs"], responses=errors(401, 422))
    def list_presets(tenant_id: Tenant, dataset: str = "cifar10",
                     epsilon: Annotated[str, Query(max_length=32)] = "8/255"
                     ) -> dict[str, Any]:
        """Every preset's composition at ``epsilon`` for ``dataset``'s family, with the source
        of each value (what `bulwark presets` and `bulwark validate` print)."""
        try:
            return preset_table(epsilon, dataset=dataset)
        except ValueError as e:
            raise HTTPException(422, [{"loc": ["query", "epsilon"], "type": "value_error",
                                       "msg": str(e), "input": epsilon}]) from None

    @app.post("/v1/specs/resolve", tags=["jobs"], responses=errors(400, 401, 413, 422),
              openapi_extra={"requestBody": {"required": True, "content": {
                  "application/yaml": {"schema": {"type": "string"}},
                  "application/json": {"schema": {"type": "object"}}}}})
    async def resolve_spec(request: Request, tenant_id: Tenant) -> dict[str, Any]:
        """A job spec as YAML or JSON text, resolved as it would run (presets applied), with
        the source of every value its preset supplied — what `bulwark validate` prints.
        Nothing is stored; submit the returned ``spec`` with ``POST /v1/jobs``."""
        raw = await request.body()
        # off the event loop: a large body takes a while to read, and other tenants wait
        return await asyncio.to_thread(resolve_text, raw)

    @app.get("/v1/compare", tags=["jobs"], response_class=HTMLResponse,
             responses=errors(401, 404, 422))
    def compare_jobs(tenant_id: Tenant,
                     jobs: Annotated[str, Query(description="comma-separated job ids",
                                                max_length=37 * 100)]) -> HTMLResponse:
        """``compare.html`` for the tenant's finished jobs: the table and figures of
        `bulwark compare` (mean ± std over seeds per method and ε, CO runs)."""
        from bulwark.contract.compare import render as render_compare

        ids = [j for j in jobs.split(",") if j]
        if len(ids) < 1:
            raise HTTPException(422, [{"loc": ["query", "jobs"], "type": "value_error",
                                       "msg": "name at least one job id", "input": jobs}])
        rows = []
        for job_id in ids:
            job = store.get_job(tenant_id, job_id)
            rep = job_report(job)
            rows.append({"name": job.name or job.id[:8], "state": job.state,
                         **({"error": job.error} if job.error else {}),
                         # the spec names what differs where two jobs are not seeds of one
                         **(headline(rep) if rep else {}), "spec": job.spec})
        return HTMLResponse(render_compare(rows, f"Comparison of {len(rows)} jobs"),
                            headers=REPORT_CSP)

    # ------------------------------------------------------------------ sweeps
    def child_figures(job: Job) -> dict[str, Any] | None:
        rep = job_report(job)
        try:
            return headline(rep) if rep else None
        except KeyError:
            return None

    def show_sweep(tenant_id: str, sweep_id: str) -> SweepOut:
        return sweep_out(*store.get_sweep(tenant_id, sweep_id), child_figures)

    @app.post("/v1/sweeps", tags=["sweeps"], response_model=SweepOut, status_code=201,
              responses=errors(400, 401, 413, 422, 429, 503))
    def submit_sweep(sweep: SweepSpec, tenant_id: Tenant) -> SweepOut:
        """A base job spec crossed with a grid over spec fields (and named variants): every
        child is a complete job, checked like ``POST /v1/jobs`` and queued in one go (all or
        none; the tenant's queued quota counts each). ``base`` is a spec mapping here (a file
        path is a `bulwark sweep` feature)."""
        if isinstance(sweep.base, str):
            raise HTTPException(422, [{"loc": ["body", "base"], "type": "value_error",
                                       "msg": "must be a job spec mapping through the API (a "
                                              "spec file path is a `bulwark sweep` feature)",
                                       "input": sweep.base}])
        if sweep.variants_from:  # files of the caller's machine, never the server's
            raise HTTPException(422, [{"loc": ["body", "variants_from"], "type": "value_error",
                                       "msg": "not accepted through the API (`bulwark "
                                              "submit-sweep` reads those files and sends their "
                                              "variants)", "input": [
                                                  v.file for v in sweep.variants_from]}])
        if sweep.out is not None:  # a folder of the caller's machine, never one of the server's
            raise HTTPException(422, [{"loc": ["body", "out"], "type": "value_error",
                                       "msg": "not accepted through the API (the service keeps "
                                              "each child's artifacts; `out` is a `bulwark "
                                              "sweep` feature)", "input": sweep.out}])
        try:
            children = expand(sweep)
        except SpecError as e:
            raise HTTPException(422, [{"loc": ["body"], "type": "value_error", "msg": str(e),
                                       "input": None}]) from None
        model_ids = []
        for child in children:
            model_ids.append(uploaded_model_id(child.spec, tenant_id))
            check_cost(child.spec, tenant_id, uploaded_dataset_id(child.spec, tenant_id))
            check_devices(child.spec)
        row, jobs = store.create_sweep(
            tenant_id, sweep.model_dump(mode="json"),
            [(c.name, c.overrides, c.spec.model_dump(mode="json")) for c in children],
            max_attempts=s.max_attempts, max_queued=s.max_queued_per_tenant,
            model_ids=model_ids)
        for i, job in enumerate(jobs):
            events.publish(job.id, "queued", {"sweep_id": row.id})
            if not send(store, job.id) and i == 0:  # the broker is down: store nothing
                store.discard_sweep(tenant_id, row.id)
                for j in jobs:
                    _quietly(events.delete, j.id)
                raise HTTPException(503, "the job queue (Redis) is unreachable, so nothing was "
                                         "stored; submit again in a moment",
                                    headers={"Retry-After": "10"})
            # a later failed send leaves the row unsent: the reaper sends it again
        return show_sweep(tenant_id, row.id)

    @app.get("/v1/sweeps", tags=["sweeps"], response_model=SweepList, responses=errors(401, 422))
    def list_sweeps(tenant_id: Tenant, limit: Annotated[int, Query(ge=1, le=200)] = 20,
                    offset: Annotated[int, Query(ge=0)] = 0) -> SweepList:
        rows, total = store.list_sweeps(tenant_id, limit=limit, offset=offset)
        return SweepList(items=[show_sweep(tenant_id, r.id) for r in rows], total=total,
                         limit=limit, offset=offset)

    @app.get("/v1/sweeps/{sweep_id}", tags=["sweeps"], response_model=SweepOut,
             responses=errors(401, 404))
    def get_sweep(sweep_id: str, tenant_id: Tenant) -> SweepOut:
        """The sweep's state, per-state counts and each child's state and figures."""
        return show_sweep(tenant_id, sweep_id)

    @app.post("/v1/sweeps/{sweep_id}/cancel", tags=["sweeps"], response_model=SweepOut,
              status_code=202, responses=errors(401, 404, 409))
    def cancel_sweep(sweep_id: str, tenant_id: Tenant) -> SweepOut:
        """Cancel every child that has not finished (queued ones at once, running ones at
        their trainer's next check); finished children keep their results."""
        _row, jobs = store.get_sweep(tenant_id, sweep_id)
        live = [j for j in jobs if j.state not in TERMINAL]
        if not live:
            raise HTTPException(409, f"every job of sweep {sweep_id} has finished; nothing "
                                     "to cancel")
        for job in live:
            try:
                cancel_job(tenant_id, job)
            except StoreError:  # deleted meanwhile
                continue
        return show_sweep(tenant_id, sweep_id)

    @app.get("/v1/sweeps/{sweep_id}/events", tags=["sweeps"],
             response_class=EventSourceResponse, responses=errors(401, 404, 429, 503))
    async def sweep_events(sweep_id: str, request: Request, tenant_id: Tenant,
                           slot: Annotated[Slot, Depends(sweep_stream_slot)]):
        """Server-sent events for the whole sweep: a ``snapshot`` (the sweep), then every
        child's events in arrival order, each with ``job_id`` and ``child`` (its name) in
        its data, and ``sweep_finished`` (the sweep again) once every child is terminal.
        Takes one of the tenant's stream slots. A reconnect starts over with a snapshot."""
        try:
            sweep, jobs = await asyncio.to_thread(store.get_sweep, tenant_id, sweep_id)
            yield ServerSentEvent(event="snapshot", data=sweep_out(sweep, jobs, child_figures)
                                  .model_dump(mode="json"))
            names = {c["job_id"]: c["name"] for c in sweep.children}
            after = {stream_key(j.id): "0" for j in jobs}
            job_of = {stream_key(j.id): j.id for j in jobs}
            # a child's row turns terminal a moment before its terminal event is published:
            # such a child is read a while longer (GRACE_SECONDS) before it is let go
            ended: dict[str, float] = {}
            r = request.app.state.aredis
            while not await request.is_disconnected():
                if not after:
                    current = await asyncio.to_thread(show_sweep, tenant_id, sweep_id)
                    yield ServerSentEvent(event="sweep_finished",
                                          data=current.model_dump(mode="json"))
                    return
                block = 1.0 if ended else KEEPALIVE_SECONDS
                res = await r.xread(dict(after), count=100, block=int(block * 1000))
                if not res:  # idle: which children's rows are terminal (or deleted)?
                    try:
                        _s, rows = await asyncio.to_thread(store.get_sweep, tenant_id,
                                                           sweep_id)
                    except StoreError:
                        return
                    now, live = time.monotonic(), {stream_key(j.id): j for j in rows}
                    for k in list(after):
                        if k not in live or live[k].state in TERMINAL:
                            ended.setdefault(k, now)
                    for k in [k for k, t0 in ended.items() if now - t0 >= GRACE_SECONDS]:
                        after.pop(k, None)
                        ended.pop(k, None)
                    continue
                for key, entries in res:
                    for event_id, fields in entries:
                        after[key] = event_id
                        yield stream_event(fields, job_id=job_of[key],
                                           child=names.get(job_of[key]))
                        if fields["type"] in TERMINAL_EVENTS:
                            after.pop(key, None)
                            ended.pop(key, None)
                            break
        finally:
            slot.release()

    # ------------------------------------------------------------------ dashboard
    ui_csp = {"Content-Security-Policy": "default-src 'self'; img-src 'self' data: blob:; "
                                         "frame-src blob:; style-src 'self' 'unsafe-inline'; "
                                         "frame-ancestors 'none'",
              "Cache-Control": "no-cache"}

    @app.get("/ui", include_in_schema=False)
    def ui() -> FileResponse:
        """The dashboard: a static page and a script over this API (the key stays in the
        browser tab); nothing is fetched from anywhere else."""
        return FileResponse(UI_DIR / "index.html", headers=ui_csp)

    @app.get("/ui/{name}", include_in_schema=False)
    def ui_asset(name: str) -> FileResponse:
        if name not in UI_ASSETS:
            raise HTTPException(404, f"no {name!r} in the dashboard")
        return FileResponse(UI_DIR / name, headers=ui_csp)

    # ------------------------------------------------------------------ models
    @app.post("/v1/models", tags=["models"], response_model=ModelOut, status_code=201,
              responses=errors(400, 401, 413, 422))
    async def upload_model(tenant_id: Tenant, file: Annotated[UploadFile, File()],
                           arch: Annotated[str, Form()],
                           num_classes: Annotated[int, Form(ge=2, le=MAX_CLASSES)],
                           in_channels: Annotated[int, Form(ge=1, le=4)] = 3,
                           image_size: Annotated[int, Form(ge=4, le=512)] = 32) -> ModelOut:
        try:
            row = await asyncio.to_thread(
                store_upload, store, s, blobs, tenant_id, file.file, arch=arch,
                meta={"num_classes": num_classes, "in_channels": in_channels,
                      "image_size": image_size})
        except UploadRejected as e:
            raise HTTPException(e.status, str(e)) from e
        return model_out(row)

    @app.post("/v1/datasets", tags=["datasets"], response_model=DatasetOut, status_code=201,
              responses=errors(400, 401, 413, 422))
    async def upload_dataset(tenant_id: Tenant,
                             file: Annotated[UploadFile, File()]) -> DatasetOut:
        """An ``.npz`` with ``x_train``, ``y_train``, ``x_test``, ``y_test`` (images uint8 or
        float in [0, 1], NHWC or NHW; integer labels), read with numpy alone (no pickles).
        Jobs use it as ``{"dataset": {"name": "npz", "path": "datasets/<id>"}}``."""
        try:
            row = await asyncio.to_thread(store_dataset, store, s, blobs, tenant_id, file.file)
        except UploadRejected as e:
            raise HTTPException(e.status, str(e)) from e
        return dataset_out(row)

    # ------------------------------------------------------------------ operations
    @app.get("/healthz", tags=["operations"], response_model=Health)
    def healthz(response: Response) -> Health:
        """``ok``: database, Redis and at least one live worker; ``degraded``: no worker
        serves the queue (jobs wait; 200, the API itself is fine); ``down``: the database or
        Redis is unreachable (503)."""
        db = _ok(store.ping)
        rd = _ok(events.ping)
        workers: list[str] = []
        if rd:
            try:
                workers = live_workers(events.redis)
            except Exception:
                rd = False
        if not (db and rd):
            response.status_code = 503
        status = "down" if not (db and rd) else "ok" if workers else "degraded"
        return Health(status=status, database=db, redis=rd, workers=len(workers))

    @app.get("/metrics", tags=["operations"], responses=errors(401))
    def metrics(bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]
                ) -> Response:
        """Prometheus metrics. With ``BULWARK_METRICS_TOKEN`` set, only for
        ``Authorization: Bearer <that token>`` (an API key is not enough)."""
        if s.metrics_token and not (bearer is not None and secrets.compare_digest(
                bearer.credentials.encode(), s.metrics_token.encode())):
            raise HTTPException(401, "/metrics needs 'Authorization: Bearer <the operator's "
                                     "BULWARK_METRICS_TOKEN>'",
                                headers={"WWW-Authenticate": "Bearer"})
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    @app.exception_handler(ValidationError)
    async def _validation(request: Request, exc: ValidationError):
        return JSONResponse({"detail": short_errors(exc.errors(include_url=False))},
                            status_code=422)

    @app.exception_handler(RequestValidationError)
    async def _request_validation(request: Request, exc: RequestValidationError):
        # the default handler echoes the whole input, which may be large, or hold NaN /
        # Infinity / bytes that JSON cannot carry (a 500): the same 422, each input an excerpt
        # and such values as strings
        errs = [{**e, "input": excerpt(e["input"])} if "input" in e else e
                for e in list(exc.errors())[:50]]
        return JSONResponse({"detail": json_safe(jsonable_encoder(
            errs, custom_encoder={bytes: lambda b: b.decode(errors="replace")[:EXCERPT_CHARS]}))},
            status_code=422)

    return app


def resolve_text(raw: bytes) -> dict[str, Any]:
    """``POST /v1/specs/resolve``'s work: the spec in ``raw`` (YAML or JSON, from a tenant:
    no anchors or aliases, bounded nesting) resolved, with each preset value's source."""
    try:
        data = parse_spec_text(raw.decode("utf-8"), "the request body", plain=True)
    except UnicodeDecodeError:
        raise HTTPException(400, "the request body is not UTF-8 text") from None
    except SpecError as e:
        raise HTTPException(400, json_safe(str(e))) from None
    try:
        spec = JobSpec.model_validate(data)
    except ValidationError as e:  # 422 field by field, located in the body as POST's
        raise HTTPException(422, short_errors([{**err, "loc": ["body", *err["loc"]]}
                                               for err in e.errors(include_url=False)])
                            ) from None
    return {"spec": spec.model_dump(mode="json"),
            "sources": [{"field": f, "value": v, "source": src}
                        for f, v, src in preset_sources(spec)]}


EXCERPT_CHARS = 200
_REPR = reprlib.Repr()  # bounded: 3 levels, 6 items each, strings of 40
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple = 3, 6, 6, 6
_REPR.maxstring = _REPR.maxother = 40


def excerpt(value: Any) -> Any:
    """An error's echo of the input, short: a string cut at EXCERPT_CHARS, a small list or
    mapping as it is, a large or deep one as the start of its repr (never walked whole)."""
    if isinstance(value, str):
        return value if len(value) <= EXCERPT_CHARS else value[:EXCERPT_CHARS] + "…"
    if isinstance(value, dict | list | tuple):
        if _small(value):
            return value
        return _REPR.repr(value)[:EXCERPT_CHARS]
    return value


def _small(value: Any, nodes: int = 40, depth: int = 4) -> bool:
    """Whether ``value`` holds at most ``nodes`` values, ``depth`` deep (an iterative walk that
    stops as soon as either is passed)."""
    todo = [(value, 0)]
    while todo:
        v, d = todo.pop()
        nodes -= 1
        if nodes < 0 or d > depth:
            return False
        if isinstance(v, dict):
            todo.extend((x, d + 1) for x in v.values())
        elif isinstance(v, list | tuple):
            todo.extend((x, d + 1) for x in v)
        elif isinstance(v, str) and len(v) > EXCERPT_CHARS:
            return False
    return True


def short_errors(errors: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Validation errors (at most 50) with each echoed input cut to an excerpt, JSON-safe."""
    return json_safe([{**e, "input": excerpt(e["input"])} if "input" in e else e
                      for e in errors[:50]])


def json_safe(value: Any) -> Any:
    """``value`` with every non-finite float as its string ("nan", "inf") and every lone UTF-16
    surrogate (JSON's "\\udc80" escapes decode to them) as "?": JSON-encodable as UTF-8."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, str):
        return value.encode("utf-8", "replace").decode("utf-8")
    if isinstance(value, dict):
        return {json_safe(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, BaseException):
        return str(value)
    return value


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # best effort: the caller already has its answer
        log.exception("ignored error in %s", getattr(fn, "__name__", fn))


def _ok(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False
