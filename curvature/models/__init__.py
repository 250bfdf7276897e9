"""The model zoo: the CIFAR architectures of the original Deep Curvature package, plus small models.

    from curvature.models import get_model, count_parameters
    model = get_model("vgg16", num_classes=100)          # 15,291,300 parameters
    model = get_model("vgg16", num_classes=10, width=0.25)  # a VGG16 that fits a CPU demo
    model = get_model("mlp", num_classes=10, hidden=[32])   # for the 8x8 digits

CIFAR models (input (N, 3, 32, 32)): vgg11, vgg16, vgg19 and their ``_bn`` variants, preresnet20,
preresnet56, preresnet110, preresnet164 and resnet18, each with a ``width`` multiplier. Small
models (input (N, in_channels, input_size, input_size), by default the 1x8x8 digits): mlp and cnn.
Language model (input (N, T) token ids, output (N, T, vocabulary) logits): gpt_tiny, whose
``num_classes`` is the vocabulary size and ``input_size`` the context length (``dataset=text``).
:func:`build_model` turns the plain dict of the ``model`` config group into a model, including any
``torch.nn.Module`` named by ``_target_``.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from typing import Any, Callable, Mapping

import torch
from torch import nn

from curvature.errors import SuiteError
from curvature.models.gpt import GPTTiny
from curvature.models.preresnet import PreResNet
from curvature.models.resnet import ResNet18
from curvature.models.small import MLP, SmallCNN
from curvature.models.vgg import VGG

__all__ = ["MODELS", "ModelError", "build_model", "count_parameters", "describe_models", "get_model",
           "GPTTiny", "MLP", "PreResNet", "ResNet18", "SmallCNN", "VGG"]


class ModelError(SuiteError, ValueError):
    """A model name, keyword or ``_target_`` that cannot build a model."""


def _vgg(depth: int, batch_norm: bool) -> Callable[..., VGG]:
    def build(num_classes: int = 10, width: float = 1.0) -> VGG:
        return VGG(num_classes, depth=depth, batch_norm=batch_norm, width=width)
    build.__doc__ = f"VGG{depth}{' with BatchNorm' if batch_norm else ''} for CIFAR."
    return build


def _preresnet(depth: int) -> Callable[..., PreResNet]:
    def build(num_classes: int = 10, width: float = 1.0) -> PreResNet:
        return PreResNet(num_classes, depth=depth, width=width)
    build.__doc__ = f"PreResNet-{depth} for CIFAR."
    return build


def _gpt_tiny(num_classes: int = 10, input_size: int = 32, width: int = 64, depth: int = 2, heads: int = 4,
              dropout: float = 0.0) -> GPTTiny:
    """GPTTiny over a vocabulary of ``num_classes`` tokens with a context of ``input_size`` tokens
    (both facts of the text dataset, as the class count and image size are of an image dataset)."""
    return GPTTiny(num_classes, context=input_size, width=width, depth=depth, heads=heads, dropout=dropout)


# name -> constructor(num_classes, **kwargs). Each constructor names exactly the keywords it takes,
# so a config key a model does not use is an error instead of being silently ignored.
MODELS: dict[str, Callable[..., nn.Module]] = {
    "vgg11": _vgg(11, False), "vgg11_bn": _vgg(11, True),
    "vgg16": _vgg(16, False), "vgg16_bn": _vgg(16, True),
    "vgg19": _vgg(19, False), "vgg19_bn": _vgg(19, True),
    "preresnet20": _preresnet(20), "preresnet56": _preresnet(56),
    "preresnet110": _preresnet(110), "preresnet164": _preresnet(164),
    "resnet18": ResNet18,
    "mlp": MLP,
    "cnn": SmallCNN,
    "gpt_tiny": _gpt_tiny,
}

# Run-time facts of the dataset, passed to a constructor only when its signature names them.
_DATA_KEYWORDS = ("in_channels", "input_size")
_NOT_KWARGS = ("name", "_target_")


def count_parameters(model: nn.Module) -> int:
    """Number of trainable scalars (parameters with ``requires_grad``)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _parameter_names(constructor: Callable) -> set[str] | None:
    """Names of the keyword-passable parameters, or None when they cannot be read."""
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {p.name for p in signature.parameters.values() if p.kind in kinds}


def _check_keywords(label: str, constructor: Callable, args: tuple, kwargs: dict) -> None:
    try:
        signature = inspect.signature(constructor)
    except (TypeError, ValueError):
        return  # no signature to check against (a builtin); the call itself will complain
    try:
        signature.bind(*args, **kwargs)
    except TypeError as error:
        accepted = sorted((_parameter_names(constructor) or set()) - {"self", "num_classes"})
        raise ModelError(f"model {label} cannot be built from the keywords {sorted(kwargs)}: {error}; "
                         f"it takes: {', '.join(accepted) or 'no keywords'}") from None


def get_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """The registered model ``name`` with ``num_classes`` outputs; ``kwargs`` go to its constructor."""
    key = str(name).lower()
    if key not in MODELS:
        raise ModelError(f"unknown model {name!r}; known models: {', '.join(MODELS)} "
                         f"(or model=custom with model._target_=<import path of an nn.Module>)")
    constructor = MODELS[key]
    _check_keywords(key, constructor, (num_classes,), kwargs)
    try:
        return constructor(num_classes, **kwargs)
    except ValueError as error:
        raise ModelError(f"model {key}: {error}") from error


def _import_target(path: str) -> Any:
    """The object at a dotted import path, e.g. ``torch.nn.Linear`` or ``my_pkg.nets.Net``."""
    parts = path.split(".")
    for split in range(len(parts) - 1, 0, -1):
        module_name = ".".join(parts[:split])
        try:
            obj = importlib.import_module(module_name)
        except ModuleNotFoundError as error:
            # Only a missing prefix of the path means "try a shorter module"; a missing dependency
            # inside the user's module is a real error and propagates.
            if error.name and (module_name == error.name or module_name.startswith(error.name + ".")):
                continue
            raise
        try:
            for attribute in parts[split:]:
                obj = getattr(obj, attribute)
        except AttributeError:
            break
        return obj
    raise ModelError(f"model._target_={path!r} cannot be imported; give the full import path of an "
                     f"nn.Module class or factory, e.g. model._target_=my_package.nets.MyNet")


def build_model(model_cfg: Mapping[str, Any], num_classes: int, in_channels: int, input_size: int) -> nn.Module:
    """The model described by the plain dict of the ``model`` config group.

    With ``_target_``, that import path is called with the other keys as keywords, plus
    ``num_classes``, ``in_channels`` and ``input_size`` when its signature names them and the
    config does not set them. Otherwise ``name`` picks a registered model (see :data:`MODELS`);
    only the models that take them receive ``in_channels`` (mlp, cnn) and ``input_size`` (mlp, cnn;
    gpt_tiny, for which it is the text's context length), and a model with a fixed input shape must
    match the dataset's. ``name`` and ``_target_`` are never passed on.
    """
    if not isinstance(model_cfg, Mapping):
        raise ModelError(f"the model config must be a mapping of keys to values, got {type(model_cfg).__name__}")
    kwargs = {k: v for k, v in model_cfg.items() if k not in _NOT_KWARGS}
    facts = {"num_classes": num_classes, "in_channels": in_channels, "input_size": input_size}
    target = model_cfg.get("_target_")
    if target is not None or model_cfg.get("name") == "custom":
        return _build_target(target, kwargs, facts)

    name = model_cfg.get("name")
    if name is None:
        raise ModelError(f"model.name is not set; pick one of {', '.join(MODELS)}, e.g. model=vgg16")
    if "num_classes" in kwargs:
        raise ModelError(f"model.num_classes={kwargs['num_classes']!r} is set, but a registered model "
                         f"takes its number of classes from the dataset; remove that key")
    constructor = MODELS.get(str(name).lower())
    accepted = (_parameter_names(constructor) or set()) if constructor else set()
    for key in _DATA_KEYWORDS:
        if key in accepted:
            kwargs.setdefault(key, facts[key])
    model = get_model(name, num_classes, **kwargs)
    expected = getattr(model, "input_shape", None)
    if expected is not None and tuple(expected) != (in_channels, input_size, input_size):
        raise ModelError(f"model {name} takes inputs of shape {'x'.join(map(str, expected))} but the dataset "
                         f"gives {in_channels}x{input_size}x{input_size}; pick a dataset of that shape "
                         f"or a model that takes in_channels and input_size (mlp, cnn)")
    return model


def _build_target(target: Any, kwargs: dict, facts: dict) -> nn.Module:
    if not isinstance(target, str) or target in ("", "???"):
        raise ModelError(f"model._target_={target!r} is not set; give the import path of an nn.Module "
                         f"class or factory, e.g. model._target_=my_package.nets.MyNet")
    constructor = _import_target(target)
    if not callable(constructor):
        raise ModelError(f"model._target_={target!r} is not callable")
    accepted = _parameter_names(constructor) or set()
    for key, value in facts.items():
        if key in accepted:
            kwargs.setdefault(key, value)
    _check_keywords(target, constructor, (), kwargs)
    model = constructor(**kwargs)
    if not isinstance(model, nn.Module):
        raise ModelError(f"model._target_={target!r} returned a {type(model).__name__}, not a torch.nn.Module")
    return model


@functools.lru_cache(maxsize=None)
def _parameter_counts(num_classes: int) -> tuple[tuple[str, int], ...]:
    # On the meta device nothing is allocated or initialised, so the whole zoo takes milliseconds.
    with torch.device("meta"):
        return tuple((name, count_parameters(get_model(name, num_classes))) for name in MODELS)


def describe_models(num_classes: int = 10) -> dict[str, int]:
    """{name: parameter count} with default settings: CIFAR models at width 1, small ones on 1x8x8."""
    return dict(_parameter_counts(num_classes))
