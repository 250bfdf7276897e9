"""analysis=spectrum over a folder of checkpoints: each checkpoint's single-run Ritz values, the exact top
eigenvalue, resume per checkpoint, one-line errors, and the multirun glob() that launched 0 jobs."""

import shutil

import numpy as np
import pytest
import torch
from torch.func import functional_call

import experiments.spectrum_network as SN
from curvature.data import load_splits
from curvature.errors import SuiteError
from curvature.models import get_model
from curvature.training import load_checkpoint, save_checkpoint
from experiments.run import dispatch
from tests.conftest import make_cfg, run_cli

MLP = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=200"]
SPECTRUM = MLP + ["analysis.num_steps=12", "analysis.checkpoint_every=4", "operator.batch_size=64",
                  "analysis.exact_max_dim=0"]
ARRAYS = ("ritz_values", "ritz_weights", "tridiagonal")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A digits MLP (610 parameters) trained for 3 epochs with a checkpoint after each."""
    folder = tmp_path_factory.mktemp("train")
    dispatch(make_cfg(folder, MLP + ["analysis=train", "analysis.epochs=3", "analysis.save_freq=1"]))
    return folder


def _arrays(folder):
    with np.load(folder / "arrays.npz") as arrays:
        return dict(arrays)


def _dense_hessian(checkpoint):
    """The Hessian of the mean cross-entropy over the same 200 samples, by torch.func.hessian (float64)."""
    model = get_model("mlp", 10, hidden=[8]).double()
    load_checkpoint(checkpoint, model)
    model.double()
    data = load_splits("digits", num_subsamples=200, seed=0).train
    (x, y), = data.batches(len(data), dtype=torch.float64)
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss(w):
        params = dict(zip(names, (c.reshape(s) for c, s in zip(torch.split(w, [s.numel() for s in shapes]), shapes))))
        return torch.nn.functional.cross_entropy(functional_call(model, params, (x,)), y)
    return torch.func.hessian(loss)(flat)


def test_folder_gives_each_checkpoint_the_ritz_values_of_its_single_run(trained, tmp_path):
    results = dispatch(make_cfg(tmp_path / "series", SPECTRUM + [f"analysis.checkpoint={trained}"]))
    series = _arrays(tmp_path / "series")
    rows = results["tables"]["checkpoints"]
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["checkpoint"] for r in rows] == [str(trained / f"checkpoint-0000{e}.pt") for e in (1, 2, 3)]
    for epoch, row in zip((1, 2, 3), rows):
        path = trained / f"checkpoint-0000{epoch}.pt"
        single = tmp_path / f"single{epoch}"
        dispatch(make_cfg(single, SPECTRUM + [f"analysis.checkpoint={path}"]))
        alone = _arrays(single)
        for key in ARRAYS:
            torch.testing.assert_close(torch.from_numpy(series[f"checkpoint-0000{epoch}_hessian_{key}"]),
                                       torch.from_numpy(alone[f"hessian_{key}"]), rtol=1e-12, atol=1e-12)
        exact = torch.linalg.eigvalsh(_dense_hessian(path))
        # 12 Lanczos steps give the extreme eigenvalue of this 610 x 610 Hessian to 1e-6
        assert row["max_ritz_value"] == pytest.approx(float(exact.max()), rel=1e-6)
        band = results["config"]["analysis"]["negative_band"] * max(abs(row["max_ritz_value"]),
                                                                    abs(row["min_ritz_value"]))
        nodes, weights = (series[f"checkpoint-0000{epoch}_hessian_{k}"][0] for k in ("ritz_values", "ritz_weights"))
        assert row["negative_mass"] == pytest.approx(weights[nodes < -band].sum(), abs=1e-15)
    assert results["checkpoints"][0]["label"] == "checkpoint-00001"
    assert (tmp_path / "series" / "spectrum_evolution.png").is_file()
    assert (tmp_path / "series" / "spectrum_evolution.pdf").is_file()
    leftovers = [*(tmp_path / "series").glob("lanczos-state-*"), *(tmp_path / "series").glob("spectrum-done-*")]
    assert not leftovers


def test_a_killed_series_resumes_per_checkpoint(trained, tmp_path, monkeypatch):
    """Killed in checkpoint 2's Lanczos run after its state at step 8: the resume reads checkpoint 1's
    spectrum, continues checkpoint 2 from step 8 (4 more products) and runs checkpoint 3 (12)."""
    whole = tmp_path / "whole"
    dispatch(make_cfg(whole, SPECTRUM + [f"analysis.checkpoint={trained}"]))
    products = {"n": 0, "kill_at": 12 + 10}
    real = SN.lanczos

    def counted(matvec, *args, **kwargs):
        def product(x):
            products["n"] += 1
            if products["n"] == products["kill_at"]:
                raise KeyboardInterrupt  # as a kill: the files on disk are all a resume has
            return matvec(x)
        return real(product, *args, **kwargs)
    monkeypatch.setattr(SN, "lanczos", counted)
    out = tmp_path / "killed"
    with pytest.raises(KeyboardInterrupt):
        dispatch(make_cfg(out, SPECTRUM + [f"analysis.checkpoint={trained}"]))
    assert (out / "spectrum-done-checkpoint-00001.pt").is_file()
    assert (out / "lanczos-state-checkpoint-00002-hessian.pt").is_file()
    products.update(n=0, kill_at=-1)
    results = dispatch(make_cfg(out, SPECTRUM + [f"analysis.checkpoint={trained}", "resume=true"]))
    assert products["n"] == 4 + 12
    assert [r["resumed"] for r in results["tables"]["checkpoints"]] == [True, False, False]
    assert any(n.startswith("checkpoint-00002: hessian: resumed from") for n in results["notes"]), results["notes"]
    resumed, uninterrupted = _arrays(out), _arrays(whole)
    for epoch in (1, 2, 3):
        for key in ARRAYS:
            name = f"checkpoint-0000{epoch}_hessian_{key}"
            torch.testing.assert_close(torch.from_numpy(resumed[name]), torch.from_numpy(uninterrupted[name]),
                                       rtol=1e-12, atol=1e-12)
    assert not list(out.glob("spectrum-done-*")) and not list(out.glob("lanczos-state-*"))


def test_bad_checkpoint_series_are_one_line_errors_naming_the_file(trained, tmp_path):
    empty, notes = tmp_path / "empty", tmp_path / "notes"
    empty.mkdir()
    notes.mkdir()
    (notes / "readme.txt").write_text("no checkpoints here")
    shutil.copy(trained / "checkpoint-00001.pt", notes / "checkpoint-swa.pt")  # not a checkpoint-XXXXX.pt
    other = tmp_path / "other" / "checkpoint-00001.pt"
    other.parent.mkdir()
    save_checkpoint(other, {"model": get_model("mlp", 10, hidden=[16]).state_dict(), "epoch": 1})
    relabelled = tmp_path / "relabelled" / "checkpoint-00004.pt"
    relabelled.parent.mkdir()
    state = torch.load(trained / "checkpoint-00003.pt", weights_only=True)
    state["config"]["model"]["hidden"] = [8, 0]  # the same tensors, saved by a run of another model config
    save_checkpoint(relabelled, state)
    cases = [
        (str(empty), "the folder is empty"),
        (str(notes), "the folder holds no checkpoint-XXXXX.pt"),
        (f"[{trained / 'checkpoint-00001.pt'},{tmp_path / 'missing.pt'}]", "missing.pt.*no such checkpoint file"),
        (f"[{trained},{trained / 'checkpoint-00002.pt'}]", "checkpoint-00002.pt.*named twice"),
        (f"[{trained},{other}]", "other/checkpoint-00001.pt does not fit the chosen model"),
        (f"[{trained},{relabelled}]", "relabelled/checkpoint-00004.pt was trained with model"),
    ]
    for i, (value, message) in enumerate(cases):
        out = tmp_path / f"run{i}"
        with pytest.raises(SuiteError, match=message) as error:
            dispatch(make_cfg(out, SPECTRUM + [f"analysis.checkpoint={value}"]))
        assert "\n" not in str(error.value)
        assert not (out / "results.json").exists() and not list(out.glob("lanczos-state-*"))
    with pytest.raises(SuiteError, match="analysis.save_ritz_vectors"):
        dispatch(make_cfg(tmp_path / "vectors", SPECTRUM + [f"analysis.checkpoint={trained}",
                                                            "analysis.save_ritz_vectors=true"]))


def test_multirun_glob_of_checkpoints_is_a_one_line_error_and_a_list_keeps_its_order(trained, tmp_path):
    """Hydra's glob() filters a config group's option names, so on analysis.checkpoint it launched 0 jobs
    and exited 0; now the command line refuses it, pointing at the folder form."""
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", f"analysis.checkpoint=glob({trained}/checkpoint-*.pt)", *SPECTRUM, "logger=none",
                   f"hydra.sweep.dir={sweep}")
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1, proc.stderr[-800:]
    assert "analysis.checkpoint=<folder>" in lines[0] and not sweep.exists()
    results = dispatch(make_cfg(tmp_path / "list", SPECTRUM + [
        f"analysis.checkpoint=[{trained / 'checkpoint-00003.pt'},{trained / 'checkpoint-00001.pt'}]"]))
    assert [c["epoch"] for c in results["checkpoints"]] == [3, 1]
