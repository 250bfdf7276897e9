"""Lanczos tridiagonalisation of a symmetric operator given only as a matrix-vector closure.

Two engines with the same scaling and stopping conventions and the same tridiagonal (to rounding,
tested to 1e-10 in float64): ``engine="gpytorch"``, a thin wrapper over GPyTorch's
``linear_operator.utils.lanczos.lanczos_tridiag``, and ``engine="native"`` (the default, as on the
command line), our own loop with full reorthogonalisation, which can save its state every
``checkpoint_every`` steps and resume from it (:func:`lanczos`), costs ``m`` products for ``m`` steps
instead of ``m + 1``, and reorthogonalises with matrix-vector products against the stored basis
instead of GPyTorch's (k+1) x P temporary. The native engine keeps its basis on the device, in host
memory or in a memory-mapped file (``basis_device``, :mod:`curvature.lanczos_basis`) and runs on row
shards of the vectors given a sum over processes (``reduce``).
Both turn their output into the quantities curvature analyses need:

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

A NaN or Inf product stops either engine with :class:`LanczosNumericalError`, which names the step
and carries the result of the steps completed before it (``partial``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch
from tqdm.auto import tqdm

from curvature.errors import NumericalError, SuiteError
from curvature.io import torch_save_atomic
from curvature.lanczos_basis import DEFAULT_CHUNK_MB, LanczosBasis
from curvature.linear_operator import as_matvec
from curvature.seeding import generator

Matvec = Callable[[torch.Tensor], torch.Tensor]
Checkpoint = Union[str, Path, Callable[[dict], None], None]
#: Sums a tensor of local inner products over the processes that each hold rows of the vectors.
Reduce = Optional[Callable[[torch.Tensor], torch.Tensor]]

#: A beta below this fraction of the operator scale means the Krylov space is invariant.
RELATIVE_BREAKDOWN_TOL = 1e-6
ENGINES = ("gpytorch", "native")
STATE_FORMAT = "deep-curvature-suite/lanczos-state/1"
#: Reorthogonalise again while a pass shrinks the residual below this fraction of its norm (the
#: "twice is enough" criterion of Daniel, Gragg, Kaufman and Stewart, 1976).
DGKS_ETA = 0.5 ** 0.5


class LanczosNumericalError(NumericalError, FloatingPointError):
    """A NaN or Inf operator product at Lanczos step ``step``; ``partial`` holds the
    :class:`LanczosResult` of the steps completed before it (None when there were none)."""

    def __init__(self, message: str, step: int, partial: Optional["LanczosResult"] = None):
        super().__init__(message)
        self.step = step
        self.partial = partial


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


def lanczos(matvec: Any, dim: Optional[int] = None, num_steps: int = 100, num_vectors: int = 1,
            start_vectors: Optional[torch.Tensor] = None, seed: int = 0,
            dtype: Optional[torch.dtype] = None, device=None, start_kind: str = "gaussian",
            return_vectors: bool = False, return_basis: bool = False,
            progress: bool = False, engine: str = "native", checkpoint: Checkpoint = None,
            checkpoint_every: int = 0, resume_state: Union[dict, str, Path, None] = None,
            reduce: Reduce = None, basis_device: str = "device",
            basis_file: Union[str, Path, None] = None, basis_chunk_mb: float = DEFAULT_CHUNK_MB,
            keep_basis: bool = False) -> LanczosResult:
    """Run ``num_steps`` Lanczos steps on the symmetric operator ``matvec`` from each start vector.

    ``matvec`` is a curvature operator (``op``), its ``op.matvec``, a dense symmetric tensor, or any
    callable mapping a (dim,) or (dim, k) tensor to one of the same shape (then ``dim`` is needed;
    :func:`curvature.linear_operator.as_matvec`). ``start_vectors``, if given, is (dim, num_vectors)
    and need not be normalised; otherwise seeded vectors of ``start_kind`` are drawn. One batched
    product per step for all vectors: ``num_steps + 1`` products with ``engine="gpytorch"``,
    ``num_steps`` with ``engine="native"``, fewer when the Krylov space becomes invariant first.
    ``progress`` shows a tqdm bar of the steps.
    ``return_vectors`` adds the Ritz vectors, ``return_basis`` the Lanczos basis.

    Defaults are the command line's (``conf/analysis/spectrum.yaml``, ``conf/config.yaml``): 100 steps,
    one gaussian start vector, seed 0, the native engine. ``dtype`` / ``device`` None: those of
    ``start_vectors`` if given, else the operator's (``op.dtype`` / ``op.device``), else float64 on the
    CPU (a plain closure); the products are taken in that dtype.

    Native engine only: ``checkpoint`` (a path, written atomically, or a callable taking the state
    dict) receives the state every ``checkpoint_every`` steps and once at the end; the state holds
    the basis (a disk basis: its file's name and a CRC-32 of each row), the alphas and betas, the
    step count, the start vectors, the operator scale and the RNG state. ``resume_state`` (such a
    dict or its file) continues from it: the result equals an uninterrupted run's (bit for bit on
    the same device and basis kind). A state from a longer run is truncated.

    ``reduce`` (native engine) runs Lanczos on row shards: each process holds rows of every vector,
    ``matvec`` maps its shard of ``x`` to its shard of ``A x`` (``dim`` is the local row count), and
    ``reduce(t)`` returns the sum of ``t`` over the processes (same shape; e.g. an in-place
    ``all_reduce``). It receives every local inner product: the start vectors' and the first
    product's squared norms, ``alpha``, the reorthogonalisation coefficients ``Q r`` and the squared
    norms behind ``beta`` and the DGKS test, plus the local row count once (for the global ``dim``).
    Then ``start_vectors`` is needed (this process's rows of one global draw), the tridiagonal equals
    the unsharded run's to rounding and is the same on every process, and Ritz vectors and the basis
    come back as local rows. Checkpoints are per process (give each its own path). None: no
    reduction, one process holds whole vectors.

    ``basis_device`` (native engine) is where the k (m + 1) Lanczos vectors live
    (:class:`curvature.lanczos_basis.LanczosBasis`): ``"device"`` (with the operator), ``"cpu"``
    (host memory) or ``"disk"`` (the memory-mapped file ``basis_file``, removed at the end unless
    ``keep_basis``, a ``checkpoint`` or the ``resume_state`` refers to it; a disk state names its file
    instead of holding the rows); the last two stream it through the device in
    tiles of ``basis_chunk_mb``. Same tridiagonal as ``"device"``: bit for bit while one tile holds
    the basis, to rounding otherwise. A returned basis or Ritz vectors of those kinds are in host memory.
    """
    matvec, dim, own_dtype, own_device = as_matvec(matvec, dim)
    if dtype is None:
        dtype = start_vectors.dtype if start_vectors is not None else own_dtype
    if device is None:
        device = start_vectors.device if start_vectors is not None else own_device
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if dim < 1:
        raise ValueError(f"dim must be >= 1, got {dim}")
    if engine not in ENGINES:
        raise ValueError(f"engine must be 'gpytorch' or 'native', got {engine!r}")
    if checkpoint_every < 0:
        raise ValueError(f"checkpoint_every must be >= 0, got {checkpoint_every}")
    if (checkpoint is not None or resume_state is not None) and engine != "native":
        raise ValueError("checkpointing and resuming need engine='native'")
    if basis_device != "device" and engine != "native":
        raise ValueError("basis_device 'cpu' or 'disk' needs engine='native'")
    if reduce is not None and engine != "native":
        raise ValueError("reduce (row-sharded vectors) needs engine='native'")
    if reduce is not None and start_vectors is None:
        raise ValueError("reduce needs start_vectors: this process's rows of one global draw "
                         "(a seeded draw of the local rows would repeat on every process)")
    device = torch.device(device)
    total_dim = dim if reduce is None else _global_dim(dim, reduce, device)
    v0 = _start_block(dim, num_vectors, start_vectors, seed, start_kind, dtype, device, reduce)
    k = v0.shape[1]
    state = _load_state(resume_state, dim, k, dtype, v0) if resume_state is not None else None
    notes: list[str] = []
    if state is not None:
        scale, av0 = float(state["scale"]), None
        notes += [n for n in state.get("notes", []) if not n.startswith("resumed")]
    else:
        # First product: gives the operator scale and is reused as the first step's product.
        av0 = _checked_product(matvec, v0, 0, lambda: None)
        scale = float(_column_norms(av0, reduce).max())
        if scale == 0.0:
            notes.append("every start vector is in the operator's null space: measure is a point mass at 0")
            blocks = [torch.zeros(1, 1, dtype=torch.float64) for _ in range(k)]
            return _assemble(blocks, [0.0] * k, 0.0, None, notes, False, False)
        if total_dim == 1:  # GPyTorch's loop needs at least two iterations
            blocks = [(v0[:, i] @ av0[:, i]).to("cpu", torch.float64).reshape(1, 1) for i in range(k)]
            return _assemble(blocks, [0.0] * k, scale, v0.T.unsqueeze(-1), notes, return_vectors,
                             return_basis)
        if abs(scale - 1.0) > 0.5:
            notes.append(f"operator divided by scale s={scale:.6g} for the absolute beta threshold "
                         "(GPyTorch's 1e-6); Ritz values multiplied back by s")
    want_basis = return_vectors or return_basis
    if engine == "native":
        save = _checkpoint_writer(checkpoint, checkpoint_every, dict(
            format=STATE_FORMAT, dim=dim, num_vectors=k, dtype=str(dtype), scale=scale,
            start_vectors=v0.detach().to("cpu"), seed=seed, start_kind=start_kind))
        storage = dict(kind=basis_device, path=basis_file, chunk_mb=basis_chunk_mb,
                       keep=keep_basis or checkpoint is not None)
        blocks, betas, basis = _native(matvec, v0, av0, scale, num_steps, total_dim, notes, state,
                                       save, progress, reduce, storage, want_basis)
    else:
        blocks, betas, basis = _gpytorch(matvec, v0, av0, scale, num_steps, dim, dtype, device,
                                         notes, progress)
        if want_basis:
            width = max(b.shape[-1] for b in basis)
            full = torch.zeros(k, dim, width, dtype=dtype, device=device)
            for i, b in enumerate(basis):
                full[i, :, :b.shape[-1]] = b
            basis = full
        else:
            basis = None
    return _assemble(blocks, betas, scale, basis, notes, return_vectors, return_basis)


def _start_block(dim, num_vectors, start_vectors, seed, start_kind, dtype, device,
                 reduce: Reduce = None) -> torch.Tensor:
    """The (dim, k) block of unit start vectors: given ones normalised, or seeded ones drawn."""
    if start_vectors is None:
        return random_start_vectors(dim, num_vectors, start_kind, seed, dtype, device)
    v0 = start_vectors.to(dtype=dtype, device=device)
    if v0.dim() == 1:
        v0 = v0.unsqueeze(-1)
    if v0.shape[0] != dim:
        raise ValueError(f"start_vectors has {v0.shape[0]} rows, expected dim={dim}")
    norms = _column_norms(v0, reduce).unsqueeze(0)
    if torch.any(norms == 0):
        raise ValueError("a start vector is zero")
    return v0 / norms


def _column_norms(x: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """Euclidean norms of the columns of ``x`` (P, k); of the whole vectors when ``x`` holds this
    process's rows and ``reduce`` sums over processes (``sqrt(fl(n^2)) == n`` in binary floating
    point, so an identity ``reduce`` changes no bit)."""
    norms = x.norm(dim=0)
    return norms if reduce is None else reduce(norms * norms).sqrt()


def _vector_norm(r: torch.Tensor, reduce: Reduce) -> float:
    """``||r||`` of a (P,) vector, of the whole vector when ``r`` holds this process's rows."""
    norm = r.norm()
    return float(norm if reduce is None else reduce(norm * norm).sqrt())


def _summed(value: torch.Tensor, reduce: Reduce) -> torch.Tensor:
    """A local inner product (or a vector of them) summed over the processes."""
    return value if reduce is None else reduce(value)


def _global_dim(dim: int, reduce: Callable, device: torch.device) -> int:
    """The total row count of sharded vectors: the local counts summed (exact in float64)."""
    return int(reduce(torch.tensor([float(dim)], dtype=torch.float64, device=device)).item())


def _checked_product(matvec: Matvec, x: torch.Tensor, step: int, partial: Callable) -> torch.Tensor:
    """``matvec(x)``; a NaN/Inf product (or an operator's NumericalError) names the Lanczos step."""
    try:
        out = _apply(matvec, x)
    except LanczosNumericalError:
        raise
    except NumericalError as error:
        raise LanczosNumericalError(f"Lanczos step {step}: {error}", step, partial()) from None
    if not torch.all(torch.isfinite(out)):
        raise LanczosNumericalError(f"Lanczos step {step}: the operator returned NaN or Inf",
                                    step, partial())
    return out


def _native(matvec, v0, av0, scale, num_steps, dim, notes, state, save, progress, reduce=None,
            storage: Optional[dict] = None, want_basis: bool = True):
    """Lanczos with full reorthogonalisation against the stored basis, per-vector stopping.

    Step ``j`` of each live vector: ``r = A q_j / s - beta_{j-1} q_{j-1}``, ``alpha_j = q_j . r``,
    ``r -= alpha_j q_j``, classical Gram-Schmidt against ``q_0 .. q_j`` (repeated while a pass
    cancels more than DGKS_ETA of the norm), ``beta_j = ||r||``; a vector whose ``beta_j`` falls to
    RELATIVE_BREAKDOWN_TOL has an invariant Krylov space and stops. Returns the unscaled blocks,
    the final betas and the (k, P, m) basis (None unless ``want_basis``). ``dim`` is the global
    size (sum of the shards' rows); ``storage`` the keywords of :class:`LanczosBasis` and ``keep``.
    """
    k, dtype, device = v0.shape[1], v0.dtype, v0.device
    cap = min(num_steps, dim)
    storage = dict(storage or {"kind": "device"})
    keep = storage.pop("keep", False)
    saved_file = None if state is None else state.get("basis_file")
    reuse = (storage.get("kind") == "disk" and saved_file is not None and storage.get("path") is not None
             and Path(saved_file).resolve() == Path(storage["path"]).resolve())
    # row cap holds q_cap, to extend the run later
    basis = LanczosBasis(num_vectors=k, rows=cap + 1, dim=v0.shape[0], dtype=dtype, device=device,
                         reuse_file=reuse, **storage)
    try:
        return _native_steps(matvec, v0, av0, scale, cap, notes, state, save, progress, reduce, basis,
                             want_basis)
    finally:
        basis.close(keep=keep or reuse)  # a file resumed in place still belongs to the state it came with


def _native_steps(matvec, v0, av0, scale, cap, notes, state, save, progress, reduce, basis, want_basis):
    """The steps of :func:`_native` on an allocated ``basis`` (:class:`LanczosBasis`)."""
    k = v0.shape[1]
    alphas = torch.zeros(k, cap, dtype=torch.float64)
    betas = torch.zeros(k, cap, dtype=torch.float64)
    steps = torch.zeros(k, dtype=torch.long)
    broken = torch.zeros(k, dtype=torch.bool)
    start = 0
    if state is None:
        for i in range(k):
            basis.write(i, 0, v0[:, i])
    else:
        start = min(int(state["step"]), cap)
        basis.restore(state, state.get("source", "the saved Lanczos state"))
        alphas[:, :start] = state["alphas"][:, :start]
        betas[:, :start] = state["betas"][:, :start]
        steps = state["steps"].clamp(max=cap)
        broken = state["broken"] & (state["steps"] <= cap)
        if "rng_state" in state:
            torch.set_rng_state(state["rng_state"])
        notes.append(f"resumed from the saved Lanczos state after step {start}")

    def blocks_and_betas():
        blocks, final = [], []
        for i in range(k):
            m_i = int(steps[i])
            block = torch.diag(alphas[i, :m_i]) + torch.diag(betas[i, :m_i - 1], 1) + \
                torch.diag(betas[i, :m_i - 1], -1)
            blocks.append(block * scale)
            final.append(0.0 if broken[i] else float(betas[i, m_i - 1]) * scale)
        return blocks, final

    def partial():
        if int(steps.min()) == 0:
            return None
        blocks, final = blocks_and_betas()
        return _assemble(blocks, final, scale, None, list(notes), False, False)

    def snapshot(step: int) -> dict:
        return {"step": step, **basis.snapshot(step),
                "alphas": alphas[:, :step].clone(), "betas": betas[:, :step].clone(),
                "steps": steps.clone(), "broken": broken.clone(), "rng_state": torch.get_rng_state(),
                "notes": list(notes)}

    bar = tqdm(total=cap, initial=start, desc="Lanczos", unit="step", leave=False,
               disable=None if progress else True)  # None: only on a terminal
    try:
        for j in range(start, cap):
            live = [i for i in range(k) if not broken[i]]
            if not live:
                break
            if j == 0 and av0 is not None:
                aq = av0[:, live] / scale
            else:
                x = basis.block(live, j)
                aq = _checked_product(matvec, x, j, partial) / scale
            for c, i in enumerate(live):
                q = basis.row(i, j)
                r = aq[:, c] - betas[i, j - 1].item() * basis.row(i, j - 1) if j > 0 else aq[:, c].clone()
                alpha = _summed(torch.dot(q, r), reduce)
                r = r - alpha * q
                r, beta = _reorthogonalise(basis, i, j, r, reduce)
                alphas[i, j], betas[i, j], steps[i] = float(alpha), beta, j + 1
                if beta <= RELATIVE_BREAKDOWN_TOL:
                    broken[i] = True
                    if j + 1 < cap:
                        notes.append(f"start vector {i}: Krylov space invariant after {j + 1} steps "
                                     "(exact for this vector; result truncated there)")
                else:
                    basis.write(i, j + 1, r / beta)
            bar.update(1)
            if save is not None and save.every and (j + 1) % save.every == 0 and j + 1 < cap:
                save(snapshot(j + 1))
        if save is not None and save.every:
            save(snapshot(int(steps.max())))
    finally:
        bar.close()
    blocks, final = blocks_and_betas()
    return blocks, final, basis.dense(int(steps.max())) if want_basis else None


def _reorthogonalise(basis: LanczosBasis, i: int, j: int, r: torch.Tensor,
                     reduce: Reduce = None) -> tuple[torch.Tensor, float]:
    """Classical Gram-Schmidt of ``r`` against ``q_0 .. q_j`` of start vector ``i``, repeated (at
    most three passes) while a pass cancels more than ``1 - DGKS_ETA`` of the norm. Two
    matrix-vector products per pass; no (j, P) temporary. Returns ``r`` and its norm."""
    norm = _vector_norm(r, reduce)
    for _ in range(3):
        r = r - basis.combination(i, j, _summed(basis.coefficients(i, j, r), reduce))
        new = _vector_norm(r, reduce)
        if new > DGKS_ETA * norm:
            break
        norm = new
    return r, new


class _Saver:
    def __init__(self, target: Checkpoint, every: int, header: dict):
        self.target, self.every, self.header = target, every, header

    def __call__(self, snapshot: dict) -> None:
        state = {**self.header, **snapshot}
        if callable(self.target):
            self.target(state)
        else:
            torch_save_atomic(Path(self.target), state)


def _checkpoint_writer(target: Checkpoint, every: int, header: dict) -> Optional[_Saver]:
    return None if target is None else _Saver(target, every, header)


def _load_state(source, dim: int, k: int, dtype: torch.dtype, v0: torch.Tensor) -> dict:
    """A saved Lanczos state that fits this run; anything else is a one-line SuiteError."""
    name = "the saved Lanczos state"
    if not isinstance(source, dict):
        name = str(source)
        try:
            source = torch.load(source, map_location="cpu", weights_only=True)
        except Exception as error:  # a truncated or foreign file: say which, not how torch failed
            raise SuiteError(f"{name} is not a readable Lanczos state ({type(error).__name__}); "
                             "delete it and start afresh") from None
    if not isinstance(source, dict) or source.get("format") != STATE_FORMAT:
        raise SuiteError(f"{name} is not a Lanczos state of this suite ({STATE_FORMAT})")
    theirs = (source["dim"], source["num_vectors"], source["dtype"])
    if theirs != (dim, k, str(dtype)):
        raise SuiteError(f"{name} is for dim={theirs[0]}, {theirs[1]} start vector(s), {theirs[2]}; "
                         f"this run has dim={dim}, {k}, {dtype}")
    saved = source["start_vectors"].to(torch.float64)
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    if saved.shape != v0.shape or not torch.allclose(saved, v0.to("cpu", torch.float64), rtol=0, atol=tol):
        raise SuiteError(f"{name} was started from other start vectors (seed, start_vector or "
                         "start_vectors differ)")
    return {**source, "source": name}


def _gpytorch(matvec, v0, av0, scale, num_steps, dim, dtype, device, notes, progress):
    """GPyTorch's lanczos_tridiag on the scaled operator; per-vector truncation and reruns."""
    from linear_operator.utils.lanczos import lanczos_tridiag  # here: the native engine does not need it

    k = v0.shape[1]
    max_iter = min(num_steps + 1, dim)
    bar = tqdm(total=max_iter, desc="Lanczos", unit="step", leave=False,
               disable=None if progress else True)  # None: only on a terminal
    tol = 1e-12 if dtype == torch.float64 else 1e-6

    def run_batch(columns: list[int]):
        """GPyTorch on the given start vectors; the first product is the one already computed."""
        init, first = v0[:, columns], av0[:, columns] / scale
        cache = {"first": True, "calls": 0}

        def scaled(x: torch.Tensor) -> torch.Tensor:
            reuse = cache["first"] and x.shape == init.shape and torch.allclose(x, init, rtol=0, atol=tol)
            cache["first"] = False
            cache["calls"] += 1
            if len(columns) == k:
                bar.update(1)
            if reuse:
                return first
            # A vector that broke down (beta = 0) leaves 0/0 in GPyTorch's basis; it is truncated
            # later, so feed the operator zeros there instead of NaN.
            broken = ~torch.isfinite(x).all(dim=0)
            x = torch.where(broken, torch.zeros((), dtype=x.dtype, device=x.device), x)
            return _checked_product(matvec, x, cache["calls"] - 1, lambda: None) / scale

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
    return blocks, betas, bases


def _apply(matvec: Matvec, x: torch.Tensor) -> torch.Tensor:
    """Apply matvec to a (dim, k) block; closures that only take vectors get one column at a time.
    The product comes back in the block's dtype (an operator may compute in its own)."""
    try:
        out = matvec(x)
    except RuntimeError:
        if x.shape[1] == 1:
            raise
        out = torch.stack([matvec(x[:, j]) for j in range(x.shape[1])], dim=1)
    out = out.to(x.dtype)
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
