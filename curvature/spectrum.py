"""The discrete spectral measure: moments, averaging, histograms, smoothing, distances, summary.

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
            "negative_count": int(negative.sum()),
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
