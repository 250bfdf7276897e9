"""The native Lanczos engine: same tridiagonal as GPyTorch's, checkpoints, exact resume, NaN steps."""

import pytest
import torch

from curvature.errors import SuiteError
from curvature.lanczos import LanczosNumericalError, lanczos
from curvature.random_matrices import marchenko_pastur, wigner
from tests.conftest import DEVICES


def _both(matvec, dim, steps, **kw):
    return (lanczos(matvec, dim, steps, engine="gpytorch", **kw),
            lanczos(matvec, dim, steps, engine="native", **kw))


def _diag_with_null_space():
    a = torch.diag(torch.cat([torch.zeros(10), torch.arange(1.0, 31.0)]).double())
    v = torch.zeros(40, 2, dtype=torch.float64)
    v[:10, 0] = 1.0                                       # A v = 0: stops after one step
    v[:, 1] = torch.linspace(-1, 1, 40, dtype=torch.float64) + 0.3
    return a, v


CASES = {
    "wigner_one_vector": lambda: (wigner(300, seed=1), 60, {"seed": 2}),
    "wigner_three_vectors": lambda: (wigner(300, seed=1), 40, {"num_vectors": 3, "seed": 5}),
    "rank_deficient_mp": lambda: (marchenko_pastur(200, 0.5, seed=0), 50, {"seed": 1}),
    "tiny_scale": lambda: (wigner(150, seed=3) * 1e-9, 30, {"seed": 1}),
    "more_steps_than_dim": lambda: (torch.diag(torch.arange(1.0, 41.0).double()), 60, {"seed": 1}),
    "invariant_beside_generic": lambda: (_diag_with_null_space()[0], 8,
                                         {"start_vectors": _diag_with_null_space()[1]}),
}


@pytest.mark.parametrize("case", list(CASES))
def test_native_engine_gives_gpytorchs_tridiagonal(case):
    a, steps, kw = CASES[case]()
    ref, ours = _both(lambda x: a @ x, a.shape[0], steps, **kw)
    assert ours.num_steps.tolist() == ref.num_steps.tolist()
    scale = float(torch.linalg.matrix_norm(a, 2))
    assert torch.allclose(ours.tridiagonal, ref.tridiagonal, rtol=0, atol=1e-10 * scale)
    assert torch.allclose(ours.ritz_weights, ref.ritz_weights, rtol=0, atol=1e-10)
    assert torch.allclose(ours.final_beta, ref.final_beta, rtol=0, atol=1e-6 * scale)
    assert torch.equal(ours.mask, ref.mask)
    assert [n for n in ours.notes] == [n for n in ref.notes]


def test_native_basis_is_orthonormal_and_costs_m_products():
    a = wigner(200, seed=0)
    calls = []

    def matvec(x):
        calls.append(x.shape)
        return a @ x
    res = lanczos(matvec, 200, 50, num_vectors=2, engine="native", return_basis=True, return_vectors=True)
    assert len(calls) == 50 and all(c == (200, 2) for c in calls)
    for i in range(2):
        q = res.basis[i]
        assert torch.allclose(q.T @ q, torch.eye(50, dtype=torch.float64), atol=1e-12)
        assert torch.allclose(q.T @ a @ q, res.tridiagonal[i], atol=1e-10)
    # converged Ritz pairs satisfy A y = theta y to their residual bound
    top = res.ritz_vectors[0, -1]
    assert float((a @ top - res.ritz_values[0, -1] * top).norm()) <= float(res.residual_bounds[0, -1]) + 1e-10


@pytest.mark.parametrize("device", DEVICES)
def test_resume_from_every_checkpoint_reproduces_the_uninterrupted_run(device):
    a = wigner(250, seed=4).to(device)
    states = []
    full = lanczos(lambda x: a @ x, 250, 40, num_vectors=2, seed=3, device=device, engine="native",
                   checkpoint=lambda s: states.append(s), checkpoint_every=7)
    assert [s["step"] for s in states] == [7, 14, 21, 28, 35, 40]  # every 7 steps and at the end
    for state in states[:-1]:
        calls = []

        def counted(x):
            calls.append(1)
            return a @ x
        resumed = lanczos(counted, 250, 40, num_vectors=2, seed=3, device=device, engine="native",
                          resume_state=state)
        assert len(calls) == 40 - state["step"]              # only the remaining steps
        assert torch.allclose(resumed.tridiagonal, full.tridiagonal, rtol=0, atol=1e-10)
        assert torch.allclose(resumed.final_beta, full.final_beta, rtol=0, atol=1e-10)
        assert any("resumed" in n for n in resumed.notes)


def test_resume_from_a_file_extends_a_finished_run_and_truncates_a_longer_one(tmp_path):
    a = wigner(200, seed=6)
    path = tmp_path / "state.pt"
    lanczos(lambda x: a @ x, 200, 20, seed=1, engine="native", checkpoint=path, checkpoint_every=5)
    longer = lanczos(lambda x: a @ x, 200, 35, seed=1, engine="native", resume_state=path)
    assert torch.allclose(longer.tridiagonal, lanczos(lambda x: a @ x, 200, 35, seed=1).tridiagonal, atol=1e-10)
    shorter = lanczos(lambda x: a @ x, 200, 12, seed=1, engine="native", resume_state=path)
    assert torch.allclose(shorter.tridiagonal, lanczos(lambda x: a @ x, 200, 12, seed=1).tridiagonal, atol=1e-10)


def test_a_state_that_does_not_fit_is_refused_in_one_line(tmp_path):
    a = wigner(100, seed=0)
    path = tmp_path / "state.pt"
    lanczos(lambda x: a @ x, 100, 10, seed=1, engine="native", checkpoint=path, checkpoint_every=5)
    with pytest.raises(SuiteError, match="other start vectors"):
        lanczos(lambda x: a @ x, 100, 10, seed=2, engine="native", resume_state=path)
    with pytest.raises(SuiteError, match="dim=100"):
        lanczos(lambda x: x, 90, 10, seed=1, engine="native", resume_state=path)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(path.read_bytes()[:500])
    with pytest.raises(SuiteError, match="truncated.pt is not a readable Lanczos state"):
        lanczos(lambda x: a @ x, 100, 10, seed=1, engine="native", resume_state=truncated)
    with pytest.raises(ValueError, match="native"):
        lanczos(lambda x: a @ x, 100, 10, engine="gpytorch", checkpoint=path, checkpoint_every=5)


@pytest.mark.parametrize("engine", ["native", "gpytorch"])
def test_nan_product_names_the_step_and_keeps_the_completed_steps(engine):
    a = wigner(120, seed=2)
    calls = []

    def poisoned(x):
        calls.append(1)
        return a @ x if len(calls) <= 6 else a @ x * float("nan")
    with pytest.raises(LanczosNumericalError, match="Lanczos step 6") as info:
        lanczos(poisoned, 120, 20, seed=0, engine=engine)
    assert info.value.step == 6
    if engine == "native":  # the six steps done before the bad product, equal to a clean run's
        clean = lanczos(lambda x: a @ x, 120, 20, seed=0, engine="native")
        assert int(info.value.partial.num_steps[0]) == 6
        assert torch.allclose(info.value.partial.tridiagonal[0], clean.tridiagonal[0, :6, :6], atol=1e-12)
