"""The model zoo: exact parameter counts, forward shapes, torch.func, registry and config group."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from curvature.errors import SuiteError
from curvature.models import (MODELS, ModelError, build_model, count_parameters, describe_models,
                              get_model)
from curvature.models.vgg import VGG_CFGS
from tests.conftest import CONF, DEVICES

SMALL = {"mlp", "cnn"}
TEXT = {"gpt_tiny"}  # a language model: (N, T) token ids in, (N, T, vocabulary) logits out
CIFAR_MODELS = [name for name in MODELS if name not in SMALL | TEXT]


class TinyNet(nn.Module):
    """A user's own model for ``model._target_``: flatten and one linear layer."""

    def __init__(self, num_classes: int, in_channels: int, input_size: int, bias: bool = True):
        super().__init__()
        self.linear = nn.Linear(in_channels * input_size * input_size, num_classes, bias=bias)

    def forward(self, x):
        return self.linear(x.flatten(1))


# --- parameter counts worked out from the architectures, independently of the modules ----------

def _conv(c_in, c_out, k, bias=False):
    return c_in * c_out * k * k + (c_out if bias else 0)


def vgg_count(depth, batch_norm, num_classes):
    total, c_in = 0, 3
    for entry in VGG_CFGS[depth]:
        if entry != "M":
            total += _conv(c_in, entry, 3, bias=True) + (2 * entry if batch_norm else 0)
            c_in = entry
    return total + 2 * (512 * 512 + 512) + 512 * num_classes + num_classes


def preresnet_count(depth, num_classes):
    bottleneck = depth >= 44
    n = (depth - 2) // (9 if bottleneck else 6)
    total, c_in = _conv(3, 16, 3), 16
    for planes in (16, 32, 64):
        out = 4 * planes if bottleneck else planes
        for block in range(n):
            if bottleneck:
                total += 2 * c_in + _conv(c_in, planes, 1) + 2 * planes + _conv(planes, planes, 3) \
                    + 2 * planes + _conv(planes, out, 1)
            else:
                total += 2 * c_in + _conv(c_in, planes, 3) + 2 * planes + _conv(planes, planes, 3)
            if block == 0 and (c_in != out or planes != 16):  # shape changes
                total += _conv(c_in, out, 1)  # a bare 1x1 conv shortcut, no BatchNorm
            c_in = out
    return total + 2 * c_in + c_in * num_classes + num_classes


def resnet18_count(num_classes):
    total, c_in = _conv(3, 64, 3) + 2 * 64, 64
    for planes in (64, 128, 256, 512):
        for block in range(2):
            total += _conv(c_in, planes, 3) + _conv(planes, planes, 3) + 4 * planes
            if c_in != planes:
                total += _conv(c_in, planes, 1) + 2 * planes  # 1x1 conv + BatchNorm shortcut
            c_in = planes
    return total + 512 * num_classes + num_classes


def expected_count(name, num_classes):
    if name.startswith("vgg"):
        return vgg_count(int(name[3:5]), name.endswith("_bn"), num_classes)
    if name.startswith("preresnet"):
        return preresnet_count(int(name[9:]), num_classes)
    if name == "resnet18":
        return resnet18_count(num_classes)
    if name == "mlp":  # 64 -> 64 -> 64 -> classes
        return 2 * (64 * 64 + 64) + 64 * num_classes + num_classes
    if name == "gpt_tiny":  # width 64, context 32, depth 2; the vocabulary is num_classes
        w, v = 64, num_classes
        # per block: 2 LayerNorms (2 w each), attention in-projection 3 w x w + 3 w and out-projection
        # w x w + w, MLP w -> 4 w -> w with biases: 12 w^2 + 13 w
        block = 2 * 2 * w + (3 * w * w + 3 * w) + (w * w + w) + (4 * w * w + 4 * w) + (4 * w * w + w)
        return v * w + 32 * w + 2 * block + 2 * w + w * v + v
    # cnn: conv 1->16, conv 16->32 (with biases), 32 channels x 4 x 4 -> classes
    return _conv(1, 16, 3, True) + _conv(16, 32, 3, True) + 32 * 16 * num_classes + num_classes


def test_exact_counts_of_the_original_package():
    assert count_parameters(get_model("vgg16", 100)) == 15_291_300
    assert count_parameters(get_model("preresnet110", 100)) == 1_169_972


def test_hand_derived_counts():
    # ResNet-18, 10 classes: stem 1,728 + 128; stages 147,968 + 525,568 + 2,099,712 + 8,393,728;
    # fc 5,130 -> 11,173,962.
    assert describe_models(10)["resnet18"] == 11_173_962
    # PreResNet-164 (18 Bottlenecks per stage), 10 classes: conv 432; stages 81,952 + 326,272 +
    # 1,291,520; final BN 512; fc 2,570 -> 1,703,258.
    assert describe_models(10)["preresnet164"] == 1_703_258


@pytest.mark.parametrize("num_classes", [10, 100])
def test_every_count_matches_its_architecture(num_classes):
    counts = describe_models(num_classes)
    assert set(counts) == set(MODELS)
    for name, count in counts.items():
        assert count == expected_count(name, num_classes), name


def test_describe_models_counts_real_models():
    assert describe_models()["cnn"] == count_parameters(get_model("cnn", 10)) == 9_930
    assert describe_models()["preresnet20"] == count_parameters(get_model("preresnet20", 10))


# --- forward passes and functional transforms ---------------------------------------------------

def tiny(name, num_classes=10):
    """A registered model small enough for a quick test, and an input batch of its shape."""
    if name in SMALL:
        return get_model(name, num_classes), torch.randn(2, 1, 8, 8)
    if name in TEXT:
        model = get_model(name, num_classes, input_size=5, width=8, depth=1, heads=2)
        return model, torch.randint(num_classes, (2, 5))
    return get_model(name, num_classes, width=0.125), torch.randn(2, 3, 32, 32)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("name", list(MODELS))
def test_forward_shape(name, device):
    torch.manual_seed(0)
    model, x = tiny(name, num_classes=7)
    with torch.no_grad():
        out = model.to(device)(x.to(device))
    assert out.shape == ((2, 5, 7) if name in TEXT else (2, 7))
    assert torch.isfinite(out).all()
    # In-place activations break functional transforms (torch.func) over the model.
    assert not any(getattr(m, "inplace", False) for m in model.modules())


# One model per block type: deeper members of a family only repeat the same blocks.
@pytest.mark.parametrize("name", ["vgg11", "vgg11_bn", "preresnet20", "preresnet56", "resnet18", "mlp", "cnn"])
def test_hessian_vector_product_with_torch_func(name):
    torch.manual_seed(0)
    model, x = tiny(name)
    model.eval()
    y = torch.tensor([1, 3])
    params = {k: v.detach() for k, v in model.named_parameters()}
    buffers = dict(model.named_buffers())

    def loss(p):
        logits = torch.func.functional_call(model, (p, buffers), (x,))
        return nn.functional.cross_entropy(logits, y)

    vector = {k: torch.randn_like(v) for k, v in params.items()}
    gradient, hvp = torch.func.jvp(torch.func.grad(loss), (params,), (vector,))
    assert set(hvp) == set(params)
    assert all(torch.isfinite(h).all() for h in hvp.values())
    assert gradient.keys() == params.keys()


def test_small_models_take_cifar_shapes():
    cnn = get_model("cnn", 10, in_channels=3, input_size=32, batch_norm=True)
    mlp = get_model("mlp", 10, in_channels=3, input_size=32, hidden=[16])
    x = torch.randn(2, 3, 32, 32)
    assert cnn(x).shape == mlp(x).shape == (2, 10)
    assert count_parameters(mlp) == 3 * 32 * 32 * 16 + 16 + 16 * 10 + 10


def test_width_multiplier_shrinks_the_model():
    for name in ["vgg16", "vgg11_bn", "preresnet20", "resnet18"]:
        counts = [count_parameters(get_model(name, 10, width=w)) for w in (0.125, 0.5, 1.0)]
        assert counts[0] < counts[1] < counts[2], name
    vgg = get_model("vgg16", 10, width=0.25)
    assert vgg.classifier[1].out_features == 128
    assert max(m.out_channels for m in vgg.modules() if isinstance(m, nn.Conv2d)) == 128


def test_vgg_conv_init_of_the_original_package():
    torch.manual_seed(0)
    conv = [m for m in get_model("vgg16", 10).modules() if isinstance(m, nn.Conv2d)][-1]
    # N(0, 2 / n) with n = 3 * 3 * out_channels: fan-out He initialisation, zero bias.
    assert conv.weight.std().item() == pytest.approx(math.sqrt(2 / (9 * 512)), rel=0.01)
    assert torch.count_nonzero(conv.bias) == 0


# --- registry errors and build_model ------------------------------------------------------------

def test_unknown_name_lists_the_known_ones():
    with pytest.raises(ValueError, match="known models: vgg11, vgg11_bn.*resnet18, mlp, cnn") as info:
        get_model("vgg13", 10)
    assert isinstance(info.value, SuiteError)


def test_bad_keyword_or_width_is_a_model_error():
    with pytest.raises(ModelError, match="it takes: width"):
        get_model("vgg16", 10, depth=19)
    with pytest.raises(ModelError, match="width multiplier must be positive"):
        get_model("resnet18", 10, width=0)


def test_build_model_by_name_passes_data_shape_only_where_taken():
    model = build_model({"name": "vgg16", "width": 0.125}, num_classes=10, in_channels=3, input_size=32)
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    mlp = build_model({"name": "mlp", "hidden": [8]}, num_classes=3, in_channels=3, input_size=4)
    assert count_parameters(mlp) == 48 * 8 + 8 + 8 * 3 + 3
    with pytest.raises(ModelError, match="takes inputs of shape 3x32x32 but the dataset gives 1x8x8"):
        build_model({"name": "resnet18", "width": 0.125}, num_classes=10, in_channels=1, input_size=8)


def test_build_model_from_target():
    cfg = {"name": "custom", "_target_": "tests.test_models.TinyNet", "bias": False}
    model = build_model(cfg, num_classes=10, in_channels=1, input_size=8)
    assert isinstance(model, TinyNet) and count_parameters(model) == 64 * 10
    linear = build_model({"_target_": "torch.nn.Linear", "in_features": 5, "out_features": 2},
                         num_classes=10, in_channels=1, input_size=8)
    assert isinstance(linear, nn.Linear) and linear.out_features == 2


@pytest.mark.parametrize("cfg, message", [
    ({"name": "custom", "_target_": "???"}, "is not set"),
    ({"name": "custom"}, "is not set"),
    ({"_target_": "tests.test_models.NoSuchNet"}, "cannot be imported"),
    ({"_target_": "no_such_package.Net"}, "cannot be imported"),
    ({"_target_": "tests.test_models.TinyNet", "depth": 3}, "cannot be built from the keywords"),
    ({"_target_": "tests.test_models.expected_count"}, "cannot be built"),
    ({"_target_": "math.pi"}, "not callable"),
])
def test_build_model_errors(cfg, message):
    with pytest.raises(ModelError, match=message):
        build_model(cfg, num_classes=10, in_channels=1, input_size=8)


# --- the Hydra config group ---------------------------------------------------------------------

def test_config_group_has_one_file_per_model():
    files = {p.stem: OmegaConf.to_container(OmegaConf.load(p)) for p in (CONF / "model").glob("*.yaml")}
    assert set(files) == set(MODELS) | {"custom"}
    for stem, cfg in files.items():
        assert cfg["name"] == stem
        assert Path(CONF / "model" / f"{stem}.yaml").read_text().startswith("# ")
    assert files["custom"]["_target_"] == "???"


@pytest.mark.parametrize("name", list(MODELS))
def test_config_group_builds(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONF / "model" / f"{name}.yaml"))
    if name in TEXT:  # the vocabulary (10) and context (12) come from the text
        model = build_model(cfg, num_classes=10, in_channels=1, input_size=12)
        assert model(torch.randint(10, (2, 12))).shape == (2, 12, 10)
        return
    shape = (1, 8) if name in SMALL else (3, 32)
    if name not in SMALL:
        cfg["width"] = 0.125
    model = build_model(cfg, num_classes=10, in_channels=shape[0], input_size=shape[1])
    assert model(torch.randn(2, shape[0], shape[1], shape[1])).shape == (2, 10)


def test_registered_model_takes_num_classes_from_the_dataset():
    with pytest.raises(ModelError, match="num_classes"):
        build_model({"name": "mlp", "num_classes": 3}, num_classes=10, in_channels=1, input_size=8)
