"""Thm. 5: Gaussian smoothing biases the moments - closed form, quadrature and analysis=kernel_smoothing."""

import math

import numpy as np
import pytest
import torch

from curvature import theory as T
from curvature.spectrum import SpectralMeasure, sigma_from_scaled_variance
from experiments.run import dispatch
from experiments.validate import ConfigError
from tests.conftest import make_cfg


def _measure():
    return SpectralMeasure(torch.tensor([-3.0, 0.0, 0.5, 2.0, 40.0], dtype=torch.float64),
                           torch.tensor([0.1, 0.5, 0.2, 0.15, 0.05], dtype=torch.float64))


def test_gaussian_moments():
    s = 0.7
    assert [T.gaussian_moment(j, s) for j in range(7)] == pytest.approx(
        [1.0, 0.0, s ** 2, 0.0, 3 * s ** 4, 0.0, 15 * s ** 6])


def test_smoothed_moments_reduce_to_the_paper_formulas():
    m = _measure().moments(4)
    s = 0.3
    assert T.smoothed_moment(m, 1, s) == pytest.approx(m[1])
    assert T.smoothing_moment_bias(m, 2, s) == pytest.approx(s ** 2)
    assert T.smoothing_moment_bias(m, 3, s) == pytest.approx(3 * s ** 2 * m[1])
    assert T.smoothing_moment_bias(m, 4, s) == pytest.approx(6 * s ** 2 * m[2] + 3 * s ** 4)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 3.0])
def test_quadrature_of_the_smoothed_density_matches_theorem_5(sigma):
    mu = _measure()
    measured = T.smoothed_density_moments(mu, sigma, 8)
    exact = mu.moments(8)
    for k in range(9):
        assert abs(measured[k] - T.smoothed_moment(exact, k, sigma)) <= 1e-10 * max(40.0, sigma) ** k


def test_a_point_mass_smooths_to_the_gaussian():
    point = SpectralMeasure(torch.tensor([0.0]), torch.tensor([1.0]))
    assert T.smoothed_density_moments(point, 0.4, 4) == pytest.approx([1, 0, 0.16, 0, 3 * 0.4 ** 4], abs=1e-14)
    assert T.smoothed_mass(point, 0.4, -0.4, 0.4) == pytest.approx(math.erf(1 / math.sqrt(2)))


def test_bandwidth_converters_are_inverse():
    for v, lo, hi in [(1e-5, -10.0, 60.0), (1e-3, 0.0, 0.5)]:
        sigma = sigma_from_scaled_variance(v, lo, hi)
        assert T.scaled_variance_from_sigma(sigma, lo, hi) == pytest.approx(v)


def test_thm5_holds_on_exact_and_lanczos_spectra(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=thm5", "dataset.n=200"]))
    assert results["spectra"] == ["exact", "lanczos"]
    assert results["all_checks_passed"], results["checks"]
    for name in ("exact", "lanczos"):
        bands = results["tables"][f"{name}_bandwidths"]
        assert len(bands) == 6 and {b["given_as"] for b in bands} == {"std", "scaled_variance"}
        with np.load(tmp_path / "arrays.npz") as arrays:
            lo, hi = float(arrays[f"{name}_nodes"].min()), float(arrays[f"{name}_nodes"].max())
        pyhessian = [b for b in bands if b["given_as"] == "scaled_variance"][0]
        assert pyhessian["sigma"] == pytest.approx(sigma_from_scaled_variance(1e-5, lo, hi))
        for b in bands:  # both conventions describe the same kernel
            assert b["sigma"] == pytest.approx(sigma_from_scaled_variance(b["scaled_variance"], lo, hi))
        rows = [r for r in results["tables"][f"{name}_moments"] if r["k"] == 2]
        assert all(r["bias"] == pytest.approx(r["sigma"] ** 2, rel=1e-8) for r in rows)
        zero = [b["zero_mass"] for b in bands]
        assert zero == sorted(zero, reverse=True)  # wider kernels smear more of the atom away
    assert (tmp_path / "kernel_smoothing.png").is_file() and (tmp_path / "moment_bias.png").is_file()


def test_thm5_check_can_fail(tmp_path, monkeypatch):
    """A kernel 1% wider than the sigma it claims (a convention slip) breaks the check."""
    real = T.smoothed_density
    monkeypatch.setattr(T, "smoothed_density", lambda measure, grid, sigma, **kw: real(measure, grid, 1.01 * sigma))
    results = dispatch(make_cfg(tmp_path, ["experiment=thm5", "dataset.n=200", "analysis.sigmas=[0.5]",
                                           "analysis.scaled_variances=null"]))
    assert not results["checks"]["thm5_exact"]["passed"]


def test_a_saved_spectrum_file_is_smoothed(tmp_path):
    spectrum_dir = tmp_path / "spectrum"
    dispatch(make_cfg(spectrum_dir, ["experiment=fig6", "dataset.n=200", "analysis.num_vectors=2"]))
    results = dispatch(make_cfg(tmp_path / "ks", ["analysis=kernel_smoothing",
                                                  f"analysis.spectrum_file={spectrum_dir}",
                                                  "analysis.sigmas=[0.2,1.0]"]))
    assert results["spectra"] == ["exact", "lanczos"] and results["all_checks_passed"]
    with np.load(spectrum_dir / "arrays.npz") as saved, np.load(tmp_path / "ks" / "arrays.npz") as smoothed:
        ritz = np.sort(saved["ritz_values"][saved["mask"]])
        assert np.allclose(np.sort(smoothed["lanczos_nodes"]), ritz)
        assert smoothed["lanczos_weights"].sum() == pytest.approx(1.0)


def test_a_network_spectrum_file_with_several_operators(tmp_path):
    """analysis=spectrum on a network writes <operator>_ritz_values etc.; each becomes a spectrum."""
    values = np.array([[-0.5, 0.0, 1.0, 30.0]])
    np.savez(tmp_path / "arrays.npz", hessian_ritz_values=values, ggn_ritz_values=np.abs(values),
             hessian_ritz_weights=np.array([[0.1, 0.6, 0.2, 0.1]]), ggn_ritz_weights=np.array([[0.5, 0.25, 0.25, 0.0]]),
             hessian_mask=np.ones((1, 4), bool), ggn_mask=np.array([[True, True, True, False]]))
    results = dispatch(make_cfg(tmp_path / "ks", ["experiment=thm5", f"analysis.spectrum_file={tmp_path}"]))
    assert results["spectra"] == ["ggn_lanczos", "hessian_lanczos"] and results["all_checks_passed"]
    with np.load(tmp_path / "ks" / "arrays.npz") as smoothed:
        assert smoothed["ggn_lanczos_nodes"].tolist() == [0.0, 0.5, 1.0]  # the masked node is gone
        assert smoothed["ggn_lanczos_weights"].tolist() == [0.25, 0.5, 0.25]


@pytest.mark.parametrize("overrides,key", [
    (["analysis.sigmas=[0.1,-0.5]"], "analysis.sigmas"),
    (["analysis.sigmas=[]", "analysis.scaled_variances=null"], "analysis.sigmas"),
    (["analysis.scaled_variances=[0]"], "analysis.scaled_variances"),
    (["analysis.spectrum_file=/no/such/arrays.npz"], "analysis.spectrum_file"),
    (["analysis.max_moment=0"], "analysis.max_moment"),
])
def test_bad_config_is_one_line_naming_the_key(overrides, key, tmp_path):
    with pytest.raises(ConfigError) as info:
        dispatch(make_cfg(tmp_path, ["experiment=thm5", "dataset.n=200", *overrides]))
    assert info.value.key == key and "\n" not in str(info.value)
    assert not (tmp_path / "results.json").exists()
