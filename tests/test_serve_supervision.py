"""`bulwark serve` supervises its children: a dead worker or Redis comes back, /healthz says
how many workers serve the queue, SIGTERM stops every child, and a second serve on the same
folder refuses to start. Real processes throughout."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time

import httpx
import pytest

from bulwark.workers.client.serve import free_port
from tests.cli import CLI
from tests.service_stack import FAST, REPO, tiny_spec, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


def _children(pid: int) -> dict[str, int]:
    """The serve process's direct children by kind: redis, worker (Celery main)."""
    out = {}
    for line in subprocess.run(["ps", "-ww", "-eo", "pid=,ppid=,args="], capture_output=True,
                               text=True).stdout.splitlines():
        cpid, ppid, args = line.split(None, 2)
        if int(ppid) == pid:
            out["redis" if "redis-server" in args else "worker" if "celery" in args
                else args[:20]] = int(cpid)
    return out


def _wait(cond, timeout=90.0, what=""):
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = cond()
        except httpx.TransportError:  # the API is not listening (yet, or again)
            value = None
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture
def serve_proc(tmp_path):
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
    env.update(FAST, PYTHONPATH=str(REPO))
    home = tmp_path / "home"
    proc = subprocess.Popen([*CLI, "serve", "--port",
                             str(port), "--home", str(home)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    key = None
    while key is None:
        line = proc.stdout.readline()
        assert line, "serve exited while starting"
        if line.startswith("API key: "):
            key = line.split(": ", 1)[1].strip()
    client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30,
                          headers={"Authorization": f"Bearer {key}"})
    _wait(lambda: client.get("/healthz").json().get("workers") == 1, what="a live worker")
    yield proc, client, home, env
    if proc.poll() is None:  # SIGTERM: serve stops its children (SIGKILL would orphan them)
        kids = _children(proc.pid)
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            for pid in kids.values():
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)


def test_dead_children_come_back_and_jobs_still_run(serve_proc):
    proc, client, _, _ = serve_proc
    first = _children(proc.pid)
    assert set(first) >= {"redis", "worker"}
    os.kill(first["worker"], signal.SIGKILL)
    os.kill(first["redis"], signal.SIGKILL)
    again = _wait(lambda: (c := _children(proc.pid)).get("worker") not in (None, first["worker"])
                  and c.get("redis") not in (None, first["redis"]) and c, what="restarts")
    assert again["worker"] != first["worker"] and again["redis"] != first["redis"]
    _wait(lambda: client.get("/healthz").status_code == 200, what="a healthy API")
    job = client.post("/v1/jobs", json=tiny_spec(epochs=1)).json()
    assert wait_state(client, job["id"], ("succeeded", "failed"))["state"] == "succeeded"


def test_sigterm_stops_every_child_and_a_second_serve_refuses_the_folder(serve_proc):
    proc, client, home, env = serve_proc
    second = subprocess.run([*CLI, "serve", "--port",
                             str(free_port()), "--home", str(home)], env=env, cwd=REPO,
                            capture_output=True, text=True, timeout=60)
    assert second.returncode == 2 and "another `bulwark serve` uses" in second.stderr
    kids = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 0
    for pid in kids.values():
        _wait(lambda pid=pid: not os.path.exists(f"/proc/{pid}"), timeout=30,
              what=f"child {pid} to exit")
