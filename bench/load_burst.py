"""A bounded load burst against the real stack: N tiny jobs from C concurrent clients.

    .venv/bin/python bench/load_burst.py [--jobs 200] [--clients 20] [--tenants 5]
        [--workers 2] [--json OUT.json]

Starts a LocalStack (a private redis-server, uvicorn, Celery prefork workers, SQLite) in a
temporary folder, lets C client threads (spread over T tenants) submit N jobs between them as
fast as the API answers, then polls until every job is terminal and stops by itself. Prints the
latency of the submissions and of the job listings read while the workers ran (p50 / p99 /
max, ms), the throughput, and the accounting: jobs acknowledged, succeeded, run exactly once
(one attempt row each). ``tests/test_load.py`` runs it at a CI size and asserts the
accounting, never the timings.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from bulwark.store.store import Store  # noqa: E402
from tests.service_stack import Stack, tiny_spec  # noqa: E402

TERMINAL = ("succeeded", "failed", "cancelled")


def tiny_job(i: int) -> dict:
    """About the least a job can do: one epoch over 64 synthetic 8x8 images, a 16-image
    final evaluation (PGD-1). The trainer process's start (importing torch) dominates."""
    spec = tiny_spec(1, name=f"burst-{i}", recipe="fgsm")
    spec["dataset"]["synthetic"].update(n_train=64, n_test=16)
    spec["dataset"]["val_size"] = 0
    spec["evaluation"] = {"monitor": {"size": 16, "pgd_steps": 1},
                          "final": {"n": 16, "pgd": {"steps": 1, "restarts": 1},
                                    "autoattack": None}}
    return spec


def percentiles(samples: list[float]) -> dict[str, float]:
    if not samples:
        return {"n": 0}
    ms = sorted(1000 * s for s in samples)
    q = statistics.quantiles(ms, n=100, method="inclusive") if len(ms) > 1 else ms * 99
    return {"n": len(ms), "p50_ms": round(q[49], 1), "p99_ms": round(q[98], 1),
            "max_ms": round(ms[-1], 1)}


def burst(stack: Stack, *, jobs: int, clients: int, tenants: int,
          timeout: float = 3600) -> dict:
    """Run the burst against a started ``stack``; returns the figures and the accounting."""
    keys = [stack.key(f"load{t}") for t in range(tenants)]
    submit_s: list[float] = []
    status_s: list[float] = []
    acknowledged: dict[str, str] = {}  # job id -> key
    refused: list[int] = []
    lock = threading.Lock()
    counter = iter(range(jobs))

    def submitter(c: int) -> None:
        key = keys[c % tenants]
        with httpx.Client(base_url=stack.url, timeout=60,
                          headers={"Authorization": f"Bearer {key}"}) as http:
            for i in counter:  # shared: the clients take the next job number in turn
                t0 = time.perf_counter()
                r = http.post("/v1/jobs", json=tiny_job(i))
                dt = time.perf_counter() - t0
                with lock:
                    submit_s.append(dt)
                    if r.status_code == 201:
                        acknowledged[r.json()["id"]] = key
                    else:
                        refused.append(r.status_code)

    t_start = time.perf_counter()
    threads = [threading.Thread(target=submitter, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    t_submitted = time.perf_counter()

    # drain: one listing per tenant a second (light, so the poller does not slow the
    # trainers down), timing each read, until every acknowledged job is terminal
    pending = set(acknowledged)
    states: dict[str, str] = {}
    deadline = time.monotonic() + timeout
    clients_by_key = {k: httpx.Client(base_url=stack.url, timeout=60,
                                      headers={"Authorization": f"Bearer {k}"}) for k in keys}
    try:
        while pending and time.monotonic() < deadline:
            for http in clients_by_key.values():
                t0 = time.perf_counter()
                rows = http.get("/v1/jobs", params={"limit": 500}).json()["items"]
                status_s.append(time.perf_counter() - t0)
                for row in rows:
                    if row["id"] in pending and row["state"] in TERMINAL:
                        states[row["id"]] = row["state"]
                        pending.discard(row["id"])
            time.sleep(1.0)
    finally:
        for http in clients_by_key.values():
            http.close()
    t_done = time.perf_counter()

    store = Store(stack.database_url)
    attempts = {j: len(store.attempts(j)) for j in acknowledged}
    return {
        "jobs": jobs, "clients": clients, "tenants": tenants,
        "acknowledged": len(acknowledged), "refused": refused,
        "succeeded": sum(1 for s in states.values() if s == "succeeded"),
        "not_terminal": len(pending),
        "run_exactly_once": sum(1 for n in attempts.values() if n == 1),
        "submit": percentiles(submit_s), "list_while_running": percentiles(status_s),
        "submit_seconds": round(t_submitted - t_start, 2),
        "drain_seconds": round(t_done - t_submitted, 1),
        "jobs_per_minute": round(60 * len(states) / max(t_done - t_start, 1e-9), 1),
    }


def run(jobs: int, clients: int, tenants: int, workers: int, home: Path) -> dict:
    stack = Stack(home, f"sqlite:///{home / 'bulwark.db'}")
    stack.extra.update(BULWARK_MAX_QUEUED_PER_TENANT=str(jobs),
                       BULWARK_HEARTBEAT_SECONDS="2", BULWARK_STALE_AFTER_SECONDS="60",
                       BULWARK_REAPER_INTERVAL_SECONDS="5")
    stack.start(workers=workers)
    try:
        out = burst(stack, jobs=jobs, clients=clients, tenants=tenants)
        out["workers"] = workers
        return out
    finally:
        stack.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--jobs", type=int, default=200)
    ap.add_argument("--clients", type=int, default=20)
    ap.add_argument("--tenants", type=int, default=5)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bulwark-load-") as home:
        out = run(a.jobs, a.clients, a.tenants, a.workers, Path(home))
    print(f"{out['acknowledged']}/{out['jobs']} acknowledged, {out['succeeded']} succeeded, "
          f"{out['run_exactly_once']} run exactly once, {out['not_terminal']} not terminal")
    for what in ("submit", "list_while_running"):
        p = out[what]
        print(f"{what:>22}: n={p['n']}  p50 {p.get('p50_ms')} ms  p99 {p.get('p99_ms')} ms  "
              f"max {p.get('max_ms')} ms")
    print(f"submitted in {out['submit_seconds']} s; drained in {out['drain_seconds']} s; "
          f"{out['jobs_per_minute']} jobs/min on {out['workers']} workers")
    if a.json:
        a.json.write_text(json.dumps(out, indent=2))
    return 0 if out["succeeded"] == out["run_exactly_once"] == out["jobs"] else 1


if __name__ == "__main__":
    sys.exit(main())
