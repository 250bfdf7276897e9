"""Small models for scikit-learn's 8x8 digits, small enough for exact dense Hessians in tests.

Both take ``in_channels`` and ``input_size`` so the same definitions also run on 3x32x32 CIFAR
images. Activations are out-of-place, so the models work under ``torch.func`` transforms.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


#: The MLP's hidden activations: ReLU (the default) or tanh, smooth, as in Cohen et al. (2021)'s
#: edge-of-stability networks.
ACTIVATIONS = {"relu": nn.ReLU, "tanh": nn.Tanh}


class MLP(nn.Module):
    """Flatten, then Linear-activation (``activation``: relu or tanh) for each hidden size, then Linear.

    Input (N, in_channels, input_size, input_size) -> (N, num_classes). With the defaults
    (1x8x8 digits, hidden [64, 64], 10 classes): 64*64+64 + 64*64+64 + 64*10+10 = 8,970 parameters.
    """

    def __init__(self, num_classes: int = 10, hidden: Sequence[int] = (64, 64), in_channels: int = 1,
                 input_size: int = 8, activation: str = "relu"):
        super().__init__()
        hidden = [int(h) for h in hidden]
        if any(h < 1 for h in hidden):
            raise ValueError(f"MLP hidden sizes must be positive integers, got {hidden}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"MLP activation must be one of {', '.join(ACTIVATIONS)}, got {activation!r}")
        self.input_shape = (in_channels, input_size, input_size)
        layers: list[nn.Module] = [nn.Flatten()]
        in_features = in_channels * input_size * input_size
        for size in hidden:
            layers += [nn.Linear(in_features, size), ACTIVATIONS[activation]()]
            in_features = size
        layers.append(nn.Linear(in_features, num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def curvature_layers(self) -> list[nn.Module]:
        """The forward pass as a chain of layers (for the layer-wise curvature products)."""
        return list(self.net)


class SmallCNN(nn.Module):
    """Two 3x3 convolutions (padding 1) with ReLU, average-pooled to 4x4, then one linear layer.

    ``channels`` (default 16, 32) are the two convolutions' outputs; with ``batch_norm`` each
    convolution is followed by BatchNorm and loses its (redundant) bias. Average pooling keeps the
    network linear between ReLUs. Input (N, in_channels, input_size, input_size), input_size >= 4,
    -> (N, num_classes). Defaults (1x8x8, 10 classes): 160 + 4,640 + 5,130 = 9,930 parameters.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, input_size: int = 8,
                 channels: Sequence[int] = (16, 32), batch_norm: bool = False):
        super().__init__()
        if input_size < 4:
            raise ValueError(f"SmallCNN pools to 4x4, so input_size must be >= 4, got {input_size}")
        channels = [int(c) for c in channels]
        if len(channels) != 2 or min(channels) < 1:
            raise ValueError(f"SmallCNN takes two positive channel counts, got {channels}")
        self.input_shape = (in_channels, input_size, input_size)
        layers: list[nn.Module] = []
        for c_in, c_out in zip([in_channels] + channels[:-1], channels):
            layers.append(nn.Conv2d(c_in, c_out, 3, padding=1, bias=not batch_norm))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU(inplace=False))
        layers.append(nn.AdaptiveAvgPool2d(4))
        self.features = nn.Sequential(*layers)
        self.fc = nn.Linear(channels[-1] * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.features(x), 1))

    def curvature_layers(self) -> list[nn.Module]:
        """The forward pass as a chain of layers (for the layer-wise curvature products)."""
        return [*self.features, nn.Flatten(1), self.fc]
