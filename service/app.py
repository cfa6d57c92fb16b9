"""The REST API: ``create_app`` builds the service's parts once and mounts one router per
resource (service/routers/). Routes stay thin: validate, call the store or the job lifecycle
(store/lifecycle.py), shape the response.

Every route below /v1 needs an API key (``Authorization: Bearer KEY`` or ``X-API-Key``) and
sees only its tenant's jobs: another tenant's job is a 404. Torch is never imported here.
"""

from __future__ import annotations

import logging
import threading
import time
from contextlib import asynccontextmanager

import redis.asyncio as aioredis
from fastapi import FastAPI, Request
from fastapi_offline import FastAPIOffline
from prometheus_client import CollectorRegistry, Histogram

from bulwark.contract.files import private_files
from bulwark.contract.spec import MAX_NESTING
from bulwark.service.deps import Services
from bulwark.service.errors import install_error_handlers
from bulwark.service.limits import BodySizeLimit, NestingLimit, StreamSlots
from bulwark.service.metrics import JobCollector
from bulwark.service.routers import jobs, ops, reports, specs, sweeps, ui, uploads
from bulwark.service.streams import KEEPALIVE_SECONDS
from bulwark.store.events import Events
from bulwark.store.lifecycle import Lifecycle
from bulwark.store.settings import Settings, get_settings
from bulwark.store.storage import artifacts
from bulwark.store.store import Store

log = logging.getLogger("bulwark.api")
SPEC_MAX_BYTES = 1024 * 1024


def _reaper_loop(lifecycle: Lifecycle, settings: Settings, stop: threading.Event) -> None:
    while not stop.wait(settings.reaper_interval_seconds):
        try:
            lifecycle.reap(settings)
        except Exception:  # keep reaping through transient DB / broker errors
            log.exception("reaper pass failed")


def create_app(settings: Settings | None = None) -> FastAPI:
    s = settings or get_settings()
    private_files()  # uploads, spooled files, a SQLite database: 0600 / 0700
    store = Store(s.resolved_database_url())
    store.migrate()
    events = Events.from_settings(s)
    registry = CollectorRegistry()
    registry.register(JobCollector(store))
    svc = Services(settings=s, store=store, events=events, lifecycle=Lifecycle(store, events),
                   blobs=artifacts(s), servers=s.tracking_servers(), registry=registry)
    latency = Histogram("bulwark_http_request_duration_seconds", "HTTP request latency",
                        ["method", "route", "status"], registry=registry)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        stop = threading.Event()
        if s.reaper_enabled:
            threading.Thread(target=_reaper_loop, args=(svc.lifecycle, s, stop), daemon=True,
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
    app.state.services = svc
    app.state.store = store  # (tests make keys with it)
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

    install_error_handlers(app)
    for module in (jobs, reports, specs, sweeps, ui, uploads, ops):
        app.include_router(module.router)
    return app
