"""analysis=theory and curvature.theory against closed forms: Table 1, Thms. 1 and 2, Lemma 1."""

import csv
import json
import math

import pytest
import torch

from curvature import theory as T
from curvature.lanczos import lanczos, random_start_vectors
from curvature.random_matrices import synthetic_spectrum_eigenvalues, wigner
from experiments.run import dispatch
from experiments.validate import ConfigError
from tests.conftest import make_cfg


# --- Table 1 ---------------------------------------------------------------------------------
def test_chebyshev_recurrence_matches_the_trigonometric_and_hyperbolic_forms():
    for j in range(12):
        for x in (1.0, 1.02, 2.0, 3.5):
            assert T.chebyshev_t(j, x) == pytest.approx(math.cosh(j * math.acosh(x)), rel=1e-12)
        for x in (-0.9, 0.0, 0.3):
            assert T.chebyshev_t(j, x) == pytest.approx(math.cos(j * math.acos(x)), abs=1e-12)


def test_table1_terms_reproduce_golub_van_loan_to_the_printed_digits():
    assert T.chebyshev_t(4, 2.0) == 97.0
    assert T.lanczos_bound_term(1.5, 5) == 1 / 97 ** 2
    assert f"{T.lanczos_bound_term(1.5, 5):.2e}" == "1.06e-04"
    assert T.power_bound_term(1.5, 5) == pytest.approx(1.5 ** -8, rel=1e-15)
    assert f"{T.power_bound_term(1.5, 5):.1e}" == "3.9e-02"
    rows = T.table1_rows([1.5, 1.1, 1.01], [5, 10, 15, 20, 25])
    assert len(rows) == 15 and all(r["lanczos"] < r["power"] for r in rows)
    with pytest.raises(ValueError):
        T.lanczos_bound_term(0.9, 5)


def test_power_iteration_gives_rayleigh_quotients_of_krylov_powers():
    a = wigner(40, seed=0) + 3 * torch.eye(40, dtype=torch.float64)
    q = random_start_vectors(40, 1, seed=1)[:, 0]
    gammas = T.power_iteration(lambda x: a @ x, q, 6)
    for k in range(1, 7):
        x = torch.linalg.matrix_power(a, k - 1) @ q
        assert float(gammas[k - 1]) == pytest.approx(float(x @ a @ x / (x @ x)), rel=1e-12)


def test_table1_run_writes_the_closed_form_table_and_the_bounds_hold(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=table1", "analysis.table1.empirical_dim=200"]))
    with open(tmp_path / "table1.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert list(rows[0]) == ["ratio", "k", "lanczos", "power"] and len(rows) == 15
    for row in rows:
        r, k = float(row["ratio"]), int(row["k"])
        assert float(row["lanczos"]) == pytest.approx(1 / math.cosh((k - 1) * math.acosh(2 * r - 1)) ** 2,
                                                      rel=1e-10)
        assert float(row["power"]) == pytest.approx(r ** (-2 * (k - 1)), rel=1e-12)
    markdown = (tmp_path / "table1.md").read_text()
    assert "| 1.5 | 5 | 1.06e-04 | 3.90e-02 |" in markdown
    assert results["table_files"] == ["table1.csv", "table1.md"]
    assert results["all_checks_passed"], results["checks"]
    assert {"table1_lanczos_r1.5_k5", "table1_power_r1.5_k5", "lanczos_within_bound",
            "power_within_bound", "lanczos_beats_power"} <= set(results["checks"])
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["tables"]["table1"][0] == {"ratio": 1.5, "k": 5, "lanczos": 1 / 97 ** 2,
                                            "power": pytest.approx(1.5 ** -8)}


# --- Thm. 1 ----------------------------------------------------------------------------------
def test_thm1_shifted_ritz_values_equal_the_unshifted_to_1e8(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=thm1", "dataset.n=200"]))
    assert set(results["checks"]) == {"thm1_mu-10", "thm1_mu10"}
    for mu in ("-10", "10"):
        assert results["metrics"][f"ritz_shift_gap_mu{mu}"] <= 1e-8
        assert results["metrics"][f"ritz_weight_gap_mu{mu}"] <= 1e-8
    assert results["all_checks_passed"]


def test_thm1_check_can_fail_in_float32(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=thm1", "dataset.n=200", "dtype=float32"]))
    assert not results["all_checks_passed"]


# --- Thm. 2 ----------------------------------------------------------------------------------
def test_matching_pairs_the_ith_largest_values():
    eig = torch.tensor([0.0, 1.0, 2.0, 5.0, 9.0], dtype=torch.float64)
    assert T.top_eigenvalue_matches(torch.tensor([9.0, 5.0, 2.0]), eig, 1e-9).tolist() == [True] * 3
    assert T.top_eigenvalue_matches(torch.tensor([9.0, 4.0, 0.5]), eig, 0.1).tolist() == [True, False, False]


def test_full_lanczos_matches_every_eigenvalue_so_the_count_can_reach_m():
    eig = synthetic_spectrum_eigenvalues(40, seed=0, zero_fraction=0.0)
    a = torch.diag(eig)
    res = lanczos(lambda x: a @ x, 40, 40, seed=0)
    assert bool(T.top_eigenvalue_matches(res.ritz_values[0], eig, 1e-8).all())


def test_thm2_count_is_below_m(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=thm2", "dataset.n=300", "analysis.thm2.num_draws=5"]))
    m = results["config"]["analysis"]["thm2"]["num_steps"]
    assert results["metrics"]["matched_max"] < m
    assert results["metrics"]["matched_min"] >= 5  # the five positive outliers are always found
    assert results["all_checks_passed"]


# --- Lemma 1 ---------------------------------------------------------------------------------
def test_sphere_quadratic_form_std_matches_monte_carlo():
    eig = torch.tensor([-1.0, 0.0, 0.5, 2.0, 3.0], dtype=torch.float64)
    u = torch.randn(5, 200_000, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    u = u / u.norm(dim=0)
    forms = T.quadratic_forms(lambda x: eig.unsqueeze(-1) * x, u, [1, 2])
    for k in (1, 2):
        assert float(forms[k].mean()) == pytest.approx(float(eig.pow(k).mean()), rel=0.01)
        moments = T.power_moments(torch.diag(eig), k)
        assert moments == pytest.approx((float(eig.pow(k).mean()), float(eig.pow(2 * k).mean())))
        assert float(forms[k].std()) == pytest.approx(T.sphere_quadratic_form_std(*moments, 5), rel=0.01)


def test_loglog_slope_recovers_a_power_law():
    n = [10.0, 100.0, 1000.0]
    slope, intercept = T.loglog_slope(n, [3 * x ** -0.5 for x in n])
    assert slope == pytest.approx(-0.5) and math.exp(intercept) == pytest.approx(3.0)


def test_lemma1_slope_on_a_small_range(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=lemma1", "analysis.lemma1.sizes=[50,100,200,400,800]",
                                           "analysis.lemma1.num_draws=40"]))
    for k in (2, 4):
        assert results["metrics"][f"slope_k{k}"] == pytest.approx(-0.5, abs=0.2)
        assert results["metrics"][f"exact_slope_k{k}"] == pytest.approx(-0.5, abs=0.1)  # finite-n moments
    assert results["all_checks_passed"]


# --- bad input -------------------------------------------------------------------------------
@pytest.mark.parametrize("overrides,key", [
    (["analysis=theory", "analysis.claim=nope"], "analysis.claim"),
    (["experiment=table1", "analysis.table1.ratios=[1.5,0.9]"], "analysis.table1.ratios"),
    (["experiment=table1", "analysis.table1.empirical_steps=2000"], "analysis.table1.empirical_steps"),
    (["experiment=thm1", "analysis.thm1.tolerance=-1"], "analysis.thm1.tolerance"),
    (["experiment=thm2", "analysis.thm2.num_steps=5000"], "analysis.thm2.num_steps"),
    (["experiment=lemma1", "analysis.lemma1.sizes=[100]"], "analysis.lemma1.sizes"),
    (["experiment=lemma1", "dataset=synthetic_spectrum"], "dataset.name"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        dispatch(make_cfg(tmp_path, overrides))
    assert info.value.key == key and key in str(info.value) and "\n" not in str(info.value)
    assert not (tmp_path / "results.json").exists()
