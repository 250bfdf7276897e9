"""paper_figures/: each script turns a fixture results folder into its PNG/PDF and its check line; the
driver runs presets through the real CLI, skips runs whose results exist for the same config, and
writes REPORT.md.

The fixtures below are written in the format of ``experiments.runtime.Run.finish`` (results.json with
config / metrics / checks / tables, arrays.npz) with tiny made-up spectra; the driver test runs the
real analyses end to end.
"""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np
import pytest

from experiments.run import dispatch
from paper_figures import common as C
from paper_figures import make_figures as M
from tests.conftest import make_cfg

RNG = np.random.default_rng(0)


def write_run(folder: Path, analysis: str, config: dict, checks: dict | None = None, arrays: dict | None = None,
              metrics: dict | None = None, tables: dict | None = None, **extra) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    results = {"analysis": analysis, "experiment": config.get("experiment_id"), "metrics": metrics or {},
               "checks": {k: {"value": v[0], "target": "fixture", "passed": v[1]} for k, v in (checks or {}).items()},
               "tables": tables or {}, "notes": [], "config": config, **extra,
               "provenance": {"device_name": "fixture cpu"}, "wall_time_s": 1.0}
    (folder / "results.json").write_text(json.dumps(results))
    if arrays:
        np.savez(folder / "arrays.npz", **arrays)
    return folder


def stem(m: int, low=-2.0, high=2.0):
    nodes = np.linspace(low, high, m)
    return nodes, np.full(m, 1.0 / m)


def matrix_run(folder, analysis, dataset, checks, arrays, **kw):
    return write_run(folder, analysis, {"dataset": dataset, "analysis": kw.pop("analysis_cfg", {})}, checks, arrays, **kw)


def spectrum_arrays(steps=(3, 6), exact=None, **more):
    arrays = {"exact_eigenvalues": RNG.normal(size=60) if exact is None else exact, **more}
    for m in steps:
        arrays[f"stem_nodes_m{m}"], arrays[f"stem_weights_m{m}"] = stem(m)
    return arrays


def network_arrays(names, vectors=1, m=5):
    arrays = {}
    for name in names:
        arrays[f"{name}_ritz_values"] = np.sort(RNG.normal(size=(vectors, m)), axis=1)
        arrays[f"{name}_ritz_weights"] = np.full((vectors, m), 1.0 / m)
        arrays[f"{name}_mask"] = np.ones((vectors, m), dtype=bool)
    return arrays


NET = {"model": {"name": "vgg16", "width": 0.0625}, "analysis": {"num_steps": 5, "num_vectors": 1, "checkpoint": None}}


def landscape_run(folder, dataset, ok):
    t = np.linspace(-1, 1, 5)
    rows, arrays = [], {"t": t}
    for label, kind, theta in (("largest", "ritz", 2.0), ("smallest", "ritz", -1.0), ("random_gaussian", "gaussian", None)):
        rows.append({"direction": label, "kind": kind, "ritz_value": theta, "model_curvature": theta or 0.1})
        for split in ("train", "test"):
            arrays[f"{label}_{split}_loss"] = 1.0 + (theta or 0.1) * t ** 2 / 2
            arrays[f"{label}_{split}_accuracy"] = 0.5 - 0.1 * t ** 2
    return write_run(folder, "landscape", {**NET, "dataset": {"name": dataset}, "analysis": {"bn_mode": "recompute"}},
                     {"loss_at_t0_consistent": (0.0, ok)}, arrays, tables={"directions": rows}, operator="hessian")


def blocks_run(folder, model: str, heterogeneity: float):
    """A spectrum run with analysis.blocks=layer: two blocks per operator and the saved number."""
    rows = [{"operator": op, "block": b, "num_params": 10} for op in ("ggn", "hessian") for b in ("(whole)", "a", "b")]
    arrays = {}
    for op in ("ggn", "hessian"):
        for i in range(2):  # network_arrays' keys x_ritz_values, x_ritz_weights, x_mask
            arrays.update({f"{op}_block{i}_{k[2:]}": v for k, v in network_arrays(("x",)).items()})
    return write_run(folder, "spectrum", {**NET, "model": {"name": model}, "dataset": {"name": "text"}}, {}, arrays,
                     tables={"blocks": rows}, metrics={"num_blocks": 2, "hessian_block_heterogeneity": heterogeneity,
                                                       "ggn_block_heterogeneity": heterogeneity / 2})


def fixture(artefact: str, root: Path, ok: bool = True) -> list[Path]:
    """A results folder (or folders) for one artefact; ``ok=False`` makes one of its checks fail."""
    if artefact == "fig2":
        return [matrix_run(root / "r", "spectrum", {"name": "wigner", "n": 60, "std": 1.0},
                           {"support_m6": (0.0, True), "edge_reach_m6": (0.01, True), "moments_m6": (0.02, ok)},
                           spectrum_arrays())]
    if artefact == "fig3":
        return [matrix_run(root / "r", "spectrum", {"name": "marchenko_pastur", "n": 60, "ratio": 2.0},
                           {"zero_mass_m6": (0.01, ok)}, spectrum_arrays(exact=np.abs(RNG.normal(size=60))))]
    if artefact == "fig4":
        return [matrix_run(root / f"{i}", "spectrum", {"name": "marchenko_pastur", "n": 60, "ratio": q},
                           {"support_m6": (0.0, True), "edge_reach_m6": (0.01, ok or i == 0)},
                           spectrum_arrays(exact=np.abs(RNG.normal(size=60)))) for i, q in enumerate((0.5, 0.25))]
    if artefact == "fig5":
        return [matrix_run(root / name, "diagonal", {"name": name, "n": 60}, {"lanczos_beats_diagonal": (9.0, ok)},
                           {"exact_eigenvalues": RNG.normal(size=60), "diagonal": RNG.normal(size=60) * 0.1,
                            "lanczos_stem_nodes": stem(6)[0], "lanczos_stem_weights": stem(6)[1]},
                           metrics={"wasserstein_diagonal": 0.5, "wasserstein_lanczos": 0.05})
                for name in ("marchenko_pastur", "wigner")]
    if artefact == "fig6":
        return [matrix_run(root / "r", "spectrum", {"name": "synthetic_spectrum", "n": 60},
                           {"top_outlier_m6": (1e-9, True), "diagonal_max": (0.1, True), "zero_mass_m6": (0.01, ok),
                            "zero_mass_diagonal": (0.5, True)}, spectrum_arrays(diagonal=RNG.normal(size=60)))]
    if artefact in ("fig7", "fig13"):
        dataset = {"name": "cifar100" if artefact == "fig7" else "cifar10", "fake": True}
        runs = [write_run(root / "s", "spectrum", {**NET, "dataset": dataset},
                          {"ggn_psd": (0.0, True), "hessian_negative_mass": (0.3, ok)},
                          network_arrays(("ggn", "hessian")), metrics={"num_samples": 64})]
        if artefact == "fig7":
            runs.append(write_run(root / "d", "diagonal", {**NET, "dataset": dataset, "analysis": {"num_samples": 1}},
                                  {"diagonal_max_differs": (0.5, True)}, {"diagonal": np.abs(RNG.normal(size=300))}))
        return runs
    if artefact == "fig8":
        return [write_run(root / "s", "spectrum", {**NET, "dataset": {"name": "cifar100"},
                                                   "analysis": {"num_steps": 5, "num_vectors": 2}},
                          {"hessian_vectors_max_ritz": (0.01, True), "hessian_vectors_min_ritz": (0.01, True),
                           "hessian_vectors_moments": (0.01, ok)}, network_arrays(("hessian",), vectors=2))]
    if artefact in ("fig9", "fig10", "fig11", "fig12"):
        return [landscape_run(root / "l", "cifar100" if artefact in ("fig9", "fig10") else "cifar10", ok)]
    if artefact == "table1":
        rows = [{"ratio": r, "k": k, "lanczos": r ** -(4 * k), "power": r ** -(2 * k)} for r in (1.5, 1.1) for k in (5, 10)]
        err = np.abs(RNG.normal(size=(2, 10))) * 1e-3
        return [write_run(root / "t", "theory", {"analysis": {"claim": "table1", "table1": {"empirical_dim": 50}}},
                          {"table1_lanczos_r1.5_k5": (1.06e-4, True), "table1_power_r1.5_k5": (3.9e-2, True),
                           "lanczos_within_bound": (0.0, True), "power_within_bound": (0.0, True),
                           "lanczos_beats_power": (0.0, ok)},
                          {"lanczos_error": err, "power_error": 2 * err, "lanczos_bound": 3 * err, "power_bound": 4 * err,
                           "ratios": np.array([1.5, 1.1]), "steps": np.arange(1, 11)}, tables={"table1": rows})]
    if artefact == "thm1":
        nodes, weights = stem(6)
        return [write_run(root / "t", "theory", {"dataset": {"name": "synthetic_spectrum", "n": 60},
                                                 "analysis": {"claim": "thm1", "thm1": {"num_steps": 6, "tolerance": 1e-8}}},
                          {"thm1_mu-10": (1e-14, True), "thm1_mu10": (1e-14, ok)},
                          {"ritz_values": nodes, "ritz_weights": weights, "shifts": np.array([-10.0, 10.0]),
                           "shifted_ritz_values_0": nodes - 10, "shifted_ritz_values_1": nodes + 10 + 1e-14})]
    if artefact == "thm2":
        matched = RNG.random((5, 6)) < 0.3
        return [write_run(root / "t", "theory", {"analysis": {"claim": "thm2"}}, {"thm2_matched": (2.0, ok)},
                          {"matched": matched, "matched_counts": matched.sum(1).astype(float),
                           "ritz_values": np.sort(RNG.normal(size=(5, 6)), 1), "mask": np.ones((5, 6), bool),
                           "top_eigenvalues": np.sort(RNG.normal(size=6))[::-1]})]
    if artefact == "thm5":
        nodes, weights = stem(6)
        moments = [{"k": k, "sigma": s, "bias": s ** k, "bias_formula": s ** k} for k in range(5) for s in (0.1, 1.0)]
        return [write_run(root / "t", "kernel_smoothing", {}, {"thm5_exact": (1e-15, ok)},
                          {"exact_nodes": nodes, "exact_weights": weights},
                          tables={"exact_moments": moments, "exact_bandwidths": [{"sigma": 0.1}, {"sigma": 1.0}]})]
    if artefact == "lemma1":
        sizes = np.array([50, 100, 200])
        return [write_run(root / name, "theory", {"dataset": {"name": name},
                                                  "analysis": {"claim": "lemma1", "lemma1": {"num_draws": 5}}},
                          {"lemma1_slope_k2": (-0.5, ok)},
                          {"sizes": sizes, "spread_k2": sizes ** -0.5, "exact_std_k2": sizes ** -0.5},
                          metrics={"slope_k2": -0.5}) for name in ("wigner", "marchenko_pastur")]
    if artefact == "cost":
        rows = [{"operator": n, "num_params": 1000, "num_samples": 64, "seconds_per_iteration": s,
                 "seconds_per_product": 0.9 * s, "peak_memory_bytes": 2 ** 20 * (100 if ok else 0),
                 "peak_memory_kind": "process_max_rss", "dtype": "float32"} for n, s in (("ggn", 0.1), ("hessian", 0.3))]
        return [write_run(root / "c", "spectrum", {**NET, "dataset": {"name": "cifar100"}}, {}, tables={"cost": rows})]
    if artefact == "blocks":
        return [blocks_run(root / model, model, h) for model, h in (("gpt_tiny", 0.3 if ok else 0.1), ("cnn", 0.2))]
    if artefact == "fig1":
        return fig1_fixture(root, [0.10, 0.12, 0.13] if ok else [0.10, 0.12, 0.30])
    if artefact == "edge_of_stability":
        return [edge_of_stability_run(root / "e", ok)]
    raise KeyError(artefact)


def edge_of_stability_run(folder: Path, ok: bool) -> Path:
    """Two variants whose sharpness rises to 2/eta; the failing one's MSE check failed in the run."""
    variants = [{"name": "mse_lr0.5", "loss": "mse", "lr": 0.5},
                {"name": "cross_entropy_lr1", "loss": "cross_entropy", "lr": 1.0}]
    arrays, rows = {}, []
    for v in variants:
        steps = np.arange(0, 110, 10)
        ratio = np.minimum(0.3 + 0.1 * np.arange(steps.size), 1.0)
        arrays.update({f"{v['name']}_steps": steps, f"{v['name']}_sharpness": ratio * 2 / v["lr"],
                       f"{v['name']}_loss": np.exp(-np.arange(101) / 50) * (1 + 0.05 * np.sin(np.arange(101)))})
        rows.append({"variant": v["name"], "final_ratio_median": 1.0, "final_ratio_min": 0.97, "final_ratio_max": 1.0})
    checks = {"mse_lr0.5_hovers_at_limit": (0.03, ok), "cross_entropy_lr1_reaches_limit": (1.0, True)}
    return write_run(folder, "edge_of_stability", {"experiment_id": "edge_of_stability"}, checks, arrays,
                     tables={"variants": rows}, variants=variants)


def fig1_fixture(root: Path, newton_final: list[float]) -> list[Path]:
    """Three saddle-free Newton runs (damping = 10 lr) ending at ``newton_final`` training error, Adam, SGD."""
    arms = [({"name": "saddle_free_newton", "lr": lr, "damping": None, "damping_ratio": 10.0}, final)
            for lr, final in zip((1.0, 0.1, 0.01), newton_final)]
    arms += [({"name": "adam", "lr": 1e-3}, 0.2), ({"name": "sgd", "lr": 0.05, "momentum": 0.9}, 0.25)]
    folders = []
    for i, (optimizer, final) in enumerate(arms):
        epochs = [{"epoch": e, "train_accuracy": 1 - (final + 0.5 / e - 0.5 / 3), "train_loss": 1.0 / e} for e in (1, 2, 3)]
        folders.append(write_run(root / str(i), "train", {"optimizer": optimizer, "model": {"name": "cnn"},
                                                          "dataset": {"name": "digits"}},
                                 tables={"epochs": epochs}, metrics={"final_train_error": final}))
    return folders


@pytest.mark.parametrize("artefact", list(M.ARTEFACTS))
def test_each_script_draws_its_fixture_and_prints_its_check(artefact, tmp_path, capsys):
    module = importlib.import_module(f"paper_figures.{M.ARTEFACTS[artefact][0]}")
    outcome = module.main(fixture(artefact, tmp_path / "runs"), tmp_path / "out")
    assert {p.suffix for p in outcome.figures} == {".png", ".pdf"}
    assert all(p.parent == tmp_path / "out" and p.stat().st_size > 1000 for p in outcome.figures)
    line = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("CHECK ")]
    assert line == [f"CHECK {artefact} | {outcome.check.claim} | {outcome.check.value} | PASS"]

    failing = module.main(fixture(artefact, tmp_path / "bad", ok=False), tmp_path / "out_bad")
    assert not failing.check.passed
    assert capsys.readouterr().out.strip().endswith("| FAIL")


def test_fig1_check_is_the_spread_of_final_training_errors_per_ratio(tmp_path):
    from paper_figures import fig1_optimisers as F
    check = F.newton_check([C.SavedRun.load(f) for f in fig1_fixture(tmp_path, [0.10, 0.12, 0.14])])
    assert check.passed and "3 runs): spread 0.04" in check.value  # 1 - train_accuracy at the last epoch
    check = F.newton_check([C.SavedRun.load(f) for f in fig1_fixture(tmp_path / "b", [0.10, 0.12, 0.16])])
    assert not check.passed and "spread 0.06" in check.value
    assert F.damping_ratio({"lr": 0.1, "damping": 1.0}) == pytest.approx(10.0)
    assert F.damping_ratio({"name": "adam", "lr": 1e-3}) is None


def test_cli_exit_status_and_one_line_error_for_a_wrong_folder(tmp_path, capsys):
    from paper_figures import fig2_wigner
    assert fig2_wigner.__name__ and C.cli("fig2", fig2_wigner.main, [str(tmp_path / "nothing")]) == 2
    assert capsys.readouterr().err.strip().count("\n") == 0
    folders = fixture("fig3", tmp_path / "runs")  # an MP run: fig2 needs a Wigner one
    assert C.cli("fig2", fig2_wigner.main, [str(folders[0]), "--out", str(tmp_path)]) == 2
    assert "make_figures --only fig2" in capsys.readouterr().err
    assert C.cli("fig2", fig2_wigner.main, [str(fixture("fig2", tmp_path / "w")[0]), "--out", str(tmp_path)]) == 0


def test_config_hash_of_a_composed_preset_equals_that_of_its_saved_results(tmp_path):
    overrides = ["experiment=thm1", "dataset.n=50"]
    dispatch(make_cfg(tmp_path, overrides))
    saved = json.loads((tmp_path / "results.json").read_text())["config"]
    assert M.config_hash(saved) == M.config_hash(M.resolved_config(overrides))
    assert M.config_hash(saved) != M.config_hash(M.resolved_config(["experiment=thm1", "dataset.n=51"]))
    assert M.config_hash({**saved, "output_dir": "elsewhere", "overwrite": True, "logger": {"name": "wandb"}}) \
        == M.config_hash(saved)


def test_multirun_expansion_follows_hydra_and_the_command_line_wins():
    members = M.expand(["experiment=fig4", "dataset.n=200"], multirun=True)
    assert sorted(m for ms in members for m in ms if m.startswith("dataset.ratio")) == \
        ["dataset.ratio=0.25", "dataset.ratio=0.5"]
    assert all("dataset.n=200" in m for m in members)
    assert len(M.expand(["experiment=fig4", "dataset.ratio=0.3"], multirun=True)) == 1
    assert len(M.expand(["experiment=fig5"], multirun=True)) == 2


MATRIX = ["fig2", "fig3", "fig4", "fig5", "fig6", "table1", "thm1", "thm2", "thm5", "lemma1"]
SHRINK = {**{j: ["dataset.n=200"] for j in ("fig2", "fig3", "fig4", "fig5", "fig6", "thm1", "thm5")},
          "thm2": ["dataset.n=200", "analysis.thm2.num_draws=5"], "table1": ["analysis.table1.empirical_dim=200"],
          "lemma1": ["analysis.lemma1.sizes=[50,100,200]"]}


def test_driver_runs_the_random_matrix_artefacts_and_table1_end_to_end(tmp_path):
    report = tmp_path / "REPORT.md"
    rows = M.make_figures("smoke", MATRIX, tmp_path / "out", report, gallery=tmp_path / "gallery", extra=SHRINK)
    assert [r.artefact for r in rows] == MATRIX
    failed = {r.artefact: r.value for r in rows if r.status == "FAILED"}
    assert not failed, failed
    assert all(r.figure.parent == tmp_path / "gallery" and r.figure.is_file() for r in rows)
    assert all(r.status == "PASS" for r in rows if r.artefact in ("fig2", "fig5", "table1", "thm1", "thm2", "thm5"))
    text = report.read_text()
    for r in rows:
        assert f"| {r.artefact} | `python -m experiments.run " in text and f"](gallery/{r.figure.name}) |" in text
    assert "`python -m experiments.run -m experiment=fig4 dataset.n=200`" in text
    # a rerun finds every result by its config and runs nothing
    folders = sorted(p for p in (tmp_path / "out" / "smoke").rglob("*") if p.is_dir() and p.name.isdigit())
    again = M.make_figures("smoke", MATRIX, tmp_path / "out", report, gallery=tmp_path / "gallery", extra=SHRINK)
    assert [(r.status, r.value) for r in again] == [(r.status, r.value) for r in rows]
    assert sorted(p for p in (tmp_path / "out" / "smoke").rglob("*") if p.is_dir() and p.name.isdigit()) == folders


def test_driver_reports_a_failed_run_with_its_one_line_error_and_goes_on(tmp_path):
    rows = M.make_figures("smoke", ["thm1", "table1"], tmp_path / "out", tmp_path / "REPORT.md",
                          extra={"thm1": ["dataset.n=-5"], "table1": ["analysis.table1.empirical_dim=100"]})
    assert rows[0].status == "FAILED" and rows[0].value.startswith("thm1: error: ") and "dataset.n" in rows[0].value
    assert rows[1].status == "PASS"
    assert "| thm1 |" in (tmp_path / "REPORT.md").read_text()
    with pytest.raises(C.FigureInputError, match="unknown artefact"):
        M.make_figures("smoke", ["fig99"], tmp_path / "out", tmp_path / "R.md")


@pytest.mark.slow
def test_full_smoke_run_draws_every_artefact(tmp_path):
    rows = M.make_figures("smoke", None, tmp_path / "out", tmp_path / "REPORT.md")
    assert [r.artefact for r in rows] == list(M.ARTEFACTS)
    failed = {r.artefact: r.value for r in rows if r.status == "FAILED"}
    assert not failed, failed
