"""Curvature operators of the mean loss over a dataset: Hessian and generalised Gauss-Newton.

For batches ``(x_b, y_b)`` of sizes ``n_b`` and a mean-reduced loss ``L_b(w) = loss_fn(f(x_b; w), y_b)``
the operators represent the curvature of the dataset's mean loss ``L(w) = sum_b (n_b / N) L_b(w)``:

* :class:`HessianOperator`: ``H = sum_b (n_b / N) d^2 L_b / dw^2`` (P x P, symmetric, indefinite);
* :class:`GGNOperator`: ``G = sum_b (n_b / N) J_b^T H_{L,b} J_b`` with ``J_b`` the Jacobian of the
  network outputs and ``H_{L,b}`` the Hessian of the loss in the outputs, taken in closed form for
  cross-entropy and MSE (P x P, positive semi-definite for convex losses).

``P`` is the number of selected parameters (all trainable ones in ``model.parameters()`` order, or the
subset matching ``params`` patterns). Vectors are flat (P,) or (P, k) tensors. Dropout is always off;
BatchNorm uses batch statistics (``bn_mode="train"``, the original package's default) or running
statistics (``"eval"``, PyHessian's choice), and never updates its running statistics during products.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from contextlib import contextmanager
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvature.errors import NumericalError, SuiteError

BN_MODES = ("train", "eval")


# --- losses whose Hessian in the outputs has a closed form ------------------------------------
def mse_loss(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all output entries; integer class targets become one-hot vectors."""
    if not targets.is_floating_point():
        classes = torch.arange(outputs.shape[-1], device=outputs.device)
        targets = (targets.unsqueeze(-1) == classes).to(outputs.dtype)  # one-hot, vmap-friendly
    # Written out: F.mse_loss's backward fails under forward-over-reverse ("ZeroTensors are immutable").
    return ((outputs - targets) ** 2).mean()


LOSSES = {"cross_entropy": F.cross_entropy, "mse": mse_loss}


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_hessian_product(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor,
                         u: torch.Tensor) -> torch.Tensor:
    """``H_L u`` with ``H_L`` the Hessian of the mean-reduced loss in the outputs.

    Closed forms: cross-entropy over n samples, ``H_i = (diag(p_i) - p_i p_i^T) / n`` with
    ``p_i = softmax(z_i)``; MSE (mean over all entries), ``H = 2 I / numel``. Any other loss: exact
    forward-over-reverse product in the (small) output space.
    """
    if loss_fn is F.cross_entropy:
        p = torch.softmax(outputs, dim=-1)
        return (p * u - p * (p * u).sum(-1, keepdim=True)) / outputs.shape[0]
    if loss_fn is mse_loss or loss_fn is F.mse_loss:
        return 2.0 * u / outputs.numel()
    return jvp(grad(lambda o: loss_fn(o, targets)), (outputs,), (u,))[1]


# --- BatchNorm / dropout handling -----------------------------------------------------------------
@contextmanager
def curvature_mode(model: nn.Module, bn_mode: str):
    """Dropout off; BatchNorm in batch-statistics (``train``) or running-statistics (``eval``) mode.

    In ``train`` mode running-statistic tracking is switched off for the duration, so BatchNorm
    normalises with batch statistics but writes nothing to its buffers: products are pure functions,
    as ``torch.func`` transforms need, and repeated products agree.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    try:
        yield model
    finally:
        for m, training, tracking in saved:
            m.training = training
            if tracking is not None:
                m.track_running_stats = tracking


def select_parameters(model: nn.Module, patterns: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the trainable parameters matching any glob pattern (all when ``patterns`` is None)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise SuiteError(f"no parameter matches {list(patterns)}; parameters are named like "
                             f"{', '.join(names[:4])}, ... (glob patterns, e.g. 'features.0.*')")
        return chosen
    return names


class CurvatureOperator:
    """Base class: batching, batch-size weighting, BatchNorm mode, parameter subsets, flat vectors.

    Subclasses implement :meth:`batch_product`, the curvature product of one mean-reduced batch loss.
    """

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                 params: Optional[Sequence[str]] = None, check_deterministic: bool = True,
                 progress: bool = False):
        self.model = model
        self.loss_fn = loss_fn
        self.bn_mode = bn_mode
        self.progress = progress
        self.batches = batches if iter(batches) is not batches else list(batches)
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.num_params = sum(self.sizes)
        self.dtype = named[self.names[0]].dtype
        self.device = named[self.names[0]].device
        self.num_samples = sum(int(y.shape[0]) for _, y in self.batches)
        if self.num_samples == 0:
            raise SuiteError("the operator's data is empty: check dataset.num_subsamples")
        self.num_products = 0
        self.product_seconds = 0.0
        if check_deterministic:
            self._check_deterministic()

    # --- parameters as dictionaries ------------------------------------------------------------
    def _fixed(self) -> dict:
        selected = set(self.names)
        params = {n: p.detach() for n, p in self.model.named_parameters() if n not in selected}
        params.update({n: b for n, b in self.model.named_buffers()})
        return params

    def _selected(self) -> dict:
        named = dict(self.model.named_parameters())
        return {n: named[n].detach() for n in self.names}

    def unflatten(self, v: torch.Tensor) -> dict:
        """Flat (P,) or (P, k) -> {name: (shape) or (k, *shape)}."""
        chunks = torch.split(v, self.sizes, dim=0)
        if v.dim() == 1:
            return {n: c.reshape(s) for n, c, s in zip(self.names, chunks, self.shapes)}
        return {n: c.T.reshape(v.shape[1], *s) for n, c, s in zip(self.names, chunks, self.shapes)}

    def flatten(self, tensors: dict, batched: bool = False) -> torch.Tensor:
        if batched:
            return torch.cat([tensors[n].reshape(tensors[n].shape[0], -1) for n in self.names], dim=1).T
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def forward_fn(self, inputs: torch.Tensor) -> Callable[[dict], torch.Tensor]:
        """``f(selected params) -> outputs`` with every other parameter and buffer held fixed."""
        fixed = self._fixed()
        return lambda selected: functional_call(self.model, {**fixed, **selected}, (inputs,))

    # --- the product -------------------------------------------------------------------------------
    def batch_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        """Curvature of ``loss_fn(f(inputs), targets)`` times ``vectors`` ({name: (k, *shape)})."""
        raise NotImplementedError

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The curvature of the dataset's mean loss times ``v`` ((P,) or (P, k))."""
        if v.shape[0] != self.num_params:
            raise ValueError(f"vector has {v.shape[0]} entries, the operator acts on {self.num_params}")
        single = v.dim() == 1
        block = (v.unsqueeze(1) if single else v).to(dtype=self.dtype, device=self.device)
        tangents = self.unflatten(block)
        params = self._selected()
        out = torch.zeros_like(block)
        start = time.perf_counter()
        with curvature_mode(self.model, self.bn_mode):
            for index, (inputs, targets) in enumerate(self.batches):
                weight = targets.shape[0] / self.num_samples
                product = self.flatten(self.batch_product(inputs, targets, params, tangents), batched=True)
                if not torch.all(torch.isfinite(product)):
                    raise NumericalError(f"{type(self).__name__} product is NaN/Inf on batch {index} "
                                         f"(product {self.num_products + 1}): check the checkpoint and data")
                out.add_(product, alpha=weight)
        self.num_products += 1
        self.product_seconds += time.perf_counter() - start
        return out.squeeze(1) if single else out

    __matmul__ = matvec

    def _check_deterministic(self) -> None:
        """Two products of one vector on the first batch must agree; warn if they do not."""
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(self.num_params, 1, generator=gen, dtype=torch.float64).to(self.dtype).to(self.device)
        tangents, params = self.unflatten(v), self._selected()
        products = []
        with curvature_mode(self.model, self.bn_mode):
            for _ in range(2):  # two separate passes: data that reshuffles or augments shows up too
                inputs, targets = next(iter(self.batches))
                products.append(self.flatten(self.batch_product(inputs, targets, params, tangents),
                                             batched=True))
        a, b = products
        tol = 1e-10 if self.dtype == torch.float64 else 1e-4
        if not torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp(min=1e-30))):
            warnings.warn(f"{type(self).__name__}: two products of the same vector differ: the model or "
                          "data is random (dropout, augmentation, shuffling?); Lanczos needs a fixed operator",
                          RuntimeWarning, stacklevel=3)
        self.deterministic = torch.equal(a, b) or torch.allclose(a, b, rtol=tol, atol=0)


class HessianOperator(CurvatureOperator):
    """The Hessian of the dataset's mean loss, P x P, as Hessian-vector products.

    ``mode="auto"`` (default) times both modes on the first batch and keeps the faster.
    ``mode="forward_over_reverse"``: ``jvp(grad(L), w, v)`` with ``torch.func``, one vector
    at a time (on CPU, ``vmap`` over the tangents of a small conv net measured 0.40 s per vector
    against 0.15 s for the loop). ``mode="reverse_over_reverse"``: Pearlmutter's double backward with
    autograd, reusing one gradient graph for the k vectors.
    """

    MODES = ("forward_over_reverse", "reverse_over_reverse")

    def __init__(self, *args, mode: str = "auto", **kwargs):
        if mode not in self.MODES + ("auto",):
            raise ValueError(f"mode must be auto, forward_over_reverse or reverse_over_reverse, got {mode!r}")
        self.mode = "forward_over_reverse" if mode == "auto" else mode
        super().__init__(*args, **kwargs)
        self.mode_seconds: dict[str, float] = {}
        if mode == "auto":
            self.mode = self._fastest_mode()

    def _fastest_mode(self) -> str:
        """Time one product of each mode on the first batch (after a warm-up); keep the faster.

        Which wins depends on the network and dtype: forward-over-reverse was faster for a small
        float64 CNN, reverse-over-reverse for a 1M-parameter float32 VGG (both on CPU).
        """
        inputs, targets = next(iter(self.batches))
        v = self.unflatten(torch.ones(self.num_params, 1, dtype=self.dtype, device=self.device))
        params = self._selected()
        with curvature_mode(self.model, self.bn_mode):
            for mode in self.MODES:
                self.mode = mode
                self.batch_product(inputs, targets, params, v)  # warm-up
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                start = time.perf_counter()
                self.batch_product(inputs, targets, params, v)
                if self.device.type == "cuda":
                    torch.cuda.synchronize(self.device)
                self.mode_seconds[mode] = time.perf_counter() - start
        return min(self.mode_seconds, key=self.mode_seconds.get)

    def batch_product(self, inputs, targets, params, vectors):
        f = self.forward_fn(inputs)
        if self.mode == "reverse_over_reverse":
            return self._double_backward(f, targets, params, vectors)
        gradient = grad(lambda p: self.loss_fn(f(p), targets))
        k = next(iter(vectors.values())).shape[0]
        columns = [jvp(gradient, (params,), ({n: t[j] for n, t in vectors.items()},))[1] for j in range(k)]
        return {n: torch.stack([c[n] for c in columns]) for n in params}

    def _double_backward(self, f, targets, params, vectors):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            loss = self.loss_fn(f(leaves), targets)
            grads = torch.autograd.grad(loss, list(leaves.values()), create_graph=True)
            k = next(iter(vectors.values())).shape[0]
            columns = []
            for j in range(k):
                dot = sum((g * vectors[n][j]).sum() for g, n in zip(grads, leaves))
                columns.append(torch.autograd.grad(dot, list(leaves.values()), retain_graph=j < k - 1))
        return {n: torch.stack([c[i] for c in columns]) for i, n in enumerate(leaves)}


class GGNOperator(CurvatureOperator):
    """The generalised Gauss-Newton matrix ``sum_b (n_b/N) J_b^T H_L J_b``, P x P, PSD for convex losses.

    Per batch, one vector: a single forward pass with dual numbers gives the outputs, ``J v`` and the
    graph for ``J^T u`` (measured 1.55x a gradient on a 1M-parameter VGG on CPU, against 2.0x for a
    ``jvp`` pass plus a ``vjp`` pass). Several vectors: one ``vjp`` pass shared by all, ``J v`` for all
    through one ``vmap`` of ``jvp``. ``H_L`` is taken in closed form (:func:`loss_hessian_product`).
    """

    def batch_product(self, inputs, targets, params, vectors):
        f = self.forward_fn(inputs)
        if next(iter(vectors.values())).shape[0] == 1:
            return self._dual_product(f, targets, params, vectors)
        outputs, pullback = vjp(f, params)
        outputs = outputs.detach()
        jv = vmap(lambda t: jvp(f, (params,), (t,))[1], randomness="different")(vectors)
        hjv = vmap(lambda u: loss_hessian_product(self.loss_fn, outputs, targets, u))(jv)
        return vmap(lambda u: pullback(u)[0])(hjv)


    def _dual_product(self, f, targets, params, vectors):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            with fwAD.dual_level():
                outputs = f({n: fwAD.make_dual(leaves[n], vectors[n][0]) for n in leaves})
                primal, jv = fwAD.unpack_dual(outputs)
            # The backward runs outside the dual level: inside it, autograd would also push
            # tangents through the backward ops (the Hessian's work), measured 2x slower.
            hjv = loss_hessian_product(self.loss_fn, primal.detach(), targets, jv)
            grads = torch.autograd.grad(primal, list(leaves.values()), grad_outputs=hjv)
        return {n: g.unsqueeze(0) for n, g in zip(leaves, grads)}


OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}


def make_operator(name: str, model: nn.Module, loss_fn: Callable, batches, **kwargs) -> CurvatureOperator:
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}: choose one of {', '.join(OPERATORS)}")
    if name != "hessian":
        kwargs.pop("mode", None)
    return OPERATORS[name](model, loss_fn, batches, **kwargs)
