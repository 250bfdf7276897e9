"""Empirical spectral densities (ESDs) of weight matrices: the WeightWatcher layer analyses.

For every ``nn.Linear`` and ``nn.Conv2d`` layer the ESD is the set of eigenvalues of the correlation
matrix ``X = W^T W``, with ``W`` oriented ``N x M``, ``N >= M`` (so ``X`` is ``M x M``; its eigenvalues
are the squared singular values of ``W``). Heavy-tailed self-regularisation (Martin & Mahoney, JMLR
22(165), 2021, arXiv:1810.01075; Nature Communications 12:4122, 2021, arXiv:2002.06716) reads a
layer's quality off the tail of that ESD; the metrics and their names follow the WeightWatcher tool
(https://github.com/CalculatedContent/WeightWatcher, version 0.7):

    alpha            power-law exponent of the tail, p(lambda) ~ lambda^-alpha for lambda >= xmin
    ks_distance      Kolmogorov-Smirnov distance of that fit (WeightWatcher's D); xmin minimises it
    num_tail         eigenvalues >= xmin (WeightWatcher's num_pl_spikes)
    log_norm         log10 sum(lambda) = log10 ||W||_F^2
    log_spectral_norm log10 lambda_max = log10 ||W||_2^2
    alpha_weighted   alpha * log10 lambda_max
    log_alpha_norm   log10 sum(lambda^alpha)
    stable_rank      sum(lambda) / lambda_max
    mp_softrank      lambda_+ / lambda_max, lambda_+ the bulk edge of the fitted Marchenko-Pastur law
    num_spikes       eigenvalues beyond that edge plus a Tracy-Widom margin
    rand_distance    Jensen-Shannon distance between the ESD and that of the element-shuffled W
    num_traps        eigenvalues of the shuffled W beyond its MP bulk edge: correlation traps

Conv2d weights ``(C_out, C_in, k_h, k_w)`` are matricised in one of three ways (``conv2d=``):

    slices     the k_h * k_w kernel-position slices W[:, :, i, j] (C_out x C_in each), their
               eigenvalues pooled into one ESD of k_h * k_w * min(C_out, C_in) values: WeightWatcher's
               default (``pool=True``), without its ``conv2d_norm`` rescaling
    per_slice  each slice its own ESD (WeightWatcher's ``pool=False``, the ``ww2x`` analysis)
    unfold     one C_out x (C_in k_h k_w) matrix, the map a convolution applies to each im2col patch

Small matrices are diagonalised exactly (``torch.linalg.svdvals``); a matrix with more than
``svd_max_dim`` eigenvalues goes to the suite's Lanczos on ``v -> W^T (W v)``, which yields the top
eigenvalues (the Ritz values whose residual bound is below ``lanczos_tol * lambda_max``) plus a Ritz
measure of the whole ESD; ``method`` records which path each layer took. Then alpha is fitted on
the converged top (xmin is searched there only), the norms use the exact trace ``||W||_F^2``, the MP
fit uses the Ritz measure and ``rand_distance`` (which needs both whole ESDs) is NaN. Everything
is float64.

Where this differs from WeightWatcher 0.7.7 (checked against it in tests/test_weight_esd.py, where
alpha, xmin, D, the norms, alpha_weighted and log_alpha_norm agree to 1e-8):
zeros are ``lambda <= zero_tol * lambda_max`` (WeightWatcher: ``lambda <= 1e-5``); fewer than
``min_evals`` eigenvalues get no fit (WeightWatcher switches to a small-sample estimator below 20);
Conv2d slices are not rescaled (WeightWatcher's default ``conv2d_norm`` multiplies them by
sqrt(1/2)); the MP law is fitted by KS distance, not by a kernel density, so ``mp_softrank`` and
spike counts differ; ``rand_distance`` uses the same shuffle as the traps.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch
from torch import nn

from curvature.errors import NumericalError
from curvature.lanczos import lanczos
from curvature.seeding import generator, stream_seed

CONV2D_MODES = ("slices", "per_slice", "unfold")


@dataclass(frozen=True)
class ESDSettings:
    """Settings of the per-layer analysis (conf/analysis/weight_esd.yaml documents each)."""

    conv2d: str = "slices"
    svd_max_dim: int = 2048        # more eigenvalues per matrix than this -> Lanczos
    lanczos_steps: int = 300
    lanczos_tol: float = 1e-8      # relative residual bound under which a Ritz value is an eigenvalue
    min_evals: int = 10            # fewer (positive) eigenvalues: norms only, no power-law fit
    zero_tol: float = 1e-10        # eigenvalues <= zero_tol * lambda_max are zeros, left out of fits
    randomize: bool = False
    tw_margin: float = 4.0         # spikes lie this many Tracy-Widom scales beyond the MP edge
    alpha_low: float = 2.0         # WeightWatcher's OVER_TRAINED_THRESH
    alpha_high: float = 6.0        # WeightWatcher's UNDER_TRAINED_THRESH

    def __post_init__(self):
        if self.conv2d not in CONV2D_MODES:
            raise ValueError(f"conv2d must be one of {CONV2D_MODES}, got {self.conv2d!r}")


# --- matricisation ------------------------------------------------------------------------------
@dataclass
class LayerMatrices:
    """The matrices of one analysed unit: a Linear layer, a Conv2d layer, or one slice of it."""

    index: int                   # position among the model's Linear/Conv2d layers
    name: str                    # module name, e.g. "features.0"
    kind: str                    # "linear" | "conv2d"
    weight_shape: tuple
    matrices: list[torch.Tensor]  # each N x M with N >= M, all of the same shape
    slice: Optional[str] = None  # "i,j" for a per_slice unit

    @property
    def label(self) -> str:
        return self.name if self.slice is None else f"{self.name}[{self.slice}]"


def oriented(matrix: torch.Tensor) -> torch.Tensor:
    """``W`` or ``W^T``, whichever has at least as many rows as columns (N >= M)."""
    return matrix if matrix.shape[0] >= matrix.shape[1] else matrix.T


def conv2d_matrices(weight: torch.Tensor, mode: str) -> list[list[torch.Tensor]]:
    """Groups of matrices of a ``(C_out, C_in, k_h, k_w)`` weight; each group is one ESD (see module doc)."""
    if mode == "unfold":
        return [[oriented(weight.reshape(weight.shape[0], -1))]]
    slices = [oriented(weight[:, :, i, j]) for i in range(weight.shape[2]) for j in range(weight.shape[3])]
    return [slices] if mode == "slices" else [[s] for s in slices]


def layer_matrices(model: nn.Module, conv2d: str = "slices") -> list[LayerMatrices]:
    """The Linear and Conv2d layers of ``model`` in module order, as float64 matrices (biases ignored)."""
    units = []
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    for index, (name, module) in enumerate(layers):
        weight = module.weight.detach().to(torch.float64)
        shape = tuple(weight.shape)
        if isinstance(module, nn.Linear):
            units.append(LayerMatrices(index, name, "linear", shape, [oriented(weight)]))
            continue
        groups = conv2d_matrices(weight, conv2d)
        kw = weight.shape[3]
        for g, group in enumerate(groups):
            slice_id = f"{g // kw},{g % kw}" if conv2d == "per_slice" else None
            units.append(LayerMatrices(index, name, "conv2d", shape, group, slice_id))
    return units


# --- eigenvalues ----------------------------------------------------------------------------------
@dataclass
class ESD:
    """Eigenvalues of ``W_s^T W_s`` pooled over the matrices ``W_s`` (each N x M) of one unit.

    ``eigenvalues`` (ascending) are all ``num_eigenvalues`` of them when ``method == "svd"``, and the
    converged top ones when ``method == "lanczos"``; then ``ritz_nodes`` / ``ritz_weights`` (weights
    summing to 1) approximate the whole ESD as a Gauss quadrature measure. ``trace`` is the exact
    sum of all eigenvalues, ``||W||_F^2``.
    """

    eigenvalues: np.ndarray
    num_eigenvalues: int
    method: str
    N: int
    M: int
    trace: float
    ritz_nodes: Optional[np.ndarray] = None
    ritz_weights: Optional[np.ndarray] = None

    @property
    def complete(self) -> bool:
        return self.method == "svd"

    @property
    def lambda_max(self) -> float:
        return float(self.eigenvalues[-1])


def svd_eigenvalues(matrices: list[torch.Tensor]) -> np.ndarray:
    """All eigenvalues of the ``W_s^T W_s`` as squared singular values of the ``W_s`` (each N x M),
    pooled and ascending; one batched LAPACK call on contiguous copies (strided slices are slow)."""
    batch = torch.stack([w.to(torch.float64) for w in matrices]).contiguous()
    return np.sort((torch.linalg.svdvals(batch) ** 2).reshape(-1).cpu().numpy())


def lanczos_eigenvalues(matrix: torch.Tensor, num_steps: int, tol: float, seed: int):
    """Top eigenvalues of ``X = W^T W`` by Lanczos, and the Ritz measure of X's ESD.

    A Ritz value theta with residual bound ``|beta_m s_m| <= tol * theta_max`` lies that close to an
    eigenvalue (Parlett, The Symmetric Eigenvalue Problem, Thm. 11.4.1). The Ritz values are
    converged from the top down to the first that is not; those (at least the largest Ritz value,
    a lower bound of lambda_max) are returned as the top of the ESD.
    """
    w = matrix.to(torch.float64)
    dim = w.shape[1]
    result = lanczos(lambda v: w.T @ (w @ v), dim, min(num_steps, dim), seed=seed,
                     dtype=torch.float64, device=w.device)
    valid = result.mask[0]
    nodes = result.ritz_values[0][valid].numpy()
    weights = result.ritz_weights[0][valid].numpy()
    bounds = result.residual_bounds[0][valid].numpy()
    order = np.argsort(nodes)[::-1]
    ok = bounds[order] <= tol * max(nodes.max(), 0.0)
    top = nodes[order][:max(int(np.argmin(ok)) if not ok.all() else len(ok), 1)]
    return np.sort(np.clip(top, 0.0, None)), nodes, weights / weights.sum()


def compute_esd(matrices: list[torch.Tensor], settings: ESDSettings, seed: int = 0) -> ESD:
    """The pooled ESD of ``matrices`` (each N x M, N >= M): exact SVD, or Lanczos above svd_max_dim."""
    N, M = matrices[0].shape
    trace = float(sum((w.to(torch.float64) ** 2).sum() for w in matrices))
    if M <= settings.svd_max_dim:
        values = svd_eigenvalues(matrices)
        return ESD(values, len(values), "svd", N, M, trace)
    tops, nodes, weights = [], [], []
    for s, w in enumerate(matrices):
        top, n, wt = lanczos_eigenvalues(w, settings.lanczos_steps, settings.lanczos_tol,
                                         stream_seed(seed, f"weight_esd.lanczos.{s}"))
        tops.append(top)
        nodes.append(n)
        weights.append(wt / len(matrices))
    # Above the largest of the matrices' smallest converged values, every eigenvalue of every
    # matrix is known: the pooled top is complete from there up.
    pooled = np.concatenate(tops)
    pooled = np.sort(pooled[pooled >= max(top[0] for top in tops)])
    return ESD(pooled, M * len(matrices), "lanczos", N, M, trace, np.concatenate(nodes), np.concatenate(weights))


def shuffled(matrices: list[torch.Tensor], seed: int) -> list[torch.Tensor]:
    """Each matrix with its elements randomly permuted (WeightWatcher's ``randomize``)."""
    gen = generator(seed, "weight_esd.shuffle")
    out = []
    for w in matrices:
        perm = torch.randperm(w.numel(), generator=gen).to(w.device)
        out.append(w.reshape(-1)[perm].reshape(w.shape))
    return out


# --- power-law fit --------------------------------------------------------------------------------
@dataclass
class PowerLawFit:
    """Continuous power law p(x) = (alpha - 1) / xmin * (x / xmin)^-alpha on x >= xmin.

    ``xmins``, ``alphas`` and ``ks_distances`` hold every candidate of the xmin search.
    """

    alpha: float
    xmin: float
    ks_distance: float
    sigma: float              # standard error (alpha - 1) / sqrt(num_tail)
    num_tail: int             # eigenvalues >= xmin (WeightWatcher's num_pl_spikes)
    xmins: np.ndarray = field(repr=False)
    alphas: np.ndarray = field(repr=False)
    ks_distances: np.ndarray = field(repr=False)


def fit_power_law(values, xmin: Optional[float] = None) -> PowerLawFit:
    """Fit a power-law tail by maximum likelihood, with xmin minimising the KS distance.

    Clauset, Shalizi & Newman, SIAM Review 51:661 (2009), eqs. (3.1), (3.2), (3.9): for each
    candidate xmin (every distinct value but the largest), with the n values x_i >= xmin,

        alpha = 1 + n / sum_i ln(x_i / xmin),
        D     = max_i | 1 - (x_(i) / xmin)^(1 - alpha) - (i - 1) / n |,   x_(1) <= ... <= x_(n),

    and the candidate with the smallest D wins. The empirical CDF (i - 1) / n (tied values take the
    rank of their first occurrence) is the convention of the ``powerlaw`` package (Alstott et al.,
    PLoS ONE 9:e85777, 2014) and of WeightWatcher, which both fit ESDs this way; ``xmin`` fixes the
    candidate instead. Values must be positive.
    """
    x = np.sort(np.asarray(values, dtype=np.float64))
    if len(x) < 2 or x[0] <= 0:
        raise ValueError("a power-law fit needs at least two values, all positive")
    rank = np.searchsorted(x, x, side="left")  # empirical CDF numerators, ties at first occurrence
    starts = np.unique(rank)[:-1]
    if xmin is not None:
        starts = np.array([int(np.searchsorted(x, xmin, side="left"))])
    if len(starts) == 0:
        raise ValueError("a power-law fit needs at least two distinct values")
    logs = np.log(x)
    tail_log_sum = np.cumsum(logs[::-1])[::-1]
    n = len(x) - starts
    alphas = 1.0 + n / (tail_log_sum[starts] - n * logs[starts])
    ks = np.array([_ks_power_law(x, rank, i, a) for i, a in zip(starts, alphas)])
    best = int(np.nanargmin(ks))
    return PowerLawFit(float(alphas[best]), float(x[starts[best]]), float(ks[best]),
                       float((alphas[best] - 1) / math.sqrt(n[best])), int(n[best]),
                       x[starts], alphas, ks)


def _ks_power_law(x: np.ndarray, rank: np.ndarray, start: int, alpha: float) -> float:
    if not alpha > 1:
        return np.nan
    n = len(x) - start
    tail = x[start:]
    model = 1.0 - (tail / tail[0]) ** (1.0 - alpha)
    return float(np.max(np.abs(model - (rank[start:] - start) / n)))


def power_law_density(x, fit: PowerLawFit, fraction: float = 1.0) -> np.ndarray:
    """``fraction * (alpha - 1) / xmin * (x / xmin)^-alpha``: the fitted tail density, scaled to the
    fraction of the ESD it describes (``num_tail / num_eigenvalues``) for drawing over a histogram."""
    x = np.asarray(x, dtype=np.float64)
    return fraction * (fit.alpha - 1) / fit.xmin * (x / fit.xmin) ** (-fit.alpha)


# --- Marchenko-Pastur fit -------------------------------------------------------------------------
def marchenko_pastur_cdf(q: float, num: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Grid ``(x, F(x))`` of the MP law of ``X / (N sigma^2)``, X = W^T W, W N x M i.i.d., Q = N/M >= 1.

    Density sqrt((b - x)(x - a)) / (2 pi y x) on [a, b] = [(1 - sqrt y)^2, (1 + sqrt y)^2], y = 1/Q
    (Marchenko & Pastur 1967); integrated by the midpoint rule in theta, x = a + (b - a)(1 - cos
    theta)/2, which removes the square-root edges (and the 1/sqrt(x) pole when Q = 1).
    """
    y = 1.0 / q
    a, b = (1 - math.sqrt(y)) ** 2, (1 + math.sqrt(y)) ** 2
    edges = np.linspace(0.0, math.pi, num + 1)
    mid = 0.5 * (edges[1:] + edges[:-1])
    x_mid = a + (b - a) * (1 - np.cos(mid)) / 2
    mass = (b - a) ** 2 * np.sin(mid) ** 2 / (8 * math.pi * y * x_mid) * (math.pi / num)
    cdf = np.concatenate([[0.0], np.cumsum(mass)])
    return a + (b - a) * (1 - np.cos(edges)) / 2, cdf / cdf[-1]


def ks_distance_to_cdf(values, weights, grid_x: np.ndarray, grid_cdf: np.ndarray) -> float:
    """Two-sided KS distance sup |F_emp - F| between a (weighted) sample and a CDF given on a grid."""
    order = np.argsort(values)
    x = np.asarray(values, dtype=np.float64)[order]
    w = np.full(len(x), 1.0 / len(x)) if weights is None else np.asarray(weights)[order] / np.sum(weights)
    after = np.cumsum(w)
    model = np.interp(x, grid_x, grid_cdf, left=0.0, right=1.0)
    return float(max(np.max(np.abs(after - model)), np.max(np.abs(after - w - model))))


@dataclass
class MPFit:
    """Marchenko-Pastur law fitted to an ESD; eigenvalues in the units of X = W^T W (unnormalised).

    ``sigma`` is the fitted element standard deviation, ``lambda_plus = sigma^2 (sqrt N + sqrt M)^2``
    the bulk edge, ``threshold = lambda_plus + tw_margin * sigma^2 (sqrt N + sqrt M)(1/sqrt N +
    1/sqrt M)^(1/3)`` (the Tracy-Widom scale of the top eigenvalue, Johnstone, Ann. Stat. 29:295,
    2001), ``num_spikes`` the eigenvalues above it and ``softrank = lambda_plus / lambda_max``.
    """

    sigma: float
    lambda_plus: float
    threshold: float
    num_spikes: int
    softrank: float
    ks_distance: float


def fit_marchenko_pastur(esd: ESD, tw_margin: float = 4.0) -> MPFit:
    """MP fit by minimum KS distance over sigma^2, scanned on a log grid and refined once.

    The sample is the ESD (or, for Lanczos, its Ritz measure); outliers move the empirical CDF by
    their mass only, so the bulk decides sigma. Martin & Mahoney (JMLR 2021, Sec. 3) fit the bulk
    by eye or least squares; WeightWatcher fits a kernel density; the KS criterion is used here so
    that the MP and power-law fits are judged alike.
    """
    N, M = esd.N, esd.M
    grid_x, grid_cdf = marchenko_pastur_cdf(N / M)
    values, weights = (esd.eigenvalues, None) if esd.complete else (esd.ritz_nodes, esd.ritz_weights)
    values = np.asarray(values) / N
    mean = esd.trace / (N * esd.num_eigenvalues)  # = sigma^2 when there are no spikes

    def ks(s2):
        return ks_distance_to_cdf(values / s2, weights, grid_x, grid_cdf)

    grid = mean * np.geomspace(0.01, 2.0, 301)
    best = int(np.argmin([ks(s) for s in grid]))
    fine = np.geomspace(grid[max(best - 1, 0)], grid[min(best + 1, len(grid) - 1)], 101)
    scores = [ks(s) for s in fine]
    s2 = float(fine[int(np.argmin(scores))])
    root_n, root_m = math.sqrt(N), math.sqrt(M)
    lambda_plus = s2 * (root_n + root_m) ** 2
    threshold = lambda_plus + tw_margin * s2 * (root_n + root_m) * (1 / root_n + 1 / root_m) ** (1 / 3)
    return MPFit(math.sqrt(s2), lambda_plus, threshold, int(np.sum(esd.eigenvalues > threshold)),
                 lambda_plus / esd.lambda_max, float(min(scores)))


# --- distances between ESDs -----------------------------------------------------------------------
def jensen_shannon_distance(p, q) -> float:
    """sqrt((KL(p || m) + KL(q || m)) / 2), m = (p + q) / 2, natural logs; p, q normalised to sum 1."""
    p = np.asarray(p, dtype=np.float64) / np.sum(p)
    q = np.asarray(q, dtype=np.float64) / np.sum(q)
    m = (p + q) / 2

    def kl(a):
        keep = a > 0
        return float(np.sum(a[keep] * np.log(a[keep] / m[keep])))
    return math.sqrt(max((kl(p) + kl(q)) / 2, 0.0))


def rand_distance(eigenvalues, shuffled_eigenvalues) -> float:
    """WeightWatcher's ``rand_distance``: the Jensen-Shannon distance between the ascending ESD and the
    ascending ESD of the element-shuffled matrix, each normalised to sum 1 (both sum to ||W||_F^2,
    which shuffling keeps), i.e. between the two spectra's shapes; 0 for a matrix that looks random,
    at most sqrt(ln 2)."""
    a, b = np.sort(eigenvalues), np.sort(shuffled_eigenvalues)
    if len(a) != len(b):
        raise ValueError("rand_distance compares two complete ESDs of the same size")
    return jensen_shannon_distance(a, b)


# --- one layer, one model -------------------------------------------------------------------------
@dataclass
class LayerAnalysis:
    """Everything computed for one unit: ``row`` (the CSV row) and the objects behind it."""

    unit: LayerMatrices
    row: dict
    esd: ESD
    power_law: Optional[PowerLawFit]
    mp: MPFit
    random_esd: Optional[ESD] = None
    random_mp: Optional[MPFit] = None


def norm_metrics(esd: ESD) -> dict:
    """WeightWatcher's norm metrics; ``trace`` is exact even when only the top eigenvalues are known."""
    lam_max = esd.lambda_max
    return {"lambda_max": lam_max, "log_norm": math.log10(esd.trace),
            "log_spectral_norm": math.log10(lam_max), "stable_rank": esd.trace / lam_max}


def power_law_metrics(esd: ESD, settings: ESDSettings) -> tuple[Optional[PowerLawFit], dict]:
    """alpha, KS distance, xmin, alpha_weighted, log_alpha_norm and the alpha warning of one ESD."""
    positive = esd.eigenvalues[esd.eigenvalues > settings.zero_tol * esd.lambda_max]
    nan = float("nan")
    if len(positive) < settings.min_evals or len(np.unique(positive)) < 2:
        return None, {"alpha": nan, "alpha_sigma": nan, "xmin": nan, "num_tail": 0, "ks_distance": nan,
                      "alpha_weighted": nan, "log_alpha_norm": nan, "warning": "too few eigenvalues"}
    fit = fit_power_law(positive)
    warning = ("over-trained (alpha < %g)" % settings.alpha_low if fit.alpha < settings.alpha_low else
               "under-trained (alpha > %g)" % settings.alpha_high if fit.alpha > settings.alpha_high else "")
    # log10 sum(lambda^alpha), computed stably as log10(lmax^alpha) + log10 sum((lambda/lmax)^alpha)
    scaled = np.sum((positive / esd.lambda_max) ** fit.alpha)
    return fit, {"alpha": fit.alpha, "alpha_sigma": fit.sigma, "xmin": fit.xmin, "num_tail": fit.num_tail,
                 "ks_distance": fit.ks_distance,
                 "alpha_weighted": fit.alpha * math.log10(esd.lambda_max),
                 "log_alpha_norm": fit.alpha * math.log10(esd.lambda_max) + math.log10(scaled),
                 "warning": warning}


def randomized_metrics(unit: LayerMatrices, esd: ESD, settings: ESDSettings, seed: int):
    """ESD of the element-shuffled matrices, its MP fit, correlation traps and rand_distance."""
    random_esd = compute_esd(shuffled(unit.matrices, seed), settings, seed)
    random_mp = fit_marchenko_pastur(random_esd, settings.tw_margin)
    distance = rand_distance(esd.eigenvalues, random_esd.eigenvalues) \
        if esd.complete and random_esd.complete else float("nan")
    row = {"rand_lambda_max": random_esd.lambda_max, "rand_mp_sigma": random_mp.sigma,
           "rand_mp_threshold": random_mp.threshold, "num_traps": random_mp.num_spikes,
           "rand_distance": distance}
    return random_esd, random_mp, row


def analyze_unit(unit: LayerMatrices, settings: ESDSettings, seed: int = 0) -> LayerAnalysis:
    """All metrics of one unit (see the module docstring for their definitions)."""
    for w in unit.matrices:
        if not torch.isfinite(w).all():
            raise NumericalError(f"layer {unit.label} has NaN or Inf weights: its ESD is undefined")
    unit_seed = stream_seed(seed, f"weight_esd.{unit.label}")
    esd = compute_esd(unit.matrices, settings, unit_seed)
    fit, pl_row = power_law_metrics(esd, settings)
    mp = fit_marchenko_pastur(esd, settings.tw_margin)
    row = {"layer_index": unit.index, "name": unit.name, "slice": unit.slice or "", "kind": unit.kind,
           "weight_shape": "x".join(map(str, unit.weight_shape)), "N": esd.N, "M": esd.M,
           "Q": esd.N / esd.M, "num_matrices": len(unit.matrices), "num_eigenvalues": esd.num_eigenvalues,
           "method": esd.method, "num_computed": len(esd.eigenvalues), **norm_metrics(esd), **pl_row,
           "mp_sigma": mp.sigma, "mp_lambda_plus": mp.lambda_plus, "mp_ks_distance": mp.ks_distance,
           "num_spikes": mp.num_spikes, "mp_softrank": mp.softrank}
    result = LayerAnalysis(unit, row, esd, fit, mp)
    if settings.randomize:
        result.random_esd, result.random_mp, rand_row = randomized_metrics(unit, esd, settings, unit_seed)
        row.update(rand_row)
    return result


def analyze_model(model: nn.Module, settings: ESDSettings = ESDSettings(), seed: int = 0) -> list[LayerAnalysis]:
    """:func:`analyze_unit` for every Linear / Conv2d unit of ``model`` (see :func:`layer_matrices`).

    An all-zero unit (e.g. a zero-initialised layer) has no ESD to speak of: it is skipped with a
    ``UserWarning``.
    """
    results = []
    for unit in layer_matrices(model, settings.conv2d):
        if all(not torch.any(w != 0) for w in unit.matrices):
            warnings.warn(f"layer {unit.label} is all zeros: skipped (its ESD is a point mass at 0)")
            continue
        results.append(analyze_unit(unit, settings, seed))
    return results


SUMMARY_METRICS = ("alpha", "alpha_weighted", "log_norm", "log_spectral_norm", "log_alpha_norm",
                   "stable_rank", "mp_softrank", "ks_distance", "rand_distance")


def summarize(rows: list[dict], settings: ESDSettings) -> dict:
    """Model-level summary: means over units of the WeightWatcher metrics (NaNs skipped), counts."""
    summary = {}
    for key in SUMMARY_METRICS:
        values = [r[key] for r in rows if key in r and np.isfinite(r[key])]
        if values:
            summary[f"{key}_mean"] = float(np.mean(values))
    alphas = np.array([r["alpha"] for r in rows], dtype=float)
    summary.update(num_units=len(rows), num_fitted=int(np.isfinite(alphas).sum()),
                   num_alpha_below=int(np.sum(alphas < settings.alpha_low)),
                   num_alpha_above=int(np.sum(alphas > settings.alpha_high)),
                   num_spikes_total=int(sum(r["num_spikes"] for r in rows)),
                   num_lanczos_units=sum(r["method"] == "lanczos" for r in rows))
    if settings.randomize:
        summary["num_traps_total"] = int(sum(r["num_traps"] for r in rows))
    return summary
