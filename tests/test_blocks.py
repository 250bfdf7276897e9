"""Per-block spectra: the block-restricted operator against the dense float64 Hessian / GGN, Lanczos on a
full-size block against its exact eigenvalues, the heterogeneity number on closed-form measures, and
``analysis.blocks`` through the CLI (table, metric, figures; bad values in one line)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.blocks import BlockOperator, block_groups, mean_pairwise_wasserstein, normalised
from curvature.dense import dense_ggn, dense_hessian
from curvature.errors import SuiteError
from curvature.lanczos import lanczos
from curvature.operators import GGNOperator, HessianOperator
from curvature.spectrum import SpectralMeasure
from experiments.run import dispatch
from tests.conftest import DEVICES, make_cfg, run_cli

DENSE = {"hessian": (HessianOperator, dense_hessian), "ggn": (GGNOperator, dense_ggn)}


def tiny(device: str):
    """Tanh between the layers, so the Hessian's diagonal blocks differ from the GGN's (with ReLU and one
    layer per block they coincide: the output is piecewise linear in one layer's weights)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3)).to(device, torch.float64)
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(n, 3, generator=gen, dtype=torch.float64).to(device),
                torch.randint(0, 3, (n,), generator=gen).to(device)) for n in (20, 12)]
    return model, batches


def _indices(model, names):
    """Entries of ``names`` in the flat vector of model.parameters() order (the dense builders' order)."""
    out, start = [], 0
    for name, p in model.named_parameters():
        if name in names:
            out += range(start, start + p.numel())
        start += p.numel()
    return torch.tensor(out)


def test_layer_groups_are_the_modules_owning_parameters_and_globs_group_by_pattern():
    model, _ = tiny("cpu")
    assert block_groups(model, "layer") == {"0": ["0.weight", "0.bias"], "2": ["2.weight", "2.bias"]}
    assert block_groups(model, [["*.bias"], ["0.weight"]]) == {"*.bias": ["0.bias", "2.bias"], "0.weight": ["0.weight"]}
    assert block_groups(model, "layer", ["2.bias", "0.weight"]) == {"0": ["0.weight"], "2": ["2.bias"]}
    with pytest.raises(SuiteError, match=r"block \['conv\.\*'\] matches no parameter"):
        block_groups(model, [["conv.*"]])


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("operator", list(DENSE))
def test_block_matrix_equals_the_dense_diagonal_block(operator, device):
    model, batches = tiny(device)
    cls, dense = DENSE[operator]
    op = cls(model, F.cross_entropy, batches, cache="all", layerwise=False)
    full = dense(model, F.cross_entropy, batches)
    # the layers, and a group of entries that are not contiguous in the flat vector
    for names in (["0.weight", "0.bias"], ["2.weight", "2.bias"], ["0.bias", "2.weight"]):
        block = BlockOperator(op, names)
        idx = _indices(model, names).to(device)
        matrix = block.matvec(torch.eye(block.num_params, dtype=torch.float64, device=device))
        torch.testing.assert_close(matrix, full[idx][:, idx], atol=1e-10, rtol=0)
        v = torch.randn(block.num_params, dtype=torch.float64, device=device)
        torch.testing.assert_close(block.matvec(v), full[idx][:, idx] @ v, atol=1e-10, rtol=0)
    assert operator == "ggn" or not torch.allclose(full, dense_ggn(model, F.cross_entropy, batches))


@pytest.mark.parametrize("operator", list(DENSE))
def test_lanczos_on_a_full_size_block_gives_its_exact_eigenvalues(operator):
    model, batches = tiny("cpu")
    cls, dense = DENSE[operator]
    block = BlockOperator(cls(model, F.cross_entropy, batches, layerwise=False), ["0.weight", "0.bias"])
    idx = _indices(model, block.names)
    exact = torch.linalg.eigvalsh(dense(model, F.cross_entropy, batches)[idx][:, idx])
    result = lanczos(block.matvec, block.num_params, block.num_params, seed=0, engine="native")
    ritz = result.ritz_values[0][result.mask[0]].sort().values
    assert ritz.numel() == block.num_params == 16
    torch.testing.assert_close(ritz, exact, atol=1e-10 * float(exact.abs().max()), rtol=0)


def test_heterogeneity_is_the_mean_pairwise_w1_of_the_scale_free_measures():
    point = SpectralMeasure(torch.tensor([3.0]), torch.tensor([1.0]))
    split = SpectralMeasure(torch.tensor([-2.0, 2.0]), torch.tensor([0.5, 0.5]))
    assert normalised(split).nodes.tolist() == [-1.0, 1.0]
    # delta(1) against (delta(-1) + delta(1)) / 2: half the mass moves a distance 2
    assert mean_pairwise_wasserstein([point, split]) == pytest.approx(1.0, abs=1e-15)
    big = SpectralMeasure(point.nodes * 1e6, point.weights)
    # pairs (point, big) = 0, (point, split) = 1, (big, split) = 1
    assert mean_pairwise_wasserstein([point, big, split]) == pytest.approx(2 / 3, abs=1e-15)
    assert mean_pairwise_wasserstein([split]) == 0.0


CNN = ["dataset=digits", "model=cnn", "model.channels=[4,4]", "dataset.num_subsamples=48", "operator.batch_size=48",
       "analysis.num_steps=6", "analysis.exact_max_dim=0"]


def test_cli_blocks_layer_writes_table_metric_and_figures(tmp_path):
    proc = run_cli(*CNN, "analysis.blocks=layer", "analysis.operators=[ggn,hessian]", "logger=none",
                   f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    saved = json.loads((tmp_path / "results.json").read_text())
    rows = saved["tables"]["blocks"]
    layers = ["features.0", "features.2", "fc"]
    assert [(r["operator"], r["block"]) for r in rows] == [(op, b) for op in ("ggn", "hessian")
                                                          for b in ["(whole)", *layers]]
    whole = saved["metrics"]["num_params"]
    assert rows[0]["num_params"] == whole == sum(r["num_params"] for r in rows[1:4])
    assert rows[3]["parameters"] == "fc.weight fc.bias"
    with np.load(tmp_path / "arrays.npz") as arrays:
        for op in ("ggn", "hessian"):
            measures = [SpectralMeasure(arrays[f"{op}_block{i}_ritz_values"][0][arrays[f"{op}_block{i}_mask"][0]],
                                        arrays[f"{op}_block{i}_ritz_weights"][0][arrays[f"{op}_block{i}_mask"][0]])
                        for i in range(3)]
            # the saved number is the one its definition gives from the saved measures
            assert saved["metrics"][f"{op}_block_heterogeneity"] == pytest.approx(
                mean_pairwise_wasserstein(measures), rel=1e-12)
    for stem in ("blocks_ggn", "blocks_hessian", "spectrum"):
        assert {f"{stem}.png", f"{stem}.pdf"} <= set(saved["files"]["figures"])
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000


def test_blocks_off_leaves_the_spectrum_run_as_it_was(tmp_path):
    results = dispatch(make_cfg(tmp_path, [*CNN, "analysis.num_steps=3"]))
    assert "blocks" not in results["tables"] and not any("block" in k for k in results["metrics"])
    assert not list(tmp_path.glob("blocks_*"))


# more shapes of bad value in tests/test_bad_input.py (in-process)
@pytest.mark.parametrize("value,says", [
    ("rows", "must be null, layer, or a list of lists of glob patterns"),
    ("[[nothing.*]]", "matches no parameter"),
])
def test_bad_blocks_value_is_one_line(value, says, tmp_path):
    proc = run_cli(*CNN, f"analysis.blocks={value}", "logger=none", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2, proc.stderr[-1000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "analysis.blocks" in lines[0] and says in lines[0], proc.stderr[-1000:]
    assert not (tmp_path / "results.json").exists()


def test_text_spectrum_takes_token_targets_and_the_blocks_the_output_is_linear_in_agree(tmp_path):
    """A GPT on (N, T) token targets. The logits are linear in the head's and the final LayerNorm's
    parameters (each alone), so those blocks of the Hessian equal the GGN's: same Ritz values."""
    results = dispatch(make_cfg(tmp_path, [
        "dataset=text", "model=gpt_tiny", "model.width=8", "model.depth=1", "model.heads=2", "dataset.context=8",
        "dataset.num_subsamples=6", "analysis.num_steps=5", "analysis.exact_max_dim=0", "analysis.blocks=layer",
        "analysis.operators=[ggn,hessian]", "operator.layerwise=false"]))
    rows = {(r["operator"], r["block"]): r for r in results["tables"]["blocks"]}
    assert {b for _, b in rows} >= {"token", "position", "blocks.0.attention", "blocks.0.attention.out_proj",
                                    "blocks.0.ln_attention", "blocks.0.mlp.0", "ln_final", "head", "(whole)"}
    for block in ("head", "ln_final"):
        for key in ("max_ritz_value", "min_ritz_value"):
            assert rows["hessian", block][key] == pytest.approx(rows["ggn", block][key], rel=1e-9)
    ggn = rows["ggn", "blocks.0.mlp.0"]  # PSD, to rounding; the Hessian's block is not (GELU, softmax)
    assert ggn["min_ritz_value"] >= -1e-12 * ggn["max_ritz_value"] > rows["hessian", "blocks.0.mlp.0"]["min_ritz_value"]
