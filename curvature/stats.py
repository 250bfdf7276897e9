"""Mini-batch statistics of the loss, its gradient and a curvature product (the original's compute_loss_stats).

For batches ``b`` of sizes ``n_b`` (weights ``w_b = n_b / N``) with mean-reduced losses ``L_b``,
gradients ``g_b`` and curvature products ``H_b z`` (Hessian or GGN of ``L_b``, one fixed random unit
``z``), the statistics are batch-size weighted, so the means are those of the full-data loss:

* ``loss_mean = sum_b w_b L_b``, ``loss_variance = sum_b w_b (L_b - loss_mean)^2``;
* ``gradient_mean_norm_sq = ||g||^2`` with ``g = sum_b w_b g_b``, ``gradient_variance = sum_b w_b ||g_b - g||^2``;
* ``curvature_mean_norm_sq`` and ``curvature_variance``: the same for ``H_b z``;
* ``rayleigh_quotient = z^T (sum_b w_b H_b z)``;
* ``weight_l2`` and ``weight_linf`` of all parameters.

With equal batch sizes these are the plain mean and the population variance over batches.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
from torch import nn

from curvature.operators import curvature_mode, make_operator, select_parameters
from curvature.training import weight_norms

STATISTICS = ("loss_mean", "loss_variance", "gradient_mean_norm_sq", "gradient_variance",
              "curvature_mean_norm_sq", "curvature_variance", "rayleigh_quotient", "weight_l2", "weight_linf")


def random_unit_vector(num_params: int, seed: int, dtype=torch.float64, device="cpu") -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    z = torch.randn(num_params, generator=gen, dtype=torch.float64)
    return (z / z.norm()).to(dtype=dtype, device=device)


def batch_gradient(model: nn.Module, names: Sequence[str], loss_fn: Callable, inputs, targets,
                   bn_mode: str = "train") -> torch.Tensor:
    named = dict(model.named_parameters())
    with curvature_mode(model, bn_mode), torch.enable_grad():
        loss = loss_fn(model(inputs), targets)
        grads = torch.autograd.grad(loss, [named[n] for n in names])
    return loss.detach(), torch.cat([g.reshape(-1) for g in grads])


def _weighted(vectors: torch.Tensor, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted mean over dim 0 and the weighted mean squared deviation from it."""
    mean = (weights.view(-1, *[1] * (vectors.dim() - 1)) * vectors).sum(0)
    dev = (vectors - mean).reshape(vectors.shape[0], -1).pow(2).sum(1)
    return mean, (weights * dev).sum()


def loss_statistics(model: nn.Module, loss_fn: Callable, batches, operator: str = "hessian",
                    bn_mode: str = "train", params: Optional[Sequence[str]] = None,
                    z: Optional[torch.Tensor] = None, seed: int = 0) -> dict:
    """The statistics of the module docstring over ``batches`` (a list of ``(inputs, targets)``)."""
    batches = list(batches)
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    p0 = named[names[0]]
    if z is None:
        z = random_unit_vector(sum(named[n].numel() for n in names), seed, p0.dtype, p0.device)
    losses, grads, products, sizes = [], [], [], []
    layerwise = "auto"
    for inputs, targets in batches:
        loss, g = batch_gradient(model, names, loss_fn, inputs, targets, bn_mode)
        op = make_operator(operator, model, loss_fn, [(inputs, targets)], bn_mode=bn_mode, params=names,
                           check_deterministic=False, layerwise=layerwise, check_layerwise=layerwise == "auto")
        layerwise = op.engine == "layerwise"  # checked on the first batch; the verdict holds for the rest
        losses.append(loss.to(torch.float64))
        grads.append(g.to(torch.float64))
        products.append(op.matvec(z).to(torch.float64))
        sizes.append(targets.shape[0])
    w = torch.tensor(sizes, dtype=torch.float64, device=losses[0].device)
    w = w / w.sum()
    loss_mean, loss_var = _weighted(torch.stack(losses), w)
    g_mean, g_var = _weighted(torch.stack(grads), w)
    h_mean, h_var = _weighted(torch.stack(products), w)
    return {"loss_mean": float(loss_mean), "loss_variance": float(loss_var),
            "gradient_mean_norm_sq": float(g_mean.pow(2).sum()), "gradient_variance": float(g_var),
            "curvature_mean_norm_sq": float(h_mean.pow(2).sum()), "curvature_variance": float(h_var),
            "rayleigh_quotient": float(z.to(torch.float64) @ h_mean), **weight_norms(model),
            "num_batches": len(batches)}
