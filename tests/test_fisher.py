"""The empirical and Monte-Carlo Fisher against a dense per-sample construction by a different route.

The ground truth loops over samples (and tokens) with ``torch.autograd.grad`` in float64 and sums the
outer products of the per-row gradients; the operator takes ``vmap`` over ``jacrev`` and never forms F.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.dense import dense_ggn, operator_matrix
from curvature.errors import SuiteError
from curvature.fisher import FisherOperator
from curvature.functional import curvature_mode
from curvature.losses import mse_loss
from curvature.operators import make_operator
from tests.cases import build, data, tiny_cnn, tiny_mlp
from tests.conftest import DEVICES, make_cfg

close = torch.testing.assert_close


# --- the dense reference: one sample (or token) at a time -----------------------------------------
def _flat_grad(model, loss):
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad])
    return torch.cat([g.reshape(-1) for g in grads])


def dense_fisher(model, batches, row_losses, bn_mode="eval"):
    """``sum_r w_r g_r g_r^T / sum_r w_r`` with ``row_losses(z_i, y_i, i) -> [(loss_r, w_r), ...]`` for one
    sample's outputs ``z_i`` (a batch of one), each differentiated on its own by autograd."""
    p = sum(q.numel() for q in model.parameters() if q.requires_grad)
    out, total, index = torch.zeros(p, p, dtype=torch.float64), 0.0, 0
    with curvature_mode(model, bn_mode), torch.enable_grad():
        for inputs, targets in batches:
            for i in range(targets.shape[0]):
                for loss_fn, weight in row_losses(lambda: model(inputs[i:i + 1]), targets[i:i + 1], index):
                    g = _flat_grad(model, loss_fn())
                    out += weight * torch.outer(g, g)
                    total += weight
                index += 1
    return out / total


def per_sample(loss_fn):
    return lambda z, y, _: [(lambda: loss_fn(z(), y), 1.0)]


class TinyLM(nn.Module):
    """Token ids (n, T) -> logits (n, T, 5); position t sees tokens <= t through a running mean."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(5, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, ids):
        h = torch.tanh(self.embed(ids))
        steps = torch.arange(1, ids.shape[1] + 1, dtype=h.dtype, device=h.device)
        return self.head(h.cumsum(1) / steps[:, None])


def token_batches(device):
    gen = torch.Generator().manual_seed(3)
    batches = []
    for n in (3, 2):
        ids = torch.randint(0, 5, (n, 4), generator=gen)
        targets = torch.randint(0, 5, (n, 4), generator=gen)
        targets[0, :2] = -100  # ignored tokens: not counted
        batches.append((ids.to(device), targets.to(device)))
    return batches


# --- empirical Fisher ----------------------------------------------------------------------------------
CASES = {
    "mlp-cross_entropy": (tiny_mlp, F.cross_entropy, False),
    "mlp-smoothed_ce": (tiny_mlp, nn.CrossEntropyLoss(label_smoothing=0.1), False),
    "mlp-mse": (tiny_mlp, mse_loss, False),
    "mlp-mse_float_targets": (tiny_mlp, nn.MSELoss(), True),
    "cnn_bn_eval-cross_entropy": (tiny_cnn, F.cross_entropy, False),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_empirical_fisher_equals_the_per_sample_loop(case, device):
    maker, loss_fn, float_targets = CASES[case]
    model, batches = build(maker, device), data(device, float_targets=float_targets)  # uneven batches 7, 5, 4
    op = FisherOperator(model, loss_fn, batches, bn_mode="eval")
    truth = dense_fisher(model.cpu(), [(x.cpu(), y.cpu()) for x, y in batches], per_sample(loss_fn)).to(device)
    model.to(device)
    assert op.kind == "empirical" and op.engine == "per_sample_gradients"
    close(operator_matrix(op), truth, rtol=1e-9, atol=1e-12 * float(truth.abs().max()))


def test_token_level_fisher_counts_each_token_and_skips_ignored_ones():
    model = TinyLM().double()
    batches = token_batches("cpu")

    def rows(z, y, _):
        return [(lambda t=t: F.cross_entropy(z()[0, t][None], y[0, t][None]), 1.0)
                for t in range(y.shape[1]) if y[0, t] != -100]

    truth = dense_fisher(model, batches, rows)
    op = make_operator("fisher", model, F.cross_entropy, batches, bn_mode="eval")
    close(operator_matrix(op), truth, rtol=1e-9, atol=1e-13)
    # per token, not per sequence: the per-sequence outer products differ
    whole = dense_fisher(model, batches, lambda z, y, _: [(lambda: F.cross_entropy(z()[0], y[0]), 1.0)])
    assert (whole - truth).norm() > 1e-3 * truth.norm()


def test_sum_reduction_is_the_number_of_samples_times_the_mean():
    from curvature.losses import CrossEntropy
    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64)
    mean = FisherOperator(model, CrossEntropy("mean"), batches).matvec(v)
    total = FisherOperator(model, CrossEntropy("sum"), batches).matvec(v)
    close(total, 16 * mean, rtol=1e-10, atol=1e-12)


def test_kept_gradients_give_the_same_products_as_recomputed_ones():
    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    kept = FisherOperator(model, F.cross_entropy, batches, cache="all")
    fresh = FisherOperator(model, F.cross_entropy, batches, cache="none")
    v = torch.randn(kept.num_params, 2, dtype=torch.float64)
    close(kept.matvec(v), fresh.matvec(v), rtol=1e-12, atol=1e-14)
    assert kept.cache_bytes > 0 and fresh.cache_bytes == 0
    close(kept.matvec(v[:, 0]), fresh.matvec(v[:, 0]), rtol=1e-12, atol=1e-14)  # from the kept matrices
    with torch.no_grad():
        next(model.parameters()).add_(0.1)  # new weights: the kept matrices are stale
    close(kept.matvec(v), fresh.matvec(v), rtol=1e-12, atol=1e-14)


# --- Monte-Carlo Fisher --------------------------------------------------------------------------------
@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_monte_carlo_fisher_equals_the_loop_with_the_same_draws(loss_name):
    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    loss_fn = F.cross_entropy if loss_name == "cross_entropy" else mse_loss
    op = FisherOperator(model, loss_fn, batches, kind="monte_carlo", mc_samples=3, seed=5)
    draws = torch.cat([op.sampled_targets(b) for b in range(len(batches))])  # (16, 3, ...)

    def rows(z, y, i):
        if loss_name == "cross_entropy":
            return [(lambda s=s: F.cross_entropy(z(), draws[i, s]), 1.0) for s in range(3)]
        return [(lambda s=s: mse_loss(z(), draws[i, s][None]), 1.0) for s in range(3)]

    truth = dense_fisher(model, batches, rows)
    close(operator_matrix(op), truth, rtol=1e-9, atol=1e-13)


def test_monte_carlo_draws_are_seeded_and_kept():
    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    a = FisherOperator(model, F.cross_entropy, batches, kind="monte_carlo", mc_samples=2, seed=1)
    b = FisherOperator(model, F.cross_entropy, batches, kind="monte_carlo", mc_samples=2, seed=1)
    c = FisherOperator(model, F.cross_entropy, batches, kind="monte_carlo", mc_samples=2, seed=2)
    v = torch.randn(a.num_params, dtype=torch.float64)
    assert a.deterministic
    close(a.matvec(v), b.matvec(v), rtol=0, atol=0)
    close(a.matvec(v), a.matvec(v), rtol=0, atol=0)
    assert not torch.equal(a.sampled_targets(0), c.sampled_targets(0))


@pytest.mark.parametrize("loss_name", ["cross_entropy", "mse"])
def test_monte_carlo_fisher_approaches_the_ggn(loss_name):
    """E[F_MC] = GGN (cross-entropy: softmax draws; MSE: N(z, c/2)); 1000 draws per sample, a loose check
    (measured: relative error 0.029 for cross-entropy and 0.041 for MSE, 0.010 / 0.023 with 4000 draws, so
    about 1/sqrt(draws); the empirical Fisher is 0.64 / 0.74 away)."""
    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    loss_fn = F.cross_entropy if loss_name == "cross_entropy" else mse_loss
    op = FisherOperator(model, loss_fn, batches, kind="monte_carlo", mc_samples=1000, seed=0,
                        check_deterministic=False)
    ggn = dense_ggn(model, loss_fn, batches, "eval")
    error = float((operator_matrix(op) - ggn).norm() / ggn.norm())
    empirical = FisherOperator(model, loss_fn, batches)
    assert error < 0.1
    assert float((operator_matrix(empirical) - ggn).norm() / ggn.norm()) > 2 * error


# --- refusals ------------------------------------------------------------------------------------------
def test_batch_statistics_layerwise_and_unknown_distributions_are_refused():
    batches = data("cpu")
    with pytest.raises(SuiteError, match="bn_mode=eval"):
        FisherOperator(build(tiny_cnn, "cpu"), F.cross_entropy, batches, bn_mode="train")
    with pytest.raises(SuiteError, match="layer-wise"):
        FisherOperator(build(tiny_mlp, "cpu"), F.cross_entropy, batches, layerwise=True)
    with pytest.raises(SuiteError, match="kind=empirical"):
        FisherOperator(build(tiny_mlp, "cpu"), lambda z, y: z.pow(2).mean(), batches, kind="monte_carlo")
    with pytest.raises(SuiteError, match="monte_carlo"):
        FisherOperator(build(tiny_mlp, "cpu"), F.cross_entropy, batches, kind="true")
    # other operators ignore the Fisher's options, so one call site builds any operator
    make_operator("ggn", build(tiny_mlp, "cpu"), F.cross_entropy, batches, kind="monte_carlo", mc_samples=2, seed=0)


# --- the CLI: the Fisher's ("covariance") spectrum ---------------------------------------------------
def test_cli_spectrum_of_the_fisher(tmp_path):
    from experiments.run import dispatch
    cfg = make_cfg(tmp_path, ["analysis=spectrum", "operator=fisher", "dataset=digits", "model=cnn",
                              "dataset.num_subsamples=96", "operator.batch_size=48", "analysis.num_steps=12",
                              "analysis.exact_max_dim=0"])
    results = dispatch(cfg)
    assert results["operator"]["names"] == ["fisher"] and results["operator"]["fisher"]["kind"] == "empirical"
    assert results["checks"]["fisher_psd"]["passed"]
    assert results["metrics"]["fisher_max_ritz_value"] > 0
    assert (tmp_path / "results.json").is_file() and (tmp_path / "spectrum.png").is_file()
