"""Curvature operators of the mean loss over a dataset: Hessian and generalised Gauss-Newton.

For batches ``(x_b, y_b)`` and a batch loss ``L_b(w) = loss_fn(f(x_b; w), y_b)`` the operators represent
the curvature of the dataset's loss ``L(w) = sum_b c_b L_b(w)``: for a mean, ``c_b = D_b / sum D`` with
``D_b`` what the batch's mean divides by (samples ``n_b``, or counted tokens; :mod:`curvature.losses`), so
``L`` is the loss of the whole dataset as one batch; for a sum, ``c_b = 1``:

* :class:`HessianOperator`: ``H = sum_b c_b d^2 L_b / dw^2`` (P x P, symmetric, indefinite);
* :class:`GGNOperator`: ``G = sum_b c_b J_b^T H_{L,b} J_b`` with ``J_b`` the Jacobian of the
  network outputs and ``H_{L,b}`` the Hessian of the loss in the outputs, taken in closed form for
  cross-entropy and MSE (P x P, positive semi-definite for convex losses).

``P`` is the number of selected parameters (all trainable ones in ``model.parameters()`` order, or the
subset matching ``params`` patterns). Vectors are flat (P,) or (P, k) tensors. Dropout is always off;
BatchNorm uses batch statistics (``bn_mode="train"``, the original package's default) or running
statistics (``"eval"``, PyHessian's choice), and never updates its running statistics during products
(:func:`~curvature.functional.curvature_mode`).

The parts, one job each: this module checks the arguments, flattens the parameters and runs the product
loop over the batches; a subclass writes the product of one batch. Which route the products take
(forward-mode AD or not, layer-wise or autograd, the Hessian's mode) is decided on the first batch by
:mod:`curvature.routes` (``engine`` says which, ``layerwise_reason`` why not layer-wise); per-batch primal
reuse within a memory budget (``cache``) is :mod:`curvature.graph_cache`; the check that the operator is a
fixed matrix is :mod:`curvature.determinism`; losses and their output Hessians are :mod:`curvature.losses`,
the data :mod:`curvature.batches`.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.autograd.forward_ad as fwAD
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, grad, jvp, vjp, vmap

from curvature import determinism
from curvature.batches import OperatorData, model_outputs
from curvature.errors import NumericalError, SuiteError
from curvature.functional import BN_MODES, Hooked, curvature_mode, select_parameters
from curvature.graph_cache import (CACHE_MEMORY_FRACTION, CACHE_MODES, GraphCache, OutOfMemory,
                                   free_memory_bytes)
from curvature.linear_operator import SymmetricOperatorMixin
from curvature.losses import as_loss, mse_loss
from curvature.microbatch import operator_batch_product
from curvature.routes import (LAYERWISE_CHECK_TOLERANCE, LAYERWISE_CHOICES, fastest_mode,
                              layerwise_plan, preflight)

__all__ = [
    # the operators
    "CurvatureOperator", "HessianOperator", "GGNOperator", "OPERATORS", "make_operator",
    # losses by config name
    "LOSSES", "get_loss", "loss_hessian_product", "mse_loss",
    # from the parts, under the names the suite imports from here
    "BN_MODES", "curvature_mode", "select_parameters",
    "CACHE_MODES", "CACHE_MEMORY_FRACTION", "OutOfMemory", "free_memory_bytes",
    "LAYERWISE_CHOICES", "LAYERWISE_CHECK_TOLERANCE",
]

# --- losses by config name (their rules live in curvature.losses) ---------------------------------
#: the losses the configs name, as the plain functions the rest of the suite passes around
LOSSES = {"cross_entropy": F.cross_entropy, "mse": mse_loss}


def get_loss(name: str) -> Callable:
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}: choose one of {', '.join(LOSSES)}")
    return LOSSES[name]


def loss_hessian_product(loss_fn: Callable, outputs: torch.Tensor, targets: torch.Tensor,
                         u: torch.Tensor) -> torch.Tensor:
    """``H_L u`` with ``H_L`` the Hessian of the batch loss in the outputs (:mod:`curvature.losses`)."""
    return as_loss(loss_fn).hessian_product(outputs, targets, u)


class CurvatureOperator(SymmetricOperatorMixin):
    """Base class: batching, batch weights, BatchNorm mode, parameter subsets, flat vectors; the product loop.

    ``op @ v`` is ``op.matvec(v)``; ``op.to_scipy()`` is a ``scipy.sparse.linalg.LinearOperator``
    (:mod:`curvature.linear_operator`); ``op.dtype`` and ``op.device`` are the parameters'.

    A subclass writes the curvature product of one mean-reduced batch loss: :meth:`_fresh_product`
    (primal recomputed), :meth:`_prepare` + :meth:`_cached_product` (primal kept per batch) and
    :meth:`_layerwise_column` (through the layer-wise plan). ``cache=None`` takes the class's
    ``default_cache``, or ``"auto"`` for layer-wise products.
    """

    default_cache = "auto"
    #: whether the layer-wise primal keeps the gradients (the Hessian's products need them)
    layerwise_gradients = False

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                 params: Optional[Sequence[str]] = None, check_deterministic: bool = True,
                 progress: bool = False, cache: Optional[str] = None, cache_budget_bytes: Optional[int] = None,
                 layerwise="auto", check_layerwise: bool = True, forward: Optional[Callable] = None,
                 unpack: Optional[Callable] = None):
        if cache is not None and cache not in CACHE_MODES:
            raise ValueError(f"cache must be auto, all or none, got {cache!r}")
        if layerwise not in LAYERWISE_CHOICES:
            raise ValueError(f"layerwise must be auto, true or false, got {layerwise!r}")
        self.model, self.bn_mode, self.progress, self.forward = model, bn_mode, progress, forward
        self.loss = self.loss_fn = as_loss(loss_fn)
        self._hooked = None if forward is None else Hooked(model, forward)
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self.shapes = [named[n].shape for n in self.names]
        self.sizes = [named[n].numel() for n in self.names]
        self.num_params = sum(self.sizes)
        self.dtype = named[self.names[0]].dtype
        self.device = named[self.names[0]].device
        self.data = OperatorData(batches, self.loss, unpack, self.device)
        self.batches = self.data.batches
        self.num_samples = self.data.num_samples
        self.notes = list(self.data.notes)
        self.num_products = 0
        self.product_seconds = 0.0
        self.graph_cache = GraphCache(model, self.batches, self.device, "none")  # none while choosing a route
        self.plan = None  # autograd products until the layer-wise plan is built and checked
        self.forward_ad, self.forward_ad_reason = True, ""
        if check_layerwise:  # the first operator of a model checks; later ones (an optimiser's) trust it
            preflight(self)
        self.plan, self.layerwise_reason = layerwise_plan(self, layerwise, check_layerwise)
        # The layer-wise primal is small and saves a forward pass (and, for the Hessian, a backward
        # pass) per product, so it is cached by default for both operators.
        self.cache = cache if cache is not None else "auto" if self.plan is not None else self.default_cache
        self.graph_cache = GraphCache(model, self.batches, self.device, self.cache, cache_budget_bytes,
                                      owner=type(self).__name__)
        self.cache_budget_bytes = self.graph_cache.budget_bytes
        if check_deterministic:
            self.deterministic = determinism.check_deterministic(self)

    @property
    def engine(self) -> str:
        """``layerwise`` (hand-written R-operator products) or ``autograd``."""
        return "layerwise" if self.plan is not None else "autograd"

    # --- the graph cache, under the names the rest of the suite reads -----------------------------
    @property
    def cache_bytes(self) -> int:
        return self.graph_cache.bytes

    @property
    def _graphs(self) -> dict:
        return self.graph_cache.graphs

    @property
    def _caching(self) -> bool:
        return self.graph_cache.enabled

    def clear_cache(self) -> None:
        """Forget every cached batch graph (they are rebuilt on the next product)."""
        self.graph_cache.clear()

    def stop_caching(self) -> None:
        """Memory is short: drop every cached graph and recompute the primal for the rest of this operator."""
        self.graph_cache.stop()

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
        return lambda selected: self._call({**fixed, **selected}, inputs)

    def _call(self, params: dict, inputs) -> torch.Tensor:
        """The model's outputs with ``params`` ({name: tensor} for every parameter and buffer)."""
        if self._hooked is not None:
            out = functional_call(self._hooked, {f"model.{n}": t for n, t in params.items()}, (inputs,))
        elif isinstance(inputs, dict):
            out = functional_call(self.model, params, (), inputs)
        else:
            out = functional_call(self.model, params, (inputs,))
        return model_outputs(out)

    # --- the product ---------------------------------------------------------------------------
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
                weight = self.data.weights[index]
                if weight == 0.0:  # nothing counted in this batch (every target ignored)
                    continue
                product = self.flatten(operator_batch_product(self, index, inputs, targets, params, tangents),
                                       batched=True)  # on CUDA OOM: micro-batches, recombined by size
                if not torch.all(torch.isfinite(product)):
                    raise NumericalError(f"{type(self).__name__} product is NaN/Inf on batch {index} "
                                         f"(product {self.num_products + 1}): check the checkpoint and data")
                out.add_(product, alpha=weight)
        self.num_products += 1
        self.product_seconds += time.perf_counter() - start
        return out.squeeze(1) if single else out

    def batch_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        """Curvature of ``loss_fn(f(inputs), targets)`` times ``vectors`` ({name: (k, *shape)}).

        From the batch's cached primal when there is one (or one can be built within the budget),
        otherwise with the primal recomputed.
        """
        primal = self.graph_cache.get(inputs, targets, lambda: self._primal(inputs, targets, params))
        if self.plan is not None:
            if primal is None:
                primal = self._layerwise_prepare(inputs, targets, params)
            return self._layerwise_product(primal, targets, vectors)
        if primal is None:
            return self._fresh_product(inputs, targets, params, vectors)
        return self._cached_product(primal, targets, vectors)

    def _primal(self, inputs, targets, params: dict):
        """The vector-independent part of a product on one batch, as the cache keeps it."""
        if self.plan is not None:
            return self._layerwise_prepare(inputs, targets, params)
        return self._prepare(inputs, targets, {n: p.detach().requires_grad_(True) for n, p in params.items()})

    def _layerwise_prepare(self, inputs, targets, params: dict):
        return self.plan.prepare(inputs, targets, {**self._fixed(), **params}, gradients=self.layerwise_gradients)

    def _layerwise_product(self, primal: dict, targets, vectors: dict) -> dict:
        k = next(iter(vectors.values())).shape[0]
        columns = [self._layerwise_column(primal, targets, {n: t[j] for n, t in vectors.items()})
                   for j in range(k)]
        return {n: torch.stack([c[n] for c in columns]) for n in self.names}

    # --- what a subclass writes: the product of one batch ----------------------------------------
    def _fresh_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        raise NotImplementedError

    def _prepare(self, inputs, targets, leaves: dict) -> tuple:
        """The vector-independent part of an autograd product on one batch (kept in the cache)."""
        raise NotImplementedError

    def _cached_product(self, graph: tuple, targets, vectors: dict) -> dict:
        raise NotImplementedError

    def _layerwise_column(self, primal: dict, targets, vector: dict) -> dict:
        """One vector's product through the layer-wise plan."""
        raise NotImplementedError


class HessianOperator(CurvatureOperator):
    """The Hessian of the dataset's mean loss, P x P, as Hessian-vector products.

    ``mode="auto"`` (default) times both modes on the first batch and keeps the faster.
    ``mode="forward_over_reverse"``: ``jvp(grad(L), w, v)`` with ``torch.func``, one vector
    at a time (on CPU, ``vmap`` over the tangents of a small conv net measured 0.40 s per vector
    against 0.15 s for the loop). ``mode="reverse_over_reverse"``: Pearlmutter's double backward with
    autograd, reusing one gradient graph for the k vectors. With the cache on (default), the
    gradient graph of each batch (``create_graph=True``) is kept and every later product is one
    backward pass through it per vector; ``mode`` then only matters for batches beyond the budget,
    and ``auto`` takes reverse-over-reverse without timing (it builds the same graph).
    """

    MODES = ("forward_over_reverse", "reverse_over_reverse")
    layerwise_gradients = True

    def __init__(self, *args, mode: str = "auto", **kwargs):
        if mode not in self.MODES + ("auto",):
            raise ValueError(f"mode must be auto, forward_over_reverse or reverse_over_reverse, got {mode!r}")
        self.requested_mode = mode
        self.mode = "reverse_over_reverse" if mode == "auto" else mode
        super().__init__(*args, **kwargs)
        self.mode_seconds: dict[str, float] = {}
        if mode == "auto" and self.cache == "none" and self.plan is None and self.forward_ad:
            self.mode, self.mode_seconds = fastest_mode(self, self.MODES)

    def _layerwise_column(self, primal, targets, vector):
        return self.plan.hessian(primal, targets, vector)

    def _prepare(self, inputs, targets, leaves):
        loss = self.loss_fn(self.forward_fn(inputs)(leaves), targets)
        return leaves, torch.autograd.grad(loss, list(leaves.values()), create_graph=True)

    def _cached_product(self, graph, targets, vectors):
        leaves, grads = graph
        k = next(iter(vectors.values())).shape[0]
        with torch.enable_grad():
            columns = [torch.autograd.grad(grads, list(leaves.values()), [vectors[n][j] for n in leaves],
                                           retain_graph=True) for j in range(k)]
        return {n: torch.stack([c[i] for c in columns]) for i, n in enumerate(leaves)}

    def _fresh_product(self, inputs, targets, params, vectors):
        f = self.forward_fn(inputs)
        if self.mode == "forward_over_reverse" and not self.forward_ad:
            raise SuiteError(f"operator.hvp_mode=forward_over_reverse needs forward-mode AD, which this model "
                             f"lacks ({self.forward_ad_reason}); set operator.hvp_mode=auto")
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
    """The generalised Gauss-Newton matrix ``sum_b c_b J_b^T H_L J_b``, P x P, PSD for convex losses.

    Per batch, one vector: a single forward pass with dual numbers gives the outputs, ``J v`` and the
    graph for ``J^T u`` (measured 1.55x a gradient on a 1M-parameter VGG on CPU, against 2.0x for a
    ``jvp`` pass plus a ``vjp`` pass). Several vectors: one ``vjp`` pass shared by all, ``J v`` for all
    through one ``vmap`` of ``jvp``. ``H_L`` is taken in closed form (:func:`loss_hessian_product`).

    Cached (default): per batch the forward graph and the graph of ``J^T u`` for a symbolic ``u``
    (``create_graph=True``) are kept; then ``J v`` is a backward pass of ``<J^T u, v>`` in ``u`` and
    ``J^T (H_L J v)`` a backward pass of the forward graph: no forward pass per product. Off by default
    (``default_cache = "none"``): on a CPU VGG it measured no faster than the dual-number path
    (about 1.5x a gradient either way) and it holds two graphs per batch.
    """

    default_cache = "none"

    def _layerwise_column(self, primal, targets, vector):
        return self.plan.ggn(primal, targets, vector)

    def _prepare(self, inputs, targets, leaves):
        outputs = self.forward_fn(inputs)(leaves)
        u = torch.zeros_like(outputs, requires_grad=True)
        jtu = torch.autograd.grad(outputs, list(leaves.values()), u, create_graph=True, materialize_grads=True)
        return leaves, outputs, u, jtu

    def _cached_product(self, graph, targets, vectors):
        leaves, outputs, u, jtu = graph
        primal = outputs.detach()
        k = next(iter(vectors.values())).shape[0]
        columns = []
        with torch.enable_grad():
            for j in range(k):
                (jv,) = torch.autograd.grad(jtu, u, [vectors[n][j] for n in leaves], retain_graph=True)
                hjv = self.loss.hessian_product(primal, targets, jv)
                columns.append(torch.autograd.grad(outputs, list(leaves.values()), hjv, retain_graph=True,
                                                   materialize_grads=True))
        return {n: torch.stack([c[i] for c in columns]) for i, n in enumerate(leaves)}

    def _fresh_product(self, inputs, targets, params, vectors):
        f = self.forward_fn(inputs)
        if not self.forward_ad:
            return self._reverse_product(inputs, targets, params, vectors)
        if next(iter(vectors.values())).shape[0] == 1:
            return self._dual_product(f, targets, params, vectors)
        outputs, pullback = vjp(f, params)
        outputs = outputs.detach()
        jv = vmap(lambda t: jvp(f, (params,), (t,))[1], randomness="different")(vectors)
        hjv = vmap(lambda u: self.loss.hessian_product(outputs, targets, u))(jv)
        return vmap(lambda u: pullback(u)[0])(hjv)

    def _dual_product(self, f, targets, params, vectors):
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            with fwAD.dual_level():
                outputs = f({n: fwAD.make_dual(leaves[n], vectors[n][0]) for n in leaves})
                primal, jv = fwAD.unpack_dual(outputs)
            # The backward runs outside the dual level: inside it, autograd would also push
            # tangents through the backward ops (the Hessian's work), measured 2x slower.
            hjv = self.loss.hessian_product(primal.detach(), targets, jv)
            grads = torch.autograd.grad(primal, list(leaves.values()), grad_outputs=hjv)
        return {n: g.unsqueeze(0) for n, g in zip(leaves, grads)}

    def _reverse_product(self, inputs, targets, params, vectors):
        """Reverse mode only (models whose kernels lack forward-mode AD): ``J v`` as the derivative of
        ``<J^T u, v>`` in ``u``, through the graph of the cached route built for this product alone."""
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        with torch.enable_grad():
            graph = self._prepare(inputs, targets, leaves)
        return self._cached_product(graph, targets, vectors)


def _fisher(*args, **kwargs) -> CurvatureOperator:
    from curvature.fisher import FisherOperator  # it subclasses this module's base class: imported late
    return FisherOperator(*args, **kwargs)


OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator, "fisher": _fisher}
#: options only one operator takes (callers pass them whatever the name); the others drop them
_OPTION_OWNERS = {"mode": "hessian", "kind": "fisher", "mc_samples": "fisher", "seed": "fisher"}


def make_operator(name: str, model: nn.Module, loss_fn: Callable, batches, product: str = "exact",
                  fd_step="auto", richardson: bool = False, **kwargs) -> CurvatureOperator:
    """The operator ``name``; ``product="finite_difference"``: the Hessian from central differences of
    gradients, with ``fd_step`` ("auto" or a number) and ``richardson`` (:mod:`curvature.finite_difference`)."""
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}: choose one of {', '.join(OPERATORS)}")
    for key, owner in _OPTION_OWNERS.items():
        if name != owner:
            kwargs.pop(key, None)
    if product != "exact":
        from curvature.finite_difference import PRODUCTS, finite_difference_operator  # it subclasses the base
        if product not in PRODUCTS:
            raise ValueError(f"product must be exact or finite_difference, got {product!r}")
        return finite_difference_operator(name, model, loss_fn, batches, fd_step, richardson, **kwargs)
    return OPERATORS[name](model, loss_fn, batches, **kwargs)
