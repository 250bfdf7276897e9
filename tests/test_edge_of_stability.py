"""analysis=edge_of_stability: full-batch gradient descent with the sharpness tracked (Cohen et al. 2021).

Ground truth: the test trains the same network by its own gradient-descent loop (plain autograd, its own
MSE) from the same seeded initial weights, and at every measured step builds the dense Hessian of the
full-batch loss with ``torch.autograd.functional.hessian`` through ``functional_call`` (a route the
tracker's operator does not take), diagonalised with ``eigvalsh`` in float64. The checks' logic is tested
on synthetic curves that must pass and curves that must fail. The full preset is the ``slow`` test.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call

from curvature.data import load_splits
from curvature.models import build_model
from experiments import edge_of_stability as eos
from experiments.run import dispatch
from experiments.validate import ConfigError
from tests.conftest import make_cfg

TINY = ["experiment=edge_of_stability_smoke", "dataset.num_subsamples=64", "model.hidden=[6]",
        "analysis.mse_learning_rates=[2.0]", "analysis.cross_entropy_learning_rates=[1.5]",
        "analysis.num_steps=12", "analysis.measure_every=4", "analysis.tol=1e-10", "seed=3"]


def _mse(outputs, labels):
    return ((outputs - F.one_hot(labels, outputs.shape[-1]).to(outputs.dtype)) ** 2).mean()


def _dense_top_eigenvalue(model, loss_fn, inputs, labels) -> float:
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for p in model.parameters()]

    def loss(flat):
        chunks = torch.split(flat, [p.numel() for p in params])
        weights = {n: c.view_as(p) for n, c, p in zip(names, chunks, params)}
        return loss_fn(functional_call(model, weights, (inputs,)), labels)

    flat = torch.cat([p.reshape(-1) for p in params])
    hessian = torch.autograd.functional.hessian(loss, flat, vectorize=True)  # batched rows, not a P-step loop
    return float(torch.linalg.eigvalsh(hessian)[-1])


def test_tracked_sharpness_and_loss_equal_an_independent_gradient_descent_with_dense_hessians(tmp_path):
    """Per variant: the loss at every step to 1e-10 (relative) and the sharpness at every measured step
    to 1e-8 (relative; tol = 1e-10 on the residual bounds it) against the test's own loop."""
    results = dispatch(make_cfg(tmp_path, TINY))
    arrays = np.load(tmp_path / "arrays.npz")
    splits = load_splits("digits", num_subsamples=64, seed=3)
    inputs, labels = next(splits.train.batches(64, dtype=torch.float64))
    assert [v["name"] for v in results["variants"]] == ["mse_lr2", "cross_entropy_lr1.5"]
    for name, loss_fn, lr in (("mse_lr2", _mse, 2.0), ("cross_entropy_lr1.5", F.cross_entropy, 1.5)):
        torch.manual_seed(3)
        model = build_model({"name": "mlp", "hidden": [6], "activation": "tanh"}, 10, 1, 8).double()
        assert isinstance(model.net[2], torch.nn.Tanh)
        steps = arrays[f"{name}_steps"]
        assert steps.tolist() == [0, 4, 8, 12]
        losses, sharpness = [], []
        for step in range(13):
            if step in steps:
                sharpness.append(_dense_top_eigenvalue(model, loss_fn, inputs, labels))
            loss = loss_fn(model(inputs), labels)
            losses.append(float(loss.detach()))
            grads = torch.autograd.grad(loss, list(model.parameters()))
            with torch.no_grad():
                for p, g in zip(model.parameters(), grads):
                    p -= lr * g
        np.testing.assert_allclose(arrays[f"{name}_loss"], losses, rtol=1e-10)
        np.testing.assert_allclose(arrays[f"{name}_sharpness"], sharpness, rtol=1e-8)
        assert (arrays[f"{name}_residual"] <= 1e-10).all()
        row = next(r for r in results["tables"]["variants"] if r["variant"] == name)
        assert row["peak_ratio"] == pytest.approx(max(sharpness) * lr / 2, rel=1e-8)
        assert row["loss_increases"] == int((np.diff(losses) > 0).sum())
    saved = json.loads((tmp_path / "results.json").read_text())
    assert {"mse_lr2_hovers_at_limit", "cross_entropy_lr1.5_stays_at_or_below_limit",
            "mse_lr2_reaches_limit", "mse_lr2_loss_decreases_non_monotonically",
            "cross_entropy_lr1.5_loss_decreases"} <= set(saved["checks"])
    assert "edge_of_stability.png" in saved["files"]["figures"]


class _Checks:
    """Collects what ``_check_variant`` reports, as ``Run`` does."""

    def __init__(self):
        self.checks, self.metrics = {}, {}

    def check(self, name, value, target, passed):
        self.checks[name] = passed

    def metric(self, name, value):
        self.metrics[name] = value


SETTINGS = {"final_fraction": 0.5, "band": 0.1, "reach_fraction": 0.9, "hover_losses": ["mse"],
            "oscillating_losses": ["mse"], "loss_drop": 0.5, "min_loss_increases": 1}


def _curve(ratio, lr, losses):
    ratio = np.asarray(ratio, dtype=float)
    return {"steps": np.arange(ratio.size) * 10, "sharpness": ratio * 2 / lr, "loss": np.asarray(losses, float),
            "products": np.full(ratio.size, 5), "diverged": None}


RISE = [0.3, 0.5, 0.7, 0.9, 1.0]
WOBBLY_LOSS = [1.0, 0.8, 0.85, 0.5, 0.55, 0.3, 0.2]


@pytest.mark.parametrize("loss,tail,losses,expected", [
    ("mse", [1.02, 0.97, 1.05, 0.99, 1.01], WOBBLY_LOSS, {"reaches_limit": True, "hovers_at_limit": True,
                                                          "loss_decreases_non_monotonically": True}),
    ("mse", [1.02, 1.3, 1.05, 0.99, 1.01], WOBBLY_LOSS, {"hovers_at_limit": False}),   # 30% above
    ("mse", [0.8, 0.75, 0.7, 0.7, 0.7], WOBBLY_LOSS, {"hovers_at_limit": False}),      # fell below
    ("mse", [1.0] * 5, [1.0, 0.8, 0.6, 0.4, 0.2], {"loss_decreases_non_monotonically": False}),  # monotone
    ("mse", [1.0] * 5, [1.0, 1.1, 0.9, 0.8, 0.7], {"loss_decreases_non_monotonically": False}),  # too little drop
    ("cross_entropy", [1.0, 0.9, 0.8, 0.7, 0.6], WOBBLY_LOSS, {"reaches_limit": True,
                                                              "stays_at_or_below_limit": True}),
    ("cross_entropy", [1.0, 0.9, 1.2, 0.7, 0.6], WOBBLY_LOSS, {"stays_at_or_below_limit": False}),
    ("cross_entropy", [1.0] * 5, [1.0, 0.8, 0.6, 0.4, 0.2], {"loss_decreases": True}),  # monotone is fine here
    ("cross_entropy", [1.0] * 5, [1.0, 1.1, 0.9, 0.8, 0.7], {"loss_decreases": False}),
])
def test_checks_pass_on_the_phenomenon_and_fail_without_it(loss, tail, losses, expected):
    collected = _Checks()
    variant = {"name": "v", "loss": loss, "lr": 0.5}
    row = eos._check_variant(collected, SETTINGS, variant, _curve(RISE + tail, 0.5, losses))
    for check, passed in expected.items():
        assert collected.checks[f"v_{check}"] is passed, check
    assert row["final_ratio_max"] == pytest.approx(max(tail))


def test_a_start_above_the_limit_or_a_peak_below_it_does_not_count_as_reaching_it():
    for ratio in ([0.95, 1.0, 1.0, 1.0], [0.3, 0.5, 0.8, 0.85]):
        collected = _Checks()
        eos._check_variant(collected, SETTINGS, {"name": "v", "loss": "mse", "lr": 1.0},
                           _curve(ratio, 1.0, WOBBLY_LOSS))
        assert collected.checks["v_reaches_limit"] is False


def test_a_diverged_run_fails_every_check():
    collected = _Checks()
    curve = {**_curve([0.5, 3.0], 1.0, [1.0, 5.0]), "diverged": 2}
    eos._check_variant(collected, SETTINGS, {"name": "v", "loss": "mse", "lr": 1.0}, curve)
    assert collected.checks and not any(collected.checks.values())


@pytest.mark.parametrize("override,key", [
    ("analysis.mse_learning_rates=[-0.5]", "analysis.mse_learning_rates"),
    ("analysis.cross_entropy_learning_rates=[0.5,0.5]", "analysis.cross_entropy_learning_rates"),
    ("analysis.measure_every=100", "analysis.measure_every"),
    ("analysis.hover_losses=[hinge]", "analysis.hover_losses"),
    ("analysis.oscillating_losses=mse", "analysis.oscillating_losses"),
])
def test_bad_settings_are_one_line_config_errors(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        dispatch(make_cfg(tmp_path, [*TINY, override]))
    assert not (tmp_path / "results.json").exists()


@pytest.mark.slow
def test_the_preset_shows_the_edge_of_stability(tmp_path):
    """The full experiment (minutes on 2 CPU cores): every check of every variant passes."""
    results = dispatch(make_cfg(tmp_path, ["experiment=edge_of_stability"]))
    failed = [name for name, c in results["checks"].items() if not c["passed"]]
    assert not failed, failed
    assert len(results["variants"]) >= 4


def test_the_mlp_takes_tanh_and_refuses_an_unknown_activation():
    from curvature.errors import SuiteError
    tanh = build_model({"name": "mlp", "hidden": [5, 4], "activation": "tanh"}, 10, 1, 8)
    assert [type(m).__name__ for m in tanh.net] == ["Flatten", "Linear", "Tanh", "Linear", "Tanh", "Linear"]
    x = torch.randn(3, 1, 8, 8)
    h = torch.tanh(tanh.net[3](torch.tanh(tanh.net[1](x.flatten(1)))))
    torch.testing.assert_close(tanh(x), tanh.net[5](h))
    with pytest.raises(SuiteError, match="activation must be one of relu, tanh"):
        build_model({"name": "mlp", "activation": "sigmoid"}, 10, 1, 8)
