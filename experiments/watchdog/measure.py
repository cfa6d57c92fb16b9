"""How well does the catastrophic-overfitting alarm predict a run's outcome?

Every committed study run with a history is labelled by its *outcome*, from its final suite and
its training curves, without the watchdog's events or flags; the watchdog is then replayed over
the run's per-epoch monitor figures and its alarm compared with the label.

Outcome labels: the verdict a report gets (contract/verdict.py; docs/methods.md, "Verdicts"),
from the last model's final figures alone, read as
  co          catastrophic_overfitting: PGD < 0.5 x FGSM while FGSM >= 0.8 x clean (the
              single-step attack no longer works, a multi-step one does; Wong et al. 2020,
              Kim et al. 2021)
  robust      robust
  not_robust  not_robust or unverified (under-training: FGSM still fools the model; or
              robustness within 0.1 of chance)
  chance      chance (a constant prediction): left out of precision and recall, counted apart
  masking     gradient_masking (the final attack checks disagree): left out, counted apart
The last model's final suite (the last epoch's monitor when only the best epoch was
evaluated). Runs the watchdog acted on (remediated, stopped early) are left out: their outcome
is not the one without intervention.

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

LABELS = {"catastrophic_overfitting": "co", "robust": "robust", "not_robust": "not_robust",
          "unverified": "not_robust", "chance": "chance", "gradient_masking": "masking"}


def last_model(report: dict) -> dict | None:
    """The report with ``final`` the last model's result: the outcome without early stopping
    (None when only the best epoch was evaluated; the last epoch's monitor stands in then)."""
    models = report.get("final_models") or {}
    if "last" in models:
        return {**report, "final": models["last"]}
    if not models or "best" not in models:
        return report
    mon = (report.get("history") or [{}])[-1].get("monitor")
    if not mon:
        return None
    return {**report, "final": {"clean_acc": mon["clean_acc"], "n": mon["n"], "attacks": {
        "fgsm": {"acc": mon["fgsm_acc"]}, "pgd-monitor": {"acc": mon["pgd_acc"]}}}}


_SHARES: dict[tuple[str, int], float] = {}


def with_chance_level(report: dict) -> dict:
    """A report written before runs recorded ``dataset.majority_share`` gets its dataset's
    (MNIST's first 1 000 test images: 0.126; all 10 000: 0.1135), as a new run records it."""
    data = report.get("dataset") or {}
    if data.get("majority_share") is not None:
        return report
    n = report["final"].get("n") or data.get("test")
    key = (data.get("name"), n)
    if key not in _SHARES:
        from bulwark.contract.spec import DatasetSpec
        from bulwark.workers.engine.data import load_dataset
        from bulwark.workers.engine.reporting import majority_share

        _SHARES[key] = majority_share(load_dataset(DatasetSpec(name=key[0])).test_y, n)
    return {**report, "dataset": {**data, "majority_share": _SHARES[key]}}


def label(report: dict) -> tuple[str, str]:
    """The run's outcome: the product's own verdict (contract/verdict.py) on its last model."""
    from bulwark.contract.verdict import verdict

    last = last_model(report)
    if last is None:
        return "unknown", "no figures"
    v = verdict(with_chance_level(last))
    return LABELS[v["label"]], v["reason"]


def hindsight_onset(report: dict) -> int | None:
    """The epoch from which the monitor shows the FGSM-PGD gap at every epoch's end to the
    last (PGD < 0.5 x FGSM, FGSM - PGD >= 0.2): where the lasting collapse began, seen from
    the end. None when the last epoch shows no gap."""
    onset = None
    for h in report.get("history") or []:
        m = h.get("monitor")
        gap = bool(m) and m["pgd_acc"] < 0.5 * m["fgsm_acc"] and m["fgsm_acc"] - m["pgd_acc"] >= 0.2
        onset = (onset or h["epoch"]) if gap else None
    return onset


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
    """The events a watchdog built by ``make(report)`` records over the run's history (its
    probes too, where the run had them)."""
    from bulwark.contract.report import probe_time
    from bulwark.workers.engine.runner import warmed_up

    dog = make(report)
    warm = (report["spec"].get("threat") or {}).get("epsilon_warmup", 0) or 0
    for h in report["history"]:  # the probes within the epoch, then its end, as in training
        for p in h.get("probes") or []:
            t = probe_time(p)
            if warmed_up(t, warm):
                dog.check(t, p)
        if h.get("monitor") and warmed_up(h["epoch"], warm):
            dog.check(h["epoch"], h["monitor"])
    return dog.events


def current(report: dict):
    """The watchdog as it ships, at the run's co_drop / co_gap and today's other defaults."""
    from bulwark.workers.engine.monitor import COWatchdog

    mon = report["spec"]["evaluation"]["monitor"]
    return COWatchdog(mon.get("co_drop", 0.5), mon.get("co_gap", 0.2))


def previous(report: dict):
    """The rule before this study: the alarm at the first check where the gap holds."""
    from bulwark.workers.engine.monitor import COWatchdog

    mon = report["spec"]["evaluation"]["monitor"]
    return COWatchdog(mon.get("co_drop", 0.5), mon.get("co_gap", 0.2), co_patience=0.0,
                      co_rise=math.inf, co_resist=0.0, co_deep=0.0)


def score(rows: list[dict]) -> dict:
    lags = sorted(r["alarm_at"] - r["onset"] for r in rows
                  if r["alarm"] is not None and r["label"] == "co" and r["onset"] is not None)
    tp = sum(r["alarm"] is not None and r["label"] == "co" for r in rows)
    fp = sum(r["alarm"] is not None and r["label"] in ("robust", "not_robust") for r in rows)
    fn = sum(r["alarm"] is None and r["label"] == "co" for r in rows)
    return {"runs": len(rows), "co": tp + fn, "tp": tp, "fp": fp, "fn": fn,
            "precision": round(tp / (tp + fp), 3) if tp + fp else None,
            "recall": round(tp / (tp + fn), 3) if tp + fn else None,
            "alarms_on_chance": sum(r["alarm"] is not None and r["label"] == "chance"
                                    for r in rows),
            # epochs from the lasting gap's first epoch (seen from the end) to the alarm
            "lag_median": lags[len(lags) // 2] if lags else None,
            "lag_range": [round(lags[0], 2), round(lags[-1], 2)] if lags else None}


CONFIRM_SEEDS = ("seed=5", "seed=6", "seed=7", "seed=8", "seed=9")


def part(name: str) -> str:
    """The runs made for this study apart — ``targets`` (quickstart.yaml, seeds 0-4, where the
    patience within the epoch was chosen) and ``confirm`` (seeds 5-9, run after) — and the
    committed studies split in two halves."""
    if name.startswith("watchdog/"):
        return "confirm" if name.endswith(CONFIRM_SEEDS) else "targets"
    return half(name)


def measure(make) -> list[dict]:
    rows = []
    for name, report in runs():
        lab, why = label(report)
        events = replay(report, make)
        alarm = next((e for e in events if e["type"] == "catastrophic_overfitting"), None)
        spec = report["spec"]
        rows.append({"run": name, "part": part(name), "label": lab, "why": why,
                     "alarm": alarm["epoch"] if alarm else None,
                     "alarm_at": alarm.get("at_epoch", alarm["epoch"]) if alarm else None,
                     "onset": hindsight_onset(report),
                     "adversary": spec["recipe"]["adversary"]["kind"],
                     "epsilon": spec["threat"]["epsilon"],
                     "events": [(e["type"], e.get("at_epoch", e["epoch"])) for e in events]})
    return rows


def table(rows: list[dict]) -> dict:
    out = {p: score([r for r in rows if r["part"] == p])
           for p in ("design", "holdout", "targets", "confirm")}
    out["all"] = score(rows)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", help="write every run's label and alarm here")
    args = ap.parse_args()
    results = {}
    for name, make in (("previous", previous), ("current", current)):
        rows = measure(make)
        results[name] = {"score": table(rows), "rows": rows}
        print(f"{name} rule")
        for p, sc in results[name]["score"].items():
            print(f"  {p:<8} {sc}")
        fgsm = [r for r in rows if r["adversary"] == "fgsm" and r["epsilon"] == 0.3
                and r["run"].startswith(("watchdog/", "quickstart/runs-mnist-net/"))
                and "/fgsm_" in r["run"]]
        print("  plain FGSM (quick start spec) alarmed at epoch:",
              [r["alarm"] for r in fgsm])
        rs = [r for r in rows if r["run"].startswith("watchdog/") and "fgsm-rs" in r["run"]]
        print("  FGSM-RS (quick start spec) alarms:", [r["alarm"] for r in rs],
              "labels:", [r["label"] for r in rs])
        wrong = [r for r in rows if (r["alarm"] is not None) != (r["label"] == "co")
                 and r["label"] != "chance"]
        print(f"  wrong: {len(wrong)}")
        for r in wrong if name == "current" else []:
            print(f"    {r['part']:<8} {r['label']:<10} alarm {r['alarm']}  {r['run']}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
