"""Optimisers by name or by ``_target_`` (any ``torch.optim.Optimizer`` subclass)."""

from __future__ import annotations

import importlib
import inspect

import torch

BUILTIN = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam}


def _import(path: str):
    module, _, name = path.rpartition(".")
    if not module:
        raise ValueError(f"_target_ must be a dotted import path like torch.optim.RMSprop, got {path!r}")
    return getattr(importlib.import_module(module), name)


def build_optimizer(settings: dict, params) -> torch.optim.Optimizer:
    """``settings`` is the plain ``optimizer`` config: ``name`` (sgd | adam | custom), optional
    ``_target_``, and keyword arguments of the optimiser's constructor (``lr``, ``momentum``, ...)."""
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
    unknown = [k for k in settings if k not in accepted]
    if unknown and not any(p.kind == p.VAR_KEYWORD for p in accepted.values()):
        raise ValueError(f"{cls.__name__} does not take {', '.join(unknown)}")
    return cls(params, **settings)
