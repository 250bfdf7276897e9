"""Trace estimators (curvature/trace.py) against exact traces, and analysis=trace end to end.

Every estimate is seeded, so each assertion is deterministic; each is still a real check: the error
is within 4 reported standard errors *and* the standard error is small next to the trace.
"""

import json
import math

import numpy as np
import pytest
import torch

from curvature.data import load_splits
from curvature.dense import dense_ggn, dense_hessian
from curvature.models import get_model
from curvature.operators import GGNOperator, HessianOperator, get_loss
from curvature.trace import TraceEstimate, hutchinson, hutchpp, slq_trace
from experiments.run import dispatch
from tests.conftest import make_cfg, require


def _matrix(eigenvalues: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``Q diag(eigenvalues) Q^T`` with a seeded random orthogonal ``Q`` (float64)."""
    n = eigenvalues.numel()
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64))
    a = (q * eigenvalues) @ q.T
    return 0.5 * (a + a.T)


def _spectrum(n=200):
    """An indefinite spectrum with a bulk and a few outliers, trace about 118."""
    bulk = torch.linspace(-0.5, 1.5, n - 6, dtype=torch.float64)
    return torch.cat([bulk, torch.tensor([30.0, 20.0, 15.0, 10.0, -8.0, -5.0], dtype=torch.float64)])


def _close(estimate: TraceEstimate, true: float, max_relative_stderr: float):
    assert estimate.stderr > 0 and math.isfinite(estimate.stderr)
    assert abs(estimate.estimate - true) <= 4 * estimate.stderr, (estimate.method, estimate.estimate, true)
    assert estimate.stderr <= max_relative_stderr * abs(true), (estimate.method, estimate.stderr, true)


def test_each_estimator_on_a_dense_matrix_with_known_trace():
    eigenvalues = _spectrum()
    a, true = _matrix(eigenvalues), float(eigenvalues.sum())
    h = hutchinson(a, 100, seed=0)
    _close(h, true, 0.1)
    assert h.num_matvecs == 100 and h.samples.shape == (100,) and h.method == "hutchinson"
    _close(hutchinson(a, 100, seed=1, distribution="gaussian"), true, 0.15)
    hpp = hutchpp(a, 100, seed=0)
    _close(hpp, true, 0.02)  # the six outliers are in the sketch: a much smaller error at equal products
    assert hpp.num_matvecs == 100 and hpp.parts["sketch_size"] == 33
    assert hpp.parts["sketch_trace"] + hpp.parts["complement_trace"] == pytest.approx(hpp.estimate)
    slq = slq_trace(a, num_vectors=40, num_steps=3, seed=0)
    _close(slq, true, 0.15)
    assert slq.num_matvecs == 120 and slq.parts["num_vectors"] == 40
    # tr(A^2) from the same quadrature: exact per start vector from two steps on
    squares = slq_trace(a, num_vectors=40, num_steps=3, seed=0, fn=lambda x: x ** 2)
    _close(squares, float((eigenvalues ** 2).sum()), 0.25)


def test_hutchpp_is_exact_for_rank_at_most_a_third_of_the_products():
    n, rank = 150, 5
    q, _ = torch.linalg.qr(torch.randn(n, rank, generator=torch.Generator().manual_seed(3), dtype=torch.float64))
    eigenvalues = torch.tensor([9.0, 4.0, -3.0, 2.0, 0.5], dtype=torch.float64)
    a = (q * eigenvalues) @ q.T
    est = hutchpp(0.5 * (a + a.T), 3 * rank, seed=0)
    assert est.num_matvecs == 15
    assert abs(est.estimate - float(eigenvalues.sum())) <= 1e-10 * float(eigenvalues.abs().sum())
    assert est.stderr <= 1e-10 and est.parts["complement_trace"] == pytest.approx(0.0, abs=1e-10)
    # a sketch wider than the space spans it: exact, stderr 0, fewer products than the budget
    small = _matrix(torch.arange(1.0, 11.0, dtype=torch.float64))
    full = hutchpp(small, 60, seed=0)
    assert full.estimate == pytest.approx(55.0, rel=1e-12) and full.stderr == 0.0
    assert full.num_matvecs == 20 + 10 and full.interval() == (full.estimate, full.estimate)


def test_inputs_blocks_and_dtypes_give_the_same_draws():
    a = _matrix(_spectrum(64))
    ref = hutchinson(a, 20, seed=5)
    assert hutchinson(a, 20, seed=5, block_size=1).estimate == pytest.approx(ref.estimate, rel=1e-12)
    assert hutchinson(lambda v: a @ v, 20, seed=5, dim=64).estimate == pytest.approx(ref.estimate, rel=1e-12)

    def vectors_only(v):
        if v.dim() != 1:
            raise RuntimeError("this closure takes single vectors")
        return a @ v

    single = hutchinson(vectors_only, 20, seed=5, dim=64)
    assert single.estimate == pytest.approx(ref.estimate, rel=1e-12) and single.num_matvecs == 20
    low = hutchpp(a.float(), 30, seed=5)  # the operator's dtype is kept: float32 products
    assert low.estimate == pytest.approx(hutchpp(a, 30, seed=5).estimate, rel=1e-4)
    assert hutchinson(a, 20, seed=6).estimate != ref.estimate
    with pytest.raises(ValueError, match="at least 3|>= 3"):
        hutchpp(a, 2)
    with pytest.raises(ValueError, match="distribution"):
        hutchinson(a, 4, distribution="uniform")


def test_interval_uses_student_t_on_the_number_of_terms():
    est = TraceEstimate(10.0, 1.0, 10, "hutchinson", torch.zeros(10))
    low, high = est.interval(0.95)
    assert high - 10.0 == pytest.approx(2.2622, abs=1e-4)  # t_{0.975, 9}
    assert TraceEstimate(1.0, math.nan, 1, "hutchinson", torch.zeros(1)).interval() == (-math.inf, math.inf)


@pytest.fixture(scope="module")
def tiny_network():
    """A 160-parameter MLP on 40 digits, float64, with its dense Hessian and GGN traces."""
    torch.manual_seed(0)
    model = get_model("mlp", 10, hidden=[2]).double()
    batches = list(load_splits("digits", num_subsamples=40, seed=0).train.batches(40, dtype=torch.float64))
    loss = get_loss("cross_entropy")
    traces = {"hessian": float(torch.trace(dense_hessian(model, loss, batches))),
              "ggn": float(torch.trace(dense_ggn(model, loss, batches)))}
    return model, batches, loss, traces


@pytest.mark.parametrize("name, cls", [("hessian", HessianOperator), ("ggn", GGNOperator)])
def test_estimators_on_a_small_networks_curvature_match_the_dense_trace(tiny_network, name, cls):
    model, batches, loss, traces = tiny_network
    op = cls(model, loss, batches, check_deterministic=False)
    assert op.num_params == 160
    true = traces[name]
    _close(hutchinson(op, 60, seed=0), true, 0.15)
    _close(hutchpp(op, 60, seed=0), true, 0.05)
    slq = slq_trace(op, num_vectors=50, num_steps=2, seed=0)
    _close(slq, true, 0.15)
    # operator calls: Hutchinson 4 blocks (60 in 16s), Hutch++ 2 + 2 + 2 (20 each), SLQ one per step
    assert op.num_products == 4 + 6 + 2


def test_trace_analysis_on_a_tiny_digits_model(tmp_path):
    results = dispatch(make_cfg(tmp_path, [
        "analysis=trace", "dataset=digits", "model=mlp", "model.hidden=[2]", "dataset.num_subsamples=40",
        "operator.batch_size=40", "analysis.method=all", "analysis.num_matvecs=24", "analysis.slq_steps=2",
        "analysis.operators=[hessian,ggn]", "analysis.exact_max_dim=200"]))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["analysis"] == "trace" and saved["provenance"]["commit"]
    rows = saved["tables"]["trace"]
    assert [(r["operator"], r["method"]) for r in rows] == [
        (o, m) for o in ("hessian", "ggn") for m in ("hutchinson", "hutchpp", "slq")]
    for row in rows:
        assert {"estimate", "stderr", "ci95_low", "ci95_high", "num_matvecs", "seconds", "exact", "error"} <= set(row)
        assert row["ci95_low"] < row["estimate"] < row["ci95_high"] and row["num_matvecs"] == 24
    m = saved["metrics"]
    assert m["num_params"] == 160
    assert m["hessian_exact_trace"] == pytest.approx(m["ggn_exact_trace"], rel=1e-8)  # ReLU: diagonals agree
    assert set(saved["checks"]) == {f"{o}_{k}_within_3_sigma" for o in ("hessian", "ggn")
                                    for k in ("hutchinson", "hutchpp", "slq")}
    assert saved["all_checks_passed"]
    assert saved["trace"]["methods"] == ["hutchinson", "hutchpp", "slq"]
    assert saved["data"]["num_samples"] == 40 and saved["config"]["analysis"]["name"] == "trace"
    assert any("exact trace" in note for note in saved["notes"])
    with np.load(tmp_path / "arrays.npz") as arrays:
        assert arrays["hessian_hutchinson_samples"].shape == (24,)


def test_hessian_eigenthings_trace_matches_the_suites_operator(tiny_network):
    require("hessian_eigenthings")
    from experiments.peer_trace import peer_traces
    model, batches, _, traces = tiny_network
    rows = peer_traces("hessian_eigenthings", model, batches, 30, seed=0)
    assert [r.method for r in rows] == ["hessian_eigenthings:hutchinson", "hessian_eigenthings:hutch++"]
    assert [r.num_matvecs for r in rows] == [30, 30]
    for row in rows:
        assert abs(row.estimate - traces["hessian"]) <= 4 * row.stderr


def test_curvlinops_traces_on_the_suites_model_lie_within_hutchinsons_exact_spread(tiny_network):
    """curvlinops gives no standard error, so the check uses the exact variance of Rademacher Hutchinson,
    2 (||H||_F^2 - sum_i H_ii^2) / m, from the dense Hessian: each of its three estimates (Hutch++ and XTrace
    vary less) lies within 4 of that standard deviation of the dense trace, 150 products each."""
    require("curvlinops")
    from experiments.peer_trace import peer_traces
    model, batches, loss, traces = tiny_network
    dense = dense_hessian(model, loss, batches)
    spread = math.sqrt(2 * (float((dense ** 2).sum()) - float((dense.diagonal() ** 2).sum())) / 150)
    rows = peer_traces("curvlinops", model, batches, 150, seed=0)
    assert [r.method for r in rows] == ["curvlinops:hutchinson", "curvlinops:hutch++", "curvlinops:xtrace"]
    for row in rows:
        assert row.num_matvecs >= 148
        assert abs(row.estimate - traces["hessian"]) <= 4 * spread, (row.method, row.estimate, spread)


@pytest.mark.slow
def test_hutchpp_variance_is_far_below_hutchinsons_on_low_rank_plus_noise():
    """200 seeds at 60 products each on 20 outliers + a flat bulk (n = 400): the measured variance of
    Hutch++ against Hutchinson's, and the coverage of both 95% intervals (Hutch++'s standard error is
    given the sketch; its coverage is measured here)."""
    n, seeds, m = 400, 200, 60
    eigenvalues = torch.cat([torch.logspace(1, 2, 20, dtype=torch.float64),
                             torch.rand(n - 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)])
    a, true = _matrix(eigenvalues, seed=2), float(eigenvalues.sum())
    plain = [hutchinson(a, m, seed=s) for s in range(seeds)]
    plus = [hutchpp(a, m, seed=s) for s in range(seeds)]
    var_plain = torch.tensor([e.estimate for e in plain]).var().item()
    var_plus = torch.tensor([e.estimate for e in plus]).var().item()
    ratio = var_plus / var_plain
    coverage = {name: sum(lo <= true <= hi for lo, hi in (e.interval(0.95) for e in ests)) / seeds
                for name, ests in (("hutchinson", plain), ("hutchpp", plus))}
    print(f"variance ratio hutch++/hutchinson = {ratio:.3g}; 95% coverage {coverage}")
    assert ratio < 0.1  # measured 0.033 (torch 2.13 CPU)
    assert coverage["hutchinson"] >= 0.85 and coverage["hutchpp"] >= 0.85  # measured 0.94 and 0.91
