"""The embedded default: `bulwark serve` with no configuration, driven by the client CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from bulwark.workers.client.serve import free_port
from tests.cli import CLI
from tests.service_stack import FAST, REPO, tiny_spec

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane


def _cli(env, *args, timeout=180):
    return subprocess.run([*CLI, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    home = tmp_path_factory.mktemp("embedded")
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("BULWARK_")}
    env.update(FAST)
    env["PYTHONPATH"] = str(REPO)
    proc = subprocess.Popen([*CLI, "serve", "--port",
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
    assert oct((home / "bulwark.db").stat().st_mode & 0o777) == "0o600", "owner-only"
    assert oct((home / "redis" / "password").stat().st_mode & 0o777) == "0o600"
    assert (home / "redis" / "appendonlydir").exists() or list((home / "redis").glob("*.aof*"))


def test_a_second_serve_on_a_taken_port_says_so_and_starts_nothing(served, tmp_path):
    """The port is checked before Redis, the workers or "Bulwark is up": a script reading the
    key from the output must not go on to talk to whatever holds the port."""
    _, env, _ = served
    port = env["BULWARK_URL"].rsplit(":", 1)[1]
    home = tmp_path / "other"
    proc = subprocess.run([*CLI, "serve", "--port", port,
                           "--home", str(home)], env=env, cwd=REPO, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr and "--port" in proc.stderr
    assert "Bulwark is up" not in proc.stdout and "API key" not in proc.stdout
    assert "Traceback" not in proc.stderr
    assert not (home / "redis").exists() and not (home / "bulwark.db").exists()


def test_submit_wait_report_download(served, tmp_path):
    home, env, _ = served
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec()))
    out = _cli(env, "submit", str(spec), "--wait")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "succeeded" in out.stdout and "clean accuracy" in out.stdout
    job_id = out.stdout.split()[1]
    for attack in ("fgsm", "pgd3-1"):  # a bar for every phase, not only the epochs
        assert attack in out.stderr, out.stderr
    listing = _cli(env, "jobs")
    assert job_id in listing.stdout and "succeeded" in listing.stdout
    rep = _cli(env, "report", job_id, "--json")
    assert json.loads(rep.stdout)["final"]["n"] == 64
    dest = tmp_path / "w.safetensors"
    dl = _cli(env, "download", job_id[:8], "model.safetensors", "-o", str(dest))
    assert dl.returncode == 0 and dest.stat().st_size > 1000, "a job-id prefix is enough"
    summary = _cli(env, "report", job_id[:6]).stdout.splitlines()
    assert summary[0].startswith("verdict ") and summary[1].startswith("clean accuracy")
    bad = _cli(env, "download", job_id, "checkpoint.pt")
    assert bad.returncode == 2 and "report.json" in bad.stderr
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
    assert "--key" in out.stderr and "BULWARK_API_KEY" in out.stderr, "says how to pass a key"
    dead = f"http://127.0.0.1:{free_port()}"
    out = _cli({**env, "BULWARK_URL": dead}, "jobs")
    assert out.returncode == 3 and f"cannot reach the Bulwark API at {dead}" in out.stderr
    out = _cli(env, "jobs", "--state", "bogus")
    assert out.returncode == 1 and "must be one of" in out.stderr
    assert "^(" not in out.stderr and "pattern" not in out.stderr, "no regex shown to a person"


def test_cli_version_help_keys_and_cancel_of_a_finished_job(served, tmp_path):
    home, env, _ = served
    v = _cli(env, "--version")
    assert v.returncode == 0 and v.stdout.startswith("bulwark ")
    helptext = _cli(env, "download", "--help").stdout
    for name in ("report.json", "report.html", "model.safetensors", "best.safetensors",
                 "wa.safetensors", "certify.tsv"):
        assert name in helptext
    keys_env = {**env, "BULWARK_HOME": str(home)}
    made = _cli(keys_env, "keys", "create", "--tenant", "dave").stdout.strip()
    listing = _cli(keys_env, "keys", "list").stdout
    assert made[:10] in listing and "dave" in listing
    dave = {**env, "BULWARK_API_KEY": made}
    assert _cli(dave, "jobs").returncode == 0
    rotated = _cli(keys_env, "keys", "rotate", made[:10])
    new_key = rotated.stdout.strip()
    assert rotated.returncode == 0 and new_key.startswith("bwk_") and new_key != made
    out = _cli(dave, "jobs")
    assert out.returncode == 1 and "HTTP 401" in out.stderr, "the rotated-out key is refused"
    assert _cli({**env, "BULWARK_API_KEY": new_key}, "jobs").returncode == 0, "same tenant"
    assert _cli(keys_env, "keys", "revoke", new_key[:10]).returncode == 0
    assert "revoked" in _cli(keys_env, "keys", "list").stdout
    out = _cli({**env, "BULWARK_API_KEY": new_key}, "jobs")
    assert out.returncode == 1 and "HTTP 401" in out.stderr, "a revoked key is refused"
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps(tiny_spec(epochs=1)))
    job_id = _cli(env, "submit", str(spec), "--wait").stdout.split()[1]
    again = _cli(env, "cancel", job_id)
    assert again.returncode == 1 and "HTTP 409" in again.stderr and "already" in again.stderr


# ---------------------------------------------------------------------------------- the SDK
def _sdk(env):
    import bulwark

    return bulwark.Client(url=env["BULWARK_URL"] + "/v1/", key=env["BULWARK_API_KEY"])


def test_sdk_submit_wait_report_download_and_load_model(served, tmp_path):
    import datetime as dt

    import torch

    import bulwark
    from bulwark.contract.spec import DatasetSpec
    from bulwark.workers.engine.data import load_dataset

    _, env, _ = served
    client = _sdk(env)
    assert client.url == env["BULWARK_URL"], "a trailing /v1/ is dropped"
    spec = tiny_spec(epochs=2, name="sdk")
    (tmp_path / "spec.json").write_text(json.dumps(spec))
    job = client.submit(tmp_path / "spec.json")
    assert isinstance(job, bulwark.Job) and job.state == "queued"
    assert job.info.created_at.tzinfo is not None
    info = job.wait(progress=False, timeout=300)
    assert info.state == "succeeded" and "phase" not in info.progress
    assert info.finished_at.utcoffset() == dt.timedelta(0)

    report = job.report()
    assert isinstance(report, bulwark.Report)
    assert [h.epoch for h in report.history] == [1, 2]
    assert report.final.n == 64 and report.final.pgd.n == 64
    assert report.summary().startswith("verdict ") and report.verdict is not None
    assert report.summary().splitlines()[1].startswith("clean accuracy")

    events = list(job.events())
    kinds = [e.type for e in events]
    assert kinds[0] == "snapshot" and kinds[-1] == "succeeded"
    assert "evaluation" in kinds, "the final attacks report their progress"
    stamped = [e for e in events if e.type != "snapshot"]
    assert all(dt.datetime.fromisoformat(e.data["at"]).utcoffset() == dt.timedelta(0)
               for e in stamped), "every event carries an RFC 3339 time with its zone"

    path = job.download("model.safetensors", tmp_path)
    import hashlib

    listed = {a.name: a.sha256 for a in info.artifacts}
    assert hashlib.sha256(path.read_bytes()).hexdigest() == listed["model.safetensors"]
    # Oracle: the rebuilt model's accuracy on the same 64 test images is the report's.
    model = bulwark.load_model(path)
    assert isinstance(model, torch.nn.Module) and not model.training
    data = load_dataset(DatasetSpec.model_validate(spec["dataset"]))
    x = data.test_x[:64].float().div(255)
    with torch.no_grad():
        acc = (model(x).argmax(1) == data.test_y[:64]).float().mean().item()
    assert abs(acc - report.final.clean_acc) < 1e-9

    up = client.upload_model(path)  # arch, classes and shape from the file's metadata
    assert up.arch == "small_cnn" and up.meta["num_classes"] == 4

    assert client.job(job.id[:7]).id == job.id
    assert job.id in [j.id for j in client.jobs(state="succeeded")]
    with pytest.raises(bulwark.ApiError) as e:
        job.cancel()
    assert e.value.status == 409


def test_sdk_timeout_cancel_and_errors(served):
    import bulwark

    _, env, _ = served
    client = _sdk(env)
    job = client.submit(bulwark.JobSpec.model_validate(tiny_spec(epochs=300, name="slow")))
    with pytest.raises(TimeoutError):
        job.wait(progress=False, timeout=1.5)
    assert job.status().state in ("queued", "running"), "a timeout leaves the job running"
    job.cancel()
    assert job.wait(progress=False, timeout=120).state == "cancelled"

    with pytest.raises(bulwark.ApiError) as e:
        bulwark.Client(url=env["BULWARK_URL"], key="bwk_nope").jobs()
    assert e.value.status == 401 and "BULWARK_API_KEY" in str(e.value)
    dead = f"127.0.0.1:{free_port()}"
    with pytest.raises(bulwark.ConnectionFailed) as c:
        bulwark.Client(url=dead, key="k").jobs()
    assert f"http://{dead}" in str(c.value), "names the URL it tried, scheme added"
    with pytest.raises(bulwark.ApiError) as e:
        client.job("ffffffff-0000")
    assert e.value.status == 404


def test_ambiguous_job_prefix_is_a_clear_error(served):
    from sqlalchemy import create_engine, text

    import bulwark

    home, env, _ = served
    client = _sdk(env)
    ids = [client.submit(tiny_spec(epochs=1, name=f"twin{i}")).id for i in range(2)]
    for j in ids:
        client.job(j).wait(progress=False, timeout=300)
    engine = create_engine(f"sqlite:///{home / 'bulwark.db'}")
    with engine.begin() as c:  # give the two finished jobs ids that share a prefix
        for i, j in enumerate(ids):
            c.execute(text("UPDATE jobs SET id = :new WHERE id = :old"),
                      {"new": f"abcdef{i}" + j[7:], "old": j})
    with pytest.raises(bulwark.ApiError) as e:
        client.job("abcdef")
    assert e.value.status == 409 and "2 jobs" in str(e.value)
    assert client.job("abcdef1").id.startswith("abcdef1")
    out = _cli(env, "status", "abcdef")
    assert out.returncode == 1 and "give more of it" in out.stderr


def test_quickstart_script_runs_jobs_side_by_side_and_keeps_reports(served, tmp_path):
    """examples/quickstart.py (what scripts/quickstart.sh runs), on two tiny specs."""
    _, env, _ = served
    specs = []
    for recipe in ("fgsm", "n-aaer"):
        p = tmp_path / f"{recipe}.json"
        p.write_text(json.dumps(tiny_spec(epochs=2, name=recipe, recipe=recipe)))
        specs.append(str(p))
    out = subprocess.run([sys.executable, "examples/quickstart.py", *specs, "--reports",
                          str(tmp_path / "reports")], env=env, cwd=REPO, capture_output=True,
                         text=True, timeout=400)
    assert out.returncode == 0, out.stdout + out.stderr
    lines = out.stdout.splitlines()
    head = next(i for i, ln in enumerate(lines) if ln.startswith("job "))
    assert lines[head].split() == ["job", "state", "clean", "FGSM", "PGD", "CO", "at", "epoch",
                                   "verdict", "seconds"]
    table = {ln.split()[0]: ln.split() for ln in lines[head + 1:head + 3]}
    assert set(table) == {"fgsm", "n-aaer"} and all(r[1] == "succeeded" for r in table.values())
    from bulwark.contract.verdict import LABELS

    assert all(r[-2] in LABELS for r in table.values()), "each job's verdict beside its state"
    assert "[fgsm        ] epoch 2/2" in out.stdout, "one line per epoch and job"
    report = json.loads((tmp_path / "reports" / "n-aaer.json").read_text())
    assert table["n-aaer"][2] == f"{report['final']['clean_acc']:.3f}"
    assert (tmp_path / "reports" / "fgsm.html").read_text().lower().startswith("<!doctype html>")
