"""analysis=train: a real learning signal on digits, checkpoints, exact resume, clean failures."""

import json

import pytest
import torch
from torch import nn

from curvature.models import get_model
from curvature.training import linear_decay_factor, load_checkpoint
from experiments.run import dispatch
from tests.cli_batch import run_batch
from tests.conftest import make_cfg, run_cli


class DropoutNet(nn.Module):
    """A digits MLP with dropout, so that resuming must restore the dropout randomness too."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Dropout(0.3),
                                 nn.Linear(32, num_classes))

    def forward(self, x):
        return self.net(x)


def test_linear_decay_schedule_closed_form():
    assert linear_decay_factor(0, 100) == 1.0
    assert linear_decay_factor(50, 100) == 1.0
    assert linear_decay_factor(70, 100) == pytest.approx(1 - 0.99 * 0.5)
    assert linear_decay_factor(90, 100) == pytest.approx(0.01)
    assert linear_decay_factor(99, 100, 0.1) == 0.1


def test_digits_cnn_learns(tmp_path):
    """>= 90% test accuracy after 5 epochs of the train_digits recipe (about 15 s on 2 cores)."""
    results = dispatch(make_cfg(tmp_path, ["experiment=train_digits", "analysis.epochs=5"]))
    m = results["metrics"]
    assert m["test_accuracy"] >= 0.9 and results["checks"]["test_accuracy"]["passed"]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "images_per_s",
                "peak_memory_bytes", "weight_l2", "weight_linf"):
        assert key in m
    assert 0 <= m["train_accuracy"] <= 1 and m["train_loss"] < 2.3  # below chance-level loss
    rows = results["tables"]["epochs"]
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4, 5]
    assert rows[-1]["train_loss"] < rows[0]["train_loss"]
    assert sorted(results["checkpoints"]) == ["checkpoint-00005.pt"]
    assert (tmp_path / "training_curves.png").is_file() and (tmp_path / "training_curves.pdf").is_file()


def _final_state(folder, epoch):
    return torch.load(folder / f"checkpoint-{epoch:05d}.pt", weights_only=True)


def test_resume_ends_with_the_same_weights_as_an_uninterrupted_run(tmp_path):
    common = ["dataset=digits", "model=custom", "model._target_=tests.test_train.DropoutNet",
              "analysis=train", "analysis.epochs=4", "analysis.save_freq=2", "dataset.num_subsamples=400"]
    whole = tmp_path / "whole"
    dispatch(make_cfg(whole, common))
    resumed = tmp_path / "resumed"
    dispatch(make_cfg(resumed, common + [f"resume={whole / 'checkpoint-00002.pt'}"]))
    a, b = _final_state(whole, 4), _final_state(resumed, 4)
    assert a["epoch"] == b["epoch"] == 4
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
    # and the history carried over: epochs 1-2 from the checkpoint, 3-4 from the resumed run
    assert [r["epoch"] for r in b["history"]] == [1, 2, 3, 4]
    # an unseeded run would differ: the test can fail
    other = tmp_path / "other"
    dispatch(make_cfg(other, common + ["seed=1"]))
    assert not torch.equal(_final_state(other, 4)["model"]["net.1.weight"], a["model"]["net.1.weight"])


def test_vgg16_small_width_on_fake_cifar_writes_a_loadable_checkpoint(tmp_path, fake_cifar100):
    results = dispatch(make_cfg(tmp_path, ["experiment=train_vgg16_cifar100", f"dataset.data_dir={fake_cifar100}",
                                           "model.width=0.125", "analysis.epochs=1", "dataset.batch_size=32"]))
    assert results["checkpoints"] == ["checkpoint-00001.pt"]
    model = get_model("vgg16", 100, width=0.125)
    state = load_checkpoint(tmp_path / "checkpoint-00001.pt", model)
    assert state["epoch"] == 1 and state["config"]["model"]["name"] == "vgg16"
    assert results["metrics"]["num_parameters"] == sum(p.numel() for p in model.parameters())


def test_swa_averages_and_updates_batchnorm(tmp_path):
    results = dispatch(make_cfg(tmp_path, ["experiment=train_digits", "model.batch_norm=true",
                                           "analysis.epochs=4", "analysis.swa.enabled=true",
                                           "analysis.swa.start=2", "analysis.swa.lr=0.01"]))
    m = results["metrics"]
    assert m["swa_models_averaged"] == 2 and m["swa_test_accuracy"] >= 0.85
    assert (tmp_path / "checkpoint-swa.pt").is_file()
    lrs = [r["lr"] for r in results["tables"]["epochs"]]
    assert lrs[2:] == [pytest.approx(0.01)] * 2  # held at the SWA rate from swa.start


def test_adam_and_any_torch_optimizer_by_target(tmp_path):
    for i, extra in enumerate([["optimizer=adam"],
                               ["optimizer=custom", "optimizer._target_=torch.optim.RMSprop",
                                "optimizer.lr=0.001"]]):
        results = dispatch(make_cfg(tmp_path / str(i), ["experiment=train_digits", "analysis.epochs=2", *extra]))
        assert results["metrics"]["test_accuracy"] > 0.5
        assert results["config"]["optimizer"]["name"] in ("adam", "custom")


def test_mismatched_checkpoint_fails_in_one_line(tmp_path):
    first = tmp_path / "cnn"
    dispatch(make_cfg(first, ["experiment=train_digits", "analysis.epochs=1"]))
    out = tmp_path / "mlp"
    proc = run_cli("experiment=train_digits", "model=mlp", f"resume={first / 'checkpoint-00001.pt'}",
                   "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "checkpoint-00001.pt" in lines[0] and "does not fit" in lines[0]
    assert not (out / "results.json").exists()


def test_nan_loss_stops_with_the_epoch_named(tmp_path):
    out = tmp_path / "nan"
    proc = run_cli("experiment=train_digits", "optimizer.lr=1e12", "optimizer.momentum=0.0", "logger=none",
                   f"hydra.run.dir={out}")
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "epoch" in lines[0] and "optimizer.lr" in lines[0]
    assert not (out / "results.json").exists()


BAD = [("analysis.epochs=0", "analysis.epochs"), ("optimizer.lr=-1", "optimizer.lr"),
       ("resume=/nonexistent.pt", "resume"), ("dataset=wigner", "dataset")]


@pytest.fixture(scope="module")
def bad_runs(tmp_path_factory):
    """The runs of BAD through the real CLI entry point, forked from one warmed-up interpreter
    (tests/cli_batch.py): one interpreter start instead of four."""
    root = tmp_path_factory.mktemp("bad_training")
    rows = [{"id": f"bad{i}", "args": ["experiment=train_digits", override, "logger=none"], "dir": str(root / f"bad{i}")}
            for i, (override, _) in enumerate(BAD)]
    return root, run_batch(rows, root / "batch")


@pytest.mark.xdist_group("train_bad_config")  # one worker builds the module fixture (--dist loadgroup)
@pytest.mark.parametrize("override,key", BAD)
def test_bad_training_config(override, key, bad_runs):
    row_id = f"bad{BAD.index((override, key))}"
    folder, proc = bad_runs[0] / row_id, bad_runs[1][row_id]
    assert proc.returncode == 2 and key in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not (folder / "results.json").exists()
