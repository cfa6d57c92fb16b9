"""The cost estimate against an independent measurement (torch's FlopCounterMode), and the
API's refusal of absurd work before anything is queued."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from bulwark.contract.cost import check_limits, estimate, forward_gflop
from bulwark.contract.spec import JobSpec
from bulwark.workers.engine.models import build_model


@pytest.mark.parametrize("arch, channels, side, extra", [
    ("small_cnn", 1, 28, {}), ("small_cnn", 3, 32, {}), ("small_cnn", 1, 8, {}),
    ("mnist_net", 1, 28, {}), ("mnist_net", 3, 32, {}),
    ("preact_resnet18", 3, 32, {}), ("preact_resnet18", 1, 28, {}),
    ("wide_resnet", 3, 32, {"depth": 28, "widen_factor": 10}),
    ("wide_resnet", 3, 32, {"depth": 16, "widen_factor": 4}),
    ("wide_resnet", 3, 32, {"depth": 40, "widen_factor": 2}),
])
def test_forward_flops_within_a_factor_of_two_of_the_measurement(arch, channels, side, extra):
    spec = JobSpec.model_validate({"model": {"arch": arch, **extra}})
    model = build_model(arch, num_classes=10, in_channels=channels, image_size=side,
                        mean=[0.5] * channels, std=[0.25] * channels, **extra).eval()
    with FlopCounterMode(display=False) as counter:
        model(torch.rand(1, channels, side, side))
    measured = counter.get_total_flops() / 1e9
    ratio = forward_gflop(spec, channels, side) / measured
    assert 0.5 <= ratio <= 2.0, (measured, ratio)


def test_phases_add_up_by_hand():
    spec = JobSpec.model_validate({
        "dataset": {"name": "mnist", "train_limit": 2024, "val_size": 24},
        "recipe": "fgsm", "schedule": {"epochs": 2},
        "evaluation": {"monitor": {"size": 24, "pgd_steps": 10},
                       "final": {"n": 100, "models": ["last"],
                                 "pgd": {"steps": 5, "restarts": 2},
                                 "autoattack": None}}})
    g = forward_gflop(spec, 1, 28)
    cost = estimate(spec)
    assert cost.phases["training"] == pytest.approx(2 * 2000 * (3 + 3) * g / 1e3)
    assert cost.phases["monitor"] == pytest.approx(2 * 24 * (1 + 3 + 30) * g / 1e3)
    assert cost.phases["evaluation"] == pytest.approx(100 * (1 + 3 + 30) * g / 1e3)
    assert cost.dataset_bytes == (2024 + 10_000) * 28 * 28


def test_absurd_work_is_refused_and_paper_scale_work_is_not():
    limits = {"max_job_tflop": 2e7, "max_dataset_bytes": 16 * 2**30}
    paper = JobSpec.model_validate({
        "dataset": {"name": "cifar10"}, "model": {"arch": "wide_resnet", "depth": 34},
        "recipe": "trades-awp", "evaluation": {"final": {"autoattack": {"version": "standard"}}}})
    assert check_limits(estimate(paper), limits) is None
    huge = JobSpec.model_validate({
        "dataset": {"name": "cifar10"},
        "model": {"arch": "wide_resnet", "depth": 70, "widen_factor": 20},
        "evaluation": {"final": {"pgd": {"steps": 10_000, "restarts": 100}}}})
    msg = check_limits(estimate(huge), limits)
    assert msg and "TFLOP" in msg and "evaluation" in msg
    big_data = JobSpec.model_validate({"dataset": {"name": "synthetic", "synthetic": {
        "n_train": 1_000_000, "channels": 3, "image_size": 256}}})
    assert "GiB on the device" in check_limits(estimate(big_data), limits)
