from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from bulwark.workers.engine.models import (
    MNISTNet,
    Normalize,
    PreActResNet18,
    SmallCNN,
    WideResNet,
    build_model,
    count_parameters,
)

GRAY = dict(mean=(0.1307,), std=(0.3081,))
RGB = dict(mean=(0.4914, 0.4822, 0.4465), std=(0.2471, 0.2435, 0.2616))


def _build(arch, **kw):
    defaults = dict(num_classes=10, in_channels=3, image_size=32, **RGB)
    if arch in ("small_cnn", "mnist_net"):
        defaults.update(in_channels=1, image_size=8 if arch == "small_cnn" else 28, **GRAY)
    if arch == "wide_resnet":
        defaults.update(depth=10, widen_factor=1)
    defaults.update(kw)
    return build_model(arch, **defaults)


@pytest.mark.parametrize(
    "arch,shape,num_classes",
    [
        ("small_cnn", (3, 1, 8, 8), 10),
        ("small_cnn", (2, 1, 28, 28), 7),
        ("small_cnn", (2, 3, 4, 4), 10),
        ("mnist_net", (2, 1, 28, 28), 10),
        ("mnist_net", (2, 3, 32, 32), 10),
        ("mnist_net", (2, 1, 8, 8), 5),
        ("preact_resnet18", (2, 3, 32, 32), 10),
        ("wide_resnet", (2, 3, 32, 32), 100),
        ("wide_resnet", (2, 1, 16, 16), 10),
    ],
)
def test_output_shapes(arch, shape, num_classes):
    c, s = shape[1], shape[2]
    norm = GRAY if c == 1 else RGB
    model = _build(arch, num_classes=num_classes, in_channels=c, image_size=s, **norm).eval()
    x = torch.rand(shape)  # inputs are [0, 1] images
    with torch.no_grad():
        out = model(x)
    assert out.shape == (shape[0], num_classes)
    assert torch.isfinite(out).all()


def test_build_model_structure():
    model = _build("small_cnn")
    assert isinstance(model.normalize, Normalize)
    assert isinstance(model.net, SmallCNN)
    assert isinstance(_build("preact_resnet18").net, PreActResNet18)
    assert isinstance(_build("mnist_net").net, MNISTNet)
    wrn = _build("wide_resnet")
    assert isinstance(wrn.net, WideResNet)
    x = torch.rand(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), model.net(model.normalize(x)))


def test_normalize_matches_hand_computation():
    mean, std = RGB["mean"], RGB["std"]
    norm = Normalize(mean, std)
    x = torch.rand(2, 3, 5, 5)
    expected = torch.empty_like(x)
    for c in range(3):
        expected[:, c] = (x[:, c] - mean[c]) / std[c]
    torch.testing.assert_close(norm(x), expected)
    # non-persistent: follows .to() but stays out of the weights file
    assert norm.state_dict() == {}
    assert {n for n, _ in norm.named_buffers()} == {"mean", "std"}
    assert norm.to(torch.float64).mean.dtype == torch.float64


def test_bad_arguments_are_rejected():
    with pytest.raises(ValueError, match="unknown model arch 'resnet50'"):
        _build("resnet50")
    with pytest.raises(ValueError, match="6n\\+4"):
        _build("wide_resnet", depth=12)
    with pytest.raises(ValueError, match="one value per input channel"):
        _build("preact_resnet18", **GRAY)
    with pytest.raises(ValueError, match="image_size >= 4"):
        _build("small_cnn", image_size=3)
    with pytest.raises(ValueError, match="positive"):
        Normalize((0.5,), (0.0,))


def test_parameter_counts_match_reference_architectures():
    # fast_adversarial PreActResNet18 (with the final BatchNorm) on CIFAR-10
    assert count_parameters(_build("preact_resnet18")) == 11_172_170
    # TRADES SmallCNN (28x28 MNIST): unpadded convs, 4x4 maps before the classifier
    assert count_parameters(_build("small_cnn", image_size=28)) == (
        (1 * 9 + 1) * 32 + (32 * 9 + 1) * 32 + (32 * 9 + 1) * 64 + (64 * 9 + 1) * 64
        + (64 * 4 * 4 + 1) * 200 + (200 + 1) * 200 + (200 + 1) * 10
    )
    # Wong et al.'s mnist_net: conv4x4 1→16 and 16→32 (stride 2), fc 32·7·7→100→10
    assert count_parameters(_build("mnist_net")) == (
        (1 * 16 + 1) * 16 + (16 * 16 + 1) * 32 + (32 * 7 * 7 + 1) * 100 + (100 + 1) * 10)
    # WRN-16-2 (cheap stand-in for 28-10 / 34-10: same formula, n = 2)
    wrn = _build("wide_resnet", depth=16, widen_factor=2)
    expected = 3 * 9 * 16
    for cin, cout in [(16, 32), (32, 64), (64, 128)]:
        expected += cin * 9 * cout + cout * 9 * cout + cin * cout + 2 * cin + 2 * cout  # block 1
        expected += 2 * (cout * 9 * cout) + 4 * cout  # block 2
    expected += 2 * 128 + 128 * 10 + 10
    assert count_parameters(wrn) == expected
    model = _build("small_cnn")
    model.net.classifier[-1].requires_grad_(False)
    assert count_parameters(model, trainable_only=True) == count_parameters(model) - 200 * 10 - 10


@pytest.mark.parametrize("arch", ["small_cnn", "wide_resnet"])
def test_safetensors_round_trip(tmp_path, arch):
    torch.manual_seed(0)
    model = _build(arch)
    if arch == "wide_resnet":  # give BatchNorm non-trivial running statistics
        model.train()
        with torch.no_grad():
            model(torch.rand(4, 3, 32, 32))
    model.eval()
    path = tmp_path / "model.safetensors"
    save_file(model.state_dict(), str(path))
    state = load_file(str(path))
    assert all(k.startswith("net.") for k in state)  # normalization is not in the weights
    torch.manual_seed(1)
    fresh = _build(arch).eval()
    fresh.load_state_dict(state)
    c = 1 if arch == "small_cnn" else 3
    s = 8 if arch == "small_cnn" else 32
    x = torch.rand(3, c, s, s)
    with torch.no_grad():
        assert torch.equal(fresh(x), model(x))


def test_models_are_differentiable_wrt_inputs():
    model = _build("small_cnn").eval()
    x = torch.rand(2, 1, 8, 8, requires_grad=True)
    nn.functional.cross_entropy(model(x), torch.tensor([0, 1])).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
