"""The ``bulwark`` command line.

Local, no server:
    bulwark run SPEC.{json,yaml} --out DIR [--device cpu|cuda|auto] [--resume]
    bulwark sweep SWEEP.yaml --out DIR [--parallel N]   a grid of runs, resumable
    bulwark compare DIR|SWEEP_ID ...   a table, compare.json and compare.html (figures)
    bulwark validate SPEC|SWEEP    the spec as it will run, each preset value with its source;
                                  a sweep file: every child checked, one line each
    bulwark presets [--dataset D] the named recipes, every part, for a dataset's family
Service:
    bulwark serve                 embedded: private Redis + API + one worker, SQLite
    bulwark worker [--device D]   a Celery worker for one device (production)
    bulwark reaper                re-queue jobs whose worker stopped heartbeating
    bulwark keys create [--tenant T] | list | revoke PREFIX | rotate PREFIX
Client (BULWARK_URL, BULWARK_API_KEY; embedded mode's key is read from bulwark-data/api_key):
    bulwark submit SPEC [--wait]  bulwark jobs   bulwark status ID   bulwark report ID
    bulwark cancel ID             bulwark download ID NAME [-o PATH]   bulwark delete ID
    bulwark upload MODEL.safetensors [--arch A] | DATA.npz
    bulwark submit-sweep SWEEP.yaml [--wait]   bulwark cancel-sweep ID
    bulwark leaderboard [--dataset D --norm N --epsilon E --metric autoattack|pgd|certified]
    bulwark export ID|RUN_DIR [--format robustbench] [-o DIR]   a model card + the weights
A job id can be shortened to any unique prefix.

Errors are printed as messages, never as tracebacks (exit code 2).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def _fail(msg: str, code: int = 2) -> int:
    print(f"bulwark: error: {msg}", file=sys.stderr)
    return code


def _summary(report: dict) -> str:
    from bulwark.contract.report import Report

    return Report.model_validate(report).summary()


def _default_out(file: str) -> Path:
    """Where `bulwark run` and `bulwark sweep` write when neither --out nor the file names a
    folder: runs/<the file's name without its extension>, under the working directory."""
    return Path("runs") / Path(file).stem


def cmd_run(args: argparse.Namespace) -> int:
    from bulwark.contract.artifacts import CHECKPOINT, REPORT, RUN_OUTPUTS
    from bulwark.contract.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    out = Path(args.out) if args.out else _default_out(args.spec)
    if (out / REPORT).exists() and not args.resume and not args.force:
        return _fail(f"{out} already holds a finished run (report.json); "
                     "choose another --out, or pass --force to overwrite")
    if (out / CHECKPOINT).exists() and not args.resume and not args.force:
        return _fail(f"{out} holds a checkpoint of an unfinished run; pass --resume to continue "
                     "it or --force to start over")
    if args.force and not args.resume:
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)

    from bulwark.workers.client.progress import ProgressView
    from bulwark.workers.engine.data import DataError
    from bulwark.workers.engine.distributed import RankLost
    from bulwark.workers.engine.runner import run_job

    view = ProgressView(spec.name or spec.recipe.preset or "job", epochs=False,
                        enabled=not args.quiet)
    try:
        report = run_job(spec, out, device=args.device, resume=args.resume,
                         progress=not args.quiet, on_event=view)
    except (DataError, ValueError) as e:
        return _fail(str(e))
    except RankLost as e:
        return _fail(f"{e}: bulwark run {args.spec} --out {out} --resume", 1)
    except KeyboardInterrupt:
        return _fail(f"interrupted; continue with: bulwark run {args.spec} --out {out} --resume",
                     130)
    finally:
        view.close()
    (out / CHECKPOINT).unlink(missing_ok=True)  # finished: report and weights are the result
    print(_summary(report))
    print(f"report: {out / 'report.json'}\nweights: {out / 'model.safetensors'}")
    return 0


def cmd_sweep(args: argparse.Namespace) -> int:
    from bulwark.contract.sweep import expand, load_sweep, sweep_out
    from bulwark.workers.client.sweep import SWEEP_FILE, run_sweep, table

    try:
        sweep = load_sweep(args.sweep)
        children = expand(sweep)
    except ValueError as e:  # SpecError: the file, the child and the field
        return _fail(str(e))
    out = Path(args.out) if args.out else (sweep_out(args.sweep, sweep)
                                           or _default_out(args.sweep))
    for flag in ("parallel", "threads"):
        if getattr(args, flag) is not None and getattr(args, flag) < 1:
            return _fail(f"--{flag} must be at least 1, got {getattr(args, flag)}")
    if args.only:
        from fnmatch import fnmatchcase
        kept = [c for c in children if any(fnmatchcase(c.name, g) for g in args.only)]
        if not kept:
            return _fail(f"--only {' '.join(args.only)} matches none of the {len(children)} "
                         f"children (names as --dry-run lists them, e.g. {children[0].name})")
        children = kept
    if args.dry_run:
        for c in children:
            print(c.name)
        print(f"{len(children)} children")
        return 0
    print(f"sweep: {len(children)} children, {args.parallel} at a time, in {out}", flush=True)

    def done(row: dict) -> None:
        figures = (f"clean {row['clean_acc']:.3f}  pgd {row['pgd_acc'] or 0:.3f}"
                   if row["state"] == "succeeded" else row.get("error", ""))
        print(f"  {row['state']:<9} {row['name']}  {figures}"
              f"{'  (already done)' if row.get('skipped') else ''}", flush=True)

    try:
        rows = run_sweep(children, out, parallel=args.parallel, device=args.device,
                         threads=args.threads, on_done=done)
    except KeyboardInterrupt:
        again = f"bulwark sweep {args.sweep}" + (f" --out {out}" if args.out else "")
        return _fail(f"interrupted; run the same command again to resume: {again}", 130)
    print(table(rows))
    print(f"table: {out / SWEEP_FILE}")
    return 0 if all(r["state"] == "succeeded" for r in rows) else 1


def cmd_compare(args: argparse.Namespace) -> int:
    from bulwark.contract.artifacts import REPORT
    from bulwark.contract.compare import write
    from bulwark.workers.client.sweep import collect, table

    rows, sources = [], args.sources
    for source in sources:
        if Path(source).is_dir():
            found = collect(Path(source))
            # a `bulwark run` folder is its own row; a sweep folder's rows get its name
            label = None if (Path(source) / REPORT).is_file() else Path(source).name
        elif Path(source).exists() or "/" in source:
            return _fail(f"{source}: not a folder (give `bulwark run` or `bulwark sweep` output "
                         "folders, or sweep ids)")
        else:  # a sweep id on the server
            sweep = _client(args).sweep(source)
            found = [{"name": c.name, "overrides": c.overrides, "state": c.state,
                      **({"error": c.error} if c.error else {}), **(c.figures or {})}
                     for c in sweep.children]
            label = sweep.name or sweep.id[:8]
        rows += [{**r, "name": f"{label}/{r['name']}" if label and len(sources) > 1
                  else r["name"]} for r in found]
    if not any(r.get("state") == "succeeded" for r in rows):
        return _fail(f"no finished runs in {', '.join(sources)}")
    print(table(rows))
    if args.markdown:
        from bulwark.contract.compare import epsilon_markdown, markdown
        print("\n" + markdown(rows) + "\n")
        if grid := epsilon_markdown(rows):
            print(grid + "\n")
    out = Path(args.out or (sources[0] if len(sources) == 1 and Path(sources[0]).is_dir()
                            else "."))
    j, h = write(rows, out, title="Comparison of " + ", ".join(sources))
    if args.json:
        Path(args.json).write_text(j.read_text())
    print(f"comparison: {j} and {h}")
    return 0


def cmd_submit_sweep(args: argparse.Namespace) -> int:
    from bulwark.contract.spec import SpecError
    from bulwark.workers.client.sweep import table

    client = _client(args)
    try:
        sweep = client.submit_sweep(args.sweep)
    except SpecError as e:
        return _fail(str(e))
    print(f"sweep {sweep.id}: {len(sweep.children)} jobs queued")
    for c in sweep.children:
        print(f"  {c.job_id[:8]}  {c.name}")
    if not args.wait:
        print(f"follow it with `bulwark compare {sweep.id}`; stop it with "
              f"`bulwark cancel-sweep {sweep.id}`")
        return 0
    done = client.wait_sweep(sweep.id)
    print(table([{"name": c.name, "state": c.state, **({"error": c.error} if c.error else {}),
                  **(c.figures or {})} for c in done.children]))
    return 0 if done.state == "succeeded" else 1


def cmd_cancel_sweep(args: argparse.Namespace) -> int:
    sweep = _client(args).cancel_sweep(args.sweep_id)
    print(f"sweep {sweep.id}: {sweep.state}; " + ", ".join(
        f"{n} {k}" for k, n in sweep.counts.items() if n))
    return 0


def _validate_sweep(path: str) -> int:
    """A sweep file: every child validated, one line each (stdout), and where each dataset
    the children read is found."""
    from bulwark.contract.spec import SpecError
    from bulwark.contract.sweep import expand, load_sweep

    try:
        children = expand(load_sweep(path))
    except SpecError as e:
        return _fail(str(e))
    for c in children:
        t = c.spec.threat
        eps = f"ε {t.epsilon:g}" + (f" (trained at {t.train_epsilon:g})" if t.train_epsilon
                                     else "")
        print(f"{c.name}: {c.spec.recipe.preset or 'custom recipe'}, {eps}, "
              f"{c.spec.schedule.epochs} epochs, seed {c.spec.schedule.seed}")
    print(f"sweep: {len(children)} children, every one a valid job spec", file=sys.stderr)
    datasets = {json.dumps(c.spec.dataset.model_dump(mode="json"), sort_keys=True): c.spec
                for c in children}  # each dataset the children read, looked up once
    return max((_data_line(spec) for spec in datasets.values()), default=0)


def _data_line(spec) -> int:
    from bulwark.workers.engine.data import DataError, locate_dataset

    try:
        where = locate_dataset(spec.dataset)
    except DataError as e:
        print(f"data: NOT FOUND — {e}", file=sys.stderr)
        return 1
    print(f"data: {spec.dataset.name} found at {where}", file=sys.stderr)
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from bulwark.contract.spec import SpecError, load_spec_file, read_spec_file

    try:
        data = read_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    if "base" in data:  # a sweep file (a job spec has no `base`)
        return _validate_sweep(args.spec)
    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    from bulwark.contract.presets import family_of, preset_sources

    sources = preset_sources(spec)
    if sources:  # to stderr, like the data line: stdout stays the spec, for pipes
        print(f"preset {spec.recipe.preset} at ε = {spec.threat.epsilon:g} for "
              f"{spec.dataset.name} ({family_of(spec.dataset.name)} family values):",
              file=sys.stderr)
        for dotted, value, source in sources:
            print(f"  {dotted} = {value}\n      source: {source}", file=sys.stderr)
    return _data_line(spec)


def cmd_presets(args: argparse.Namespace) -> int:
    from bulwark.contract.presets import describe_presets, family_of

    rows = describe_presets(args.epsilon, dataset=args.dataset)
    cols = list(rows[0])
    widths = {c: max(len(c), *(len(r[c]) for r in rows)) for c in cols}
    print("  ".join(c.ljust(widths[c]) for c in cols).rstrip())
    for r in rows:
        print("  ".join(r[c].ljust(widths[c]) for c in cols).rstrip())
    print(f"(values at ε = {args.epsilon} for {args.dataset}, {family_of(args.dataset)} family; "
          "every field can be overridden in the spec; `bulwark validate SPEC` names the "
          "source of each value)")
    return 0


# ---------------------------------------------------------------------------------- service
def cmd_serve(args: argparse.Namespace) -> int:
    from bulwark.workers.client.serve import serve

    try:
        return serve(host=args.host, port=args.port, home=args.home, workers=args.workers,
                     device=args.device)
    except RuntimeError as e:  # another serve holds the folder; a child would not start
        return _fail(str(e))


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from bulwark.store.settings import get_settings
    from bulwark.workers.client.serve import worker_command

    devices = args.devices
    if args.device:
        os.environ["BULWARK_DEVICE"] = args.device
        if args.device.startswith("cuda:"):
            gpus = args.device.split(":", 1)[1]
            os.environ["CUDA_VISIBLE_DEVICES"] = gpus
            os.environ["BULWARK_DEVICE"] = "cuda"
            devices = devices or len(gpus.split(","))
    if devices is not None:
        if not 1 <= devices <= 64:
            return _fail(f"--devices must be 1 to 64, got {devices}")
        os.environ["BULWARK_WORKER_DEVICES"] = str(devices)  # it claims jobs that fit
    name = args.name or f"{(args.device or 'auto').replace(':', '').replace(',', '-')}@%h"
    cmd = worker_command(queue=args.queue or get_settings().queue, name=name)
    os.execvpe(cmd[0], cmd, dict(os.environ))
    return 0


def cmd_reaper(args: argparse.Namespace) -> int:
    import time

    from bulwark.store.lifecycle import Lifecycle
    from bulwark.store.settings import get_settings

    s = get_settings()
    lifecycle = Lifecycle.from_settings(s)
    lifecycle.store.migrate()
    print(f"reaper: every {s.reaper_interval_seconds:g} s, stale after "
          f"{s.stale_after_seconds:g} s", flush=True)
    while True:
        for job_id in lifecycle.reap(s):
            print(f"re-enqueued {job_id}", flush=True)
        if args.once:
            return 0
        time.sleep(s.reaper_interval_seconds)


def cmd_keys(args: argparse.Namespace) -> int:
    from bulwark.store.settings import get_settings
    from bulwark.store.store import Store, StoreError

    store = Store(get_settings().resolved_database_url())
    store.migrate()
    if args.keys_command == "create":
        print(store.create_api_key(args.tenant))
    elif args.keys_command == "list":
        keys = store.list_api_keys(args.tenant)
        for k in keys:
            print(f"{k.prefix}…  tenant {k.tenant_id:<16} created "
                  f"{k.created_at:%Y-%m-%d %H:%M}  {'revoked' if k.revoked else 'active'}")
        print(f"{len(keys)} keys")
    elif args.keys_command == "rotate":
        try:
            old, key = store.rotate_api_key(args.prefix)
        except StoreError as e:
            return _fail(str(e))
        print(key)
        print(f"(tenant {old.tenant_id}; {old.prefix}… is revoked)", file=sys.stderr)
    else:
        try:
            k = store.revoke_api_key(args.prefix)
        except StoreError as e:
            return _fail(str(e))
        print(f"revoked {k.prefix}… (tenant {k.tenant_id})")
    return 0


def _client(args: argparse.Namespace):
    from bulwark.workers.client.http import Client

    return Client(url=args.url, key=args.key)


def cmd_submit(args: argparse.Namespace) -> int:
    from bulwark.contract.spec import read_spec_file

    client = _client(args)  # the API validates the spec: its 422 names the field and range
    job = client.submit(read_spec_file(args.spec), idempotency_key=args.idempotency_key)
    print(f"job {job.id} {job.state}", flush=True)
    if not args.wait:
        return 0
    return follow(job)


def follow(job) -> int:
    """Follow a job's events with progress bars; print its report; exit 0 only on success."""
    info = job.wait(progress=True)
    print(f"job {job.id} {info.state}" + (f": {info.error}" if info.error else ""))
    if info.state == "succeeded":
        print(job.report().summary())
    return 0 if info.state == "succeeded" else 1


def cmd_jobs(args: argparse.Namespace) -> int:
    page = _client(args).job_list(state=args.state, limit=args.limit, offset=args.offset)
    for j in page.items:
        epoch = j.progress.get("epoch")
        what = j.name or j.spec.get("recipe", {}).get("preset") or "-"
        verdict = (j.verdict or {}).get("label") or ("-" if j.terminal else "")
        print(f"{j.id}  {j.state:<9}  {verdict:<24}  {j.created_at:%Y-%m-%d %H:%M:%S%z}  "
              f"{what}{f'  epoch {epoch}' if epoch and not j.terminal else ''}")
    print(f"{len(page.items)} of {page.total}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    print(job.info.model_dump_json(indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from bulwark.contract.artifacts import REPORT

    local = Path(args.job_id)
    if local.is_dir():  # a `bulwark run --out` folder
        if not (local / REPORT).is_file():
            return _fail(f"{local}: no {REPORT} (a finished `bulwark run` folder, or a job id)")
        data = json.loads((local / REPORT).read_text())
        print(json.dumps(data, indent=2) if args.json else _summary(data))
        return 0
    job = _client(args).job(args.job_id)
    print(json.dumps(job.report_json(), indent=2) if args.json else job.report().summary())
    return 0


def cmd_wait(args: argparse.Namespace) -> int:
    return follow(_client(args).job(args.job_id))


def cmd_cancel(args: argparse.Namespace) -> int:
    info = _client(args).job(args.job_id).cancel()
    print(f"job {info.id} {info.state}"
          f"{' (cancel requested)' if info.state == 'running' else ''}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    job = _client(args).job(args.job_id)
    job.delete()
    print(f"job {job.id} deleted")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    import shutil

    from bulwark.contract.artifacts import REPORT, WEIGHTS
    from bulwark.contract.export import robustbench_card
    from bulwark.workers.client.http import write_export

    out = Path(args.output)
    local = Path(args.job_id)
    if local.is_dir():  # a `bulwark run --out` folder
        if not (local / REPORT).is_file() or not (local / WEIGHTS).is_file():
            return _fail(f"{local}: no {REPORT} and {WEIGHTS} (a finished `bulwark run` "
                         "folder, or a job id)")
        import hashlib

        digest = hashlib.sha256((local / WEIGHTS).read_bytes()).hexdigest()
        card = robustbench_card(json.loads((local / REPORT).read_text()),
                                weights_sha256=digest)
        path = write_export(card, out, lambda dest: shutil.copyfile(local / WEIGHTS, dest)
                            if dest.resolve() != (local / WEIGHTS).resolve() else None)
    else:
        path = _client(args).job(args.job_id).export(out, args.format)
    print(f"model card: {path}\nweights: {out / WEIGHTS} (bulwark.load_model reads them)")
    return 0


def cmd_leaderboard(args: argparse.Namespace) -> int:
    from bulwark.contract.units import parse_epsilon

    eps = parse_epsilon(args.epsilon) if args.epsilon else None
    board = _client(args).leaderboard(dataset=args.dataset, norm=args.norm, epsilon=eps,
                                      metric=args.metric, radius=args.radius,
                                      limit=args.limit)
    if not board.items:
        print(f"no finished job has a {args.metric} figure"
              + (f" ({board.skipped} matching jobs lack it)" if board.skipped else ""))
        return 0
    from bulwark.contract.export import threat_of

    head = ("rank", "job", "name", "method", "metric", "robust", "clean", "n", "verdict",
            "suite", "seconds")
    groups: dict[tuple, list] = {}
    for r in board.items:
        groups.setdefault(threat_of(r.model_dump()), []).append(r)
    for (dataset, norm, eps), items in groups.items():
        print(f"{dataset} · {norm} ε = {eps:.4g}" + ("" if all(r.standard for r in items)
              else "  (not every row is AutoAttack standard on the whole test set)"))
        rows = [head] + [
            ("-" if r.rank is None else str(r.rank), r.job_id[:8], r.name or "-",
             r.method or "-", r.metric + (f" σ={r.sigma:g}" if r.sigma is not None else ""),
             f"{r.robust_acc:.4f}", f"{r.clean_acc:.4f}", str(r.n), r.verdict or "-",
             r.suite + ("" if r.standard else " *"),
             "-" if r.seconds is None else f"{r.seconds:.0f}") for r in items]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        for r in rows:
            print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip())
    print("ranked within each threat, robust verdicts only ('-': not robust, listed apart); "
          "* short of AutoAttack standard on the whole test set")
    if board.skipped:
        print(f"({board.skipped} matching jobs have no {args.metric} figure)")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    print(_client(args).job(args.job_id).download(args.name, args.output))
    return 0


def cmd_upload(args: argparse.Namespace) -> int:
    if args.model.endswith(".npz"):
        d = _client(args).upload_dataset(args.model)
        print(f"dataset {d.id} ({d.meta['train']} train / {d.meta['test']} test images of "
              f"{d.meta['shape']}, {d.meta['num_classes']} classes)")
        print(f'use it with: {{"dataset": {{"name": "npz", "path": "datasets/{d.id}"}}, ...}}')
        return 0
    m = _client(args).upload_model(args.model, arch=args.arch, num_classes=args.num_classes,
                                   in_channels=args.in_channels, image_size=args.image_size)
    print(f"model {m.id} ({m.arch}, {m.size} bytes, sha256 {m.sha256[:12]}…)")
    print(f'evaluate it with: {{"mode": "evaluate", "model": {{"arch": "{m.arch}", '
          f'"weights": "models/{m.id}"}}, ...}}')
    return 0


def build_parser() -> argparse.ArgumentParser:
    from bulwark.contract.artifacts import DOWNLOADABLE

    p = argparse.ArgumentParser(prog="bulwark", description="Adversarial-robustness training.",
                                epilog="A job id can be shortened to any unique prefix.")
    p.add_argument("--version", action="version", version=f"bulwark {_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job spec locally, no server")
    r.add_argument("spec", help="job spec file (.json, .yaml, .yml)")
    r.add_argument("--out", default=None, help="output folder for report, weights, checkpoint "
                   "(default: runs/SPEC, the spec file's name without its extension)")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    r.add_argument("--force", action="store_true", help="overwrite a previous run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    sw = sub.add_parser("sweep", help="run a sweep (a base spec x a grid) locally, resumable")
    sw.add_argument("sweep", help="sweep file (.yaml, .json): base, grid, variants")
    sw.add_argument("--out", default=None, help="folder for the children and sweep.json "
                                                "(default: the sweep file's `out`, else "
                                                "runs/SWEEP, the file's name without its "
                                                "extension)")
    sw.add_argument("--parallel", type=int, default=1, help="children run at once")
    sw.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    sw.add_argument("--threads", type=int, default=None,
                    help="CPU threads per child (default: the CPUs split between the children)")
    sw.add_argument("--only", action="append", metavar="GLOB",
                    help="run only the children whose name matches (repeatable), e.g. "
                         "'*epsilon=0.3*'")
    sw.add_argument("--dry-run", action="store_true", help="list the children and stop")
    sw.set_defaults(func=cmd_sweep)
    v = sub.add_parser("validate", help="check a spec (or every child of a sweep file) and "
                                        "print it with presets resolved")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)
    pr = sub.add_parser("presets", help="the named recipes with every part")
    pr.add_argument("--epsilon", default="8/255", help="ε to resolve per-ε values at (8/255)")
    pr.add_argument("--dataset", default="cifar10",
                    help="the dataset whose family's values to show (cifar10; mnist, svhn, ...)")
    pr.set_defaults(func=cmd_presets)

    sv = sub.add_parser("serve", help="embedded service: private Redis, API and a worker")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--home", default="bulwark-data", help="state folder (SQLite, artifacts)")
    sv.add_argument("--workers", type=int, default=1)
    sv.add_argument("--device", default=None, help="training device for the workers")
    sv.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="start a Celery worker for one device (or several)")
    w.add_argument("--device", default=None,
                   help="cpu, cuda:N or cuda:N,M,... (pins CUDA_VISIBLE_DEVICES)")
    w.add_argument("--devices", type=int, default=None,
                   help="devices one job may use here (default: the GPUs of --device, else 1); "
                        "the worker claims jobs whose compute.devices fits")
    w.add_argument("--queue", default=None)
    w.add_argument("--name", default=None)
    w.set_defaults(func=cmd_worker)
    rp = sub.add_parser("reaper", help="re-queue jobs whose worker stopped heartbeating")
    rp.add_argument("--once", action="store_true")
    rp.set_defaults(func=cmd_reaper)
    k = sub.add_parser("keys", help="API keys")
    ksub = k.add_subparsers(dest="keys_command", required=True)
    kc = ksub.add_parser("create", help="create an API key (printed once)")
    kc.add_argument("--tenant", default="default")
    kl = ksub.add_parser("list", help="list the keys (prefix, tenant, created, revoked)")
    kl.add_argument("--tenant", default=None)
    kr = ksub.add_parser("revoke", help="revoke a key by its prefix (as `keys list` shows)")
    kr.add_argument("prefix")
    kt = ksub.add_parser("rotate", help="a new key for the same tenant; the old one revoked")
    kt.add_argument("prefix")
    k.set_defaults(func=cmd_keys)

    def client_parser(name: str, help: str, func, job: bool = True,
                      epilog: str | None = None) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help, epilog=epilog,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        c.add_argument("--url", default=None,
                       help="API URL (default $BULWARK_URL, else http://127.0.0.1:8000)")
        c.add_argument("--key", default=None, help="API key (default $BULWARK_API_KEY, else "
                                                   "the key file of `bulwark serve`)")
        if job:
            c.add_argument("job_id", help="job id, or any unique prefix of it")
        c.set_defaults(func=func)
        return c

    c = client_parser("compare", "the runs of sweep folders or server sweeps side by side: a "
                      "table, compare.json and compare.html (figures)", cmd_compare, job=False)
    c.add_argument("sources", nargs="+", metavar="DIR|SWEEP_ID",
                   help="`bulwark sweep --out` folders, or ids of sweeps on the server")
    c.add_argument("--out", default=None,
                   help="folder for compare.json and compare.html (default: the one folder "
                        "given, else the current folder)")
    c.add_argument("--json", default=None, help="also write compare.json's content here")
    c.add_argument("--markdown", action="store_true",
                   help="also print the per-method table in Markdown (mean ± std over seeds)")
    c = client_parser("export", "a finished job (or a `bulwark run` folder) as a RobustBench "
                      "model card beside its weights", cmd_export)
    c.add_argument("--format", choices=["robustbench"], default="robustbench")
    c.add_argument("-o", "--output", default="export", help="folder to write into (export/)")
    c = client_parser("leaderboard", "the tenant's finished jobs ranked by robust accuracy",
                      cmd_leaderboard, job=False)
    c.add_argument("--dataset", default=None)
    c.add_argument("--norm", choices=["linf", "l2"], default=None)
    c.add_argument("--epsilon", default=None, help="e.g. 0.3 or 8/255")
    c.add_argument("--metric", choices=["autoattack", "pgd", "certified"], default="autoattack")
    c.add_argument("--radius", type=float, default=0.5, help="for --metric certified")
    c.add_argument("--limit", type=int, default=20)
    c = client_parser("submit-sweep", "submit a sweep to the API: one job per child",
                      cmd_submit_sweep, job=False)
    c.add_argument("sweep", help="sweep file (.yaml, .json); a base spec file beside it is read")
    c.add_argument("--wait", action="store_true", help="wait for every child, then the table")
    c = client_parser("cancel-sweep", "cancel every unfinished job of a sweep",
                      cmd_cancel_sweep, job=False)
    c.add_argument("sweep_id")
    c = client_parser("submit", "submit a job spec to the API", cmd_submit, job=False)
    c.add_argument("spec")
    c.add_argument("--wait", action="store_true", help="follow progress until it finishes")
    c.add_argument("--idempotency-key", default=None)
    c = client_parser("jobs", "list jobs", cmd_jobs, job=False)
    c.add_argument("--state", default=None)
    c.add_argument("--limit", type=int, default=50)
    c.add_argument("--offset", type=int, default=0)
    client_parser("status", "show a job", cmd_status)
    c = client_parser("report", "show a job's (or a `bulwark run` folder's) robustness report",
                      cmd_report)
    c.add_argument("--json", action="store_true")
    client_parser("wait", "follow a job until it finishes, then show its report", cmd_wait)
    client_parser("cancel", "cancel a queued or running job", cmd_cancel)
    client_parser("delete", "delete a finished job and its artifacts", cmd_delete)
    c = client_parser("download", "download an artifact of a job", cmd_download,
                      epilog=ARTIFACT_HELP)
    c.add_argument("name", choices=DOWNLOADABLE, metavar="NAME",
                   help="one of: " + ", ".join(DOWNLOADABLE))
    c.add_argument("-o", "--output", default=None, help="file or folder (default: NAME here)")
    c = client_parser("upload", "upload weights (.safetensors, for evaluation-only jobs) or a "
                      "dataset (.npz)", cmd_upload, job=False)
    c.add_argument("model", help="a .safetensors file, or an .npz dataset")
    c.add_argument("--arch", default=None, help="small_cnn, mnist_net, preact_resnet18 or "
                                                "wide_resnet (default: from the file's metadata)")
    c.add_argument("--num-classes", type=int, default=None)
    c.add_argument("--in-channels", type=int, default=None)
    c.add_argument("--image-size", type=int, default=None)
    return p


def _terminate_as_interrupt(signum, frame) -> None:
    raise KeyboardInterrupt  # SIGTERM stops a run or a sweep like Ctrl-C: checkpoints stay


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in ("run", "sweep"):
        import signal

        signal.signal(signal.SIGTERM, _terminate_as_interrupt)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `bulwark jobs | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # client and service errors: a message, not a traceback
        from bulwark.workers.client.http import ApiError, ConnectionFailed

        if isinstance(e, ApiError):
            return _fail(str(e), 1 if e.status < 500 else 3)
        if isinstance(e, ConnectionFailed):
            return _fail(str(e), 3)
        if isinstance(e, ValueError | OSError):
            return _fail(str(e))
        raise


def _version() -> str:
    from importlib import metadata

    try:
        return metadata.version("bulwark")
    except metadata.PackageNotFoundError:
        return "unknown"


ARTIFACT_HELP = """artifacts of a finished job:
  report.json         the robustness report (spec, environment, history, final suite)
  report.html         the same with plots, one self-contained page
  model.safetensors   the weights after the last epoch (metadata: arch, classes, shape)
  best.safetensors    the weights of the epoch with the best monitor PGD accuracy
  wa.safetensors      the weight-averaged model, when the recipe keeps one
  certify.tsv         per-point certification results (randomized smoothing jobs)"""


if __name__ == "__main__":
    sys.exit(main())
