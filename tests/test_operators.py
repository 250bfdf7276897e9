"""Hessian and GGN operators: batching, parameter subsets, Lanczos, determinism, the graph cache."""

import warnings

import pytest
import torch
from torch import nn

from curvature.dense import dense_ggn, dense_hessian
from curvature.lanczos import lanczos
from curvature.operators import (GGNOperator, HessianOperator, get_loss, loss_hessian_product,
                                 make_operator)
from tests.cases import build, data, tiny_cnn, tiny_mlp  # noqa: F401 - other test modules import them from here

close = torch.testing.assert_close


# Products against the dense matrices over models x losses x BatchNorm modes x dtypes x devices:
# tests/test_cases.py, on the shared table of tests/cases.py. Here: what the table does not cover.


def test_ggn_is_psd_and_differs_from_an_indefinite_hessian():
    model, batches, loss_fn = build(tiny_cnn, "cpu"), data("cpu"), get_loss("cross_entropy")
    g = dense_ggn(model, loss_fn, batches, "train")
    h = dense_hessian(model, loss_fn, batches, "train")
    assert torch.linalg.eigvalsh(g).min() > -1e-12 * torch.linalg.eigvalsh(g).max()
    assert torch.linalg.eigvalsh(h).min() < -1e-6  # this random network's Hessian is indefinite


def test_batch_weighting_equals_the_mean_loss_over_all_samples():
    model, loss_fn = build(tiny_mlp, "cpu"), get_loss("cross_entropy")
    uneven = data("cpu", sizes=(9, 2, 5))
    whole = [(torch.cat([x for x, _ in uneven]), torch.cat([y for _, y in uneven]))]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    for name in ("hessian", "ggn"):
        a = make_operator(name, model, loss_fn, uneven, bn_mode="eval").matvec(v)
        b = make_operator(name, model, loss_fn, whole, bn_mode="eval").matvec(v)
        close(a, b, atol=1e-12, rtol=1e-5)


def test_closed_form_output_hessians_equal_autograd():
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    u = torch.randn(5, 4, dtype=torch.float64, generator=gen)
    y = torch.randint(0, 4, (5,), generator=gen)
    for name in ("cross_entropy", "mse"):
        loss_fn = get_loss(name)
        generic = torch.func.jvp(torch.func.grad(lambda o: loss_fn(o, y)), (z,), (u,))[1]
        close(loss_hessian_product(loss_fn, z, y, u), generic, atol=1e-14, rtol=1e-5)


def test_parameter_subset_is_the_principal_block():
    model, batches, loss_fn = build(tiny_mlp, "cpu"), data("cpu"), get_loss("cross_entropy")
    h = dense_hessian(model, loss_fn, batches, "eval")
    op = HessianOperator(model, loss_fn, batches, bn_mode="eval", params=["4.*"])  # the last Linear
    assert op.names == ["4.weight", "4.bias"] and op.num_params == 27
    v = torch.randn(27, dtype=torch.float64)
    close(op.matvec(v), h[-27:, -27:] @ v, atol=1e-12, rtol=1e-5)
    sub = dense_hessian(model, loss_fn, batches, "eval", params=["4.*"])
    close(sub, h[-27:, -27:], atol=1e-12, rtol=1e-5)


def test_lanczos_extremes_equal_dense_extremes():
    model, batches = build(tiny_cnn, "cpu"), data("cpu")
    loss_fn = get_loss("cross_entropy")
    for name, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        exact = torch.linalg.eigvalsh(dense(model, loss_fn, batches, "train"))
        op = make_operator(name, model, loss_fn, batches, bn_mode="train")
        res = lanczos(op.matvec, op.num_params, 40, seed=0)
        converged = res.residual_bounds[0] < 1e-8 * exact.abs().max()
        assert converged[-1] and converged[0]
        assert float(res.ritz_values[0, -1]) == pytest.approx(float(exact[-1]), rel=1e-6)
        assert float(res.ritz_values[0, 0]) == pytest.approx(float(exact[0]), rel=1e-6, abs=1e-9)


def test_random_operator_is_detected():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Dropout(0.5), nn.Linear(8, 3)).double()

    class NoisyLoss:
        def __call__(self, out, y):  # fresh noise per call makes the curvature random
            return nn.functional.cross_entropy(out * (1 + 0.1 * torch.rand(())), y)

    class Augmenting:
        """Re-iterable data that perturbs its inputs on every pass (like augmentation)."""
        def __iter__(self):
            for x, y in data("cpu"):
                yield x + 0.1 * torch.randn_like(x), y

    with pytest.warns(RuntimeWarning, match="differ"):
        HessianOperator(model, NoisyLoss(), data("cpu"), bn_mode="eval")
    with warnings.catch_warnings():  # read once: the augmented pass is frozen, so the operator is fixed
        warnings.simplefilter("error", RuntimeWarning)
        op = HessianOperator(model, get_loss("cross_entropy"), Augmenting(), bn_mode="eval")
    assert op.deterministic and any("read 3 batches once from a Augmenting" in n for n in op.notes)
    first = op.batches[0][0].clone()
    op.matvec(torch.ones(op.num_params, dtype=torch.float64))
    assert torch.equal(op.batches[0][0], first)
    with warnings.catch_warnings():  # dropout is switched off, so this operator is fixed
        warnings.simplefilter("error", RuntimeWarning)
        op = HessianOperator(model, get_loss("cross_entropy"), data("cpu"), bn_mode="eval")
    assert op.deterministic


def test_operator_matrix_equals_the_independent_dense_builders():
    from curvature.dense import operator_matrix
    model, batches, loss_fn = build(tiny_cnn, "cpu"), data("cpu"), get_loss("cross_entropy")
    for name, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        op = make_operator(name, model, loss_fn, batches, bn_mode="train")
        close(operator_matrix(op, chunk=7), dense(model, loss_fn, batches, "train"), atol=1e-10, rtol=1e-5)


# --- primal reuse (operator cache) ---------------------------------------------------------------
CACHE_CASES = [(maker, bn, cache) for maker in (tiny_mlp, tiny_cnn) for bn in ("train", "eval")
               for cache in ("none", "all", "partial", "over_budget")]


def cached_operator(name, model, loss_fn, batches, bn_mode, cache, **kwargs):
    """``partial``: a budget that holds the first batch's graph only; ``over_budget``: none fits."""
    if cache in ("none", "all"):
        return make_operator(name, model, loss_fn, batches, bn_mode=bn_mode, cache=cache, **kwargs)
    probe = make_operator(name, model, loss_fn, batches[:1], bn_mode=bn_mode, cache="all",
                          check_deterministic=False, **kwargs)
    probe.matvec(torch.zeros(probe.num_params, dtype=torch.float64))
    budget = probe.cache_bytes if cache == "partial" else 1
    return make_operator(name, model, loss_fn, batches, bn_mode=bn_mode, cache="auto",
                         cache_budget_bytes=budget, **kwargs)


@pytest.mark.parametrize("maker,bn_mode,cache", CACHE_CASES)
def test_every_cache_mode_equals_the_dense_matrices(maker, bn_mode, cache):
    model, batches, loss_fn = build(maker, "cpu"), data("cpu"), get_loss("cross_entropy")
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(2))
    for name, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        exact = dense(model, loss_fn, batches, bn_mode)
        op = cached_operator(name, model, loss_fn, batches, bn_mode, cache)
        for _ in range(2):  # the first products build the graphs, the later ones reuse them
            close(op.matvec(v), exact @ v, atol=1e-10, rtol=1e-8)
            close(op @ v[:, 1], exact @ v[:, 1], atol=1e-10, rtol=1e-8)
        expected = {"none": 0, "all": 3, "partial": 1, "over_budget": 0}[cache]
        assert len(op._graphs) == expected and (op.cache_bytes > 0) == (expected > 0)


def test_cache_with_a_parameter_subset_and_mse():
    model, batches, loss_fn = build(tiny_cnn, "cpu"), data("cpu", sizes=(9, 2, 5)), get_loss("mse")
    for name, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        exact = dense(model, loss_fn, batches, "train", params=["5.*"])
        op = make_operator(name, model, loss_fn, batches, bn_mode="train", params=["5.*"], cache="all")
        v = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
        op.matvec(v)
        close(op.matvec(v), exact @ v, atol=1e-10, rtol=1e-8)


def test_cached_graphs_are_dropped_when_the_weights_change():
    model, batches, loss_fn = build(tiny_cnn, "cpu"), data("cpu"), get_loss("cross_entropy")
    op = HessianOperator(model, loss_fn, batches, bn_mode="train", cache="all")
    v = torch.randn(op.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    op.matvec(v)
    with torch.no_grad():  # an optimiser step, in place
        for p in model.parameters():
            p.add_(0.3 * torch.randn_like(p))
    close(op.matvec(v), dense_hessian(model, loss_fn, batches, "train") @ v, atol=1e-10, rtol=1e-5)
    model.load_state_dict({k: t.clone() * 0.9 for k, t in model.state_dict().items()})
    close(op.matvec(v), dense_hessian(model, loss_fn, batches, "train") @ v, atol=1e-10, rtol=1e-5)


@pytest.mark.parametrize("layerwise", [False, True])
def test_out_of_memory_while_caching_falls_back_to_recomputing(monkeypatch, layerwise):
    from curvature import operators
    model, batches, loss_fn = build(tiny_mlp, "cpu"), data("cpu"), get_loss("cross_entropy")
    op = HessianOperator(model, loss_fn, batches, bn_mode="eval", cache="all", check_deterministic=False,
                         layerwise=layerwise)
    assert op.engine == ("layerwise" if layerwise else "autograd")
    name = "_layerwise_prepare" if layerwise else "_prepare"
    calls, prepare = [], getattr(op, name)

    def oom(*args):  # the first build of a cached graph runs out of memory, later calls work
        calls.append(1)
        if len(calls) == 1:
            raise operators.OutOfMemory("CUDA out of memory (simulated)")
        return prepare(*args)

    monkeypatch.setattr(op, name, oom)
    v = torch.randn(op.num_params, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="out of memory"):
        out = op.matvec(v)
    assert not op._caching and not op._graphs
    close(out, dense_hessian(model, loss_fn, batches, "eval") @ v, atol=1e-10, rtol=1e-5)


def test_random_operator_is_detected_with_the_cache_on():
    model = nn.Sequential(nn.Flatten(), nn.Linear(16, 8), nn.Linear(8, 3)).double()

    class NoisyLoss:
        def __call__(self, out, y):
            return nn.functional.cross_entropy(out * (1 + 0.1 * torch.rand(())), y)

    with pytest.warns(RuntimeWarning, match="differ"):
        HessianOperator(model, NoisyLoss(), data("cpu"), bn_mode="eval", cache="all")


def test_micro_batch_slices_are_not_cached():
    from curvature.operators import curvature_mode
    model, batches, loss_fn = build(tiny_mlp, "cpu"), data("cpu"), get_loss("cross_entropy")
    op = HessianOperator(model, loss_fn, batches, bn_mode="eval", cache="all", check_deterministic=False)
    v = op.unflatten(torch.randn(op.num_params, 1, dtype=torch.float64))
    x, y = batches[0]
    with curvature_mode(model, "eval"):  # as matvec's OOM fallback calls it, on a slice
        half = op.batch_product(x[:3], y[:3], op._selected(), v)
    assert not op._graphs
    exact = dense_hessian(model, loss_fn, [(x[:3], y[:3])], "eval")
    close(op.flatten(half, batched=True)[:, 0], exact @ op.flatten(v, batched=True)[:, 0], rtol=1e-5, atol=1e-8)
