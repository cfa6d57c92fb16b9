"""Submit job specs side by side through the API, follow them, print one comparison table.

    cd examples/quickstart && python ../quickstart.py mnist-fgsm.yaml mnist-fgsm-elle-a.yaml

Uses the SDK (``import bulwark``): the URL and key come from $BULWARK_URL / $BULWARK_API_KEY
or the key file of a running ``bulwark serve``. Exit code 0 when every job succeeded.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import bulwark

pgd_names: set[str] = set()


def follow(job: bulwark.Job, label: str, lock: threading.Lock, epochs: dict[str, int]) -> None:
    """One line per epoch (monitor accuracies) and per catastrophic-overfitting event."""
    for ev in job.events():
        d = ev.data
        line = None
        if ev.type == "started":
            epochs[label] = d.get("epochs", 0)
        elif ev.type == "epoch" and d.get("monitor"):
            m = d["monitor"]
            line = (f"epoch {d['epoch']}/{epochs.get(label, '?')}  monitor clean "
                    f"{m['clean_acc']:.3f}  FGSM {m['fgsm_acc']:.3f}  PGD {m['pgd_acc']:.3f}"
                    f"  ({d['train_seconds']:.0f} s)")
        elif ev.type in bulwark.WATCH_EVENTS:  # "!!" marks the alarm alone
            line = bulwark.Event.model_validate({**d, "type": ev.type}).line()
        elif ev.type == "phase" and d.get("attack"):
            line = f"final evaluation: {d['attack']} on {d.get('n')} test images"
        elif ev.type in ("succeeded", "failed", "cancelled"):
            line = ev.type + (f": {d.get('error')}" if d.get("error") else "")
        if line:
            with lock:
                print(f"[{label:<12}] {line}", flush=True)


def row(label: str, job: bulwark.Job) -> list[str]:
    info = job.status()
    if info.state != "succeeded":
        return [label, info.state, "-", "-", "-", "-", "-", "-"]
    r = job.report()
    pgd_names.add(next((k for k in r.final.attacks if k.startswith("pgd")), "pgd"))
    f = r.final
    seconds = (info.finished_at - info.started_at).total_seconds() if info.started_at else 0
    recovered = {e.epoch for e in r.events if e.type == "co_recovered"}
    co = ", ".join(map(str, r.co_epochs)) or "none"
    if r.co_epochs:
        co += " (recovered)" if recovered and not r.co_at_end else " (to the end)"
    pgd = f.pgd
    return [label, info.state, f"{f.clean_acc:.3f}", f"{f.fgsm.acc:.3f}" if f.fgsm else "-",
            f"{pgd.acc:.3f}" if pgd else "-", co, r.verdict.label if r.verdict else "-",
            f"{seconds:.0f}"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("specs", nargs="+", help="job spec files, one job each")
    ap.add_argument("--reports", type=Path, default=Path("quickstart-reports"),
                    help="folder for each job's report.html / .json (default quickstart-reports)")
    args = ap.parse_args()
    client = bulwark.Client()
    jobs = []
    for path in args.specs:
        job = client.submit(path)
        spec = job.info.spec
        label = spec.get("name") or spec["recipe"].get("preset") or job.id[:8]
        jobs.append((label, job))
        print(f"submitted {label}: job {job.id}", flush=True)
    lock, epochs = threading.Lock(), {}
    t0 = time.monotonic()
    threads = [threading.Thread(target=follow, args=(job, label, lock, epochs), daemon=True)
               for label, job in jobs]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.monotonic() - t0

    eps = jobs[0][1].info.spec["threat"]["epsilon"]
    head = ["job", "state", "clean", "FGSM", "PGD", "CO at epoch", "verdict", "seconds"]
    rows = [head] + [row(label, job) for label, job in jobs]
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    attack = ", ".join(sorted(pgd_names)) or "PGD"
    print(f"\nSide by side: accuracy on {jobs[0][1].info.spec['evaluation']['final'].get('n')} "
          f"MNIST test images at ε = {eps:g} (PGD = {attack})")
    for r in rows:
        print("  ".join(c.ljust(w) if i < 2 or i == 6 else c.rjust(w)
                        for i, (c, w) in enumerate(zip(r, widths, strict=True))).rstrip())
    print(f"(the jobs ran at once, one worker each; {wall:.0f} s wall)")

    args.reports.mkdir(parents=True, exist_ok=True)
    print(f"\nreports (kept after the service stops), in {args.reports}/:")
    width = max(len(label) for label, _ in jobs)
    for label, job in jobs:
        if job.status().state == "succeeded":
            html = job.download("report.html", args.reports / f"{label}.html")
            job.download("report.json", args.reports / f"{label}.json")
            print(f"  {label:<{width}}  {html}  (+ .json)   job {job.id}")
    return 0 if all(job.status().state == "succeeded" for _, job in jobs) else 1


if __name__ == "__main__":
    sys.exit(main())
