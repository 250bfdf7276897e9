"""Where the Hydra configs are: ``conf/`` of a checkout, or the ``experiments.conf`` package of a wheel.

``pyproject.toml`` ships ``conf/`` inside the wheel as the package ``experiments.conf``, so an installed
suite (``pip install .``, the ``deep-curvature`` command) finds its configs from any folder. A checkout
(editable install or not) keeps reading ``conf/`` beside ``experiments/`` directly.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

CONF_PACKAGE = "experiments.conf"
_CHECKOUT = Path(__file__).resolve().parents[1]


def _in_checkout() -> bool:
    return (_CHECKOUT / "pyproject.toml").is_file() and (_CHECKOUT / "conf" / "config.yaml").is_file()


def config_path() -> str:
    """``@hydra.main``'s ``config_path``: the checkout's ``conf/`` (absolute), else ``pkg://experiments.conf``."""
    return str(_CHECKOUT / "conf") if _in_checkout() else f"pkg://{CONF_PACKAGE}"


def config_dir() -> Path:
    """The folder holding ``config.yaml`` (for ``hydra.initialize_config_dir`` and reading the yaml files)."""
    if _in_checkout():
        return _CHECKOUT / "conf"
    return Path(str(importlib.resources.files(CONF_PACKAGE)))
