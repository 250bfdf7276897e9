"""The discrete spectral measure: moments, averaging, histograms, smoothing, distances, summary,
and the standard errors of these quantities over start vectors (:func:`uncertainty`).

Conventions (``shared/PAPER.md``): a measure is a set of nodes with non-negative weights summing to
one. The Lanczos measure of a unit start vector ``v`` has the Ritz values as nodes and the squared
first components of ``T_m``'s eigenvectors as weights; it matches ``v^T A^k v`` for
``k = 0 .. 2m-1``. Several start vectors are averaged with equal weight. Kernel smoothing uses a
Gaussian with an explicit *standard deviation* ``sigma`` in eigenvalue units.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

from curvature.lanczos import LanczosResult


@dataclass(frozen=True)
class SpectralMeasure:
    """A discrete probability measure on the real line: sorted ``nodes`` with ``weights`` (float64)."""

    nodes: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self):
        nodes = torch.as_tensor(self.nodes, dtype=torch.float64).flatten().cpu()
        weights = torch.as_tensor(self.weights, dtype=torch.float64).flatten().cpu()
        if nodes.shape != weights.shape:
            raise ValueError(f"nodes {tuple(nodes.shape)} and weights {tuple(weights.shape)} differ")
        if nodes.numel() == 0:
            raise ValueError("a spectral measure needs at least one node")
        order = torch.argsort(nodes)
        object.__setattr__(self, "nodes", nodes[order])
        object.__setattr__(self, "weights", weights[order])

    # --- construction -------------------------------------------------------------------------
    @classmethod
    def from_eigenvalues(cls, eigenvalues) -> "SpectralMeasure":
        """The empirical spectral density: each eigenvalue with weight 1/n."""
        eigenvalues = torch.as_tensor(eigenvalues, dtype=torch.float64).flatten()
        return cls(eigenvalues, torch.full_like(eigenvalues, 1.0 / eigenvalues.numel()))

    @classmethod
    def from_lanczos(cls, result: LanczosResult, vector: int | None = None) -> "SpectralMeasure":
        """The Gauss quadrature measure of one start vector, or the average over all of them."""
        rows = range(result.num_vectors) if vector is None else [vector]
        return cls.average([cls(result.ritz_values[i][result.mask[i]],
                                result.ritz_weights[i][result.mask[i]]) for i in rows])

    @classmethod
    def per_vector(cls, result: LanczosResult) -> list["SpectralMeasure"]:
        """The Gauss quadrature measure of each start vector, in order (the input of :func:`uncertainty`)."""
        return [cls.from_lanczos(result, vector=i) for i in range(result.num_vectors)]

    @classmethod
    def average(cls, measures: Sequence["SpectralMeasure"]) -> "SpectralMeasure":
        """Equal-weight mixture of measures (the average over start vectors)."""
        if not measures:
            raise ValueError("nothing to average")
        k = len(measures)
        return cls(torch.cat([m.nodes for m in measures]),
                   torch.cat([m.weights / k for m in measures]))

    # --- moments and masses -------------------------------------------------------------------
    @property
    def total_mass(self) -> float:
        return float(self.weights.sum())

    def moment(self, k: int) -> float:
        """The k-th raw moment sum_i w_i lambda_i^k."""
        return float((self.weights * self.nodes.pow(k)).sum())

    def moments(self, k_max: int) -> list[float]:
        """Raw moments 0..k_max."""
        return [self.moment(k) for k in range(k_max + 1)]

    def mass_where(self, lower: float = -math.inf, upper: float = math.inf) -> float:
        """Weight of the nodes in the closed interval [lower, upper]."""
        inside = (self.nodes >= lower) & (self.nodes <= upper)
        return float(self.weights[inside].sum())

    def mass_below(self, x: float) -> float:
        """Weight of the nodes strictly below ``x``: the CDF just left of ``x`` (``x = 0``: negative mass)."""
        return float(self.weights[self.nodes < x].sum())

    def mass_near(self, value: float, tol: float) -> float:
        """Weight of the nodes with |node - value| <= tol."""
        return self.mass_where(value - tol, value + tol)

    def support(self, min_weight: float = 0.0) -> tuple[float, float]:
        """(min, max) of the nodes whose weight exceeds ``min_weight``."""
        keep = self.nodes[self.weights > min_weight]
        return float(keep.min()), float(keep.max())

    # --- densities ----------------------------------------------------------------------------
    def histogram(self, bins: int = 100, range: tuple[float, float] | None = None):
        """Weights binned into a density: returns (edges, density) with sum(density * width) = mass."""
        lo, hi = range if range is not None else (float(self.nodes.min()), float(self.nodes.max()))
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        edges = torch.linspace(lo, hi, bins + 1, dtype=torch.float64)
        idx = torch.bucketize(self.nodes, edges, right=True) - 1
        idx = idx.clamp(0, bins - 1)  # the right edge belongs to the last bin
        inside = (self.nodes >= lo) & (self.nodes <= hi)
        mass = torch.zeros(bins, dtype=torch.float64).index_add_(0, idx[inside], self.weights[inside])
        return edges, mass / (edges[1:] - edges[:-1])

    def smooth(self, grid, sigma: float) -> torch.Tensor:
        """Gaussian kernel density sum_i w_i N(x; lambda_i, sigma^2) on ``grid``.

        ``sigma`` is a standard deviation in eigenvalue units; see :func:`sigma_from_scaled_variance`
        for the convention of PyHessian and spectral-density.
        """
        if sigma <= 0:
            raise ValueError(f"sigma must be positive, got {sigma}")
        grid = torch.as_tensor(grid, dtype=torch.float64)
        z = (grid.unsqueeze(-1) - self.nodes) / sigma
        return (torch.exp(-0.5 * z * z) * self.weights).sum(-1) / (sigma * math.sqrt(2 * math.pi))

    # --- distances ----------------------------------------------------------------------------
    def wasserstein(self, other: "SpectralMeasure | Iterable[float]") -> float:
        """1-Wasserstein distance: the integral of |F_self - F_other| over the real line.

        ``other`` is a measure or a set of exact eigenvalues (each with weight 1/n). Both measures
        are normalised to unit mass first.
        """
        if not isinstance(other, SpectralMeasure):
            other = SpectralMeasure.from_eigenvalues(other)
        points = torch.cat([self.nodes, other.nodes])
        order = torch.argsort(points)
        jumps = torch.cat([self.weights / self.weights.sum(), -other.weights / other.weights.sum()])
        cdf_gap = torch.cumsum(jumps[order], 0)[:-1]
        widths = points[order][1:] - points[order][:-1]
        return float((cdf_gap.abs() * widths).sum())

    # --- the original package's stem-plot summary ---------------------------------------------
    def summary(self) -> dict[str, float]:
        """Max / min node, count and weight of negative nodes, normalised trace sum(w * lambda)."""
        positive_weight = self.weights > 0
        nodes = self.nodes[positive_weight]
        weights = self.weights[positive_weight]
        negative = nodes < 0
        return {
            "max_ritz_value": float(nodes.max()),
            "min_ritz_value": float(nodes.min()),
            "negative_ritz_count": int(negative.sum()),  # Ritz values, not eigenvalues
            "negative_weight": float(weights[negative].sum()),
            "normalised_trace": float((weights * nodes).sum()),
        }


def sigma_from_scaled_variance(scaled_variance: float, lambda_min: float, lambda_max: float) -> float:
    """Convert the bandwidth convention of PyHessian / spectral-density into a standard deviation.

    Those tools take a kernel *variance* ``v`` (default 1e-5) and multiply it by the spectral range
    when the range exceeds one: ``variance = v * max(1, lambda_max - lambda_min)``. The standard
    deviation used here is the square root of that.
    """
    if scaled_variance <= 0:
        raise ValueError(f"scaled_variance must be positive, got {scaled_variance}")
    return math.sqrt(scaled_variance * max(1.0, lambda_max - lambda_min))


def relative_moment_errors(measure: SpectralMeasure, eigenvalues, k_max: int = 4) -> dict[int, float]:
    """|m_k(measure) - m_k(exact)| / rho^k for k = 1..k_max, rho the exact spectral radius.

    The k-th moment of a spectrum is bounded by rho^k, so this is the error as a fraction of the
    moment's natural scale; it stays meaningful for odd moments of a symmetric law, which are 0.
    """
    exact = SpectralMeasure.from_eigenvalues(eigenvalues)
    rho = float(exact.nodes.abs().max())
    if rho == 0:
        rho = 1.0
    return {k: abs(measure.moment(k) - exact.moment(k)) / rho ** k for k in range(1, k_max + 1)}


ONE_VECTOR_NOTE = "one start vector: no interval"
EXTREME_NOTE = ("the extreme Ritz value over vectors; each vector's is a bound on the extreme eigenvalue "
                "(largest: a lower bound on lambda_max, smallest: an upper bound on lambda_min), so the "
                "interval is about this estimator's mean, not the eigenvalue")


def uncertainty(measures: Sequence[SpectralMeasure], cdf_points: Iterable[float] = (),
                intervals: dict[str, tuple[float, float]] | None = None) -> dict[str, dict]:
    """Mean over start vectors, standard error and 95% Student-t interval of the spectral quantities.

    ``measures`` holds one measure per start vector (:meth:`SpectralMeasure.per_vector`). Each row
    of the result (keyed by quantity) has ``value`` (what the averaged measure reports), ``mean`` and
    ``per_vector`` values, ``stderr`` (sample standard deviation over the k vectors / sqrt(k)),
    ``ci95_low`` / ``ci95_high`` (``mean +- t_{0.975, k-1} stderr``), ``num_vectors`` and a ``note``.
    Quantities: ``normalised_trace`` (= m_1) and ``moment2`` .. ``moment4``; ``negative_mass`` (weight
    of nodes < 0); ``mass_below_<x>`` for each x in ``cdf_points``; ``mass_<name>`` for each closed
    interval in ``intervals`` (e.g. ``{"near_zero": (-tol, tol)}``); ``max_ritz_value`` and
    ``min_ritz_value``, whose ``value`` is the extreme over vectors and whose row adds ``spread``
    (max - min of the per-vector extremes) and an interval about the per-vector extreme's mean.

    How the interval is formed: for a start vector v, the Gauss quadrature sum_j w_j f(theta_j)
    equals u^T f(A) u with u = v / |v| (exactly for f a polynomial of degree < 2m, up to the
    quadrature error otherwise), and for a Gaussian v (u uniform on the sphere) or a Rademacher one
    (|v|^2 = P fixed) u^T f(A) u is an unbiased estimate of (1/P) tr f(A). The k vectors give k
    independent, identically distributed estimates; the interval is the Student-t one on k - 1
    degrees of freedom. It holds when the start vectors are independent (the seeded
    draw of :func:`~curvature.lanczos.random_start_vectors`) and k is not tiny, and covers only the
    sampling spread over vectors: the Lanczos quadrature error (for masses and extremes, not for
    moments below 2m) is not in it, small when ``num_steps`` is large enough to resolve the
    quantity. An extreme Ritz value is a biased estimator of the extreme eigenvalue, so its interval
    says how much the estimator moves between vectors, not where the eigenvalue lies.

    With one vector (k = 1) every row carries the value with ``stderr``, ``ci95_low`` and
    ``ci95_high`` None and the note ``"one start vector: no interval"``.
    """
    if not measures:
        raise ValueError("uncertainty needs at least one start vector's measure")
    per_vector = {"normalised_trace": [m.moment(1) for m in measures]}
    per_vector.update({f"moment{k}": [m.moment(k) for m in measures] for k in range(2, 5)})
    per_vector["negative_mass"] = [m.mass_below(0.0) for m in measures]
    per_vector.update({f"mass_below_{x:g}": [m.mass_below(x) for m in measures] for x in cdf_points})
    per_vector.update({f"mass_{name}": [m.mass_where(lo, hi) for m in measures]
                       for name, (lo, hi) in (intervals or {}).items()})
    notes = {"normalised_trace": "m_1 = (1/P) tr A",
             "negative_mass": "weight of nodes < 0; the Ritz value of an eigenvalue at 0 can land just "
                              "below 0 (quadrature error, not in the interval): compare the mass near 0"}
    rows = {name: _row(values, sum(values) / len(values), notes.get(name, ""))
            for name, values in per_vector.items()}
    for name, pick in (("max_ritz_value", max), ("min_ritz_value", min)):
        extremes = [float(pick(m.nodes[m.weights > 0])) for m in measures]
        rows[name] = {**_row(extremes, pick(extremes), EXTREME_NOTE),
                      "spread": max(extremes) - min(extremes)}
    return rows


def _row(values: list[float], value: float, note: str) -> dict:
    k = len(values)
    row = {"value": value, "mean": sum(values) / k, "per_vector": list(values), "num_vectors": k}
    if k < 2:
        return {**row, "stderr": None, "ci95_low": None, "ci95_high": None,
                "note": f"{note}; {ONE_VECTOR_NOTE}" if note else ONE_VECTOR_NOTE}
    from scipy.stats import t as student_t
    stderr = float(torch.tensor(values, dtype=torch.float64).std(unbiased=True)) / math.sqrt(k)
    half = float(student_t.ppf(0.975, k - 1)) * stderr
    return {**row, "stderr": stderr, "ci95_low": row["mean"] - half, "ci95_high": row["mean"] + half,
            "note": note}
