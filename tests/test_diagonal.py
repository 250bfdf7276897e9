"""Diagonal approximations against exact answers (float64), and the fig5 / fig6 checks at reduced size."""

import pytest
import torch

from curvature import diagonal as D
from curvature.dense import dense_ggn, dense_hessian
from curvature.errors import SuiteError
from curvature.operators import get_loss, make_operator
from experiments import validate as V
from experiments.run import dispatch
from tests.conftest import make_cfg, run_cli
from tests.test_operators import build, data, tiny_cnn, tiny_mlp

GGN_CASES = [(maker, loss, bn) for maker in (tiny_mlp, tiny_cnn) for loss in ("cross_entropy", "mse")
             for bn in ("train", "eval")]


@pytest.mark.parametrize("maker,loss,bn_mode", GGN_CASES)
def test_exact_ggn_diagonal_equals_the_dense_ggn_diagonal(maker, loss, bn_mode):
    # tiny_cnn has BatchNorm: "train" exercises the coupled (batch pullback) path, "eval" the vmap one
    model, batches, loss_fn = build(maker, "cpu"), data("cpu"), get_loss(loss)
    exact = torch.diagonal(dense_ggn(model, loss_fn, batches, bn_mode))
    diagonal = D.ggn_diagonal(model, loss_fn, batches, bn_mode, chunk_size=4)
    assert diagonal.dtype == torch.float64
    assert torch.allclose(diagonal, exact, atol=1e-12, rtol=1e-9)


@pytest.mark.parametrize("maker,loss,bn_mode", [(tiny_cnn, "cross_entropy", "train")])
def test_exact_hessian_diagonal_equals_the_dense_hessian_diagonal(maker, loss, bn_mode):
    model, batches, loss_fn = build(maker, "cpu"), data("cpu"), get_loss(loss)
    exact = torch.diagonal(dense_hessian(model, loss_fn, batches, bn_mode))
    assert torch.allclose(D.hessian_diagonal(model, loss_fn, batches, bn_mode), exact, atol=1e-12, rtol=1e-9)
    assert (exact < 0).any()  # a real test: the Hessian diagonal is not the (non-negative) GGN's


def _within_standard_errors(estimate, exact, k=5.0):
    # Entries with zero variance (parameters BatchNorm makes irrelevant) are compared up to rounding.
    gap = (estimate.mean - exact).abs()
    return bool((gap <= k * estimate.std_error + 1e-10 * exact.abs().max()).all())


@pytest.mark.parametrize("maker,loss,bn_mode", [(tiny_mlp, "cross_entropy", "eval"),
                                                (tiny_cnn, "cross_entropy", "train"),
                                                (tiny_mlp, "mse", "eval")])
def test_mc_ggn_diagonal_is_unbiased_within_its_standard_errors(maker, loss, bn_mode):
    model, batches, loss_fn = build(maker, "cpu"), data("cpu"), get_loss(loss)
    exact = D.ggn_diagonal(model, loss_fn, batches, bn_mode)
    estimate = D.mc_ggn_diagonal(model, loss_fn, batches, num_samples=100, bn_mode=bn_mode, seed=3)
    assert estimate.num_samples == 100 and estimate.mean.shape == exact.shape
    assert _within_standard_errors(estimate, exact)
    # and it is an estimate, not the exact answer by another route
    assert (estimate.mean - exact).abs().max() > 1e-6 * exact.abs().max()


@pytest.mark.parametrize("name", ["ggn", "hessian"])
def test_hutchinson_diagonal_is_unbiased_within_its_standard_errors(name):
    model, batches, loss_fn = build(tiny_mlp, "cpu"), data("cpu"), get_loss("cross_entropy")
    op = make_operator(name, model, loss_fn, batches, bn_mode="eval")
    exact = torch.diagonal((dense_ggn if name == "ggn" else dense_hessian)(model, loss_fn, batches, "eval"))
    estimate = D.hutchinson_diagonal(op, op.num_params, num_samples=150, block_size=50, seed=1)
    assert _within_standard_errors(estimate, exact)


def test_hutchinson_on_a_matrix_and_the_matrix_diagonal():
    a = torch.randn(30, 30, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    a = a + a.T
    assert torch.equal(D.matrix_diagonal(a), torch.diagonal(a))
    estimate = D.hutchinson_diagonal(lambda v: a @ v, 30, num_samples=64, block_size=7, seed=0)
    assert _within_standard_errors(estimate, torch.diagonal(a))
    with pytest.raises(ValueError):
        D.matrix_diagonal(a[:3])


@pytest.mark.slow
def test_mc_and_hutchinson_converge_to_the_exact_diagonal():
    model, batches, loss_fn = build(tiny_cnn, "cpu"), data("cpu"), get_loss("cross_entropy")
    exact = D.ggn_diagonal(model, loss_fn, batches, "train")
    op = make_operator("ggn", model, loss_fn, batches, bn_mode="train")
    errors = {}
    for num in (100, 6400):
        mc = D.mc_ggn_diagonal(model, loss_fn, batches, num_samples=num, bn_mode="train", seed=0).mean
        hutch = D.hutchinson_diagonal(op, op.num_params, num_samples=num, block_size=400, seed=0).mean
        errors[num] = [float((x - exact).norm() / exact.norm()) for x in (mc, hutch)]
    for small, large in zip(errors[100], errors[6400]):
        assert large < 0.3 * small  # 1/sqrt(64) = 0.125 expected
    assert max(errors[6400]) < 0.1


def test_adam_diagonal_is_the_square_root_of_the_second_moment_state(tmp_path):
    small = ["model=mlp", "model.hidden=[8]"]
    train = dispatch(make_cfg(tmp_path / "train", ["experiment=train_digits", "optimizer=adam",
                                                   "analysis.epochs=1", *small]))
    path = tmp_path / "train" / train["checkpoints"][-1]
    state = torch.load(path, weights_only=True)["optimizer"]
    from experiments.networks import build_network, load_data
    cfg = make_cfg(tmp_path / "diag", ["dataset=digits", *small, "analysis=diagonal", "analysis.method=adam",
                                       f"analysis.checkpoint={path}", "analysis.lanczos_steps=3",
                                       "dataset.num_subsamples=64", "analysis.exact_max_dim=0"])
    model = build_network(dict(cfg.model), load_data({**dict(cfg.dataset), "num_subsamples": 8, "fake": False,
                                                      "val_size": 0}, torch.device("cpu"), 0),
                          torch.device("cpu"), torch.float64, str(path))
    v = [state["state"][i]["exp_avg_sq"].reshape(-1).double() for i in sorted(state["state"])]
    raw = torch.cat(v).sqrt()
    assert torch.equal(D.adam_diagonal(state, model, bias_correction=False), raw)
    step = float(state["state"][0]["step"])
    corrected = torch.cat([x / (1 - 0.999 ** step) for x in v]).sqrt()
    assert torch.allclose(D.adam_diagonal(state, model), corrected, rtol=1e-12)
    results = dispatch(cfg)  # the analysis reads the same checkpoint
    import numpy as np
    with np.load(tmp_path / "diag" / "arrays.npz") as arrays:
        assert np.allclose(arrays["diagonal"], corrected.numpy(), rtol=1e-6)
    assert results["metrics"]["wasserstein_diagonal"] > 0
    with pytest.raises(SuiteError, match="no Adam second moments"):
        D.adam_diagonal({"state": {0: {"momentum_buffer": torch.zeros(1)}}, "param_groups": []}, model)


def test_network_analysis_exact_ggn_against_its_own_eigenvalues(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["dataset=digits", "model=mlp", "model.hidden=[4]", "operator=ggn",
                                           "analysis=diagonal", "analysis.method=exact", "analysis.lanczos_steps=10",
                                           "dataset.num_subsamples=64", "analysis.checks=[diagonal_max_differs]"]))
    m = results["metrics"]
    assert m["num_params"] == 64 * 4 + 4 + 4 * 10 + 10
    # the exact GGN diagonal lies between the extreme eigenvalues of a PSD matrix
    assert m["exact_min"] - 1e-10 <= m["diagonal_min"] and m["diagonal_max"] <= m["exact_max"] + 1e-10
    assert m["wasserstein_ggn"] < m["wasserstein_diagonal"]
    assert results["checks"]["diagonal_max_differs"]["passed"]


@pytest.mark.parametrize("dataset", ["marchenko_pastur", "wigner"])
def test_fig5_check_holds_at_reduced_size(dataset, tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=fig5", f"dataset={dataset}", "dataset.n=500"]))
    assert set(results["checks"]) == {"lanczos_beats_diagonal"}
    assert results["all_checks_passed"], results["checks"]


def test_fig6_diagonal_checks_hold_at_reduced_size(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=fig6_diagonal", "dataset.n=500"]))
    assert set(results["checks"]) == {"diagonal_max", "zero_mass_m30", "zero_mass_diagonal"}
    assert results["all_checks_passed"], results["checks"]
    # consistent with experiment=fig6's diagonal (analysis=spectrum, show_diagonal)
    # consistent with experiment=fig6's diagonal (analysis=spectrum, show_diagonal: torch.diagonal of the
    # same matrix) and its W1 to the same exact eigenvalues
    from experiments.matrices import build_matrix, validate_matrix_dataset
    cfg = make_cfg(tmp_path / "fig6", ["experiment=fig6", "dataset.n=500"])
    matrix = build_matrix(validate_matrix_dataset(cfg), torch.float64, torch.device("cpu")).matrix
    diagonal = torch.diagonal(matrix)
    assert results["metrics"]["diagonal_max"] == float(diagonal.max())
    from curvature.spectrum import SpectralMeasure
    w1 = SpectralMeasure.from_eigenvalues(diagonal).wasserstein(torch.linalg.eigvalsh(matrix))
    assert results["metrics"]["wasserstein_diagonal"] == pytest.approx(w1, rel=1e-9)


@pytest.mark.parametrize("overrides,key", [
    (["analysis.method=bogus"], "analysis.method"),
    (["analysis.method=mc_ggn"], "analysis.method"),                      # a matrix dataset
    (["analysis.checks=[nonsense]"], "analysis.checks"),
    (["analysis.num_samples=0"], "analysis.num_samples"),
    (["dataset=digits", "model=cnn", "analysis.method=adam"], "analysis.checkpoint"),
    (["experiment=fig7_diagonal", "dataset.fake=true"], "analysis.checkpoint"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(overrides, key, tmp_path):
    base = [] if any(o.startswith("experiment=") for o in overrides) else ["analysis=diagonal"]
    with pytest.raises(V.ConfigError) as error:
        dispatch(make_cfg(tmp_path, base + overrides))
    assert error.value.key == key and "\n" not in str(error.value)


def test_cli_reports_a_bad_method_in_one_line(tmp_path):
    proc = run_cli("analysis=diagonal", "analysis.method=bogus", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "analysis.method" in proc.stderr
