"""Request limits: body sizes counted on the stream (Content-Length alone can be bypassed),
and the number of event streams a tenant (and everyone) may hold open."""

from __future__ import annotations

import json
import threading
import weakref
from collections import Counter
from collections.abc import Callable


class StreamSlots:
    """Open ``/events`` streams in this API process: at most ``per_tenant`` for one tenant and
    ``total`` for all. Each stream holds one connection of a Redis pool of ``total``
    connections used by nothing else, so streams can never starve it, and one tenant can
    never hold more than its share."""

    def __init__(self, per_tenant: int, total: int):
        self.per_tenant, self.total = per_tenant, total
        self.open: Counter[str] = Counter()
        self._lock = threading.Lock()

    def acquire(self, tenant_id: str) -> Slot | str:
        """A slot, or why there is none (the caller answers 429 or 503)."""
        with self._lock:
            if self.open[tenant_id] >= self.per_tenant:
                return (f"this tenant already follows {self.per_tenant} event streams (the "
                        "limit); close one, or poll GET /v1/jobs/{id}")
            if sum(self.open.values()) >= self.total:
                return f"the server follows {self.total} event streams (its limit)"
            self.open[tenant_id] += 1
            return Slot(self, tenant_id)

    def _give_back(self, tenant_id: str) -> None:
        with self._lock:
            self.open[tenant_id] -= 1
            if self.open[tenant_id] <= 0:
                del self.open[tenant_id]


class Slot:
    """A held stream slot. ``release()`` gives it back (once, however often it is called);
    so does the slot's garbage collection, should its stream never have started."""

    def __init__(self, slots: StreamSlots, tenant_id: str):
        self.release = weakref.finalize(self, slots._give_back, tenant_id)


class _TooLarge(Exception):
    pass


class BodySizeLimit:
    """ASGI middleware: 413 once a request body exceeds ``limit_for(path)`` bytes."""

    def __init__(self, app, limit_for: Callable[[str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        limit = self.limit_for(scope["path"])
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            return await _reject(send, limit)
        received, started, exceeded = 0, False, False

        async def counting_receive():
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge
            return message

        async def tracking_send(message):
            nonlocal started
            if exceeded:  # the app may have turned our exception into its own 400: answer 413
                if message["type"] == "http.response.start" and not started:
                    started = True
                    await _reject(send, limit)
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except _TooLarge:
            if not started:
                started = True
                await _reject(send, limit)


async def _reject(send, limit: int) -> None:
    body = json.dumps({"detail": f"request body larger than {limit} bytes"}).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
