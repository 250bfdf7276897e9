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

Primal reuse (``cache``): a product's first half (the forward pass and, for the Hessian, the gradient
with its graph) depends only on the batch and the weights, not on the vector. With ``cache="auto"``
(default) each batch keeps that graph after its first product, while the graphs fit a memory budget
(default a quarter of the free device memory), and later products only run the second half: measured
2x fewer seconds per Hessian product on a CPU VGG. Batches beyond the budget, ``cache="none"`` and a
CUDA out-of-memory error while building a graph fall back to recomputing the primal every product.
A cached graph is dropped when the weights, buffers or batch tensors change (version counters).

Layer-wise products (``layerwise="auto"``, default): for a model that is a chain of standard layers
(the suite's VGGs, MLP and SmallCNN, or any ``nn.Sequential`` of Conv2d/Linear/ReLU/Tanh/Sigmoid/pooling/
Flatten/Dropout and running-statistics BatchNorm) with cross-entropy or MSE, products are written out
layer by layer (:mod:`curvature.layerwise`, Pearlmutter's R-operator) with the fastest convolution
kernels instead of autograd's double backward: measured 1.3x faster than autograd's cached product on
a CPU VGG. The operator checks one product against autograd on the first batch and falls back to
autograd (with a warning) if they differ; anything else (ResNets, BatchNorm with batch statistics,
other losses) uses autograd. ``engine`` says which is in use, ``layerwise_reason`` why not.
"""

from __future__ import annotations

import copy
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
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvature.batches import OperatorData, model_outputs, slice_inputs, versions
from curvature.errors import NumericalError, SuiteError
from curvature.losses import as_loss, mse_loss
from curvature.microbatch import operator_batch_product

BN_MODES = ("train", "eval")
CACHE_MODES = ("auto", "all", "none")
LAYERWISE_CHOICES = ("auto", True, False)
#: the float64 cross-check of layer-wise against autograd products must agree to this relative error
LAYERWISE_CHECK_TOLERANCE = 1e-9
OutOfMemory = getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError)
#: ``cache="auto"`` keeps graphs while they take at most this share of the free device memory.
CACHE_MEMORY_FRACTION = 0.25


# --- losses (their rules live in curvature.losses) ---------------------------------------------
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


# --- BatchNorm / dropout handling -----------------------------------------------------------------
@contextmanager
def curvature_mode(model: nn.Module, bn_mode: str):
    """Dropout off; BatchNorm in batch-statistics (``train``) or running-statistics (``eval``) mode;
    attention through twice-differentiable kernels.

    In ``train`` mode running-statistic tracking is switched off for the duration, so BatchNorm
    normalises with batch statistics but writes nothing to its buffers: products are pure functions,
    as ``torch.func`` transforms need, and repeated products agree.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    # Attention through the composite (math) kernels: the fused ones (flash / memory-efficient SDPA,
    # nn.MultiheadAttention's fast path) have neither forward-mode nor second derivatives.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
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

    Subclasses implement the curvature product of one mean-reduced batch loss: :meth:`_fresh_product`
    (primal recomputed) and :meth:`_prepare` + :meth:`_cached_product` (primal kept per batch).
    ``cache=None`` takes the class's ``default_cache``.
    """

    default_cache = "auto"

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                 params: Optional[Sequence[str]] = None, check_deterministic: bool = True,
                 progress: bool = False, cache: Optional[str] = None, cache_budget_bytes: Optional[int] = None,
                 layerwise="auto", check_layerwise: bool = True, forward: Optional[Callable] = None,
                 unpack: Optional[Callable] = None):
        if cache is not None and cache not in CACHE_MODES:
            raise ValueError(f"cache must be auto, all or none, got {cache!r}")
        if layerwise not in LAYERWISE_CHOICES:
            raise ValueError(f"layerwise must be auto, true or false, got {layerwise!r}")
        self.model = model
        self.loss = as_loss(loss_fn)
        self.loss_fn = self.loss
        self.bn_mode = bn_mode
        self.progress = progress
        self.forward = forward
        self._hooked = None if forward is None else _Hooked(model, forward)
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
        self._graphs: dict[int, tuple] = {}
        self.cache_bytes = 0
        self._caching = False
        self.plan = None  # autograd products until the layer-wise plan is built and checked
        self.forward_ad, self.forward_ad_reason = True, ""
        if check_layerwise:  # the first operator of a model checks; later ones (an optimiser's) trust it
            self._preflight()
        self.plan, self.layerwise_reason = self._layerwise_plan(layerwise, check_layerwise)
        # The layer-wise primal is small and saves a forward pass (and, for the Hessian, a backward
        # pass) per product, so it is cached by default for both operators.
        cache = cache if cache is not None else "auto" if self.plan is not None else self.default_cache
        self.cache = cache
        self.cache_budget_bytes = (None if cache != "auto" else
                                   cache_budget_bytes if cache_budget_bytes is not None else
                                   int(CACHE_MEMORY_FRACTION * free_memory_bytes(self.device)))
        self._caching = cache != "none"
        if check_deterministic:
            self._check_deterministic()

    @property
    def engine(self) -> str:
        """``layerwise`` (hand-written R-operator products) or ``autograd``."""
        return "layerwise" if self.plan is not None else "autograd"

    def _layerwise_plan(self, choice, check: bool = True) -> tuple:
        """The layer-wise plan when the model and loss allow it and it matches autograd.

        ``choice``: ``"auto"`` (use it when possible), ``True`` (required: a one-line error otherwise),
        ``False`` (autograd products). The check (:meth:`_layerwise_error`) compares one product with
        autograd's in float64; callers that build many operators of one model (an optimiser,
        per-batch statistics) check the first only.
        """
        from curvature.layerwise import build_plan

        if choice is False:
            return None, "operator.layerwise=false"
        if self.forward is not None or not torch.is_tensor(self.batches[0][0]):
            plan, reason = None, "the model takes a forward hook or dict inputs"
        else:
            plan, reason = build_plan(self.model, self.loss_fn, self.names, self.bn_mode)
        if plan is not None and check:
            error = self._layerwise_error()
            if not error <= LAYERWISE_CHECK_TOLERANCE:  # NaN fails too
                plan, reason = None, f"layer-wise product differs from autograd's by {error:.1e} (float64)"
                warnings.warn(f"{type(self).__name__}: {reason}; using autograd products", RuntimeWarning,
                              stacklevel=4)
        if plan is None and choice is True:
            raise SuiteError(f"operator.layerwise=true but the layer-wise products do not apply: {reason}; "
                             "set operator.layerwise=auto")
        return plan, reason

    def _layerwise_error(self) -> float:
        """Relative difference of a layer-wise and an autograd product, in float64 on a few samples.

        Float64 separates a wrong layer chain from rounding: in float32 two exact methods already
        differ by up to 1e-3 relative on a VGG at initialisation (cancellation in the product).
        Runs on a float64 copy of the model (unless it is float64) and the first batch's first 8 samples.
        """
        from curvature.layerwise import build_plan

        probe = copy.copy(self)  # same settings (Hessian mode, names, BN mode); its own model and data
        probe.model = self.model if self.dtype == torch.float64 else copy.deepcopy(self.model).to(torch.float64)
        inputs, targets = next(iter(self.batches))
        inputs, targets = (t[:8].to(torch.float64) if t.is_floating_point() else t[:8] for t in (inputs, targets))
        probe.batches, probe.dtype, probe.plan = [(inputs, targets)], torch.float64, None
        probe._graphs, probe._caching = {}, False
        gen = torch.Generator().manual_seed(1)
        tangents = probe.unflatten(torch.randn(self.num_params, 1, generator=gen, dtype=torch.float64).to(self.device))
        params = probe._selected()
        with curvature_mode(probe.model, self.bn_mode):
            reference = probe.flatten(probe._fresh_product(inputs, targets, params, tangents), batched=True)
            probe.plan = build_plan(probe.model, self.loss_fn, self.names, self.bn_mode)[0]
            got = probe.flatten(probe._layerwise_product(probe._layerwise_prepare(inputs, targets, params),
                                                         targets, tangents), batched=True)
        return float((got - reference).norm() / reference.norm().clamp(min=1e-300))

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

    # --- the first batch, before any long computation -------------------------------------------
    def _preflight(self) -> None:
        """One product on 4 samples of the first batch with the route this operator will take.

        Finds out in seconds whether forward-mode AD runs through the model (some fused kernels have no
        forward-mode formula: then only reverse-mode routes are used, ``forward_ad_reason`` says why) and
        whether the model can be differentiated twice at all; if not, a one-line error names the module.
        """
        inputs, targets = self.batches[0]
        n = int(targets.shape[0])
        x, y = slice_inputs(inputs, n, min(n, 4)), targets[:min(n, 4)]
        gen = torch.Generator().manual_seed(2)
        v = self.unflatten(torch.randn(self.num_params, 1, generator=gen, dtype=torch.float64)
                           .to(dtype=self.dtype, device=self.device))
        params = self._selected()
        with curvature_mode(self.model, self.bn_mode):
            try:
                jvp(self.forward_fn(x), (params,), ({k: t[0] for k, t in v.items()},))
            except Exception as exc:  # noqa: BLE001 - any failure means: no forward-mode route
                self.forward_ad, self.forward_ad_reason = False, _first_line(exc)
            try:
                self._fresh_product(x, y, params, v)
            except SuiteError:
                raise
            except Exception as exc:  # noqa: BLE001 - reported as one line naming the module
                raise SuiteError(_failure_message(self, x, y, params, exc)) from exc

    # --- the product -------------------------------------------------------------------------------
    def batch_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        """Curvature of ``loss_fn(f(inputs), targets)`` times ``vectors`` ({name: (k, *shape)}).

        From the batch's cached graph when there is one (or one can be built within the budget),
        otherwise by :meth:`_fresh_product`, which recomputes the primal.
        """
        graph = self._graph(inputs, targets, params) if self._caching and self._own_batch(inputs) else None
        if graph is None:
            if self.plan is not None:
                return self._layerwise_product(self._layerwise_prepare(inputs, targets, params), targets, vectors)
            return self._fresh_product(inputs, targets, params, vectors)
        if self.plan is not None:
            return self._layerwise_product(graph, targets, vectors)
        return self._cached_product(graph, targets, vectors)

    #: the layer-wise product this operator takes: ``"hessian"`` or ``"ggn"``
    layerwise_kind = ""

    def _layerwise_prepare(self, inputs, targets, params: dict):
        return self.plan.prepare(inputs, targets, {**self._fixed(), **params},
                                 gradients=self.layerwise_kind == "hessian")

    def _layerwise_product(self, primal: dict, targets, vectors: dict) -> dict:
        product = getattr(self.plan, self.layerwise_kind)
        k = next(iter(vectors.values())).shape[0]
        columns = [product(primal, targets, {n: t[j] for n, t in vectors.items()}) for j in range(k)]
        return {n: torch.stack([c[n] for c in columns]) for n in self.names}

    def _fresh_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        raise NotImplementedError

    def _prepare(self, inputs, targets, params: dict) -> tuple:
        """The vector-independent part of a product on one batch (kept in the cache)."""
        raise NotImplementedError

    def _cached_product(self, graph: tuple, targets, vectors: dict) -> dict:
        raise NotImplementedError

    def _own_batch(self, inputs) -> bool:
        """Only the operator's own stored batches are cached: not micro-batch slices, not data that
        a re-iterable source yields afresh on every pass."""
        return isinstance(self.batches, (list, tuple)) and any(inputs is b[0] for b in self.batches)

    def _state_key(self) -> tuple:
        """Identity and version of every parameter and buffer: any in-place update changes it."""
        return tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))

    def _graph(self, inputs, targets, params: dict) -> Optional[tuple]:
        """The batch's cached graph, building it when the budget allows; None means recompute."""
        key = (self._state_key(), versions(inputs), targets._version)
        entry = self._graphs.get(id(inputs))
        if entry is not None and entry[0] is inputs and entry[1] is targets and entry[2] == key:
            return entry[3]
        if entry is not None or (self._graphs and next(iter(self._graphs.values()))[2][0] != key[0]):
            self.clear_cache()  # weights or data changed: every graph is stale
        leaves = {n: p.detach().requires_grad_(True) for n, p in params.items()}
        shared = {_storage(t) for t in (*self.model.parameters(), *self.model.buffers(), *_tensors(inputs), targets)}
        storages: dict[int, int] = {}

        def pack(t: torch.Tensor) -> torch.Tensor:  # counts what the graph keeps alive beyond the model
            if _storage(t) not in shared:
                storages[_storage(t)] = t.untyped_storage().nbytes()
            return t

        try:
            with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                graph = (self._layerwise_prepare(inputs, targets, params) if self.plan is not None
                         else self._prepare(inputs, targets, leaves))
        except OutOfMemory:
            self.stop_caching()
            warnings.warn(f"{type(self).__name__}: out of memory while caching a batch graph; "
                          "recomputing the primal for every product from now on", RuntimeWarning, stacklevel=4)
            return None
        for t in _tensors(graph):
            if _storage(t) not in shared:
                storages[_storage(t)] = t.untyped_storage().nbytes()
        size = sum(storages.values())
        if self.cache_budget_bytes is None or self.cache_bytes + size <= self.cache_budget_bytes:
            self._graphs[id(inputs)] = (inputs, targets, key, graph)
            self.cache_bytes += size
        return graph  # used for this product either way; dropped afterwards when over the budget

    def clear_cache(self) -> None:
        """Forget every cached batch graph (they are rebuilt on the next product)."""
        self._graphs.clear()
        self.cache_bytes = 0

    def stop_caching(self) -> None:
        """Memory is short: drop every cached graph and recompute the primal for the rest of this operator."""
        self.clear_cache()
        self._caching = False
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

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

    __matmul__ = matvec

    def _check_deterministic(self) -> None:
        """Two products of one vector on the first batch must agree; warn if they do not."""
        gen = torch.Generator().manual_seed(0)
        v = torch.randn(self.num_params, 1, generator=gen, dtype=torch.float64).to(self.dtype).to(self.device)
        tangents, params = self.unflatten(v), self._selected()
        products = []
        caching, self._caching = self._caching, False  # a cache hit would hide a random operator
        with curvature_mode(self.model, self.bn_mode):
            for _ in range(2):  # two separate passes: data that reshuffles or augments shows up too
                inputs, targets = next(iter(self.batches))
                products.append(self.flatten(self.batch_product(inputs, targets, params, tangents),
                                             batched=True))
        self._caching = caching
        a, b = products
        tol = 1e-10 if self.dtype == torch.float64 else 1e-4
        if not torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp(min=1e-30))):
            warnings.warn(f"{type(self).__name__}: two products of the same vector differ: the model or "
                          "data is random (dropout, augmentation, shuffling?); Lanczos needs a fixed operator",
                          RuntimeWarning, stacklevel=3)
        self.deterministic = torch.equal(a, b) or torch.allclose(a, b, rtol=tol, atol=0)


class _Hooked(nn.Module):
    """A model called through a user's ``forward(model, inputs)``, so ``functional_call`` can swap its weights."""

    def __init__(self, model: nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.hook = forward

    def forward(self, inputs):
        return self.hook(self.model, inputs)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _failure_message(op: "CurvatureOperator", inputs, targets, params: dict, exc: BaseException) -> str:
    """One line for a product that failed on the first batch: the module at fault and what to do."""
    kind = type(op).__name__.replace("Operator", "")
    name, module, cause = _failing_module(op, inputs, params)
    if name is None:
        try:
            op.loss(op.forward_fn(inputs)(params), targets)
        except Exception as loss_exc:  # noqa: BLE001
            return (f"the loss {op.loss.describe()} fails on the model's outputs ({_first_line(loss_exc)}): "
                    "check the targets' shape and the loss")
        return (f"the {kind} product fails on the first batch ({_first_line(exc)}); no single module is at fault: "
                "check the loss and the model's forward")
    if cause == "forward":
        return (f"the model fails in module '{name}' ({type(module).__name__}) on the first batch: "
                f"{_first_line(exc)}; fix the model (its forward raises)")
    return (f"the {kind} product cannot differentiate module '{name}' ({type(module).__name__}) twice: "
            f"{_first_line(exc)}; replace it by a twice-differentiable equivalent (composite PyTorch ops) "
            "or exclude the model part that uses it")


def _failing_module(op: "CurvatureOperator", inputs, params: dict):
    """``(name, module, "forward" | "derivative")`` of the innermost module at fault, or ``(None, None, None)``.

    A forward that raises is pinned on the innermost module being run; otherwise every module call of
    one forward pass is differentiated twice on its own inputs, smallest modules first.
    """
    named = {id(m): (n or type(op.model).__name__) for n, m in op.model.named_modules()}
    stack, calls, hooks = [], [], []

    def enter(module, args, kwargs):
        stack.append(module)

    def leave(module, args, kwargs, output):
        stack.pop()
        calls.append((module, args, kwargs))

    for m in op.model.modules():
        hooks.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(m.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.no_grad():
            op.forward_fn(inputs)(params)
    except Exception:  # noqa: BLE001
        if stack:
            return named.get(id(stack[-1]), type(stack[-1]).__name__), stack[-1], "forward"
        return None, None, None
    finally:
        for h in hooks:
            h.remove()
    size = {id(m): sum(1 for _ in m.modules()) for m in op.model.modules()}
    for module, args, kwargs in sorted(calls, key=lambda c: size[id(c[0])]):
        try:
            _differentiate_twice(module, args, kwargs, op.forward_ad)
        except Exception:  # noqa: BLE001
            return named.get(id(module), type(module).__name__), module, "derivative"
    return None, None, None


def _differentiate_twice(module: nn.Module, args, kwargs, forward_ad: bool) -> None:
    leaves: list[torch.Tensor] = []

    def leaf(x):
        if torch.is_tensor(x) and x.is_floating_point():
            t = x.detach().requires_grad_(True)
            leaves.append(t)
            return t
        if isinstance(x, (tuple, list)):
            return type(x)(leaf(v) for v in x)
        if isinstance(x, dict):
            return {k: leaf(v) for k, v in x.items()}
        return x

    args, kwargs = leaf(args), leaf(kwargs)
    leaves += [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = module(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad]
        if not outs or not leaves:
            return
        first = sum((o * torch.randn_like(o)).sum() for o in outs)
        grads = [g for g in torch.autograd.grad(first, leaves, create_graph=True, allow_unused=True)
                 if g is not None and g.requires_grad]
        if grads:
            second = sum((g * torch.randn_like(g)).sum() for g in grads)
            torch.autograd.grad(second, leaves, allow_unused=True)
    if forward_ad:
        with fwAD.dual_level():
            module(*[fwAD.make_dual(t, torch.randn_like(t)) if torch.is_tensor(t) and t.is_floating_point() else t
                     for t in args], **kwargs)


def _storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


def _tensors(value) -> list:
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def free_memory_bytes(device: torch.device) -> int:
    """Free memory of a CUDA device, or the host's available memory (Linux; 8 GiB if unknown)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return 8 * 2**30


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
    layerwise_kind = "hessian"

    def __init__(self, *args, mode: str = "auto", **kwargs):
        if mode not in self.MODES + ("auto",):
            raise ValueError(f"mode must be auto, forward_over_reverse or reverse_over_reverse, got {mode!r}")
        self.requested_mode = mode
        self.mode = "reverse_over_reverse" if mode == "auto" else mode
        super().__init__(*args, **kwargs)
        self.mode_seconds: dict[str, float] = {}
        if mode == "auto":
            self.mode = ("reverse_over_reverse" if self.cache != "none" or self.plan is not None
                         or not self.forward_ad else self._fastest_mode())

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
    """The generalised Gauss-Newton matrix ``sum_b (n_b/N) J_b^T H_L J_b``, P x P, PSD for convex losses.

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
    layerwise_kind = "ggn"

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


OPERATORS = {"hessian": HessianOperator, "ggn": GGNOperator}


def make_operator(name: str, model: nn.Module, loss_fn: Callable, batches, **kwargs) -> CurvatureOperator:
    if name not in OPERATORS:
        raise ValueError(f"unknown operator {name!r}: choose one of {', '.join(OPERATORS)}")
    if name != "hessian":
        kwargs.pop("mode", None)
    return OPERATORS[name](model, loss_fn, batches, **kwargs)
