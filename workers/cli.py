"""The ``bulwark`` command line.

    bulwark run SPEC.{json,yaml} --out DIR [--device cpu|cuda|auto] [--resume]
    bulwark validate SPEC         print the spec as it will run (presets resolved)
    bulwark presets               list the named presets

Errors in the spec or the data are printed as messages, never as tracebacks (exit code 2).
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
    from workers.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    out = Path(args.out)
    if (out / "report.json").exists() and not args.resume and not args.force:
        return _fail(f"{out} already holds a finished run (report.json); "
                     "choose another --out, or pass --force to overwrite")
    if (out / "checkpoint.pt").exists() and not args.resume and not args.force:
        return _fail(f"{out} holds a checkpoint of an unfinished run; pass --resume to continue "
                     "it or --force to start over")
    if args.force and not args.resume:
        for name in ("checkpoint.pt", "report.json", "model.safetensors"):
            (out / name).unlink(missing_ok=True)

    from workers.data import DataError
    from workers.runner import run_job

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
    from workers.spec import SpecError, load_spec_file

    try:
        spec = load_spec_file(args.spec)
    except SpecError as e:
        return _fail(str(e))
    print(json.dumps(spec.model_dump(mode="json"), indent=2))
    return 0


def cmd_presets(args: argparse.Namespace) -> int:
    from workers.presets import PRESETS

    for name, build in PRESETS.items():
        recipe = build(8.0)["recipe"]
        regs = ", ".join(r["kind"] for r in recipe["regularizers"]) or "-"
        print(f"{name:<16} adversary={recipe['adversary']['kind']:<8} "
              f"loss={recipe['loss']['kind']:<7} regularizers={regs}")
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
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
