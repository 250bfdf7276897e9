"""Pre-activation ResNet for CIFAR (He et al. 2016, "Identity Mappings in Deep Residual Networks").

As in the original Deep Curvature package (which follows Garipov et al.'s SWA code), the block type
follows the depth: below 44 layers BasicBlocks, ``(depth - 2) / 6`` per stage; from 44 layers on
Bottlenecks, ``(depth - 2) / 9`` per stage. So PreResNet-20 is built of BasicBlocks while
PreResNet-56, -110 and -164 are built of Bottlenecks (6, 12 and 18 per stage); this is what gives
PreResNet-110 its 1,169,972 parameters for 100 classes (BasicBlocks would give about 1.7 M).
Shortcuts that change shape are a bare 1x1 convolution (no BatchNorm), as there. Convolution
weights are N(0, 2 / n) with ``n = k * k * out_channels``; BatchNorm starts at weight 1, bias 0.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from curvature.models.resnet import scale_channels

BOTTLENECK_MIN_DEPTH = 44


class PreActBasicBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3, plus the shortcut. (N, in_planes, H, W) -> (N, planes, H/s, W/s)."""

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return out + residual


class PreActBottleneck(nn.Module):
    """BN-ReLU-conv1x1-BN-ReLU-conv3x3-BN-ReLU-conv1x1 (to 4 x planes), plus the shortcut.

    (N, in_planes, H, W) -> (N, 4 * planes, H / stride, W / stride).
    """

    expansion = 4

    def __init__(self, in_planes: int, planes: int, stride: int = 1, shortcut: nn.Module | None = None):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * self.expansion, 1, bias=False)
        self.relu = nn.ReLU(inplace=False)
        self.shortcut = shortcut

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1(self.relu(self.bn1(x)))
        out = self.conv2(self.relu(self.bn2(out)))
        out = self.conv3(self.relu(self.bn3(out)))
        residual = x if self.shortcut is None else self.shortcut(x)
        return out + residual


class PreResNet(nn.Module):
    """Pre-activation ResNet-``depth`` for CIFAR.

    conv3x3 (3 -> 16), three stages of blocks at widths 16, 32, 64 (times ``width``; outputs 4x
    that for Bottlenecks) with strides 1, 2, 2, then BN, ReLU, AvgPool(8) and one linear layer.
    Input (N, 3, 32, 32) -> logits (N, num_classes).
    """

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10, depth: int = 110, width: float = 1.0):
        super().__init__()
        if depth >= BOTTLENECK_MIN_DEPTH:
            block, per_block = PreActBottleneck, 9
        else:
            block, per_block = PreActBasicBlock, 6
        if depth < 2 or (depth - 2) % per_block:
            raise ValueError(f"PreResNet depth {depth} does not fit its {block.__name__}s: "
                             f"depth - 2 must be a multiple of {per_block} (e.g. 20, 56, 110, 164)")
        blocks_per_stage = (depth - 2) // per_block
        widths = [scale_channels(c, width) for c in (16, 32, 64)]

        self.conv1 = nn.Conv2d(3, widths[0], 3, padding=1, bias=False)
        in_planes, stages = widths[0], []
        for planes, stride in zip(widths, (1, 2, 2)):
            stage, in_planes = self._make_stage(block, in_planes, planes, blocks_per_stage, stride)
            stages.append(stage)
        self.layer1, self.layer2, self.layer3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.relu = nn.ReLU(inplace=False)
        self.avgpool = nn.AvgPool2d(8)
        self.fc = nn.Linear(in_planes, num_classes)

        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    @staticmethod
    def _make_stage(block, in_planes: int, planes: int, num_blocks: int, stride: int):
        out_planes = planes * block.expansion
        shortcut = None
        if stride != 1 or in_planes != out_planes:
            shortcut = nn.Sequential(nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False))
        layers = [block(in_planes, planes, stride, shortcut)]
        layers += [block(out_planes, planes) for _ in range(num_blocks - 1)]
        return nn.Sequential(*layers), out_planes

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        out = self.avgpool(self.relu(self.bn(out)))
        return self.fc(torch.flatten(out, 1))
