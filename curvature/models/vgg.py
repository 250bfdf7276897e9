"""VGG for CIFAR (Simonyan & Zisserman 2015) as defined in the original Deep Curvature package.

That package takes its CIFAR models from Garipov et al.'s SWA and curve-ensembling code: the
standard VGG convolution stacks (3x3, padding 1, max-pool after each block), then a classifier
of Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU, Linear(512, num_classes).
After five 2x2 max-pools a 32x32 image is 1x1, so the classifier sees exactly 512 features.
Convolution weights are N(0, 2 / n) with ``n = k * k * out_channels`` (He et al. 2015, fan-out
mode), biases zero; the linear layers keep PyTorch's default initialisation, as there.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from curvature.models.resnet import scale_channels

# "M" is a 2x2 max-pool; numbers are the output channels of a 3x3 convolution.
VGG_CFGS: dict[int, list] = {
    11: [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"],
    16: [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M"],
    19: [64, 64, "M", 128, 128, "M", 256, 256, 256, 256, "M",
         512, 512, 512, 512, "M", 512, 512, 512, 512, "M"],
}


def make_features(cfg: list, batch_norm: bool, width: float) -> nn.Sequential:
    layers: list[nn.Module] = []
    in_channels = 3
    for entry in cfg:
        if entry == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            continue
        out_channels = scale_channels(entry, width)
        layers.append(nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1))
        if batch_norm:
            layers.append(nn.BatchNorm2d(out_channels))
        layers.append(nn.ReLU(inplace=False))
        in_channels = out_channels
    return nn.Sequential(*layers)


class VGG(nn.Module):
    """VGG-{11,16,19} for CIFAR, optionally with BatchNorm after every convolution.

    ``features``: the VGG convolution stack (channels times ``width``), five 2x2 max-pools.
    ``classifier``: Dropout, Linear(512, 512), ReLU, Dropout, Linear(512, 512), ReLU,
    Linear(512, num_classes), with 512 times ``width``. Input (N, 3, 32, 32) -> (N, num_classes).
    VGG16 without BatchNorm has 15,291,300 parameters for 100 classes at width 1.
    """

    input_shape = (3, 32, 32)

    def __init__(self, num_classes: int = 10, depth: int = 16, batch_norm: bool = False,
                 width: float = 1.0):
        super().__init__()
        if depth not in VGG_CFGS:
            raise ValueError(f"VGG depth must be one of {sorted(VGG_CFGS)}, got {depth}")
        self.features = make_features(VGG_CFGS[depth], batch_norm, width)
        features = scale_channels(512, width)
        hidden = scale_channels(512, width)
        self.classifier = nn.Sequential(
            nn.Dropout(),
            nn.Linear(features, hidden),
            nn.ReLU(inplace=False),
            nn.Dropout(),
            nn.Linear(hidden, hidden),
            nn.ReLU(inplace=False),
            nn.Linear(hidden, num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels
                nn.init.normal_(module.weight, 0.0, math.sqrt(2.0 / fan_out))
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(torch.flatten(self.features(x), 1))

    def curvature_layers(self) -> list[nn.Module]:
        """The forward pass as a chain of layers (for the layer-wise curvature products)."""
        return [*self.features, nn.Flatten(1), *self.classifier]
