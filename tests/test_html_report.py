"""report.html renders the report's data, escapes it, and marks catastrophic overfitting."""

from __future__ import annotations

import base64
import re

import pytest

from bulwark.workers.engine.html_report import (
    certified_curve,
    certified_points,
    epsilon_text,
    render,
)
from tests.helpers import history_row, report_doc


def report(**over) -> dict:
    hist = [history_row(e, train_loss=2.0 / e, train_acc=0.2 * e,
                        monitor={"clean_acc": 0.5, "fgsm_acc": 0.4, "pgd_acc": p, "n": 64})
            for e, p in ((1, 0.30), (2, 0.35), (3, 0.05))]
    base = report_doc(
        spec={"name": "<script>alert(1)</script>", "dataset": {"name": "mnist"},
              "model": {"arch": "small_cnn"}, "threat": {"norm": "linf", "epsilon": 0.1},
              "recipe": {"preset": "fgsm"}},
        history=hist,
        events=[{"type": "catastrophic_overfitting", "epoch": 3, "pgd_acc": 0.05,
                 "fgsm_acc": 0.4}],
        final={"clean_acc": 0.9123, "n": 100, "attacks": {"pgd50-10": {"acc": 0.4567,
                                                                        "n": 100}}},
        selection={"epoch": 2, "monitor_pgd_acc": 0.35, "last_monitor_pgd_acc": 0.05,
                   "robust_generalization_gap": 0.30},
        certification=None,
        timing={"train": 1.5})
    base.update(over)
    return base


def figures(page: str) -> list[str]:
    """The SVG documents of the page's figures."""
    return [base64.b64decode(b).decode() for b in
            re.findall(r'src="data:image/svg\+xml;base64,([A-Za-z0-9+/=]+)"', page)]


def test_report_page_has_figures_tables_and_escapes():
    page = render(report())
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "0.9123" in page and "0.4567" in page and "pgd50-10" in page
    svgs = figures(page)
    assert len(svgs) == 2, "training curves and the monitor (no method traces in this run)"
    assert all(s.lstrip().startswith("<?xml") and "<svg" in s for s in svgs)
    assert "Catastrophic overfitting at epoch(s) 3" in page
    assert "catastrophic_overfitting" in page, "the events table"
    assert "http" not in page.replace("http://www.w3.org", ""), "self-contained: no URLs"


def test_the_final_table_names_the_epoch_each_model_comes_from():
    res = report()["final"]
    page = render(report(final_models={"last": res, "best": res}))
    assert "<th>last model (epoch 3)</th>" in page and "<th>best model (epoch 2)</th>" in page
    page = render(report(final_models={"best": res}, selection={**report()["selection"],
                                                                 "epoch": 1}))
    assert "<th>best model (epoch 1)</th>" in page and "epoch 2)" not in page
    assert "<th>last model</th>" in render(report(history=[], selection=None))


def test_a_recovery_is_marked_and_told_from_a_lasting_collapse():
    recovered = report(events=[
        {"type": "catastrophic_overfitting", "epoch": 1, "pgd_acc": 0.08, "fgsm_acc": 0.7},
        {"type": "co_recovered", "epoch": 2, "onset_epoch": 1, "pgd_acc": 0.35,
         "fgsm_acc": 0.4}])
    page = render(recovered)
    assert "Catastrophic overfitting at epoch(s) 1 (red dashed lines); recovered at epoch(s) 2" \
        in page and "still overfit" not in page
    monitor = figures(page)[1]
    assert "recovered" in monitor and "#7f7f7f" in monitor, "a grey line in the monitor figure"
    hist = report()["history"]
    hist[-1]["catastrophic_overfitting"] = True
    assert "still overfit at the last epoch" in render(report(history=hist))


def test_one_epoch_and_evaluation_only_jobs_render():
    one = report(history=report()["history"][:1], events=[], selection=None)
    svgs = figures(render(one))
    assert len(svgs) == 2
    # a single epoch is drawn as markers (matplotlib writes each marker as a <use> element)
    assert all("<use" in s for s in svgs)
    ev = report(history=[], events=[], selection=None,
                spec={**report()["spec"], "mode": "evaluate"})
    page = render(ev)
    assert figures(page) == [] and "evaluation-only job" in page and "0.9123" in page


def test_method_traces_get_their_own_panels():
    hist = report()["history"]
    for h in hist:
        h["metrics"] = {"elle_e_lin": 1e-5 * h["epoch"], "elle_lambda": 4000.0,
                        "loss_main": 1.0}
    svgs = figures(render(report(history=hist)))
    assert len(svgs) == 3
    assert "E_lin" in svgs[2] and "λ" in svgs[2]


def test_certified_step_curve_from_per_point_radii():
    tsv = ("idx\tlabel\tpredict\tradius\tcorrect\ttime\n"
           "0\t1\t1\t0.5\t1\t0.1\n1\t2\t2\t0.25\t1\t0.1\n"
           "2\t3\t4\t0.9\t0\t0.1\n3\t1\t-1\t0.0\t0\t0.1\n")
    pts = certified_points(tsv)
    assert pts == [(0.5, True), (0.25, True), (0.9, False), (0.0, False)]
    # at r: the fraction of the 4 points correct with radius >= r
    assert certified_curve(pts) == ([0.0, 0.25, 0.5], [0.5, 0.5, 0.25])
    cert = {"sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001, "num_points": 4,
            "acr": 0.1875, "abstain_rate": 0.25, "radii": [0.0, 0.25, 0.5],
            "certified_accuracy": [0.5, 0.5, 0.25],
            "empirical": {"acc": 0.4, "n": 4, "eps": 0.5}}
    page = render(report(certification=cert, history=[], events=[], selection=None), tsv)
    (svg,) = figures(page)
    assert "ACR 0.188" in svg
    assert "ACR 0.1875" in page and "Smoothed-classifier PGD" in page


@pytest.mark.parametrize("eps,norm,text", [(8 / 255, "linf", "8/255 (0.03137)"),
                                           (0.3, "linf", "0.3"), (0.5, "l2", "0.5"),
                                           (0.25, "linf", "0.25"), (16 / 255, "l2", "0.06275")])
def test_epsilon_as_people_write_it(eps, norm, text):
    assert epsilon_text(eps, norm) == text


def test_attacks_that_disagree_as_masking_makes_them_are_flagged():
    """A stronger attack must find what a weaker one finds (Carlini et al. 2019): AutoAttack
    5+ points under PGD, or PGD above FGSM, is flagged in the summary and on the page."""
    from bulwark.contract.report import Report

    def final(fgsm, pgd, aa):
        return {"clean_acc": 0.95, "n": 100, "attacks": {
            "fgsm": {"acc": fgsm, "n": 100}, "pgd50-10": {"acc": pgd, "n": 100},
            "autoattack-apgd-ce+apgd-t": {"acc": aa, "n": 100}}}

    masked = report(final=final(0.89, 0.86, 0.0))
    page = render(masked)
    assert "AutoAttack finds 86.0 points more than pgd50-10 (0.860 → 0.000)" in page
    assert "class='co warnings'" in page
    agree = report(final=final(0.90, 0.884, 0.881))
    assert "warnings" not in render(agree)
    inverted = report(final=final(0.30, 0.50, 0.49))
    assert "finds less than one FGSM step" in render(inverted)
    edge = report(final=final(0.9, 0.80, 0.751))  # 4.9 points: within the margin
    assert "warnings" not in render(edge)
    full = {**masked, "final_models": {}, "environment": {}, "dataset": {
        "name": "mnist", "num_classes": 10, "train": 1, "validation": 0, "test": 100,
        "monitor": 64, "shape": [1, 28, 28]}}
    for row in full["history"]:
        row.update(lr=0.1, seconds=1.0, train_seconds=1.0)
    lines = Report.model_validate(full).summary().splitlines()
    assert sum(ln.startswith("warning: AutoAttack finds 86.0 points") for ln in lines) == 1


def test_the_gpu_studys_gradalign_at_eps_02_is_flagged_and_elle_is_not():
    import json
    from pathlib import Path

    from bulwark.contract.report import Report

    runs = Path(__file__).resolve().parents[1] / "experiments/mnist-gpu/runs"
    masked = Report.model_validate(json.loads(
        (runs / "fgsm-gradalign_epsilon=0.2_seed=0/report.json").read_text()))
    assert masked.final.warnings() and "0.862 → 0.000" in masked.final.warnings()[0]
    clean = Report.model_validate(json.loads(
        (runs / "fgsm-elle_epsilon=0.1_seed=0/report.json").read_text()))
    assert clean.final.warnings() == []


def test_the_masking_check_is_drawn_and_said_on_the_real_masked_run():
    """experiments/mnist-masking: GradAlign at ε = 0.1 flagged at epoch 3 while it trained;
    its page draws PGD on DLR beside PGD on cross-entropy and says what the gap means. The
    healthy ε = 0.2 run draws the curve and says nothing."""
    import json
    from pathlib import Path

    runs = Path(__file__).resolve().parents[1] / "experiments/mnist-masking/runs"
    masked = json.loads((runs / "fgsm-gradalign_epsilon=0.1_seed=0/report.json").read_text())
    page = render(masked)
    assert "Gradient masking suspected from epoch(s) 3:" in page
    assert "gradient_masking" in page and "PGD (DLR)" in page, "the events table"
    monitor = figures(page)[1]
    assert "PGD on DLR" in monitor and "#9467bd" in monitor
    healthy = render(json.loads(
        (runs / "fgsm-gradalign_epsilon=0.2_seed=0/report.json").read_text()))
    assert "Gradient masking suspected" not in healthy and "PGD on DLR" in figures(healthy)[1]
    old = render(report())  # a report from before the check: no DLR curve, no note
    assert "PGD on DLR" not in figures(old)[1] and "Gradient masking" not in old
