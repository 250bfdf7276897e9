"""Stochastic estimates of ``tr(A)`` for a symmetric P x P operator known only through products.

Three estimators, each returning a :class:`TraceEstimate` (the estimate, its standard error, the number
of matrix-vector products it used, and its per-sample terms):

* :func:`hutchinson`: ``tr(A) ~ (1/m) sum_i z_i^T A z_i`` with Rademacher (or Gaussian) ``z_i``
  (Hutchinson 1989). Unbiased; one product per sample; the standard error is the sample standard
  deviation of the terms over ``sqrt(m)``.
* :func:`hutchpp`: Hutch++ (Meyer, Musco, Musco and Woodruff, "Hutch++: Optimal Stochastic Trace
  Estimation", SOSA 2021, Algorithm 1). With ``m`` products: ``s = m // 3`` for the sketch ``A S``,
  ``Q = orth(A S)``, ``q <= s`` for the exact ``tr(Q^T A Q)``, and the rest for Hutchinson on the
  complement ``tr((I - QQ^T) A (I - QQ^T))``. Error ``O(1/m)`` instead of Hutchinson's ``O(1/sqrt m)``
  when the spectrum has a few large eigenvalues; exact when ``rank(A) <= s``.
  **Standard error**: the sample standard deviation of the complement's Hutchinson terms over the
  square root of their number. It is the standard error *given the sketch* and leaves out the
  sketch's own randomness. That is the right quantity for an interval: for every orthonormal ``Q``,
  ``tr(Q^T A Q) + tr((I - QQ^T) A (I - QQ^T)) = tr(A)`` exactly, so the estimate is unbiased given
  the sketch and an interval with the right coverage given every sketch has it overall. It is not the
  estimator's unconditional spread across sketches (measured in ``tests/test_trace.py``, slow test).
* :func:`slq_trace`: stochastic Lanczos quadrature (Ubaru, Chen and Saad, SIAM J. Matrix Anal. Appl.
  38(4), 2017) with the suite's :func:`curvature.lanczos.lanczos`: ``tr f(A) ~ P * mean_i
  sum_j w_ij f(theta_ij)`` over unit start vectors, Ritz values ``theta`` and weights ``w``. For
  ``f(x) = x`` the Gauss rule is exact from one step (``sum_j w_j theta_j = v^T A v``), so the trace
  part is Hutchinson with unit vectors and the extra steps buy nothing: its error falls only with the
  number of vectors. SLQ earns its products for nonlinear ``f`` (``fn``: ``x**2`` is exact from two
  steps), or when a spectrum run has already paid for them.

``A`` is anything :func:`curvature.linear_operator.as_matvec` takes: a curvature operator, its bound
``matvec``, a dense symmetric tensor, or a callable on (P,) / (P, k) tensors with ``dim`` given.
Probe vectors go through the operator ``block_size`` at a time as a (P, k) block (a callable that
rejects blocks gets them column by column); each column counts as one product. Vectors follow the
operator's dtype and device; they are drawn on the CPU in float64 from named seeded streams
(:mod:`curvature.seeding`), one column at a time, so a seed gives the same vectors, and the same
estimate, for every ``block_size``, device and dtype.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

import torch

from curvature.lanczos import lanczos
from curvature.linear_operator import as_matvec
from curvature.seeding import generator

__all__ = ["TraceEstimate", "hutchinson", "hutchpp", "slq_trace", "DISTRIBUTIONS"]

DISTRIBUTIONS = ("rademacher", "gaussian")
#: Probe vectors per operator call: a (P, 16) block costs 16 P numbers of memory beside the operator's.
BLOCK_SIZE = 16
#: Lanczos steps per start vector when slq_trace is given only a product budget. The trace itself is
#: exact from one step; ten resolve the spectrum enough for a smooth ``fn`` (Ubaru et al. use 10-30).
SLQ_STEPS = 10


@dataclass
class TraceEstimate:
    """A stochastic estimate of ``tr(A)``.

    ``estimate`` and ``stderr`` (the standard error: sample standard deviation of ``samples`` over
    ``sqrt(len(samples))``; NaN with a single sample; for Hutch++ given the sketch, see the module
    docstring); ``num_matvecs``, the products with single vectors it used; ``samples``, the (n,)
    float64 per-sample terms the error comes from (Hutchinson: ``z^T A z``; Hutch++: the complement's
    terms; SLQ: ``P sum_j w_j f(theta_j)`` per start vector); ``parts``, method-specific pieces
    (Hutch++: ``sketch_trace``, ``complement_trace``, ``sketch_size``; SLQ: ``num_vectors``,
    ``num_steps``).
    """

    estimate: float
    stderr: float
    num_matvecs: int
    method: str
    samples: torch.Tensor
    parts: dict = field(default_factory=dict)

    def interval(self, level: float = 0.95) -> tuple[float, float]:
        """The two-sided ``level`` confidence interval ``estimate +- t * stderr``, with ``t`` the
        Student-t quantile on ``len(samples) - 1`` degrees of freedom (the standard error is itself
        estimated from few terms; 2.26 for 10 terms at 95%, 1.98 for 100). An exact estimate
        (``stderr == 0``) gives a point; a single sample gives (-inf, inf)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), got {level}")
        if self.stderr == 0.0:
            return (self.estimate, self.estimate)
        dof = len(self.samples) - 1
        if dof < 1 or not math.isfinite(self.stderr):
            return (-math.inf, math.inf)
        from scipy.stats import t as student_t
        half = float(student_t.ppf(0.5 + level / 2, dof)) * self.stderr
        return (self.estimate - half, self.estimate + half)


class _Probe:
    """Products of the operator with (P, k) blocks in chunks of ``block_size``, columns counted.

    A plain callable to :func:`~curvature.linear_operator.as_matvec` (no ``matvec`` or size
    attribute), so that :func:`~curvature.lanczos.lanczos` calls it and every product is counted.
    """

    def __init__(self, A: Any, dim: Optional[int], block_size: int):
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        self._product, self.size, self.vector_dtype, self.vector_device = as_matvec(A, dim)
        self.block_size, self.count, self.blocks_work = block_size, 0, True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        x = x.to(dtype=self.vector_dtype, device=self.vector_device)
        single = x.dim() == 1
        block = x.unsqueeze(1) if single else x
        out = torch.cat([self._block(block[:, j:j + self.block_size])
                         for j in range(0, block.shape[1], self.block_size)], dim=1)
        self.count += block.shape[1]
        return out.squeeze(1) if single else out

    def _block(self, x: torch.Tensor) -> torch.Tensor:
        if self.blocks_work and x.shape[1] > 1:
            try:
                out = self._product(x)
                if out.shape == x.shape:
                    return out
            except (RuntimeError, ValueError):
                pass
            self.blocks_work = False  # a closure written for single vectors
        return torch.stack([self._product(x[:, j]).reshape(-1) for j in range(x.shape[1])], dim=1)


def _draw(gen: torch.Generator, dim: int, count: int, distribution: str, probe: _Probe) -> torch.Tensor:
    """(dim, count) probe vectors, one column at a time from ``gen`` (independent of block size)."""
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"distribution must be 'rademacher' or 'gaussian', got {distribution!r}")
    columns = []
    for _ in range(count):
        if distribution == "rademacher":
            columns.append(torch.randint(0, 2, (dim,), generator=gen, dtype=torch.float64) * 2 - 1)
        else:
            columns.append(torch.randn(dim, generator=gen, dtype=torch.float64))
    return torch.stack(columns, dim=1).to(dtype=probe.vector_dtype, device=probe.vector_device)


def _quadratic_forms(probe: _Probe, count: int, draw: Callable[[int], torch.Tensor]) -> torch.Tensor:
    """``z_i^T A z_i`` for ``count`` vectors, drawn ``probe.block_size`` at a time by ``draw(k)`` (so only
    one block of P x block_size probes is held), as float64 on the CPU."""
    terms = []
    for j in range(0, count, probe.block_size):
        z = draw(min(probe.block_size, count - j))
        terms.append((z * probe(z)).sum(0).to("cpu", torch.float64))
    return torch.cat(terms)


def _mean_and_stderr(samples: torch.Tensor) -> tuple[float, float]:
    n = samples.numel()
    mean = float(samples.mean())
    return mean, float(samples.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan


def hutchinson(A: Any, num_matvecs: int, seed: int = 0, distribution: str = "rademacher",
               dim: Optional[int] = None, block_size: int = BLOCK_SIZE) -> TraceEstimate:
    """Hutchinson's ``tr(A) ~ (1/m) sum_i z_i^T A z_i``, ``m = num_matvecs`` products.

    Rademacher ``z`` (default) gives the smallest variance, ``2 (||A||_F^2 - sum_i A_ii^2) / m``;
    Gaussian ``2 ||A||_F^2 / m``. ``dim`` is needed for a plain callable only.
    """
    if num_matvecs < 1:
        raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
    probe = _Probe(A, dim, block_size)
    gen = generator(seed, "trace.hutchinson")
    samples = _quadratic_forms(probe, num_matvecs, lambda k: _draw(gen, probe.size, k, distribution, probe))
    estimate, stderr = _mean_and_stderr(samples)
    return TraceEstimate(estimate, stderr, probe.count, "hutchinson", samples,
                         {"distribution": distribution})


def hutchpp(A: Any, num_matvecs: int, seed: int = 0, dim: Optional[int] = None,
            block_size: int = BLOCK_SIZE) -> TraceEstimate:
    """Hutch++ with ``num_matvecs`` products (at least 3): ``tr(Q^T A Q)`` on the range of a sketch
    ``A S`` plus Hutchinson on its orthogonal complement (module docstring).

    ``s = num_matvecs // 3`` Rademacher sketch vectors; ``Q`` (P x q, ``q = min(s, P)``) from a thin QR
    of ``A S``; ``q`` products for ``A Q``; the remaining ``num_matvecs - s - q`` Rademacher vectors,
    projected onto the complement, for the Hutchinson part (none when ``Q`` spans the whole space, and
    the estimate is then exact). The standard error is given the sketch (module docstring).
    """
    if num_matvecs < 3:
        raise ValueError(f"Hutch++ needs num_matvecs >= 3 (sketch, range, complement), got {num_matvecs}")
    probe = _Probe(A, dim, block_size)
    gen = generator(seed, "trace.hutchpp")
    s = num_matvecs // 3
    sketch = probe(_draw(gen, probe.size, s, "rademacher", probe))
    q, _ = torch.linalg.qr(sketch.to(torch.float64) if probe.vector_dtype == torch.float32 else sketch)
    q = q.to(probe.vector_dtype)
    sketch_trace = float((q * probe(q)).sum().to("cpu", torch.float64))
    rest = num_matvecs - s - q.shape[1]
    if q.shape[1] == probe.size:  # Q spans everything: the complement is {0}
        samples = torch.zeros(1, dtype=torch.float64)
        return TraceEstimate(sketch_trace, 0.0, probe.count, "hutchpp", samples,
                             {"sketch_trace": sketch_trace, "complement_trace": 0.0, "sketch_size": s})
    def complement(k: int) -> torch.Tensor:
        g = _draw(gen, probe.size, k, "rademacher", probe)
        for _ in range(2):  # project twice: once leaves O(eps * cond) of Q's span in float32
            g = g - q @ (q.T @ g)
        return g

    samples = _quadratic_forms(probe, rest, complement)
    complement, stderr = _mean_and_stderr(samples)
    return TraceEstimate(sketch_trace + complement, stderr, probe.count, "hutchpp", samples,
                         {"sketch_trace": sketch_trace, "complement_trace": complement, "sketch_size": s})


def slq_trace(A: Any, num_matvecs: Optional[int] = None, seed: int = 0, num_vectors: Optional[int] = None,
              num_steps: Optional[int] = None, dim: Optional[int] = None,
              fn: Optional[Callable[[torch.Tensor], torch.Tensor]] = None,
              start_kind: str = "rademacher") -> TraceEstimate:
    """Stochastic Lanczos quadrature: ``tr f(A) ~ P * mean_i sum_j w_ij f(theta_ij)``, ``f`` = ``fn``
    (default the identity: ``tr(A)``).

    Give ``num_vectors`` and ``num_steps`` (``num_vectors * num_steps`` products, fewer when a Krylov
    space becomes invariant first), or a budget ``num_matvecs``: ``SLQ_STEPS`` steps (fewer for a
    small budget) and as many vectors as the budget pays for. Start vectors are the seeded unit vectors
    of :func:`curvature.lanczos.random_start_vectors` (``start_kind``), so a spectrum run with the same
    seed, kind and vectors has the same measure. Native Lanczos engine (full reorthogonalisation, one
    block product per step for all vectors).
    """
    if num_vectors is None or num_steps is None:
        if num_matvecs is None:
            raise ValueError("slq_trace needs num_matvecs, or num_vectors and num_steps")
        if num_matvecs < 1:
            raise ValueError(f"num_matvecs must be >= 1, got {num_matvecs}")
        if num_steps is None:
            num_steps = max(1, min(SLQ_STEPS, num_matvecs // 2))
        num_vectors = num_vectors or max(1, num_matvecs // num_steps)
    probe = _Probe(A, dim, block_size=max(num_vectors, 1))
    result = lanczos(probe, dim=probe.size, num_steps=num_steps, num_vectors=num_vectors, seed=seed,
                     dtype=probe.vector_dtype, device=probe.vector_device, start_kind=start_kind, engine="native")
    nodes = result.ritz_values if fn is None else fn(result.ritz_values)
    samples = probe.size * (result.ritz_weights * nodes * result.mask).sum(1)
    estimate, stderr = _mean_and_stderr(samples)
    return TraceEstimate(estimate, stderr, probe.count, "slq", samples,
                         {"num_vectors": num_vectors, "num_steps": int(result.num_steps.max()),
                          "start_kind": start_kind, "notes": list(result.notes)})
