"""The RobustBench model card and the leaderboard: a real (tiny) run exported and loaded back,
and the ranking rule against hand-made reports."""

from __future__ import annotations

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch

import bulwark
from bulwark.contract.export import leaderboard_row, rank, robustbench_card
from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.runner import run_job
from tests.cli import CLI
from tests.helpers import report_doc

REPO = Path(__file__).resolve().parents[1]


def _report(name, aa, clean, pgd=None, cert=None, seconds=10.0, norm="linf", eps=0.3):
    attacks = {"pgd20-1": {"acc": pgd if pgd is not None else aa, "n": 100}}
    if aa is not None:
        attacks["autoattack-standard"] = {"acc": aa, "n": 100}
    return report_doc(
        spec={"name": name, "dataset": {"name": "mnist"}, "model": {"arch": "small_cnn"},
              "threat": {"norm": norm, "epsilon": eps}, "recipe": {"preset": "n-aaer"}},
        dataset={"test": 100},
        final={"clean_acc": clean, "n": 100, "model": "last", "attacks": attacks},
        certification=cert, timing={"total": seconds})


def test_leaderboard_ranks_by_robust_then_clean_then_time():
    reports = [_report("a", 0.40, 0.90), _report("b", 0.55, 0.80), _report("c", 0.40, 0.95),
               _report("d", None, 0.99, pgd=0.1), _report("e", 0.40, 0.95, seconds=5.0)]
    rows = [r for r in (leaderboard_row(x) for x in reports) if r is not None]
    assert [r["name"] for r in rank(rows)] == ["b", "e", "c", "a"], "d has no AutoAttack"
    assert [r["rank"] for r in rank(rows)] == [1, 2, 3, 4]
    pgd = rank([leaderboard_row(x, "pgd") for x in reports])
    assert pgd[0]["name"] == "b" and pgd[0]["metric"] == "pgd20-1" and len(pgd) == 5
    assert pgd[-1]["name"] == "d" and pgd[-1]["rank"] is None, "PGD 0.1: not robust, apart"
    assert all(r["standard"] for r in rank(rows)), "AutoAttack standard on all 100 images"
    cert = {"radii": [0.0, 0.25, 0.5, 1.0], "certified_accuracy": [0.9, 0.7, 0.5, 0.1],
            "sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001, "num_points": 100,
            "acr": 0.4, "abstain_rate": 0.05}
    row = leaderboard_row(_report("s", None, 0.9, pgd=0.3, cert=cert), "certified", radius=0.6)
    assert (row["metric"], row["robust_acc"]) == ("certified@0.5", 0.5)
    assert (row["radius"], row["sigma"]) == (0.5, 0.25), "a certified figure carries both"
    with pytest.raises(ValueError, match="metric"):
        leaderboard_row(reports[0], "bogus")


def test_the_leaderboard_ranks_within_one_threat_and_only_robust_verdicts():
    """The issue's case: an ℓ2 smoothing-style model and a model at chance among ℓ∞ ones.
    Each threat (dataset, norm, ε) is its own ranking; a model at chance or overfit is listed
    apart, unranked, never above a robust one."""
    reports = [_report("linf-a", 0.40, 0.90), _report("linf-b", 0.55, 0.80),
               _report("chance", 0.11, 0.112),  # everything at the largest class's share
               _report("l2", 0.90, 0.95, norm="l2", eps=0.5),
               _report("eps0.1", 0.93, 0.98, eps=0.1)]
    board = rank([leaderboard_row(x) for x in reports])
    order = [(r["norm"], r["epsilon"], r["name"], r["rank"]) for r in board]
    assert order == [("l2", 0.5, "l2", 1), ("linf", 0.1, "eps0.1", 1),
                     ("linf", 0.3, "linf-b", 1), ("linf", 0.3, "linf-a", 2),
                     ("linf", 0.3, "chance", None)]
    assert board[-1]["verdict"] == "chance"
    few = _report("few", 0.5, 0.9)
    short = dict(few, dataset={**few["dataset"], "test": 10_000})
    assert leaderboard_row(short)["standard"] is False, "100 of 10 000 images"
    # a figure on the validation slice chose a setting: it is never ranked, however robust
    chosen = _report("chosen", 0.97, 0.99)
    chosen["spec"]["evaluation"] = {"final": {"split": "validation"}}
    board = rank([leaderboard_row(x) for x in [*reports[:2], chosen]])
    assert [(r["name"], r["rank"], r["split"]) for r in board] == [
        ("linf-b", 1, "test"), ("linf-a", 2, "test"), ("chosen", None, "validation")]
    assert board[-1]["verdict"] == "robust" and board[-1]["standard"] is False


def test_a_real_run_exports_a_robustbench_card_and_its_weights_load_back(tmp_path):
    spec = JobSpec.model_validate({
        "name": "tiny digits", "dataset": {"name": "digits", "val_size": 64},
        "threat": {"epsilon": "8/255"}, "recipe": "fgsm",
        "schedule": {"epochs": 1, "batch_size": 64},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 64, "pgd": {"steps": 3, "restarts": 1},
                                 "autoattack": {"version": "apgd-ce"}}}})
    run = tmp_path / "run"
    report = run_job(spec, run, progress=False)
    out = tmp_path / "export"
    proc = subprocess.run([*CLI, "export", str(run),
                           "-o", str(out)], capture_output=True, text=True, timeout=120,
                          cwd=REPO)
    assert proc.returncode == 0, proc.stderr
    card = json.loads((out / "tiny-digits.json").read_text())
    assert card == robustbench_card(report, weights_sha256=card["weights"]["sha256"])
    for field in ("link", "name", "authors", "additional_data", "number_forward_passes",
                  "dataset", "venue", "architecture", "eps", "clean_acc", "reported",
                  "autoattack_acc"):
        assert field in card, f"RobustBench's {field}"
    assert card["eps"] == "8/255" and card["threat_model"] == "Linf"
    assert card["clean_acc"] == f"{100 * report['final']['clean_acc']:.2f}"
    assert card["autoattack_acc"] == \
        f"{100 * report['final']['attacks']['autoattack-apgd-ce']['acc']:.2f}"
    weights = out / "model.safetensors"
    assert card["weights"]["sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    model, original = bulwark.load_model(weights), bulwark.load_model(run / "model.safetensors")
    x = torch.rand(8, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), original(x))
    assert isinstance(model, torch.nn.Module) and not model.training
