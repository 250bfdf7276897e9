"""Inverse-curvature products: ``x = (A + damping I)^{-1} b`` by conjugate gradients or MINRES, in torch.

Only products with ``A`` are needed, so ``A`` may be a curvature operator (Hessian, GGN, Fisher over a
dataset), a dense symmetric tensor or a callable on (P,) / (P, k) tensors (taken through
:func:`curvature.linear_operator.as_matvec`). ``b`` is (P,) or (P, k): the k columns are solved together,
each with its own step sizes, so one operator product serves all of them per iteration.

* CG (Hestenes & Stiefel 1952) for positive (semi-)definite ``A + damping I`` (GGN, Fisher, with
  ``damping > 0`` when singular): minimises the ``A``-norm error over the Krylov space.
* MINRES (Paige & Saunders 1975) for symmetric indefinite ``A`` (the Hessian): minimises
  ``||b - (A + damping I) x||`` over the Krylov space, from the Lanczos tridiagonal and its QR
  factorisation by Givens rotations, with three-term recurrences for the iterate.

``method="auto"`` takes MINRES for a :class:`~curvature.operators.HessianOperator`, dense tensors and
callables (definiteness unknown), and CG for the other curvature operators (GGN, Fisher: PSD by
construction). A column stops when its relative residual ``||b - (A + damping I) x|| / ||b||`` (CG: the
recurrence's residual; MINRES: the QR's) is at most ``tol``; the result reports the true residual of the
returned ``x``, from one more product.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from curvature.errors import SuiteError

__all__ = ["solve", "SolveResult", "conjugate_gradients", "minres", "METHODS"]

METHODS = ("auto", "cg", "minres")


@dataclass
class SolveResult:
    """``x`` (shaped like ``b``); ``residual_norm``: the true ``||b - (A + damping I) x|| / ||b||`` of each
    column (a float for a (P,) ``b``), from one more product; ``iterations``: Krylov steps (the most any
    column took); ``num_matvecs``: operator products, the final residual's included; ``converged``: every
    column's recurrence residual reached ``tol`` (the true one may differ from it by rounding); the
    method; notes (breakdowns, max_iter)."""

    x: torch.Tensor
    residual_norm: Any
    iterations: int
    num_matvecs: int
    converged: bool
    method: str
    notes: list = field(default_factory=list)


def solve(A, b: torch.Tensor, damping: float = 0.0, tol: float = 1e-6, max_iter: int | None = None,
          method: str = "auto") -> SolveResult:
    """Solve ``(A + damping I) x = b`` for ``b`` of shape (P,) or (P, k); see the module docstring.

    ``max_iter`` defaults to ``2 P`` (exact arithmetic needs at most P steps; rounding may need more).
    """
    if method not in METHODS:
        raise SuiteError(f"method must be auto, cg or minres, got {method!r}")
    if not damping >= 0:
        raise SuiteError(f"damping must be >= 0, got {damping!r}")
    matvec, dim = _matvec(A, b)
    if b.shape[0] != dim or b.dim() not in (1, 2):
        raise SuiteError(f"b must be (P,) or (P, k) with P = {dim}, got shape {tuple(b.shape)}")
    if method == "auto":
        method = _auto(A)
    single = b.dim() == 1
    block = b.unsqueeze(1) if single else b
    counted = [0]

    def damped(v: torch.Tensor) -> torch.Tensor:
        counted[0] += 1
        out = matvec(v).to(dtype=v.dtype, device=v.device)
        return out + damping * v if damping else out

    iterate = conjugate_gradients if method == "cg" else minres
    x, iterations, reached, notes = iterate(damped, block, tol, max_iter or 2 * dim)
    norms = block.norm(dim=0)
    residual = ((block - damped(x)).norm(dim=0) / torch.where(norms > 0, norms, torch.ones_like(norms))).cpu()
    if not bool(reached.all()) and iterations >= (max_iter or 2 * dim):
        notes.append(f"stopped after max_iter={iterations} iterations before reaching tol={tol:g}")
    return SolveResult(x=x.squeeze(1) if single else x,
                       residual_norm=float(residual[0]) if single else residual.tolist(),
                       iterations=iterations, num_matvecs=counted[0], converged=bool(reached.all()),
                       method=method, notes=notes)


def _matvec(A, b: torch.Tensor) -> tuple[Callable, int]:
    from curvature.linear_operator import as_matvec
    dim = None if (hasattr(A, "matvec") or torch.is_tensor(A)) else b.shape[0]
    matvec, size, _, _ = as_matvec(A, dim)
    return matvec, size


def _auto(A) -> str:
    from curvature.operators import CurvatureOperator, HessianOperator
    owner = getattr(A, "__self__", A)           # a bound op.matvec
    owner = getattr(owner, "operator", owner)   # wrappers that hold an operator
    if isinstance(owner, CurvatureOperator) and not isinstance(owner, HessianOperator):
        return "cg"
    return "minres"


def _safe(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1.0), 0.0)


def conjugate_gradients(matvec: Callable, b: torch.Tensor, tol: float, max_iter: int):
    """CG on the columns of ``b`` (P, k) from ``x = 0``: ``(x, iterations, reached tol per column, notes)``. A column stops at
    ``||r|| <= tol ||b||``, or at non-positive curvature ``p^T A p <= 0`` (noted: not PSD, use MINRES)."""
    x = torch.zeros_like(b)
    r, p = b.clone(), b.clone()
    rr = (r * r).sum(0)
    target = tol * b.norm(dim=0)
    active = rr.sqrt() > target
    notes, steps = [], 0
    while bool(active.any()) and steps < max_iter:
        ap = matvec(p)
        steps += 1
        curvature = (p * ap).sum(0)
        broken = active & (curvature <= 0)
        if bool(broken.any()):
            notes.append(f"CG met non-positive curvature p^T A p <= 0 in column(s) "
                         f"{broken.nonzero().flatten().tolist()} at step {steps}: the matrix is not positive "
                         "definite; use method='minres' or more damping")
            active = active & ~broken
        alpha = torch.where(active, _safe(rr, curvature), 0.0)
        x += alpha * p
        r -= alpha * ap
        rr_new = (r * r).sum(0)
        beta = _safe(rr_new, rr)
        p = r + beta * p
        rr = rr_new
        active = active & (rr.sqrt() > target)
    return x, steps, rr.sqrt() <= target, notes


def minres(matvec: Callable, b: torch.Tensor, tol: float, max_iter: int):
    """MINRES on the columns of ``b`` (P, k) from ``x = 0``: ``(x, iterations, reached tol per column, notes)``.

    Step j: Lanczos gives ``alpha_j``, ``beta_{j+1}`` and ``v_{j+1}``; column j of the tridiagonal
    ``(beta_j, alpha_j, beta_{j+1})`` is rotated by the two previous Givens rotations into
    ``(epsilon_j, delta_j, gamma_bar)``; a new rotation zeroes ``beta_{j+1}``; the right-hand side
    ``||b|| e_1`` rotates along (``phi_j = c_j phi_bar``, the residual norm is ``|phi_bar_{j+1}|``); the
    search direction ``d_j = (v_j - delta_j d_{j-1} - epsilon_j d_{j-2}) / gamma_j`` updates ``x``.
    """
    k = b.shape[1]
    scalars = dict(dtype=b.dtype, device=b.device)
    beta1 = b.norm(dim=0)
    v = b / torch.where(beta1 > 0, beta1, 1.0)
    v_prev = torch.zeros_like(b)
    d_prev, d_prev2 = torch.zeros_like(b), torch.zeros_like(b)
    x = torch.zeros_like(b)
    beta = torch.zeros(k, **scalars)            # beta_j: T's entry above alpha_j (0 in column 1)
    c_prev, s_prev = torch.ones(k, **scalars), torch.zeros(k, **scalars)     # rotation j-1
    c_prev2, s_prev2 = torch.ones(k, **scalars), torch.zeros(k, **scalars)   # rotation j-2
    phi_bar = beta1.clone()
    target = tol * beta1
    active = beta1 > 0
    reached = ~active
    notes, steps = [], 0
    while bool(active.any()) and steps < max_iter:
        w = matvec(v)
        steps += 1
        alpha = (v * w).sum(0)
        w = w - alpha * v - beta * v_prev
        beta_next = w.norm(dim=0)
        epsilon = s_prev2 * beta
        delta_tilde = c_prev2 * beta
        delta = c_prev * delta_tilde + s_prev * alpha
        gamma_bar = -s_prev * delta_tilde + c_prev * alpha
        gamma = torch.sqrt(gamma_bar ** 2 + beta_next ** 2)
        singular = active & (gamma == 0)
        if bool(singular.any()):
            notes.append(f"MINRES: the Krylov space of column(s) {singular.nonzero().flatten().tolist()} "
                         f"holds a zero eigenvalue at step {steps} (singular, inconsistent system)")
            active = active & ~singular
        c, s = _safe(gamma_bar, gamma), _safe(beta_next, gamma)
        phi = c * phi_bar
        phi_bar = -s * phi_bar
        d = (v - delta * d_prev - epsilon * d_prev2) * _safe(torch.ones_like(gamma), gamma)
        x += torch.where(active, phi, 0.0) * d
        v_prev, v = v, w * _safe(torch.ones_like(beta_next), beta_next)
        d_prev2, d_prev = d_prev, d
        c_prev2, s_prev2, c_prev, s_prev = c_prev, s_prev, c, s
        beta = beta_next
        reached = reached | (active & (phi_bar.abs() <= target))
        active = active & ~reached & (beta_next > 0)
    return x, steps, reached, notes
