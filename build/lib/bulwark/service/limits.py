"""Request limits: body sizes counted on the stream (Content-Length alone can be bypassed),
JSON nesting checked before anything parses the body, and the number of event streams a
tenant (and everyone) may hold open."""

from __future__ import annotations

import json
import re
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


_JSON_TOKEN = re.compile(rb'[\\"\[\]{}]')
_NOT_JSON = (b"multipart/", b"application/x-www-form-urlencoded", b"application/yaml",
             b"application/x-yaml", b"text/yaml")


def nested_deeper(raw: bytes, limit: int) -> bool:
    """Whether JSON text ``raw`` nests arrays and objects deeper than ``limit`` (brackets
    inside strings do not count). One pass over the bytes that matter, never recursive."""
    depth, in_string, skip = 0, False, -1
    for m in _JSON_TOKEN.finditer(raw):
        p = m.start()
        if p < skip:
            continue
        c = raw[p]
        if in_string:
            if c == 0x5C:  # a backslash escapes the next byte
                skip = p + 2
            elif c == 0x22:
                in_string = False
        elif c == 0x22:
            in_string = True
        elif c in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif c in (0x5D, 0x7D):
            depth -= 1
    return False


class NestingLimit:
    """ASGI middleware: a request body with JSON nested deeper than ``limit`` is a 400 before
    any parser or validator recurses into it (at ~900 levels an error's echo of the input was
    a RecursionError, a 500). Bodies that are forms or YAML pass on (YAML has its own bound)."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        ctype = dict(scope.get("headers") or []).get(b"content-type", b"").lower()
        if ctype.startswith(_NOT_JSON):
            return await self.app(scope, receive, send)
        messages, more = [], True
        while more:
            message = await receive()
            messages.append(message)
            more = message["type"] == "http.request" and message.get("more_body", False)
        body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.request")
        if nested_deeper(body, self.limit):
            return await _answer(send, 400, f"the JSON body is nested deeper than {self.limit} "
                                            "levels; a job spec needs fewer than 10")
        replay = iter(messages)

        async def replayed():
            return next(replay, None) or await receive()

        await self.app(scope, replayed, send)


async def _reject(send, limit: int) -> None:
    await _answer(send, 413, f"request body larger than {limit} bytes")


async def _answer(send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
