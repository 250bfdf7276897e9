"""The optimiser study (Fig. 1): the real Hydra multirun of fig1_smoke, shrunk, with W&B offline."""

from __future__ import annotations

import json

from tests.conftest import run_cli
from tests.wandb_files import read_run, records

# A Newton arm and a first-order one: the sweep mechanics, not the optimisers (tests/test_optim.py)
ARMS = ["fig1/sfn_lr1", "fig1/adam_lr1e-3"]


def _group(wandb_dir):
    (path,) = wandb_dir.glob("offline-run-*/run-*.wandb")
    for record in records(path):
        if record.WhichOneof("record_type") == "run":
            return record.run.run_group
    raise AssertionError(f"no run record in {path}")


def test_fig1_smoke_multirun_writes_a_complete_result_per_arm_in_one_wandb_group(tmp_path):
    """Two arms, one epoch of 64 digits (one step): every run's results hold what the figure needs
    (training error per epoch, optimiser settings, final_train_error, step cost vs SGD)."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "experiment=fig1_smoke", f"optimizer={','.join(ARMS)}", "analysis.epochs=1",
                   "analysis.save_freq=1", "dataset.num_subsamples=64", "analysis.step_cost_repeats=1",
                   f"hydra.sweep.dir={sweep}", timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(folders) == len(ARMS)
    arms = set()
    for folder in folders:
        results = json.loads((folder / "results.json").read_text())
        config, metrics = results["config"], results["metrics"]
        arms.add((config["optimizer"]["name"], config["optimizer"]["lr"]))
        assert results["experiment"] == "fig1_smoke" and config["logger"]["group"] == "fig1_smoke"
        (row,) = results["tables"]["epochs"]
        assert row["train_error"] == 1 - row["train_accuracy"] and row["train_time_s"] > 0
        assert metrics["final_train_error"] == row["train_error"]
        assert metrics["step_cost_vs_sgd"] > 0 and metrics["mean_step_seconds"] > 0
        if config["optimizer"]["name"].endswith("newton"):
            assert metrics["optimizer_damping"] == 10 * config["optimizer"]["lr"]
            assert metrics["skipped_steps"] == 0
        assert _group(folder / "wandb") == "fig1_smoke"
        logged = read_run(next((folder / "wandb").glob("offline-run-*")))
        assert logged["exit_code"] == 0
        assert any("train_error" in h for h in logged["history"])
    assert arms == {("saddle_free_newton", 1.0), ("adam", 1e-3)}
