"""analysis=spectrum on a network says what it did: the exact step announced, timed and gated by
analysis.exact_max_dim, and the samples recorded so a user can rebuild them."""

import hashlib
import json

import numpy as np
import pytest
import torch

from curvature.data import load_splits
from curvature.dense import dense_hessian, operator_matrix
from curvature.models import get_model
from curvature.operators import HessianOperator, get_loss
from experiments.run import dispatch
from tests.conftest import make_cfg

# P = 10 (the output layer's bias), one batch: the dense matrix costs 10 columns, fewer than the
# 10 Lanczos products of 10 start vectors each, so auto builds it too, whatever the machine's speed.
TINY = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=64", "operator.batch_size=32",
        "operator.params=[net.3.bias]", "analysis.num_steps=10", "analysis.num_vectors=10"]


def _run(tmp_path, overrides):
    results = dispatch(make_cfg(tmp_path, overrides))
    with np.load(tmp_path / "arrays.npz") as arrays:
        return results, {k: arrays[k] for k in arrays.files}


@pytest.mark.parametrize("limit", ["10", "auto"])
def test_exact_step_is_announced_timed_and_exact(limit, tmp_path):
    results, arrays = _run(tmp_path, TINY + [f"analysis.exact_max_dim={limit}"])
    (row,) = results["tables"]["cost"]
    assert row["exact"] == "computed" and row["exact_seconds"] > 0
    assert 0 < row["exact_share_of_run"] < 1 and row["exact_estimated_seconds"] > 0
    assert results["metrics"]["hessian_exact_seconds"] == row["exact_seconds"]
    assert any(n.startswith("hessian: exact eigenvalues: building the dense 10 x 10 matrix from 10 products, "
                            "estimated ") for n in results["notes"]), results["notes"]
    assert results["checks"]["hessian_top_ritz_vs_exact"]["passed"]
    # the saved eigenvalues are the dense float64 Hessian's, built by a different route
    torch.manual_seed(0)  # the run's initial weights: seed 0, then the model (the data draw from their own streams)
    model = get_model("mlp", 10, hidden=[8]).double()
    batches = list(load_splits("digits", num_subsamples=64, seed=0).train.batches(32, dtype=torch.float64))
    dense = dense_hessian(model, get_loss("cross_entropy"), batches, params=["net.3.bias"])
    torch.testing.assert_close(torch.from_numpy(arrays["hessian_exact_eigenvalues"]), torch.linalg.eigvalsh(dense),
                               rtol=1e-9, atol=1e-12)


def test_auto_skips_a_dense_matrix_that_would_dwarf_the_lanczos_run(tmp_path):
    # P = 2410 columns against 2 Lanczos products: even blocks of columns at the price of one product
    # would cost over a thousand times the Lanczos run, so nothing is tried.
    results, arrays = _run(tmp_path, ["dataset=digits", "model=mlp", "model.hidden=[32]", "dataset.num_subsamples=64",
                                      "operator.batch_size=64", "analysis.num_steps=2"])
    (row,) = results["tables"]["cost"]
    assert row["num_params"] == 2410 and row["exact"] == "skipped: cost"
    assert row["exact_seconds"] == 0.0 and row["exact_share_of_run"] == 0.0
    assert row["exact_estimated_seconds"] > row["seconds_total"]
    head = "hessian: no exact eigenvalues (analysis.exact_max_dim=auto): the dense 2410 x 2410 matrix would take about "
    tail = "analysis.exact_max_dim=2410 computes them anyway"
    assert any(n.startswith(head) and n.endswith(tail) for n in results["notes"]), results["notes"]
    assert "hessian_exact_eigenvalues" not in arrays and "hessian_top_ritz_vs_exact" not in results["checks"]


def test_zero_turns_the_exact_step_off_silently(tmp_path):
    results, arrays = _run(tmp_path, TINY + ["analysis.exact_max_dim=0", "analysis.num_vectors=1"])
    (row,) = results["tables"]["cost"]
    assert row["exact"] == "off" and row["exact_seconds"] == 0.0
    assert not any("exact eigenvalues" in n for n in results["notes"])
    assert "hessian_exact_eigenvalues" not in arrays


def test_recorded_samples_rebuild_the_same_data(tmp_path):
    results = dispatch(make_cfg(tmp_path, TINY + ["analysis.exact_max_dim=0", "analysis.num_vectors=1",
                                                  "seed=3", "dtype=float32"]))
    data = json.loads((tmp_path / "results.json").read_text())["data"]
    assert data == results["data"]
    assert (data["split"], data["num_samples"], data["batch_size"], data["num_batches"]) == ("train", 64, 32, 2)
    assert data["dataset"]["name"] == "digits" and data["dataset"]["num_subsamples"] == 64 and data["seed"] == 3
    # a user's rebuild from the record: the seeded subset, normalised by hand, in batches of batch_size
    train = load_splits(data["dataset"]["name"], num_subsamples=data["dataset"]["num_subsamples"],
                        seed=data["seed"]).train
    assert data["split_sha256"] == _sha256([train.images, train.labels])
    mean, std = (torch.tensor(data["normalisation"][k], dtype=torch.float32).view(1, -1, 1, 1) for k in ("mean", "std"))
    inputs = (train.images.to(torch.float32) / 255 - mean) / std
    chunks = []
    for start in range(0, len(train), data["batch_size"]):
        chunks += [inputs[start:start + data["batch_size"]], train.labels[start:start + data["batch_size"]]]
    assert data["inputs_dtype"] == "float32" and data["batches_sha256"] == _sha256(chunks)
    other = load_splits("digits", num_subsamples=64, seed=4).train  # the digest tells subsets apart
    assert data["split_sha256"] != _sha256([other.images, other.labels])


def test_dense_matrix_keeps_leading_columns_it_is_given():
    """operator_matrix(first=...) reuses a timing probe's columns: the same matrix as built afresh."""
    torch.manual_seed(0)
    model = get_model("mlp", 10, hidden=[3]).double()
    batches = list(load_splits("digits", num_subsamples=32, seed=0).train.batches(16, dtype=torch.float64))
    op = HessianOperator(model, get_loss("cross_entropy"), batches, bn_mode="eval", params=["net.3.*"])  # P = 40
    first = op.matvec(torch.eye(op.num_params, 5, dtype=torch.float64))
    op.num_products = 0
    reused = operator_matrix(op, chunk=5, first=first)
    assert op.num_products == -(-op.num_params // 5) - 1  # every block but the first
    torch.testing.assert_close(reused, operator_matrix(op, chunk=7), rtol=0, atol=1e-14)


def _sha256(tensors) -> str:
    digest = hashlib.sha256()
    for tensor in tensors:
        digest.update(tensor.contiguous().numpy().tobytes())
    return digest.hexdigest()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_figure_title_names_the_bn_mode_only_for_models_with_batch_norm(batch_norm):
    import matplotlib.pyplot as plt

    from curvature.spectrum import SpectralMeasure
    from experiments.spectrum_network import _draw, has_batch_norm
    assert has_batch_norm(get_model("cnn", 10, batch_norm=True)) and not has_batch_norm(get_model("mlp", 10))
    measure = SpectralMeasure.from_eigenvalues(torch.tensor([0.0, 1.0, 2.0], dtype=torch.float64))
    s = {"num_steps": 3, "num_vectors": 1, "operator": {"bn_mode": "eval"}, "histogram_bins": 10}
    fig = _draw([("hessian", measure, None, [measure])], s, batch_norm)
    try:
        title = fig.axes[0].get_title()
        assert title.startswith("hessian: Lanczos m=3, 1 vector(s)") and ("bn eval" in title) == batch_norm
    finally:
        plt.close(fig)
