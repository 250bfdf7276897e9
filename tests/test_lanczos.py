"""Lanczos against exact answers: Gauss quadrature moments, full recovery, orthogonality, bounds."""

import pytest
import torch

from curvature.lanczos import lanczos, random_start_vectors as start_vectors
from curvature.random_matrices import synthetic_spectrum, wigner
from curvature.spectrum import SpectralMeasure
from tests.conftest import DEVICES


def _matrix(n=120, seed=3):
    return wigner(n, seed=seed)


def _moment_exact(a, v, k):
    return float(v @ torch.linalg.matrix_power(a, k) @ v)


@pytest.mark.parametrize("device", DEVICES)
def test_gauss_quadrature_moments_match_quadratic_forms(device):
    a = _matrix()
    m = 12
    res = lanczos(lambda x: a.to(device) @ x, a.shape[0], m, seed=5, device=device)
    v = start_vectors(a.shape[0], 1, seed=5)[:, 0]
    measure = SpectralMeasure.from_lanczos(res)
    assert res.ritz_values.shape == (1, m) and res.tridiagonal.shape == (1, m, m)
    for k in range(2 * m):  # exact for k = 0 .. 2m-1
        assert measure.moment(k) == pytest.approx(_moment_exact(a, v, k), abs=1e-8, rel=1e-8)
    # ... and not beyond: moment 2m generally differs (a test that could fail if we cheated)
    assert abs(measure.moment(2 * m) - _moment_exact(a, v, 2 * m)) > 1e-8


def test_full_steps_recover_every_eigenvalue():
    a = synthetic_spectrum(60, seed=1, zero_fraction=0.0)  # distinct eigenvalues
    exact = torch.linalg.eigvalsh(a)
    res = lanczos(lambda x: a @ x, 60, 60, seed=2)
    assert int(res.num_steps[0]) == 60
    assert torch.allclose(res.ritz_values[0], exact, atol=1e-8)
    assert float(res.final_beta[0]) == 0.0


def test_basis_orthonormal_ritz_values_inside_spectrum_and_residual_bounds_exact():
    a = _matrix(200)
    exact = torch.linalg.eigvalsh(a)
    res = lanczos(lambda x: a @ x, 200, 25, num_vectors=2, seed=0, return_vectors=True,
                  return_basis=True)
    for i in range(2):
        q = res.basis[i]
        assert torch.allclose(q.T @ q, torch.eye(25, dtype=q.dtype), atol=1e-6)
        assert res.ritz_values[i].min() >= exact.min() - 1e-10
        assert res.ritz_values[i].max() <= exact.max() + 1e-10
        assert torch.all(res.ritz_values[i][1:] >= res.ritz_values[i][:-1])  # ascending
        assert res.ritz_weights[i].sum() == pytest.approx(1.0, abs=1e-12)
        # ||A y - theta y|| = |beta_m s_m| for every Ritz pair (Paige)
        y = res.ritz_vectors[i]  # (m, P)
        resid = (a @ y.T - y.T * res.ritz_values[i]).norm(dim=0)
        assert torch.allclose(resid, res.residual_bounds[i], atol=1e-7)


def test_truncated_equals_a_shorter_run():
    a = _matrix(150)
    long = lanczos(lambda x: a @ x, 150, 30, num_vectors=2, seed=4)
    short = lanczos(lambda x: a @ x, 150, 10, num_vectors=2, seed=4)
    cut = long.truncated(10)
    assert torch.allclose(cut.tridiagonal, short.tridiagonal, atol=1e-10)
    assert torch.allclose(cut.ritz_weights, short.ritz_weights, atol=1e-10)
    assert torch.allclose(cut.residual_bounds, short.residual_bounds, atol=1e-8)


def test_invariant_subspace_terminates_early_with_the_exact_measure():
    # Three distinct eigenvalues: the Krylov space is invariant after three steps.
    eig = torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64).repeat(20)
    a = torch.diag(eig)
    v = start_vectors(60, 1, seed=9)[:, 0]
    res = lanczos(lambda x: a @ x, 60, 30, start_vectors=v.unsqueeze(1))
    assert int(res.num_steps[0]) == 3 and res.ritz_values.shape == (1, 3)
    assert torch.allclose(res.ritz_values[0], torch.tensor([-1.0, 2.0, 5.0], dtype=torch.float64),
                          atol=1e-10)
    expected = torch.stack([(v[eig == e] ** 2).sum() for e in (-1.0, 2.0, 5.0)])
    assert torch.allclose(res.ritz_weights[0], expected, atol=1e-10)
    assert any("invariant" in n for n in res.notes)


def test_tiny_operator_is_scaled_not_stopped_after_one_step():
    # Eigenvalues ~1e-8: GPyTorch alone stops after one step (absolute 1e-6 beta threshold).
    a = _matrix(100) * 1e-8
    res = lanczos(lambda x: a @ x, 100, 15, seed=1)
    assert int(res.num_steps[0]) == 15
    ref = lanczos(lambda x: (a * 1e8) @ x, 100, 15, seed=1)
    assert torch.allclose(res.ritz_values * 1e8, ref.ritz_values, rtol=1e-8)
    assert any("scale" in n for n in res.notes)


def test_vectors_terminating_at_different_steps_are_padded_with_zero_weight():
    eig = torch.arange(1.0, 41.0, dtype=torch.float64)
    a = torch.diag(eig)
    v = torch.zeros(40, 2, dtype=torch.float64)
    v[:2, 0] = 1.0                   # lives in a 2-dimensional invariant subspace
    v[:, 1] = start_vectors(40, 1, seed=0)[:, 0]
    res = lanczos(lambda x: a @ x, 40, 8, start_vectors=v)
    assert res.num_steps.tolist() == [2, 8]
    assert res.mask[0].tolist() == [True, True] + [False] * 6
    assert torch.all(res.ritz_weights[0, 2:] == 0)
    assert torch.allclose(res.ritz_values[0, :2], torch.tensor([1.0, 2.0], dtype=torch.float64))
    measure = SpectralMeasure.from_lanczos(res, vector=0)
    assert measure.nodes.numel() == 2 and measure.total_mass == pytest.approx(1.0)


def test_start_vector_in_the_null_space_beside_a_generic_one():
    a = torch.diag(torch.cat([torch.zeros(10), torch.arange(1.0, 31.0)]).double())
    v = torch.zeros(40, 2, dtype=torch.float64)
    v[:10, 0] = 1.0                   # A v = 0
    v[:, 1] = start_vectors(40, 1, seed=2)[:, 0]
    res = lanczos(lambda x: a @ x, 40, 6, start_vectors=v)
    assert res.num_steps.tolist() == [1, 6]
    assert res.ritz_values[0, 0] == 0.0 and res.ritz_weights[0, 0] == 1.0
    alone = lanczos(lambda x: a @ x, 40, 6, start_vectors=v[:, 1:])
    assert torch.allclose(res.tridiagonal[1], alone.tridiagonal[0], atol=1e-10)


def test_zero_operator_and_one_dimensional_operator():
    res = lanczos(lambda x: 0 * x, 10, 5)
    assert res.ritz_values.tolist() == [[0.0]] and res.ritz_weights.tolist() == [[1.0]]
    res = lanczos(lambda x: 3.0 * x, 1, 4, return_vectors=True)
    assert res.ritz_values.tolist() == [[3.0]] and res.ritz_vectors.abs().tolist() == [[[1.0]]]


def test_float32_and_vector_only_closures():
    a = _matrix(100)
    a32 = a.float()
    res32 = lanczos(lambda x: a32 @ x, 100, 10, dtype=torch.float32, seed=3)
    res64 = lanczos(lambda x: a @ x, 100, 10, seed=3)
    assert torch.allclose(res32.ritz_values, res64.ritz_values, atol=1e-4)

    def vector_only(x):  # a closure that only accepts (dim,) vectors
        if x.dim() != 1:
            raise RuntimeError("vectors only")
        return a @ x
    res = lanczos(vector_only, 100, 10, num_vectors=3, seed=3)
    batched = lanczos(lambda x: a @ x, 100, 10, num_vectors=3, seed=3)
    assert torch.allclose(res.tridiagonal, batched.tridiagonal, atol=1e-10)


def test_start_vectors_are_seeded_unit_and_independent_of_matrix_streams():
    g = start_vectors(500, 2, seed=0)
    assert torch.allclose(g.norm(dim=0), torch.ones(2, dtype=torch.float64))
    assert torch.equal(g, start_vectors(500, 2, seed=0))
    assert not torch.equal(g, start_vectors(500, 2, seed=1))
    r = start_vectors(400, 1, kind="rademacher", seed=0)
    assert torch.allclose(r.abs(), torch.full_like(r, 400 ** -0.5))
    # Same seed as the matrix, yet unrelated to its rows (a shared stream would make v a row of G).
    a = wigner(500, seed=0)
    assert abs(float(g[:, 0] @ a @ a @ g[:, 0]) - float((a * a).sum() / 500)) < 0.3


def test_bad_arguments_raise():
    with pytest.raises(ValueError):
        lanczos(lambda x: x, 10, 0)
    with pytest.raises(ValueError):
        lanczos(lambda x: x, 10, 3, start_vectors=torch.zeros(10, 1, dtype=torch.float64))
    with pytest.raises(FloatingPointError):
        lanczos(lambda x: x * float("nan"), 10, 3)
