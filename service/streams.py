"""Server-sent events from the jobs' Redis streams: one reader for a job's stream and for a
sweep's children alike, with the grace period both need (a job's row turns terminal a moment
before its terminal event is published)."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from fastapi import Request
from fastapi.sse import ServerSentEvent

from bulwark.service.schemas import job_out
from bulwark.store.db import TERMINAL, Job
from bulwark.store.events import TERMINAL_EVENTS

KEEPALIVE_SECONDS = 15.0
# a stream whose row is terminal is read this much longer for its terminal event; should that
# never come (the trainer died right after the row's mark, Redis was down), the row's state
# ends the stream
GRACE_SECONDS = 5.0
ENDING_POLL_SECONDS = 1.0  # how often such a stream is read meanwhile


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


@dataclass
class Entry:
    """An event read from ``key``'s stream."""
    key: str
    event_id: str
    fields: dict[str, str]


@dataclass
class Lapsed:
    """``key``'s row is terminal (``row``) or gone (None) and its terminal event never came."""
    key: str
    row: Job | None


async def follow(request: Request, after: dict[str, str],
                 rows: Callable[[], dict[str, Job | None]], *,
                 ended: dict[str, float] | None = None) -> AsyncIterator[Entry | Lapsed]:
    """Read the streams of ``after`` (key → the last id read) until each has ended: its
    terminal event read, or its row terminal or gone for ``GRACE_SECONDS`` (then ``Lapsed``).
    ``rows`` (run in a thread, only while idle) gives each key's row; what it raises (a
    deleted job or sweep) ends the reading. Stops when the client goes."""
    r = request.app.state.aredis
    ended = dict(ended or {})  # key -> when its row was first seen terminal
    while after and not await request.is_disconnected():
        block = ENDING_POLL_SECONDS if ended else KEEPALIVE_SECONDS
        res = await r.xread(dict(after), count=100, block=int(block * 1000))
        if not res:  # idle (FastAPI sends the keep-alive comments): which rows are terminal?
            current, now = await asyncio.to_thread(rows), time.monotonic()
            for key in after:
                row = current.get(key)
                if row is None or row.state in TERMINAL:
                    ended.setdefault(key, now)
            for key in [k for k, t0 in ended.items() if now - t0 >= GRACE_SECONDS]:
                after.pop(key, None)
                ended.pop(key)
                yield Lapsed(key, current.get(key))
            continue
        for key, entries in res:
            for event_id, fields in entries:
                after[key] = event_id
                yield Entry(key, event_id, fields)
                if fields["type"] in TERMINAL_EVENTS:
                    after.pop(key, None)
                    ended.pop(key, None)
                    break
