"""Optimisers by name or by ``_target_`` (any ``torch.optim.Optimizer`` subclass).

Built in: ``sgd``, ``adam`` (torch), ``saddle_free_newton`` and ``ggn_newton`` (stochastic Lanczos
Newton, :mod:`curvature.optim.newton`), ``kfac`` (:mod:`curvature.optim.kfac`) and ``swats``
(:mod:`curvature.optim.swats`). SWA is torch's ``swa_utils`` (``analysis.swa``).
"""

from __future__ import annotations

import importlib
import inspect

import torch

from curvature.optim.kfac import KFAC
from curvature.optim.newton import GGNNewton, LanczosNewton, SaddleFreeNewton
from curvature.optim.swats import SWATS

__all__ = ["BUILTIN", "GGNNewton", "KFAC", "LanczosNewton", "SWATS", "SaddleFreeNewton", "build_optimizer"]

BUILTIN = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "saddle_free_newton": SaddleFreeNewton,
           "ggn_newton": GGNNewton, "kfac": KFAC, "swats": SWATS}


def _import(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"_target_ must be a dotted import path like torch.optim.RMSprop, got {path!r}")
    return getattr(importlib.import_module(module), name)


def build_optimizer(settings: dict, params, model: torch.nn.Module | None = None,
                    loss_fn=None) -> torch.optim.Optimizer:
    """``settings`` is the plain ``optimizer`` config: ``name`` (one of ``BUILTIN`` or custom), optional
    ``_target_``, and keyword arguments of the optimiser's constructor (``lr``, ``momentum``, ...).

    ``model`` and ``loss_fn`` are passed to constructors that take them (the Newton optimisers need
    the model and loss for curvature products, K-FAC the model's layers).
    """
    settings = dict(settings)
    name = settings.pop("name", None)
    target = settings.pop("_target_", None)
    if target is not None:
        cls = _import(target)
    elif name in BUILTIN:
        cls = BUILTIN[name]
    else:
        raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(BUILTIN)} or set _target_")
    if isinstance(settings.get("betas"), list):
        settings["betas"] = tuple(settings["betas"])
    accepted = inspect.signature(cls.__init__).parameters
    for key, value in (("model", model), ("loss_fn", loss_fn)):
        if key in accepted and value is not None and key not in settings:
            settings[key] = value
    if "model" in accepted and accepted["model"].default is inspect.Parameter.empty and "model" not in settings:
        raise ValueError(f"{cls.__name__} needs the model: build_optimizer(settings, params, model=model)")
    unknown = [k for k in settings if k not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise ValueError(f"{cls.__name__} does not take {', '.join(unknown)}")
    return cls(params, **settings)
