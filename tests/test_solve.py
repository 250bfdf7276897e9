"""CG and MINRES against ``torch.linalg.solve`` of dense matrices, and of a small model's GGN / Hessian."""

import pytest
import torch
import torch.nn.functional as F

from curvature.dense import dense_ggn, dense_hessian
from curvature.errors import SuiteError
from curvature.operators import GGNOperator, HessianOperator
from curvature.solve import solve
from tests.cases import build, data, tiny_mlp
from tests.conftest import DEVICES

close = torch.testing.assert_close


def spectrum_matrix(eigenvalues, seed=0, device="cpu"):
    """``Q diag(eigenvalues) Q^T`` with a random orthogonal ``Q`` (float64)."""
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    a = q @ torch.diag(torch.as_tensor(eigenvalues, dtype=torch.float64)) @ q.T
    return (0.5 * (a + a.T)).to(device)


def rhs(n, k=None, seed=1, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, *(() if k is None else (k,)), generator=gen, dtype=torch.float64).to(device)


def relative_error(x, truth):
    return float((x - truth).norm() / truth.norm())


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("method", ["cg", "minres", "auto"])
def test_spd_matrix(method, device):
    a = spectrum_matrix(torch.linspace(0.5, 20.0, 60), device=device)
    b = rhs(60, 3, device=device)
    result = solve(a, b, tol=1e-10, method=method)
    assert result.converged and result.x.shape == (60, 3)
    assert result.method == ("minres" if method == "auto" else method)  # a dense tensor: definiteness unknown
    assert relative_error(result.x, torch.linalg.solve(a, b)) < 1e-8
    assert max(result.residual_norm) < 1e-9
    assert result.num_matvecs == result.iterations + 1  # one block product per step, one for the residual


def test_indefinite_matrix_minres_solves_and_cg_says_why_not():
    eigenvalues = torch.cat([torch.linspace(-5.0, -0.3, 20), torch.linspace(0.2, 8.0, 30)])
    a, b = spectrum_matrix(eigenvalues, seed=2), rhs(50, seed=3)
    result = solve(a, b, tol=1e-10, method="minres")
    assert result.converged and isinstance(result.residual_norm, float) and result.x.shape == (50,)
    assert relative_error(result.x, torch.linalg.solve(a, b)) < 1e-8
    cg = solve(a, b, tol=1e-10, method="cg")
    assert not cg.converged or relative_error(cg.x, torch.linalg.solve(a, b)) < 1e-6
    if not cg.converged:
        assert any("not positive definite" in note for note in cg.notes)


@pytest.mark.parametrize("method", ["cg", "minres"])
def test_ill_conditioned_matrix_with_damping(method):
    eigenvalues = torch.logspace(-10, 2, 40)  # condition 1e12; damping 1e-2 brings it to 1e4
    a, b = spectrum_matrix(eigenvalues, seed=4), rhs(40, 2, seed=5)
    result = solve(a, b, damping=1e-2, tol=1e-10, method=method)
    truth = torch.linalg.solve(a + 1e-2 * torch.eye(40, dtype=torch.float64), b)
    assert result.converged
    assert relative_error(result.x, truth) < 1e-7


def test_callable_zero_column_and_max_iter():
    a = spectrum_matrix(torch.linspace(1.0, 100.0, 30), seed=6)
    b = rhs(30, 2, seed=7)
    b[:, 1] = 0.0
    result = solve(lambda v: a @ v, b, tol=1e-10)
    assert result.converged and torch.equal(result.x[:, 1], torch.zeros(30, dtype=torch.float64))
    close(result.x[:, 0], torch.linalg.solve(a, b[:, 0]), rtol=1e-7, atol=1e-10)
    short = solve(a, b[:, 0], tol=1e-12, max_iter=3, method="cg")
    assert not short.converged and short.iterations == 3 and any("max_iter" in n for n in short.notes)
    with pytest.raises(SuiteError, match="method"):
        solve(a, b, method="lu")
    with pytest.raises(SuiteError, match="shape"):
        solve(a, rhs(31))


@pytest.mark.parametrize("device", DEVICES)
def test_ggn_and_hessian_of_a_model_with_damping_against_dense_solves(device):
    model, batches = build(tiny_mlp, device), data(device)
    damping = 0.1
    ggn = GGNOperator(model, F.cross_entropy, batches, bn_mode="eval")
    hessian = HessianOperator(model, F.cross_entropy, batches, bn_mode="eval")
    b = rhs(ggn.num_params, 2, seed=8, device=device)
    eye = torch.eye(ggn.num_params, dtype=torch.float64, device=device)

    g = dense_ggn(model, F.cross_entropy, batches, "eval")
    result = solve(ggn, b, damping=damping, tol=1e-10)
    assert result.method == "cg" and result.converged
    assert relative_error(result.x, torch.linalg.solve(g + damping * eye, b)) < 1e-7

    h = dense_hessian(model, F.cross_entropy, batches, "eval")
    assert torch.linalg.eigvalsh(h + damping * eye).min() < -0.1  # still indefinite: CG would not do
    result = solve(hessian.matvec, b, damping=damping, tol=1e-10)  # a bound matvec: the operator's type decides
    assert result.method == "minres" and result.converged
    assert relative_error(result.x, torch.linalg.solve(h + damping * eye, b)) < 1e-7
