"""analysis=spectrum on networks: exact agreement on a small model, files, checks and errors."""

import json

import numpy as np
import pytest
import torch

from curvature.models import get_model
from curvature.errors import SuiteError
from curvature.operators import HessianOperator, get_loss
from curvature.training import load_checkpoint
from experiments.run import dispatch
from tests.cli_batch import run_batch
from tests.conftest import make_cfg, run_cli

SMALL = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200", "analysis.num_steps=30",
         "operator.batch_size=64"]


def test_small_network_lanczos_matches_its_exact_spectrum(tmp_path):
    results = dispatch(make_cfg(tmp_path, SMALL + ["analysis.operators=[hessian,ggn]", "analysis.exact_max_dim=1000"]))
    checks = results["checks"]
    assert checks["hessian_top_ritz_vs_exact"]["passed"] and checks["ggn_top_ritz_vs_exact"]["passed"]
    assert checks["ggn_psd"]["passed"]
    m = results["metrics"]
    assert m["num_params"] == 64 * 8 + 8 + 8 * 10 + 10
    for op in ("hessian", "ggn"):
        assert 0 <= m[f"{op}_wasserstein_to_exact"] < 0.05 * abs(m[f"{op}_exact_max_eigenvalue"])
        assert m[f"{op}_max_ritz_value"] <= m[f"{op}_exact_max_eigenvalue"] * (1 + 1e-9)
        assert m[f"{op}_min_ritz_value"] >= m[f"{op}_exact_min_eigenvalue"] - 1e-9
    cost = {row["operator"]: row for row in results["tables"]["cost"]}
    assert cost["hessian"]["operator_products"] == 30  # native engine: m steps, m products
    assert cost["hessian"]["seconds_per_iteration"] > 0
    assert cost["ggn"]["peak_memory_bytes"] > 0
    assert (tmp_path / "spectrum.png").is_file() and (tmp_path / "spectrum.pdf").is_file()


def test_ritz_vectors_file_holds_converged_eigenvectors(tmp_path):
    train = tmp_path / "train"
    dispatch(make_cfg(train, ["analysis=train", "dataset=digits", "model=mlp", "model.hidden=[8]",
                              "analysis.epochs=1", "dataset.num_subsamples=200"]))
    ckpt = train / "checkpoint-00001.pt"
    spec = tmp_path / "spec"
    dispatch(make_cfg(spec, SMALL + [f"analysis.checkpoint={ckpt}", "analysis.save_ritz_vectors=true",
                                     "analysis.exact_max_dim=0"]))
    saved = torch.load(spec / "ritz_vectors_hessian.pt", weights_only=True)
    k, m, p = saved["ritz_vectors"].shape
    assert (k, m) == (1, 30) and p == saved["num_params"] == 610
    assert saved["param_names"] == ["net.1.weight", "net.1.bias", "net.3.weight", "net.3.bias"]
    assert saved["checkpoint"] == str(ckpt) and saved["model"]["name"] == "mlp"
    # Rebuild H from the checkpoint: the top Ritz pair satisfies ||H y - theta y|| <= its bound.
    from curvature.data import load_splits
    model = get_model("mlp", 10, hidden=[8]).double()
    load_checkpoint(ckpt, model)
    model.double()
    batches = list(load_splits("digits", num_subsamples=200, seed=0).train.batches(64, dtype=torch.float64))
    op = HessianOperator(model, get_loss("cross_entropy"), batches, bn_mode="train")
    y, theta = saved["ritz_vectors"][0, -1], float(saved["ritz_values"][0, -1])
    with np.load(spec / "arrays.npz") as arrays:
        bound = float(arrays["hessian_residual_bounds"][0, -1])
    assert float(torch.linalg.norm(op @ y - theta * y)) <= bound + 1e-8


def test_parameter_subset_gives_a_per_layer_spectrum(tmp_path):
    results = dispatch(make_cfg(tmp_path, SMALL + ["operator.params=[net.3.*]", "analysis.exact_max_dim=500"]))
    assert results["metrics"]["num_params"] == 90
    assert results["checks"]["hessian_top_ritz_vs_exact"]["passed"]


def test_two_start_vectors_agree_on_the_extremes(tmp_path):
    results = dispatch(make_cfg(tmp_path, SMALL + ["analysis.num_vectors=2", "analysis.compare_vectors=true",
                                                   "analysis.exact_max_dim=0"]))
    names = {"hessian_vectors_max_ritz", "hessian_vectors_min_ritz", "hessian_vectors_moments"}
    assert names <= set(results["checks"])
    assert all(results["checks"][n]["passed"] for n in names)


def test_spectrum_of_a_trained_checkpoint(tmp_path):
    train = tmp_path / "train"
    dispatch(make_cfg(train, ["experiment=demo_train", "analysis.epochs=2", "analysis.target_test_accuracy=null"]))
    ckpt = train / "checkpoint-00002.pt"
    results = dispatch(make_cfg(tmp_path / "spec", ["experiment=demo_spectrum", f"analysis.checkpoint={ckpt}",
                                                    "analysis.num_steps=15", "dataset.num_subsamples=128"]))
    assert results["checkpoint"] == str(ckpt)
    assert results["all_checks_passed"]
    model = get_model("cnn", 10, channels=[4, 2])
    load_checkpoint(ckpt, model)  # the checkpoint fits the model the spectrum was taken of


BAD = [
    (["experiment=fig7"], "analysis.checkpoint"),
    (SMALL + ["analysis.compare_vectors=true"], "analysis.num_vectors"),
    (SMALL + ["analysis.operators=[hessian,kfac]"], "analysis.operators"),
    (SMALL + ["operator.bn_mode=frozen"], "operator.bn_mode"),
    (SMALL + ["analysis.checkpoint=/no/such.pt"], "analysis.checkpoint"),
]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """The runs of BAD through the real CLI entry point, forked from one warmed-up interpreter
    (tests/cli_batch.py): one interpreter start instead of five."""
    root = tmp_path_factory.mktemp("bad_network")
    rows = [{"id": f"bad{i}", "args": [*overrides, "logger=none"], "dir": str(root / f"bad{i}")}
            for i, (overrides, _) in enumerate(BAD)]
    return root, run_batch(rows, root / "batch")


@pytest.mark.xdist_group("spectrum_network_bad_config")  # one worker builds the module fixture (--dist loadgroup)
@pytest.mark.parametrize("overrides,key", BAD)
def test_bad_network_spectrum_config(overrides, key, bad_runs):
    row_id = f"bad{BAD.index((overrides, key))}"
    folder, proc = bad_runs[0] / row_id, bad_runs[1][row_id]
    assert proc.returncode == 2, proc.stderr[-500:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and key in lines[0]
    assert not (folder / "results.json").exists()


def test_checkpoint_of_another_model_fails_in_one_line(tmp_path):
    train = tmp_path / "train"
    dispatch(make_cfg(train, ["experiment=demo_train", "analysis.epochs=1", "analysis.target_test_accuracy=null"]))
    out = tmp_path / "spec"
    proc = run_cli(*SMALL, f"analysis.checkpoint={train / 'checkpoint-00001.pt'}", "logger=none",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint-00001.pt" in lines[0] and "does not fit" in lines[0]
    assert not (out / "results.json").exists()


def test_operator_cache_setting_gives_the_same_spectrum_and_bad_values_are_one_line(tmp_path):
    """operator.cache (primal reuse) changes the cost, never the Ritz values; an unknown mode is refused."""
    base = ["dataset=digits", "model=mlp", "dataset.num_subsamples=96", "operator.batch_size=32",
            "analysis.num_steps=8", "analysis.exact_max_dim=0", "logger=none"]
    ritz = {}
    for mode in ("none", "all"):
        cfg = make_cfg(tmp_path / mode, [*base, f"operator.cache={mode}"])
        dispatch(cfg)
        ritz[mode] = np.load(tmp_path / mode / "arrays.npz")["hessian_ritz_values"]
    np.testing.assert_allclose(ritz["all"], ritz["none"], rtol=1e-10, atol=1e-12)
    with pytest.raises(SuiteError, match="operator.cache"):
        dispatch(make_cfg(tmp_path / "bad", [*base, "operator.cache=sometimes"]))
    assert not (tmp_path / "bad" / "results.json").exists()


def test_operator_layerwise_setting_gives_the_same_spectrum_and_says_which_engine(tmp_path):
    """operator.layerwise picks hand-written or autograd products: same Ritz values, engine in the notes."""
    base = ["dataset=digits", "model=cnn", "dataset.num_subsamples=96", "operator.batch_size=32",
            "operator.bn_mode=eval", "analysis.num_steps=8", "analysis.exact_max_dim=0", "logger=none",
            "dtype=float64"]
    ritz = {}
    for choice in ("auto", "false"):
        dispatch(make_cfg(tmp_path / choice, [*base, f"operator.layerwise={choice}"]))
        ritz[choice] = np.load(tmp_path / choice / "arrays.npz")["hessian_ritz_values"]
        results = json.loads((tmp_path / choice / "results.json").read_text())
        engine = "layerwise" if choice == "auto" else "autograd"
        assert any(n.startswith(f"hessian products: {engine}") for n in results["notes"]), results["notes"]
        assert results["tables"]["cost"][0]["product_mode"] != "layerwise" or choice == "auto"
    np.testing.assert_allclose(ritz["auto"], ritz["false"], rtol=1e-10, atol=1e-12)
    with pytest.raises(SuiteError, match="operator.layerwise"):
        dispatch(make_cfg(tmp_path / "bad", [*base, "operator.layerwise=sometimes"]))
    # batch statistics have a layer-wise rule too (tests/test_graph_plan.py checks it against dense matrices)
    dispatch(make_cfg(tmp_path / "train_bn", [*base, "model.batch_norm=true", "operator.bn_mode=train",
                                              "operator.layerwise=true"]))
    notes = json.loads((tmp_path / "train_bn" / "results.json").read_text())["notes"]
    assert any(n.startswith("hessian products: layerwise") for n in notes), notes
    assert not (tmp_path / "bad" / "results.json").exists()
