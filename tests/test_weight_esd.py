"""analysis=weight_esd: WeightWatcher's layer metrics against closed forms, planted spectra, the
``powerlaw`` and ``weightwatcher`` packages (when installed), and the real command line."""

import csv
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvature.errors import SuiteError
from curvature.models import get_model
from curvature.training import save_checkpoint
from curvature.weight_esd import (ESDSettings, LayerMatrices, analyze_model, analyze_unit, compute_esd,
                                  conv2d_matrices, fit_power_law, jensen_shannon_distance, layer_matrices,
                                  marchenko_pastur_cdf)
from experiments import validate as V
from experiments.run import dispatch
from tests.conftest import DEVICES, make_cfg, require, run_cli

sys.path.insert(0, str(Path(__file__).parent))
from wandb_files import read_run  # noqa: E402


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _haar(n, m, seed):
    """n x m with orthonormal columns, Haar distributed (sign-fixed QR of a Gaussian)."""
    q, r = torch.linalg.qr(torch.randn(n, m, generator=_gen(seed), dtype=torch.float64))
    return q * torch.sign(torch.diagonal(r))


def _planted(eigenvalues, n, seed=0):
    """An n x M matrix whose W^T W has exactly the given M eigenvalues."""
    m = len(eigenvalues)
    root = torch.diag(torch.as_tensor(np.sqrt(eigenvalues), dtype=torch.float64))
    return _haar(n, m, seed) @ root @ _haar(m, m, seed + 1).T


def _pareto_quantiles(alpha, m):
    """The m quantiles (k - 1/2)/m of p(x) = (alpha - 1) x^-alpha on x >= 1."""
    return (1 - (np.arange(m) + 0.5) / m) ** (-1 / (alpha - 1))


def _unit(w, name="w"):
    return LayerMatrices(0, name, "linear", tuple(w.shape), [w if w.shape[0] >= w.shape[1] else w.T])


# --- matricisation and eigenvalues ----------------------------------------------------------------
def test_conv2d_matricisations_hold_the_documented_matrices():
    w = torch.randn(6, 4, 3, 2, generator=_gen(0), dtype=torch.float64)
    slices = conv2d_matrices(w, "slices")
    assert len(slices) == 1 and len(slices[0]) == 6 and slices[0][0].shape == (6, 4)
    assert torch.equal(slices[0][3], w[:, :, 1, 1])  # slice index i * k_w + j
    per_slice = conv2d_matrices(w, "per_slice")
    assert [len(g) for g in per_slice] == [1] * 6
    (unfold,), = conv2d_matrices(w, "unfold")
    assert unfold.shape == (24, 6) and torch.equal(unfold, w.reshape(6, -1).T)  # 6 x (4*3*2), oriented N >= M
    model = nn.Sequential(nn.Conv2d(4, 6, (3, 2)), nn.Flatten(), nn.Linear(6, 5))
    labels = [u.label for u in layer_matrices(model, "per_slice")]
    assert labels == [f"0[{i},{j}]" for i in range(3) for j in range(2)] + ["2"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("mode", ["slices", "per_slice", "unfold"])
def test_esd_is_the_squared_singular_values_and_sums_to_the_frobenius_norm(mode, device):
    conv = nn.Conv2d(5, 7, 3).to(torch.float64).to(device)
    units = layer_matrices(nn.Sequential(conv), mode)
    total = 0.0
    for unit in units:
        esd = compute_esd(unit.matrices, ESDSettings())
        expected = np.sort(np.concatenate([np.linalg.svd(w.cpu().numpy(), compute_uv=False) ** 2
                                           for w in unit.matrices]))
        np.testing.assert_allclose(esd.eigenvalues, expected, rtol=1e-10, atol=1e-14)
        assert esd.method == "svd" and esd.trace == pytest.approx(expected.sum(), rel=1e-12)
        total += esd.trace
    assert total == pytest.approx(float((conv.weight.detach() ** 2).sum()), rel=1e-12)


def test_lanczos_gives_the_top_eigenvalues_of_a_large_layer():
    eigenvalues = np.concatenate([np.linspace(0.1, 1.0, 200), _pareto_quantiles(3.0, 100) + 1.0])
    w = _planted(eigenvalues, 400)
    exact = compute_esd([w], ESDSettings())
    approx = compute_esd([w], ESDSettings(svd_max_dim=100, lanczos_steps=120))
    assert approx.method == "lanczos" and approx.num_eigenvalues == 300
    k = len(approx.eigenvalues)
    assert k >= 20
    np.testing.assert_allclose(approx.eigenvalues, exact.eigenvalues[-k:], rtol=1e-8)
    assert approx.trace == pytest.approx(exact.trace, rel=1e-12)
    assert math.isclose(approx.ritz_weights.sum(), 1.0, rel_tol=1e-12)
    row = analyze_unit(_unit(w), ESDSettings(svd_max_dim=100, lanczos_steps=120)).row
    assert row["method"] == "lanczos" and row["num_computed"] >= 20
    assert row["log_norm"] == pytest.approx(math.log10(exact.trace), rel=1e-12)
    assert row["lambda_max"] == pytest.approx(exact.lambda_max, rel=1e-10)


def test_pooled_lanczos_keeps_only_the_complete_top_of_the_pooled_esd():
    slices = [_planted(_pareto_quantiles(3.0, 150) * (1 + 0.3 * s), 200, seed=2 * s) for s in range(3)]
    exact = compute_esd(slices, ESDSettings())
    approx = compute_esd(slices, ESDSettings(svd_max_dim=100, lanczos_steps=60))
    k = len(approx.eigenvalues)
    assert k >= 10 and approx.num_eigenvalues == 450
    np.testing.assert_allclose(approx.eigenvalues, exact.eigenvalues[-k:], rtol=1e-8)


def test_nan_weights_fail_and_all_zero_layers_are_skipped():
    model = nn.Sequential(nn.Linear(30, 40), nn.Linear(40, 20))
    nn.init.zeros_(model[1].weight)
    with pytest.warns(UserWarning, match="layer 1 is all zeros"):
        assert [a.unit.name for a in analyze_model(model)] == ["0"]
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")
    with pytest.raises(SuiteError, match="layer 0 has NaN or Inf weights"):
        analyze_model(model)


# --- the power-law fit ------------------------------------------------------------------------------
def _reference_fit(x):
    """Clauset et al. (2009) written out term by term, the powerlaw package's KS convention."""
    x = np.sort(x)
    best = None
    for xmin in np.unique(x)[:-1]:
        tail = x[x >= xmin]
        n = len(tail)
        alpha = 1 + n / sum(math.log(v / xmin) for v in tail)
        d = max(abs(1 - (v / xmin) ** (1 - alpha) - i / n) for i, v in enumerate(tail))
        if best is None or d < best[2]:
            best = (alpha, xmin, d)
    return best


def test_power_law_fit_equals_the_clauset_formulas_written_out():
    x = np.random.default_rng(1).pareto(2.0, 300) + 1.0
    fit = fit_power_law(x)
    alpha, xmin, d = _reference_fit(x)
    assert (fit.alpha, fit.xmin, fit.ks_distance) == pytest.approx((alpha, xmin, d), rel=1e-10)
    fixed = fit_power_law([1.0, math.e, math.e ** 2, math.e ** 3], xmin=1.0)
    assert fixed.alpha == pytest.approx(1 + 4 / 6)  # 1 + n / sum ln(x / xmin) = 1 + 4 / (0 + 1 + 2 + 3)


@pytest.mark.filterwarnings("ignore:Standard error for the MLE")
def test_power_law_fit_matches_the_powerlaw_package():
    powerlaw = require("powerlaw")
    rng = np.random.default_rng(0)
    for n, alpha in ((60, 4.4), (300, 2.6), (400, 5.3)):
        x = np.concatenate([rng.uniform(0.1, 1, n // 2), (1 - rng.uniform(size=n // 2)) ** (-1 / (alpha - 1))])
        ours = fit_power_law(x)
        # powerlaw >= 2.0 rejects alpha >= 3 unless its parameter range is widened
        theirs = powerlaw.Fit(x, verbose=False, parameter_ranges={"alpha": [1, 100]})
        assert ours.alpha == pytest.approx(theirs.alpha, rel=1e-9)
        assert ours.xmin == theirs.xmin and ours.ks_distance == pytest.approx(theirs.D, rel=1e-9)


@pytest.mark.parametrize("alpha", [2.5, 3.5, 4.5])
def test_planted_power_law_spectrum_gives_back_its_alpha(alpha):
    w = _planted(_pareto_quantiles(alpha, 400), 600)
    row = analyze_unit(_unit(w), ESDSettings()).row
    assert abs(row["alpha"] - alpha) < 0.2
    assert row["xmin"] == pytest.approx(1.0, rel=0.01) and row["num_tail"] == 400
    assert row["warning"] == ""
    lam = np.linalg.eigvalsh((w.T @ w).numpy())
    assert row["log_norm"] == pytest.approx(math.log10(lam.sum()), rel=1e-10)
    assert row["log_spectral_norm"] == pytest.approx(math.log10(lam.max()), rel=1e-10)
    assert row["stable_rank"] == pytest.approx(lam.sum() / lam.max(), rel=1e-10)
    assert row["alpha_weighted"] == pytest.approx(row["alpha"] * math.log10(lam.max()), rel=1e-10)
    assert row["log_alpha_norm"] == pytest.approx(math.log10(np.sum(lam ** row["alpha"])), rel=1e-8)


@pytest.mark.parametrize("alpha,warning", [(1.6, "over-trained"), (7.5, "under-trained")])
def test_alpha_outside_2_to_6_is_flagged(alpha, warning):
    row = analyze_unit(_unit(_planted(_pareto_quantiles(alpha, 200), 200)), ESDSettings()).row
    assert row["warning"].startswith(warning)


# --- Marchenko-Pastur, randomisation, traps --------------------------------------------------------
@pytest.mark.parametrize("q", [1.0, 2.0, 5.0])
def test_marchenko_pastur_cdf_has_the_closed_form_moments(q):
    x, cdf = marchenko_pastur_cdf(q)
    mid, mass = (x[1:] + x[:-1]) / 2, np.diff(cdf)
    assert np.sum(mid * mass) == pytest.approx(1.0, abs=1e-6)               # E[x] = 1
    assert np.sum(mid ** 2 * mass) == pytest.approx(1.0 + 1.0 / q, abs=1e-5)  # E[x^2] = 1 + y
    assert x[-1] == pytest.approx((1 + q ** -0.5) ** 2)


def test_gaussian_matrix_follows_marchenko_pastur_and_has_no_trap():
    std = 0.3
    w = std * torch.randn(800, 400, generator=_gen(2), dtype=torch.float64)
    a = analyze_unit(_unit(w), ESDSettings(randomize=True), seed=0)
    row = a.row
    assert row["mp_sigma"] == pytest.approx(std, rel=0.02)
    assert row["mp_ks_distance"] < 0.03
    assert row["mp_lambda_plus"] == pytest.approx(std ** 2 * (800 ** 0.5 + 400 ** 0.5) ** 2, rel=0.04)
    assert row["num_spikes"] == 0 and row["num_traps"] == 0
    assert row["mp_softrank"] == pytest.approx(1.0, abs=0.05)
    assert row["rand_distance"] < 0.02


def test_planted_large_element_is_a_correlation_trap():
    w = torch.randn(600, 400, generator=_gen(3), dtype=torch.float64)
    w[17, 123] = 100.0  # lambda ~ 1e4, far beyond the MP edge (sqrt 600 + sqrt 400)^2 ~ 2e3
    row = analyze_unit(_unit(w), ESDSettings(randomize=True), seed=0).row
    assert row["num_traps"] == 1 and row["num_spikes"] == 1
    assert row["rand_lambda_max"] == pytest.approx(1e4, rel=0.1)


def test_low_rank_signal_gives_spikes_but_no_trap():
    """A rank-3 signal beyond the BBP threshold (NM)^(1/4) is correlation, which shuffling destroys."""
    n, m = 600, 400
    w = torch.randn(n, m, generator=_gen(4), dtype=torch.float64)
    w = w + _haar(n, 3, 5) @ torch.diag(torch.tensor([70.0, 80.0, 90.0], dtype=torch.float64)) @ _haar(m, 3, 6).T
    row = analyze_unit(_unit(w), ESDSettings(randomize=True), seed=0).row
    assert row["num_spikes"] == 3 and row["num_traps"] == 0
    gaussian = analyze_unit(_unit(torch.randn(n, m, generator=_gen(7), dtype=torch.float64)),
                            ESDSettings(randomize=True), seed=0).row
    assert row["rand_distance"] > 5 * gaussian["rand_distance"]


def test_jensen_shannon_distance_closed_forms():
    assert jensen_shannon_distance([1, 0], [0, 1]) == pytest.approx(math.sqrt(math.log(2)))
    assert jensen_shannon_distance([1, 2, 3], [2, 4, 6]) == pytest.approx(0.0, abs=1e-12)
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    m = (p + q) / 2
    kl = lambda a: float(np.sum(a * np.log(a / m)))  # noqa: E731
    assert jensen_shannon_distance(p, q) == pytest.approx(math.sqrt((kl(p) + kl(q)) / 2))


# --- agreement with the weightwatcher package ---------------------------------------------------------
METRICS = {"alpha": "alpha", "xmin": "xmin", "D": "ks_distance", "sigma": "alpha_sigma",
           "log_norm": "log_norm", "log_spectral_norm": "log_spectral_norm", "stable_rank": "stable_rank",
           "alpha_weighted": "alpha_weighted", "log_alpha_norm": "log_alpha_norm", "num_pl_spikes": "num_tail"}
NORM_METRICS = ("log_norm", "log_spectral_norm", "stable_rank")


def _compare_with_weightwatcher(model: nn.Module, pool: bool) -> int:
    """Every unit WeightWatcher analyses has our metrics to 1e-8; returns how many it analysed."""
    ww = require("weightwatcher")
    # conv2d_norm=False: WeightWatcher would otherwise scale Conv2d slices by sqrt(1/2)
    details = ww.WeightWatcher(model=model).analyze(conv2d_norm=False, pool=pool)
    ours = {(r.row["name"], r.row["slice"]): r.row
            for r in analyze_model(model, ESDSettings(conv2d="slices" if pool else "per_slice"))}
    for _, theirs in details.iterrows():
        slice_id, kw = int(theirs.get("slice_id", 0)), 3
        key = (theirs["longname"], f"{slice_id // kw},{slice_id % kw}" if not pool and theirs["rf"] > 1 else "")
        row = ours[key]
        assert row["num_eigenvalues"] == theirs["num_evals"]
        # below 20 eigenvalues WeightWatcher switches to its own small-sample alpha estimator
        names = METRICS if theirs["num_evals"] >= 20 else NORM_METRICS
        for their_name in names:
            assert row[METRICS[their_name]] == pytest.approx(theirs[their_name], rel=1e-8, abs=1e-12), \
                (key, their_name)
    return len(details)


WW_WARNINGS = ("ignore:Standard error for the MLE", "ignore:Passing a dict to DataFrame.from_records")


@pytest.mark.filterwarnings(*WW_WARNINGS)
@pytest.mark.parametrize("pool", [True, False])
def test_agrees_with_the_weightwatcher_package(pool):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 24, 3), nn.ReLU(), nn.Conv2d(24, 40, 3), nn.Flatten(),
                          nn.Linear(160, 96), nn.Linear(96, 30))
    with torch.no_grad():
        model[4].weight.mul_(torch.linspace(0.2, 3, 160) ** 2)  # give one layer a heavy tail
    assert _compare_with_weightwatcher(model, pool) >= 4


@pytest.mark.slow
@pytest.mark.filterwarnings(*WW_WARNINGS)
def test_agrees_with_the_weightwatcher_package_on_vgg11():
    torch.manual_seed(0)
    assert _compare_with_weightwatcher(get_model("vgg11", 10, width=0.25), pool=True) == 11


# --- the analysis ----------------------------------------------------------------------------------
def _checkpoints(folder: Path, epochs=(1, 2, 3)) -> Path:
    """checkpoint-XXXXX.pt files of the digits CNN whose last layer grows a heavy tail."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    model = get_model("cnn", 10)
    for epoch in epochs:
        with torch.no_grad():
            model.fc.weight.mul_(torch.linspace(0.5, 2.0, model.fc.weight.shape[1]))
        save_checkpoint(folder / f"checkpoint-{epoch:05d}.pt", {"model": model.state_dict(), "epoch": epoch})
    return folder


def test_cli_over_a_checkpoint_folder_writes_csv_results_figures_and_wandb(tmp_path):
    folder = _checkpoints(tmp_path / "train")
    out = tmp_path / "run"
    proc = run_cli("analysis=weight_esd", "dataset=digits", "model=cnn", f"analysis.checkpoints_dir={folder}",
                   "analysis.conv2d=unfold", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    with open(out / results["csv"]) as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["epoch"], r["name"]) for r in rows] == \
        [(str(e), n) for e in (1, 2, 3) for n in ("features.0", "features.2", "fc")]
    assert {r["method"] for r in rows} == {"svd"} and rows[0]["M"] == "9"  # unfold: 16 x (1*3*3)
    final = results["tables"]["layers"]
    assert [r["name"] for r in final] == ["features.0", "features.2", "fc"]
    alphas = [r["alpha"] for r in final if r["alpha"] is not None]  # NaN (too few eigenvalues) is null
    assert len(alphas) == 2 and results["metrics"]["alpha_mean"] == pytest.approx(np.mean(alphas))
    assert [h["epoch"] for h in results["tables"]["training"]] == [1, 2, 3]
    for stem in ("esd_layers", "correlation_flow", "alpha_over_training"):
        assert (out / f"{stem}.png").stat().st_size > 1000 and (out / f"{stem}.pdf").is_file()
    with np.load(out / "arrays.npz") as arrays:
        assert arrays["alpha_over_training"].shape == (3, 3)
        assert arrays["shuffled_eigenvalues_001"].shape == arrays["eigenvalues_001"].shape == (32,)
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    logged = read_run(run_dir)
    for name, value in results["metrics"].items():
        assert logged["summary"][f"metrics/{name}"] == pytest.approx(value)
    steps = [row for row in logged["history"] if "weight_esd/alpha_mean" in row]
    assert [row["_step"] for row in steps] == [1, 2, 3]
    assert "weight_esd-layers" in logged["artifacts"]


def test_single_checkpoint_and_initialisation(tmp_path):
    folder = _checkpoints(tmp_path / "train", epochs=(4,))
    results = dispatch(make_cfg(tmp_path / "one", ["analysis=weight_esd", "dataset=digits", "model=cnn",
                                                     f"analysis.checkpoint={folder / 'checkpoint-00004.pt'}",
                                                     "analysis.randomize=false"]))
    assert results["sources"] == ["checkpoint-00004.pt"] and "training" not in results["tables"]
    assert "rand_distance" not in results["tables"]["layers"][0]
    init = dispatch(make_cfg(tmp_path / "init", ["analysis=weight_esd", "dataset=digits", "model=mlp"]))
    assert init["sources"] == ["init"] and any("initialisation" in n for n in init["notes"])


@pytest.mark.parametrize("overrides,key", [
    (["analysis.conv2d=diagonal"], "analysis.conv2d"),
    (["analysis.checkpoints_dir=/no/such/folder"], "analysis.checkpoints_dir"),
    (["analysis.checkpoint=/no/such.pt"], "analysis.checkpoint"),
    (["analysis.checkpoint=/a.pt", "analysis.checkpoints_dir=/b"], "analysis.checkpoint"),
    (["analysis.alpha_high=1.5"], "analysis.alpha_high"),
    (["analysis.min_evals=1"], "analysis.min_evals"),
    (["dataset=wigner"], "dataset"),
])
def test_bad_config_is_a_one_line_error_naming_the_key(tmp_path, overrides, key):
    base = ["analysis=weight_esd", "dataset=digits", "model=cnn"]
    with pytest.raises(V.ConfigError) as error:
        dispatch(make_cfg(tmp_path, base + overrides))
    assert error.value.key == key and "\n" not in str(error.value)
    assert not (tmp_path / "results.json").exists()


def test_empty_folder_and_mismatched_checkpoint_fail_cleanly(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(V.ConfigError, match="holds no checkpoint"):
        dispatch(make_cfg(tmp_path / "a", ["analysis=weight_esd", "dataset=digits", "model=cnn",
                                           f"analysis.checkpoints_dir={tmp_path / 'empty'}"]))
    folder = _checkpoints(tmp_path / "train", epochs=(1,))
    proc = run_cli("analysis=weight_esd", "dataset=digits", "model=mlp", "logger=none",
                   f"analysis.checkpoints_dir={folder}", f"hydra.run.dir={tmp_path / 'b'}")
    assert proc.returncode == 2 and "does not fit the chosen model" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "b" / "results.json").exists()
    assert not (tmp_path / "b" / "weight_esd_layers.csv").exists()
    assert issubclass(V.ConfigError, SuiteError)
