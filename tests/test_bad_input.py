"""Bad input to every analysis: one line naming the key or file, non-zero exit, no results file.

One row per analysis runs through the real CLI in a subprocess (exit status, stderr); the other rows
go through ``experiments.run.dispatch`` in-process (same validation, no 4-second interpreter start).
"""

import os
import shutil
from pathlib import Path

import pytest
import torch

from curvature.errors import SuiteError
from curvature.training import save_checkpoint
from experiments.run import dispatch
from tests.conftest import make_cfg, run_cli

DIGITS = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=100"]
CNN = ["dataset=digits", "model=cnn", "dataset.num_subsamples=100"]
TEXT = ["analysis=train", "dataset=text", "model=gpt_tiny"]

# (analysis, overrides, what the error line must name); {other_ckpt}, {corrupt}, {missing}, {file}
# are filled in by the fixtures below.
CLI_ROWS = [
    ("spectrum_matrix", ["analysis.checkpoint_every=-1"], "analysis.checkpoint_every"),
    ("spectrum_network", ["dataset=cifar10", "dataset.data_dir={corrupt}", "model=cnn"], "data_batch_1"),
    ("train", ["analysis=train", *DIGITS, "analysis.epochs=abc"], "analysis.epochs"),
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.repeats=0"], "analysis.repeats"),
    ("theory", ["analysis=theory", "analysis.claim=thm9"], "analysis.claim"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.spectrum_file={missing}"], "analysis.spectrum_file"),
    ("weight_esd", ["analysis=weight_esd", "dataset=digits", "model=cnn", "analysis.checkpoint={other_ckpt}"],
     "checkpoint"),
    ("diagonal", ["analysis=diagonal", "analysis.method=magic"], "analysis.method"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.num_points=-3"], "analysis.num_points"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.checkpoint_dir={missing}"], "analysis.checkpoint_dir"),
]

INPROCESS_ROWS = [
    # the loss of the curvature operators (experiments/loss_config.py)
    ("spectrum_network", [*DIGITS, "operator.loss=hinge"], "operator.loss"),
    ("spectrum_network", [*DIGITS, "operator.reduction=none"], "operator.reduction"),
    ("spectrum_network", [*DIGITS, "operator.label_smoothing=1.5"], "operator.label_smoothing"),
    ("spectrum_network", [*DIGITS, "operator.loss=mse", "operator.label_smoothing=0.1"], "operator.label_smoothing"),
    ("spectrum_network", [*DIGITS, "operator.loss={{_target_:no_such_package.Loss}}"], "operator.loss._target_"),
    ("diagonal", ["analysis=diagonal", *DIGITS, "operator.label_smoothing=0.1"], "operator.loss"),
    ("spectrum_matrix", ["analysis.num_vectors=1.5"], "analysis.num_vectors"),
    ("spectrum_matrix", ["analysis.lanczos_engine=gpytorch"], "analysis.checkpoint_every"),
    ("spectrum_matrix", ["resume=true"], "resume"),
    ("spectrum_matrix", ["resume=/some/checkpoint.pt"], "resume"),
    ("spectrum_matrix", ["output_dir={file}/sub"], "output_dir"),
    ("spectrum_network", [*DIGITS, "analysis.checkpoint={missing}"], "analysis.checkpoint"),
    ("spectrum_network", [*CNN, "analysis.checkpoint={other_ckpt}"], "does not fit"),
    ("spectrum_network", [*DIGITS, "operator.batch_size=0"], "operator.batch_size"),
    ("spectrum_network", [*DIGITS, "analysis.exact_max_dim=1.5"], "analysis.exact_max_dim"),
    ("spectrum_network", [*CNN, "analysis.blocks=[[]]"], "analysis.blocks"),
    ("spectrum_network", [*CNN, "analysis.blocks=[features.0.*]"], "analysis.blocks"),
    ("spectrum_network", [*CNN, "analysis.blocks=[[conv1.*]]"], "matches no parameter"),
    ("spectrum_matrix", ["analysis.blocks=layer"], "analysis.blocks"),
    ("spectrum_matrix", ["analysis.exact_max_dim=null"], "analysis.exact_max_dim"),
    ("train", ["analysis=train", *DIGITS, "optimizer.lr=-1"], "optimizer.lr"),
    ("train", ["analysis=train", "dataset=cifar10", "dataset.data_dir={corrupt}", "model=cnn"], "data_batch_1"),
    ("train", ["analysis=train", *DIGITS, "resume=true"], "resume"),
    ("train", [*TEXT, "dataset.path={missing}"], "does-not-exist cannot be read"),
    ("train", [*TEXT, "dataset.path={file}"], "too few for one train and one test window"),
    ("train", [*TEXT, "dataset.augment=true"], "dataset.augment"),
    ("train", [*TEXT, "model.heads=5"], "multiple of heads"),
    ("train", [*TEXT, "optimizer=kfac"], "optimizer=adam"),
    ("train", ["analysis=train", "dataset=text", "model=cnn"], "model=gpt_tiny"),
    ("train", ["analysis=train", "dataset=digits", "model=gpt_tiny"], "dataset=text"),
    ("benchmark", ["analysis=benchmark", *DIGITS, "analysis.checkpoint={missing}"], "analysis.checkpoint"),
    ("theory", ["analysis=theory", "analysis.claim=thm1", "analysis.thm1.num_steps=0"], "analysis.thm1.num_steps"),
    ("theory", ["analysis=theory", "resume=true"], "resume"),
    ("kernel_smoothing", ["analysis=kernel_smoothing", "analysis.sigmas=[-1]"], "analysis.sigmas"),
    ("weight_esd", ["analysis=weight_esd", *DIGITS, "analysis.checkpoints_dir={missing}"], "analysis.checkpoints_dir"),
    ("diagonal", ["analysis=diagonal", "analysis.num_samples=zero"], "analysis.num_samples"),
    ("diagonal", ["analysis=diagonal", *CNN, "analysis.checkpoint={other_ckpt}"], "does not fit"),
    ("landscape", ["analysis=landscape", *DIGITS, "analysis.ritz_vectors_file={missing}"], "analysis.ritz_vectors_file"),
    ("loss_stats", ["analysis=loss_stats", *DIGITS, "analysis.batch_size=-2"], "analysis.batch_size"),
]


@pytest.fixture(scope="module")
def files(tmp_path_factory, fake_cifar10):
    root = tmp_path_factory.mktemp("bad_input")
    corrupt = root / "corrupt"
    shutil.copytree(fake_cifar10, corrupt)
    (batch,) = corrupt.rglob("data_batch_1")
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])   # a truncated download
    other = root / "checkpoint-00001.pt"     # a checkpoint of another model (an MLP, not the CNN)
    torch.manual_seed(0)
    save_checkpoint(other, {"model": torch.nn.Sequential(torch.nn.Linear(64, 8)).state_dict(), "epoch": 1})
    plain = root / "a_file"
    plain.write_text("not a folder")
    return {"corrupt": corrupt, "other_ckpt": other, "missing": root / "does-not-exist", "file": plain}


def _fill(overrides, files):
    return [o.format(**files) for o in overrides]


def _no_results(folder: Path) -> None:
    assert not (folder / "results.json").exists()
    assert not list(folder.glob("*.npz")) and not list(folder.glob("*.png"))


@pytest.mark.parametrize("analysis,overrides,names", CLI_ROWS, ids=[r[0] for r in CLI_ROWS])
def test_cli_bad_input_is_one_line_and_exit_2(analysis, overrides, names, files, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*_fill(overrides, files), "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: ") and names in lines[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    _no_results(out)


# analysis.exact_max_dim takes auto or an integer >= 0: a typo or a negative size is refused through the
# real CLI with exit status 2 (network and matrix datasets validate the key in the same place).
@pytest.mark.parametrize("overrides", [[*DIGITS, "analysis.exact_max_dim=-1"], ["analysis.exact_max_dim=sometimes"]],
                         ids=["negative", "word"])
def test_cli_bad_exact_max_dim_is_one_line_and_exit_2(overrides, tmp_path):
    out = tmp_path / "run"
    proc = run_cli(*overrides, "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    value = overrides[-1].split("=", 1)[1]
    assert lines == [f"error: config key analysis.exact_max_dim={int(value) if value == '-1' else value!r} is "
                     "invalid: must be auto or an integer >= 0; e.g. analysis.exact_max_dim=auto"], proc.stderr
    _no_results(out) if out.exists() else None


@pytest.mark.parametrize("analysis,overrides,names", INPROCESS_ROWS,
                         ids=[f"{r[0]}-{r[2]}" for r in INPROCESS_ROWS])
def test_bad_input_is_a_one_line_suite_error(analysis, overrides, names, files, tmp_path):
    filled = _fill(overrides, files)
    out = tmp_path / "run"
    cfg = make_cfg(out, [o for o in filled if not o.startswith("output_dir=")])
    if any(o.startswith("output_dir=") for o in filled):
        cfg.output_dir = next(o for o in filled if o.startswith("output_dir=")).split("=", 1)[1]
    with pytest.raises(SuiteError) as info:
        dispatch(cfg)
    message = str(info.value)
    assert names in message and "\n" not in message
    _no_results(out) if out.exists() else None


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_output_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(SuiteError, match="output_dir"):
            dispatch(make_cfg(folder / "run", ["dataset.n=50", "analysis.num_steps=5"]))
    finally:
        folder.chmod(0o755)
