"""The SDK's event reader against a real FastAPI server-sent-event stream (uvicorn, in-process)
whose keep-alive comments come between events, as they do while a job trains quietly.

httpx-sse hands a comment-only block on as an empty ``message`` event once an id was seen;
the SSE standard dispatches nothing for it. A CI run's event list once ended in such a
phantom ``message``."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from fastapi import FastAPI
from fastapi import routing as fastapi_routing
from fastapi.sse import EventSourceResponse, ServerSentEvent

from bulwark.workers.client.http import Client
from tests.service_stack import app_in_thread

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


@pytest.fixture
def stream_url(monkeypatch):
    monkeypatch.setattr(fastapi_routing, "_PING_INTERVAL", 0.1)  # FastAPI's keep-alive period
    app = FastAPI()

    @app.get("/v1/jobs/{job_id}/events", response_class=EventSourceResponse)
    async def events(job_id: str):
        yield ServerSentEvent(event="running", data={"attempt": 1}, id="1-0")
        await asyncio.sleep(0.5)  # quiet: keep-alive comments go out
        yield ServerSentEvent(event="epoch", data={"epoch": 1}, id="2-0")
        await asyncio.sleep(0.5)
        yield ServerSentEvent(event="succeeded", data={"final": {}}, id="3-0")

    with app_in_thread(app) as url:
        yield url


def test_keep_alive_comments_are_not_events(stream_url):
    raw = httpx.get(f"{stream_url}/v1/jobs/j/events", timeout=10).text
    assert raw.count(": ping") >= 2, "the server did send keep-alives between the events"
    events = list(Client(stream_url, key="k").events("j"))
    assert [(e.id, e.type) for e in events] == [("1-0", "running"), ("2-0", "epoch"),
                                                ("3-0", "succeeded")]
    assert events[-1].data == {"final": {}}
