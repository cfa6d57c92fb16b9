"""What the service costs on top of the engine. Prints figures; asserts nothing.

1. The same small spec run through the API (POST → Celery worker → trainer process →
   report) and by ``bulwark run`` in a subprocess, interleaved, ``--repeats`` times each:
   median wall times, their ratio and their difference (the fixed cost of the service). The
   API is timed twice: with a client that polls GET /v1/jobs/{id} every 50 ms (the first
   version of this bench: 20 requests a second that take CPU from the training on a small
   machine) and with the SDK's ``Job.wait`` (the job's event stream; what the CLI and the SDK
   do). Goal: ratio ≤ 1.05 plus ≤ 2 s of fixed cost.
2. API latency under ``--clients`` concurrent clients (no worker running, so jobs only queue):
   p50 / p99 of GET /v1/jobs/{id} and POST /v1/jobs.

    python bench/service_overhead.py [--repeats 3] [--epochs 3] [--clients 50] [--requests 20]
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

from workers.jobs.serve import LocalStack  # noqa: E402


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


def start_stack(home: Path, workers: int) -> LocalStack:
    stack = LocalStack(home, {"BULWARK_DEVICE": "cpu", "BULWARK_MAX_QUEUED_PER_TENANT": "1000000",
                              "BULWARK_HEARTBEAT_SECONDS": "5", "PYTHONPATH": str(ROOT)},
                       cwd=ROOT).start(workers=workers)
    stack.headers = {"Authorization": f"Bearer {stack.key()}"}
    return stack


def via_sdk(stack: LocalStack, job: dict) -> float:
    """Submit with the SDK and wait as it waits (``Job.wait``: the job's event stream)."""
    from workers.client.http import Client

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
    subprocess.run([sys.executable, "-m", "workers.client.cli", "run", str(path), "--out",
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
        stack = start_stack(tmp / "svc", workers=1)
        try:
            time.sleep(3)  # let the worker connect
            via_api(stack, spec(1))  # warm the worker's caches (imports, data) once
            api, sdk, cli = [], [], []
            for i in range(args.repeats):
                api.append(via_api(stack, job))
                sdk.append(via_sdk(stack, job))
                cli.append(via_cli(job, tmp, i))
        finally:
            stack.stop()
        a, e, c = statistics.median(api), statistics.median(sdk), statistics.median(cli)
        result["end_to_end"] = {"api_poll_s": api, "api_sdk_s": sdk, "cli_s": cli,
                                "api_poll_median_s": a, "api_sdk_median_s": e,
                                "cli_median_s": c, "ratio_poll": a / c, "ratio_sdk": e / c,
                                "fixed_cost_poll_s": a - c, "fixed_cost_sdk_s": e - c,
                                "epochs": args.epochs}
        print(f"\n1. same spec ({args.epochs} epochs, SmallCNN 28x28, fgsm-elle), "
              f"{args.repeats} runs each, interleaved")
        print(f"   API, client polls GET every 50 ms: median {a:.2f} s   "
              f"runs {[round(t, 2) for t in api]}")
        print(f"   API, SDK Job.wait (event stream):  median {e:.2f} s   "
              f"runs {[round(t, 2) for t in sdk]}")
        print(f"   bulwark run (subprocess):          median {c:.2f} s   "
              f"runs {[round(t, 2) for t in cli]}")
        print(f"   polling: ratio {a / c:.3f}, fixed cost {a - c:+.2f} s;   "
              f"SDK: ratio {e / c:.3f}, fixed cost {e - c:+.2f} s   (budget: ≤ 1.05 and ≤ 2 s)")

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
