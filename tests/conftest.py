"""Shared fixtures: composed configs pointed at tmp_path, and the devices to test on."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# CUDA is appended when present, so a GPU machine gets GPU coverage of the same tests for free.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` (``pytest -m gpu``, the first step of ``make gpu-check``) skip without CUDA."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="gpu: needs CUDA (torch.cuda.is_available() is False here)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed_everything(request):
    """Every test starts from the same random state (torch, numpy, random), whatever ran before it:
    the suite gives the same outcome run after run and in any order or subset."""
    import random
    import zlib

    import numpy as np
    seed = zlib.crc32(request.node.nodeid.encode())
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    yield


def require(module: str):
    """Import a test-only reference package: skip without it locally, fail without it in CI (CI=true)."""
    if os.environ.get("CI"):
        import importlib
        return importlib.import_module(module)
    return pytest.importorskip(module)


def make_cfg(tmp_path: Path, overrides: list[str]):
    """Compose conf/config.yaml with overrides, no W&B unless asked, outputs in tmp_path."""
    overrides = list(overrides)
    if not any(o.startswith("logger=") for o in overrides):
        overrides.append("logger=none")
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    with open_dict(cfg):
        cfg.output_dir = str(tmp_path)
    return cfg


@pytest.fixture
def cfg_factory(tmp_path):
    def factory(*overrides: str, subdir: str = "run"):
        return make_cfg(tmp_path / subdir, list(overrides))
    return factory


def run_cli(*args: str, cwd: Path = ROOT, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run ``python -m experiments.run`` in a subprocess, as a user would."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run([sys.executable, "-m", "experiments.run", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="session")
def fake_cifar10(tmp_path_factory):
    from curvature.data import write_fake_cifar
    root = tmp_path_factory.mktemp("cifar10")
    write_fake_cifar(root, "cifar10", num_train=200, num_test=100, seed=0)
    return root


@pytest.fixture(scope="session")
def fake_cifar100(tmp_path_factory):
    from curvature.data import write_fake_cifar
    root = tmp_path_factory.mktemp("cifar100")
    write_fake_cifar(root, "cifar100", num_train=200, num_test=100, seed=0)
    return root
