"""Exact dense Hessian and GGN of small models: the ground truth the operators are tested against.

Computed by a different route from :mod:`curvature.operators`: the Hessian as the Jacobian of the
autograd gradient (reverse over reverse, ``is_grads_batched``), the GGN from explicit per-sample
output Jacobians and per-sample output Hessians by ``torch.func.hessian`` (no closed forms). Both are
P x P in the parameter order of :func:`curvature.operators.select_parameters`. Memory is O(P^2):
meant for models of up to a few thousand parameters.
"""

from __future__ import annotations

from typing import Callable, Iterable, Optional, Sequence

import torch
from torch import nn
from torch.func import functional_call, hessian, jacrev, vmap

from curvature.operators import curvature_mode, select_parameters


def _setup(model: nn.Module, params: Optional[Sequence[str]]):
    names = select_parameters(model, params)
    named = dict(model.named_parameters())
    shapes = [named[n].shape for n in names]
    sizes = [named[n].numel() for n in names]
    flat = torch.cat([named[n].detach().reshape(-1) for n in names])
    fixed = {n: p.detach() for n, p in named.items() if n not in set(names)}
    fixed.update(dict(model.named_buffers()))

    def forward(flat_params: torch.Tensor, inputs: torch.Tensor) -> torch.Tensor:
        chunks = torch.split(flat_params, sizes)
        selected = {n: c.reshape(s) for n, c, s in zip(names, chunks, shapes)}
        return functional_call(model, {**fixed, **selected}, (inputs,))

    return flat, forward


def operator_matrix(operator, chunk: int = 32, progress: bool = False,
                    first: Optional[torch.Tensor] = None) -> torch.Tensor:
    """The P x P matrix of a curvature operator from its products with blocks of unit vectors.

    Faster than :func:`dense_hessian` / :func:`dense_ggn` for conv nets of a few thousand parameters
    (they go through batched double backward); exact to rounding once the operator itself is
    validated against those builders, as ``tests/test_operators.py`` does. ``first``: its leading
    columns, already computed (a caller's timing probe), which are then not recomputed.
    """
    from tqdm.auto import tqdm

    p = operator.num_params
    out = torch.empty(p, p, dtype=operator.dtype, device=operator.device)
    done = 0 if first is None else first.shape[1]
    if done:
        out[:, :done] = first
    for start in tqdm(range(done, p, chunk), desc="dense matrix", unit="block", leave=False,
                      disable=None if progress else True):
        block = torch.zeros(p, min(chunk, p - start), dtype=operator.dtype, device=operator.device)
        block[start:start + block.shape[1]].fill_diagonal_(1.0)
        out[:, start:start + block.shape[1]] = operator.matvec(block)
    return 0.5 * (out + out.T)


def dense_hessian(model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                  params: Optional[Sequence[str]] = None, chunk: int = 256) -> torch.Tensor:
    """The P x P Hessian of the batch-size-weighted mean loss over ``batches``."""
    batches = list(batches)
    total = sum(int(y.shape[0]) for _, y in batches)
    flat, forward = _setup(model, params)
    p = flat.numel()
    out = torch.zeros(p, p, dtype=flat.dtype, device=flat.device)
    eye = torch.eye(p, dtype=flat.dtype, device=flat.device)
    with curvature_mode(model, bn_mode), torch.enable_grad():
        for inputs, targets in batches:
            w = flat.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(loss_fn(forward(w, inputs), targets), w, create_graph=True)
            for start in range(0, p, chunk):
                rows = eye[start:start + chunk]
                (block,) = torch.autograd.grad(g, w, rows, is_grads_batched=True, retain_graph=True)
                out[start:start + chunk] += block * (targets.shape[0] / total)
    return 0.5 * (out + out.T)


def dense_ggn(model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
              params: Optional[Sequence[str]] = None) -> torch.Tensor:
    """The P x P GGN ``sum_b (n_b/N) J_b^T H_L J_b`` from explicit Jacobians and output Hessians.

    The mean-reduced batch loss is written as ``(1/n) sum_i loss_fn(z_i, y_i)`` (true for mean
    cross-entropy and for MSE averaged over all entries), so ``H_L`` is block diagonal with
    per-sample blocks ``hessian(loss_fn)(z_i) / n``.
    """
    batches = list(batches)
    total = sum(int(y.shape[0]) for _, y in batches)
    flat, forward = _setup(model, params)
    p = flat.numel()
    out = torch.zeros(p, p, dtype=flat.dtype, device=flat.device)
    with curvature_mode(model, bn_mode):
        for inputs, targets in batches:
            n = targets.shape[0]
            outputs = forward(flat, inputs).detach()                       # (n, C)
            jac = jacrev(lambda w: forward(w, inputs))(flat)                # (n, C, P)
            per_sample = vmap(hessian(lambda z, y: loss_fn(z.unsqueeze(0), y.unsqueeze(0))))(
                outputs, targets)                                          # (n, C, C)
            ggn = torch.einsum("ncp,ncd,ndq->pq", jac, per_sample, jac) / n
            out += ggn * (n / total)
    return 0.5 * (out + out.T)
