"""analysis=landscape: the loss at t = 0, the curvature along Ritz vectors, and the spectrum-file errors."""

import pytest
import torch

from curvature.data import load_splits
from curvature.errors import SuiteError
from curvature.models import get_model
from curvature.training import evaluate
from experiments.run import dispatch
from tests.conftest import make_cfg

NET = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200", "operator.batch_size=64"]


@pytest.fixture(scope="module")
def spectrum_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("spec")
    dispatch(make_cfg(out, NET + ["analysis.num_steps=30", "analysis.save_ritz_vectors=true",
                                  "analysis.exact_max_dim=0"]))
    return out


def test_landscape_reproduces_loss_at_zero_and_ritz_curvature(tmp_path, spectrum_dir):
    results = dispatch(make_cfg(tmp_path, NET + ["analysis=landscape", f"analysis.spectrum_dir={spectrum_dir}",
                                                 "analysis.num_points=5", "analysis.bn_mode=eval"]))
    assert results["checks"]["loss_at_t0_consistent"]["passed"]
    # second difference of the operator's own loss (mean CE over its batches, float64) vs each Ritz value
    assert results["checks"]["curvature_matches_ritz"]["passed"], results["checks"]
    assert results["metrics"]["second_difference_error"] <= 1e-3
    rows = {r["direction"]: r for r in results["tables"]["directions"]}
    assert {"largest", "smallest", "near_zero", "random_gaussian", "random_filter"} <= set(rows)
    assert rows["largest"]["ritz_value"] > 0 > rows["smallest"]["ritz_value"]
    # t = 0 is the evaluated loss of the untouched model (initial weights, seed 0)
    torch.manual_seed(0)
    model = get_model("mlp", 10, hidden=[8]).double()
    splits = load_splits("digits", num_subsamples=200, seed=0)
    for split in ("train", "test"):
        expected = evaluate(model, getattr(splits, split), dtype=torch.float64)["loss"]
        assert rows["largest"][f"{split}_loss0"] == pytest.approx(expected, rel=1e-12, abs=0)
    assert (tmp_path / "landscape.png").is_file()


def test_landscape_computes_its_own_spectrum_with_bn_recompute(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=fig11_smoke", "dataset.num_subsamples=64",
                                           "dataset.fake_train=128", "dataset.fake_test=32", "analysis.num_steps=5",
                                           "analysis.num_points=3", "analysis.random_directions=[filter]",
                                           "analysis.positions=[-1]"]))
    assert results["checks"]["loss_at_t0_consistent"]["passed"]
    assert [r["direction"] for r in results["tables"]["directions"]] == ["largest", "random_filter"]


def test_spectrum_file_without_vectors_or_from_another_model_is_refused(tmp_path, spectrum_dir):
    saved = torch.load(spectrum_dir / "ritz_vectors_hessian.pt", weights_only=True)
    torch.save({**saved, "ritz_vectors": None}, tmp_path / "novec.pt")
    for file, net in ((tmp_path / "novec.pt", NET), (spectrum_dir / "ritz_vectors_hessian.pt",
                                                     NET[:2] + ["model.hidden=[6]"] + NET[3:])):
        with pytest.raises(SuiteError) as error:
            dispatch(make_cfg(tmp_path / "run", net + ["analysis=landscape", f"analysis.ritz_vectors_file={file}"]))
        message = str(error.value)
        assert "\n" not in message and "analysis.save_ritz_vectors=true" in message
