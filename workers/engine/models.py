"""Model zoo: TRADES SmallCNN, Wong et al.'s MNIST net, PreAct ResNet-18 and WideResNet, each
behind a normalization layer.

Every model built here takes images in [0, 1] and returns logits. Per-dataset normalization
(``(x - mean) / std``) is the first layer *inside* the model, so attacks (torchattacks assumes
[0, 1] inputs and never checks) and the ε-ball always live in pixel space.

``build_model`` returns a :class:`NormalizedNet` with two children, ``.normalize`` and ``.net``.
The normalization constants are registered as non-persistent buffers: they follow
``model.to(device)`` but are not part of ``state_dict()``, so a safetensors checkpoint holds
only the learned parameters and the BatchNorm statistics (keys ``net.*``). The mean and std
come from the job spec when the model is rebuilt, never from the weights file.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from bulwark.contract.spec import ARCHS


# ------------------------------------------------------------------------------ normalization
class Normalize(nn.Module):
    """``(x - mean) / std`` with one mean/std per channel (inputs are NCHW).

    ``mean`` and ``std`` are non-persistent buffers (see the module docstring).
    """

    mean: torch.Tensor
    std: torch.Tensor

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        mean_t = torch.as_tensor(tuple(float(m) for m in mean), dtype=torch.float32)
        std_t = torch.as_tensor(tuple(float(s) for s in std), dtype=torch.float32)
        if mean_t.ndim != 1 or mean_t.numel() == 0 or mean_t.shape != std_t.shape:
            raise ValueError(
                f"mean and std must be non-empty sequences of equal length, "
                f"got {len(mean_t)} and {len(std_t)}"
            )
        if not bool(torch.all(std_t > 0)) or not bool(torch.all(torch.isfinite(mean_t))):
            raise ValueError(f"std must be positive and mean finite, got mean={mean}, std={std}")
        self.register_buffer("mean", mean_t.view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", std_t.view(1, -1, 1, 1), persistent=False)

    @property
    def num_channels(self) -> int:
        return self.mean.shape[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std

    def extra_repr(self) -> str:
        mean = tuple(round(v, 4) for v in self.mean.flatten().tolist())
        std = tuple(round(v, 4) for v in self.std.flatten().tolist())
        return f"mean={mean}, std={std}"


class NormalizedNet(nn.Module):
    """``net(normalize(x))``: takes [0, 1] images, returns logits."""

    def __init__(self, normalize: Normalize, net: nn.Module) -> None:
        super().__init__()
        self.normalize = normalize
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.normalize(x))


# ---------------------------------------------------------------------------------- SmallCNN
class SmallCNN(nn.Module):
    """The TRADES small CNN (4 conv + 3 fc).

    conv3x3(32)-ReLU-conv3x3(32)-ReLU-maxpool2-conv3x3(64)-ReLU-conv3x3(64)-ReLU-maxpool2-
    fc200-ReLU-fc200-ReLU-fc(num_classes). For inputs of 20x20 and more the convolutions are
    unpadded exactly as in TRADES (28x28 → 64x4x4 features, ~2x fewer FLOPs than padded);
    smaller inputs (8x8 sklearn digits) use padding 1 so the two pools still fit. Unlike TRADES
    there is no dropout and no zero-initialized last layer; PyTorch's default init is used.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(
                f"SmallCNN needs image_size >= 4 (two 2x2 max-pools), got {image_size}"
            )
        pad = 0 if image_size >= 20 else 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 32, 3, padding=pad),
            nn.ReLU(),
            nn.Conv2d(32, 32, 3, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=pad),
            nn.ReLU(),
            nn.Conv2d(64, 64, 3, padding=pad),
            nn.ReLU(),
            nn.MaxPool2d(2),
        )
        lost = 4 * (1 - pad)  # two unpadded 3x3 convs before each pool lose 4 pixels
        side = ((image_size - lost) // 2 - lost) // 2
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * side * side, 200),
            nn.ReLU(),
            nn.Linear(200, 200),
            nn.ReLU(),
            nn.Linear(200, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# --------------------------------------------------------------------------------- MNISTNet
class MNISTNet(nn.Module):
    """The MNIST network of Wong et al. 2020 (locuslab/fast_adversarial, MNIST/mnist_net.py;
    Wong & Kolter 2018's small convolutional net): conv4x4(16, stride 2, pad 1)-ReLU-
    conv4x4(32, stride 2, pad 1)-ReLU-fc100-ReLU-fc(num_classes). 28x28 → 32x7x7 features;
    about 1/16 of SmallCNN's FLOPs. PyTorch's default init, as in their code."""

    def __init__(self, num_classes: int = 10, in_channels: int = 1, image_size: int = 28) -> None:
        super().__init__()
        if image_size < 4:
            raise ValueError(f"MNISTNet needs image_size >= 4 (two stride-2 convs), "
                             f"got {image_size}")
        side = image_size
        for _ in range(2):
            side = (side + 2 - 4) // 2 + 1
        self.features = nn.Sequential(
            nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, 32, 4, stride=2, padding=1),
            nn.ReLU(),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(32 * side * side, 100),
            nn.ReLU(),
            nn.Linear(100, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


# ---------------------------------------------------------------------------- PreActResNet18
class PreActBlock(nn.Module):
    """Pre-activation basic block (He et al. 2016), as in fast_adversarial / ELLE."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut: nn.Module | None = None
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, 1, stride=stride, bias=False)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet18(nn.Module):
    """PreAct ResNet-18 for 32x32 inputs (global average pooling, so other sizes work too)."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.in_planes = 64
        self.conv1 = nn.Conv2d(in_channels, 64, 3, stride=1, padding=1, bias=False)
        self.layer1 = self._make_layer(64, 2, stride=1)
        self.layer2 = self._make_layer(128, 2, stride=2)
        self.layer3 = self._make_layer(256, 2, stride=2)
        self.layer4 = self._make_layer(512, 2, stride=2)
        self.bn = nn.BatchNorm2d(512 * PreActBlock.expansion)
        self.linear = nn.Linear(512 * PreActBlock.expansion, num_classes)

    def _make_layer(self, planes: int, num_blocks: int, stride: int) -> nn.Sequential:
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(PreActBlock(self.in_planes, planes, s))
            self.in_planes = planes * PreActBlock.expansion
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        # == F.avg_pool2d(out, 4) of the reference for 32x32 inputs (4x4 final maps).
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


# -------------------------------------------------------------------------------- WideResNet
class WideBasicBlock(nn.Module):
    """The TRADES/AWP WideResNet basic block (pre-activation, optional dropout)."""

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.conv_shortcut: nn.Module | None = None
        if not self.equal_in_out:
            self.conv_shortcut = nn.Conv2d(
                in_planes, out_planes, 1, stride=stride, padding=0, bias=False
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.equal_in_out:
            out = F.relu(self.bn1(x))
            shortcut = x
        else:
            # the reference pre-activates x itself and feeds it to both branches
            x = F.relu(self.bn1(x))
            out = x
            assert self.conv_shortcut is not None
            shortcut = self.conv_shortcut(x)
        out = F.relu(self.bn2(self.conv1(out)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = self.conv2(out)
        return shortcut + out


class WideResNet(nn.Module):
    """WRN-depth-widen_factor (Zagoruyko & Komodakis 2016), the TRADES/AWP version.

    ``depth = 6n + 4`` (e.g. 28, 34); widths 16, 16k, 32k, 64k. Conv weights are drawn from
    N(0, 2 / (k*k*out_channels)) as in the reference, BatchNorm starts at (1, 0) and the
    linear bias at 0. The unused ``sub_block1`` of the TRADES file is left out, and global
    average pooling replaces ``avg_pool2d(8)`` (identical for 32x32 inputs).
    """

    def __init__(
        self,
        depth: int = 28,
        widen_factor: int = 10,
        num_classes: int = 10,
        in_channels: int = 3,
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(
                f"WideResNet depth must be 6n+4 with n >= 1 (e.g. 28, 34), got {depth}"
            )
        if widen_factor < 1:
            raise ValueError(f"WideResNet widen_factor must be >= 1, got {widen_factor}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        self.block1 = self._make_group(n, widths[0], widths[1], 1, drop_rate)
        self.block2 = self._make_group(n, widths[1], widths[2], 2, drop_rate)
        self.block3 = self._make_group(n, widths[2], widths[3], 2, drop_rate)
        self.bn1 = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.num_features = widths[3]

        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    @staticmethod
    def _make_group(
        n: int, in_planes: int, out_planes: int, stride: int, drop_rate: float
    ) -> nn.Sequential:
        return nn.Sequential(
            *[
                WideBasicBlock(
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop_rate,
                )
                for i in range(n)
            ]
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out)))
        out = F.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


# ----------------------------------------------------------------------------------- factory
def build_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    depth: int = 28,
    widen_factor: int = 10,
) -> NormalizedNet:
    """Build ``arch`` behind a :class:`Normalize` layer; the result maps [0, 1] images to logits.

    ``arch`` is one of ``bulwark.contract.spec.ARCHS`` (``depth`` and
    ``widen_factor`` apply to the last one only). ``mean``/``std`` need one entry per input
    channel.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown model arch {arch!r}; expected one of {', '.join(ARCHS)}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")
    if in_channels < 1:
        raise ValueError(f"in_channels must be >= 1, got {in_channels}")
    if image_size < 1:
        raise ValueError(f"image_size must be >= 1, got {image_size}")
    if len(mean) != in_channels or len(std) != in_channels:
        raise ValueError(
            f"mean and std need one value per input channel ({in_channels}), "
            f"got {len(mean)} and {len(std)}"
        )
    net: nn.Module
    if arch == "small_cnn":
        net = SmallCNN(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    elif arch == "mnist_net":
        net = MNISTNet(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    elif arch == "preact_resnet18":
        net = PreActResNet18(num_classes=num_classes, in_channels=in_channels)
    else:
        net = WideResNet(
            depth=depth, widen_factor=widen_factor, num_classes=num_classes,
            in_channels=in_channels,
        )
    return NormalizedNet(Normalize(mean, std), net)


def count_parameters(model: nn.Module, *, trainable_only: bool = False) -> int:
    """Number of scalar parameters (buffers such as BatchNorm statistics are not counted)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
