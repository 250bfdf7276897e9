"""ResNet-18 for CIFAR (He et al. 2016, "Deep Residual Learning", with the common CIFAR stem).

The CIFAR variant replaces ImageNet's 7x7 stride-2 stem and max-pool by one 3x3 convolution, so
the four stages see 32, 16, 8 and 4 pixels. Every ReLU is out-of-place and residual sums are
``out + shortcut``, so the model works under ``torch.func`` transforms.
"""

from __future__ import annotations

import torch
from torch import nn


def scale_channels(channels: int, width: float) -> int:
    """A channel count times the width multiplier: ``int(round(channels * width))``, at least 1."""
    if not width > 0:
        raise ValueError(f"width multiplier must be positive, got {width}")
    return max(1, int(round(channels * width)))


class BasicBlock(nn.Module):
    """Post-activation residual block: conv3x3-BN-ReLU-conv3x3-BN, plus shortcut, then ReLU.

    The shortcut is a 1x1 convolution with BatchNorm when the stride or channel count changes,
    the identity otherwise. Input (N, in_planes, H, W) -> (N, planes, H / stride, W / stride).
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False),
                nn.BatchNorm2d(planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for CIFAR: 3x3 stem conv (64), no max-pool, BasicBlocks [2, 2, 2, 2].

    Stage widths 64, 128, 256, 512 (times ``width``), strides 1, 2, 2, 2, then global average
    pooling and one linear layer. Input (N, 3, 32, 32) -> logits (N, num_classes).
    11,173,962 parameters for 10 classes at width 1.
    """

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10, width: float = 1.0):
        super().__init__()
        widths = [scale_channels(c, width) for c in (64, 128, 256, 512)]
        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=False)
        stages, in_planes = [], widths[0]
        for planes, stride in zip(widths, (1, 2, 2, 2)):
            stages.append(nn.Sequential(BasicBlock(in_planes, planes, stride), BasicBlock(planes, planes)))
            in_planes = planes
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.fc(torch.flatten(self.avgpool(out), 1))
