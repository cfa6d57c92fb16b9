"""Operations: health and Prometheus metrics."""

from __future__ import annotations

import secrets
from typing import Annotated

from fastapi import APIRouter, Depends, HTTPException, Response
from fastapi.security import HTTPAuthorizationCredentials
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from bulwark.contract.api import Health
from bulwark.service.deps import BEARER, Svc
from bulwark.service.schemas import errors
from bulwark.store.queue import live_workers

router = APIRouter(tags=["operations"])


@router.get("/healthz", response_model=Health)
def healthz(response: Response, svc: Svc) -> Health:
    """``ok``: database, Redis and at least one live worker; ``degraded``: no worker
    serves the queue (jobs wait; 200, the API itself is fine); ``down``: the database or
    Redis is unreachable (503)."""
    db = _ok(svc.store.ping)
    rd = _ok(svc.events.ping)
    workers: list[str] = []
    if rd:
        try:
            workers = live_workers(svc.events.redis)
        except Exception:
            rd = False
    if not (db and rd):
        response.status_code = 503
    status = "down" if not (db and rd) else "ok" if workers else "degraded"
    return Health(status=status, database=db, redis=rd, workers=len(workers))


@router.get("/metrics", responses=errors(401))
def metrics(svc: Svc,
            bearer: Annotated[HTTPAuthorizationCredentials | None, Depends(BEARER)]) -> Response:
    """Prometheus metrics. With ``BULWARK_METRICS_TOKEN`` set, only for
    ``Authorization: Bearer <that token>`` (an API key is not enough)."""
    token = svc.settings.metrics_token
    if token and not (bearer is not None and secrets.compare_digest(
            bearer.credentials.encode(), token.encode())):
        raise HTTPException(401, "/metrics needs 'Authorization: Bearer <the operator's "
                                 "BULWARK_METRICS_TOKEN>'", headers={"WWW-Authenticate": "Bearer"})
    return Response(generate_latest(svc.registry), media_type=CONTENT_TYPE_LATEST)


def _ok(fn) -> bool:
    try:
        return bool(fn())
    except Exception:
        return False
