"""Is a curvature operator a fixed matrix? Two products of one vector on the first batch must agree.

Lanczos needs the same matrix at every step: dropout left on, a random loss, or data that reshuffles or
augments on every pass would make each product one of a different matrix.
"""

from __future__ import annotations

import warnings

import torch

from curvature.functional import curvature_mode


def check_deterministic(op) -> bool:
    """Whether two products of one vector agree exactly (or to rounding); warns when they do not agree
    to ``1e-10`` relative (float64) or ``1e-4`` (float32) of the largest entry."""
    gen = torch.Generator().manual_seed(0)
    v = torch.randn(op.num_params, 1, generator=gen, dtype=torch.float64).to(op.dtype).to(op.device)
    tangents, params = op.unflatten(v), op._selected()
    products = []
    with op.graph_cache.paused(), curvature_mode(op.model, op.bn_mode):  # a cache hit would hide randomness
        for _ in range(2):  # two separate passes: data that reshuffles or augments shows up too
            inputs, targets = next(iter(op.batches))
            products.append(op.flatten(op.batch_product(inputs, targets, params, tangents), batched=True))
    a, b = products
    tol = 1e-10 if op.dtype == torch.float64 else 1e-4
    if not torch.allclose(a, b, rtol=tol, atol=tol * float(a.abs().max().clamp(min=1e-30))):
        warnings.warn(f"{type(op).__name__}: two products of the same vector differ: the model or "
                      "data is random (dropout, augmentation, shuffling?); Lanczos needs a fixed operator",
                      RuntimeWarning, stacklevel=4)
    return torch.equal(a, b) or torch.allclose(a, b, rtol=tol, atol=0)
