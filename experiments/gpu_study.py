"""The MNIST study (mnist.yaml + mnist-seeds.yaml) on one GPU inside a time limit.

    python experiments/gpu_study.py --runs /tmp/gpu/runs --deadline 450 --parallel 14 \
        --archive OUT/gpu_runs.tar.gz

The same children as the CPU study (same names, specs and evaluation: PGD-50-10 and APGD-CE +
APGD-T on all 10 000 test images), with one change that leaves every figure's meaning alone:
the final suite's attack batch is ``--final-batch`` images (default 2 500, the CPU run's 256)
so that the GPU is not starved by launches; every attack is per image (PGD's restarts, APGD's
per-image step sizes), so the batch only changes which random draws an image gets. Children
run side by side (``--parallel``, one CPU thread each), the slowest recipes first, ε = 0.3
(three seeds) and the other ε as two sweeps into one folder.

A short smoke run first (fgsm, one epoch on 2 000 images) stops the whole thing within a
minute if the engine fails on this device. Every ``--every`` seconds, and at the end, the
finished children (report.json, run.log, spec.json) and the sweep table are packed into
``--archive`` (at the end with a `bulwark compare` of them); at ``--deadline`` seconds the
sweeps are interrupted (run the same command again on the same folder to resume them).
Finished children of an earlier lease (``--seed-from``, by default the committed
experiments/mnist-gpu/runs) are copied in first and skipped, so each lease goes on with the
children still missing."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# slowest first, so that the long children do not start last (PGD-10 AT ~11 passes a step,
# GradAlign's double backward, ELLE's extra forwards, AAER's, then the plain single steps)
ORDER = ["pgd10-at", "fgsm-gradalign", "fgsm-elle", "fgsm-elle-a", "n-fgsm-elle-a",
         "rs-aaer", "n-aaer", "fgsm-rs", "n-fgsm", "fgsm"]


def gpu_sweep(name: str, final_batch: int) -> dict:
    """``experiments/<name>`` with its base spec inlined, the final batch raised and the
    variants slowest first (the children keep their names)."""
    sweep = yaml.safe_load((HERE / name).read_text())
    base = yaml.safe_load((HERE / sweep["base"]).read_text())
    base["evaluation"]["final"]["batch_size"] = final_batch
    variants = sweep["variants"]
    sweep["variants"] = {k: variants[k] for k in ORDER if k in variants} | {
        k: v for k, v in variants.items() if k not in ORDER}
    sweep["base"] = base
    sweep.pop("out", None)
    return sweep


def at_epsilon(sweep: dict, eps: list[float]) -> dict:
    """``sweep`` with its ε grid narrowed to ``eps``."""
    return dict(sweep, grid={**sweep["grid"], "threat.epsilon": eps})


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "bulwark.workers.client.cli", *args]


def smoke(work: Path, device: str) -> bool:
    spec = {"dataset": {"name": "mnist", "val_size": 500, "train_limit": 2000},
            "model": {"arch": "mnist_net"}, "threat": {"norm": "linf", "epsilon": 0.3},
            "recipe": "fgsm",
            "schedule": {"epochs": 1, "batch_size": 100, "optimizer": "adam",
                         "lr": {"kind": "cyclic", "lr_max": 0.005, "peak": 0.4}},
            "evaluation": {"monitor": {"size": 500, "pgd_steps": 5},
                           "final": {"n": 500, "models": ["last"], "batch_size": 500,
                                     "pgd": {"steps": 5, "restarts": 1},
                                     "autoattack": {"version": "apgd-ce+apgd-t"}}}}
    path = work / "smoke.yaml"
    path.write_text(yaml.safe_dump(spec))
    t0 = time.perf_counter()
    p = subprocess.run(cli("run", str(path), "--out", str(work / "smoke"), "--force",
                           "--quiet", "--device", device),
                       capture_output=True, text=True, timeout=240, cwd=ROOT)
    print(f"smoke run: exit {p.returncode} in {time.perf_counter() - t0:.1f} s", flush=True)
    if p.returncode != 0:
        print(p.stdout[-4000:], p.stderr[-6000:], sep="\n", flush=True)
        return False
    report = json.loads((work / "smoke" / "report.json").read_text())
    env = report.get("environment", {})
    print("smoke environment:", json.dumps({k: env.get(k) for k in
                                            ("device", "torch", "gpu", "cuda")}), flush=True)
    return True


def seed(source: Path, runs: Path) -> int:
    """Copy ``source``'s finished children (report, spec, log) into ``runs``; returns how many.
    The sweeps skip a child whose report is there and is the spec they would run."""
    n = 0
    for report in sorted(source.glob("*/report.json")):
        dest = runs / report.parent.name
        if (dest / "report.json").is_file():
            continue
        dest.mkdir(parents=True, exist_ok=True)
        for f in ("report.json", "spec.json", "run.log"):
            if (report.parent / f).is_file():
                shutil.copy2(report.parent / f, dest / f)
        n += 1
    return n


def pack(runs: Path, archive: Path, compare: bool = False) -> int:
    """Finished children, the table and (``compare``: made now, at the end only, since it
    renders figures on a machine the children keep busy) a comparison into ``archive``;
    returns how many children."""
    done = sorted(p.parent for p in runs.glob("*/report.json"))
    if done and compare:
        cmp = subprocess.run(cli("compare", str(runs), "--out", str(runs.parent / "compare"),
                                 "--markdown"), capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        (runs.parent / "compare").mkdir(exist_ok=True)
        (runs.parent / "compare" / "compare.md").write_text(cmp.stdout + cmp.stderr)
    tmp = archive.with_suffix(".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for d in done:
            for f in ("report.json", "run.log", "spec.json"):
                if (d / f).is_file():
                    tar.add(d / f, arcname=f"runs/{d.name}/{f}")
        for extra in (runs / "sweep.json", *(runs.parent / "compare" / f"compare.{x}"
                                              for x in ("json", "html", "md"))):
            if extra.is_file():
                tar.add(extra, arcname=str(extra.relative_to(runs.parent)))
        for d in runs.iterdir() if runs.is_dir() else []:  # unfinished: their logs
            if d.is_dir() and d not in done and (d / "run.log").is_file():
                tar.add(d / "run.log", arcname=f"unfinished/{d.name}/run.log")
    tmp.replace(archive)
    return len(done)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, type=Path, help="children's folder (resumable)")
    ap.add_argument("--archive", required=True, type=Path, help="results .tar.gz")
    ap.add_argument("--deadline", type=float, default=450, help="seconds until interrupted")
    ap.add_argument("--parallel", type=int, default=14, help="children at once, in all")
    ap.add_argument("--final-batch", type=int, default=2500)
    ap.add_argument("--every", type=float, default=30, help="seconds between packs")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--only-eps", default=None, help="e.g. 0.3: that ε alone (a short check)")
    ap.add_argument("--seed-from", type=Path, default=HERE / "mnist-gpu" / "runs",
                    help="finished children to copy into --runs first, so that a new lease "
                         "skips them (default: the committed GPU runs; '' for none)")
    args = ap.parse_args(argv)
    t_start = time.monotonic()
    work = args.runs.parent
    work.mkdir(parents=True, exist_ok=True)
    if str(args.seed_from) not in ("", ".") and args.seed_from.is_dir():
        copied = seed(args.seed_from, args.runs)
        print(f"{copied} finished children copied from {args.seed_from}", flush=True)
    if not smoke(work, args.device):
        return 3
    # ε = 0.3 over three seeds, and the other ε, as two sweeps sharing the folder
    main_sweep = gpu_sweep("mnist.yaml", args.final_batch)
    seeds = gpu_sweep("mnist-seeds.yaml", args.final_batch)
    eps = main_sweep["grid"]["threat.epsilon"]
    share = max(1, round(args.parallel * 30 / 60))
    groups = [("eps03", [seeds, at_epsilon(main_sweep, [0.3])], share),
              ("eps-other", [at_epsilon(main_sweep, [e for e in eps if e != 0.3])],
               max(1, args.parallel - share))]
    if args.only_eps is not None:
        groups = [("only", [at_epsilon(main_sweep, [float(args.only_eps)])], args.parallel)]
    procs = []
    for name, sweeps, parallel in groups:
        files = []
        for i, s in enumerate(sweeps):
            f = work / f"{name}-{i}.yaml"
            f.write_text(yaml.safe_dump(s, sort_keys=False))
            files.append(f)
        # one sweep process per file, the group's parallelism split between them
        for i, f in enumerate(files):
            par = max(1, parallel // len(files) + (i < parallel % len(files)))
            log = open(work / f"{f.stem}.log", "w")
            procs.append((f.stem, subprocess.Popen(
                cli("sweep", str(f), "--out", str(args.runs), "--parallel", str(par),
                    "--threads", "1", "--device", args.device),
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, start_new_session=True,
                env=dict(os.environ, PYTHONUNBUFFERED="1"))))
            print(f"started sweep {f.stem}: {par} at a time", flush=True)
    last_pack = time.monotonic()
    while any(p.poll() is None for _, p in procs):
        time.sleep(5)
        now = time.monotonic()
        if now - t_start > args.deadline:
            print(f"deadline ({args.deadline:.0f} s): interrupting the sweeps", flush=True)
            for _, p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGINT)
            for _, p in procs:
                try:
                    p.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(p.pid, signal.SIGKILL)
            break
        if now - last_pack > args.every:
            n = pack(args.runs, args.archive)
            print(f"{now - t_start:6.0f} s: {n} children finished", flush=True)
            last_pack = now
    n = pack(args.runs, args.archive, compare=True)
    print(f"{time.monotonic() - t_start:.0f} s: {n} children finished; packed into "
          f"{args.archive}", flush=True)
    for stem, _ in procs:
        print(f"--- {stem}.log", (work / f"{stem}.log").read_text()[-3000:], sep="\n")
    table = work / "compare" / "compare.md"
    if table.is_file():
        print(table.read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
