"""How well does the catastrophic-overfitting alarm predict a run's outcome?

Every committed study run with a history is labelled by its *outcome*, from its final suite and
its training curves, without the watchdog's events or flags; the watchdog is then replayed over
the run's per-epoch monitor figures and its alarm compared with the label.

Outcome labels (the rule, in order), on the last model's final figures:
  chance     clean accuracy <= the largest class's share of the test set + 0.05
  robust     PGD accuracy >= 0.5 x FGSM accuracy: multi-step attacks find no much more than
             the single-step one
  co         catastrophic overfitting: PGD < 0.5 x FGSM while the model resists the
             single-step attack it trained on (FGSM >= 0.8 x clean): that attack no longer
             works, a multi-step one does (Wong et al. 2020; Kim et al. 2021)
  not_robust PGD < 0.5 x FGSM and FGSM < 0.8 x clean: the training attack still works
             (under-training, or a run that went astray in another way)
"Final" is the last model's final suite (the last epoch's monitor when only the best epoch
was evaluated). Runs the watchdog acted on (remediated, stopped early) are left out: their
outcome is not the one without intervention.

    python experiments/watchdog/measure.py [--json OUT]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
sys.path.insert(0, str(REPO))

MNIST_MAJORITY = 0.1135  # digit 1: 1135 of the 10 000 test images


def final_figures(report: dict) -> tuple[dict, str] | None:
    """(clean, fgsm, pgd) of the last model and where they come from."""
    models = report.get("final_models") or {}
    fin = models.get("last") if "last" in models else (
        report.get("final") if not models or "best" not in models else None)
    if fin is not None and fin.get("attacks"):
        att = fin["attacks"]
        pgd = next((a["acc"] for k, a in att.items() if k.startswith("pgd")), None)
        fgsm = (att.get("fgsm") or {}).get("acc")
        if pgd is not None and fgsm is not None:
            return {"clean": fin["clean_acc"], "fgsm": fgsm, "pgd": pgd}, "final suite"
    hist = report.get("history") or []
    mon = hist[-1].get("monitor") if hist else None
    if mon:
        return {"clean": mon["clean_acc"], "fgsm": mon["fgsm_acc"],
                "pgd": mon["pgd_acc"]}, "last monitor"
    return None


def label(report: dict) -> tuple[str, str]:
    got = final_figures(report)
    if got is None:
        return "unknown", "no figures"
    f, _src = got
    clean, fgsm, pgd = f["clean"], f["fgsm"], f["pgd"]
    if clean <= MNIST_MAJORITY + 0.05:
        return "chance", f"clean {clean:.3f}"
    if pgd >= 0.5 * fgsm:
        return "robust", f"PGD {pgd:.3f} >= 0.5 x FGSM {fgsm:.3f}"
    if fgsm >= 0.8 * clean:
        return "co", f"PGD {pgd:.3f} < 0.5 x FGSM {fgsm:.3f}, FGSM >= 0.8 x clean {clean:.3f}"
    return "not_robust", f"PGD {pgd:.3f} < 0.5 x FGSM {fgsm:.3f}, FGSM < 0.8 x clean {clean:.3f}"


def runs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO / "experiments").rglob("report.json")):
        report = json.loads(path.read_text())
        if not report.get("history") or report.get("remediations") or report.get("stopped_early"):
            continue
        out.append((str(path.parent.relative_to(REPO / "experiments")), report))
    return out


def half(name: str) -> str:
    """A fixed split: rules are designed on one half and checked on the other."""
    return "design" if hashlib.sha1(name.encode()).digest()[0] % 2 == 0 else "holdout"


def replay(report: dict, make) -> list[dict]:
    """The events a watchdog built by ``make(report)`` records over the run's history."""
    from workers.engine.runner import warmed_up

    dog = make(report)
    warm = (report["spec"].get("threat") or {}).get("epsilon_warmup", 0) or 0
    for h in report["history"]:
        if h.get("monitor") and warmed_up(h["epoch"], warm):
            dog.check(h["epoch"], {**h["monitor"], "train_acc": h.get("train_acc")})
    return dog.events


def current(report: dict):
    """The watchdog as it ships, at the run's co_drop / co_gap and today's other defaults."""
    from workers.engine.monitor import COWatchdog

    mon = report["spec"]["evaluation"]["monitor"]
    return COWatchdog(mon.get("co_drop", 0.5), mon.get("co_gap", 0.2))


def previous(report: dict):
    """The rule before this study: the alarm at the first check where the gap holds."""
    from workers.engine.monitor import COWatchdog

    mon = report["spec"]["evaluation"]["monitor"]
    return COWatchdog(mon.get("co_drop", 0.5), mon.get("co_gap", 0.2), co_patience=0.0,
                      co_rise=math.inf, co_resist=0.0, co_deep=0.0)


def score(rows: list[dict]) -> dict:
    tp = sum(r["alarm"] is not None and r["label"] == "co" for r in rows)
    fp = sum(r["alarm"] is not None and r["label"] in ("robust", "not_robust") for r in rows)
    fn = sum(r["alarm"] is None and r["label"] == "co" for r in rows)
    return {"tp": tp, "fp": fp, "fn": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()
    rows = []
    for name, report in runs():
        lab, why = label(report)
        events = replay(report, current)
        alarm = next((e["epoch"] for e in events if e["type"] == "catastrophic_overfitting"),
                     None)
        rows.append({"run": name, "half": half(name), "label": lab, "why": why,
                     "alarm": alarm, "adversary": report["spec"]["recipe"]["adversary"]["kind"],
                     "events": [(e["type"], e["epoch"]) for e in events]})
    from collections import Counter

    print(Counter((r["label"], r["alarm"] is not None) for r in rows))
    for part in ("design", "holdout", None):
        sel = [r for r in rows if part is None or r["half"] == part]
        print(part or "all", len(sel), score(sel))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
