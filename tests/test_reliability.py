"""Faults a long run must survive: SIGKILL (resume, atomic outputs), NaN products, CUDA OOM."""

import json
import os
import random
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from curvature.errors import NumericalError, SuiteError
from curvature.microbatch import describe_splits, split_product
from curvature.models import build_model
from curvature.operators import GGNOperator, HessianOperator
from curvature.training import save_checkpoint
from experiments.run import dispatch
from tests.conftest import ROOT, make_cfg, run_cli

NET = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200",
       "operator.batch_size=64", "analysis.num_steps=12", "analysis.exact_max_dim=0", "logger=none"]
# big enough to run for seconds, so a kill lands midway; no eigh, no figure-heavy checks
SLOW_MATRIX = ["dataset.n=1200", "analysis.num_steps=250", "analysis.checkpoint_every=5",
               "analysis.exact_max_dim=0", "logger=none"]


def _start_cli(*args: str) -> subprocess.Popen:
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    return subprocess.Popen([sys.executable, "-m", "experiments.run", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)


def _kill(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


# --- CUDA out of memory: micro-batches, same result -------------------------------------------
def _oom_above(limit: int, product):
    calls = []

    def wrapped(x, y):
        calls.append(int(y.shape[0]))
        if y.shape[0] > limit:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return product(x, y)
    return wrapped, calls


def test_split_product_equals_the_unsplit_product():
    gen = torch.Generator().manual_seed(0)
    x, y = torch.randn(37, 5, generator=gen, dtype=torch.float64), torch.randn(37, generator=gen, dtype=torch.float64)

    def product(a, b):  # a mean over samples, as every mean-reduced batch loss is
        return {"w": (a * b[:, None]).mean(0), "v": (a ** 2).mean(0).sum()}
    fake, calls = _oom_above(6, product)
    splits = []
    out = split_product(fake, x, y, record=lambda n, half: splits.append((n, half)))
    ref = product(x, y)
    assert torch.allclose(out["w"], ref["w"], rtol=1e-14, atol=1e-15)
    assert torch.allclose(out["v"], ref["v"], rtol=1e-14)
    assert splits[0] == (37, 18) and max(c for c in calls if c <= 6) <= 6
    with pytest.raises(SuiteError, match="cannot be split exactly"):
        split_product(fake, x, y, splittable=False)
    with pytest.raises(SuiteError, match="even for one sample"):
        split_product(_oom_above(0, product)[0], x, y)


def _small_model(batchnorm: bool = False) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 5)] + ([nn.BatchNorm1d(5)] if batchnorm else []) + [nn.Tanh(), nn.Linear(5, 3)]
    return nn.Sequential(*layers).double()


@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_operator_products_fall_back_to_micro_batches_on_oom(cls, monkeypatch):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(100, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (100,), generator=gen)
    batches = [(x[:64], y[:64]), (x[64:], y[64:])]
    model = _small_model()
    ref = cls(model, nn.functional.cross_entropy, batches)
    v = torch.randn(ref.num_params, 2, generator=gen, dtype=torch.float64)
    expected = ref.matvec(v)
    original = cls.batch_product

    def tight(self, inputs, targets, params, vectors):
        if targets.shape[0] > 16:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, inputs, targets, params, vectors)
    monkeypatch.setattr(cls, "batch_product", tight)
    op = cls(model, nn.functional.cross_entropy, batches, check_deterministic=False)
    assert torch.allclose(op.matvec(v), expected, rtol=1e-12, atol=1e-14)
    assert op.oom_splits == {0: 16, 1: 9}   # 64 -> 32 -> 16; 36 -> 18 -> 9
    assert "micro-batches" in describe_splits(op)

    bn = cls(_small_model(batchnorm=True), nn.functional.cross_entropy, batches, check_deterministic=False)
    with pytest.raises(SuiteError, match="BatchNorm.*operator.batch_size"):
        bn.matvec(torch.ones(bn.num_params, dtype=torch.float64))


def test_network_spectrum_reports_the_micro_batch_fallback(tmp_path, monkeypatch):
    original = HessianOperator.batch_product

    def tight(self, inputs, targets, params, vectors):
        if targets.shape[0] > 32:
            raise torch.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return original(self, inputs, targets, params, vectors)
    # the determinism check and the hvp_mode timing call batch_product directly: keep them out
    fixed = NET + ["operator.hvp_mode=reverse_over_reverse", "operator.check_deterministic=false"]
    dispatch(make_cfg(tmp_path / "ref", fixed))
    monkeypatch.setattr(HessianOperator, "batch_product", tight)
    results = dispatch(make_cfg(tmp_path / "oom", fixed))
    assert any("out of memory" in n and "micro-batches" in n for n in results["notes"])
    assert results["metrics"]["hessian_oom_split_batches"] == 3  # 64, 64, 64 split; 8 fits
    ours, theirs = (np.load(tmp_path / d / "arrays.npz")["hessian_tridiagonal"] for d in ("oom", "ref"))
    assert np.allclose(ours, theirs, rtol=0, atol=1e-10 * np.abs(theirs).max())


# --- NaN / Inf: one line naming step and batch, a clearly marked partial file -----------------
def test_nan_product_midway_keeps_the_completed_steps_in_a_partial_file(tmp_path, monkeypatch):
    original = HessianOperator.batch_product

    def poisoned(self, inputs, targets, params, vectors):
        out = original(self, inputs, targets, params, vectors)
        if self.num_products >= 4 and inputs is self.batches[1][0]:  # the fifth product, batch 1
            out = {n: t * float("nan") for n, t in out.items()}
        return out
    monkeypatch.setattr(HessianOperator, "batch_product", poisoned)
    out = tmp_path / "nan"
    with pytest.raises(NumericalError) as info:
        dispatch(make_cfg(out, NET))
    message = str(info.value)
    assert "Lanczos step 4" in message and "batch 1" in message and "results.partial.json" in message
    assert "\n" not in message
    assert not (out / "results.json").exists()
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["partial"] is True and "batch 1" in partial["error"]
    assert partial["completed"]["hessian"] == {"lanczos_steps_completed": 4, "failed_at_step": 4}
    arrays = np.load(out / partial["files"]["arrays"])
    assert arrays["hessian_tridiagonal"].shape == (1, 4, 4)
    # the completed steps are those of a clean run
    monkeypatch.undo()
    clean = dispatch(make_cfg(tmp_path / "clean", NET))
    tri = np.load(tmp_path / "clean" / clean["files"]["arrays"])["hessian_tridiagonal"]
    assert np.allclose(arrays["hessian_tridiagonal"][0], tri[0, :4, :4], atol=1e-12)


def test_a_checkpoint_with_nan_weights_is_refused_in_one_line_naming_file_and_tensor(tmp_path):
    cfg = make_cfg(tmp_path / "compose", NET)
    from omegaconf import OmegaConf
    model = build_model(OmegaConf.to_container(cfg.model), 10, 1, 8)
    state = model.state_dict()
    name = next(iter(state))
    state[name][0, 0] = float("nan")
    ckpt = tmp_path / "checkpoint-00001.pt"
    save_checkpoint(ckpt, {"model": state, "epoch": 1})
    out = tmp_path / "run"
    proc = run_cli(*NET, f"analysis.checkpoint={ckpt}", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    line = _error_line(proc.stderr)
    assert line.startswith(f"error: checkpoint {ckpt} holds non-finite values in tensor '{name}'")
    assert not (out / "results.json").exists()


def test_nan_training_loss_names_epoch_and_batch_and_keeps_a_partial_file(tmp_path):
    out = tmp_path / "train"
    with pytest.raises(NumericalError, match=r"epoch \d+, batch \d+.*results.partial.json") as info:
        dispatch(make_cfg(out, ["analysis=train", "dataset=digits", "model=mlp", "dataset.num_subsamples=200",
                                "analysis.epochs=3", "optimizer.lr=1e12", "logger=none"]))
    failed_epoch = int(re.search(r"epoch (\d+)", str(info.value)).group(1))
    assert not (out / "results.json").exists()
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["partial"] is True and partial["analysis"] == "train"
    assert len(partial["logged"]) == failed_epoch - 1   # the epochs completed before the NaN


# --- SIGKILL: resume=true gives the uninterrupted tridiagonal ---------------------------------
def _wait_for(path: Path, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, f"the run ended before writing {path.name}: {proc.stderr.read()[-1000:]}"
        assert time.monotonic() < end, f"no {path.name} after {timeout} s"
        time.sleep(0.02)


def test_sigkill_midway_then_resume_equals_the_uninterrupted_run(tmp_path):
    out = tmp_path / "killed"
    state = out / "lanczos-state-matrix.pt"
    proc = _start_cli(*SLOW_MATRIX, f"hydra.run.dir={out}")
    _wait_for(state, proc)
    _kill(proc)  # at once: on a fast, idle machine the rest of the run can take well under a second
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "results.json").exists() and state.is_file()
    saved = torch.load(state, weights_only=True)
    assert 0 < saved["step"] < 250

    # a resume with a config that would give another operator is refused, naming the key
    other = tmp_path / "other"
    other.mkdir()
    (other / state.name).write_bytes(state.read_bytes())
    with pytest.raises(SuiteError, match=r"dataset\.seed=1 is invalid: differs from 0"):
        dispatch(make_cfg(other, SLOW_MATRIX + ["resume=true", "dataset.seed=1"]))

    proc = run_cli(*SLOW_MATRIX, "resume=true", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    resumed = json.loads((out / "results.json").read_text())
    assert any("resumed" in n for n in resumed["notes"])
    assert not state.exists()                       # removed once results.json is in place

    fresh = tmp_path / "fresh"
    dispatch(make_cfg(fresh, SLOW_MATRIX))
    a, b = np.load(out / "arrays.npz"), np.load(fresh / "arrays.npz")
    for key in ("tridiagonal", "ritz_values", "ritz_weights", "residual_bounds"):
        assert np.allclose(a[key], b[key], rtol=0, atol=1e-10), key


def test_resume_with_nothing_to_resume_is_one_line(tmp_path):
    proc = run_cli("dataset.n=100", "analysis.num_steps=5", "resume=true", "logger=none",
                   f"hydra.run.dir={tmp_path / 'empty'}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert _error_line(proc.stderr).startswith("error: config key resume=True is invalid: nothing to resume")


def test_train_resume_true_continues_from_the_last_checkpoint_in_the_folder(tmp_path):
    train = ["analysis=train", "dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200",
             "analysis.epochs=2", "analysis.save_freq=1", "logger=none"]
    dispatch(make_cfg(tmp_path / "full", train))
    killed = tmp_path / "killed"
    dispatch(make_cfg(killed, train))
    (killed / "results.json").unlink()              # as if killed during epoch 2
    (killed / "checkpoint-00002.pt").unlink()
    results = dispatch(make_cfg(killed, train + ["resume=true"]))
    assert any("checkpoint-00001.pt" in n for n in results["notes"])
    a = torch.load(tmp_path / "full" / "checkpoint-00002.pt", weights_only=True)["model"]
    b = torch.load(killed / "checkpoint-00002.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


# --- SIGKILL at random points: results.json absent or complete --------------------------------
KILLED_RUNS = {
    "spectrum_matrix": ["experiment=fig2", "dataset.n=400", "analysis.num_steps=60"],
    "spectrum_network": NET + ["analysis.operators=[hessian,ggn]", "analysis.exact_max_dim=300"],
    "train": ["analysis=train", "dataset=digits", "model=mlp", "model.hidden=[8]", "analysis.epochs=4",
              "analysis.save_freq=1", "dataset.num_subsamples=300"],
    "theory": ["experiment=table1"],
}


@pytest.mark.parametrize("name", list(KILLED_RUNS))
def test_sigkill_at_a_random_moment_leaves_no_or_a_complete_result(name, tmp_path):
    rng = random.Random(f"kill-{name}")             # seeded: the same delays on every run
    for attempt, delay in enumerate(sorted(rng.uniform(2.0, 9.0) for _ in range(2))):
        out = tmp_path / f"attempt{attempt}"
        proc = _start_cli(*KILLED_RUNS[name], "logger=none", f"hydra.run.dir={out}")
        time.sleep(delay)
        _kill(proc)
        results = out / "results.json"
        if not results.exists():
            continue
        data = json.loads(results.read_text())       # parses: never truncated
        files = data["files"]
        declared = ([files["arrays"]] if files["arrays"] else []) + files["figures"] + data.get("checkpoints", [])
        for file in declared:
            assert (out / file).is_file(), f"{file} declared in results.json is missing"
