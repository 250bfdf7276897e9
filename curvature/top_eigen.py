"""The top-k eigenpairs of a symmetric operator to a residual tolerance.

:func:`top_eigenpairs`: (block) Lanczos with full reorthogonalisation, thick-restarted (Wu & Simon,
SIAM J. Matrix Anal. Appl. 22, 2000) with locking, run until ``k`` Ritz pairs ``(lambda, u)`` at the
wanted end have relative residual ``||A u - lambda u|| / |lambda| <= tol``. The residual of a Ritz
pair is estimated for free from the Lanczos relation ``A V_m = V_m H_m + R_m B_m E_m^T`` as
``||B_m (E_m^T s)||`` (``beta_m |e_m^T s|`` for one vector); the returned pairs are then verified with
``k`` true products (``verification_matvecs``), and ``converged`` and ``residuals`` come from those.

:func:`power_iteration`: the baseline PyHessian uses (``hessian.eigenvalues``): power iteration,
each new vector orthogonalised against the eigenvectors found so far, stopping when the Rayleigh
quotient changes by less than ``tol`` relatively (``criterion="eigenvalue"``, PyHessian's rule with
its ``+ 1e-6``), or, for a comparison at equal tolerance, when the deflated operator's relative
residual is below ``tol`` (``criterion="residual"``); the true residual is reported either way. Both
come from the same product, so they cost nothing.

Both return an :class:`EigenpairResult`. ``A`` is anything
:func:`curvature.linear_operator.as_matvec` takes: a curvature operator, its ``matvec``, a dense
symmetric tensor, or a callable on (P,) / (P, b) tensors with ``dim=P`` given. Vectors are in the
operator's dtype and device; the small projected matrices are diagonalised in float64 on the CPU.

Which end: ``largest`` / ``smallest`` in the algebraic sense (for an indefinite Hessian ``largest`` is
the most positive), ``magnitude`` (largest ``|lambda|``, what power iteration converges to) and
``both`` (``ceil(k/2)`` largest and ``floor(k/2)`` smallest, scipy ``eigsh(which="BE")``'s split).

Relative residuals divide by ``max(|lambda|, floor)`` with ``floor = zero_floor * ||A||_est``
(the largest ``|Ritz value|`` seen): an eigenvalue at 0 (a GGN's null space) has no relative residual.
Single-vector Lanczos finds one vector per eigenspace in exact arithmetic: for an eigenvalue of
multiplicity ``r`` among the wanted ones use ``block_size >= r``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch

from curvature.lanczos import random_start_vectors
from curvature.linear_operator import as_matvec
from curvature.seeding import generator

WHICH = ("largest", "smallest", "both", "magnitude")
CRITERIA = ("eigenvalue", "residual")
#: a new block column shorter than this fraction of ||A|| means the Krylov space is invariant:
#: the column is replaced by a random vector orthogonal to everything (coupling 0)
BREAKDOWN_TOL = 1e-10
#: PyHessian's ``abs(eigenvalue - previous) / (abs(eigenvalue) + 1e-6) < tol``
PYHESSIAN_EPS = 1e-6
#: power iteration (criterion="residual") gives up on a pair whose residual has not fallen below
#: STALL_FACTOR times its best in STALL_PATIENCE products
STALL_FACTOR, STALL_PATIENCE = 0.99, 50


@dataclass
class EigenpairResult:
    """``k`` eigenpairs of a symmetric P x P operator.

    ``eigenvalues`` (k,) float64 on the CPU, ordered by ``which``: descending for ``largest`` and
    ``both``, ascending for ``smallest``, by descending ``|lambda|`` for ``magnitude``.
    ``eigenvectors`` (P, k), unit columns, in the operator's dtype and device. ``residuals`` (k,) the
    relative residuals ``||A u - lambda u|| / max(|lambda|, residual_floor)`` from true products;
    ``residual_estimates`` (k,) what the method itself saw (Lanczos: the relation's bound; power
    iteration: the same true residuals). ``converged`` (k,) is ``residuals <= tol``.
    ``num_matvecs``: operator products (vector columns) the method used to find the pairs;
    ``verification_matvecs``: products spent afterwards on the true residuals (power iteration: 0).
    ``num_iterations``: Lanczos restart cycles, or power iterations in all.
    ``history``: (products so far, wanted pairs converged so far) after each cycle / pair.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    residual_estimates: torch.Tensor
    converged: torch.Tensor
    num_matvecs: int
    verification_matvecs: int
    num_iterations: int
    method: str
    which: str
    tol: float
    residual_floor: float
    history: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    @property
    def all_converged(self) -> bool:
        return bool(self.converged.all())

    def summary(self) -> dict:
        """Plain numbers for a results file."""
        return {"method": self.method, "which": self.which, "tol": self.tol,
                "eigenvalues": self.eigenvalues.tolist(), "residuals": self.residuals.tolist(),
                "residual_estimates": self.residual_estimates.tolist(),
                "converged": self.converged.tolist(), "all_converged": self.all_converged,
                "num_matvecs": self.num_matvecs, "verification_matvecs": self.verification_matvecs,
                "num_iterations": self.num_iterations, "residual_floor": self.residual_floor,
                "notes": list(self.notes)}


class _Operator:
    """A counted ``X (P, b) -> A X`` over anything :func:`curvature.linear_operator.as_matvec` takes;
    ``dtype`` / ``device`` given here override what it reads (a plain closure: float64 on the CPU)."""

    def __init__(self, A, dim: Optional[int], dtype: Optional[torch.dtype], device):
        self._fn, self.dim, found_dtype, found_device = as_matvec(A, dim)
        self.dtype = dtype or found_dtype
        self.device = torch.device(device) if device is not None else found_device
        self.count = 0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``A x`` for x (P, b); counts b products. One column goes in as a (P,) vector."""
        self.count += x.shape[1]
        out = self._fn(x[:, 0]).reshape(-1, 1) if x.shape[1] == 1 else self._fn(x)
        if not torch.all(torch.isfinite(out)):
            raise FloatingPointError(f"the operator returned NaN or Inf (product {self.count})")
        return out.to(dtype=x.dtype)


def _order(values: torch.Tensor, which: str) -> torch.Tensor:
    """Indices of ``values`` from most to least wanted (``both`` alternates top and bottom)."""
    if which == "largest":
        return torch.argsort(values, descending=True)
    if which == "smallest":
        return torch.argsort(values)
    if which == "magnitude":
        return torch.argsort(values.abs(), descending=True)
    down, up = torch.argsort(values, descending=True).tolist(), torch.argsort(values).tolist()
    order, seen = [], set()
    for pair in zip(down, up):
        for i in pair:
            if i not in seen:
                seen.add(i)
                order.append(i)
    return torch.tensor(order, dtype=torch.long)


def _final_order(values: torch.Tensor, which: str) -> torch.Tensor:
    return torch.argsort(values) if which == "smallest" else \
        torch.argsort(values.abs() if which == "magnitude" else values, descending=True)


def select(values: torch.Tensor, which: str, k: int) -> torch.Tensor:
    """The ``k`` entries of ``values`` at the ``which`` end, in :class:`EigenpairResult`'s order (to
    compare a result with exact eigenvalues)."""
    values = torch.as_tensor(values, dtype=torch.float64)
    chosen = values[_order(values, which)[:k]]
    return chosen[_final_order(chosen, which)]


def _check(k: int, dim: int, which: str, tol: float) -> None:
    if which not in WHICH:
        raise ValueError(f"which must be one of {', '.join(WHICH)}, got {which!r}")
    if not 1 <= k <= dim:
        raise ValueError(f"k must be in [1, {dim}], got {k}")
    if not tol > 0:
        raise ValueError(f"tol must be > 0, got {tol}")


def _floor_fraction(zero_floor: Optional[float], dtype: torch.dtype) -> float:
    return math.sqrt(torch.finfo(dtype).eps) if zero_floor is None else zero_floor


def _project_out(w: torch.Tensor, bases: list) -> torch.Tensor:
    for q in bases:
        if q.shape[1]:
            w = w - q @ (q.T @ w)
    return w


def _random_orthogonal(bases: list, dim: int, gen, dtype, device) -> torch.Tensor:
    """A unit vector orthogonal to the columns of ``bases`` (twice projected)."""
    w = torch.randn(dim, 1, generator=gen, dtype=torch.float64).to(dtype=dtype, device=device)
    w = _project_out(_project_out(w, bases), bases)
    return w / w.norm()


def _orthonormalise(w: torch.Tensor, bases: list, scale: float, gen) -> tuple[torch.Tensor, torch.Tensor]:
    """``w = Q R`` column by column (two Gram-Schmidt passes); a column that vanishes (an invariant
    Krylov space) becomes a random unit vector orthogonal to everything, with a zero row in R."""
    b = w.shape[1]
    q = torch.zeros_like(w)
    r = torch.zeros(b, b, dtype=torch.float64)
    for i in range(b):
        x = w[:, i:i + 1]
        for _ in range(2):
            c = q[:, :i].T @ x
            x = x - q[:, :i] @ c
            r[:i, i] += c.squeeze(1).to("cpu", torch.float64)
        norm = float(x.norm())
        if norm <= BREAKDOWN_TOL * scale:
            q[:, i:i + 1] = _random_orthogonal(bases + [q[:, :i]], w.shape[0], gen, w.dtype, w.device)
        else:
            r[i, i] = norm
            q[:, i:i + 1] = x / norm
    return q, r


def top_eigenpairs(A, k: int, which: str = "largest", tol: float = 1e-4, max_matvecs: int = 2000,
                   basis_size: Optional[int] = None, block_size: int = 1, seed: int = 0,
                   dim: Optional[int] = None, dtype: Optional[torch.dtype] = None, device=None,
                   zero_floor: Optional[float] = None, verify: bool = True,
                   start_vectors: Optional[torch.Tensor] = None) -> EigenpairResult:
    """The ``k`` eigenpairs of ``A`` at the ``which`` end, each to relative residual ``tol``.

    Thick-restart block Lanczos with locking: the basis grows to ``basis_size`` columns (default
    ``max(2k + 1, 20)``, scipy ``eigsh``'s ``ncv``), one block of ``block_size`` products per step,
    every new block reorthogonalised twice against the basis and the locked vectors. Then the
    Rayleigh-Ritz pairs of the projected matrix are ranked; wanted pairs whose estimated residual
    is within ``tol`` are locked (kept out of all later steps; their coupling to the basis, below
    ``tol |lambda|``, is dropped), and the basis restarts from the ``k' + (m - k') // 2`` best other
    Ritz vectors (``k'`` the unconverged wanted ones) and the residual block. Stops when the ``k``
    most wanted pairs among the locked and current ones have converged, or after ``max_matvecs``
    products (then ``converged`` says which did). ``verify`` spends ``k`` more products on the true
    residuals. ``zero_floor``: see the module docstring (default ``sqrt(eps)`` of the dtype).
    ``start_vectors`` (P,) or (P, c) with ``c <= block_size``: the first columns of the start block
    (need not be normalised; a warm start, e.g. the Ritz vector of a nearby operator); the other
    ``block_size - c`` columns are the seeded random ones.
    """
    op = _Operator(A, dim, dtype, device)
    P, dt, dev, b = op.dim, op.dtype, op.device, int(block_size)
    _check(k, P, which, tol)
    if max_matvecs < b:
        raise ValueError(f"max_matvecs must be at least block_size={b}, got {max_matvecs}")
    if b < 1 or b > P:
        raise ValueError(f"block_size must be in [1, {P}], got {block_size}")
    m = min(P, basis_size or max(2 * k + 1, 20, k + 2 * b))
    if m < min(P, k + b + 1):
        raise ValueError(f"basis_size must be at least k + block_size + 1 = {k + b + 1}, got {basis_size}")
    gen = generator(seed, "top_eigen.refill")
    floor_fraction = _floor_fraction(zero_floor, dt)
    locked_vecs = torch.zeros(P, 0, dtype=dt, device=dev)
    locked_vals: list[float] = []
    locked_estimates: list[float] = []
    V = torch.zeros(P, m + 2 * b, dtype=dt, device=dev)  # a block may overshoot m by b - 1
    H = torch.zeros(m + 2 * b, m + 2 * b, dtype=torch.float64)
    start = random_start_vectors(P, b, seed=seed, dtype=dt, device=dev)
    if start_vectors is not None:
        given = _given_start(start_vectors, P, b)
        start[:, :given.shape[1]] = given.to(dtype=dt, device=dev)
    V[:, :b], _ = _orthonormalise(start, [], 1.0, gen)
    processed, filled, scale = 0, b, 0.0
    history, notes, cycles = [], [], 0
    while True:
        cycles += 1
        room = P - locked_vecs.shape[1]
        target = min(m, room)
        while True:  # extend by one block, then look at the Ritz pairs (a small eigh: no products)
            width = filled - processed
            W = op(V[:, processed:filled])
            scale = max(scale, float(W.norm(dim=0).max()))
            for _ in range(2):  # "twice is enough" (Daniel, Gragg, Kaufman, Stewart 1976)
                W = _project_out(W, [locked_vecs])
                c = V[:, :filled].T @ W
                W = W - V[:, :filled] @ c
                H[:filled, processed:filled] += c.to("cpu", torch.float64)
            processed = filled
            new = min(b, room - filled)
            q, last_r = _orthonormalise(W, [locked_vecs, V[:, :filled]], max(scale, 1e-300), gen)
            if new > 0:
                V[:, filled:filled + new] = q[:, :new]
                H[filled:filled + new, processed - width:processed] = last_r[:new]
                filled += new
            upper = torch.triu(H[:processed, :processed])
            theta, S = torch.linalg.eigh(upper + torch.triu(upper, 1).T)
            tail = S[processed - width:processed]
            # the relation A V = V H + R B E^T: the residual of Ritz pair i is ||B (E^T s_i)||
            estimates = torch.zeros(processed, dtype=torch.float64) if processed >= room else \
                (last_r @ tail).norm(dim=0)  # the basis spanning all the space left is exact
            scale = max([scale, *theta.abs().tolist(), *[abs(v) for v in locked_vals]])
            floor = floor_fraction * scale
            relative = estimates / theta.abs().clamp(min=max(floor, 1e-300))
            # the k most wanted among the locked pairs and the current Ritz pairs
            values = torch.tensor(locked_vals + theta.tolist(), dtype=torch.float64)
            done = torch.cat([torch.ones(len(locked_vals), dtype=torch.bool), relative <= tol])
            wanted = _order(values, which)[:k]
            finished = bool(done[wanted].all())
            if finished or processed >= target or op.count >= max_matvecs:
                break
        history.append((op.count, int(done[wanted].sum())))
        if finished or op.count >= max_matvecs:
            break
        active_wanted = [int(i) - len(locked_vals) for i in wanted if int(i) >= len(locked_vals)]
        lock = [i for i in active_wanted if bool(relative[i] <= tol)]
        if lock:
            y = V[:, :processed] @ S[:, lock].to(dt).to(dev)
            y = _project_out(y, [locked_vecs])
            y, _ = _orthonormalise(y, [locked_vecs], 1.0, gen)
            locked_vecs = torch.cat([locked_vecs, y], dim=1)
            locked_vals += theta[lock].tolist()
            locked_estimates += relative[lock].tolist()
        # Restart from [the best other Ritz vectors, the residual block] (coupling B_m E_m^T S_kept).
        skip = set(lock)
        remaining = [i for i in _order(theta, which).tolist() if i not in skip]
        unconverged = len([i for i in active_wanted if i not in skip])
        width_new = filled - processed
        target = min(m, P - locked_vecs.shape[1])
        keep = max(0, min(unconverged + (target - unconverged) // 2, target - max(width_new, 1), len(remaining)))
        kept = remaining[:keep]
        y = V[:, :processed] @ S[:, kept].to(dtype=dt, device=dev)
        residual = V[:, processed:filled].clone()
        coupling = last_r[:width_new] @ tail[:, kept] if width_new and width else None
        V.zero_()
        H.zero_()
        V[:, :keep] = y
        V[:, keep:keep + width_new] = residual
        H[:keep, :keep] = torch.diag(theta[kept])
        if coupling is not None:
            H[keep:keep + width_new, :keep] = coupling
        processed, filled = keep, keep + width_new
        if width_new == 0:  # the space was exhausted before: continue from a random vector
            V[:, keep:keep + 1] = _random_orthogonal([locked_vecs, V[:, :keep]], P, gen, dt, dev)
            filled = keep + 1
    pairs = _collect(locked_vecs, locked_vals, locked_estimates, V[:, :processed], theta, S, relative, which, k,
                     dt, dev)
    values, vectors, estimates_k = pairs
    if len(values) < k:
        notes.append(f"only {len(values)} Ritz pairs exist after {op.count} products")
    result_floor = floor_fraction * scale
    if verify:
        before = op.count
        values, vectors, residuals = _verified(op, vectors, which, result_floor)
        verification = op.count - before
    else:
        residuals, verification = estimates_k.clone(), 0
    converged = residuals <= tol
    if not bool(converged.all()):
        notes.append(f"{int((~converged).sum())} of {k} pairs above tol={tol:g} after {op.count - verification} "
                     f"products (max_matvecs={max_matvecs})")
    return EigenpairResult(values, vectors, residuals, estimates_k, converged, op.count - verification,
                           verification, cycles, "lanczos", which, float(tol), float(result_floor), history, notes)


def _given_start(start_vectors: torch.Tensor, dim: int, block_size: int) -> torch.Tensor:
    """The given start columns as a (P, c) block of unit vectors, checked."""
    v = start_vectors.unsqueeze(1) if start_vectors.dim() == 1 else start_vectors
    if v.dim() != 2 or v.shape[0] != dim or not 1 <= v.shape[1] <= block_size:
        raise ValueError(f"start_vectors must be (P,) or (P, c) with P={dim} and 1 <= c <= block_size="
                         f"{block_size}, got shape {tuple(start_vectors.shape)}")
    norms = v.norm(dim=0, keepdim=True)
    if not bool(torch.isfinite(v).all()) or bool((norms == 0).any()):
        raise ValueError("start_vectors must be finite and non-zero")
    return v / norms


def _collect(locked_vecs, locked_vals, locked_estimates, basis, theta, S, relative, which, k, dtype, device):
    """The k most wanted of the locked pairs and the current Ritz pairs, in the final order."""
    values = torch.tensor(locked_vals + theta.tolist(), dtype=torch.float64)
    estimates = torch.cat([torch.tensor(locked_estimates, dtype=torch.float64), relative])
    chosen = _order(values, which)[:k]
    chosen = chosen[_final_order(values[chosen], which)]
    columns = []
    for i in chosen.tolist():
        if i < len(locked_vals):
            columns.append(locked_vecs[:, i])
        else:
            columns.append(basis @ S[:, i - len(locked_vals)].to(dtype=dtype, device=device))
    vectors = torch.stack(columns, dim=1)
    return values[chosen], vectors / vectors.norm(dim=0, keepdim=True), estimates[chosen]


def _verified(op: _Operator, vectors: torch.Tensor, which: str, floor: float):
    """One block of true products ``A U`` for the k chosen vectors, a last Rayleigh-Ritz step in their
    span (free with those products: it removes the coupling that locking dropped between them), and
    the relative residuals ``||A u_i - lambda_i u_i|| / max(|lambda_i|, floor)`` of the rotated pairs."""
    product = op(vectors)
    gram = (vectors.T @ product).to("cpu", torch.float64)
    values, Z = torch.linalg.eigh(0.5 * (gram + gram.T))
    order = _final_order(values, which)
    values, Z = values[order], Z[:, order].to(dtype=vectors.dtype, device=vectors.device)
    vectors, product = vectors @ Z, product @ Z
    lam = values.to(dtype=vectors.dtype, device=vectors.device)
    norms = (product - vectors * lam).norm(dim=0).to("cpu", torch.float64)
    return values, vectors, norms / values.abs().clamp(min=max(floor, 1e-300))


def power_iteration(A, k: int, tol: float = 1e-3, max_iter: int = 100, seed: int = 0,
                    criterion: str = "eigenvalue", dim: Optional[int] = None, dtype: Optional[torch.dtype] = None,
                    device=None, zero_floor: Optional[float] = None) -> EigenpairResult:
    """PyHessian's top-k eigenpairs: power iteration with deflation against the vectors found.

    For each pair, from a seeded random unit vector: orthogonalise against the pairs found so far,
    take ``A v``, the Rayleigh quotient ``lambda = v^T A v`` and two relative residuals from the same
    product: the true one, ``||A v - lambda v||``, and the deflated operator's (``A v`` with its
    components along the pairs found removed; ``residual_estimates``). Stop on ``criterion``:
    ``eigenvalue`` (PyHessian's rule, ``|lambda - lambda_prev| / (|lambda_prev| + 1e-6) < tol``) or
    ``residual`` (the deflated residual ``<= tol``), else continue from ``A v / ||A v||``; at most
    ``max_iter`` products per pair (PyHessian's ``maxIter``), fewer if the residual stalls
    (``STALL_PATIENCE`` products without a 1% gain). Why the deflated residual: the i-th pair is
    deflated against earlier pairs accurate only to ``tol``, which leaves its true residual a floor
    near ``tol |lambda_1 / lambda_i|`` (measured: 1.18e-4 for tol 1e-4, lambda_1 / lambda_2 = 1.22);
    ``residuals`` and ``converged`` report the true residuals, so that floor shows. Unlike PyHessian,
    the returned vector is the ``v`` whose Rayleigh quotient and residual are reported (PyHessian
    returns ``A v`` normalised, one step further). It converges to the largest ``|lambda|`` of the deflated operator:
    the pairs come ordered by ``magnitude``.
    """
    if criterion not in CRITERIA:
        raise ValueError(f"criterion must be one of {', '.join(CRITERIA)}, got {criterion!r}")
    if max_iter < 1:
        raise ValueError(f"max_iter must be >= 1, got {max_iter}")
    op = _Operator(A, dim, dtype, device)
    _check(k, op.dim, "magnitude", tol)
    fraction = _floor_fraction(zero_floor, op.dtype)
    found = torch.zeros(op.dim, 0, dtype=op.dtype, device=op.device)
    values, residuals, estimates, history, scale, stalled = [], [], [], [], 0.0, []
    for i in range(k):
        v = random_start_vectors(op.dim, 1, seed=seed + i, dtype=op.dtype, device=op.device)
        previous, rel, seen, lam, best, since_best = None, math.inf, math.inf, 0.0, math.inf, 0
        for _ in range(max_iter):
            v = _project_out(v, [found])
            v = v / v.norm()
            av = op(v)
            lam = float(v.T @ av)
            scale = max(scale, abs(lam))
            denominator = max(abs(lam), fraction * scale, 1e-300)
            rel = float((av - lam * v).norm()) / denominator
            seen = float((_project_out(av, [found]) - lam * v).norm()) / denominator  # the deflated operator's
            if criterion == "residual" and seen <= tol:
                break
            best, since_best = (seen, 0) if seen < STALL_FACTOR * best else (best, since_best + 1)
            if criterion == "residual" and since_best >= STALL_PATIENCE:
                stalled.append(i)
                break
            if criterion == "eigenvalue" and previous is not None and \
                    abs(previous - lam) / (abs(previous) + PYHESSIAN_EPS) < tol:
                break
            previous = lam
            norm = float(av.norm())
            if norm == 0.0:  # v is in the null space: an exact pair (0, v)
                break
            v = av / norm
        found = torch.cat([found, v], dim=1)
        values.append(lam)
        residuals.append(rel)
        estimates.append(seen)
        history.append((op.count, sum(r <= tol for r in residuals)))
    vals = torch.tensor(values, dtype=torch.float64)
    res = torch.tensor(residuals, dtype=torch.float64)
    order = _final_order(vals, "magnitude")
    notes = [] if bool((res <= tol).all()) else \
        [f"{int((res > tol).sum())} of {k} pairs above tol={tol:g} in relative residual (criterion={criterion})"]
    if stalled:
        notes.append(f"pairs {', '.join(str(i + 1) for i in stalled)} (in the order found) stalled: the residual "
                     f"stopped falling ({STALL_PATIENCE} products without a 1% gain)")
    seen = torch.tensor(estimates, dtype=torch.float64)
    return EigenpairResult(vals[order], found[:, order], res[order], seen[order], res[order] <= tol,
                           op.count, 0, op.count, f"power_iteration[{criterion}]", "magnitude", float(tol),
                           float(fraction * scale), history, notes)
