"""The case table operator and layer-rule tests share: models x losses x BatchNorm modes x dtypes x devices.

Every model is small (under 200 parameters), takes ``(n, 1, 4, 4)`` inputs and gives 3 outputs, so the
exact float64 matrices of :mod:`curvature.dense` (a different route from the operators) are the ground
truth. CUDA is appended to the devices when present, so a GPU machine gets GPU coverage for free.
Float32 cases are compared with the float64 truth at a looser tolerance.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from curvature.dense import dense_ggn, dense_hessian
from curvature.losses import mse_loss
from tests.conftest import DEVICES


# --- models ----------------------------------------------------------------------------------------
def tiny_mlp():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 3))


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.BatchNorm2d(3), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(12, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


class TinyResidual(nn.Module):
    """``head(x + block(x))`` on the flattened input: a skip connection, which no chain plan covers."""

    def __init__(self):
        super().__init__()
        self.block = nn.Sequential(nn.Linear(16, 6), nn.Tanh(), nn.Linear(6, 16))
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.head(torch.tanh(x + self.block(x)))


class TinyTransformer(nn.Module):
    """One self-attention layer (``nn.MultiheadAttention``, 2 heads) over the 4 rows of the input as tokens."""

    def __init__(self):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        tokens = x.flatten(1, 2)  # (n, 4 tokens, 4 features)
        mixed, _ = self.attention(tokens, tokens, tokens, need_weights=False)
        return self.head(self.norm(tokens + mixed).mean(1))


MODELS: dict[str, Callable[[], nn.Module]] = {"mlp": tiny_mlp, "cnn_bn": tiny_cnn, "residual": TinyResidual,
                                              "transformer": TinyTransformer}


def build(maker, device, seed=0):
    """A float64 model with non-trivial running statistics (so ``bn_mode="eval"`` differs from train)."""
    torch.manual_seed(seed)
    model = maker().double().to(device)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
    return model


def data(device, sizes=(7, 5, 4), seed=0, float_targets=False):
    """Uneven batches (the weighting n_b / N matters) of (n, 1, 4, 4) inputs and 3-class targets."""
    gen = torch.Generator().manual_seed(seed)
    batches = []
    for n in sizes:
        x = torch.randn(n, 1, 4, 4, generator=gen, dtype=torch.float64)
        y = torch.randint(0, 3, (n,), generator=gen)
        if float_targets:
            y = torch.randn(n, 3, generator=gen, dtype=torch.float64)
        batches.append((x.to(device), y.to(device)))
    return batches


# --- losses: (loss function, whether the targets are float vectors) -----------------------------
LOSSES: dict[str, tuple[Callable, bool]] = {
    "cross_entropy": (F.cross_entropy, False),
    "smoothed_ce": (nn.CrossEntropyLoss(label_smoothing=0.1), False),
    "mse": (mse_loss, False),            # the suite's: integer targets become one-hot
    "mse_module": (nn.MSELoss(), True),  # float targets
}

#: assert_close tolerances; float32 is compared with the float64 truth (relative to its largest entry)
TOLERANCES = {torch.float64: dict(rtol=1e-8, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-4)}


@dataclass(frozen=True)
class Case:
    model_name: str
    loss_name: str
    bn_mode: str
    dtype: torch.dtype
    device: str

    @property
    def id(self) -> str:
        return f"{self.model_name}-{self.loss_name}-bn_{self.bn_mode}-{str(self.dtype)[6:]}-{self.device}"

    @property
    def loss(self) -> Callable:
        return LOSSES[self.loss_name][0]

    def model(self) -> nn.Module:
        return build(MODELS[self.model_name], self.device).to(self.dtype)

    def batches(self) -> list:
        return [(x.to(self.dtype), y.to(self.dtype) if y.is_floating_point() else y)
                for x, y in data(self.device, float_targets=LOSSES[self.loss_name][1])]

    def tolerance(self, scale: float = 1.0) -> dict:
        """``rtol`` / ``atol`` for ``torch.testing.assert_close``; ``atol`` scaled by the truth's magnitude."""
        tol = TOLERANCES[self.dtype]
        return dict(rtol=tol["rtol"], atol=tol["atol"] * max(scale, 1e-30))

    def exact(self, name: str) -> torch.Tensor:
        """The float64 dense ``name`` matrix (``hessian`` or ``ggn``) on this case's device."""
        return _exact(self.model_name, self.loss_name, self.bn_mode, name).to(self.device)


@lru_cache(maxsize=None)
def _exact(model_name: str, loss_name: str, bn_mode: str, name: str) -> torch.Tensor:
    model, (loss, float_targets) = build(MODELS[model_name], "cpu"), LOSSES[loss_name]
    dense = {"hessian": dense_hessian, "ggn": dense_ggn}[name]
    return dense(model, loss, data("cpu", float_targets=float_targets), bn_mode)


def _has_bn(model_name: str) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in MODELS[model_name]().modules())


def _table() -> list[Case]:
    """Float64: every model with every loss, both BatchNorm modes where the model has BatchNorm.
    Float32: every model with cross-entropy (and both BN modes): the looser-tolerance path."""
    cases = []
    for device in DEVICES:
        for model_name in MODELS:
            bn_modes = ("train", "eval") if _has_bn(model_name) else ("train",)
            for bn_mode in bn_modes:
                cases += [Case(model_name, loss_name, bn_mode, torch.float64, device) for loss_name in LOSSES]
                cases.append(Case(model_name, "cross_entropy", bn_mode, torch.float32, device))
    return cases


CASES = _table()
