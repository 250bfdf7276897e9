"""Losses of the curvature operators: the batch loss, what its mean divides by, and its output Hessian.

A curvature operator needs three things from a loss beyond its value: the **denominator** of a
mean-reduced batch loss (samples, counted tokens, the sum of class weights), so that batches combine
into the exact loss of the whole dataset; the **gradient** in the network outputs; and **products with
the Hessian in the outputs** ``H_L u``, in closed form where one exists. One :class:`Loss` object per
loss kind holds them; :func:`as_loss` turns what a user holds into one:

* ``F.cross_entropy``, ``nn.CrossEntropyLoss(weight=..., ignore_index=..., reduction=...,
  label_smoothing=...)`` or ``"cross_entropy"`` -> :class:`CrossEntropy` (closed form);
* ``F.mse_loss``, ``nn.MSELoss(reduction=...)``, the suite's :func:`mse_loss` or ``"mse"`` ->
  :class:`MeanSquaredError` (closed form);
* any other callable ``loss(outputs, targets) -> scalar`` -> :class:`AutogradLoss` (exact products by
  double backward in the output space; taken to be a mean over the batch's samples).

The dataset's loss is the one PyTorch would give for the whole dataset as one batch: for a mean
reduction ``L = sum_b D_b L_b / sum_b D_b`` with ``D_b`` the batch's denominator, for a sum reduction
``L = sum_b L_b``. :meth:`Loss.batch_weight` gives each batch's factor. Adding a loss kind means adding
one subclass and one line in :func:`as_loss`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from curvature.errors import SuiteError

__all__ = ["Loss", "CrossEntropy", "MeanSquaredError", "AutogradLoss", "as_loss", "mse_loss", "loss_rule",
           "LOSS_RULES", "REDUCTIONS"]

REDUCTIONS = ("mean", "sum")


def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all output entries; integer class targets become one-hot vectors."""
    if not targets.is_floating_point():
        classes = torch.arange(outputs.shape[-1], device=outputs.device)
        targets = (targets.unsqueeze(-1) == classes).to(outputs.dtype)  # one-hot, vmap-friendly
    # Written out: F.mse_loss's backward fails under forward-over-reverse ("ZeroTensors are immutable").
    return ((outputs - targets) ** 2).mean()


class Loss:
    """A batch loss ``L_b(z, y)`` of network outputs ``z`` and its curvature in ``z``.

    ``reduction``: ``"mean"`` (the batch loss divides by :meth:`denominator`) or ``"sum"``.
    ``closed_form``: whether :meth:`gradient` / :meth:`hessian_product` are written out (the layer-wise
    products need it) or computed by autograd.
    """

    name = "loss"
    closed_form = False

    def __init__(self, reduction: str = "mean"):
        if reduction not in REDUCTIONS:
            raise SuiteError(f"the curvature operators need a scalar loss: reduction must be mean or sum, "
                             f"got {reduction!r}")
        self.reduction = reduction

    def __call__(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        raise NotImplementedError

    def denominator(self, targets) -> float:
        """What the mean-reduced batch loss divides by (up to a factor common to all batches)."""
        raise NotImplementedError

    def batch_weight(self, denominator: float, total: float) -> float:
        """The batch loss's factor in the dataset loss, from its denominator and the dataset's total."""
        return denominator / total if self.reduction == "mean" else 1.0

    def gradient(self, outputs: torch.Tensor, targets) -> torch.Tensor:
        """``dL_b / dz`` (same shape as ``outputs``)."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            return torch.autograd.grad(self(z, targets), z)[0]

    def hessian_product(self, outputs: torch.Tensor, targets, u: torch.Tensor) -> torch.Tensor:
        """``H_L u`` with ``H_L = d^2 L_b / dz^2`` (``u`` shaped like ``outputs``)."""
        z = outputs.detach().requires_grad_(True)
        with torch.enable_grad():
            (g,) = torch.autograd.grad(self(z, targets), z, create_graph=True)
            # Reverse over reverse: no forward-mode formula is needed from the user's loss.
            return torch.autograd.grad(g, z, u, materialize_grads=True)[0]

    def describe(self) -> str:
        return f"{self.name} (reduction {self.reduction})"

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.describe()})"


class CrossEntropy(Loss):
    """Cross-entropy of logits as ``nn.CrossEntropyLoss`` defines it, including class weights,
    ``ignore_index`` (integer targets) and label smoothing; class-probability targets too.

    Shapes: ``(N, C)`` logits with ``(N,)`` targets; ``(N, T, C)`` logits with ``(N, T)`` targets (a
    language model: classes last, the mean over the counted tokens); PyTorch's own ``(N, C, d1, ...)``
    with ``(N, d1, ...)``; probability targets shaped like the logits (classes in dim 1, as PyTorch).

    Per row ``i`` (a sample or token) with ``p_i = softmax(z_i)`` the loss is ``-sum_c q_ic log p_ic``
    with ``q_ic = (1 - eps) w_{y_i} [c = y_i] + eps w_c / C`` (integer targets) or
    ``q_ic = w_c ((1 - eps) t_ic + eps / C)`` (probabilities), zero for ignored rows. With
    ``s_i = sum_c q_ic``: gradient ``s_i p_i - q_i`` and Hessian ``s_i (diag(p_i) - p_i p_i^T)``, each
    divided by the denominator ``D = sum_i w_{y_i}`` over counted rows (integer targets) or the number
    of rows (probabilities) for the mean, which is PyTorch's convention.
    """

    name = "cross_entropy"
    closed_form = True

    def __init__(self, reduction: str = "mean", label_smoothing: float = 0.0, ignore_index: int = -100,
                 weight: Optional[torch.Tensor] = None):
        super().__init__(reduction)
        if not 0.0 <= float(label_smoothing) <= 1.0:
            raise SuiteError(f"label_smoothing must be in [0, 1], got {label_smoothing!r}")
        self.label_smoothing = float(label_smoothing)
        self.ignore_index = int(ignore_index)
        self.weight = None if weight is None else weight.detach()

    def describe(self) -> str:
        extras = [f"reduction {self.reduction}"]
        if self.label_smoothing:
            extras.append(f"label smoothing {self.label_smoothing:g}")
        if self.weight is not None:
            extras.append("class weights")
        if self.ignore_index != -100:
            extras.append(f"ignore_index {self.ignore_index}")
        return f"{self.name} ({', '.join(extras)})"

    # --- layout: rows of logits, classes last --------------------------------------------------
    @staticmethod
    def _class_last(outputs: torch.Tensor, targets: torch.Tensor) -> bool:
        if targets.is_floating_point():
            return outputs.dim() == 2
        if outputs.dim() == targets.dim() + 1 and outputs.shape[:-1] == targets.shape:
            return True  # (N, C), or a language model's (N, T, C) with (N, T)
        if outputs.dim() >= 3 and outputs.shape[:1] + outputs.shape[2:] == targets.shape:
            return False  # PyTorch's (N, C, d1, ...) with (N, d1, ...)
        raise SuiteError(f"cross-entropy: outputs of shape {tuple(outputs.shape)} do not fit targets of shape "
                         f"{tuple(targets.shape)}: expected (N, C) with (N,), (N, T, C) with (N, T), or "
                         "(N, C, d...) with (N, d...)")

    def _rows(self, outputs: torch.Tensor, targets: torch.Tensor):
        """Logits as (M, C) rows, targets as (M,) or (M, C), and a function putting rows back."""
        if self._class_last(outputs, targets):
            shape = outputs.shape
            rows = outputs.reshape(-1, shape[-1])
            t = targets.reshape(-1, shape[-1]) if targets.is_floating_point() else targets.reshape(-1)
            return rows, t, lambda r: r.reshape(shape)
        moved = outputs.movedim(1, -1)
        shape = moved.shape
        t = targets.movedim(1, -1).reshape(-1, shape[-1]) if targets.is_floating_point() else targets.reshape(-1)
        return moved.reshape(-1, shape[-1]), t, lambda r: r.reshape(shape).movedim(-1, 1)

    def _weights(self, like: torch.Tensor) -> Optional[torch.Tensor]:
        return None if self.weight is None else self.weight.to(device=like.device, dtype=like.dtype)

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, t, _ = self._rows(outputs, targets)
        return F.cross_entropy(rows, t, weight=self._weights(rows), ignore_index=self.ignore_index,
                               reduction=self.reduction, label_smoothing=self.label_smoothing)

    def denominator(self, targets: torch.Tensor) -> float:
        if targets.is_floating_point():  # probabilities: one row per sample (and position)
            return float(targets.numel() // targets.shape[1]) if targets.dim() > 1 else 1.0
        counted = targets != self.ignore_index
        if self.weight is None:
            return float(counted.sum())
        w = self.weight.to(targets.device)
        return float(w[targets[counted]].sum())

    def _q(self, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The (M, C) target weights ``q`` of ``-sum_c q_c log p_c`` per row (zero for ignored rows)."""
        num_classes, eps, w = rows.shape[-1], self.label_smoothing, self._weights(rows)
        if t.is_floating_point():
            q = (1.0 - eps) * t.to(rows.dtype) + eps / num_classes
            return q if w is None else q * w
        counted = t != self.ignore_index
        safe = torch.where(counted, t, torch.zeros_like(t))
        hard = F.one_hot(safe, num_classes).to(rows.dtype)
        if w is None:
            q = (1.0 - eps) * hard + eps / num_classes
        else:
            q = (1.0 - eps) * hard * w[safe].unsqueeze(-1) + (eps / num_classes) * w
        return q * counted.unsqueeze(-1).to(rows.dtype)

    def _scale(self, t: torch.Tensor, rows: torch.Tensor) -> float:
        if self.reduction == "sum":
            return 1.0
        if t.is_floating_point():
            return 1.0 / rows.shape[0]
        d = self.denominator(t)
        return 1.0 / d if d else 0.0  # a batch of ignored tokens only: PyTorch gives NaN, it counts 0

    def gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        rows, t, back = self._rows(outputs, targets)
        p = torch.softmax(rows, dim=-1)
        q = self._q(rows, t)
        return back((q.sum(-1, keepdim=True) * p - q) * self._scale(t, rows))

    def hessian_product(self, outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        rows, t, back = self._rows(outputs, targets)
        u_rows = self._rows(u, targets)[0]
        p = torch.softmax(rows, dim=-1)
        s = self._q(rows, t).sum(-1, keepdim=True) * self._scale(t, rows)
        pu = p * u_rows
        return back(s * (pu - p * pu.sum(-1, keepdim=True)))


class MeanSquaredError(Loss):
    """``sum (z - y)^2``, divided by the number of entries for the mean (``nn.MSELoss``).

    Integer class targets become one-hot vectors (the suite's convention for classifiers).
    Gradient ``2 (z - y) / D``, Hessian ``2 I / D`` with ``D`` the number of entries (1 for a sum).
    """

    name = "mse"
    closed_form = True

    def _targets(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if targets.is_floating_point():
            return targets.to(outputs.dtype)
        classes = torch.arange(outputs.shape[-1], device=outputs.device)
        return (targets.unsqueeze(-1) == classes).to(outputs.dtype)

    def _scale(self, outputs: torch.Tensor) -> float:
        return 1.0 / outputs.numel() if self.reduction == "mean" else 1.0

    def __call__(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return ((outputs - self._targets(outputs, targets)) ** 2).sum() * self._scale(outputs)

    def denominator(self, targets: torch.Tensor) -> float:
        return float(targets.numel())  # entries; integer targets: samples (C entries each, common to all)

    def gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return 2.0 * (outputs - self._targets(outputs, targets)) * self._scale(outputs)

    def hessian_product(self, outputs: torch.Tensor, targets: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        return 2.0 * self._scale(outputs) * u


class AutogradLoss(Loss):
    """Any callable ``loss(outputs, targets) -> scalar``: exact output-Hessian products by double backward.

    Batches are weighted by their number of samples (``len(targets)``) for ``reduction="mean"``, which
    is exact when every sample contributes the same number of terms to the loss; pass
    ``reduction="sum"`` (``as_loss(fn, reduction="sum")``) for a loss that sums over the batch.
    """

    def __init__(self, fn: Callable, reduction: str = "mean"):
        super().__init__(reduction)
        self.fn = fn
        self.name = getattr(fn, "__name__", type(fn).__name__)

    def __call__(self, outputs, targets) -> torch.Tensor:
        return self.fn(outputs, targets)

    def denominator(self, targets) -> float:
        return float(len(targets))


#: the loss rules a config names (``operator.loss``); ``curvature.operators.LOSSES`` holds the plain
#: functions of the same names, which the rest of the suite passes around
LOSS_RULES: dict[str, Callable[..., Loss]] = {"cross_entropy": CrossEntropy, "mse": MeanSquaredError}


def loss_rule(name: str, **options) -> Loss:
    """The loss rule a config names: ``cross_entropy`` or ``mse``, with ``reduction`` etc. as keywords."""
    if name not in LOSS_RULES:
        raise SuiteError(f"unknown loss {name!r}: choose one of {', '.join(LOSS_RULES)}")
    return LOSS_RULES[name](**options)


def as_loss(loss, reduction: Optional[str] = None) -> Loss:
    """The :class:`Loss` for what a user holds: a loss function, a loss module, a name, or a Loss.

    ``reduction`` overrides the reduction (a callable is otherwise taken as a mean over samples).
    """
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, str):
        return loss_rule(loss, **({} if reduction is None else {"reduction": reduction}))
    if loss is F.cross_entropy:
        return CrossEntropy(reduction or "mean")
    if isinstance(loss, nn.CrossEntropyLoss):
        return CrossEntropy(reduction or loss.reduction, loss.label_smoothing, loss.ignore_index, loss.weight)
    if loss is F.mse_loss or loss is mse_loss:
        return MeanSquaredError(reduction or "mean")
    if isinstance(loss, nn.MSELoss):
        return MeanSquaredError(reduction or loss.reduction)
    if callable(loss):
        own = getattr(loss, "reduction", None)  # an nn loss module of another kind says its reduction
        return AutogradLoss(loss, reduction or (own if own in REDUCTIONS else "mean"))
    raise SuiteError(f"a loss must be a callable loss(outputs, targets), a loss module or one of "
                     f"{', '.join(LOSSES)}; got {type(loss).__name__}")
