"""Curvature tracked during training (curvature/sharpness.py, analysis.curvature of analysis=train).

Ground truth: the dense Hessian of the loss over the same tracking data, built by
``torch.autograd.functional.hessian`` through ``functional_call`` (a route the tracker's operator does not
take), diagonalised with ``eigvalsh`` in float64. Resume: a run cut in two gives the same curve rows as an
uninterrupted one. Warm starts: measured against cold starts at the same steps.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature.data import load_splits
from curvature.models import build_model
from curvature.sharpness import CurvatureTracker, tracking_batches
from curvature.top_eigen import top_eigenpairs
from experiments import train as train_module
from experiments.run import dispatch
from experiments.validate import ConfigError
from tests.conftest import make_cfg

sys.path.insert(0, str(Path(__file__).parent))
from wandb_files import read_run  # noqa: E402

ALL = ("top_eigenvalue", "trace", "spectrum")


def dense_hessian(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The P x P Hessian of the mean cross-entropy over ``(inputs, targets)`` in the model's current mode."""
    names = [n for n, _ in model.named_parameters()]
    params = [p.detach() for _, p in model.named_parameters()]
    buffers = dict(model.named_buffers())

    def loss(flat):
        chunks = torch.split(flat, [p.numel() for p in params])
        weights = {n: c.view_as(p) for n, c, p in zip(names, chunks, params)}
        return F.cross_entropy(functional_call(model, {**buffers, **weights}, (inputs,)), targets)

    flat = torch.cat([p.reshape(-1) for p in params])
    return torch.autograd.functional.hessian(loss, flat, vectorize=True)  # batched rows, not a P-step loop


def _mlp(batch_norm: bool) -> nn.Module:
    torch.manual_seed(0)
    layers = [nn.Linear(6, 8)] + ([nn.BatchNorm1d(8)] if batch_norm else []) + [nn.Tanh(), nn.Linear(8, 3)]
    model = nn.Sequential(*layers).double()
    if batch_norm:  # running statistics that are not the identity, so eval mode matters
        model[1].running_mean.uniform_(-0.5, 0.5)
        model[1].running_var.uniform_(0.5, 2.0)
    return model


def _data(n: int = 64, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 6, generator=gen, dtype=torch.float64), torch.randint(0, 3, (n,), generator=gen)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_tracked_quantities_equal_the_dense_hessian_at_every_step(batch_norm):
    """Top eigenvalue to 1e-6 (relative; residual <= tol = 1e-6 bounds it), loss to 1e-12, Ritz values
    inside the exact spectrum, Hutchinson's trace within 4 standard errors, at each of 6 SGD steps."""
    model = _mlp(batch_norm)
    x, y = _data()
    batches = [(x[:40], y[:40]), (x[40:], y[40:])]  # unequal batches: the weights must make the mean
    tracker = CurvatureTracker(model, F.cross_entropy, batches, quantities=ALL, bn_mode="eval", tol=1e-6,
                               trace_probes=16, spectrum_steps=8)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(6):
        row = tracker.measure(step)
        model.eval()
        exact = torch.linalg.eigvalsh(dense_hessian(model, x, y))
        with torch.no_grad():
            loss = float(F.cross_entropy(model(x), y))
        model.train()
        lam = float(exact[-1])
        assert abs(row["top_eigenvalue"] - lam) <= 1e-6 * abs(lam), (step, row["top_eigenvalue"], lam)
        assert row["top_eigenvalue_residual"] <= 1e-6 and row["top_eigenvalue_converged"]
        assert row["loss"] == pytest.approx(loss, rel=1e-12, abs=0)
        ritz = torch.tensor(row["spectrum_ritz_values"], dtype=torch.float64)
        assert float(exact[0]) - 1e-9 <= float(ritz.min()) and float(ritz.max()) <= lam + 1e-9
        assert sum(row["spectrum_ritz_weights"]) == pytest.approx(1.0, abs=1e-12)
        assert abs(row["trace"] - float(exact.sum())) <= 4 * row["trace_stderr"]
        assert row["step"] == step and row["top_eigenvalue_start"] == ("cold" if step == 0 else "warm")
        assert row["products"] == row["top_eigenvalue_products"] + row["trace_products"] + row["spectrum_products"]
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()  # train mode: batch statistics move the weights
        opt.step()
    assert [r["step"] for r in tracker.rows] == list(range(6))
    assert len({round(r["top_eigenvalue"], 6) for r in tracker.rows}) > 1  # the curve moved: not a constant


def test_warm_start_uses_no_more_products_than_cold_on_a_slowly_changing_model():
    model = _mlp(False)
    x, y = _data(96)
    tracker = CurvatureTracker(model, F.cross_entropy, [(x, y)], tol=1e-8, compare_cold=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.02)
    for step in range(6):
        tracker.measure(step)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    saving = tracker.warm_start_saving()
    assert saving["steps_compared"] == 5  # every step but the first, which has nothing to warm from
    assert saving["warm_products"] <= saving["cold_products"], saving
    for row in tracker.rows:
        assert row["top_eigenvalue"] == pytest.approx(row["top_eigenvalue_cold"], rel=1e-7)


def test_top_eigenpairs_start_vectors():
    gen = torch.Generator().manual_seed(3)
    q, _ = torch.linalg.qr(torch.randn(30, 30, generator=gen, dtype=torch.float64))
    values = torch.linspace(-1.0, 5.0, 30, dtype=torch.float64)
    A = q @ torch.diag(values) @ q.T
    cold = top_eigenpairs(A, 1, tol=1e-10)
    near = q[:, -1] + 1e-3 * torch.randn(30, generator=gen, dtype=torch.float64)
    warm = top_eigenpairs(A, 1, tol=1e-10, start_vectors=near)
    for result in (cold, warm):
        assert float(result.eigenvalues[0]) == pytest.approx(5.0, rel=1e-12)
    assert warm.num_matvecs < cold.num_matvecs
    exact = top_eigenpairs(A, 1, tol=1e-10, start_vectors=q[:, -1:])  # an eigenvector: the space is invariant
    assert exact.num_matvecs <= 2 and float(exact.eigenvalues[0]) == pytest.approx(5.0, rel=1e-12)
    block = top_eigenpairs(A, 2, tol=1e-10, block_size=2, start_vectors=near)  # the other column is random
    assert block.eigenvalues.tolist() == pytest.approx(values[-2:].flip(0).tolist(), rel=1e-10)
    for bad in (torch.zeros(30), torch.ones(29), torch.ones(30, 2), torch.full((30,), float("nan"))):
        with pytest.raises(ValueError, match="start_vectors"):
            top_eigenpairs(A, 1, start_vectors=bad)


def test_state_dict_resumes_the_same_rows_and_refuses_another_model():
    x, y = _data()
    first = CurvatureTracker(_mlp(False), F.cross_entropy, [(x, y)], quantities=("top_eigenvalue", "trace"))
    model = _mlp(False)
    second = CurvatureTracker(model, F.cross_entropy, [(x, y)], quantities=("top_eigenvalue", "trace"))
    opt = torch.optim.SGD(first.op.model.parameters(), lr=0.3)
    for step in range(3):
        first.measure(step)
        opt.zero_grad()
        F.cross_entropy(first.op.model(x), y).backward()
        opt.step()
    model.load_state_dict(first.op.model.state_dict())
    second.load_state_dict(first.state_dict())
    a, b = first.measure(3), second.measure(3)
    drop = ("seconds", "cold_seconds")
    assert {k: v for k, v in a.items() if k not in drop} == {k: v for k, v in b.items() if k not in drop}
    assert a["top_eigenvalue_start"] == "warm"
    other = CurvatureTracker(nn.Sequential(nn.Linear(6, 3)).double(), F.cross_entropy, [(x, y)])
    with pytest.raises(ValueError, match="parameters"):
        other.load_state_dict(first.state_dict())


def test_tracking_batches_are_a_fixed_seeded_subset():
    splits = load_splits("digits", None, device=torch.device("cpu"), num_subsamples=300, seed=0)
    a = tracking_batches(splits.train, 100, 64, seed=5, dtype=torch.float64)
    b = tracking_batches(splits.train, 100, 64, seed=5, dtype=torch.float64)
    c = tracking_batches(splits.train, 100, 64, seed=6, dtype=torch.float64)
    assert [len(t) for _, t in a] == [64, 36]
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    xa, xc = torch.cat([x for x, _ in a]), torch.cat([x for x, _ in c])
    assert not torch.equal(xa, xc)
    rows = splits.train.normalise(splits.train.images, torch.float64).flatten(1)
    matches = (xa.flatten(1)[:, None, :] == rows[None]).all(-1)
    assert bool(matches.any(1).all()) and len(set(matches.float().argmax(1).tolist())) == 100  # distinct samples
    with pytest.raises(ValueError, match="num_samples"):
        tracking_batches(splits.train, 301, 64, seed=5)


# --- analysis=train with analysis.curvature --------------------------------------------------------
DIGITS = ["dataset=digits", "model=mlp", "model.hidden=[4]", "analysis=train", "dtype=float64",
          "dataset.num_subsamples=200"]


def test_run_tracked_top_eigenvalue_equals_the_dense_one_of_each_checkpoint(tmp_path):
    """analysis=train as the command line composes it (logger=wandb, offline), one optimiser step per epoch
    (batch = the 200 train images), tracking every step, a checkpoint every epoch: the row of step e
    equals the dense top eigenvalue of checkpoint e to 1e-6."""
    out = tmp_path / "run"
    dispatch(make_cfg(out, DIGITS + ["analysis.epochs=3", "analysis.save_freq=1", "analysis.batch_size=200",
                                     "analysis.curvature.every=1", "analysis.curvature.data.num_samples=null",
                                     "analysis.curvature.data.batch_size=64", "analysis.curvature.tol=1e-6",
                                     "analysis.curvature.quantities=[top_eigenvalue,trace]", "logger=wandb"]))
    results = json.loads((out / "results.json").read_text())
    rows = {r["step"]: r for r in results["tables"]["curvature"]}
    assert sorted(rows) == [0, 1, 2, 3]
    splits = load_splits("digits", None, device=torch.device("cpu"), num_subsamples=200, seed=0)
    ((x, y),) = list(splits.train.batches(200, dtype=torch.float64))
    model = build_model(results["config"]["model"], splits.num_classes, splits.in_channels,
                        splits.input_size).double()
    for epoch in (1, 2, 3):
        state = torch.load(out / f"checkpoint-{epoch:05d}.pt", weights_only=True)
        model.load_state_dict(state["model"])
        lam = float(torch.linalg.eigvalsh(dense_hessian(model.eval(), x, y))[-1])
        assert abs(rows[epoch]["top_eigenvalue"] - lam) <= 1e-6 * abs(lam), (epoch, rows[epoch], lam)
        assert [r["step"] for r in state["curvature_tracker"]["rows"]] == list(range(epoch + 1))
    epochs = results["tables"]["epochs"]
    assert [r["curvature_step"] for r in epochs] == [1, 2, 3]
    assert [r["curvature_top_eigenvalue"] for r in epochs] == [rows[s]["top_eigenvalue"] for s in (1, 2, 3)]
    m = results["metrics"]
    assert m["curvature_tracked_steps"] == 4 and 0 < m["curvature_tracking_share"] < 1
    assert all(0 <= r["tracking_share"] < 1 for r in epochs)
    # W&B (offline) got each row at its optimiser step, as it happened
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    logged = {h["_step"]: h["curvature/top_eigenvalue"] for h in read_run(run_dir)["history"]
              if "curvature/top_eigenvalue" in h}
    assert logged == {s: r["top_eigenvalue"] for s, r in rows.items()}
    assert (out / "training_curves.png").is_file()


def _curve(results: dict) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in ("seconds", "cold_seconds")}
            for r in results["tables"]["curvature"]]


#: 4 steps per epoch, tracking every 3 steps (not at epoch ends), a checkpoint after epoch 2
RESUMABLE = DIGITS + ["analysis.epochs=4", "analysis.save_freq=2", "analysis.batch_size=50",
                      "analysis.curvature.every=3", "analysis.curvature.data.num_samples=100",
                      "analysis.curvature.quantities=[top_eigenvalue,trace]"]


def test_resume_continues_the_curve_exactly(tmp_path):
    """4 epochs straight, and 2 + resume: the same curve rows (every value but the seconds)."""
    common = RESUMABLE
    whole = dispatch(make_cfg(tmp_path / "whole", common))
    checkpoint = tmp_path / "whole" / "checkpoint-00002.pt"
    resumed = dispatch(make_cfg(tmp_path / "resumed", common + [f"resume={checkpoint}"]))
    assert [r["step"] for r in _curve(whole)] == [0, 3, 6, 9, 12, 15]
    assert _curve(resumed) == _curve(whole)
    assert [r["curvature_top_eigenvalue"] for r in resumed["tables"]["epochs"]] == \
        [r["curvature_top_eigenvalue"] for r in whole["tables"]["epochs"]]


@pytest.mark.slow
def test_resume_needs_the_warm_vector_and_tracking_leaves_training_alone(tmp_path):
    """The comparison above can fail: a resume without the saved warm-start vector measures step 9 from
    a cold start. And a run without tracking ends with the same weights."""
    common = RESUMABLE
    whole = dispatch(make_cfg(tmp_path / "whole", common))
    state = torch.load(tmp_path / "whole" / "checkpoint-00002.pt", weights_only=True)
    state["curvature_tracker"]["vector"] = None
    torch.save(state, tmp_path / "no-vector.pt")
    cold = dispatch(make_cfg(tmp_path / "cold", common + [f"resume={tmp_path / 'no-vector.pt'}"]))
    assert _curve(cold)[3]["top_eigenvalue_start"] == "cold" and _curve(cold) != _curve(whole)
    # and tracking leaves training alone: the same weights as a run without it
    plain = dispatch(make_cfg(tmp_path / "plain", common + ["analysis.curvature.every=0"]))
    assert plain["metrics"]["weight_l2"] == whole["metrics"]["weight_l2"]
    assert "curvature" not in plain["tables"]


@pytest.mark.parametrize("override,key", [
    ("analysis.curvature.every=-1", "analysis.curvature.every"),
    ("analysis.curvature.quantities=[sharpness]", "analysis.curvature.quantities"),
    ("analysis.curvature.quantities=[]", "analysis.curvature.quantities"),
    ("analysis.curvature.operator=fisher", "analysis.curvature.operator"),
    ("analysis.curvature.tol=0", "analysis.curvature.tol"),
    ("analysis.curvature.data.num_samples=0", "analysis.curvature.data.num_samples"),
    ("analysis.curvature.data.num_samples=201", "analysis.curvature.data.num_samples"),
    ("analysis.curvature.compare_cold=true", "analysis.curvature.compare_cold"),
])
def test_bad_tracking_config_is_one_line_naming_the_key(override, key, tmp_path):
    extra = ["analysis.curvature.quantities=[trace]"] if "compare_cold" in override else []
    cfg = make_cfg(tmp_path, DIGITS + ["analysis.epochs=1", "analysis.curvature.every=2", *extra, override])
    with pytest.raises(ConfigError) as error:  # the schema, before anything runs
        dispatch(cfg)
    assert error.value.key == key and len(str(error.value).splitlines()) == 1
    assert not (tmp_path / "results.json").exists()
    if "num_samples=201" not in override:  # the analysis's own check says the same without the schema
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            train_module.validate(cfg)
