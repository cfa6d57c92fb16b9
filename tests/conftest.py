"""Fixtures shared by the tests that run the real stack (tests/service_stack.py).

``stack`` here is the API, Redis and Celery workers on SQLite and on PostgreSQL, one stack per
test module and database; a module that needs another stack (no workers, one database, extra
settings) defines its own ``stack`` and ``alice`` / ``bob`` follow it."""

from __future__ import annotations

import pytest

from tests.service_stack import Stack, database_url


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def stack(request, tmp_path_factory):
    home = tmp_path_factory.mktemp(f"{request.module.__name__.rpartition('.')[2]}-{request.param}")
    s = Stack(home, database_url(request.param, home)).start()
    yield s
    s.stop()


@pytest.fixture(scope="module")
def alice(stack):
    return stack.client(stack.key("alice"))


@pytest.fixture(scope="module")
def bob(stack):
    return stack.client(stack.key("bob"))
