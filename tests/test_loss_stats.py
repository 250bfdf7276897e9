"""curvature.stats on linear least squares, where every per-batch quantity has a closed form; the CLI."""

import pytest
import torch
from torch import nn

from curvature.operators import mse_loss
from curvature.stats import loss_statistics, random_unit_vector
from experiments.run import dispatch
from tests.conftest import make_cfg


@pytest.mark.parametrize("operator", ["hessian", "ggn"])
def test_statistics_equal_their_closed_forms_on_least_squares(operator):
    gen = torch.Generator().manual_seed(0)
    d, sizes = 5, [7, 7, 4]  # unequal batches: the means are weighted by n_b / N
    model = nn.Linear(d, 1, bias=False).double()
    batches = [(torch.randn(n, d, generator=gen, dtype=torch.float64),
                torch.randn(n, 1, generator=gen, dtype=torch.float64)) for n in sizes]
    w = model.weight.detach().reshape(-1)
    z = random_unit_vector(d, seed=3)
    stats = loss_statistics(model, mse_loss, batches, operator, z=z)
    # L_b = ||X w - y||^2 / n, g_b = 2 X^T (X w - y) / n, H_b = 2 X^T X / n (GGN = Hessian here)
    weights = torch.tensor(sizes, dtype=torch.float64) / sum(sizes)
    L = torch.stack([((X @ w - y[:, 0]) ** 2).mean() for X, y in batches])
    G = torch.stack([2 * X.T @ (X @ w - y[:, 0]) / len(y) for X, y in batches])
    HZ = torch.stack([2 * X.T @ (X @ z) / len(y) for X, y in batches])
    mean = lambda a: (weights.view(-1, *[1] * (a.dim() - 1)) * a).sum(0)  # noqa: E731
    expected = {
        "loss_mean": mean(L), "loss_variance": mean((L - mean(L)) ** 2),
        "gradient_mean_norm_sq": mean(G).pow(2).sum(), "gradient_variance": mean((G - mean(G)).pow(2).sum(1)),
        "curvature_mean_norm_sq": mean(HZ).pow(2).sum(), "curvature_variance": mean((HZ - mean(HZ)).pow(2).sum(1)),
        "rayleigh_quotient": z @ mean(HZ), "weight_l2": w.norm(), "weight_linf": w.abs().max()}
    for key, value in expected.items():
        assert stats[key] == pytest.approx(float(value), rel=1e-10, abs=1e-14), key


def test_loss_stats_over_a_folder_of_checkpoints(tmp_path):
    train = tmp_path / "train"
    net = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200"]
    dispatch(make_cfg(train, ["analysis=train", *net, "analysis.epochs=2", "analysis.save_freq=1"]))
    results = dispatch(make_cfg(tmp_path / "stats", ["analysis=loss_stats", *net, "operator=ggn",
                                                     f"analysis.checkpoint_dir={train}"]))
    rows = results["tables"]["loss_stats"]
    assert [r["epoch"] for r in rows] == [1.0, 2.0]
    assert all(r["curvature_mean_norm_sq"] > 0 and r["rayleigh_quotient"] > 0 for r in rows)  # GGN is PSD
    assert (tmp_path / "stats" / "loss_stats.png").is_file()
