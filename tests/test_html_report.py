"""report.html renders the report's data, escapes it, and marks catastrophic overfitting."""

from __future__ import annotations

import re

from workers.engine.html_report import line_chart, render


def report(**over) -> dict:
    hist = [{"epoch": e, "train_loss": 2.0 / e, "train_acc": 0.2 * e,
             "monitor": {"clean_acc": 0.5, "fgsm_acc": 0.4, "pgd_acc": p, "n": 64}}
            for e, p in ((1, 0.30), (2, 0.35), (3, 0.05))]
    base = {
        "report_version": 1,
        "spec": {"name": "<script>alert(1)</script>", "dataset": {"name": "mnist"},
                 "model": {"arch": "small_cnn"}, "threat": {"norm": "linf", "epsilon": 0.1},
                 "recipe": {"preset": "fgsm"}},
        "history": hist,
        "events": [{"type": "catastrophic_overfitting", "epoch": 3, "pgd_acc": 0.05,
                    "fgsm_acc": 0.4}],
        "final": {"clean_acc": 0.9123, "n": 100, "attacks": {"pgd50-10": {"acc": 0.4567,
                                                                           "n": 100}}},
        "final_models": None,
        "selection": {"epoch": 2, "monitor_pgd_acc": 0.35, "last_monitor_pgd_acc": 0.05,
                      "robust_generalization_gap": 0.30},
        "certification": None,
        "timing": {"train": 1.5},
    }
    base.update(over)
    return base


def test_report_page_has_figures_plots_and_escapes():
    page = render(report())
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "0.9123" in page and "0.4567" in page and "pgd50-10" in page
    assert page.count("<svg") == 2
    assert "Catastrophic overfitting at epoch(s) 3" in page
    (marker,) = re.findall(r'class="co-marker" x1="([\d.]+)"', page)
    # epochs 1..3 map linearly onto [PAD, W - PAD] = [40, 520]: epoch 3 is the right edge
    assert float(marker) == 520.0


def test_certification_plot_when_certified():
    cert = {"sigma": 0.25, "n0": 100, "n": 1000, "alpha": 0.001, "num_points": 40,
            "acr": 0.31, "abstain_rate": 0.1, "radii": [0.0, 0.25, 0.5],
            "certified_accuracy": [0.8, 0.6, 0.2]}
    page = render(report(certification=cert, history=[], events=[], selection=None))
    assert page.count("<svg") == 1 and "certified accuracy vs radius" in page
    assert "ACR 0.3100" in page


def test_line_chart_maps_points_linearly():
    svg = line_chart("t", [0, 1, 2], {"a": [0.0, 0.5, 1.0]}, y_max=1.0)
    (points,) = re.findall(r'points="([^"]+)"', svg)
    xy = [tuple(map(float, p.split(","))) for p in points.split()]
    assert xy == [(40.0, 180.0), (280.0, 110.0), (520.0, 40.0)]
    assert line_chart("empty", [], {}) == ""
