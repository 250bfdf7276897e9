"""The paper's theoretical claims as computable quantities (Table 1, Thms. 1, 2, 5, Lemma 1).

* Table 1 / App. B.1: the lower-bound terms of Lanczos, ``L = 1 / C_{k-1}(2r - 1)^2``, and of the
  power method, ``R = r^{-2(k-1)}``, for ``r = lambda_1 / lambda_2`` (Golub & Van Loan, *Matrix
  Computations*, 4th ed., Sec. 10.1.5 and Table 10.1.1), the full error bounds they come from, and
  plain power iteration to measure against them.
* Thm. 2: pairing the i-th largest Ritz value with the i-th largest eigenvalue.
* Lemma 1: quadratic forms ``u^T A^k u`` of random unit vectors, the exact spread of that estimate
  and a log-log slope fit.
* Thm. 5: the raw moments of a spectral measure smoothed by a Gaussian kernel, in closed form and
  measured by quadrature of :meth:`SpectralMeasure.smooth`, and the smoothed mass of an interval.

Everything is plain PyTorch / ``math`` in float64; nothing here knows about configs.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from curvature.spectrum import SpectralMeasure

Matvec = Callable[[torch.Tensor], torch.Tensor]


# --- Table 1: Lanczos vs power iteration ------------------------------------------------------
def chebyshev_t(degree: int, x: float) -> float:
    """Chebyshev polynomial of the first kind ``C_j(x)`` by ``C_{j+1} = 2x C_j - C_{j-1}``.

    The recurrence is exact for every real ``x``; for ``|x| >= 1`` it equals ``cosh(j arccosh x)``.
    """
    if degree < 0 or int(degree) != degree:
        raise ValueError(f"degree must be a non-negative integer, got {degree}")
    previous, current = 1.0, float(x)
    if degree == 0:
        return previous
    for _ in range(int(degree) - 1):
        previous, current = current, 2.0 * x * current - previous
    return current


def _check_ratio_and_steps(ratio: float, k: int) -> None:
    if not ratio >= 1.0:
        raise ValueError(f"ratio lambda_1/lambda_2 must be >= 1, got {ratio}")
    if k < 1 or int(k) != k:
        raise ValueError(f"k must be a positive integer, got {k}")


def lanczos_bound_term(ratio: float, k: int) -> float:
    """``L_{k-1} = 1 / C_{k-1}(2r - 1)^2`` of Golub & Van Loan Table 10.1.1, ``r = lambda_1/lambda_2``.

    It is the factor of the Kaniel-Paige bound (:func:`lanczos_error_bound`) after ``k`` Lanczos steps
    when ``lambda_n = 0`` (then ``1 + 2 rho_1 = 2r - 1``). ``r = 1.5, k = 5``: ``1/97^2 = 1.06e-4``.
    """
    _check_ratio_and_steps(ratio, k)
    return 1.0 / chebyshev_t(k - 1, 2.0 * ratio - 1.0) ** 2


def power_bound_term(ratio: float, k: int) -> float:
    """``R_{k-1} = r^{-2(k-1)}``: the factor of the power-method bound after ``k`` products
    (:func:`power_error_bound`). ``r = 1.5, k = 5``: ``1.5^-8 = 3.9e-2``."""
    _check_ratio_and_steps(ratio, k)
    return float(ratio) ** (-2.0 * (k - 1))


def table1_rows(ratios: Sequence[float], steps: Sequence[int]) -> list[dict]:
    """Rows ``{ratio, k, lanczos, power}`` of paper Table 1 for every ratio and step count."""
    return [{"ratio": float(r), "k": int(k), "lanczos": lanczos_bound_term(r, k),
             "power": power_bound_term(r, k)} for r in ratios for k in steps]


def tan2_start_angle(start: torch.Tensor, top_eigenvector: torch.Tensor) -> float:
    """``tan^2 phi_1`` of the angle between a start vector and the top eigenvector (both any norm)."""
    start = start.flatten().to(torch.float64)
    top = top_eigenvector.flatten().to(start)
    cos2 = float((start @ top) ** 2 / ((start @ start) * (top @ top)))
    return (1.0 - cos2) / cos2 if cos2 > 0 else math.inf


def lanczos_error_bound(lambda_1: float, lambda_2: float, lambda_n: float, tan2_phi: float,
                        k: int) -> float:
    """Kaniel-Paige bound on the top Ritz value after ``k`` steps (Golub & Van Loan Thm. 10.1.2):

    ``lambda_1 - theta_1 <= (lambda_1 - lambda_n) tan^2(phi_1) / C_{k-1}(1 + 2 rho_1)^2`` with
    ``rho_1 = (lambda_1 - lambda_2) / (lambda_2 - lambda_n)`` and ``phi_1`` the angle between the
    start vector and the top eigenvector.
    """
    rho = (lambda_1 - lambda_2) / (lambda_2 - lambda_n)
    return (lambda_1 - lambda_n) * tan2_phi / chebyshev_t(k - 1, 1.0 + 2.0 * rho) ** 2


def power_error_bound(lambda_1: float, lambda_2: float, lambda_n: float, tan2_phi: float,
                      k: int) -> float:
    """Bound on the Rayleigh quotient ``gamma_k`` of ``A^{k-1} q`` (Golub & Van Loan Sec. 10.1.5):

    ``lambda_1 - gamma_k <= (lambda_1 - lambda_n) tan^2(phi_1) (lambda_2 / lambda_1)^{2(k-1)}``.
    It needs ``|lambda_i| <= lambda_2`` for ``i >= 2`` (e.g. a positive semi-definite matrix):
    writing ``q = sum_i c_i u_i``, ``lambda_1 - gamma_k = sum_{i>1} c_i^2 lambda_i^{2k-2}
    (lambda_1 - lambda_i) / sum_i c_i^2 lambda_i^{2k-2}``.
    """
    return (lambda_1 - lambda_n) * tan2_phi * (lambda_2 / lambda_1) ** (2 * (k - 1))


def power_iteration(matvec: Matvec, start: torch.Tensor, num_steps: int) -> torch.Tensor:
    """Rayleigh quotients ``gamma_k = x_k^T A x_k`` of plain power iteration, ``k = 1..num_steps``.

    ``x_1`` is the normalised ``start`` ((P,) or (P, b) for b independent runs) and
    ``x_{k+1} = A x_k / ||A x_k||``, so ``gamma_k`` is the Rayleigh quotient of ``A^{k-1} q``: ``k``
    products, the same as ``k`` Lanczos steps (whose Krylov space contains ``A^{k-1} q``, hence
    ``theta_1 >= gamma_k`` always). Returns (num_steps,) or (num_steps, b), float64.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    squeeze = start.dim() == 1
    x = start.unsqueeze(-1) if squeeze else start
    x = x / x.norm(dim=0, keepdim=True)
    quotients = []
    for _ in range(num_steps):
        y = matvec(x)
        quotients.append((x * y).sum(0).to("cpu", torch.float64))
        norm = y.norm(dim=0, keepdim=True)
        x = torch.where(norm > 0, y / torch.where(norm > 0, norm, 1.0), x)  # null space: stay put
    out = torch.stack(quotients)
    return out[:, 0] if squeeze else out


# --- Thm. 2: are the m Ritz values the top m eigenvalues? -------------------------------------
def top_eigenvalue_matches(ritz_values: torch.Tensor, eigenvalues: torch.Tensor,
                           tolerance: float) -> torch.Tensor:
    """Which of the top ``m`` eigenvalues the ``m`` Ritz values recover, as a bool tensor (m,).

    The i-th largest Ritz value is paired with the i-th largest eigenvalue and counts as a match
    when ``|theta_i - lambda_i| <= tolerance``. Cauchy interlacing (``lambda_{n-m+i} <= theta_i <=
    lambda_i``) makes this the natural one-to-one pairing: if the Ritz values were the top ``m``
    eigenvalues, all ``m`` pairs would match. Fewer than ``m`` Ritz values (an early invariant
    subspace) leave the remaining pairs unmatched.
    """
    theta = torch.sort(torch.as_tensor(ritz_values, dtype=torch.float64).flatten(), descending=True).values
    lam = torch.sort(torch.as_tensor(eigenvalues, dtype=torch.float64).flatten(), descending=True).values
    m = len(theta)
    if m > len(lam):
        raise ValueError(f"{m} Ritz values but only {len(lam)} eigenvalues")
    return (theta - lam[:m]).abs() <= tolerance


# --- Lemma 1: one random vector in high dimension ---------------------------------------------
def quadratic_forms(matvec: Matvec, vectors: torch.Tensor, powers: Sequence[int]) -> dict[int, torch.Tensor]:
    """``u_j^T A^k u_j`` for every column ``u_j`` of ``vectors`` (P, b) and every ``k`` in ``powers``.

    Costs ``max(powers)`` batched products. Returns ``{k: (b,) float64 tensor}``.
    """
    if not powers or min(powers) < 0:
        raise ValueError(f"powers must be non-negative integers, got {list(powers)}")
    wanted, out, y = set(powers), {}, vectors
    for k in range(max(powers) + 1):
        if k > 0:
            y = matvec(y)
        if k in wanted:
            out[k] = (vectors * y).sum(0).to("cpu", torch.float64)
    return out


def sphere_quadratic_form_std(moment_k: float, moment_2k: float, n: int) -> float:
    """Exact std of ``u^T A^k u`` for ``u`` uniform on the unit sphere of R^n:

    ``sqrt(2 (m_{2k} - m_k^2) / (n + 2))`` with ``m_j = tr(A^j) / n`` the moments of the empirical
    spectral density (:func:`power_moments`). From ``E u_i^4 = 3 / (n(n+2))`` and
    ``E u_i^2 u_j^2 = 1 / (n(n+2))``: with ``B = A^k`` in its eigenbasis,
    ``E (u^T B u)^2 = ((tr B)^2 + 2 tr B^2) / (n(n+2))``. So the spread falls like ``n^{-1/2}``
    whenever the moments converge (Wigner, Marcenko-Pastur).
    """
    return math.sqrt(max(0.0, 2.0 * (moment_2k - moment_k ** 2) / (n + 2)))


def power_moments(matrix: torch.Tensor, k: int) -> tuple[float, float]:
    """``(m_k, m_2k)`` of a symmetric matrix, ``m_j = tr(A^j) / n``, from ``B = A^k`` (float64):
    ``tr B / n`` and ``||B||_F^2 / n``. About log2(k) + 1 matrix products, cheaper than ``eigh``."""
    b = torch.linalg.matrix_power(matrix.to(torch.float64), k)
    n = matrix.shape[0]
    return float(torch.trace(b)) / n, float((b * b).sum()) / n


def loglog_slope(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares fit ``log y = slope log x + intercept``; returns ``(slope, intercept)``."""
    lx = torch.log(torch.as_tensor(x, dtype=torch.float64))
    ly = torch.log(torch.as_tensor(y, dtype=torch.float64))
    if lx.numel() < 2 or float(lx.std()) == 0:
        raise ValueError("need at least two distinct x values to fit a slope")
    slope = float(((lx - lx.mean()) * (ly - ly.mean())).sum() / ((lx - lx.mean()) ** 2).sum())
    return slope, float(ly.mean() - slope * lx.mean())


# --- Thm. 5: kernel smoothing biases the moments ----------------------------------------------
def gaussian_moment(j: int, sigma: float) -> float:
    """``E Z^j`` for ``Z ~ N(0, sigma^2)``: 0 for odd j, ``sigma^j (j-1)!!`` for even j."""
    if j < 0:
        raise ValueError(f"j must be >= 0, got {j}")
    if j % 2:
        return 0.0
    return sigma ** j * math.prod(range(j - 1, 0, -2))


def smoothed_moment(moments: Sequence[float], k: int, sigma: float) -> float:
    """Thm. 5: the k-th raw moment of ``mu`` convolved with a Gaussian of standard deviation sigma.

    The smoothed density is the law of ``X + Z`` with ``X ~ mu`` and ``Z ~ N(0, sigma^2)``
    independent, so ``E (X + Z)^k = sum_{j even <= k} C(k, j) (j-1)!! sigma^j m_{k-j}``:
    ``m_1``, ``m_2 + sigma^2 m_0``, ``m_3 + 3 sigma^2 m_1``, ``m_4 + 6 sigma^2 m_2 + 3 sigma^4 m_0``...
    ``moments[i]`` is ``m_i`` of ``mu`` for ``i = 0..k`` (``m_0`` its total mass, 1 for a
    probability measure).
    """
    if len(moments) <= k:
        raise ValueError(f"need moments m_0..m_{k}, got {len(moments)} values")
    return sum(math.comb(k, j) * gaussian_moment(j, sigma) * moments[k - j] for j in range(0, k + 1, 2))


def smoothing_moment_bias(moments: Sequence[float], k: int, sigma: float) -> float:
    """Thm. 5's bias of the k-th moment: ``smoothed_moment(moments, k, sigma) - m_k``."""
    return smoothed_moment(moments, k, sigma) - moments[k]


def smoothed_density_moments(measure: SpectralMeasure, sigma: float, k_max: int,
                             points_per_sigma: float = 4.0, tail_sigmas: float = 12.0,
                             max_grid_points: int = 2_000_000) -> list[float]:
    """Raw moments ``0..k_max`` of the density ``measure.smooth(x, sigma)``, by quadrature.

    The trapezoidal rule on a uniform grid reaching ``tail_sigmas`` standard deviations past the
    extreme nodes (tail mass ``< exp(-tail_sigmas^2 / 2)``). For a Gaussian times a polynomial it
    converges geometrically: the error is about ``exp(-2 pi^2 points_per_sigma^2)`` (Trefethen &
    Weideman, SIAM Review 2014), so 4 points per sigma is exact to rounding. This *measures* the
    moments of what the suite plots, independently of :func:`smoothed_moment`.
    """
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    low = float(measure.nodes.min()) - tail_sigmas * sigma
    high = float(measure.nodes.max()) + tail_sigmas * sigma
    h = sigma / points_per_sigma
    count = int(math.ceil((high - low) / h)) + 1
    if count > max_grid_points:
        raise ValueError(f"sigma={sigma:g} needs {count} grid points over [{low:.4g}, {high:.4g}] "
                         f"(limit {max_grid_points}); use a larger sigma")
    grid = low + h * torch.arange(count, dtype=torch.float64)
    density = smoothed_density(measure, grid, sigma)
    powers = torch.arange(k_max + 1, dtype=torch.float64).unsqueeze(1)
    # trapezoid: the end points carry half weight, but the density there is < 1e-31 of its peak
    return ((grid.unsqueeze(0) ** powers * density).sum(1) * h).tolist()


def smoothed_density(measure: SpectralMeasure, grid: torch.Tensor, sigma: float,
                     chunk_elements: int = 4_000_000) -> torch.Tensor:
    """:meth:`SpectralMeasure.smooth` on a long grid, in chunks of ``chunk_elements`` kernel values
    (the method itself forms a grid x nodes matrix)."""
    grid = torch.as_tensor(grid, dtype=torch.float64)
    chunk = max(1, chunk_elements // measure.nodes.numel())
    return torch.cat([measure.smooth(grid[i:i + chunk], sigma) for i in range(0, grid.numel(), chunk)])


def smoothed_mass(measure: SpectralMeasure, sigma: float, lower: float, upper: float) -> float:
    """Mass of ``[lower, upper]`` under the smoothed density: ``sum_i w_i P(lower <= lambda_i + Z <= upper)``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    scale = sigma * math.sqrt(2.0)
    upper_cdf = torch.erf((upper - measure.nodes) / scale)
    lower_cdf = torch.erf((lower - measure.nodes) / scale)
    return float((0.5 * (upper_cdf - lower_cdf) * measure.weights).sum())


def scaled_variance_from_sigma(sigma: float, lambda_min: float, lambda_max: float) -> float:
    """The inverse of :func:`curvature.spectrum.sigma_from_scaled_variance`: the PyHessian /
    spectral-density kernel variance ``v`` with ``v * max(1, lambda_max - lambda_min) = sigma^2``."""
    if sigma <= 0:
        raise ValueError(f"sigma must be positive, got {sigma}")
    return sigma ** 2 / max(1.0, lambda_max - lambda_min)
