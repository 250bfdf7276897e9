"""Is a curvature operator a fixed matrix? Two products of one vector on the first batch must agree.

Lanczos needs the same matrix at every step: dropout left on, a random loss, or data that reshuffles or
augments on every pass would make each product one of a different matrix.
"""

from __future__ import annotations

import warnings

import torch

from curvature.errors import NumericalError
from curvature.functional import curvature_mode


def check_deterministic(op) -> bool:
    """Whether two products of one vector agree exactly (or to rounding); warns when they do not agree
    to ``1e-10`` relative (float64) or ``1e-4`` (float32) of the largest entry. A product that is not
    finite (weights too large for the dtype) is a :class:`NumericalError`: no tolerance can compare it."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.num_params, 1, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    tangents, params = op.unflatten(v), op._selected()
    products = []
    with op.graph_cache.paused(), curvature_mode(op.model, op.bn_mode):  # a cache hit would hide randomness
        for _ in range(2):  # two separate passes: data that reshuffles or augments shows up too
            inputs, targets = next(iter(op.batches))
            products.append(op.flatten(op.batch_product(inputs, targets, params, tangents), batched=True))
    a, b = products
    if not (torch.isfinite(a).all() and torch.isfinite(b).all()):  # else the tolerance below is NaN or inf
        largest = max((float(p.detach().abs().max()) for p in params.values() if p.numel()), default=0.0)
        dtype = str(op.dtype).replace("torch.", "")
        raise NumericalError(f"{type(op).__name__}: the curvature product on the first batch is not finite "
                             f"(NaN/Inf) with weights up to |w| = {largest:.3g} in {dtype}: the weights "
                             "(a diverged checkpoint?) or inputs are too large for this dtype")
    tol = 1e-10 if op.dtype == torch.float64 else 1e-4
    if not torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp(min=1e-30))):
        warnings.warn(f"{type(op).__name__}: two products of the same vector differ: the model or "
                      "data is random (dropout, augmentation, shuffling?); Lanczos needs a fixed operator",
                      RuntimeWarning, stacklevel=4)
    return torch.equal(a, b) or torch.allclose(a, b, rtol=tol, atol=0)
