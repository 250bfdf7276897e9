"""Model-sharded Hessian spectra: FSDP2 parameters, finite-difference products, a sharded Lanczos basis.

Under ``torchrun`` with the model wrapped by ``torch.distributed.fsdp.fully_shard`` every parameter is a
``DTensor`` split along its first dimension, and rank ``r`` holds rows ``[o_r, o_r + n_r)`` of it. Read the
selected parameters flat and in ``model.named_parameters()`` order, as the single-process operators do
(``P`` entries in all): rank ``r`` then holds one contiguous slice of each parameter's segment, ``P_r``
entries in all, ``sum_r P_r = P``. :class:`ShardLayout` records the slices; a flat vector's *local shard*
is the concatenation of those slices, and nothing here ever needs the whole vector on one rank:

* the Hessian product acts on local shards (:class:`ShardedFiniteDifferenceHessian`). Double backward
  does not run through sharded parameters (``torch.autograd.grad(..., create_graph=True)`` under
  ``fully_shard`` on CPU/gloo raises "appears to not have been used in the graph", measured with
  torch 2.13), but gradients do, so ``H v`` is a central difference of full-data gradients,
  ``(g(w + eps v) - g(w - eps v)) / (2 eps)`` (:func:`curvature.finite_difference.fd_hessian_product`,
  optionally one Richardson step), with each rank perturbing only its own shards by ``+- eps v_r``
  and reading back only its own gradient shards. ``eps`` comes from the *global* norms of ``w`` and
  ``v`` (:func:`curvature.finite_difference.fd_step`), all-reduced, so every rank takes the same step
  as a single process would. The weights are restored by copying the saved shards back (bit for bit;
  ``w + eps v - eps v`` would not be), and any gradients the parameters held are put back too.
* Lanczos keeps only local shards of its basis, ``k x (m + 1) x P_r`` numbers per rank instead of
  ``k x (m + 1) x P``: :func:`curvature.lanczos.lanczos` with ``reduce=op.reduce``, which all-reduces
  every inner product, and ``start_vectors=op.start_vectors(...)``, the local shards of the seeded
  global start vectors a single-process run draws (drawn whole, ``P x k``, once, then sliced).

The data: each rank holds its own whole batches (:func:`curvature.distributed.shard`, so BatchNorm in
``train`` mode sees the same batches as in one process) and weighs batch ``b``'s loss by its share
``c_b`` of the loss over *all* ranks' data (samples or counted tokens, all-reduced); FSDP's backward
reduce-scatters the gradients with its default mean over ranks, so the local loss is multiplied by
the world size first (exact for a power-of-two world size; one rounding otherwise). FSDP's sum
(``set_gradient_divide_factor(1.0)``) would avoid that factor but needs ``ReduceOp.PREMUL_SUM`` in
float32, which gloo refuses ("Cannot use ReduceOp.PREMUL_SUM with Gloo", measured). A model whose FSDP
modules were given another divide factor gets wrong products.

Typical use (under ``torchrun``, after ``torch.distributed.init_process_group``)::

    fully_shard(model)
    op = ShardedFiniteDifferenceHessian(model, loss_fn, shard(batches, rank, world_size))
    result = sharded_lanczos(op, 100, num_vectors=1, seed=0)   # the same tridiagonal on every rank
"""

from __future__ import annotations

import math
import time
from typing import Callable, Iterable, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn

from curvature.batches import OperatorData, model_outputs
from curvature.errors import NumericalError, SuiteError
from curvature.finite_difference import fd_hessian_product, fd_step as step_rule
from curvature.functional import curvature_mode, select_parameters
from curvature.losses import as_loss

__all__ = ["ShardLayout", "ShardedFiniteDifferenceHessian", "is_sharded", "shard_model", "sharded_lanczos"]


def shard_model(model: nn.Module) -> nn.Module:
    """``fully_shard(model)`` on the default process group: every parameter split along dim 0.

    One FSDP unit (the root): parameters are sharded at rest and all-gathered for each forward and
    backward. This suits any model, including ones that use a submodule's weight outside its
    ``forward`` (tied embeddings); wrap submodules yourself before calling this for a lower peak.
    """
    from torch.distributed.fsdp import fully_shard
    if not dist.is_available() or not dist.is_initialized():
        raise SuiteError("FSDP needs an initialised process group (torch.distributed.init_process_group), "
                         "e.g. under torchrun")
    return fully_shard(model)


def is_sharded(model: nn.Module) -> bool:
    """Whether any parameter of ``model`` is a ``DTensor`` (the model went through ``fully_shard``)."""
    from torch.distributed.tensor import DTensor
    return any(isinstance(p, DTensor) for p in model.parameters())


def _sharded(name: str, p: torch.Tensor):
    """The DTensor ``p`` (Shard(0) on a 1-D mesh), or a SuiteError naming the parameter."""
    from torch.distributed.tensor import DTensor, Shard
    if not isinstance(p, DTensor):
        raise SuiteError(f"parameter {name} is not sharded: wrap the model with "
                         "torch.distributed.fsdp.fully_shard (curvature.fsdp.shard_model) first")
    if p.device_mesh.ndim != 1 or tuple(p.placements) != (Shard(0),):
        raise SuiteError(f"parameter {name} is placed as {tuple(p.placements)} on a {p.device_mesh.ndim}-D "
                         "mesh; only fully_shard's Shard(0) on a 1-D mesh is supported")
    return p


class ShardLayout:
    """Where this rank's shards of the parameters ``names`` sit in the global flat vector (P,).

    ``slices[i] = (start, stop)`` is the part of parameter ``i``'s flat segment held here (rows
    ``[o_r, o_r + n_r)`` of a dim-0 shard are contiguous in row-major order); ``num_params`` is ``P``,
    ``num_local`` the ``P_r`` entries held here. The row offsets are all-gathered once.
    """

    def __init__(self, names: Sequence[str], params: Sequence[torch.Tensor], group=None):
        self.names = list(names)
        self.group = group
        self.shapes = [tuple(p.shape) for p in params]
        self.local_shapes = [tuple(p.to_local().shape) for p in params]
        rows = torch.tensor([s[0] if s else 1 for s in self.local_shapes], dtype=torch.int64,
                            device=params[0].device)
        every = [torch.zeros_like(rows) for _ in range(dist.get_world_size(group))]
        dist.all_gather(every, rows, group=group)
        before = sum(every[:dist.get_rank(group)], torch.zeros_like(rows)).tolist()
        self.slices, start = [], 0
        for shape, local, offset in zip(self.shapes, self.local_shapes, before):
            size, width = math.prod(shape), math.prod(shape[1:])
            self.slices.append((start + offset * width, start + offset * width + math.prod(local)))
            start += size
        self.num_params = start
        self.num_local = sum(b - a for a, b in self.slices)

    def local_shard(self, full: torch.Tensor) -> torch.Tensor:
        """This rank's entries of a global (P,) or (P, k) vector: (P_r,) or (P_r, k)."""
        if full.shape[0] != self.num_params:
            raise ValueError(f"expected {self.num_params} rows, got {full.shape[0]}")
        return torch.cat([full[a:b] for a, b in self.slices])

    def split(self, local: torch.Tensor) -> list[torch.Tensor]:
        """A (P_r,) local vector as one tensor per parameter, in the shape of its local shard."""
        sizes = [b - a for a, b in self.slices]
        return [t.reshape(shape) for t, shape in zip(local.split(sizes), self.local_shapes)]


class ShardedFiniteDifferenceHessian:
    """The Hessian of the mean loss over every rank's data (P x P), applied to local shards (P_r,).

    ``model`` is wrapped by ``fully_shard``; ``batches`` are this rank's (whole batches, e.g.
    :func:`curvature.distributed.shard`). ``matvec(v)`` takes this rank's shard (P_r,) or (P_r, k) of a
    global vector and returns the shard of ``H v`` by central differences of gradients (module
    docstring): 2 gradients of every rank's data per column (4 with ``richardson=True``); ``fd_step``
    ``"auto"`` takes :func:`~curvature.finite_difference.fd_step` from the global norms, a number is
    the step ``eps`` itself. It is a collective call: every rank calls it in the same order with its
    shard of the same vector.
    ``reduce`` sums an inner product's local part over the ranks (the ``reduce=`` of
    :func:`curvature.lanczos.lanczos`). BatchNorm as in the other operators (``bn_mode``, no
    running-statistic updates); dropout off.
    """

    engine = mode = "finite_difference"

    def __init__(self, model: nn.Module, loss_fn: Callable, batches: Iterable, bn_mode: str = "train",
                 params: Optional[Sequence[str]] = None, richardson: bool = False, fd_step="auto",
                 unpack: Optional[Callable] = None, forward: Optional[Callable] = None):
        if not dist.is_available() or not dist.is_initialized():
            raise SuiteError("the sharded operator needs an initialised process group "
                             "(torch.distributed.init_process_group), e.g. under torchrun")
        self.model, self.bn_mode, self.richardson, self.forward = model, bn_mode, richardson, forward
        if fd_step != "auto" and not (isinstance(fd_step, (int, float)) and 0 < fd_step < math.inf):
            raise ValueError(f"fd_step must be 'auto' or a positive number, got {fd_step!r}")
        self.fd_step = fd_step
        self.num_products, self.product_seconds, self.communication_seconds = 0, 0.0, 0.0
        self.loss = self.loss_fn = as_loss(loss_fn)
        self.names = select_parameters(model, params)
        named = dict(model.named_parameters())
        self.params = [_sharded(n, named[n]) for n in self.names]
        self.group = self.params[0].device_mesh.get_group()
        self.world_size, self.rank = dist.get_world_size(self.group), dist.get_rank(self.group)
        self.layout = ShardLayout(self.names, self.params, self.group)
        self.num_params, self.num_local = self.layout.num_params, self.layout.num_local
        self.dtype, self.device = self.params[0].dtype, self.params[0].device
        self.data = OperatorData(batches, self.loss, unpack, self.device)
        self.local_samples = self.data.num_samples
        self.num_samples = int(self.reduce(float(self.local_samples)))
        total = self.reduce(float(sum(self.data.denominators)))
        # FSDP's backward averages the gradient over the ranks: undo that with the world size
        self.weights = [self.world_size * self.loss.batch_weight(d, total) for d in self.data.denominators]
        # Every forward all-gathers and every backward reduce-scatters, so every rank must run as many
        # passes: a rank with fewer batches repeats its first one at weight 0 (exact zeros)
        passes = torch.tensor([len(self.data.batches)], dtype=torch.int64, device=self.device)
        dist.all_reduce(passes, op=dist.ReduceOp.MAX, group=self.group)
        self.passes = int(passes.item())
        self.notes = list(self.data.notes) + [
            f"Hessian products by central differences of gradients{' with one Richardson step' if richardson else ''} "
            f"(fully_shard over {self.world_size} processes: no double backward through sharded parameters)"]
        self.forward_ad, self.forward_ad_reason = False, "finite differences of gradients"
        self.layerwise_reason = "finite differences of gradients under FSDP"
        self.mode_seconds: dict = {}

    # --- collectives ------------------------------------------------------------------------------
    def reduce(self, x):
        """The sum over the ranks of ``x`` (a float or a tensor; a tensor is summed in a copy)."""
        start = time.perf_counter()
        if torch.is_tensor(x):
            out = x.detach().clone().contiguous()
            dist.all_reduce(out, group=self.group)
        else:
            t = torch.tensor([float(x)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t, group=self.group)
            out = float(t.item())
        self.communication_seconds += time.perf_counter() - start
        return out

    def norm(self, local: torch.Tensor) -> float:
        """The global 2-norm of a vector from this rank's shard (float64 sums)."""
        return math.sqrt(self.reduce(float(local.double().pow(2).sum())))

    def start_vectors(self, num_vectors: int = 1, kind: str = "gaussian", seed: int = 0,
                      dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """This rank's (P_r, k) shard of the seeded unit start vectors a single-process
        :func:`curvature.lanczos.lanczos` draws for the same ``seed`` and ``kind``."""
        from curvature.lanczos import random_start_vectors
        full = random_start_vectors(self.num_params, num_vectors, kind, seed)
        return self.layout.local_shard(full).to(dtype=dtype or self.dtype, device=self.device)

    # --- the product --------------------------------------------------------------------------------
    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """This rank's shard of ``H v`` for its shard ``v`` ((P_r,) or (P_r, k)) of a global vector."""
        if v.shape[0] != self.num_local:
            raise ValueError(f"expected this rank's {self.num_local} entries, got {v.shape[0]}")
        start = time.perf_counter()
        block = v.reshape(self.num_local, -1).to(self.dtype)
        saved = [p.to_local().detach().clone() for p in self.params]
        grads = [(p, p.grad) for p in self.model.parameters()]
        weight_norm = self.norm(torch.cat([s.reshape(-1) for s in saved]))
        columns = []
        try:
            for j in range(block.shape[1]):
                vector_norm = self.norm(block[:, j])
                if vector_norm == 0.0:  # the same on every rank: the norm is global
                    columns.append(torch.zeros_like(block[:, j]))
                    continue
                eps = step_rule(weight_norm, vector_norm, self.dtype, self.richardson) \
                    if self.fd_step == "auto" else float(self.fd_step)
                out = fd_hessian_product(self._gradient, saved, self.layout.split(block[:, j]), eps,
                                         self.richardson)
                columns.append(torch.cat([t.reshape(-1) for t in out]))
        finally:
            with torch.no_grad():
                for p, s in zip(self.params, saved):
                    p.to_local().copy_(s)
                for p, g in grads:
                    p.grad = g
        out = torch.stack(columns, dim=1).reshape(v.shape).to(v.dtype)
        if self.reduce(float((~torch.isfinite(out)).sum())):  # every rank stops together
            raise NumericalError("the finite-difference Hessian product is NaN or Inf on some rank")
        self.num_products += 1
        self.product_seconds += time.perf_counter() - start
        return out

    __matmul__ = matvec

    def _gradient(self, weights: list[torch.Tensor]) -> list[torch.Tensor]:
        """This rank's shards of the full-data gradient at the weights whose local shards are ``weights``."""
        with torch.no_grad():
            for p, w in zip(self.params, weights):
                p.to_local().copy_(w)
        for p in self.model.parameters():
            p.grad = None
        with curvature_mode(self.model, self.bn_mode), torch.enable_grad():
            for i in range(self.passes):
                (inputs, targets), c = (self.data.batches[i], self.weights[i]) if i < len(self.weights) \
                    else (self.data.batches[0], 0.0)
                (c * self.loss(self._outputs(inputs), targets)).backward()
        return [p.grad.to_local().detach().clone() if p.grad is not None else torch.zeros_like(w)
                for p, w in zip(self.params, weights)]

    def _outputs(self, inputs) -> torch.Tensor:
        if self.forward is not None:
            return model_outputs(self.forward(self.model, inputs))
        return model_outputs(self.model(**inputs) if isinstance(inputs, dict) else self.model(inputs))


def sharded_lanczos(op: ShardedFiniteDifferenceHessian, num_steps: int = 100, num_vectors: int = 1,
                    seed: int = 0, start_kind: str = "gaussian", dtype: Optional[torch.dtype] = None, **kwargs):
    """:func:`curvature.lanczos.lanczos` on local shards: this rank's rows of the seeded start vectors a
    single-process run draws, every inner product all-reduced (``reduce=op.reduce``). The tridiagonal
    and Ritz values are the same on every rank; ``return_basis`` / ``return_vectors`` give this rank's
    rows (P_r). ``kwargs`` go to ``lanczos`` (``progress``, ``return_basis``, ...)."""
    from curvature.lanczos import lanczos
    start = op.start_vectors(num_vectors, start_kind, seed, dtype)
    # a closure, not op.matvec: lanczos would read the operator's size as num_params (P), not P_r
    return lanczos(lambda x: op.matvec(x), op.num_local, num_steps, start_vectors=start, seed=seed,
                   start_kind=start_kind, reduce=op.reduce, **kwargs)
