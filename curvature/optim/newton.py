"""Stochastic Lanczos Newton optimisers (paper Sec. 2.2, Fig. 1): saddle-free Hessian and GGN.

Each step runs ``lanczos_steps`` Lanczos steps on the curvature ``B`` of one curvature batch (its own
size, ``curvature_batch_size``) and takes the damped Newton step inside the Krylov subspace:

    d = sum_i (u_i^T g) u_i / (|lambda_i + wd| + delta)  +  (g - U U^T g) / (wd + delta),
    w <- w - lr * d,

with ``(lambda_i, u_i)`` the Ritz pairs of ``B``, ``g`` the mini-batch gradient plus ``wd * w``
(weight decay as an L2 term), and ``delta`` the damping. The L2 term's curvature ``wd * I`` shares
``B``'s eigenvectors, so it enters the eigenvalues exactly; in the complement of the Krylov space the
curvature is unknown and taken as ``wd`` alone, so ``delta`` acts as the curvature there. With ``B``
the Hessian the absolute values give Dauphin et al.'s (2014) saddle-free step; with ``B`` the GGN
(positive semi-definite) they change nothing. ``damping`` defaults to ``damping_ratio * lr`` at
construction (Fig. 1 keeps damping / lr fixed); a learning-rate schedule then scales ``lr`` alone.

The curvature batch comes from a sampler set by :meth:`set_curvature_sampler` (the training analysis
draws it from its own seeded stream, per epoch), or else from the first ``curvature_batch_size`` rows of
the batch last passed to :meth:`observe`. A step whose direction is not finite (or whose Lanczos run
hits NaN) is skipped and counted in ``state['skipped_steps']``, with one warning.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from curvature.errors import NumericalError
from curvature.lanczos import lanczos
from curvature.operators import BN_MODES, GGNOperator, HessianOperator
from curvature.seeding import stream_seed

START_VECTORS = ("random", "gradient")
HVP_MODES = ("auto",) + HessianOperator.MODES


class LanczosNewton(torch.optim.Optimizer):
    """Damped Newton step in a Lanczos Krylov subspace of a curvature batch; see the module docstring.

    ``params`` must be the model's trainable parameters in ``model.parameters()`` order (one group):
    the step is one flat vector over all of them. ``start_vector``: ``random`` (a seeded unit vector
    per step, the suite's default) or ``gradient`` (the Krylov space of ``g``).
    """

    curvature = "hessian"

    def __init__(self, params, model: nn.Module, loss_fn: Callable = F.cross_entropy, lr: float = 0.1,
                 damping: Optional[float] = None, damping_ratio: float = 10.0, lanczos_steps: int = 20,
                 curvature_batch_size: int = 128, weight_decay: float = 0.0, bn_mode: str = "train",
                 start_vector: str = "random", hvp_mode: str = "auto", seed: int = 0):
        if damping is None:
            damping = damping_ratio * lr
        checks = {"lr": lr > 0, "damping": damping > 0, "lanczos_steps": int(lanczos_steps) >= 1,
                  "curvature_batch_size": int(curvature_batch_size) >= 1, "weight_decay": weight_decay >= 0,
                  "bn_mode": bn_mode in BN_MODES, "start_vector": start_vector in START_VECTORS,
                  "hvp_mode": hvp_mode in HVP_MODES}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"{type(self).__name__}: invalid {', '.join(bad)} (positive lr, damping, "
                             f"lanczos_steps, curvature_batch_size; bn_mode in {BN_MODES}; start_vector "
                             f"in {START_VECTORS}; hvp_mode in {HVP_MODES})")
        super().__init__(params, dict(lr=lr, damping=float(damping), weight_decay=weight_decay))
        if len(self.param_groups) != 1:
            raise ValueError(f"{type(self).__name__} takes one parameter group (the step is one vector)")
        trainable = [p for p in model.parameters() if p.requires_grad]
        if [id(p) for p in self.param_groups[0]["params"]] != [id(p) for p in trainable]:
            raise ValueError(f"{type(self).__name__} must be given model.parameters() (all trainable "
                             "parameters, in order): its curvature is taken over exactly those")
        self.model, self.loss_fn = model, loss_fn
        self.lanczos_steps, self.curvature_batch_size = int(lanczos_steps), int(curvature_batch_size)
        self.bn_mode, self.start_vector, self.hvp_mode, self.seed = bn_mode, start_vector, hvp_mode, int(seed)
        self._sampler: Optional[Callable[[], tuple]] = None
        self._observed: Optional[tuple] = None
        self._layerwise_checked: Optional[bool] = None  # the first operator's verdict on layer-wise products
        self._warned = False
        self.last_ritz_values: Optional[torch.Tensor] = None

    # --- the curvature batch ------------------------------------------------------------------------
    def set_curvature_sampler(self, sampler: Optional[Callable[[], tuple]]) -> None:
        """``sampler()`` returns one ``(inputs, labels)`` curvature batch per call (None: observed rows)."""
        self._sampler = sampler

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """Called by the training loop after the forward pass: keeps the batch for the fallback."""
        self._observed = (inputs[:self.curvature_batch_size].detach(), labels[:self.curvature_batch_size])

    def _curvature_batch(self) -> tuple:
        if self._sampler is not None:
            return self._sampler()
        if self._observed is None:
            raise RuntimeError(f"{type(self).__name__}.step needs a curvature batch: call "
                               "observe(inputs, labels, logits) or set_curvature_sampler(...) first")
        return self._observed

    def _operator(self, batch: tuple):
        # The first step's operator checks the layer-wise products against autograd; later steps
        # reuse that verdict instead of paying the check every step.
        checked = self._layerwise_checked
        kwargs = dict(bn_mode=self.bn_mode, check_deterministic=False,
                      layerwise="auto" if checked is None else checked, check_layerwise=checked is None)
        if self.curvature == "ggn":
            op = GGNOperator(self.model, self.loss_fn, [batch], **kwargs)
        else:
            op = HessianOperator(self.model, self.loss_fn, [batch], mode=self.hvp_mode, **kwargs)
            self.hvp_mode = op.mode  # 'auto' times both modes once; later steps reuse the winner
        self._layerwise_checked = op.engine == "layerwise"
        return op

    # --- the step --------------------------------------------------------------------------------
    def _direction(self, g: torch.Tensor, step: int, damping: float,
                   weight_decay: float) -> torch.Tensor:
        op = self._operator(self._curvature_batch())
        dim = op.num_params
        extra = {"start_vectors": g} if self.start_vector == "gradient" else {}
        result = lanczos(op.matvec, dim, min(self.lanczos_steps, dim), seed=stream_seed(self.seed, f"newton.{step}"),
                         dtype=g.dtype, device=g.device, return_vectors=True, **extra)
        if result.ritz_vectors is None:  # the start vector lies in the null space: no curvature seen
            return g / (weight_decay + damping)
        valid = result.mask[0].to(g.device)
        basis = result.ritz_vectors[0][valid]                           # (m, P), orthonormal rows
        values = result.ritz_values[0].to(g.device, g.dtype)[valid]     # (m,)
        self.last_ritz_values = values.detach().cpu()
        coefficients = basis @ g
        inside = basis.T @ (coefficients / ((values + weight_decay).abs() + damping))
        if basis.shape[0] == dim:  # the Krylov space is everything: the complement is rounding / damping
            return inside
        return inside + (g - basis.T @ coefficients) / (weight_decay + damping)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        group = self.param_groups[0]
        params = group["params"]
        state = self.state[params[0]]
        state["step"] = state.get("step", 0) + 1
        w = torch.cat([p.reshape(-1) for p in params])
        g = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params])
        if group["weight_decay"]:
            g = g + group["weight_decay"] * w
        if not torch.any(g != 0):
            return loss
        try:
            d = self._direction(g, state["step"], group["damping"], group["weight_decay"])
            finite = bool(torch.isfinite(d).all())
        except (NumericalError, FloatingPointError):
            finite = False
        if not finite:
            state["skipped_steps"] = state.get("skipped_steps", 0) + 1
            if not self._warned:
                warnings.warn(f"{type(self).__name__}: the Newton direction is not finite at step "
                              f"{state['step']}; step skipped (count in state['skipped_steps'])",
                              RuntimeWarning, stacklevel=2)
                self._warned = True
            return loss
        offset = 0
        for p in params:
            n = p.numel()
            p.add_(d[offset:offset + n].view_as(p), alpha=-group["lr"])
            offset += n
        return loss

    @property
    def skipped_steps(self) -> int:
        return int(self.state[self.param_groups[0]["params"][0]].get("skipped_steps", 0))


class SaddleFreeNewton(LanczosNewton):
    """Stochastic Lanczos Newton on the Hessian with absolute Ritz values (saddle-free)."""

    curvature = "hessian"


class GGNNewton(LanczosNewton):
    """Stochastic Lanczos Newton on the generalised Gauss-Newton matrix."""

    curvature = "ggn"
