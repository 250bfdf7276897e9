"""Random matrices and their analytic laws."""

import pytest
import torch
from scipy import integrate

from curvature import random_matrices as rm


def test_semicircle_density_integrates_to_one_and_has_unit_variance():
    f = lambda x: float(rm.semicircle_density(torch.tensor(x)))  # noqa: E731
    assert integrate.quad(f, -2, 2)[0] == pytest.approx(1.0, abs=1e-8)
    assert integrate.quad(lambda x: x * x * f(x), -2, 2)[0] == pytest.approx(1.0, abs=1e-8)
    assert integrate.quad(lambda x: x ** 4 * f(x), -2, 2)[0] == pytest.approx(2.0, abs=1e-8)  # Catalan


@pytest.mark.parametrize("ratio", [0.25, 0.5, 1.0, 2.0, 4.0])
def test_marchenko_pastur_law_has_unit_mass_and_unit_mean(ratio):
    a, b = rm.marchenko_pastur_edges(ratio)
    f = lambda x: float(rm.marchenko_pastur_density(torch.tensor(x), ratio))  # noqa: E731
    mass = integrate.quad(f, a, b, limit=200)[0]
    assert mass + rm.marchenko_pastur_atom(ratio) == pytest.approx(1.0, abs=1e-6)
    assert integrate.quad(lambda x: x * f(x), a, b, limit=200)[0] == pytest.approx(1.0, abs=1e-6)


def test_wigner_is_symmetric_seeded_and_follows_the_semicircle():
    a = rm.wigner(600, seed=4)
    assert torch.equal(a, a.T) and torch.equal(a, rm.wigner(600, seed=4))
    assert not torch.equal(a, rm.wigner(600, seed=5))
    eig = torch.linalg.eigvalsh(a)
    assert float((eig ** 2).mean()) == pytest.approx(1.0, abs=0.05)
    assert float(eig.abs().max()) == pytest.approx(2.0, abs=0.1)


def test_marchenko_pastur_rank_deficient_has_exact_zero_fraction():
    a = rm.marchenko_pastur(400, ratio=2.0, seed=0)
    eig = torch.linalg.eigvalsh(a)
    assert int((eig.abs() < 1e-10 * eig.max()).sum()) == 200
    full = torch.linalg.eigvalsh(rm.marchenko_pastur(400, ratio=0.5, seed=0))
    lo, hi = rm.marchenko_pastur_edges(0.5)
    assert float(full.min()) == pytest.approx(lo, abs=0.05) and float(full.max()) == pytest.approx(hi, abs=0.15)
    with pytest.raises(ValueError):
        rm.marchenko_pastur(10, ratio=0.0)
    with pytest.raises(ValueError):
        rm.wigner(-3)


def test_synthetic_spectrum_has_exactly_the_constructed_eigenvalues():
    eig = rm.synthetic_spectrum_eigenvalues(300, seed=2)
    a = rm.synthetic_spectrum(300, seed=2)
    assert torch.allclose(torch.linalg.eigvalsh(a), eig, atol=1e-10)
    assert int((eig == 0).sum()) == 150
    assert int((eig >= 20).sum()) == 5 and int((eig < -1.9).sum()) == 3
    skew = rm.synthetic_spectrum_eigenvalues(1000, bulk_shape="skewed", seed=0)
    bulk = skew[(skew > 0) & (skew <= 5)]
    assert float(bulk.mean()) < 2.0  # right-skewed: mass near the low end, mean 5/4 for u^3


def test_haar_orthogonal_is_orthogonal():
    q = rm.haar_orthogonal(50, seed=1)
    assert torch.allclose(q.T @ q, torch.eye(50, dtype=torch.float64), atol=1e-12)
