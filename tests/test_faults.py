"""The fault suite: real processes killed, stopped and starved while jobs run — redis-server,
uvicorn, Celery prefork workers, trainers (SQLite). After every fault, ``assert_quiet`` checks
the invariants: every job ends terminal, a succeeded job has one history row per epoch, and
nothing follows a job's terminal event."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis

from bulwark.store.events import Events
from bulwark.store.queue import broker_job_ids
from bulwark.store.store import Store
from tests.service_stack import Stack, tiny_spec, wait_state

pytestmark = pytest.mark.stack  # starts the service stack or its processes: not in the fast lane

TERMINAL = ("succeeded", "failed", "cancelled")
COLD_STOP = {"REMAP_SIGTERM": "SIGQUIT", "BULWARK_WORKER_SOFT_SHUTDOWN_SECONDS": "1"}


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    home = tmp_path_factory.mktemp("faults")
    s = Stack(home, f"sqlite:///{home / 'bulwark.db'}")
    s.extra.update(BULWARK_MAX_QUEUED_PER_TENANT="100")
    s.start(workers=0)
    yield s
    s.stop()


@pytest.fixture
def workers(stack):
    """Each test starts its own workers; none is left for the next one."""
    yield stack
    for name in [n for n in stack.procs if n not in ("redis", "api")]:
        stack.kill(name)


def redis_client(stack) -> redis.Redis:
    return redis.Redis.from_url(stack.env["BULWARK_REDIS_URL"], decode_responses=True)


def epoch_of(client: httpx.Client, job_id: str) -> int:
    return client.get(f"/v1/jobs/{job_id}").json()["progress"].get("epoch") or 0


def wait_epoch(client: httpx.Client, job_id: str, epoch: int, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while epoch_of(client, job_id) < epoch:
        assert time.monotonic() < deadline, f"job {job_id} never reached epoch {epoch}"
        time.sleep(0.1)


def wait_trained(client: httpx.Client, store: Store, job_id: str, attempt: int,
                 timeout: float = 240) -> None:
    """Until `attempt` is the job's open attempt and its own trainer has finished an epoch
    (its progress, not an earlier attempt's). A terminal job fails at once; the timeout only
    guards a hang: a retry's trainer imports torch again, slow on a loaded machine."""
    deadline = time.monotonic() + timeout
    while True:
        row = client.get(f"/v1/jobs/{job_id}").json()
        assert row["state"] not in TERMINAL, (attempt, row["state"], row.get("error"))
        progress = row["progress"]
        open_ = [a for a in store.attempts(job_id) if a.ended_at is None]
        if (open_ and open_[-1].attempt == attempt and progress.get("attempt") == attempt
                and (progress.get("epoch") or 0) >= 1):
            return
        assert time.monotonic() < deadline, f"attempt {attempt} never trained: {progress}"
        time.sleep(0.1)


def trainer_pid(store: Store, job_id: str) -> int:
    """The trainer process of the job's open attempt (the child of the task's process)."""
    owner = [a for a in store.attempts(job_id) if a.ended_at is None][-1].owner
    task_pid = int(owner.split("/")[1])
    children = Path(f"/proc/{task_pid}/task/{task_pid}/children").read_text().split()
    assert len(children) == 1, children
    return int(children[0])


def assert_quiet(stack, client: httpx.Client, job_ids: list[str], *,
                 timeout: float = 180) -> dict[str, dict]:
    """Every job terminal; one history row per epoch when it succeeded; its event stream
    ends with at most one terminal event (a Redis outage may have lost it, never added one
    after it). Returns the final rows."""
    events = Events(stack.env["BULWARK_REDIS_URL"])
    rows = {j: wait_state(client, j, TERMINAL, timeout) for j in job_ids}
    for job_id, row in rows.items():
        if row["state"] == "succeeded":
            epochs = row_spec_epochs(client, job_id)
            history = client.get(f"/v1/jobs/{job_id}/report").json()["history"]
            assert [h["epoch"] for h in history] == list(range(1, epochs + 1)), job_id
        kinds = [k for _, k, _ in events.read(job_id, count=10_000)]
        ends = [i for i, k in enumerate(kinds) if k in TERMINAL]
        assert len(ends) <= 1 and (not ends or ends[0] == len(kinds) - 1), kinds
    return rows


def row_spec_epochs(client: httpx.Client, job_id: str) -> int:
    return client.get(f"/v1/jobs/{job_id}").json()["spec"]["schedule"]["epochs"]


def _cmdline(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")[:-1]


def _descendants(pid: int) -> list[int]:
    """``pid`` and every process below it (children first listed by /proc)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            todo += [int(c) for c in Path(f"/proc/{p}/task/{p}/children").read_text().split()]
        except OSError:
            pass  # it has exited meanwhile
    return out


def _started(pid: int) -> float:
    """The process's start, in seconds since boot (/proc/PID/stat field 22)."""
    ticks = int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19])
    return ticks / os.sysconf("SC_CLK_TCK")


def _uptime() -> float:
    return float(Path("/proc/uptime").read_text().split()[0])


@pytest.mark.parametrize("standby", [True, False])
def test_a_job_runs_in_the_trainer_started_before_it(workers, alice, standby):
    """Each pool child starts its trainer before its job: the job runs in that process (no
    import time in the job's path); with BULWARK_STANDBY_TRAINER=false the trainer starts
    when the job is claimed."""
    worker = workers.start_worker("w-standby",
                                  env={"BULWARK_STANDBY_TRAINER": str(standby).lower()})
    # the worker is up: its pool child exists and, with a standby, so does the standby trainer
    def ready() -> bool:
        below = _descendants(worker.pid)[1:]
        if not standby:
            return bool(below)
        for p in below:
            try:
                if "--standby" in _cmdline(p):
                    return True
            except OSError:
                pass  # it exited meanwhile
        return False

    deadline = time.monotonic() + 120
    while not ready():
        assert worker.poll() is None and time.monotonic() < deadline, "the worker never got ready"
        time.sleep(0.2)
    store = Store(workers.database_url)
    submitted = _uptime()
    job = alice.post("/v1/jobs", json=tiny_spec(3, name="standby")).json()["id"]
    wait_epoch(alice, job, 1)
    pid = trainer_pid(store, job)
    assert ("--standby" in _cmdline(pid)) is standby, _cmdline(pid)
    assert (_started(pid) < submitted) is standby
    row = assert_quiet(workers, alice, [job])[job]
    assert row["state"] == "succeeded"


def test_trainer_sigkill_mid_epoch_resumes_from_its_checkpoint(workers, alice):
    workers.start_worker("w-trainer")
    store = Store(workers.database_url)
    job = alice.post("/v1/jobs", json=tiny_spec(6, name="trainer-kill")).json()["id"]
    wait_epoch(alice, job, 2)
    os.kill(trainer_pid(store, job), signal.SIGKILL)
    row = assert_quiet(workers, alice, [job])[job]
    assert row["state"] == "succeeded"
    assert [a.outcome for a in store.attempts(job)] == ["queued", "succeeded"]
    kinds = [k for _, k, _ in Events(workers.env["BULWARK_REDIS_URL"]).read(job)]
    assert "retrying" in kinds and "resumed" in kinds


def test_celery_main_process_sigkill(workers, alice):
    """The worker's main process dies (its pool child and the trainer go with it, or finish
    on their own); a replacement worker takes the job over and finishes it."""
    main = workers.start_worker("w-main")
    job = alice.post("/v1/jobs", json=tiny_spec(6, name="main-kill")).json()["id"]
    wait_epoch(alice, job, 2)
    os.kill(main.pid, signal.SIGKILL)  # the main process only, not its group
    main.wait()
    workers.start_worker("w-replacement")
    assert assert_quiet(workers, alice, [job])[job]["state"] == "succeeded"


def test_worker_sigterm_requeues_at_once_and_resumes(workers, alice):
    """`docker stop` (SIGTERM, remapped to a cold stop): the job is back in the queue within
    seconds — not after the reaper's stale timeout — the attempt is not counted, and the
    next worker resumes it from its checkpoint."""
    main = workers.start_worker("w-stopping", COLD_STOP)
    job = alice.post("/v1/jobs", json=tiny_spec(8, name="sigterm")).json()["id"]
    wait_epoch(alice, job, 2)
    t0 = time.monotonic()
    os.kill(main.pid, signal.SIGTERM)
    main.wait(timeout=30)
    row = alice.get(f"/v1/jobs/{job}").json()
    assert row["state"] == "queued" and row["attempt"] == 0, row
    assert "stopped" in row["error"] and time.monotonic() - t0 < 15
    workers.start_worker("w-next")
    done = assert_quiet(workers, alice, [job])[job]
    assert done["state"] == "succeeded" and done["attempt"] == 1
    store = Store(workers.database_url)
    assert [a.outcome for a in store.attempts(job)] == ["interrupted", "succeeded"]
    assert "resumed" in [k for _, k, _ in Events(workers.env["BULWARK_REDIS_URL"]).read(job)]


def test_redis_killed_and_restarted_with_jobs_queued_and_running(workers, alice):
    workers.start_worker("w-redis")
    jobs = [alice.post("/v1/jobs", json=tiny_spec(3, name=f"r{i}")).json()["id"]
            for i in range(3)]
    wait_epoch(alice, jobs[0], 1)
    workers.stop_redis()
    # the trainer keeps training with Redis down: its progress reaches the row (events are
    # lost, the job rows are not)
    wait_epoch(alice, jobs[0], 2)
    workers.start_redis()
    rows = assert_quiet(workers, alice, jobs, timeout=240)
    assert all(r["state"] == "succeeded" for r in rows.values()), rows


def test_a_message_the_broker_lost_is_sent_again(workers, alice):
    """Redis restarted without the last second of its AOF: the row says sent, the broker has
    no message. The reaper compares the two and sends it again; it runs once."""
    job = alice.post("/v1/jobs", json=tiny_spec(1, name="lost-message")).json()["id"]
    r = redis_client(workers)
    assert job in broker_job_ids(r, "bulwark")
    r.delete("bulwark")  # the queue's list: the message is gone
    assert job not in broker_job_ids(r, "bulwark")
    deadline = time.monotonic() + 30
    while job not in broker_job_ids(r, "bulwark"):
        assert time.monotonic() < deadline, "the reaper did not send it again"
        time.sleep(0.5)
    workers.start_worker("w-lost")
    assert assert_quiet(workers, alice, [job])[job]["state"] == "succeeded"
    assert len(Store(workers.database_url).attempts(job)) == 1


def test_api_killed_during_a_burst_of_submissions(workers):
    """SIGKILL to the API while 8 clients submit: every acknowledged job exists and has a
    broker message once the reaper has looked; nothing is stranded queued."""
    keys = [workers.key(f"burst{i}") for i in range(8)]
    acknowledged: list[tuple[str, str]] = []
    lock = threading.Lock()

    def client_loop(key: str) -> None:
        with httpx.Client(base_url=workers.url, timeout=10,
                          headers={"Authorization": f"Bearer {key}"}) as c:
            for i in range(6):
                try:
                    r = c.post("/v1/jobs", json=tiny_spec(1, name=f"b{i}"))
                except httpx.TransportError:
                    time.sleep(0.5)  # the API is down: a client retries later
                    continue
                if r.status_code == 201:
                    with lock:
                        acknowledged.append((key, r.json()["id"]))
                time.sleep(0.05)

    threads = [threading.Thread(target=client_loop, args=(k,)) for k in keys]
    for t in threads:
        t.start()
    while len(acknowledged) < 10:
        time.sleep(0.02)
    workers.kill("api")
    time.sleep(1)
    workers.start_api()
    for t in threads:
        t.join()
    store, r = Store(workers.database_url), redis_client(workers)
    for key, job_id in acknowledged:
        with httpx.Client(base_url=workers.url, headers={"Authorization": f"Bearer {key}"},
                          timeout=10) as c:
            assert c.get(f"/v1/jobs/{job_id}").status_code == 200, "an acknowledged job exists"
    queued = [j.id for key in keys for j in store.list_jobs(
        store.authenticate(key), state="queued", limit=500)[0]]
    assert set(j for _, j in acknowledged) <= set(queued)
    deadline = time.monotonic() + 30
    while missing := set(queued) - broker_job_ids(r, "bulwark"):
        assert time.monotonic() < deadline, f"{len(missing)} queued jobs have no message"
        time.sleep(0.5)
    for key in keys:  # leave the system quiet: cancel what waits (a terminal state)
        tenant = store.authenticate(key)
        with httpx.Client(base_url=workers.url, headers={"Authorization": f"Bearer {key}"},
                          timeout=10) as c:
            ids = [j.id for j in store.list_jobs(tenant, limit=500)[0]]
            for job_id in ids:
                c.post(f"/v1/jobs/{job_id}/cancel")
            assert_quiet(workers, c, ids)


def test_a_poison_job_fails_after_max_attempts_and_the_worker_keeps_serving(workers, alice):
    """A job whose trainer dies on every attempt (as under an OOM killer)."""
    workers.start_worker("w-poison")
    store = Store(workers.database_url)
    job = alice.post("/v1/jobs", json=tiny_spec(200, name="poison")).json()["id"]
    for attempt in (1, 2, 3):
        wait_trained(alice, store, job, attempt)
        os.kill(trainer_pid(store, job), signal.SIGKILL)
    row = assert_quiet(workers, alice, [job])[job]
    assert row["state"] == "failed" and row["attempt"] == 3
    assert "killed by SIGKILL on attempt 3" in row["error"] and "max_attempts" in row["error"]
    after = alice.post("/v1/jobs", json=tiny_spec(1, name="after-poison")).json()["id"]
    assert assert_quiet(workers, alice, [after])[after]["state"] == "succeeded"


def test_a_full_disk_at_a_checkpoint_fails_clearly_and_keeps_the_last_one(workers, alice):
    """The job's folder on a 2.8 MB tmpfs: epoch 1's checkpoint (1.3 MB) and best weights
    (0.6 MB) fit, epoch 2's checkpoint cannot be written beside them."""
    job = alice.post("/v1/jobs", json=tiny_spec(4, name="disk-full")).json()["id"]
    folder = workers.home / "artifacts" / "tenants" / "alice" / "jobs" / job
    folder.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2800k", "tmpfs", str(folder)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        alice.post(f"/v1/jobs/{job}/cancel")
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        workers.start_worker("w-disk")
        row = assert_quiet(workers, alice, [job])[job]
        assert row["state"] == "failed" and row["attempt"] == 1, "not retried"
        assert "No space left on device" in row["error"]
        assert "checkpoint is intact" in row["error"] and str(folder) not in row["error"]
        import torch

        state = torch.load(folder / "checkpoint.pt", weights_only=True)
        assert state["epoch"] == 1, "the last good checkpoint is whole"
        assert not [p.name for p in folder.iterdir() if p.name.endswith(".tmp")], "no debris"
    finally:
        subprocess.run(["umount", str(folder)], check=False)
