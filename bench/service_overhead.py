"""What the service costs on top of the engine. Prints figures; asserts nothing.

1. The same small spec run through the API (POST → Celery worker → trainer process →
   report, waited for with the SDK's ``Job.wait``: the job's event stream, what the CLI and
   the SDK do) and by ``bulwark run`` in a subprocess, interleaved, ``--repeats`` times each:
   median wall times, their ratio and their difference (the fixed cost of the service). The
   API is timed on two stacks side by side: workers whose child starts the trainer when the
   job is claimed (``BULWARK_STANDBY_TRAINER=false``, the service before the standby) and
   workers whose child keeps a standby trainer that has done its imports (the default). After
   each API job the bench waits ``--settle`` seconds, so that the next child's standby does
   its imports outside the timed runs. ``--poll`` adds the first version's client, which polls
   GET /v1/jobs/{id} every 50 ms. Goal: ratio ≤ 1.05 plus ≤ 2 s of fixed cost.
2. API latency under ``--clients`` concurrent clients (no worker running, so jobs only queue):
   p50 / p99 of GET /v1/jobs/{id} and POST /v1/jobs.

    python bench/service_overhead.py [--repeats 3] [--epochs 3] [--settle 6] [--poll]\
        [--clients 50] [--requests 20]
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import httpx  # noqa: E402

from bulwark.workers.client.serve import LocalStack  # noqa: E402


def spec(epochs: int) -> dict:
    """MNIST-shaped work without the dataset: synthetic 28x28, SmallCNN, FGSM + ELLE."""
    return {
        "name": "overhead",
        "dataset": {"name": "synthetic", "val_size": 256,
                    "synthetic": {"image_size": 28, "n_train": 4096, "n_test": 256}},
        "recipe": "fgsm-elle",
        "schedule": {"epochs": epochs, "batch_size": 128, "lr": {"lr_max": 0.02}},
        "evaluation": {"monitor": {"size": 256, "pgd_steps": 5},
                       "final": {"n": 256, "pgd": {"steps": 10, "restarts": 1},
                                 "autoattack": None}},
    }


def start_stack(home: Path, workers: int, standby: bool = True) -> LocalStack:
    stack = LocalStack(home, {"BULWARK_DEVICE": "cpu", "BULWARK_MAX_QUEUED_PER_TENANT": "1000000",
                              "BULWARK_HEARTBEAT_SECONDS": "5", "PYTHONPATH": str(ROOT),
                              "BULWARK_STANDBY_TRAINER": str(standby).lower()},
                       cwd=ROOT).start(workers=workers)
    stack.headers = {"Authorization": f"Bearer {stack.key()}"}
    return stack


def via_sdk(stack: LocalStack, job: dict) -> float:
    """Submit with the SDK and wait as it waits (``Job.wait``: the job's event stream)."""
    from bulwark.workers.client.http import Client

    with Client(stack.url, stack.headers["Authorization"].split()[1]) as client:
        t0 = time.perf_counter()
        out = client.submit(job).wait(progress=False)
        elapsed = time.perf_counter() - t0
    if out.state != "succeeded":
        raise RuntimeError(f"API job ended {out.state}")
    return elapsed


def via_api(stack: LocalStack, job: dict) -> float:
    """Submit and poll GET /v1/jobs/{id} every 50 ms (the figure of the first version)."""
    with httpx.Client(base_url=stack.url, headers=stack.headers, timeout=60) as c:
        t0 = time.perf_counter()
        job_id = c.post("/v1/jobs", json=job).json()["id"]
        while True:
            state = c.get(f"/v1/jobs/{job_id}").json()["state"]
            if state in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t0
    if state != "succeeded":
        raise RuntimeError(f"API job ended {state}")
    return elapsed


def via_cli(job: dict, tmp: Path, i: int) -> float:
    path = tmp / f"spec{i}.json"
    path.write_text(json.dumps(job))
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "bulwark.workers.client.cli", "run", str(path), "--out",
                    str(tmp / f"run{i}"), "--device", "cpu", "--quiet"], cwd=ROOT, check=True,
                   capture_output=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    return time.perf_counter() - t0


async def latency(url: str, headers: dict, clients: int, requests: int, job_id: str,
                  job: dict) -> dict[str, dict[str, float]]:
    async def one(client: httpx.AsyncClient, method: str, times: list[float]) -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            r = await (client.get(f"/v1/jobs/{job_id}") if method == "GET"
                       else client.post("/v1/jobs", json=job))
            times.append(time.perf_counter() - t0)
            r.raise_for_status()

    out = {}
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=60,
                                 limits=limits) as client:
        for method in ("GET", "POST"):
            times: list[float] = []
            t0 = time.perf_counter()
            await asyncio.gather(*(one(client, method, times) for _ in range(clients)))
            wall = time.perf_counter() - t0
            times.sort()
            out[method] = {"p50_ms": 1000 * times[len(times) // 2],
                           "p99_ms": 1000 * times[min(len(times) - 1, int(0.99 * len(times)))],
                           "requests": len(times), "throughput_rps": len(times) / wall}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--settle", type=float, default=6.0,
                    help="seconds of rest after each API job (the next child's standby starts)")
    ap.add_argument("--poll", action="store_true",
                    help="also time a client polling GET every 50 ms (standby stack)")
    ap.add_argument("--clients", type=int, default=50)
    ap.add_argument("--requests", type=int, default=20, help="per client and endpoint")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    job = spec(args.epochs)
    print(f"Bulwark service overhead  date={dt.datetime.now(dt.UTC).isoformat(timespec='seconds')}"
          f"  python={platform.python_version()}  cores={os.cpu_count()}"
          f"  loadavg_1m={os.getloadavg()[0]:.2f}")
    result: dict = {}
    with tempfile.TemporaryDirectory() as d:
        tmp = Path(d)
        stacks = {"cold": start_stack(tmp / "cold", workers=1, standby=False),
                  "standby": start_stack(tmp / "standby", workers=1, standby=True)}
        times: dict[str, list[float]] = {"cold": [], "standby": [], "cli": [], "poll": []}
        try:
            time.sleep(3)  # let the workers connect
            for stack in stacks.values():  # warm each worker's caches (imports, data) once
                via_sdk(stack, spec(1))
            time.sleep(args.settle)
            for i in range(args.repeats):
                for name, stack in stacks.items():
                    times[name].append(via_sdk(stack, job))
                    time.sleep(args.settle)
                if args.poll:
                    times["poll"].append(via_api(stacks["standby"], job))
                    time.sleep(args.settle)
                times["cli"].append(via_cli(job, tmp, i))
        finally:
            for stack in stacks.values():
                stack.stop()
        med = {k: statistics.median(v) for k, v in times.items() if v}
        c = med["cli"]
        result["end_to_end"] = {
            "epochs": args.epochs, "runs_s": times, "median_s": med,
            **{f"ratio_{k}": med[k] / c for k in med if k != "cli"},
            **{f"fixed_cost_{k}_s": med[k] - c for k in med if k != "cli"}}
        print(f"\n1. same spec ({args.epochs} epochs, SmallCNN 28x28, fgsm-elle), "
              f"{args.repeats} runs each, interleaved; SDK Job.wait (event stream)")
        rows = [("cold", "API, trainer started at the claim"),
                ("standby", "API, standby trainer (default)"),
                ("poll", "API, standby, client polls GET 50 ms"),
                ("cli", "bulwark run (subprocess)")]
        for key, label in rows:
            if key not in med:
                continue
            tail = "" if key == "cli" else (f"   ratio {med[key] / c:.3f}, fixed cost "
                                            f"{med[key] - c:+.2f} s")
            print(f"   {label:<38} median {med[key]:6.2f} s   "
                  f"runs {[round(t, 2) for t in times[key]]}{tail}")
        print("   budget: ratio ≤ 1.05 and fixed cost ≤ 2 s")

        stack = start_stack(tmp / "lat", workers=0)
        try:
            with httpx.Client(base_url=stack.url, headers=stack.headers) as c0:
                job_id = c0.post("/v1/jobs", json=job).json()["id"]
            lat = asyncio.run(latency(stack.url, stack.headers, args.clients, args.requests,
                                      job_id, job))
        finally:
            stack.stop()
        result["latency"] = {"clients": args.clients, **lat}
        print(f"\n2. API latency, {args.clients} concurrent clients, {args.requests} requests "
              "each (SQLite store, one uvicorn process, no worker)")
        for method, row in lat.items():
            print(f"   {method:<4} p50 {row['p50_ms']:7.1f} ms   p99 {row['p99_ms']:7.1f} ms   "
                  f"{row['throughput_rps']:6.0f} req/s   (n={row['requests']})")
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
