"""Models: ``mlp`` (any sample shape), ``lenet`` and ``resnet20`` (CIFAR-style ResNet-20), for
any image size (C x H x W)."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn
from torch.nn import functional as F

from hpctrain.errors import UsageError

MODELS = ("mlp", "lenet", "resnet20")


def build(name: str, input_shape: tuple[int, ...], num_classes: int = 10) -> nn.Module:
    """Model ``name`` for inputs of shape (C, H, W) (``mlp``: of any shape)."""
    if name == "mlp":
        return MLP(input_shape, num_classes)
    if name == "lenet":
        return LeNet(input_shape, num_classes)
    if name == "resnet20":
        return ResNet20(input_shape[0], num_classes)
    raise UsageError(f"unknown model {name!r}; choose from {', '.join(MODELS)}")


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class MLP(nn.Module):
    """Two hidden layers of 256 and 128 ReLU units, on the flattened sample (of any shape:
    images, or feature vectors)."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(math.prod(input_shape), 256), nn.ReLU(),
            nn.Linear(256, 128), nn.ReLU(), nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LeNet(nn.Module):
    """LeNet-5 with ReLU and max pooling; padding keeps 28x28 inputs at the classic 5x5x16."""

    def __init__(self, input_shape: tuple[int, ...], num_classes: int = 10):
        super().__init__()
        c, h, w = input_shape  # (C, H, W)
        pad = 2 if h < 32 else 0
        self.conv1 = nn.Conv2d(c, 6, 5, padding=pad)
        self.conv2 = nn.Conv2d(6, 16, 5)
        fh, fw = ((h + 2 * pad - 4) // 2 - 4) // 2, ((w + 2 * pad - 4) // 2 - 4) // 2
        if fh < 1 or fw < 1:
            raise UsageError(f"lenet needs inputs of at least 12x12, got {h}x{w}")
        self.fc1 = nn.Linear(16 * fh * fw, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class _BasicBlock(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm_layer(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm_layer(cout)
        self.pad = cout - cin
        self.stride = stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = x
        if self.stride != 1 or self.pad:
            # He et al.'s option A: subsample and zero-pad channels, no extra parameters.
            shortcut = x[:, :, :: self.stride, :: self.stride]
            shortcut = F.pad(shortcut, (0, 0, 0, 0, self.pad // 2, self.pad - self.pad // 2))
        return F.relu(out + shortcut)


class ResNet20(nn.Module):
    """ResNet-20 for CIFAR (He et al. 2016): 3 stages of 3 basic blocks, 16/32/64 channels.

    ``norm_layer`` as in torchvision's ResNets, e.g. ``hpctrain.sync.SyncBatchNorm``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10,
                 norm_layer: Callable[[int], nn.Module] = nn.BatchNorm2d):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, 16, 3, 1, 1, bias=False)
        self.bn = norm_layer(16)
        blocks, cin = [], 16
        for cout, stride in ((16, 1), (32, 2), (64, 2)):
            for i in range(3):
                blocks.append(_BasicBlock(cin, cout, stride if i == 0 else 1, norm_layer))
                cin = cout
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(64, num_classes)
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                nn.init.kaiming_normal_(m.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.blocks(F.relu(self.bn(self.conv(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
