"""The gradient-masking check: the DLR loss against torchattacks' own, its invariances, the
monitor's PGD on DLR seeing through a saturated softmax that stalls PGD on cross-entropy (with
the unscaled model, whose decisions are the same, as the oracle), and the watchdog's event."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits
from torch import nn
from torchattacks import APGD

from bulwark.attacks import PGD, dlr
from bulwark.contract.report import Report
from bulwark.workers.engine.monitor import COWatchdog, monitor


def test_dlr_matches_torchattacks_apgd_loss():
    """torchattacks' APGD carries Croce & Hein's DLR as ``dlr_loss`` (independent code)."""
    g = torch.Generator().manual_seed(0)
    z = torch.randn(64, 10, generator=g, dtype=torch.float64) * 3
    y = torch.randint(0, 10, (64,), generator=g)
    y[:16] = z[:16].argmax(1)  # both branches: the label on top and below it
    ours = dlr(z, y).double()
    theirs = APGD.dlr_loss(None, z.float(), y).double()
    assert (z[:16].argmax(1) == y[:16]).all() and (z[16:].argmax(1) != y[16:]).any()
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)


def test_dlr_is_invariant_to_the_logits_shift_and_scale():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(32, 10, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    torch.testing.assert_close(dlr(z * 1e3 + 7.0, y), dlr(z, y), rtol=1e-4, atol=1e-5)
    # negative when the label wins (the margin over the runner-up), positive when it loses
    assert ((dlr(z, y) < 0) == (z.argmax(1) == y)).all()


class Scaled(nn.Module):
    """The same classifier with its logits multiplied: same decisions, saturated softmax."""

    def __init__(self, net: nn.Module, scale: float):
        super().__init__()
        self.net, self.scale = net, scale

    def forward(self, x):
        return self.net(x) * self.scale


@pytest.fixture(scope="module")
def digits_model():
    """A softmax-regression model on scikit-learn's real 8x8 digits (pixels in [0, 1])."""
    d = load_digits()
    x = torch.tensor(d.data / 16.0, dtype=torch.float32).view(-1, 1, 8, 8)
    y = torch.tensor(d.target)
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    opt = torch.optim.Adam(net.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        nn.functional.cross_entropy(net(x[:1500]), y[:1500]).backward()
        opt.step()
    return net.eval(), x[1500:], y[1500:]


def test_monitor_pgd_on_dlr_sees_through_a_saturated_softmax(digits_model):
    net, x, y = digits_model
    kw = {"eps": 0.1, "norm": "linf", "steps": 10, "alpha": 0.25, "batch_size": 128,
          "dlr_pgd": True}
    torch.manual_seed(0)
    plain = monitor(net, x, y, **kw)
    torch.manual_seed(0)
    masked = monitor(Scaled(net, 1e4), x, y, **kw)
    assert plain["clean_acc"] == masked["clean_acc"] > 0.8  # the same decisions
    # the plain model: PGD on cross-entropy is no weaker than on DLR (no false alarm)
    assert plain["pgd_acc"] - plain["dlr_acc"] < 0.05
    assert plain["pgd_acc"] < plain["clean_acc"] - 0.2, "ε must be large enough to matter"
    # the scaled one: cross-entropy's gradient is exactly zero on the confident points, so
    # PGD-CE stalls near clean accuracy, while PGD on DLR finds the plain model's weakness
    assert masked["pgd_acc"] > plain["pgd_acc"] + 0.2
    assert abs(masked["dlr_acc"] - plain["dlr_acc"]) < 0.05
    assert masked["pgd_acc"] - masked["dlr_acc"] >= 0.2


def test_monitor_leaves_dlr_out_when_off_or_with_two_classes(digits_model):
    net, x, y = digits_model
    kw = {"eps": 0.1, "norm": "linf", "steps": 2, "alpha": 0.25, "batch_size": 128}
    assert "dlr_acc" not in monitor(net, x, y, **kw)
    two = nn.Sequential(nn.Flatten(), nn.Linear(64, 2))
    assert "dlr_acc" not in monitor(two, x, (y > 4).long(), dlr_pgd=True, **kw)


def test_pgd_accepts_dlr_as_its_objective(digits_model):
    net, x, y = digits_model
    x_adv = PGD(Scaled(net, 1e4), 0.1, alpha=0.025, steps=10, objective=dlr)(x, y)
    assert (x_adv - x).abs().max() <= 0.1 + 1e-6 and x_adv.min() >= 0 and x_adv.max() <= 1


def mon(clean, fgsm, pgd, dlr_acc=None):
    out = {"clean_acc": clean, "fgsm_acc": fgsm, "pgd_acc": pgd, "n": 1000}
    return out if dlr_acc is None else {**out, "dlr_acc": dlr_acc}


def test_watchdog_records_gradient_masking_once_a_stretch():
    """GradAlign at ε = 0.1 on MNIST kept its monitor PGD at 0.93-0.98 while APGD found 7
    points less; here the DLR figure opens a stretch at epoch 2, which lasts through epoch 3,
    ends at 4 and opens again at 5."""
    w = COWatchdog(mask_gap=0.05)
    seq = [mon(0.95, 0.88, 0.86, 0.85), mon(0.95, 0.94, 0.93, 0.80), mon(0.96, 0.95, 0.94, 0.70),
           mon(0.96, 0.95, 0.94, 0.92), mon(0.97, 0.96, 0.96, 0.85)]
    flags = [w.check(e, x) for e, x in enumerate(seq, start=1)]
    assert flags == [False] * 5, "masking is no catastrophic overfitting"
    assert [(e["type"], e["epoch"]) for e in w.events] == [
        ("gradient_masking", 2), ("gradient_masking", 5)]
    assert w.events[0]["pgd_acc"] == 0.93 and w.events[0]["dlr_acc"] == 0.80
    # the check's state survives a resume: a stretch open at the checkpoint is not re-announced
    w2 = COWatchdog(mask_gap=0.05)
    for e, x in enumerate(seq[:2], start=1):
        w2.check(e, x)
    w3 = COWatchdog(mask_gap=0.05)
    w3.load_state_dict(w2.state_dict())
    w3.check(3, seq[2])
    assert [e["epoch"] for e in w3.events] == [2]
    # off, or without a DLR figure: nothing
    for w4, x in ((COWatchdog(mask_gap=None), seq[1]), (COWatchdog(mask_gap=0.05),
                                                         mon(0.95, 0.94, 0.93))):
        w4.check(1, x)
        assert w4.events == []


def test_report_summary_names_the_masking_event():
    event = {"type": "gradient_masking", "epoch": 3, "pgd_acc": 0.94, "dlr_acc": 0.7,
             "fgsm_acc": 0.95, "clean_acc": 0.96, "rule": "pgd_acc - dlr_acc >= 0.05"}
    report = Report.model_validate({
        "report_version": 1, "spec": {}, "environment": {},
        "dataset": {"name": "mnist", "num_classes": 10, "train": 1, "validation": 0, "test": 1,
                    "monitor": 0, "shape": [1, 28, 28]},
        "history": [], "events": [event],
        "final": {"clean_acc": 0.9, "n": 1, "model": "last", "attacks": {}}})
    assert "event: gradient masking? at epoch 3: PGD 0.940 on cross-entropy, 0.700 on DLR" in \
        report.summary()
    assert np.isclose(report.events[0].dlr_acc, 0.7)


def test_the_check_flags_a_real_masked_model_as_apgd_on_dlr_does():
    """GradAlign (λ 8) on the full MNIST at ε = 0.1, retrained from the study's spec
    (experiments/mnist/runs/fgsm-gradalign_epsilon=0.1_seed=0): its softmax saturated from
    epoch 3 (adversarial CE 0.3 → 44, cosine 0.98 → 0.02) and its monitor PGD-10 ended at 0.977.
    On real test images the check opens a gap of ≥ 5 points, and torchattacks' APGD (the
    oracle) agrees: on DLR it finds what PGD on DLR finds, on cross-entropy it stalls too."""
    from bulwark.contract.spec import DatasetSpec
    from bulwark.workers.engine.checkpoint import load_weights, weights_metadata
    from bulwark.workers.engine.data import load_dataset
    from bulwark.workers.engine.models import build_model

    path = "tests/data/gradalign-masked-mnist.safetensors"
    meta = weights_metadata(path)
    model = build_model("mnist_net", num_classes=10, in_channels=1, image_size=28,
                        mean=tuple(json.loads(meta["mean"])), std=tuple(json.loads(meta["std"])))
    load_weights(path, model).eval()
    data = load_dataset(DatasetSpec(name="mnist", test_limit=500))
    x, y = data.test_x[:500].float().div(255), data.test_y[:500]
    torch.manual_seed(0)
    m = monitor(model, x, y, eps=0.1, norm="linf", steps=10, alpha=0.25, batch_size=250,
                dlr_pgd=True)
    assert m["clean_acc"] > 0.95 and m["pgd_acc"] > 0.95
    assert m["pgd_acc"] - m["dlr_acc"] >= 0.05
    w = COWatchdog(mask_gap=0.05)
    w.check(5, m)
    assert [e["type"] for e in w.events] == ["gradient_masking"]

    def apgd(loss: str) -> float:
        x_adv = APGD(model, eps=0.1, steps=50, loss=loss, seed=0)(x, y)
        with torch.no_grad():
            return (model(x_adv).argmax(1) == y).float().mean().item()

    assert abs(apgd("dlr") - m["dlr_acc"]) < 0.04
    assert apgd("ce") > m["dlr_acc"] + 0.05
