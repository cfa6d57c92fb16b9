"""The ``bulwark`` command line.

Local, no server:
    bulwark run SPEC.{json,yaml} --out DIR [--device cpu|cuda|auto] [--resume]
    bulwark validate SPEC         print the spec as it will run (presets resolved)
    bulwark presets               list the named presets
Service:
    bulwark serve                 embedded: private Redis + API + one worker, SQLite
    bulwark worker [--device D]   a Celery worker for one device (production)
    bulwark reaper                re-queue jobs whose worker stopped heartbeating
    bulwark keys create [--tenant T]
Client (BULWARK_URL, BULWARK_API_KEY; embedded mode's key is read from bulwark-data/api_key):
    bulwark submit SPEC [--wait]  bulwark jobs   bulwark status ID   bulwark report ID
    bulwark cancel ID             bulwark download ID NAME [-o PATH]   bulwark delete ID

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
    f = report["final"]
    lines = [f"clean accuracy   {f['clean_acc']:.4f}  (n={f['n']})"]
    for name, r in f["attacks"].items():
        lines.append(f"{name:<16} {r['acc']:.4f}  (n={r['n']})")
    for e in report["events"]:
        lines.append(f"event: {e['type']} at epoch {e['epoch']} "
                     f"(pgd {e['pgd_acc']:.3f}, fgsm {e['fgsm_acc']:.3f})")
    return "\n".join(lines)


def cmd_run(args: argparse.Namespace) -> int:
    from contract.artifacts import CHECKPOINT, REPORT, RUN_OUTPUTS
    from contract.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    out = Path(args.out)
    if (out / REPORT).exists() and not args.resume and not args.force:
        return _fail(f"{out} already holds a finished run (report.json); "
                     "choose another --out, or pass --force to overwrite")
    if (out / CHECKPOINT).exists() and not args.resume and not args.force:
        return _fail(f"{out} holds a checkpoint of an unfinished run; pass --resume to continue "
                     "it or --force to start over")
    if args.force and not args.resume:
        for name in RUN_OUTPUTS:
            (out / name).unlink(missing_ok=True)

    from workers.engine.data import DataError
    from workers.engine.runner import run_job

    try:
        report = run_job(spec, out, device=args.device, resume=args.resume,
                         progress=not args.quiet)
    except (DataError, ValueError) as e:
        return _fail(str(e))
    except KeyboardInterrupt:
        return _fail(f"interrupted; continue with: bulwark run {args.spec} --out {out} --resume",
                     130)
    print(_summary(report))
    print(f"report: {out / 'report.json'}\nweights: {out / 'model.safetensors'}")
    return 0


def cmd_validate(args: argparse.Namespace) -> int:
    from contract.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from contract.presets import PRESETS

    for name, build in PRESETS.items():
        recipe = build(8.0)["recipe"]
        regs = ", ".join(r["kind"] for r in recipe["regularizers"]) or "-"
        print(f"{name:<16} adversary={recipe['adversary']['kind']:<8} "
              f"loss={recipe['loss']['kind']:<7} regularizers={regs}")
    return 0


# ---------------------------------------------------------------------------------- service
def cmd_serve(args: argparse.Namespace) -> int:
    from workers.jobs.serve import serve

    return serve(host=args.host, port=args.port, home=args.home, workers=args.workers,
                 device=args.device)


def cmd_worker(args: argparse.Namespace) -> int:
    import os

    from service.settings import get_settings
    from workers.jobs.serve import worker_command

    if args.device:
        os.environ["BULWARK_DEVICE"] = args.device
        if args.device.startswith("cuda:"):
            os.environ["CUDA_VISIBLE_DEVICES"] = args.device.split(":", 1)[1]
            os.environ["BULWARK_DEVICE"] = "cuda"
    name = args.name or f"{(args.device or 'auto').replace(':', '')}@%h"
    cmd = worker_command(queue=args.queue or get_settings().queue, name=name)
    os.execvpe(cmd[0], cmd, dict(os.environ))
    return 0


def cmd_reaper(args: argparse.Namespace) -> int:
    import time

    from service.app import reap_once
    from service.events import Events
    from service.settings import get_settings
    from service.store import Store

    s = get_settings()
    store = Store(s.resolved_database_url())
    store.migrate()
    events = Events.from_settings(s)
    print(f"reaper: every {s.reaper_interval_seconds:g} s, stale after "
          f"{s.stale_after_seconds:g} s", flush=True)
    while True:
        for job_id in reap_once(store, s, events):
            print(f"re-enqueued {job_id}", flush=True)
        if args.once:
            return 0
        time.sleep(s.reaper_interval_seconds)


def cmd_keys(args: argparse.Namespace) -> int:
    from service.settings import get_settings
    from service.store import Store

    store = Store(get_settings().resolved_database_url())
    store.migrate()
    print(store.create_api_key(args.tenant))
    return 0


def _client(args: argparse.Namespace):
    from workers.client.http import Client

    return Client(url=args.url, key=args.key)


def cmd_submit(args: argparse.Namespace) -> int:
    from contract.spec import read_spec_file

    client = _client(args)  # the API validates the spec: its 422 names the field and range
    job = client.submit(read_spec_file(args.spec), idempotency_key=args.idempotency_key)
    print(f"job {job['id']} {job['state']}", flush=True)
    if not args.wait:
        return 0
    return follow(client, job["id"])


def follow(client, job_id: str) -> int:
    """Follow a job's event stream with a progress bar; exit 0 only if it succeeded."""
    import time

    import httpx

    bar, state, last_id, failures = None, None, None, 0
    while state is None:
        try:
            for event_id, kind, data in client.events(job_id, last_id):
                last_id, failures = event_id or last_id, 0
                bar, state = _show_event(job_id, kind, data, bar)
            break
        except httpx.TransportError:  # reconnect and resume from the last event id
            failures += 1
            if failures > 5:
                raise
            time.sleep(min(2.0 * failures, 10.0))
    job = client.job(job_id)
    state = state or job["state"]
    print(f"job {job_id} {state}")
    if state == "succeeded":
        print(_summary(client.report(job_id)))
    return 0 if state == "succeeded" else 1


def _show_event(job_id: str, kind: str, data: dict, bar):
    """Update the progress bar with one event; returns (bar, terminal state or None)."""
    from tqdm import tqdm

    state = None
    if kind == "started" and bar is None:
        bar = tqdm(total=data.get("epochs"), initial=data.get("start_epoch", 0),
                   unit="epoch", desc=job_id[:8], dynamic_ncols=True)
    elif kind == "epoch" and bar is not None:
        bar.update(1)
        mon = data.get("monitor") or {}
        if mon:
            bar.set_postfix(clean=f"{mon['clean_acc']:.3f}", pgd=f"{mon['pgd_acc']:.3f}")
    elif kind == "phase" and bar is not None:
        bar.set_description(f"{job_id[:8]} {data.get('phase')}")
    elif kind in ("succeeded", "failed", "cancelled"):
        state = kind
        if bar is not None:
            bar.close()
        if kind == "failed":
            print(f"job {job_id} failed: {data.get('error')}", file=sys.stderr)
    return bar, state


def cmd_jobs(args: argparse.Namespace) -> int:
    page = _client(args).jobs(state=args.state, limit=args.limit, offset=args.offset)
    for j in page["items"]:
        epoch = (j["progress"] or {}).get("epoch")
        print(f"{j['id']}  {j['state']:<9}  {j['created_at'][:19]}  "
              f"{j['name'] or j['spec'].get('recipe', {}).get('preset') or '-'}"
              f"{f'  epoch {epoch}' if epoch else ''}")
    print(f"{len(page['items'])} of {page['total']}")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_client(args).job(args.job_id), indent=2))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    report = _client(args).report(args.job_id)
    print(json.dumps(report, indent=2) if args.json else _summary(report))
    return 0


def cmd_cancel(args: argparse.Namespace) -> int:
    job = _client(args).cancel(args.job_id)
    print(f"job {job['id']} {job['state']}"
          f"{' (cancel requested)' if job['state'] == 'running' else ''}")
    return 0


def cmd_delete(args: argparse.Namespace) -> int:
    _client(args).delete(args.job_id)
    print(f"job {args.job_id} deleted")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    from pathlib import Path

    dest = Path(args.output or args.name)
    _client(args).download(args.job_id, args.name, dest)
    print(dest)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bulwark", description="Adversarial-robustness training.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run a job spec locally, no server")
    r.add_argument("spec", help="job spec file (.json, .yaml, .yml)")
    r.add_argument("--out", required=True, help="output folder for report, weights, checkpoint")
    r.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (default)")
    r.add_argument("--resume", action="store_true", help="continue from the last checkpoint")
    r.add_argument("--force", action="store_true", help="overwrite a previous run in --out")
    r.add_argument("--quiet", action="store_true", help="no progress bar")
    r.set_defaults(func=cmd_run)
    v = sub.add_parser("validate", help="check a spec and print it with presets resolved")
    v.add_argument("spec")
    v.set_defaults(func=cmd_validate)
    pr = sub.add_parser("presets", help="list the named recipes")
    pr.set_defaults(func=cmd_presets)

    sv = sub.add_parser("serve", help="embedded service: private Redis, API and a worker")
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--home", default="bulwark-data", help="state folder (SQLite, artifacts)")
    sv.add_argument("--workers", type=int, default=1)
    sv.add_argument("--device", default=None, help="training device for the workers")
    sv.set_defaults(func=cmd_serve)
    w = sub.add_parser("worker", help="start a Celery worker for one device")
    w.add_argument("--device", default=None, help="cpu, cuda:N (pins CUDA_VISIBLE_DEVICES)")
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
    kc.set_defaults(func=cmd_keys)

    def client_parser(name: str, help: str, func, job: bool = True) -> argparse.ArgumentParser:
        c = sub.add_parser(name, help=help)
        c.add_argument("--url", default=None, help="API URL (default $BULWARK_URL)")
        c.add_argument("--key", default=None, help="API key (default $BULWARK_API_KEY)")
        if job:
            c.add_argument("job_id")
        c.set_defaults(func=func)
        return c

    c = client_parser("submit", "submit a job spec to the API", cmd_submit, job=False)
    c.add_argument("spec")
    c.add_argument("--wait", action="store_true", help="follow progress until it finishes")
    c.add_argument("--idempotency-key", default=None)
    c = client_parser("jobs", "list jobs", cmd_jobs, job=False)
    c.add_argument("--state", default=None)
    c.add_argument("--limit", type=int, default=50)
    c.add_argument("--offset", type=int, default=0)
    client_parser("status", "show a job", cmd_status)
    c = client_parser("report", "show a job's robustness report", cmd_report)
    c.add_argument("--json", action="store_true")
    client_parser("cancel", "cancel a queued or running job", cmd_cancel)
    client_parser("delete", "delete a finished job and its artifacts", cmd_delete)
    c = client_parser("download", "download an artifact of a job", cmd_download)
    c.add_argument("name", help="report.json or model.safetensors")
    c.add_argument("-o", "--output", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except BrokenPipeError:  # `bulwark jobs | head`: the reader left; not an error
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as e:  # client and service errors: a message, not a traceback
        from workers.client.http import ApiError

        if isinstance(e, ApiError):
            return _fail(str(e), 1 if e.status < 500 else 3)
        import httpx

        if isinstance(e, httpx.TransportError):
            return _fail(f"cannot reach the API ({e}); is `bulwark serve` running?", 3)
        if isinstance(e, ValueError | OSError):
            return _fail(str(e))
        raise


if __name__ == "__main__":
    sys.exit(main())
