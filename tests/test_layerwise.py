"""Layer-wise (hand-written R-operator) Hessian and GGN products against dense float64 ground truth."""

import warnings

import pytest
import torch
from torch import nn

from curvature.dense import dense_ggn, dense_hessian
from curvature.errors import SuiteError
from curvature.layerwise import build_plan
from curvature.models import get_model
from curvature.models.small import MLP, SmallCNN
from curvature.operators import GGNOperator, HessianOperator, get_loss, make_operator


def every_layer_chain():
    """Every supported layer type, with strides, padding, ceil mode and both BatchNorms."""
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, stride=2, padding=1), nn.BatchNorm2d(3), nn.ReLU(),
        nn.Conv2d(3, 4, 2, padding=1, dilation=2, bias=False), nn.Sigmoid(),
        nn.MaxPool2d(2, stride=1, padding=1, ceil_mode=True), nn.AvgPool2d(2), nn.Identity(),
        nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(16, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3))


def randomise_batchnorm(model):
    gen = torch.Generator().manual_seed(3)
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=gen) - 0.5)
            m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=gen))
            if m.affine:
                m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen))
                m.bias.data.copy_(0.3 * torch.randn(m.bias.shape, generator=gen))
    return model


def batches(shape, classes, sizes=(6, 4, 5), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, *shape, generator=gen, dtype=torch.float64),
             torch.randint(0, classes, (n,), generator=gen)) for n in sizes]


MODELS = {
    "chain": (every_layer_chain, (2, 7, 7)),
    "mlp": (lambda: MLP(hidden=(12, 9), input_size=4), (1, 4, 4)),
    "small_cnn": (lambda: SmallCNN(channels=(3, 4), input_size=5), (1, 5, 5)),
    "small_cnn_bn": (lambda: SmallCNN(channels=(3, 4), input_size=5, batch_norm=True), (1, 5, 5)),
}
SUBSETS = {"chain": ["0.*", "3.weight", "12.bias"], "mlp": ["net.3.*"], "small_cnn": ["features.2.weight"],
           "small_cnn_bn": ["features.1.*", "fc.bias"]}


def _model(key):
    torch.manual_seed(0)
    return randomise_batchnorm(MODELS[key][0]().double())


def _dense(key, loss, name, params):
    dense = {"hessian": dense_hessian, "ggn": dense_ggn}[name]
    return dense(_model(key), get_loss(loss), batches(MODELS[key][1], 3), "eval", params=params)


@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("key", list(MODELS))
def test_layerwise_products_equal_the_dense_matrices(key, loss):
    """Both cache modes against the same dense matrices (built once: they do not depend on the cache)."""
    model = _model(key)
    data, loss_fn = batches(MODELS[key][1], 3), get_loss(loss)
    exact = {(name, i): _dense(key, loss, name, params) for i, params in enumerate((None, SUBSETS[key]))
             for name in ("hessian", "ggn")}
    for cache in ("none", "all"):
        for i, params in enumerate((None, SUBSETS[key])):
            for name in ("hessian", "ggn"):
                op = make_operator(name, model, loss_fn, data, bn_mode="eval", params=params, cache=cache,
                                   layerwise=True)
                assert op.engine == "layerwise"
                v = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
                for _ in range(2):  # the second round reuses the cached primal
                    assert torch.allclose(op.matvec(v), exact[name, i] @ v, atol=1e-10, rtol=1e-8), \
                        (name, params, cache)
                assert len(op._graphs) == (0 if cache == "none" else len(data))


def test_vgg_float32_channels_last_equals_autograd():
    """The CPU path (channels-last kernels, float32) against autograd's products of the same VGG."""
    torch.manual_seed(0)
    model = get_model("vgg11", 10, width=0.0625).eval()
    gen = torch.Generator().manual_seed(0)
    data = [(torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, 10, (n,), generator=gen)) for n in (8, 5)]
    loss_fn = get_loss("cross_entropy")
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=gen)
    for name in ("hessian", "ggn"):
        fast = make_operator(name, model, loss_fn, data, bn_mode="eval")
        slow = make_operator(name, model, loss_fn, data, bn_mode="eval", layerwise=False)
        assert fast.engine == "layerwise" and slow.engine == "autograd"
        a, b = fast @ v, slow @ v
        assert float((a - b).norm() / b.norm()) < 1e-5, name
        assert fast.cache == "auto" and len(fast._graphs) == 2  # cached by default for both operators


def test_engine_falls_back_to_autograd_where_the_layerwise_path_does_not_apply():
    """Residual networks and batch statistics have their own plans (tests/test_graph_plan.py); an
    unsupported layer, an untraceable forward or a loss without a closed-form Hessian falls back."""
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,)))]
    elu = nn.Sequential(nn.Flatten(), nn.Linear(3072, 4), nn.ELU(), nn.Linear(4, 10))
    op = GGNOperator(elu, get_loss("cross_entropy"), data, bn_mode="train", check_deterministic=False)
    assert op.engine == "autograd" and op.layerwise_reason == "layer type ELU"
    assert op.cache == "none"  # the GGN's autograd default
    with pytest.raises(SuiteError, match="operator.layerwise=true .*layer type ELU.*operator.layerwise=auto"):
        GGNOperator(elu, get_loss("cross_entropy"), data, bn_mode="train", layerwise=True)
    with pytest.raises(ValueError, match="layerwise must be"):
        GGNOperator(elu, get_loss("cross_entropy"), data, layerwise="yes")

    class Branching(nn.Module):  # Python control flow on a tensor's value: torch.fx cannot trace it
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(3072, 10)

        def forward(self, x):
            return self.fc(x.flatten(1)) if x.sum() > 0 else self.fc(-x.flatten(1))

    op = HessianOperator(Branching(), get_loss("cross_entropy"), data, bn_mode="eval", check_deterministic=False)
    assert op.engine == "autograd" and "torch.fx cannot trace" in op.layerwise_reason
    assert build_plan(elu, get_loss("cross_entropy"), ["1.weight"], "eval")[1] == "layer type ELU"
    assert build_plan(elu, lambda o, t: o.sum(), ["1.weight"], "eval")[0] is None


def test_a_chain_that_is_not_the_forward_pass_is_caught_and_autograd_used():
    class Liar(nn.Module):  # forward squares the hidden layer; the declared chain does not
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x):
            return self.b(self.a(x) ** 2)

        def curvature_layers(self):
            return [self.a, self.b]

    torch.manual_seed(0)
    model = Liar().double()
    data = batches((4,), 3, sizes=(5, 3))
    with pytest.warns(RuntimeWarning, match="differs from autograd"):
        op = HessianOperator(model, get_loss("cross_entropy"), data, bn_mode="eval")
    assert op.engine == "autograd"
    v = torch.randn(op.num_params, dtype=torch.float64)
    assert torch.allclose(op @ v, dense_hessian(model, get_loss("cross_entropy"), data, "eval") @ v, atol=1e-10)
    with warnings.catch_warnings(), pytest.raises(SuiteError, match="differs from autograd"):
        warnings.simplefilter("ignore")
        HessianOperator(model, get_loss("cross_entropy"), data, bn_mode="eval", layerwise=True)


def test_soft_label_cross_entropy_is_exact():
    """Probability targets (label smoothing, mixup) give the same closed-form output Hessian."""
    torch.manual_seed(0)
    model = MLP(hidden=(6,), input_size=3).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(5, 1, 3, 3, generator=gen, dtype=torch.float64)
    y = torch.softmax(torch.randn(5, 10, generator=gen, dtype=torch.float64), -1)
    loss_fn = get_loss("cross_entropy")
    op = HessianOperator(model, loss_fn, [(x, y)], bn_mode="eval", layerwise=True)
    v = torch.randn(op.num_params, dtype=torch.float64, generator=gen)
    assert torch.allclose(op @ v, dense_hessian(model, loss_fn, [(x, y)], "eval") @ v, atol=1e-10)


def test_newton_checks_the_layerwise_products_on_its_first_step_only(monkeypatch):
    """An optimiser builds an operator every step; the autograd cross-check runs once, then is trusted."""
    from curvature.optim.newton import SaddleFreeNewton
    torch.manual_seed(0)
    model = SmallCNN(channels=(3, 4), input_size=5).double()
    x, y = batches((1, 5, 5), 10, sizes=(8,))[0]
    calls, original = [], HessianOperator._fresh_product
    monkeypatch.setattr(HessianOperator, "_fresh_product",
                        lambda self, *args: calls.append(self.engine) or original(self, *args))
    opt = SaddleFreeNewton(model.parameters(), model=model, lr=0.1, lanczos_steps=3)
    for _ in range(3):
        opt.zero_grad()
        logits = model(x)
        opt.observe(x, y, logits)
        torch.nn.functional.cross_entropy(logits, y).backward()
        opt.step()
    assert calls == ["autograd", "autograd"]  # the first step's checks: pre-flight and layer-wise reference
    assert opt._layerwise_checked is True
