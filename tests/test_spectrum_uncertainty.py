"""Standard errors and 95% intervals of the Lanczos spectral quantities over start vectors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import t as student_t

from curvature.lanczos import lanczos, random_start_vectors
from curvature.random_matrices import wigner
from curvature.spectrum import ONE_VECTOR_NOTE, SpectralMeasure, uncertainty


def rotated(eigenvalues: torch.Tensor, seed: int) -> torch.Tensor:
    """``U diag(eigenvalues) U^T`` with U Haar-distributed: a matrix whose spectrum is known exactly."""
    gen = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(len(eigenvalues), len(eigenvalues), generator=gen, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    return (q * eigenvalues) @ q.T


def gapped_spectrum(n: int) -> torch.Tensor:
    """30% in [-3, -1], 50% in [0.5, 1], 20% in [2, 5]: a gap around 0, so 30 Lanczos steps resolve the
    negative mass. (Not an atom at 0: its Ritz value lands near 0, on either side.)"""
    neg, middle = int(0.3 * n), int(0.5 * n)
    return torch.cat([torch.linspace(-3, -1, neg, dtype=torch.float64),
                      torch.linspace(0.5, 1, middle, dtype=torch.float64),
                      torch.linspace(2, 5, n - neg - middle, dtype=torch.float64)])


def test_stderr_is_the_sample_std_over_root_k_of_the_quadratic_forms():
    """Per-vector moments by a different route (v^T A^k v), their std by numpy: the same numbers."""
    n, k = 100, 6
    a = wigner(n, seed=3)
    rows = uncertainty(SpectralMeasure.per_vector(lanczos(lambda x: a @ x, n, 12, num_vectors=k, seed=5)))
    v = random_start_vectors(n, k, seed=5)
    for power, name in enumerate(["normalised_trace", "moment2", "moment3", "moment4"], start=1):
        forms = torch.einsum("pi,pq,qi->i", v, torch.linalg.matrix_power(a, power), v).numpy()
        stderr = np.std(forms, ddof=1) / math.sqrt(k)
        half = student_t.ppf(0.975, k - 1) * stderr
        row = rows[name]
        assert row["num_vectors"] == k
        assert row["mean"] == pytest.approx(forms.mean(), abs=1e-10)
        assert row["stderr"] == pytest.approx(stderr, rel=1e-8, abs=1e-12)
        assert (row["ci95_low"], row["ci95_high"]) == pytest.approx((forms.mean() - half, forms.mean() + half),
                                                                    abs=1e-10)


def test_masses_cdf_and_extremes_of_hand_made_measures():
    a = SpectralMeasure(torch.tensor([-1.0, 0.0, 2.0]), torch.tensor([0.2, 0.3, 0.5]))
    b = SpectralMeasure(torch.tensor([-2.0, 0.5, 3.0]), torch.tensor([0.4, 0.4, 0.2]))
    rows = uncertainty([a, b], cdf_points=(1.0,), intervals={"near_zero": (-0.1, 0.1)})
    expected = {"negative_mass": [0.2, 0.4], "mass_below_1": [0.5, 0.8], "mass_near_zero": [0.3, 0.0]}
    for name, values in expected.items():
        assert rows[name]["per_vector"] == pytest.approx(values)
        assert rows[name]["stderr"] == pytest.approx(abs(values[0] - values[1]) / 2)  # std of two / sqrt 2
    top, bottom = rows["max_ritz_value"], rows["min_ritz_value"]
    assert (top["value"], top["mean"], top["spread"]) == pytest.approx((3.0, 2.5, 1.0))
    assert (bottom["value"], bottom["mean"], bottom["spread"]) == pytest.approx((-2.0, -1.5, 1.0))
    assert "lower bound on lambda_max" in top["note"] and "not the eigenvalue" in top["note"]
    assert rows["negative_mass"]["value"] == pytest.approx(SpectralMeasure.average([a, b]).mass_below(0.0))


def test_interval_contains_the_exact_moments_of_a_known_spectrum():
    eigenvalues = torch.linspace(-1.0, 3.0, 150, dtype=torch.float64)
    a = rotated(eigenvalues, seed=0)
    result = lanczos(lambda x: a @ x, 150, 10, num_vectors=10, seed=1)  # 2m - 1 = 19 >= 4: moments exact
    rows = uncertainty(SpectralMeasure.per_vector(result))
    exact = SpectralMeasure.from_eigenvalues(eigenvalues)
    for power, name in enumerate(["normalised_trace", "moment2", "moment3", "moment4"], start=1):
        assert rows[name]["ci95_low"] <= exact.moment(power) <= rows[name]["ci95_high"], name
    assert rows["normalised_trace"]["ci95_low"] <= 1.0 <= rows["normalised_trace"]["ci95_high"]
    assert rows["max_ritz_value"]["value"] <= 3.0 + 1e-12  # a Ritz value never passes the spectrum


def test_one_start_vector_gives_values_and_no_interval():
    a = wigner(60, seed=0)
    result = lanczos(lambda x: a @ x, 60, 8, num_vectors=1, seed=0)
    rows = uncertainty(SpectralMeasure.per_vector(result))
    measure = SpectralMeasure.from_lanczos(result)
    assert rows["normalised_trace"]["value"] == pytest.approx(measure.summary()["normalised_trace"])
    for row in rows.values():
        assert row["stderr"] is None and row["ci95_low"] is None and row["ci95_high"] is None
        assert ONE_VECTOR_NOTE in row["note"]
    with pytest.raises(ValueError):
        uncertainty([])


def test_matrix_analysis_saves_the_uncertainty_table(cfg_factory):
    from experiments.spectrum import run
    cfg = cfg_factory("experiment=fig2", "dataset.n=120", "analysis.num_steps=10",
                      "analysis.report_steps=[10]", "analysis.num_vectors=4", subdir="four")
    run(cfg)
    saved = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    metrics = saved["metrics"]
    assert metrics["normalised_trace_stderr_m10"] > 0
    assert metrics["negative_mass_ci95_low_m10"] <= metrics["negative_weight_m10"] <= \
        metrics["negative_mass_ci95_high_m10"]
    assert "negative_ritz_count_m10" in metrics and "negative_count_m10" not in metrics
    table = saved["tables"]["uncertainty"]
    assert {r["quantity"] for r in table} >= {"normalised_trace", "negative_mass", "mass_near_zero",
                                              "max_ritz_value"}
    single = run(cfg_factory("experiment=fig2", "dataset.n=120", "analysis.num_steps=10",
                             "analysis.report_steps=[10]", "analysis.num_vectors=1", subdir="one"))
    assert "uncertainty" not in single.get("tables", {})
    assert not any(k.endswith("_stderr_m10") for k in single["metrics"])
    assert any("no error estimate" in note for note in single["notes"])


@pytest.mark.slow
def test_interval_coverage_over_repetitions():
    """200 seeded repetitions of k = 10 Gaussian start vectors on a 200 x 200 matrix with a known,
    gapped spectrum: the 95% intervals of the normalised trace and the negative mass cover the truth
    in at least 90% of them."""
    n, k, repetitions = 200, 10, 200
    eigenvalues = gapped_spectrum(n)
    a = rotated(eigenvalues, seed=11)
    truth = {"normalised_trace": float(eigenvalues.mean()),
             "negative_mass": float((eigenvalues < 0).double().mean())}
    covered = {name: 0 for name in truth}
    for rep in range(repetitions):
        result = lanczos(lambda x: a @ x, n, 30, num_vectors=k, seed=1000 + rep)
        rows = uncertainty(SpectralMeasure.per_vector(result))
        for name, value in truth.items():
            covered[name] += rows[name]["ci95_low"] <= value <= rows[name]["ci95_high"]
    coverage = {name: count / repetitions for name, count in covered.items()}
    print(f"95% interval coverage over {repetitions} repetitions of {k} vectors: {coverage}")
    assert all(c >= 0.90 for c in coverage.values()), coverage


def test_network_analysis_saves_errors_per_operator(tmp_path):
    from experiments.run import dispatch
    from tests.conftest import make_cfg
    small = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200",
             "analysis.num_steps=10", "operator.batch_size=64", "analysis.exact_max_dim=0"]
    cfg = make_cfg(tmp_path / "three", small + ["analysis.num_vectors=3"])
    dispatch(cfg)
    saved = json.loads((Path(cfg.output_dir) / "results.json").read_text())
    m = saved["metrics"]
    assert m["hessian_normalised_trace_stderr"] > 0 and m["hessian_negative_mass_stderr"] >= 0
    assert m["hessian_normalised_trace_ci95_low"] <= m["hessian_normalised_trace"] <= \
        m["hessian_normalised_trace_ci95_high"]
    assert "hessian_negative_ritz_count" in m and "hessian_negative_count" not in m
    rows = {(r["operator"], r["quantity"]): r for r in saved["tables"]["uncertainty"]}
    assert rows["hessian", "max_ritz_value"]["value"] == pytest.approx(m["hessian_max_ritz_value"])
    single = dispatch(make_cfg(tmp_path / "one", small + ["analysis.num_vectors=1"]))
    assert "hessian_normalised_trace_stderr" not in single["metrics"]
    assert any(n.startswith("hessian: normalised_trace from one start vector has no error estimate")
               for n in single["notes"])
