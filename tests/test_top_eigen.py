"""Top-k eigenpairs to a tolerance: Lanczos with locking and power iteration against dense eigh (float64)."""

import json

import pytest
import torch

from curvature.data import load_splits
from curvature.dense import operator_matrix
from curvature.errors import SuiteError
from curvature.models import get_model
from curvature.operators import GGNOperator, HessianOperator, get_loss
from curvature.top_eigen import power_iteration, select, top_eigenpairs
from experiments.run import dispatch
from tests.conftest import make_cfg


def rotated(eigenvalues, seed: int = 0) -> torch.Tensor:
    """Q diag(eigenvalues) Q^T with a seeded random orthogonal Q."""
    values = torch.as_tensor(eigenvalues, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(len(values), len(values), generator=gen, dtype=torch.float64))
    return (q * values) @ q.T


def _bulk(n, low, high, seed):
    gen = torch.Generator().manual_seed(seed)
    return low + (high - low) * torch.rand(n, generator=gen, dtype=torch.float64)


SPECTRA = {  # name: eigenvalues (the fig6-like one: outliers both sides of a bulk with an atom at 0)
    "indefinite": torch.cat([torch.tensor([60., 45., 30., 25., 20., -3., -7., -10.]), torch.zeros(100),
                             _bulk(192, 0, 5, 1)]),
    "clustered": torch.cat([torch.tensor([10., 10 - 1e-3, 10 - 2e-3, 9.]), _bulk(196, -8, 8, 2)]),
    "degenerate": torch.cat([torch.tensor([10., 10., 10., 8., 8., 7.]), _bulk(194, -5, 5, 3)]),
}
CASES = [  # spectrum, which, k, block_size
    ("indefinite", "largest", 5, 1), ("indefinite", "smallest", 3, 1), ("indefinite", "both", 6, 1),
    ("indefinite", "magnitude", 4, 1), ("clustered", "largest", 3, 1), ("clustered", "smallest", 2, 2),
    ("degenerate", "largest", 6, 3),
]
TOL = 1e-8


def _assert_pairs(A, exact_values, exact_vectors, result, which, k, tol):
    """Eigenvalues to tol; residuals <= tol and equal to ||Au - lambda u|| / |lambda| recomputed here;
    orthonormal vectors; |u^T v| ~ 1 for the wanted eigenvalues that are simple."""
    wanted = select(exact_values, which, k)
    torch.testing.assert_close(result.eigenvalues, wanted, rtol=tol, atol=tol * float(exact_values.abs().max()))
    u, lam = result.eigenvectors, result.eigenvalues
    recomputed = (A @ u - u * lam).norm(dim=0) / lam.abs().clamp(min=result.residual_floor)
    torch.testing.assert_close(result.residuals, recomputed, rtol=1e-6, atol=1e-14)
    assert bool(result.converged.all()) and float(result.residuals.max()) <= tol
    torch.testing.assert_close(u.T @ u, torch.eye(k, dtype=u.dtype), rtol=0, atol=1e-8)
    for i, value in enumerate(lam.tolist()):
        close = (exact_values - value).abs() <= 1e-6 * float(exact_values.abs().max())
        if int(close.sum()) == 1:
            overlap = float((exact_vectors[:, close].squeeze(1) @ u[:, i]).abs())
            assert overlap == pytest.approx(1.0, abs=1e-6)
        else:  # a repeated eigenvalue: u lies in its eigenspace
            basis = exact_vectors[:, close]
            assert float((basis @ (basis.T @ u[:, i])).norm()) == pytest.approx(1.0, abs=1e-6)


@pytest.mark.parametrize("spectrum,which,k,block_size", CASES)
def test_lanczos_finds_the_dense_eigenpairs(spectrum, which, k, block_size):
    A = rotated(SPECTRA[spectrum], seed=len(spectrum))
    values, vectors = torch.linalg.eigh(A)
    result = top_eigenpairs(A, k, which=which, tol=TOL, block_size=block_size, seed=0)
    _assert_pairs(A, values, vectors, result, which, k, TOL)
    assert result.verification_matvecs == k and result.num_matvecs < 2000


def test_single_vector_lanczos_on_a_repeated_eigenvalue_is_only_as_good_as_rounding():
    """One start vector spans one direction per eigenspace in exact arithmetic: block_size is the remedy.
    What a block-1 run returns is still a set of true eigenpairs, each verified."""
    A = rotated(SPECTRA["degenerate"], seed=10)
    result = top_eigenpairs(A, 4, tol=TOL, block_size=1)
    exact = torch.linalg.eigvalsh(A)
    for value, residual in zip(result.eigenvalues.tolist(), result.residuals.tolist()):
        assert float((exact - value).abs().min()) <= 1e-6 and residual <= TOL


def test_a_budget_too_small_reports_what_did_not_converge():
    A = rotated(SPECTRA["clustered"], seed=1)
    result = top_eigenpairs(A, 3, tol=1e-10, max_matvecs=8)
    assert result.num_matvecs <= 8 + 1 and not result.all_converged
    assert result.notes and "above tol" in result.notes[-1]
    u, lam = result.eigenvectors, result.eigenvalues
    recomputed = (A @ u - u * lam).norm(dim=0) / lam.abs()
    torch.testing.assert_close(result.residuals, recomputed, rtol=1e-6, atol=1e-14)


def test_callable_and_float32_operators():
    A = rotated(SPECTRA["indefinite"], seed=3)
    from_closure = top_eigenpairs(lambda x: A @ x, 3, tol=1e-6, dim=A.shape[0])
    torch.testing.assert_close(from_closure.eigenvalues, select(torch.linalg.eigvalsh(A), "largest", 3),
                               rtol=1e-6, atol=0)
    single = top_eigenpairs(A.float(), 3, tol=1e-4)
    assert single.eigenvectors.dtype == torch.float32 and single.all_converged
    torch.testing.assert_close(single.eigenvalues, from_closure.eigenvalues, rtol=1e-4, atol=0)
    with pytest.raises(ValueError, match="which"):
        top_eigenpairs(A, 3, which="top")


def test_power_iteration_finds_the_same_top_eigenvalues():
    A = rotated(SPECTRA["indefinite"], seed=4)
    exact = torch.linalg.eigvalsh(A)
    power = power_iteration(A, 3, tol=1e-7, max_iter=3000, criterion="residual")
    assert power.verification_matvecs == 0 and bool(power.converged[0])
    torch.testing.assert_close(power.eigenvalues, select(exact, "magnitude", 3), rtol=1e-7, atol=0)
    u, lam = power.eigenvectors, power.eigenvalues
    torch.testing.assert_close(power.residuals, (A @ u - u * lam).norm(dim=0) / lam.abs(), rtol=1e-6, atol=1e-14)
    # deflation against pairs accurate only to tol floors the later residuals near tol |lambda_1 / lambda_i|
    assert float(power.residuals.max()) <= 1e-7 * 60 / 30 and power.num_matvecs < 3 * 3000
    lanczos = top_eigenpairs(A, 3, tol=1e-7)
    assert lanczos.num_matvecs + lanczos.verification_matvecs < power.num_matvecs
    # PyHessian's own rule (relative eigenvalue change < tol) stops with residuals well above tol
    pyhessian = power_iteration(A, 3, tol=1e-3, criterion="eigenvalue")
    assert float(pyhessian.residuals.max()) > 1e-3 and pyhessian.num_matvecs < power.num_matvecs


@pytest.fixture(scope="module")
def tiny_network():
    """A digits MLP (310 parameters, 128 images) and its dense Hessian and GGN, built once.

    The dense matrices come from the operators' products with unit vectors (operator_matrix): the
    operators themselves are checked against curvature.dense's builders in tests/test_operators.py;
    here the eigen-solvers are under test."""
    torch.manual_seed(0)
    model = get_model("mlp", 10, hidden=[4]).double()
    batches = list(load_splits("digits", num_subsamples=128, seed=0).train.batches(64, dtype=torch.float64))
    loss = get_loss("cross_entropy")
    operators = {"hessian": HessianOperator(model, loss, batches, check_deterministic=False),
                 "ggn": GGNOperator(model, loss, batches, check_deterministic=False)}
    return operators, {kind: operator_matrix(op, chunk=64) for kind, op in operators.items()}


@pytest.mark.parametrize("kind,which,k", [("hessian", "largest", 4), ("hessian", "smallest", 3),
                                         ("hessian", "both", 4), ("ggn", "largest", 4)])
def test_network_operators_against_their_dense_matrices(tiny_network, kind, which, k):
    operators, dense = tiny_network
    operator = operators[kind]
    values, vectors = torch.linalg.eigh(dense[kind])
    result = top_eigenpairs(operator, k, which=which, tol=1e-6, seed=1)
    _assert_pairs(dense[kind], values, vectors, result, which, k, 1e-6)
    if (kind, which) == ("hessian", "largest"):
        power = power_iteration(operator, 2, tol=1e-6, max_iter=500, criterion="residual")
        torch.testing.assert_close(power.eigenvalues, result.eigenvalues[:2], rtol=1e-6, atol=0)


SMALL = ["analysis=top_eigen", "dataset=digits", "model=mlp", "model.hidden=[4]", "dataset.num_subsamples=128",
         "operator.batch_size=64", "analysis.k=2", "analysis.tol=1e-4", "analysis.power_max_iter=300",
         "analysis.baseline=true"]


def test_cli_run_writes_both_methods_and_the_exact_check(tmp_path):
    results = dispatch(make_cfg(tmp_path, SMALL))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["all_checks_passed"] and saved["config"]["analysis"]["name"] == "top_eigen"
    expected = {"hessian_lanczos_converged", "hessian_matches_exact", "hessian_power_matches_lanczos"}
    assert expected <= set(saved["checks"])
    rows = {row["method"]: row for row in saved["tables"]["methods"]}
    assert set(rows) == {"lanczos", "power_iteration[residual]"}
    for row in rows.values():
        assert len(row["eigenvalues"]) == 2 and max(row["residual_estimates"]) <= 1e-4
        assert row["num_matvecs"] > 0 and row["seconds"] > 0 and row["num_params"] == 310
    assert rows["lanczos"]["verification_matvecs"] == 2
    m = results["metrics"]
    assert m["hessian_lanczos_products"] < m["hessian_power_iteration_products"]
    assert "commit" in saved["provenance"]


def test_cli_rejects_a_bad_which(tmp_path):
    with pytest.raises(SuiteError, match="analysis.which"):
        dispatch(make_cfg(tmp_path, SMALL + ["analysis.which=top"]))
