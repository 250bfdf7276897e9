"""The loss along a direction in weight space: ``L(w0 + t v)`` for t on a grid (paper Figs. 9-12).

The original package's ``build_loss_landscape``: directions are Ritz vectors of the Hessian / GGN
(unit norm, chosen by position in the ascending Ritz values: largest, smallest / most negative, near
zero) or random baselines (Gaussian; filter-normalised as in Li et al. 2018, "Visualizing the Loss
Landscape of Neural Nets"). At each point the BatchNorm statistics are handled by ``bn_mode``:

* ``recompute`` (the original's choice): running statistics re-estimated over the train data at
  ``w0 + t v`` (``torch.optim.swa_utils.update_bn``), then evaluated with them;
* ``train``: batch statistics of each evaluation batch (the operators' ``bn_mode="train"``);
* ``eval``: the checkpoint's running statistics, unchanged.

The loss is the one the curvature operators use: ``sum_b (n_b / N) loss_fn(f(x_b), y_b)``, so for a
Ritz pair ``(theta, v)`` the second difference ``(L(t) + L(-t) - 2 L(0)) / t^2`` tends to
``v^T H v = theta`` as ``t -> 0`` (same data, same batches, ``bn_mode`` train or eval).
"""

from __future__ import annotations

import copy
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from curvature.operators import curvature_mode

BN_MODES = ("recompute", "train", "eval")


def flat_parameters(model: nn.Module, names: Sequence[str]) -> torch.Tensor:
    named = dict(model.named_parameters())
    return torch.cat([named[n].detach().reshape(-1) for n in names]).clone()


@torch.no_grad()
def set_flat_parameters(model: nn.Module, names: Sequence[str], flat: torch.Tensor) -> None:
    named = dict(model.named_parameters())
    offset = 0
    for n in names:
        p = named[n]
        p.copy_(flat[offset:offset + p.numel()].view_as(p))
        offset += p.numel()


def choose_ritz_directions(ritz_values: torch.Tensor, positions: Sequence) -> list[tuple[str, int]]:
    """``(label, index)`` into ascending ``ritz_values`` for each position.

    A position is an integer index into the ascending values (``-1`` largest, ``0`` smallest / most
    negative) or ``"near_zero"`` (smallest ``|theta|``). Duplicates are dropped, order kept.
    """
    m = len(ritz_values)
    chosen = []
    for pos in positions:
        if pos == "near_zero":
            index, label = int(torch.argmin(ritz_values.abs())), "near_zero"
        else:
            index = int(pos) % m
            label = {m - 1: "largest", 0: "smallest"}.get(index, f"index_{index}")
        if index not in [i for _, i in chosen]:
            chosen.append((label, index))
    return chosen


def random_direction(model: nn.Module, names: Sequence[str], kind: str, generator: torch.Generator) -> torch.Tensor:
    """A unit-norm random direction: ``gaussian`` or ``filter`` normalised (Li et al. 2018).

    Filter normalisation: each filter (row of a weight's first dimension) of a Gaussian draw is scaled
    to the norm of the same filter of the weights; biases and BatchNorm parameters (1-d) are zeroed,
    Li et al.'s ``ignore='biasbn'``. The result is then scaled to unit norm so that ``t`` means the same
    distance as along the unit-norm Ritz vectors.
    """
    named = dict(model.named_parameters())
    parts = []
    for n in names:
        w = named[n].detach()
        d = torch.randn(w.shape, generator=generator, dtype=torch.float64).to(w)
        if kind == "filter":
            if w.dim() <= 1:
                d = torch.zeros_like(w)
            else:
                rows_d = d.reshape(w.shape[0], -1)
                rows_w = w.reshape(w.shape[0], -1)
                scale = rows_w.norm(dim=1, keepdim=True) / rows_d.norm(dim=1, keepdim=True).clamp_min(1e-30)
                d = (rows_d * scale).reshape(w.shape)
        elif kind != "gaussian":
            raise ValueError(f"random direction kind must be gaussian or filter, got {kind!r}")
        parts.append(d.reshape(-1))
    v = torch.cat(parts)
    return v / v.norm()


@torch.no_grad()
def mean_loss_accuracy(model: nn.Module, batches, loss_fn: Callable, bn_mode: str = "eval") -> dict:
    """``sum_b (n_b / N) loss_fn(f(x_b), y_b)`` and top-1 accuracy; dropout off, BN per ``bn_mode``."""
    total, correct, seen = 0.0, 0, 0
    with curvature_mode(model, "train" if bn_mode == "train" else "eval"):
        for inputs, labels in batches:
            logits = model(inputs)
            n = labels.shape[0]
            total += float(loss_fn(logits, labels)) * n
            if not labels.is_floating_point():
                correct += int((logits.argmax(-1) == labels).sum())
            seen += n
    return {"loss": total / seen, "accuracy": correct / seen}


def recompute_bn(model: nn.Module, batches) -> None:
    """Running BatchNorm statistics re-estimated over ``batches`` (cumulative average, as SWA does)."""
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        torch.optim.swa_utils.update_bn(((x, y) for x, y in batches), model)


def loss_along_direction(model: nn.Module, names: Sequence[str], direction: torch.Tensor, ts: Sequence[float],
                         splits: dict, loss_fn: Callable, bn_mode: str = "recompute",
                         bn_batches: Optional[list] = None) -> dict:
    """``{split: {"loss": [..], "accuracy": [..]}}`` at ``w0 + t v`` for each ``t``; weights restored after.

    ``splits`` maps a split name to its list of ``(inputs, labels)`` batches; ``bn_batches`` are the
    batches BatchNorm statistics are recomputed over (``bn_mode="recompute"``; default: ``splits["train"]``).
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be one of {', '.join(BN_MODES)}, got {bn_mode!r}")
    w0 = flat_parameters(model, names)
    saved = copy.deepcopy(model.state_dict())
    direction = direction.to(w0)
    out = {s: {"loss": [], "accuracy": []} for s in splits}
    try:
        for t in ts:
            set_flat_parameters(model, names, w0 + float(t) * direction if t != 0 else w0)
            if bn_mode == "recompute":
                recompute_bn(model, bn_batches if bn_batches is not None else splits["train"])
            for split, batches in splits.items():
                r = mean_loss_accuracy(model, batches, loss_fn, bn_mode)
                out[split]["loss"].append(r["loss"])
                out[split]["accuracy"].append(r["accuracy"])
    finally:
        model.load_state_dict(saved)
    return out


def second_difference(model: nn.Module, names: Sequence[str], direction: torch.Tensor, t: float, batches,
                      loss_fn: Callable, bn_mode: str = "train") -> float:
    """``(L(t) + L(-t) - 2 L(0)) / t^2``: the curvature ``v^T H v`` of the loss along ``v`` for small t."""
    r = loss_along_direction(model, names, direction, [-t, 0.0, t], {"train": batches}, loss_fn, bn_mode)
    lm, l0, lp = r["train"]["loss"]
    return (lp + lm - 2 * l0) / t ** 2


def quadratic_range(ts: Sequence[float], losses: Sequence[float], loss0: float, ritz_value: float,
                    tolerance: float = 0.1) -> tuple[float, float]:
    """The grid range ``[t_minus, t_plus]`` around 0 where ``loss0 + theta t^2 / 2`` holds within ``tolerance``.

    "Holds" at t: ``|(L(t) - loss0) - theta t^2 / 2| <= tolerance * |theta t^2 / 2|`` (the quadratic
    model's predicted change, right to 10%). The range is contiguous: it stops at the first grid point
    on each side where the model fails (0 when it fails at the first point).
    """
    ts = [float(t) for t in ts]
    pairs = sorted(zip(ts, losses), key=lambda p: abs(p[0]))
    ends = {1: 0.0, -1: 0.0}
    for side in (1, -1):
        for t, loss in sorted((p for p in pairs if p[0] * side > 0), key=lambda p: abs(p[0])):
            model = ritz_value * t * t / 2
            if abs((loss - loss0) - model) <= tolerance * abs(model):
                ends[side] = t
            else:
                break
    return ends[-1], ends[1]
