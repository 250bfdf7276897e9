"""Diagonal approximations of curvature: the baseline the paper shows can be arbitrarily bad (Sec. 6.3-7.1).

Every network function here takes the curvature of the dataset's mean loss
``L(w) = sum_b (n_b / N) L_b(w)`` exactly as :mod:`curvature.operators` defines it (same batching,
batch-size weighting, parameter subsets, BatchNorm mode, dropout off) and returns a flat (P,) vector in
the operators' parameter order:

* :func:`matrix_diagonal`: ``diag(A)`` of a dense matrix;
* :func:`hessian_diagonal`: exact ``diag(H)`` from Hessian products with blocks of unit vectors;
* :func:`ggn_diagonal`: exact ``diag(G)`` by backpropagating the columns of the loss Hessian's square root;
* :func:`mc_ggn_diagonal`: Monte-Carlo ``diag(G)`` from squared per-sample gradients with sampled labels;
* :func:`hutchinson_diagonal`: ``E[z * (A z)]`` with Rademacher ``z`` for any operator;
* :func:`adam_diagonal`: ``sqrt(v)`` of Adam's second-moment state.

The backpropagation estimators need per-sample output Jacobians. When samples do not interact
(no BatchNorm, or ``bn_mode="eval"``) each sample is differentiated on its own under ``torch.func.vmap``;
with BatchNorm in ``train`` mode a sample's outputs depend on its whole batch, so the cotangent of each
sample is pulled back through the batch's forward pass instead (exact, but ``n_b`` times the work).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import vjp, vmap

from curvature.errors import SuiteError
from curvature.operators import CurvatureOperator, GGNOperator, HessianOperator, curvature_mode, mse_loss


@dataclass(frozen=True)
class DiagonalEstimate:
    """A stochastic diagonal: the mean over ``num_samples`` draws and its per-entry standard error."""

    mean: torch.Tensor          # (P,)
    std_error: torch.Tensor     # (P,) sample standard deviation of the draws / sqrt(num_samples)
    num_samples: int


def matrix_diagonal(matrix: torch.Tensor) -> torch.Tensor:
    """``diag(A)_i = A_ii`` of a dense square matrix (a copy)."""
    if matrix.dim() != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"need a square matrix, got shape {tuple(matrix.shape)}")
    return torch.diagonal(matrix).clone()


# --- exact diagonals -----------------------------------------------------------------------------
def hessian_diagonal(model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                     params: Optional[Sequence[str]] = None, chunk: int = 64) -> torch.Tensor:
    """Exact ``diag(H)_j = e_j^T H e_j`` from Hessian products with blocks of ``chunk`` unit vectors.

    Costs P Hessian-vector products over the dataset: meant for small models (P up to a few thousand).
    """
    op = HessianOperator(model, loss_fn, batches, bn_mode=bn_mode, params=params, check_deterministic=False)
    return operator_diagonal(op, chunk)


def operator_diagonal(op: CurvatureOperator, chunk: int = 64) -> torch.Tensor:
    """Exact ``diag(A)`` of any curvature operator from its products with blocks of unit vectors."""
    p = op.num_params
    out = torch.empty(p, dtype=op.dtype, device=op.device)
    for start in range(0, p, chunk):
        width = min(chunk, p - start)
        block = torch.zeros(p, width, dtype=op.dtype, device=op.device)
        block[start:start + width].fill_diagonal_(1.0)
        out[start:start + width] = torch.diagonal(op.matvec(block)[start:start + width])
    return out


def loss_hessian_sqrt(loss_fn: Callable, outputs: torch.Tensor) -> torch.Tensor:
    """Per-sample factors ``S_i`` (n, C, C) with ``S_i S_i^T = H_i``, the Hessian of the sample's loss.

    Cross-entropy: ``H_i = diag(p_i) - p_i p_i^T = S_i S_i^T`` with ``S_i = diag(sqrt p_i) - p_i sqrt(p_i)^T``
    (column c is ``sqrt(p_ic) (e_c - p_i)``). MSE averaged over the C outputs: ``H_i = (2/C) I``,
    ``S_i = sqrt(2/C) I``. The batch loss is the mean over samples, so ``H_L = blockdiag(H_i) / n``.
    """
    n, c = outputs.shape
    if loss_fn is F.cross_entropy:
        p = torch.softmax(outputs, dim=-1)
        root = p.sqrt()
        return torch.diag_embed(root) - p.unsqueeze(-1) * root.unsqueeze(-2)
    if loss_fn is mse_loss or loss_fn is F.mse_loss:
        eye = torch.eye(c, dtype=outputs.dtype, device=outputs.device) * (2.0 / c) ** 0.5
        return eye.expand(n, c, c)
    raise ValueError("the GGN diagonal needs the loss Hessian's square root: cross_entropy or mse")


def ggn_diagonal(model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                 params: Optional[Sequence[str]] = None, chunk_size: Optional[int] = 16) -> torch.Tensor:
    """Exact ``diag(G) = (1/N) sum_i sum_c (J_i^T S_i[:, c])^2`` (squares elementwise).

    ``J_i`` is the Jacobian of sample i's outputs in the parameters and ``S_i`` the loss Hessian's square
    root (:func:`loss_hessian_sqrt`): C backpropagations per sample. ``chunk_size`` samples are
    differentiated at once (memory ~ chunk_size * C * P).
    """
    op = _helper(model, loss_fn, batches, bn_mode, params)

    def cotangents(outputs, targets, gen):
        return loss_hessian_sqrt(loss_fn, outputs).transpose(1, 2)   # (n, K=C, C): rows are S's columns

    return _squared_pullbacks(op, cotangents, chunk_size, None).sum(0) / op.num_samples


def mc_ggn_diagonal(model: nn.Module, loss_fn: Callable, batches: Iterable, num_samples: int = 1,
                    bn_mode: str = "train", params: Optional[Sequence[str]] = None, seed: int = 0,
                    chunk_size: Optional[int] = 16) -> DiagonalEstimate:
    """Monte-Carlo ``diag(G) ~ (1/S) sum_s (1/N) sum_i (grad_w l(f(x_i), y~_is))^2`` (paper Fig. 7).

    The labels ``y~`` are drawn from the model's predictive distribution: ``Categorical(softmax(z_i))``
    for cross-entropy, ``N(z_i, (C/2) I)`` for MSE (whose loss Hessian is ``(2/C) I``). Then
    ``E[grad_z l grad_z l^T] = H_i``, so each draw's estimate (the "empirical Fisher with sampled labels")
    has expectation ``diag(G)``. Per-sample gradients are ``J_i^T grad_z l`` under ``torch.func.vmap``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    op = _helper(model, loss_fn, batches, bn_mode, params)
    if loss_fn is not F.cross_entropy and loss_fn is not mse_loss and loss_fn is not F.mse_loss:
        raise ValueError("the Monte-Carlo GGN diagonal samples from cross_entropy or mse predictives only")

    def cotangents(outputs, targets, gen):
        n, c = outputs.shape
        if loss_fn is F.cross_entropy:
            p = torch.softmax(outputs, dim=-1)
            labels = torch.multinomial(p.cpu().double(), num_samples, replacement=True, generator=gen)
            onehot = F.one_hot(labels, c).to(outputs.device, outputs.dtype)       # (n, S, C)
            return p.unsqueeze(1) - onehot                                          # grad_z l(z, y~)
        noise = torch.randn(n, num_samples, c, generator=gen, dtype=torch.float64).to(outputs)
        return -(2.0 / c) * (c / 2.0) ** 0.5 * noise                                # (2/C)(z - y~)

    draws = _squared_pullbacks(op, cotangents, chunk_size, seed) / op.num_samples  # (S, P)
    return _estimate(draws)


def hutchinson_diagonal(operator: CurvatureOperator | Callable, dim: int, num_samples: int,
                        block_size: int = 16, seed: int = 0, dtype: torch.dtype = torch.float64,
                        device="cpu") -> DiagonalEstimate:
    """Hutchinson's estimate ``diag(A) ~ (1/S) sum_s z_s * (A z_s)`` with Rademacher ``z_s``.

    ``operator`` is a curvature operator (its ``matvec`` is used) or any ``v -> A v`` taking (dim, k)
    blocks; ``block_size`` vectors go through one product. Unbiased: ``E[z_j (A z)_j] = A_jj``.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    matvec = operator.matvec if isinstance(operator, CurvatureOperator) else operator
    gen = torch.Generator().manual_seed(seed)
    draws = []
    for start in range(0, num_samples, block_size):
        k = min(block_size, num_samples - start)
        z = (torch.randint(0, 2, (dim, k), generator=gen) * 2 - 1).to(dtype=dtype, device=device)
        draws.append((z * matvec(z)).T)
    return _estimate(torch.cat(draws))


def adam_diagonal(optimizer_state: dict, model: nn.Module, params: Optional[Sequence[str]] = None,
                  bias_correction: bool = True) -> torch.Tensor:
    """Adam's implied diagonal curvature ``sqrt(v)`` from an optimiser ``state_dict()``, flat (P,).

    ``v`` is ``exp_avg_sq``; with ``bias_correction`` it is ``v / (1 - beta2^t)`` (what Adam divides the
    step by, less ``eps``), otherwise the raw state. The state's parameter indices are matched to
    ``model.parameters()`` order (how ``analysis=train`` builds the optimiser); ``params`` selects
    parameters by glob as the operators do.
    """
    from curvature.operators import select_parameters

    state, groups = optimizer_state.get("state", {}), optimizer_state.get("param_groups", [])
    if not state or not all("exp_avg_sq" in s for s in state.values()):
        raise SuiteError("the optimiser state holds no Adam second moments (exp_avg_sq): the checkpoint "
                         "was not trained with optimizer=adam")
    all_params = list(model.named_parameters())
    order = [i for g in groups for i in g["params"]]
    if len(order) != len(all_params):
        raise SuiteError(f"the optimiser state has {len(order)} parameters, the model {len(all_params)}: "
                         "choose the model the checkpoint was trained with")
    beta2 = {i: g.get("betas", (0.9, 0.999))[1] for g in groups for i in g["params"]}
    index = {name: i for (name, _), i in zip(all_params, order)}
    out = []
    for name in select_parameters(model, params):
        i = index[name]
        if i not in state:
            raise SuiteError(f"the Adam state has no entry for parameter {name}: it never received a gradient")
        v = state[i]["exp_avg_sq"].detach().to(torch.float64)
        if bias_correction:
            v = v / (1.0 - beta2[i] ** float(state[i]["step"]))
        out.append(v.sqrt().reshape(-1))
    return torch.cat(out)


# --- shared machinery ----------------------------------------------------------------------------
def _helper(model, loss_fn, batches, bn_mode, params) -> CurvatureOperator:
    """An operator object for its batching, parameter selection and ``forward_fn``/``flatten`` helpers."""
    return GGNOperator(model, loss_fn, batches, bn_mode=bn_mode, params=params, check_deterministic=False,
                       layerwise=False, cache="none")


def _estimate(draws: torch.Tensor) -> DiagonalEstimate:
    s = draws.shape[0]
    std = draws.std(0) if s > 1 else torch.full_like(draws[0], float("nan"))
    return DiagonalEstimate(draws.mean(0), std / s ** 0.5, s)


def _squared_pullbacks(op: CurvatureOperator, cotangents, chunk_size, seed) -> torch.Tensor:
    """``sum_i (J_i^T u_ik)^2`` over all samples, for cotangents ``u`` = ``cotangents(z, y, gen)`` (n, K, C).

    Returns (K, P). Samples are independent unless BatchNorm uses batch statistics (see module doc).
    """
    coupled = op.bn_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm)
                                            for m in op.model.modules())
    gen = torch.Generator().manual_seed(seed) if seed is not None else None
    params, total = op._selected(), None
    with curvature_mode(op.model, op.bn_mode), torch.no_grad():
        for inputs, targets in op.batches:
            if coupled:
                outputs, pullback = vjp(op.forward_fn(inputs), params)
            else:
                outputs = op.forward_fn(inputs)(params)
            u = cotangents(outputs.detach(), targets, gen)                       # (n, K, C)
            if coupled:
                squares = _coupled_squares(op, pullback, u, chunk_size)
            else:
                def one_sample(x, u_i):
                    _, pull = vjp(op.forward_fn(x.unsqueeze(0)), params)
                    grads = vmap(lambda t: pull(t.unsqueeze(0))[0])(u_i)          # {name: (K, *shape)}
                    return {n: g * g for n, g in grads.items()}
                per_sample = vmap(one_sample, chunk_size=chunk_size)(inputs, u)  # {name: (n, K, *shape)}
                squares = op.flatten({n: t.sum(0) for n, t in per_sample.items()}, batched=True).T
            total = squares if total is None else total + squares
    return total


def _coupled_squares(op, pullback, u, chunk_size) -> torch.Tensor:
    """(K, P) ``sum_i (J_i^T u_ik)^2`` with ``J_i`` the batch Jacobian of sample i's outputs."""
    n, k, c = u.shape
    out = torch.zeros(k, op.num_params, dtype=op.dtype, device=op.device)
    rows = torch.arange(n, device=u.device)
    for i in range(n):
        def pull(t, i=i):  # the cotangent is zero except on sample i
            full = torch.zeros(n, c, dtype=t.dtype, device=t.device)
            return op.flatten(pullback(full.index_copy(0, rows[i:i + 1], t.unsqueeze(0)))[0])
        grads = vmap(pull, chunk_size=chunk_size)(u[i])                          # (K, P)
        out += grads * grads
    return out
