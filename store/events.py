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
import logging
from typing import Any

import redis

from bulwark.contract.api import TERMINAL_STATES
from bulwark.contract.events import EVENT_KINDS

log = logging.getLogger("bulwark.events")
TERMINAL_EVENTS = TERMINAL_STATES  # a job's stream ends with the event of its terminal state


# XADD unless the stream's last entry is terminal, atomically (one script): ARGV = maxlen,
# is-terminal flag, ttl, the terminal types, "|", then the entry's field/value pairs.
_APPEND = """
local terminal, i = {}, 4
while ARGV[i] ~= '|' do terminal[ARGV[i]] = true; i = i + 1 end
local last = redis.call('XREVRANGE', KEYS[1], '+', '-', 'COUNT', 1)
if #last > 0 then
  local f = last[1][2]
  for j = 1, #f, 2 do
    if f[j] == 'type' and terminal[f[j + 1]] then return false end
  end
end
local id = redis.call('XADD', KEYS[1], 'MAXLEN', '~', ARGV[1], '*', unpack(ARGV, i + 1))
if ARGV[2] == '1' then redis.call('EXPIRE', KEYS[1], ARGV[3]) end
return id
"""


def stream_key(job_id: str) -> str:
    return f"bulwark:job:{job_id}:events"


class Events:
    def __init__(self, url: str, *, maxlen: int = 1000, ttl_seconds: int = 7 * 86400):
        self.redis = redis.Redis.from_url(url, decode_responses=True)
        self.maxlen, self.ttl = maxlen, ttl_seconds
        self._append = self.redis.register_script(_APPEND)

    @classmethod
    def from_settings(cls, s) -> Events:
        return cls(s.redis_url, maxlen=s.events_maxlen, ttl_seconds=s.events_ttl_seconds)

    def publish(self, job_id: str, kind: str, data: dict[str, Any] | None = None
                ) -> str | None:
        """Append an event; None (and nothing appended) once the stream holds a terminal
        event — nothing follows a job's end (a late ``cancel_requested`` is dropped) — or
        when Redis is unreachable. ``kind`` is one of the contract's ``EVENT_KINDS``."""
        if kind not in EVENT_KINDS:
            raise ValueError(f"unknown event kind {kind!r} (bulwark.contract.events)")
        key = stream_key(job_id)
        at = dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")
        try:
            return self._append(keys=[key], args=[
                self.maxlen, int(kind in TERMINAL_EVENTS), self.ttl, *TERMINAL_EVENTS, "|",
                "type", kind, "data", json.dumps(data or {}), "at", at])
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as e:
            # events are the progress side channel; the job row is the truth: a Redis outage
            # loses events, never a job (SSE clients re-read the row when they reconnect)
            log.warning("event %s of job %s not published: %s", kind, job_id, e)
            return None

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
