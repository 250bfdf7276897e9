"""Hydra launchers: the shipped presets compose, and real two-job sweeps run through submitit and joblib.

SLURM itself is not available here: `hydra/launcher=slurm` is checked by composition only; the same
plugin's local executor (`submitit_local`) runs the jobs for real, as separate processes.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from hydra import compose, initialize_config_dir

from tests.conftest import CONF, require, run_cli

require("hydra_plugins.hydra_submitit_launcher")  # pip install -e ".[dev]"; CI fails without them
require("hydra_plugins.hydra_joblib_launcher")

PLUGINS = "hydra_plugins.hydra_submitit_launcher.submitit_launcher"
SWEEP = ["dataset.n=50,60", "analysis.num_steps=5", "logger=none"]  # wigner, the default analysis


@pytest.mark.parametrize("preset, target, values", [
    ("slurm", f"{PLUGINS}.SlurmLauncher",
     {"partition": None, "timeout_min": 240, "gpus_per_node": 1, "tasks_per_node": 1, "mem_gb": 32}),
    ("local", f"{PLUGINS}.LocalLauncher", {"timeout_min": 60, "gpus_per_node": 0, "tasks_per_node": 1}),
    ("parallel", "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher",
     {"n_jobs": 2, "prefer": "processes"}),
])
def test_launcher_presets_extend_the_plugins(preset, target, values):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"hydra/launcher={preset}"], return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == target
    assert {key: launcher[key] for key in values} == values


def _assert_complete_sweep(sweep_dir):
    folders = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [f.name.split("_")[0] for f in folders] == ["0", "1"]
    for folder, n in zip(folders, (50, 60)):
        results = json.loads((folder / "results.json").read_text())
        assert results["config"]["dataset"]["n"] == n
        assert results["analysis"] == "spectrum" and results["checks"] and results["provenance"]["commit"]
        assert results["files"]["arrays"] == "arrays.npz"
        assert np.load(folder / "arrays.npz")["tridiagonal"].shape == (1, 5, 5)
        assert not list(folder.glob(".staging-*"))


@pytest.mark.parametrize("launcher", ["submitit_local", "parallel"])
def test_two_job_sweep_runs_through_a_launcher(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("-m", f"hydra/launcher={launcher}", *SWEEP, f"hydra.sweep.dir={sweep_dir}", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_complete_sweep(sweep_dir)
