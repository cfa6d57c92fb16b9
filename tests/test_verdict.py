"""The verdict beside a job's state: hand-made final figures with the label each rule gives,
the report and page a real run writes, and old reports read with a verdict."""

from __future__ import annotations

import pytest

from bulwark.contract.report import Report
from bulwark.contract.verdict import LABELS, verdict


def report(clean, fgsm=None, pgd=None, aa=None, n=1000, share=0.1, classes=10):
    attacks = {}
    if fgsm is not None:
        attacks["fgsm"] = {"acc": fgsm, "n": n}
    if pgd is not None:
        attacks["pgd50-10"] = {"acc": pgd, "n": n}
    if aa is not None:
        attacks["autoattack-standard"] = {"acc": aa, "n": n}
    return {"report_version": 1, "spec": {}, "environment": {}, "history": [], "events": [],
            "dataset": {"name": "mnist", "num_classes": classes, "train": 1, "validation": 0,
                        "test": n, "monitor": 0, "shape": [1, 28, 28],
                        **({"majority_share": share} if share is not None else {})},
            "final": {"clean_acc": clean, "n": n, "model": "last", "attacks": attacks}}


@pytest.mark.parametrize("figures, label", [
    # the README's CPU smoke run and the dashboard's default form, as the issue found them
    (dict(clean=0.092, fgsm=0.092, pgd=0.092), "chance"),
    (dict(clean=0.106, fgsm=0.106, pgd=0.106), "chance"),
    # 0.1 + 2·sqrt(0.1·0.9/1000) = 0.119: 0.118 is chance, 0.125 is not
    (dict(clean=0.118, fgsm=0.1, pgd=0.1), "chance"),
    (dict(clean=0.125, fgsm=0.12, pgd=0.12), "not_robust"),
    # AutoAttack 9 points under PGD: the attacks disagree
    (dict(clean=0.98, fgsm=0.98, pgd=0.98, aa=0.89), "gradient_masking"),
    (dict(clean=0.98, fgsm=0.70, pgd=0.80), "gradient_masking"),  # PGD above FGSM
    # plain FGSM on MNIST at ε = 0.3: PGD 0, FGSM ≈ clean
    (dict(clean=0.56, fgsm=0.559, pgd=0.0), "catastrophic_overfitting"),
    # ELLE on MNIST at ε = 0.3: PGD 0.01, FGSM 0.5 of clean 0.8 — under-trained, not CO
    (dict(clean=0.80, fgsm=0.51, pgd=0.01), "not_robust"),
    (dict(clean=0.90, fgsm=0.60, pgd=0.25), "not_robust"),
    (dict(clean=0.99, fgsm=0.95, pgd=0.86, aa=0.85), "robust"),
    (dict(clean=0.99, fgsm=0.95), "unverified"),
])
def test_each_rule_gives_its_label(figures, label):
    v = verdict(report(**figures))
    assert v["label"] == label, v
    assert v["label"] in LABELS and v["reason"]


def test_the_chance_level_is_the_largest_class_else_one_over_the_classes():
    assert verdict(report(0.30, 0.3, 0.3, share=0.28))["label"] == "chance"
    assert verdict(report(0.30, 0.3, 0.3, share=0.10))["label"] != "chance"
    assert verdict(report(0.52, 0.5, 0.5, share=None, classes=2))["label"] == "chance"


def test_an_old_report_is_read_with_a_verdict_and_a_new_one_keeps_its_own():
    old = Report.model_validate(report(0.56, 0.559, 0.0))
    assert old.verdict.label == "catastrophic_overfitting"
    assert old.summary().splitlines()[0].startswith("verdict          catastrophic_overfitting")
    kept = Report.model_validate({**report(0.56, 0.559, 0.0),
                                  "verdict": {"label": "robust", "reason": "as written"}})
    assert kept.verdict.label == "robust", "a report's own verdict is not recomputed"


def test_a_run_writes_its_verdict_the_chance_level_and_a_banner(tmp_path):
    import torch

    from bulwark.contract.spec import JobSpec
    from bulwark.workers.engine.data import load_dataset
    from bulwark.workers.engine.runner import run_job

    spec = JobSpec.model_validate({
        "dataset": {"name": "digits", "val_size": 64}, "threat": {"epsilon": 0.1},
        "recipe": "fgsm-rs", "schedule": {"epochs": 1, "batch_size": 64},
        "evaluation": {"monitor": {"size": 64, "pgd_steps": 2},
                       "final": {"n": 100, "pgd": {"steps": 2, "restarts": 1},
                                 "autoattack": None}}})
    r = run_job(spec, tmp_path, progress=False)
    y = load_dataset(spec.dataset).test_y[:100]
    assert r["dataset"]["majority_share"] == pytest.approx(
        float(torch.bincount(y).max()) / 100)
    assert r["verdict"] == verdict(r)
    page = (tmp_path / "report.html").read_text()
    assert f"data-verdict='{r['verdict']['label']}'" in page
    assert page.index("Verdict:") < page.index("Final evaluation"), "the banner comes first"


def test_the_attack_checks_allow_for_noise_and_for_a_pgd_that_cannot_reach_epsilon():
    """The dashboard's tiny jobs (64 images, PGD-2 at α = ε/4) were called gradient masking:
    PGD 0.750 against FGSM 0.73 — noise on 64 images, and two steps of ε/4 reach half of ε,
    where FGSM's one step reaches all of it. Neither is masking; 10 points on 1 000 images
    with PGD-50 is."""
    def with_pgd(r, steps, alpha=0.25):
        return {**r, "spec": {"evaluation": {"final": {"pgd": {"steps": steps,
                                                               "alpha": alpha}}}}}

    tiny = with_pgd(report(0.84, fgsm=0.73, pgd=0.75, n=64), steps=2)
    assert verdict(tiny)["label"] != "gradient_masking"
    reach = with_pgd(report(0.84, fgsm=0.60, pgd=0.75, n=1000), steps=2)
    assert verdict(reach)["label"] != "gradient_masking", "PGD-2 at ε/4 reaches ε/2"
    far = with_pgd(report(0.84, fgsm=0.60, pgd=0.75, n=1000), steps=50)
    assert verdict(far)["label"] == "gradient_masking"
    noisy_aa = report(0.9, fgsm=0.8, pgd=0.75, aa=0.69, n=64)  # 6 points on 64: noise
    assert verdict(noisy_aa)["label"] != "gradient_masking"
    assert verdict(report(0.9, fgsm=0.8, pgd=0.75, aa=0.69, n=10_000))["label"] == \
        "gradient_masking"
