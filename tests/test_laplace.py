"""analysis=laplace: CG predictive variances against the dense GGN inverted densely, on a small model."""

import json

import torch
from torch import nn

from experiments.laplace import jacobian_rows, laplace_weights
from tests.conftest import make_cfg

SMALL = ["analysis=laplace", "dataset=digits", "model=mlp", "model.hidden=[6]", "dataset.num_subsamples=150",
         "analysis.num_test=3", "analysis.train_epochs=2", "analysis.mc_samples=200", "operator.batch_size=50",
         "analysis.tol=1e-7"]


def test_laplace_variances_equal_the_dense_solve_on_a_small_model(tmp_path):
    from experiments.run import dispatch
    results = dispatch(make_cfg(tmp_path, SMALL + ["analysis.weights=all"]))  # 64*6+6+6*10+10 = 460 weights
    assert results["metrics"]["num_laplace_weights"] == 460
    for name in ("cg_converged", "posterior_below_prior", "dense_variances"):
        assert results["checks"][name]["passed"], (name, results["checks"][name])
    assert results["checks"]["dense_variances"]["value"] < 1e-5
    assert "N * mean GGN" in results["laplace"]["precision"] and results["laplace"]["num_train"] == 150
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["config"]["analysis"]["prior_precision"] == 1.0 and "commit" in saved["provenance"]
    assert (tmp_path / "laplace.png").is_file() and (tmp_path / "laplace.pdf").is_file()
    arrays = dict(__import__("numpy").load(tmp_path / "arrays.npz"))
    assert arrays["variance"].shape == (3, 10) and (arrays["variance"] > 0).all()
    probs = arrays["mc_probs"]
    assert abs(probs.sum(-1) - 1).max() < 1e-9


def test_last_layer_laplace_checks_a_dense_sub_problem_when_too_large(tmp_path):
    from experiments.run import dispatch
    results = dispatch(make_cfg(tmp_path, SMALL + ["analysis.dense_max_dim=20", "analysis.select=first"]))
    assert results["metrics"]["num_laplace_weights"] == 70  # the last Linear: 6*10 + 10
    assert results["checks"]["dense_variances"]["passed"]
    assert any("dense check on the Laplace over" in note for note in results["notes"])


def test_jacobian_rows_and_last_layer_weights():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    names = laplace_weights(model, {"weights": "last_layer"}, {"params": None})
    assert names == ["2.weight", "2.bias"]
    x = torch.randn(5, 3, dtype=torch.float64)
    mu, jac = jacobian_rows(model, names, x)
    torch.testing.assert_close(mu, model(x).detach())
    for t in range(5):
        for c in range(2):
            g = torch.autograd.grad(model(x[t:t + 1])[0, c], [model[2].weight, model[2].bias])
            torch.testing.assert_close(jac[t, c], torch.cat([g[0].reshape(-1), g[1]]))
