"""One-line checks of config values. Each failure names the key, the bad value and the fix.

The analyses call these for the settings they read; :mod:`experiments.schema` checks every key of the
composed config against the yaml defaults first (``check_config``, the first step of ``dispatch``).
"""

from __future__ import annotations

import math
from typing import Any, Iterable

from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from curvature.errors import SuiteError


class ConfigError(SuiteError):
    """A config value is missing, of the wrong type or out of range."""

    def __init__(self, key: str, value: Any, requirement: str, example: str | None = None):
        fix = f"; e.g. {example}" if example else ""
        super().__init__(f"config key {key}={value!r} is invalid: {requirement}{fix}")
        self.key = key


_MISSING = object()


def get(cfg: DictConfig, key: str, default: Any = _MISSING) -> Any:
    """The value at a dotted key as plain Python; a missing or ``???`` key without default fails."""
    parent, _, leaf = key.rpartition(".")
    node = OmegaConf.select(cfg, parent, default=None) if parent else cfg
    if isinstance(node, DictConfig) and leaf in node.keys() and OmegaConf.is_missing(node, leaf):  # `in` skips ???
        raise ConfigError(key, "???", "must be given for this run", f"{key}=<value>")
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING)
        if isinstance(value, (DictConfig, ListConfig)):
            value = OmegaConf.to_container(value, resolve=True)
    except OmegaConfBaseException as error:
        reason = str(error).strip().splitlines()[0]
        raise ConfigError(key, "<unresolved>", f"cannot be resolved ({reason})", f"{key}=<value>") from None
    if value is _MISSING:
        if default is not _MISSING:
            return default
        raise ConfigError(key, None, "this key is required but not set", f"{key}=<value>")
    return value


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def integer(cfg, key: str, minimum: int | None = None, maximum: int | None = None,
            example: str | None = None) -> int:
    value = get(cfg, key)
    ok = _is_int(value) and (minimum is None or value >= minimum) and (maximum is None or value <= maximum)
    if not ok:
        raise ConfigError(key, value, _range_text("an integer", minimum, maximum), example)
    return value


def positive_int(cfg, key: str, example: str | None = None) -> int:
    return integer(cfg, key, minimum=1, example=example)


def integer_or_auto(cfg, key: str, minimum: int = 0, example: str | None = None) -> int | str:
    """``auto`` (the analysis decides) or an integer ``>= minimum``."""
    value = get(cfg, key)
    if value == "auto":
        return value
    if not (_is_int(value) and value >= minimum):
        raise ConfigError(key, value, f"must be auto or an integer >= {minimum}", example)
    return value


def number(cfg, key: str, minimum: float | None = None, maximum: float | None = None,
           strict_minimum: bool = False, example: str | None = None) -> float:
    value = get(cfg, key)
    ok = _is_number(value) and math.isfinite(value)   # inf passes every bound: refuse it here
    if ok and minimum is not None:
        ok = value > minimum if strict_minimum else value >= minimum
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        lower = f"> {minimum}" if strict_minimum else f">= {minimum}"
        text = "a finite number" + (f" {lower}" if minimum is not None else "") + \
            (f" and <= {maximum}" if maximum is not None else "")
        raise ConfigError(key, value, f"must be {text}", example)
    return float(value)


def positive_number(cfg, key: str, example: str | None = None) -> float:
    return number(cfg, key, minimum=0, strict_minimum=True, example=example)


def choice(cfg, key: str, options: Iterable[str], example: str | None = None) -> str:
    options = list(options)
    value = get(cfg, key)
    if value not in options:
        raise ConfigError(key, value, f"must be one of {', '.join(map(str, options))}",
                          example or f"{key}={options[0]}")
    return value


def choice_list(cfg, key: str, options: Iterable[str], example: str, default: Any = _MISSING,
                non_empty: bool = False) -> list:
    """A list whose every entry is one of ``options`` (``non_empty``: and at least one entry)."""
    options = list(options)
    value = get(cfg, key, default)
    if not (isinstance(value, list) and (value or not non_empty) and all(v in options for v in value)):
        raise ConfigError(key, value, f"must be a list drawn from {', '.join(map(str, options))}", example)
    return value


def boolean(cfg, key: str) -> bool:
    value = get(cfg, key)
    if not isinstance(value, bool):
        raise ConfigError(key, value, "must be true or false", f"{key}=true")
    return value


def int_list(cfg, key: str, minimum: int | None = None, maximum: int | None = None,
             example: str | None = None) -> list[int]:
    value = get(cfg, key)
    if _is_int(value):
        value = [value]
    ok = isinstance(value, list) and len(value) > 0 and all(
        _is_int(v) and (minimum is None or v >= minimum) and (maximum is None or v <= maximum)
        for v in value)
    if not ok:
        raise ConfigError(key, value, _range_text("a non-empty list of integers", minimum, maximum),
                          example)
    return value


def number_list(cfg, key: str, minimum: float | None = None, strict: bool = False,
                example: str | None = None) -> list[float]:
    """A non-empty list of finite numbers, each ``>= minimum`` (``> minimum`` when ``strict``)."""
    value = get(cfg, key)
    if _is_number(value):
        value = [value]
    ok = isinstance(value, list) and len(value) > 0 and all(
        _is_number(v) and math.isfinite(v) and (minimum is None or (v > minimum if strict else v >= minimum))
        for v in value)
    if not ok:
        bound = "" if minimum is None else f", each {'>' if strict else '>='} {minimum:g}"
        raise ConfigError(key, value, f"must be a non-empty list of numbers{bound}", example)
    return [float(v) for v in value]


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _range_text(kind: str, minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"must be {kind} in [{minimum}, {maximum}]"
    if minimum is not None:
        return f"must be {kind} >= {minimum}"
    if maximum is not None:
        return f"must be {kind} <= {maximum}"
    return f"must be {kind}"


def parameter_names(model, patterns) -> list[str]:
    """The parameters ``operator.params`` selects; glob patterns matching none are a :class:`ConfigError`
    naming the key (call it once the model is built, before any curvature work)."""
    from curvature.functional import select_parameters
    try:
        return select_parameters(model, patterns)
    except SuiteError as error:
        raise ConfigError("operator.params", patterns, str(error), "operator.params=null") from None
