"""Layer-wise products over traced graphs (residual networks) and BatchNorm with batch statistics,
against dense float64 ground truth (double backward for the Hessian, explicit Jacobians for the GGN)."""

from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.dense import dense_ggn, dense_hessian
from curvature.graph_plan import GraphPlan
from curvature.layerwise import LayerwisePlan, build_plan
from curvature.models import get_model
from curvature.models.preresnet import PreResNet
from curvature.operators import get_loss, make_operator

from tests.test_layerwise import batches, every_layer_chain, randomise_batchnorm


class UserResidual(nn.Module):
    """A user's residual module in the functional style fx records as call_function / call_method nodes;
    ``hidden`` feeds two nodes, so its gradients accumulate."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(2, 3, 3, padding=1)
        self.bn = nn.BatchNorm2d(3)
        self.branch = nn.Sequential(nn.Conv2d(3, 3, 3, padding=1, bias=False), nn.BatchNorm2d(3), nn.Tanh(),
                                    nn.Conv2d(3, 3, 1))
        self.side = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(20, 6)
        self.bn1d = nn.BatchNorm1d(6)
        self.act = nn.Softplus()
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        x = torch.add(x, self.branch(x)) + 0.5  # a residual sum, then a shift
        x = torch.cat([x, self.side(x).relu()], dim=1) * 2.0
        x = F.adaptive_avg_pool2d(x, 2)
        x = x.view(x.size(0), -1)
        hidden = self.bn1d(self.fc(x))
        return self.head(self.act(hidden) + torch.tanh(hidden).mean(dim=1, keepdim=True))


class TokenModel(nn.Module):
    """Embedding, a residual block through LayerNorm, LayerNorm over two dims."""

    def __init__(self, padding_idx=None):
        super().__init__()
        self.embedding = nn.Embedding(7, 4, padding_idx=padding_idx)
        self.norm = nn.LayerNorm(4)
        self.mix = nn.Linear(4, 4)
        self.norm2 = nn.LayerNorm([3, 4])
        self.head = nn.Linear(12, 3)

    def forward(self, tokens):
        h = self.embedding(tokens)
        h = h + self.mix(torch.tanh(self.norm(h)))
        return self.head(self.norm2(h).flatten(1))


def layernorm_chain():
    return nn.Sequential(nn.Flatten(), nn.Linear(16, 6), nn.LayerNorm(6), nn.GELU(), nn.Linear(6, 3))


def token_batches(sizes=(6, 4, 5)):
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, 7, (n, 3), generator=gen), torch.randint(0, 3, (n,), generator=gen)) for n in sizes]


def randomise_layernorm(model):
    gen = torch.Generator().manual_seed(4)
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.weight.data.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=gen, dtype=m.weight.dtype))
            m.bias.data.copy_(0.3 * torch.randn(m.bias.shape, generator=gen, dtype=m.bias.dtype))
    return model


def preresnet8():
    return PreResNet(10, depth=8, width=0.125)


#: model maker, input shape, classes, parameter subsets (None: all)
CASES = {
    "preresnet8": (preresnet8, (3, 32, 32), 10,
                   [["conv1.weight", "layer1.*", "layer2.0.bn1.*", "layer2.0.shortcut.0.weight", "layer3.0.bn*",
                     "bn.*", "fc.bias"]]),
    "user_residual": (UserResidual, (2, 5, 5), 3, [None, ["branch.1.*", "side.weight", "bn1d.bias"]]),
    "chain": (every_layer_chain, (2, 7, 7), 3, [None]),
    "layernorm_chain": (layernorm_chain, (1, 4, 4), 3, [None]),
    "tokens": (TokenModel, None, 3, [None, ["norm.*", "norm2.weight", "head.bias"]]),
}


#: preresnet8 needs 32 x 32 inputs (its final AvgPool2d(8)), so it gets fewer samples, still uneven batches
SIZES = {"preresnet8": (4, 2, 3)}


def _data(key):
    _, shape, classes, _ = CASES[key]
    sizes = SIZES.get(key, (6, 4, 5))
    return token_batches(sizes) if shape is None else batches(shape, classes, sizes)


@lru_cache(maxsize=None)
def _model(key):
    torch.manual_seed(0)
    return randomise_layernorm(randomise_batchnorm(CASES[key][0]().double()))


@lru_cache(maxsize=None)
def _dense(key, name, bn_mode, subset):
    builder = dense_hessian if name == "hessian" else dense_ggn
    return builder(_model(key), get_loss("cross_entropy"), _data(key), bn_mode,
                   params=None if subset is None else list(subset))


@pytest.mark.parametrize("bn_mode", ["train", "eval"])
@pytest.mark.parametrize("name", ["hessian", "ggn"])
@pytest.mark.parametrize("key", list(CASES))
def test_graph_and_batch_statistics_products_equal_the_dense_matrices(key, name, bn_mode):
    """Uneven batches (6, 4, 5; preresnet8 4, 2, 3): with batch statistics each batch's curvature couples
    its own samples."""
    subsets = CASES[key][3]
    model, data = _model(key), _data(key)
    for subset in subsets:
        exact = _dense(key, name, bn_mode, None if subset is None else tuple(subset))
        op = make_operator(name, model, get_loss("cross_entropy"), data, bn_mode=bn_mode, params=subset,
                           layerwise=True)
        assert op.engine == "layerwise"
        assert isinstance(op.plan, LayerwisePlan if key.endswith("chain") else GraphPlan)
        v = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
        for _ in range(2):  # the second round reuses the cached primal
            torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-9, atol=1e-11)


def test_resnet18_is_traced_and_checked_against_autograd():
    """The operators' own float64 check (8 samples) accepts the traced ResNet-18 in both BatchNorm modes."""
    torch.manual_seed(0)
    model = get_model("resnet18", 10, width=0.0625)
    data = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,)))]
    for bn_mode in ("train", "eval"):
        op = make_operator("hessian", model, get_loss("cross_entropy"), data, bn_mode=bn_mode, layerwise=True)
        assert op.engine == "layerwise" and isinstance(op.plan, GraphPlan)


class DataDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.fc(x) if x.sum() > 0 else self.fc(-x)


class Gated(nn.Module):
    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(4, 3), nn.Linear(4, 3)

    def forward(self, x):
        x = x.flatten(1)
        return self.a(x) * self.b(x)


class SharedLayer(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return self.fc(self.fc(x.flatten(1)))


def test_untraceable_or_unsupported_graphs_fall_back_to_autograd_with_a_reason():
    loss = get_loss("cross_entropy")
    data = [(torch.randn(3, 1, 2, 2), torch.randint(0, 3, (3,)))]
    op = make_operator("hessian", DataDependent(), loss, data, bn_mode="eval")
    assert op.engine == "autograd" and "torch.fx cannot trace" in op.layerwise_reason
    assert "node mul" in build_plan(Gated(), loss, ["a.weight"], "eval")[1]
    assert "used by two nodes" in build_plan(SharedLayer(), loss, ["fc.weight"], "eval")[1]
    # the padding row of an Embedding gets no gradient, so autograd's Hessian is not symmetric there
    assert "padding_idx" in build_plan(TokenModel(padding_idx=0), loss, ["head.bias"], "eval")[1]
