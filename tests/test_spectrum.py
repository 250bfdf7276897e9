"""The spectral measure against closed forms."""

import math

import pytest
import torch

from curvature.lanczos import lanczos
from curvature.random_matrices import wigner
from curvature.spectrum import SpectralMeasure, relative_moment_errors, sigma_from_scaled_variance


def test_moments_mass_and_summary_of_a_known_measure():
    mu = SpectralMeasure(torch.tensor([2.0, -1.0, 0.0]), torch.tensor([0.5, 0.25, 0.25]))
    assert mu.nodes.tolist() == [-1.0, 0.0, 2.0]  # sorted with their weights
    assert mu.moments(3) == pytest.approx([1.0, 0.75, 2.25, 3.75])
    assert mu.mass_near(0.0, 1e-9) == pytest.approx(0.25)
    assert mu.support() == (-1.0, 2.0)
    assert mu.summary() == {"max_ritz_value": 2.0, "min_ritz_value": -1.0, "negative_ritz_count": 1,
                            "negative_weight": 0.25, "normalised_trace": 0.75}


def test_average_of_start_vectors_is_the_mixture():
    a = SpectralMeasure(torch.tensor([0.0, 1.0]), torch.tensor([0.5, 0.5]))
    b = SpectralMeasure(torch.tensor([3.0]), torch.tensor([1.0]))
    avg = SpectralMeasure.average([a, b])
    assert avg.total_mass == pytest.approx(1.0)
    assert avg.moment(1) == pytest.approx(0.5 * 0.5 + 0.5 * 3.0)


def test_lanczos_average_over_vectors_matches_mean_of_quadratic_forms():
    a = wigner(80, seed=1)
    res = lanczos(lambda x: a @ x, 80, 10, num_vectors=4, seed=2)
    from curvature.lanczos import random_start_vectors
    v = random_start_vectors(80, 4, seed=2)
    mu = SpectralMeasure.from_lanczos(res)
    for k in range(1, 6):
        expected = float(torch.einsum("pi,pq,qi->i", v, torch.linalg.matrix_power(a, k), v).mean())
        assert mu.moment(k) == pytest.approx(expected, abs=1e-10)


def test_wasserstein_closed_forms():
    point = SpectralMeasure(torch.tensor([0.0]), torch.tensor([1.0]))
    other = SpectralMeasure(torch.tensor([3.0]), torch.tensor([1.0]))
    assert point.wasserstein(other) == pytest.approx(3.0)
    eig = torch.linspace(0, 1, 11, dtype=torch.float64)
    shifted = SpectralMeasure.from_eigenvalues(eig + 0.25)
    assert shifted.wasserstein(eig) == pytest.approx(0.25)  # a shift moves every atom by 0.25
    # half the mass moved by 2: W1 = 1
    two = SpectralMeasure(torch.tensor([0.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert point.wasserstein(two) == pytest.approx(1.0)
    assert two.wasserstein(two) == 0.0


def test_histogram_integrates_to_mass_and_counts_the_right_edge():
    mu = SpectralMeasure.from_eigenvalues(torch.tensor([0.0, 0.5, 1.0, 1.0]))
    edges, density = mu.histogram(bins=4, range=(0.0, 1.0))
    assert float((density * (edges[1:] - edges[:-1])).sum()) == pytest.approx(1.0)
    assert float(density[-1] * 0.25) == pytest.approx(0.5)


def test_gaussian_smoothing_adds_sigma_squared_to_the_second_moment():
    mu = SpectralMeasure(torch.tensor([-1.0, 0.0, 4.0]), torch.tensor([0.2, 0.5, 0.3], dtype=torch.float64))
    sigma = 0.3
    grid = torch.linspace(-8, 12, 20001, dtype=torch.float64)
    dens = mu.smooth(grid, sigma)
    dx = float(grid[1] - grid[0])
    assert float(dens.sum() * dx) == pytest.approx(1.0, abs=1e-8)
    m1 = float((dens * grid).sum() * dx)
    m2 = float((dens * grid ** 2).sum() * dx)
    assert m1 == pytest.approx(mu.moment(1), abs=1e-8)
    assert m2 == pytest.approx(mu.moment(2) + sigma ** 2, abs=1e-8)


def test_bandwidth_conversion_from_the_scaled_variance_convention():
    # variance v * max(1, range): range 40, v = 1e-5 -> std sqrt(4e-4) = 0.02
    assert sigma_from_scaled_variance(1e-5, -10.0, 30.0) == pytest.approx(0.02)
    assert sigma_from_scaled_variance(1e-4, 0.0, 0.5) == pytest.approx(0.01)  # range < 1: no scaling
    with pytest.raises(ValueError):
        sigma_from_scaled_variance(0.0, 0.0, 1.0)


def test_relative_moment_errors_are_relative_to_the_spectral_radius():
    eig = torch.tensor([-2.0, 0.0, 2.0], dtype=torch.float64)
    mu = SpectralMeasure(torch.tensor([-2.0, 2.0]), torch.tensor([0.5, 0.5]))
    err = relative_moment_errors(mu, eig, 4)
    assert err[1] == pytest.approx(0.0)
    assert err[2] == pytest.approx(abs(4.0 - 8.0 / 3.0) / 4.0)
    assert err[4] == pytest.approx(abs(16.0 - 32.0 / 3.0) / 16.0)
    assert not math.isnan(err[3])
