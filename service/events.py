"""Progress events: one Redis stream per job, ``bulwark:job:{id}:events``.

Streams persist and replay by id, so a client that reconnects with ``Last-Event-ID`` misses
nothing (pub/sub would drop what it sent while the client was away). Each entry holds
``type``, ``data`` (JSON) and ``at`` (RFC 3339 UTC time of publication, added to the data
the API sends). The stream is capped (``MAXLEN ~``) and expires some time after
the terminal event. Torch-free: the trainer process publishes, the API reads.
"""

from __future__ import annotations

import datetime as dt
import json
from typing import Any

import redis

from contract.api import TERMINAL_STATES

TERMINAL_EVENTS = TERMINAL_STATES  # a job's stream ends with the event of its terminal state


def stream_key(job_id: str) -> str:
    return f"bulwark:job:{job_id}:events"


class Events:
    def __init__(self, url: str, *, maxlen: int = 1000, ttl_seconds: int = 7 * 86400):
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.maxlen, self.ttl = maxlen, ttl_seconds

    @classmethod
    def from_settings(cls, s) -> Events:
        return cls(s.redis_url, maxlen=s.events_maxlen, ttl_seconds=s.events_ttl_seconds)

    def publish(self, job_id: str, kind: str, data: dict[str, Any] | None = None) -> str:
        key = stream_key(job_id)
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        event_id = self.redis.xadd(key, {"type": kind, "data": json.dumps(data or {}), "at": at},
                                   maxlen=self.maxlen, approximate=True)
        if kind in TERMINAL_EVENTS:
            self.redis.expire(key, self.ttl)
        return event_id

    def read(self, job_id: str, after: str = "0", *, block_ms: int | None = None,
             count: int = 100) -> list[tuple[str, str, dict[str, Any]]]:
        """Events after id ``after`` as (id, type, data); blocks up to ``block_ms``."""
        res = self.redis.xread({stream_key(job_id): after}, count=count, block=block_ms)
        out = []
        for _key, entries in res or []:
            for event_id, fields in entries:
                data = json.loads(fields.get("data", "{}"))
                if "at" in fields:
                    data["at"] = fields["at"]
                out.append((event_id, fields["type"], data))
        return out

    def delete(self, job_id: str) -> None:
        self.redis.delete(stream_key(job_id))

    def ping(self) -> bool:
        return bool(self.redis.ping())
