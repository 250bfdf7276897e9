"""Random matrices with known spectra, and their analytic densities (paper Sec. 6).

* Wigner: ``A = (G_sym) * std / sqrt(n)`` with ``G_sym`` symmetric, entries N(0, 1) on and above
  the diagonal. Its spectrum converges to the semicircle of radius ``2 std``.
* Marcenko-Pastur: ``A = X X^T / t`` with ``X`` an ``n x t`` matrix of N(0, 1) entries and ratio
  ``q = n / t``. The bulk lies in ``[(1 - sqrt q)^2, (1 + sqrt q)^2]``; for ``q > 1`` a fraction
  ``1 - 1/q`` of the eigenvalues is exactly zero (the matrix has rank ``t``).
* The synthetic NN-like spectrum of paper Fig. 6: a degenerate mass at zero, a right-skewed or
  uniform bulk, a few positive and negative outliers, rotated by a Haar-random orthogonal matrix.

Every generator draws from its own named stream (``curvature.seeding``) on the CPU in float64, so the
same seed gives the same matrix whatever the default generator's state, device or dtype, and a
Lanczos start vector drawn with the same seed is independent of the matrix.
"""

from __future__ import annotations

import math

import torch

from curvature.seeding import generator


def _generator(seed: int, stream: str) -> torch.Generator:
    return generator(seed, f"random_matrices.{stream}")


def _check_size(n: int) -> None:
    if int(n) != n or n < 1:
        raise ValueError(f"matrix size must be a positive integer, got {n}")


def wigner(n: int, seed: int = 0, std: float = 1.0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Symmetric Wigner matrix with entries N(0, std^2) / n variance; semicircle on [-2 std, 2 std]."""
    _check_size(n)
    g = torch.randn(n, n, generator=_generator(seed, 'wigner'), dtype=torch.float64)
    upper = torch.triu(g)
    a = (upper + torch.triu(g, 1).T) * (std / math.sqrt(n))
    return a.to(dtype=dtype, device=device)


def mp_columns(n: int, ratio: float) -> int:
    """Number of columns t of X for the ratio q = n / t (at least one)."""
    if ratio <= 0:
        raise ValueError(f"Marcenko-Pastur ratio n/t must be positive, got {ratio}")
    return max(1, int(round(n / ratio)))


def marchenko_pastur(n: int, ratio: float = 0.5, seed: int = 0, dtype=torch.float64,
                     device="cpu") -> torch.Tensor:
    """Wishart matrix ``X X^T / t`` of size n x n with ``t = round(n / ratio)``; rank-deficient if ratio > 1."""
    _check_size(n)
    t = mp_columns(n, ratio)
    x = torch.randn(n, t, generator=_generator(seed, 'marchenko_pastur'), dtype=torch.float64)
    a = x @ x.T / t
    return (0.5 * (a + a.T)).to(dtype=dtype, device=device)


def haar_orthogonal(n: int, seed: int = 0) -> torch.Tensor:
    """A Haar-distributed orthogonal matrix: QR of a Gaussian matrix with the signs of R fixed."""
    g = torch.randn(n, n, generator=_generator(seed, 'haar'), dtype=torch.float64)
    q, r = torch.linalg.qr(g)
    return q * torch.sign(torch.diagonal(r)).where(torch.diagonal(r) != 0, torch.ones(()))


def synthetic_spectrum_eigenvalues(n: int = 1000, zero_fraction: float = 0.5, bulk_low: float = 0.0,
                                   bulk_high: float = 5.0, bulk_shape: str = "uniform",
                                   num_positive_outliers: int = 5,
                                   positive_outlier_range=(20.0, 60.0), num_negative_outliers: int = 3,
                                   negative_outlier_range=(-10.0, -2.0), seed: int = 0) -> torch.Tensor:
    """Eigenvalues of the NN-like spectrum (ascending).

    ``round(zero_fraction * n)`` eigenvalues are exactly zero, the outliers are uniform in their
    ranges, and the rest form the bulk in ``[bulk_low, bulk_high]``: uniform, or right-skewed
    (``bulk_shape="skewed"``: ``low + (high - low) * u^3``, dense near ``low``, sparse tail).
    """
    _check_size(n)
    if not 0 <= zero_fraction <= 1:
        raise ValueError(f"zero_fraction must be in [0, 1], got {zero_fraction}")
    num_zero = int(round(zero_fraction * n))
    num_bulk = n - num_zero - num_positive_outliers - num_negative_outliers
    if num_bulk < 0:
        raise ValueError(f"n={n} is too small for {num_zero} zeros and "
                         f"{num_positive_outliers + num_negative_outliers} outliers")
    gen = _generator(seed, 'synthetic_spectrum')

    def uniform(count, low, high):
        return low + (high - low) * torch.rand(count, generator=gen, dtype=torch.float64)

    u = torch.rand(num_bulk, generator=gen, dtype=torch.float64)
    if bulk_shape == "uniform":
        bulk = bulk_low + (bulk_high - bulk_low) * u
    elif bulk_shape == "skewed":
        bulk = bulk_low + (bulk_high - bulk_low) * u ** 3
    else:
        raise ValueError(f"bulk_shape must be 'uniform' or 'skewed', got {bulk_shape!r}")
    eigenvalues = torch.cat([
        torch.zeros(num_zero, dtype=torch.float64), bulk,
        uniform(num_positive_outliers, *positive_outlier_range),
        uniform(num_negative_outliers, *negative_outlier_range),
    ])
    return torch.sort(eigenvalues).values


def synthetic_spectrum(n: int = 1000, seed: int = 0, dtype=torch.float64, device="cpu",
                       **spectrum) -> torch.Tensor:
    """``U diag(lambda) U^T`` with ``lambda`` from :func:`synthetic_spectrum_eigenvalues` and U Haar.

    The eigenvalues and the rotation draw from independent streams derived from ``seed``.
    """
    eigenvalues = synthetic_spectrum_eigenvalues(n, seed=seed, **spectrum)
    u = haar_orthogonal(n, seed=seed)
    a = (u * eigenvalues) @ u.T
    return (0.5 * (a + a.T)).to(dtype=dtype, device=device)


# --- analytic densities ----------------------------------------------------------------------
def semicircle_edges(std: float = 1.0) -> tuple[float, float]:
    return -2.0 * std, 2.0 * std


def semicircle_density(x, std: float = 1.0) -> torch.Tensor:
    """Wigner's semicircle law of radius R = 2 std: sqrt(R^2 - x^2) / (pi R^2 / 2)."""
    x = torch.as_tensor(x, dtype=torch.float64)
    radius = 2.0 * std
    return 2.0 * torch.sqrt(torch.clamp(radius ** 2 - x ** 2, min=0.0)) / (math.pi * radius ** 2)


def marchenko_pastur_edges(ratio: float) -> tuple[float, float]:
    """Edges (1 -+ sqrt q)^2 of the Marcenko-Pastur bulk for ratio q = n / t (unit variance)."""
    root = math.sqrt(ratio)
    return (1.0 - root) ** 2, (1.0 + root) ** 2


def marchenko_pastur_atom(ratio: float) -> float:
    """Mass of the atom at zero: 1 - 1/q for q > 1, else 0."""
    return max(0.0, 1.0 - 1.0 / ratio)


def marchenko_pastur_density(x, ratio: float) -> torch.Tensor:
    """Continuous part of the Marcenko-Pastur law for q = n / t (unit variance).

    ``sqrt((b - x)(x - a)) / (2 pi q x)`` on [a, b]; it integrates to ``min(1, 1/q)``, the rest of
    the mass being the atom at zero (:func:`marchenko_pastur_atom`).
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    a, b = marchenko_pastur_edges(ratio)
    inside = (x > a) & (x < b) & (x > 0)
    safe_x = torch.where(inside, x, torch.ones_like(x))
    value = torch.sqrt(torch.clamp((b - safe_x) * (safe_x - a), min=0.0)) / (2 * math.pi * ratio * safe_x)
    return torch.where(inside, value, torch.zeros_like(x))
