"""Finite-difference Hessian products (curvature/finite_difference.py) against exact answers.

Ground truth: closed forms (separable polynomials, whose central-difference error is known exactly), the
dense Hessian of a tiny smooth model in float64 by ``torch.autograd.functional.hessian`` (no finite
differences, no operator code), and for BatchNorm in train mode the double-backward dense builder
(``torch.func.hessian`` is wrong there, see TRAPS.md).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature.dense import dense_hessian
from curvature.errors import SuiteError
from curvature.finite_difference import FiniteDifferenceHessian, fd_hessian_product, fd_step
from curvature.lanczos import lanczos
from curvature.operators import make_operator
from experiments import validate as V
from experiments.run import dispatch
from tests.conftest import make_cfg

U64 = torch.finfo(torch.float64).eps


# --- the step rule ----------------------------------------------------------------------------------
def test_step_rule_is_the_documented_closed_form():
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        u = torch.finfo(dtype).eps
        assert fd_step(3.0, 2.0, dtype) == pytest.approx(u ** (1 / 3) * 4.0 / 2.0, rel=1e-12)
        assert fd_step(3.0, 2.0, dtype, richardson=True) == pytest.approx(u ** (1 / 5) * 4.0 / 2.0, rel=1e-12)
    assert fd_step(0.0, 1.0, torch.float64) == pytest.approx(U64 ** (1 / 3))
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="vector norm"):
            fd_step(1.0, bad, torch.float64)
    with pytest.raises(ValueError, match="weight norm"):
        fd_step(math.nan, 1.0, torch.float64)


# --- closed forms: separable polynomials ------------------------------------------------------------
def test_central_error_is_exactly_eps_squared_v_cubed_and_quarters_when_eps_halves():
    # f = sum w^4 / 4: g = w^3, H v = 3 w^2 v, central difference = 3 w^2 v + eps^2 v^3 exactly
    w = torch.tensor([0.7, -1.3, 2.0, 0.1], dtype=torch.float64)
    v = torch.tensor([0.5, 1.0, -0.25, 2.0], dtype=torch.float64)
    errors = []
    for eps in (1e-2, 5e-3):
        product = fd_hessian_product(lambda x: x ** 3, w, v, eps=eps)
        torch.testing.assert_close(product - 3 * w ** 2 * v, eps ** 2 * v ** 3, rtol=1e-6, atol=1e-13)
        errors.append(float(torch.linalg.vector_norm(product - 3 * w ** 2 * v)))
    assert errors[0] / errors[1] == pytest.approx(4.0, rel=1e-4)


def test_richardson_error_is_exactly_minus_eps4_v5_over_4_and_sixteenths_when_eps_halves():
    # f = sum w^6 / 6: g = w^5, H v = 5 w^4 v; D(eps) = Hv + 10 w^2 eps^2 v^3 + eps^4 v^5,
    # so (4 D(eps/2) - D(eps)) / 3 = Hv - eps^4 v^5 / 4
    w = [torch.tensor([0.7, -1.3], dtype=torch.float64), torch.tensor([[2.0, 0.1]], dtype=torch.float64)]
    v = [torch.tensor([0.5, 1.0], dtype=torch.float64), torch.tensor([[-0.25, 2.0]], dtype=torch.float64)]
    errors = []
    for eps in (4e-2, 2e-2):
        product = fd_hessian_product(lambda x: [t ** 5 for t in x], w, v, eps=eps, richardson=True)
        assert isinstance(product, list) and [p.shape for p in product] == [t.shape for t in w]
        for p, a, b in zip(product, w, v):
            torch.testing.assert_close(p - 5 * a ** 4 * b, -eps ** 4 * b ** 5 / 4, rtol=1e-4, atol=1e-12)
        errors.append(sum(float(torch.linalg.vector_norm(p - 5 * a ** 4 * b)) for p, a, b in zip(product, w, v)))
    assert errors[0] / errors[1] == pytest.approx(16.0, rel=1e-2)


def test_zero_vector_gives_zeros_without_gradients_and_inputs_stay_untouched():
    calls = []
    w = {"a": torch.randn(3, dtype=torch.float64)}
    saved = w["a"].clone()
    out = fd_hessian_product(lambda x: calls.append(1) or x, w, {"a": torch.zeros(3, dtype=torch.float64)})
    assert calls == [] and torch.equal(out["a"], torch.zeros(3, dtype=torch.float64))
    fd_hessian_product(lambda x: {"a": x["a"] ** 3}, w, {"a": torch.ones(3, dtype=torch.float64)})
    assert torch.equal(w["a"], saved)
    with pytest.raises(ValueError, match="same structure"):
        fd_hessian_product(lambda x: x, [torch.zeros(2)], [torch.zeros(3)])


# --- a tiny smooth network: the dense Hessian by another route --------------------------------------
def _smooth_problem(dtype=torch.float64, batch_norm: bool = False):
    torch.manual_seed(0)
    layers = [nn.Linear(4, 5)] + ([nn.BatchNorm1d(5)] if batch_norm else []) + [nn.Tanh(), nn.Linear(5, 3)]
    model = nn.Sequential(*layers).to(dtype)
    x, y = torch.randn(30, 4, dtype=dtype), torch.randint(0, 3, (30,))
    return model, [(x[:18], y[:18]), (x[18:], y[18:])]


def _dense_by_functional_hessian(model, batches) -> torch.Tensor:
    """The weighted mean loss's Hessian by torch.autograd.functional.hessian over the flat weights."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    total = sum(int(y.shape[0]) for _, y in batches)

    def loss(w):
        params = dict(zip(names, [c.reshape(s) for c, s in zip(torch.split(w, [s.numel() for s in shapes]), shapes)]))
        return sum(F.cross_entropy(functional_call(model, params, (x,)), y) * (y.shape[0] / total) for x, y in batches)

    return torch.autograd.functional.hessian(loss, flat, vectorize=True)  # batched rows, not a P-step loop


@pytest.mark.parametrize("richardson, tolerance", [(False, 1e-6), (True, 1e-9)])
def test_operator_equals_the_dense_hessian_times_v_in_float64(richardson, tolerance):
    # tolerance from the step: central ~ u^(2/3) = 4e-11 relative, Richardson ~ u^(4/5) = 3e-13, times
    # constants of the model's derivatives (a margin of 1e4-1e5 over the rule's prediction)
    model, batches = _smooth_problem()
    dense = _dense_by_functional_hessian(model, batches)
    op = make_operator("hessian", model, F.cross_entropy, batches, product="finite_difference",
                       richardson=richardson)
    assert isinstance(op, FiniteDifferenceHessian) and op.engine == "finite_difference"
    v = torch.randn(op.num_params, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    expected = dense @ v
    got = op.matvec(v)
    errors = torch.linalg.vector_norm(got - expected, dim=0) / torch.linalg.vector_norm(expected, dim=0)
    assert float(errors.max()) < tolerance
    torch.testing.assert_close(op.matvec(v[:, 0]), got[:, 0], rtol=0, atol=0)  # one vector = a column
    weight_norm = float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in model.parameters()])))
    assert op.last_step == pytest.approx(fd_step(weight_norm, float(v[:, 0].norm()), torch.float64, richardson))


def test_error_quarters_central_and_sixteenths_richardson_when_eps_halves_on_a_network():
    model, batches = _smooth_problem()
    dense = _dense_by_functional_hessian(model, batches)
    v = torch.randn(dense.shape[0], dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    v = v / v.norm()
    expected = dense @ v

    def error(eps, richardson):
        op = make_operator("hessian", model, F.cross_entropy, batches, product="finite_difference",
                           fd_step=eps, richardson=richardson, check_deterministic=False)
        return float((op.matvec(v) - expected).norm() / expected.norm())

    # steps where truncation (eps^2 resp. eps^4) dwarfs rounding (u / eps ~ 1e-14)
    assert 3.6 < error(4e-2, False) / error(2e-2, False) < 4.4
    assert 14.0 < error(0.4, True) / error(0.2, True) < 18.0


def test_weights_and_buffers_unchanged_bit_for_bit_and_bn_train_matches_double_backward():
    model, batches = _smooth_problem(batch_norm=True)
    model.train()
    before = {k: t.clone() for k, t in model.state_dict().items()}
    dense = dense_hessian(model, F.cross_entropy, batches, bn_mode="train")  # double backward, column by column
    op = make_operator("hessian", model, F.cross_entropy, batches, bn_mode="train", product="finite_difference")
    v = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    got, expected = op.matvec(v), dense @ v
    # the same 1e-6 as without BatchNorm: batch statistics of 12-18 samples curve the loss far more than the
    # step rule's scale 1 + ||w|| assumes (central error 1e-8 here against 1e-11 without BatchNorm)
    assert float(torch.linalg.vector_norm(got - expected) / torch.linalg.vector_norm(expected)) < 1e-6
    assert not torch.equal(got, expected)  # a different route, not a copy of the exact product
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)  # running stats included
    assert model.training and model[1].track_running_stats


def test_lanczos_with_fd_products_gives_the_dense_eigenvalues():
    # full-dimension Lanczos: the Ritz values are the operator's eigenvalues, and by Weyl's inequality
    # they move by at most the product error times ||H|| (~1e-10 here in float64); 1e-7 of the radius
    model, batches = _smooth_problem()
    dense = _dense_by_functional_hessian(model, batches)
    exact = torch.linalg.eigvalsh(dense)
    op = make_operator("hessian", model, F.cross_entropy, batches, product="finite_difference")
    result = lanczos(op, num_steps=op.num_params, seed=0)
    ritz = result.ritz_values[0][result.mask[0]].sort().values
    radius = float(exact.abs().max())
    # the Ritz values found lie on the spectrum, and the extremes are found
    gaps = (ritz.unsqueeze(1) - exact.unsqueeze(0)).abs().min(dim=1).values
    assert float(gaps.max()) < 1e-7 * radius
    assert float(ritz.max()) == pytest.approx(float(exact.max()), abs=1e-7 * radius)
    assert float(ritz.min()) == pytest.approx(float(exact.min()), abs=1e-7 * radius)


# --- bad input -------------------------------------------------------------------------------------
def test_library_refuses_bad_options_in_one_line():
    model, batches = _smooth_problem()
    with pytest.raises(SuiteError, match="ggn keeps its exact route"):
        make_operator("ggn", model, F.cross_entropy, batches, product="finite_difference")
    with pytest.raises(ValueError, match="product must be exact or finite_difference"):
        make_operator("hessian", model, F.cross_entropy, batches, product="central")
    for bad in (-1.0, 0.0, "big", True):
        with pytest.raises(ValueError, match="step must be auto or a positive number"):
            make_operator("hessian", model, F.cross_entropy, batches, product="finite_difference", fd_step=bad)
    with pytest.raises(SuiteError, match="operator.layerwise=true"):
        make_operator("hessian", model, F.cross_entropy, batches, product="finite_difference", layerwise=True)


@pytest.mark.parametrize("overrides, key", [
    (["operator=ggn", "operator.product=finite_difference"], "operator.product"),
    (["analysis.operators=[ggn,hessian]", "operator.product=finite_difference"], "operator.product"),
    (["operator.product=central"], "operator.product"),
    (["operator.product=finite_difference", "operator.fd_step=-1"], "operator.fd_step"),
    (["operator.product=finite_difference", "operator.richardson=maybe"], "operator.richardson"),
    (["analysis=diagonal", "operator.product=finite_difference"], "operator.product"),
    (["analysis=fd_error", "analysis.dtypes=[float16]"], "analysis.dtypes"),
    (["analysis=fd_error", "operator=ggn"], "operator"),
])
def test_config_errors_name_the_key(tmp_path, overrides, key):
    cfg = make_cfg(tmp_path, ["dataset=digits", "model=mlp", "dataset.num_subsamples=20", *overrides])
    with pytest.raises(V.ConfigError) as info:
        dispatch(cfg)
    assert info.value.key == key and "\n" not in str(info.value)
    assert not (tmp_path / "results.json").exists()


# --- the analyses, end to end -----------------------------------------------------------------------
def test_spectrum_with_fd_products_matches_the_exact_spectrum(tmp_path):
    common = ["analysis=spectrum", "dataset=digits", "model=mlp", "model.hidden=[3]", "dataset.num_subsamples=40",
              "operator.batch_size=20", "analysis.num_steps=12", "analysis.exact_max_dim=0"]
    exact = dispatch(make_cfg(tmp_path / "exact", common))
    fd = dispatch(make_cfg(tmp_path / "fd", [*common, "operator.product=finite_difference"]))
    assert any("finite_difference" in note for note in fd["notes"])
    assert any("piecewise-linear modules (ReLU)" in note for note in fd["notes"])  # model=mlp has ReLUs
    for key in ("hessian_max_ritz_value", "hessian_min_ritz_value", "hessian_normalised_trace"):
        assert fd["metrics"][key] == pytest.approx(exact["metrics"][key], rel=1e-6)
    assert [r["product_mode"] for r in fd["tables"]["cost"]] == ["finite_difference"]


def test_fd_error_analysis_writes_its_table_and_checks(tmp_path):
    results = dispatch(make_cfg(tmp_path, [
        "analysis=fd_error", "dataset=digits", "model=mlp", "model.hidden=[3]", "dataset.num_subsamples=40",
        "operator.batch_size=20", "analysis.num_vectors=2", "analysis.fixed_steps=[1e-2,1e-3]",
        "analysis.lanczos_steps=4", "analysis.activations=[smooth]"]))
    rows = results["tables"]["fd_error"]
    assert [(r["dtype"], r["product"], r["step"]) for r in rows if r["dtype"] == "float64"] == [
        ("float64", p, s) for p, s in [("exact", "auto"), ("central", "auto"), ("richardson", "auto"),
                                       ("central", 1e-2), ("richardson", 1e-2), ("central", 1e-3),
                                       ("richardson", 1e-3)]]
    central = {r["step"]: r["median_relative_error"] for r in rows if r["dtype"] == "float64"
               and r["product"] == "central"}
    assert 60 < central[1e-2] / central[1e-3] < 140   # truncation ~ eps^2 in float64
    assert set(results["checks"]) == {"central_auto_float32_smooth", "central_auto_float64_smooth"}
    assert results["all_checks_passed"]
    lanczos_rows = results["tables"]["fd_lanczos"]
    assert {r["product"] for r in lanczos_rows} == {"exact", "central", "richardson"}
    assert all(r["wasserstein_1"] >= 0 for r in lanczos_rows)
    assert (tmp_path / "fd_error.md").exists() and (tmp_path / "fd_error.png").exists()
