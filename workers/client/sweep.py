"""``bulwark sweep SWEEP.yaml --out DIR [--parallel N]``: run a sweep's children locally.

Each child runs as ``bulwark run DIR/<child>/spec.json --out DIR/<child> --resume`` in its own
process (threads split evenly between the parallel children), so the sweep is resumable:
a child with a ``report.json`` is skipped, an unfinished one continues from its checkpoint.
``DIR/sweep.json`` lists every child with its overrides, state and headline figures.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor, as_completed
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bulwark.contract.artifacts import REPORT
from bulwark.contract.files import write_json
from bulwark.contract.spec import same_spec
from bulwark.contract.sweep import Child, headline

SWEEP_FILE = "sweep.json"
SECONDS_DIGITS = {"seconds": 0, "seconds_per_epoch": 1, "train_seconds": 0}


class _Runner:
    """Runs children as subprocesses; ``stop()`` (Ctrl-C) starts no new child and ends the
    running ones, whose checkpoints let the next ``bulwark sweep`` resume them."""

    def __init__(self, out: Path, device: str, threads: int):
        self.out, self.device, self.threads = out, device, threads
        self.stopping = threading.Event()
        self.procs: set[subprocess.Popen] = set()
        self.lock = threading.Lock()

    def stop(self) -> None:
        self.stopping.set()
        with self.lock:
            for proc in self.procs:
                proc.send_signal(signal.SIGTERM)  # `bulwark run` stops as on Ctrl-C

    def __call__(self, child: Child) -> dict[str, Any]:
        folder = self.out / child.name
        folder.mkdir(parents=True, exist_ok=True)
        row: dict[str, Any] = {"name": child.name, "overrides": child.overrides}
        if (folder / REPORT).is_file():
            report = json.loads((folder / REPORT).read_text())
            if not same_spec(report.get("spec", {}), child.spec.model_dump(mode="json")):
                return {**row, "state": "failed",
                        "error": f"{folder} holds a finished run of another spec; delete it "
                                 "or sweep into another --out"}
            return {**row, "state": "succeeded", "skipped": True, **headline(report)}
        if self.stopping.is_set():
            return {**row, "state": "interrupted"}
        spec_path = folder / "spec.json"
        spec_path.write_text(child.spec.model_dump_json(indent=2))
        env = dict(os.environ, OMP_NUM_THREADS=str(self.threads),
                   MKL_NUM_THREADS=str(self.threads))
        t0 = time.perf_counter()
        with open(folder / "run.log", "a") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "bulwark.workers.client.cli", "run", str(spec_path), "--out",
                 str(folder), "--resume", "--quiet", "--device", self.device],
                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
            with self.lock:
                self.procs.add(proc)
            try:
                code = proc.wait()
            finally:
                with self.lock:
                    self.procs.discard(proc)
        if code == 0 and (folder / REPORT).is_file():
            return {**row, "state": "succeeded",
                    **headline(json.loads((folder / REPORT).read_text()))}
        if self.stopping.is_set():
            return {**row, "state": "interrupted"}
        lines = (folder / "run.log").read_text().strip().splitlines()
        errors = [ln for ln in lines if ln.startswith("bulwark: error:")]
        return {**row, "state": "failed", "seconds": time.perf_counter() - t0,
                "error": (errors[-1] if errors else (lines[-1] if lines else "no output"))
                .removeprefix("bulwark: error: ")}


@contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds ``<path>.lock`` exclusively: sweeps that share a folder take turns at its table."""
    with open(path.with_name(path.name + ".lock"), "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def write_table(table_path: Path, names: list[str], rows: dict[str, dict[str, Any]]) -> None:
    """Write this sweep's ``rows`` (its children ``names``, in order) into the shared table.

    Sweeps that share a folder share its table, even while both run: under the table's lock
    it is read again, rows another sweep wrote stay, ours replace theirs as one block (where
    our first row was, or at the end)."""
    with _locked(table_path):
        earlier = (json.loads(table_path.read_text()).get("children", [])
                   if table_path.is_file() else [])
        before = {r["name"]: r for r in earlier}
        ours = [rows.get(n) or before[n] for n in names if n in rows or n in before]
        mine = {r["name"] for r in ours}
        merged = [r for r in earlier if r["name"] not in mine]
        at = next((i for i, r in enumerate(earlier) if r["name"] in mine), len(earlier))
        merged[at:at] = ours
        write_json(table_path, {"children": merged})


def run_sweep(children: list[Child], out: Path, *, parallel: int = 1, device: str = "auto",
              threads: int | None = None, on_done=None) -> list[dict[str, Any]]:
    """Run every child (skipping finished ones); returns and writes the sweep table.
    ``threads`` per child defaults to the CPUs split evenly between the parallel children.
    KeyboardInterrupt stops the sweep; run it again to resume."""
    out.mkdir(parents=True, exist_ok=True)
    runner = _Runner(out, device, threads or max(1, (os.cpu_count() or 1) // max(parallel, 1)))
    rows: dict[str, dict[str, Any]] = {}

    def write() -> None:
        write_table(out / SWEEP_FILE, [c.name for c in children], rows)

    pool = ThreadPoolExecutor(max_workers=max(parallel, 1))
    try:
        futures = [pool.submit(runner, c) for c in children]
        for fut in as_completed(futures):
            row = fut.result()
            rows[row["name"]] = row
            write()
            if on_done is not None:
                on_done(row)
    except KeyboardInterrupt:
        runner.stop()
        pool.shutdown(wait=True, cancel_futures=True)
        raise
    pool.shutdown()
    return [rows[c.name] for c in children]


def collect(folder: Path) -> list[dict[str, Any]]:
    """The finished runs under ``folder`` (each ``<child>/report.json``), in the order of its
    ``sweep.json`` where there is one, then by name; with their headline figures. A `bulwark run`
    folder (its own ``report.json``) is one run, its method named after the folder."""
    if (folder / REPORT).is_file():
        report = json.loads((folder / REPORT).read_text())
        return [{"name": folder.name, "overrides": {"variant": folder.name},
                 "state": "succeeded", **headline(report), "spec": report["spec"]}]
    order: list[dict[str, Any]] = []
    if (folder / SWEEP_FILE).is_file():
        order = json.loads((folder / SWEEP_FILE).read_text()).get("children", [])
    known = {r["name"]: r for r in order}
    names = [r["name"] for r in order] + sorted(
        p.parent.name for p in folder.glob(f"*/{REPORT}") if p.parent.name not in known)
    rows = []
    for name in names:
        path = folder / name / REPORT
        if path.is_file():
            report = json.loads(path.read_text())
            rows.append({"name": name, "overrides": known.get(name, {}).get("overrides", {}),
                         "state": "succeeded", **headline(report),
                         "spec": report["spec"]})  # compare names what unlike runs differ in
        elif name in known:
            rows.append(known[name])
    return rows


def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool):
        return "yes" if v else "no"
    if isinstance(v, float):
        return f"{v:.3f}"
    if isinstance(v, list):
        if v and all(isinstance(x, float) or x is None for x in v):
            return " ".join("-" if x is None else f"{x:.2f}" for x in v)
        return ",".join(map(str, v)) or "-"
    return str(v)


def table(rows: list[dict[str, Any]]) -> str:
    """An aligned text table: child, state, clean, FGSM, PGD, AutoAttack, CO epochs, whether
    CO held at the last epoch, seconds per epoch, training seconds, total seconds."""
    cols = [("child", "name"), ("state", "state"), ("clean", "clean_acc"), ("fgsm", "fgsm_acc"),
            ("pgd", "pgd_acc"), ("autoattack", "autoattack_acc"), ("CO at", "co_epochs"),
            ("CO at end", "co_at_end"), ("s/epoch", "seconds_per_epoch"),
            ("train s", "train_seconds"), ("seconds", "seconds"),
            ("monitor PGD by epoch", "monitor_pgd")]
    cells = [[h for h, _ in cols]] + [
        [f"{r[k]:.{SECONDS_DIGITS[k]}f}" if k in SECONDS_DIGITS and r.get(k) is not None
         else _fmt(r.get(k)) for _, k in cols] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
    lines = ["  ".join(c.ljust(w) if i < 2 or i == len(cols) - 1 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(row, widths, strict=True)))
             for row in cells]
    failed = [f"{r['name']}: {r['error']}" for r in rows if r.get("state") == "failed"]
    return "\n".join(lines + ([""] + failed if failed else []))
