"""Lanczos tridiagonalisation of a symmetric operator given only as a matrix-vector closure.

A thin wrapper over GPyTorch's ``linear_operator.utils.lanczos.lanczos_tridiag`` (full
reorthogonalisation) that turns its output into the quantities curvature analyses need:

* the tridiagonal matrix ``T_m`` of each start vector,
* Ritz values (eigenvalues of ``T_m``, ascending) and Ritz weights (squared first components of
  ``T_m``'s normalised eigenvectors; they sum to 1 and give the Gauss quadrature measure whose
  moments equal ``v^T A^k v`` for ``k = 0 .. 2m-1``),
* a residual-norm bound ``|beta_m s_{m,i}|`` for each Ritz pair,
* optionally the Ritz vectors ``Q_m s_i``.

GPyTorch facts this wrapper works around (measured, see ``shared/TRAPS.md``):

* it stops once every off-diagonal ``beta`` is below an absolute ``1e-6``, so an operator whose
  eigenvalues are about ``1e-6`` would stop after one step. We divide the operator by a scale
  ``s = max_i ||A v_i||`` (taken from the first product, which is reused, so it costs nothing) and
  multiply the tridiagonal back; the threshold becomes relative to the operator's size.
* it never computes ``beta_m`` of the last step, which the residual bound needs, so we ask it for
  ``m + 1`` iterations and keep the leading ``m x m`` block: ``m + 1`` operator products in all.
* with several start vectors it stops only when all of them have converged; a vector whose Krylov
  space became invariant earlier is truncated at its first negligible ``beta`` here, and its rows are
  padded (see :class:`LanczosResult`).
* ``lanczos_tridiag_to_diag`` clamps negative eigenvalues (it is written for kernel matrices), so the
  tridiagonal is diagonalised with ``torch.linalg.eigh`` in float64 instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from linear_operator.utils.lanczos import lanczos_tridiag
from tqdm.auto import tqdm

from curvature.seeding import generator

Matvec = Callable[[torch.Tensor], torch.Tensor]

#: A beta below this fraction of the operator scale means the Krylov space is invariant.
RELATIVE_BREAKDOWN_TOL = 1e-6


@dataclass
class LanczosResult:
    """Output of :func:`lanczos` for ``k`` start vectors and ``m`` steps.

    Shapes: ``tridiagonal`` (k, m, m); ``ritz_values``, ``ritz_weights``, ``residual_bounds`` and
    ``mask`` (k, m); ``ritz_vectors`` (k, m, P) when requested. ``num_steps`` (k,) holds the number
    of valid steps of each vector; ``m = max(num_steps)``. ``basis`` (k, P, m) is the Lanczos basis
    Q_m when requested. A vector that terminated early
    (``num_steps[i] < m``) has its tridiagonal padded with zeros and its Ritz values padded with its
    largest valid Ritz value at weight 0; ``mask`` marks the valid entries. ``final_beta`` (k,) is
    ``beta_m``, the norm of the residual after the last step (0 when the space became invariant). All tensors are float64
    on the CPU except the Ritz vectors, which stay in the operator's dtype and device.
    """

    tridiagonal: torch.Tensor
    ritz_values: torch.Tensor
    ritz_weights: torch.Tensor
    residual_bounds: torch.Tensor
    mask: torch.Tensor
    num_steps: torch.Tensor
    final_beta: torch.Tensor
    operator_scale: float
    ritz_vectors: Optional[torch.Tensor] = None
    basis: Optional[torch.Tensor] = None
    notes: list[str] = field(default_factory=list)

    @property
    def num_vectors(self) -> int:
        return self.ritz_values.shape[0]

    def truncated(self, steps: int) -> "LanczosResult":
        """The result of the first ``steps`` Lanczos steps of the same run (the leading block of T).

        Exact: ``T_j`` is the leading ``j x j`` block of ``T_m`` for the same start vector.
        Residual bounds of the truncated result use ``beta_j`` from ``T_m``. Ritz vectors are
        not carried over.
        """
        if not 1 <= steps <= self.tridiagonal.shape[-1]:
            raise ValueError(f"steps must be in [1, {self.tridiagonal.shape[-1]}], got {steps}")
        blocks, betas = [], []
        for i in range(self.num_vectors):
            m_i = min(int(self.num_steps[i]), steps)
            blocks.append(self.tridiagonal[i, :m_i, :m_i])
            betas.append(float(self.tridiagonal[i, m_i, m_i - 1]) if m_i < int(self.num_steps[i])
                         else float(self.final_beta[i]))
        return _assemble(blocks, betas, self.operator_scale, None, list(self.notes), False, False)


def random_start_vectors(dim: int, num_vectors: int = 1, kind: str = "gaussian", seed: int = 0,
                  dtype: torch.dtype = torch.float64, device="cpu") -> torch.Tensor:
    """Seeded unit-norm start vectors, shape (dim, num_vectors).

    ``kind`` is ``"gaussian"`` (uniform on the sphere after normalising) or ``"rademacher"``
    (entries +-1/sqrt(dim)). The draw happens on the CPU in float64 so that the same seed gives the
    same vectors on every device and dtype.
    """
    gen = generator(seed, "lanczos.start_vectors")
    if kind == "gaussian":
        v = torch.randn(dim, num_vectors, generator=gen, dtype=torch.float64)
    elif kind == "rademacher":
        v = torch.randint(0, 2, (dim, num_vectors), generator=gen).to(torch.float64) * 2 - 1
    else:
        raise ValueError(f"start vector kind must be 'gaussian' or 'rademacher', got {kind!r}")
    v = v / v.norm(dim=0, keepdim=True)
    return v.to(dtype=dtype, device=torch.device(device))


def lanczos(matvec: Matvec, dim: int, num_steps: int, num_vectors: int = 1,
            start_vectors: Optional[torch.Tensor] = None, seed: int = 0,
            dtype: torch.dtype = torch.float64, device="cpu", start_kind: str = "gaussian",
            return_vectors: bool = False, return_basis: bool = False,
            progress: bool = False) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on the symmetric operator ``matvec`` from each start vector.

    ``matvec`` maps a (dim,) or (dim, k) tensor to a tensor of the same shape. ``start_vectors``,
    if given, is (dim, num_vectors) and need not be normalised; otherwise seeded vectors of
    ``start_kind`` are drawn. Costs ``num_steps + 1`` products (one batched product per step for all
    vectors) unless the Krylov space becomes invariant first. ``progress`` shows a tqdm bar of the
    products. ``return_vectors`` adds the Ritz vectors, ``return_basis`` the Lanczos basis.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    device = torch.device(device)
    if start_vectors is None:
        v0 = random_start_vectors(dim, num_vectors, start_kind, seed, dtype, device)
    else:
        v0 = start_vectors.to(dtype=dtype, device=device)
        if v0.dim() == 1:
            v0 = v0.unsqueeze(-1)
        if v0.shape[0] != dim:
            raise ValueError(f"start_vectors has {v0.shape[0]} rows, expected dim={dim}")
        norms = v0.norm(dim=0, keepdim=True)
        if torch.any(norms == 0):
            raise ValueError("a start vector is zero")
        v0 = v0 / norms
    k = v0.shape[1]

    # First product: gives the operator scale and is handed back to GPyTorch on its first call.
    av0 = _apply(matvec, v0)
    scale = float(av0.norm(dim=0).max())
    notes: list[str] = []
    if scale == 0.0 or not torch.isfinite(torch.tensor(scale)):
        if scale != 0.0:
            raise FloatingPointError("the operator returned a non-finite product for the start vector")
        notes.append("every start vector is in the operator's null space: measure is a point mass at 0")
        blocks = [torch.zeros(1, 1, dtype=torch.float64) for _ in range(k)]
        return _assemble(blocks, [0.0] * k, 0.0, None, notes, False, False)
    if dim == 1:  # GPyTorch's loop needs at least two iterations
        blocks = [(v0[:, i] @ av0[:, i]).to("cpu", torch.float64).reshape(1, 1) for i in range(k)]
        return _assemble(blocks, [0.0] * k, scale, v0.T.unsqueeze(-1), notes, return_vectors,
                         return_basis)
    if abs(scale - 1.0) > 0.5:
        notes.append(f"operator divided by scale s={scale:.6g} for GPyTorch's absolute beta "
                     "threshold; Ritz values multiplied back by s")

    max_iter = min(num_steps + 1, dim)
    bar = tqdm(total=max_iter, desc="Lanczos", unit="step", leave=False,
                disable=None if progress else True)  # None: only on a terminal
    tol = 1e-12 if dtype == torch.float64 else 1e-6

    def run_batch(columns: list[int]):
        """GPyTorch on the given start vectors; the first product is the one already computed."""
        init, first = v0[:, columns], av0[:, columns] / scale
        cache = {"first": True}

        def scaled(x: torch.Tensor) -> torch.Tensor:
            reuse = cache["first"] and x.shape == init.shape and torch.allclose(x, init, rtol=0, atol=tol)
            cache["first"] = False
            if len(columns) == k:
                bar.update(1)
            if reuse:
                return first
            # A vector that broke down (beta = 0) leaves 0/0 in GPyTorch's basis; it is truncated
            # later, so feed the operator zeros there instead of NaN.
            broken = ~torch.isfinite(x).all(dim=0)
            x = torch.where(broken, torch.zeros((), dtype=x.dtype, device=x.device), x)
            out = _apply(matvec, x)
            if not torch.all(torch.isfinite(out)):
                raise FloatingPointError("the operator returned NaN or Inf during Lanczos")
            return out / scale

        q, t = lanczos_tridiag(scaled, max_iter=max_iter, dtype=dtype, device=device,
                               matrix_shape=torch.Size([dim, dim]), init_vecs=init,
                               num_init_vecs=len(columns))
        if len(columns) == 1:
            q, t = q.unsqueeze(0), t.unsqueeze(0)  # GPyTorch squeezes a single vector away
        return q, t.to(dtype=torch.float64, device="cpu") * scale

    def residual_norms(q: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """||r_m|| after the last step GPyTorch kept (it drops the beta that made it stop)."""
        m = t.shape[-1]
        last = q[:, :, m - 1].T  # (P, batch)
        r = _apply(matvec, last) - last * t[:, m - 1, m - 1].to(last)
        if m > 1:
            r = r - q[:, :, m - 2].T * t[:, m - 1, m - 2].to(last)
        for _ in range(2):  # reorthogonalise against the whole basis, twice is enough
            r = r - torch.einsum("bpm,bm->pb", q[:, :, :m], torch.einsum("bpm,pb->bm", q[:, :, :m], r))
        return r.norm(dim=0).to("cpu", torch.float64)

    blocks: list = [None] * k
    betas: list = [0.0] * k
    bases: list = [None] * k
    queue = [list(range(k))]
    try:
        while queue:
            pending = queue.pop()
            q, t = run_batch(pending)
            done = t.shape[-1]
            stopped_norms = residual_norms(q, t) if done < max_iter else None
            rerun = []
            for row, i in enumerate(pending):
                sub = torch.diagonal(t[row], offset=-1).abs()
                tiny = torch.nonzero(sub <= RELATIVE_BREAKDOWN_TOL * scale).flatten()
                m_i = min(int(tiny[0]) + 1 if len(tiny) else done, num_steps)
                beta = float(t[row, m_i, m_i - 1]) if m_i < done else 0.0
                if len(tiny) == 0 and stopped_norms is not None:
                    beta = float(stopped_norms[row])
                    if beta > RELATIVE_BREAKDOWN_TOL * scale:
                        if len(pending) > 1:  # GPyTorch stops a whole batch when one vector breaks down
                            rerun.append(i)
                            continue
                        notes.append(f"start vector {i}: GPyTorch stopped after {done} steps "
                                     "(reorthogonalisation did not converge)")
                    else:
                        beta = 0.0
                if beta == 0.0 and m_i < min(num_steps, dim):
                    notes.append(f"start vector {i}: Krylov space invariant after {m_i} steps "
                                 "(exact for this vector; result truncated there)")
                blocks[i] = t[row, :m_i, :m_i]
                betas[i] = beta
                bases[i] = q[row]
            if rerun:  # as a smaller batch, or one at a time if the batch made no progress
                queue.extend([[i] for i in rerun] if rerun == pending else [rerun])
    finally:
        bar.close()
    if return_vectors or return_basis:
        width = max(b.shape[-1] for b in bases)
        basis = torch.zeros(k, dim, width, dtype=dtype, device=device)
        for i, b in enumerate(bases):
            basis[i, :, :b.shape[-1]] = b
    else:
        basis = None
    return _assemble(blocks, betas, scale, basis, notes, return_vectors, return_basis)


def _apply(matvec: Matvec, x: torch.Tensor) -> torch.Tensor:
    """Apply matvec to a (dim, k) block; closures that only take vectors get one column at a time."""
    try:
        out = matvec(x)
    except RuntimeError:
        if x.shape[1] == 1:
            raise
        return torch.stack([matvec(x[:, j]) for j in range(x.shape[1])], dim=1)
    if out.shape != x.shape:
        if out.dim() == 1 and x.shape[1] == 1:
            return out.unsqueeze(-1)
        raise ValueError(f"matvec returned shape {tuple(out.shape)} for input {tuple(x.shape)}")
    return out


def _assemble(blocks, betas, scale, basis, notes, want_vectors: bool, want_basis: bool) -> LanczosResult:
    """Diagonalise each vector's tridiagonal block and pad to a common m.

    ``basis`` is GPyTorch's (k, P, steps) Lanczos basis (or None); Ritz vectors and the basis are
    kept only when asked for, since they are k x m x P.
    """
    k = len(blocks)
    m = max(b.shape[0] for b in blocks)
    tri = torch.zeros(k, m, m, dtype=torch.float64)
    values = torch.zeros(k, m, dtype=torch.float64)
    weights = torch.zeros(k, m, dtype=torch.float64)
    bounds = torch.zeros(k, m, dtype=torch.float64)
    mask = torch.zeros(k, m, dtype=torch.bool)
    vectors = None
    kept_basis = None
    if want_basis and basis is not None:
        kept_basis = torch.zeros(k, basis.shape[1], m, dtype=basis.dtype, device=basis.device)
    for i, block in enumerate(blocks):
        m_i = block.shape[0]
        block = 0.5 * (block + block.T)
        evals, evecs = torch.linalg.eigh(block)
        tri[i, :m_i, :m_i] = block
        values[i, :m_i] = evals
        values[i, m_i:] = evals[-1]
        weights[i, :m_i] = evecs[0] ** 2
        bounds[i, :m_i] = (betas[i] * evecs[-1]).abs()
        mask[i, :m_i] = True
        if kept_basis is not None:
            kept_basis[i, :, :m_i] = basis[i, :, :m_i]
        if want_vectors and basis is not None:
            if vectors is None:
                vectors = torch.zeros(k, m, basis.shape[1], dtype=basis.dtype, device=basis.device)
            s = evecs.to(dtype=basis.dtype, device=basis.device)
            vectors[i, :m_i] = (basis[i, :, :m_i] @ s).T
    return LanczosResult(tridiagonal=tri, ritz_values=values, ritz_weights=weights,
                        residual_bounds=bounds, mask=mask,
                        num_steps=torch.tensor([b.shape[0] for b in blocks]),
                        final_beta=torch.tensor([abs(float(b)) for b in betas], dtype=torch.float64),
                        operator_scale=float(scale), ritz_vectors=vectors, basis=kept_basis,
                        notes=list(notes))
