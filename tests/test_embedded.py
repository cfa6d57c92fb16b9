"""The embedded default: `bulwark serve` with no configuration, driven by the client CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.service_stack import FAST, REPO, tiny_spec
from workers.jobs.serve import free_port


def _cli(env, *args, timeout=180):
    return subprocess.run([sys.executable, "-m", "workers.client.cli", *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
    env.update(FAST)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([sys.executable, "-m", "workers.client.cli", "serve", "--port",
                             str(port), "--home", str(home)], env=env, cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            start_new_session=True)
    lines, key = [], None
    deadline = time.monotonic() + 90
    while key is None and time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line:
            break
        lines.append(line)
        if line.startswith("API key: "):
            key = line.split(": ", 1)[1].strip()
    assert key, "".join(lines)
    client_env = {**env, "BULWARK_URL": f"http://127.0.0.1:{port}", "BULWARK_API_KEY": key}
    yield home, client_env, lines
    os.killpg(proc.pid, signal.SIGINT)
    try:
        proc.wait(timeout=40)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        raise


def test_serve_prints_url_and_key_and_keeps_state_in_home(served):
    home, env, lines = served
    assert any(line.startswith("Bulwark is up: http://127.0.0.1:") for line in lines)
    assert (home / "bulwark.db").exists() and (home / "api_key").exists()
    assert oct((home / "api_key").stat().st_mode & 0o777) == "0o600"
    assert (home / "redis" / "appendonlydir").exists() or list((home / "redis").glob("*.aof*"))


def test_submit_wait_report_download(served, tmp_path):
    home, env, _ = served
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec()))
    out = _cli(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded" in out.stdout and "clean accuracy" in out.stdout
    job_id = out.stdout.split()[1]
    listing = _cli(env, "jobs")
    assert job_id in listing.stdout and "succeeded" in listing.stdout
    rep = _cli(env, "report", job_id, "--json")
    assert json.loads(rep.stdout)["final"]["n"] == 64
    dest = tmp_path / "w.safetensors"
    dl = _cli(env, "download", job_id, "model.safetensors", "-o", str(dest))
    assert dl.returncode == 0 and dest.stat().st_size > 1000
    assert (home / "artifacts" / "tenants" / "default" / "jobs" / job_id / "report.json").exists()


def test_client_errors_are_messages(served, tmp_path):
    _, env, _ = served
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(tiny_spec(threat={"epsilon": 2})))
    out = _cli(env, "submit", str(bad))
    assert out.returncode == 1 and "Traceback" not in out.stderr
    assert "threat" in out.stderr and "(0, 1]" in out.stderr
    out = _cli(env, "status", "00000000-0000-0000-0000-000000000000")
    assert out.returncode == 1 and "HTTP 404" in out.stderr
    out = _cli({**env, "BULWARK_API_KEY": "bwk_wrong"}, "jobs")
    assert out.returncode == 1 and "HTTP 401" in out.stderr
    out = _cli({**env, "BULWARK_URL": f"http://127.0.0.1:{free_port()}"}, "jobs")
    assert out.returncode == 3 and "cannot reach the API" in out.stderr
