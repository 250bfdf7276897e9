"""No code runs from a file, and a file that does not fit is one line naming it.

Every file the suite reads is read without running code: checkpoints and Ritz vectors with
``torch.load(weights_only=True)``, CIFAR batches with a restricted unpickler. A planted pickle (one
whose ``__reduce__`` opens a marker file) is refused in one line naming the file, and the marker is
never created. Checkpoints with NaN/Inf weights, a resume whose config differs in a key that changes
the result, and checkpoints of another optimiser or model are refused in one line too.
"""

from __future__ import annotations

import codecs
import json
import pickle
import shutil

import pytest
import torch

from curvature import data
from curvature.errors import DataError, SuiteError
from curvature.models import build_model
from curvature.training import load_checkpoint, save_checkpoint
from experiments.run import dispatch
from tests.conftest import make_cfg, run_cli

DIGITS = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=100"]
TRAIN = ["analysis=train", *DIGITS, "analysis.epochs=2", "analysis.save_freq=1"]
#: Analyses that read ``analysis.checkpoint`` (spectrum is the default analysis).
CHECKPOINT_READERS = {
    "spectrum": ["analysis.num_steps=3"],
    "diagonal": ["analysis=diagonal", "analysis.method=adam", "analysis.lanczos_steps=0"],
    "landscape": ["analysis=landscape", "analysis.num_steps=3"],
    "loss_stats": ["analysis=loss_stats"],
    "weight_esd": ["analysis=weight_esd"],
}


class Planted:
    """Unpickled by an unrestricted loader, this calls ``open(marker, "w")``: the marker file exists
    exactly when code from the file ran."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class Rot13:
    """Asks for ``_codecs.encode`` (admitted for bytes) with another codec."""

    def __reduce__(self):
        return codecs.encode, ("abc", "rot13")


def _one_line(error) -> str:
    message = str(error.value)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """An SGD run (checkpoints after epochs 1 and 2) and an Adam run of the same small MLP."""
    root = tmp_path_factory.mktemp("trained")
    dispatch(make_cfg(root / "sgd", TRAIN))
    dispatch(make_cfg(root / "adam", [*TRAIN, "optimizer=adam", "optimizer.lr=0.001"]))
    return root


def _variant(trained, tmp_path, edit, source="sgd/checkpoint-00001.pt"):
    """A copy of a real checkpoint with ``edit(state)`` applied."""
    state = torch.load(trained / source, weights_only=True)
    edit(state)
    path = tmp_path / "checkpoint-00001.pt"
    save_checkpoint(path, state)
    return path


# --- planted pickles ---------------------------------------------------------------------------
@pytest.fixture(params=["zip", "legacy"])
def planted_checkpoint(request, tmp_path):
    """A checkpoint whose model entry is a planted object, in torch's zip format or as a raw pickle."""
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint-00001.pt"
    payload = {"model": Planted(marker), "epoch": 1}
    if request.param == "zip":
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=2))
    return path, marker


def test_the_planted_pickle_does_run_code_when_loaded_unsafely(planted_checkpoint):
    """The control: without weights_only the same file creates the marker, so the tests below can fail."""
    path, marker = planted_checkpoint
    if path.read_bytes().startswith(b"PK"):  # torch's zip format
        torch.load(path, weights_only=False)
    else:
        pickle.loads(path.read_bytes())
    assert marker.exists()


@pytest.mark.parametrize("analysis", sorted(CHECKPOINT_READERS))
def test_a_planted_checkpoint_is_refused_by_every_analysis(analysis, planted_checkpoint, tmp_path):
    path, marker = planted_checkpoint
    cfg = make_cfg(tmp_path / "run", [*DIGITS, *CHECKPOINT_READERS[analysis], f"analysis.checkpoint={path}"])
    with pytest.raises(SuiteError) as error:
        dispatch(cfg)
    line = _one_line(error)
    assert f"checkpoint {path} is not a checkpoint this suite can load safely (it asks for io.open" in line
    assert not marker.exists() and not (tmp_path / "run" / "results.json").exists()


def test_a_planted_checkpoint_given_to_train_resume_is_refused(planted_checkpoint, tmp_path):
    path, marker = planted_checkpoint
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={path}"]))
    assert str(path) in _one_line(error) and "load safely" in str(error.value)
    assert not marker.exists()


def test_a_planted_checkpoint_through_the_cli_is_one_line_and_runs_nothing(tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "checkpoint-00001.pt"
    torch.save({"model": Planted(marker), "epoch": 1}, path)
    out = tmp_path / "run"
    proc = run_cli(*TRAIN, f"resume={path}", "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {path} is not a checkpoint this suite "
                                                   "can load safely (it asks for io.open")
    assert not marker.exists() and not (out / "results.json").exists()


def test_a_planted_ritz_vectors_file_is_refused_by_the_landscape(trained, tmp_path):
    marker = tmp_path / "code-ran"
    path = tmp_path / "ritz_vectors_hessian.pt"
    torch.save({"ritz_vectors": Planted(marker)}, path)
    cfg = make_cfg(tmp_path / "run", [*DIGITS, "analysis=landscape", f"analysis.ritz_vectors_file={path}",
                                      f"analysis.checkpoint={trained / 'sgd' / 'checkpoint-00002.pt'}"])
    with pytest.raises(SuiteError) as error:
        dispatch(cfg)
    assert _one_line(error).startswith(f"Ritz vectors file {path} is not a Ritz vectors file this suite can load "
                                       "safely (it asks for io.open")
    assert not marker.exists()


def test_a_ritz_vectors_file_with_nan_is_refused(tmp_path):
    from experiments.landscape import load_ritz_vectors
    model = torch.nn.Linear(2, 1)
    path = tmp_path / "ritz_vectors_hessian.pt"
    vectors = torch.zeros(1, 2, 3)
    vectors[0, 1, 2] = float("nan")
    torch.save({"ritz_values": torch.zeros(1, 2), "ritz_vectors": vectors, "mask": torch.ones(1, 2, dtype=torch.bool)},
               path)
    with pytest.raises(SuiteError, match=r"holds non-finite values in tensor 'ritz_vectors' \(1 NaN"):
        load_ritz_vectors(str(path), model, ["weight", "bias"])


def _planted_cifar(tmp_path, content: bytes):
    """Fake CIFAR-10 whose data_batch_1 is ``content``, with the folder's own manifest vouching for its md5."""
    folder = data.write_fake_cifar(tmp_path / "cifar", "cifar10", num_train=20, num_test=10)
    (folder / "data_batch_1").write_bytes(content)
    manifest = json.loads((folder / data.FAKE_MANIFEST).read_text())
    manifest["md5"]["data_batch_1"] = data._md5(folder / "data_batch_1")
    (folder / data.FAKE_MANIFEST).write_text(json.dumps(manifest))
    return folder


def test_a_planted_cifar_batch_is_refused_whatever_the_manifest_says(tmp_path):
    marker = tmp_path / "code-ran"
    folder = _planted_cifar(tmp_path, pickle.dumps({b"data": Planted(marker), b"labels": []}, protocol=2))
    cfg = make_cfg(tmp_path / "run", ["analysis=train", "dataset=cifar10", f"dataset.data_dir={tmp_path / 'cifar'}",
                                      "model=cnn", "analysis.epochs=1"])
    with pytest.raises(DataError) as error:
        dispatch(cfg)
    assert _one_line(error).startswith(f"{folder / 'data_batch_1'} is not a CIFAR-10 batch this suite can read "
                                       "safely (it asks for io.open")
    assert not marker.exists() and not (tmp_path / "run" / "results.json").exists()


@pytest.mark.parametrize("planted,asks", [(Rot13(), "_codecs.encode other than for bytes"),
                                          (shutil.rmtree, "shutil.rmtree")])
def test_the_cifar_reader_admits_arrays_lists_and_bytes_only(planted, asks, tmp_path):
    folder = _planted_cifar(tmp_path, pickle.dumps({b"data": planted}, protocol=2))
    with pytest.raises(DataError, match=f"data_batch_1 is not a CIFAR-10 batch .*{asks}"):
        data.read_cifar("cifar10", tmp_path / "cifar")
    assert folder.is_dir()


def test_the_cifar_reader_reads_batches_pickled_by_numpy_1(tmp_path):
    """The official archives were pickled under numpy 1's module name numpy.core.multiarray."""
    folder = data.write_fake_cifar(tmp_path / "cifar", "cifar10", num_train=20, num_test=10)
    blob = (folder / "data_batch_1").read_bytes()
    assert b"numpy._core.multiarray\n_reconstruct" in blob
    _planted_cifar(tmp_path, blob.replace(b"numpy._core.multiarray\n", b"numpy.core.multiarray\n"))
    train_x, train_y, _, _ = data.read_cifar("cifar10", tmp_path / "cifar")
    expected = data.fake_cifar_arrays("cifar10", 20, 10)
    assert torch.equal(torch.from_numpy(train_x), torch.from_numpy(expected[0]))
    assert torch.equal(torch.from_numpy(train_y), torch.from_numpy(expected[1]))


# --- NaN / Inf weights --------------------------------------------------------------------------
@pytest.mark.parametrize("analysis", sorted(CHECKPOINT_READERS) + ["train"])
def test_non_finite_weights_are_refused_naming_file_and_tensor(analysis, trained, tmp_path):
    def poison(state):
        state["model"]["net.1.weight"][0, 0] = float("nan")
        state["model"]["net.1.weight"][0, 1] = float("inf")
    path = _variant(trained, tmp_path, poison)
    overrides = [*TRAIN, f"resume={path}"] if analysis == "train" else \
        [*DIGITS, *CHECKPOINT_READERS[analysis], f"analysis.checkpoint={path}"]
    with pytest.raises(DataError) as error:
        dispatch(make_cfg(tmp_path / "run", overrides))
    assert _one_line(error).startswith(f"checkpoint {path} holds non-finite values in tensor 'net.1.weight' "
                                       "(1 NaN, 1 Inf of 512 entries)")


def test_non_finite_optimiser_state_is_refused_on_resume(trained, tmp_path):
    def poison(state):
        state["optimizer"]["state"][0]["momentum_buffer"].fill_(float("nan"))
    path = _variant(trained, tmp_path, poison)
    with pytest.raises(DataError, match="non-finite values in tensor 'optimizer.state.0.momentum_buffer'"):
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={path}"]))


# --- resume: the same run, or one line naming the key -------------------------------------------
@pytest.mark.parametrize("override,named", [
    ("optimizer.lr=0.01", "optimizer.lr=0.01 is invalid: differs from 0.05"),
    ("optimizer.momentum=0.5", "optimizer.momentum=0.5 is invalid: differs from 0.9"),
    ("optimizer.weight_decay=0", "optimizer.weight_decay=0 is invalid: differs from 0.0005"),
    ("optimizer=adam", "optimizer.name='adam' is invalid: differs from 'sgd'"),
    ("seed=1", "seed=1 is invalid: differs from 0"),
    ("dataset.batch_size=32", "batch_size=32 is invalid: differs from 64"),
    ("dataset.num_subsamples=50", "dataset.num_subsamples=50 is invalid: differs from 100"),
    ("analysis.epochs=3", "analysis.epochs=3 is invalid: differs from 2"),   # the linear schedule moves
    ("analysis.schedule=constant", "analysis.schedule='constant' is invalid: differs from 'linear'"),
    ("dtype=float32", "dtype='float32' is invalid: differs from 'float64'"),
])
def test_resume_with_a_config_that_changes_the_result_is_refused_naming_the_key(override, named, trained, tmp_path):
    path = trained / "sgd" / "checkpoint-00001.pt"
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, override, f"resume={path}"]))
    line = _one_line(error)
    assert named in line and "checkpoint-00001.pt" in line, line


def test_resume_refuses_another_optimizer_target(trained, tmp_path):
    def retarget(state):
        state["config"]["optimizer"]["_target_"] = "torch.optim.ASGD"
    path = _variant(trained, tmp_path, retarget)
    with pytest.raises(SuiteError, match=r"optimizer._target_='<unset>' is invalid: differs from 'torch.optim.ASGD'"):
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={path}"]))


def test_resume_may_change_keys_that_leave_the_weights_alone(tmp_path):
    """Logging, checks, save frequency, and the epoch count when the learning rate does not depend on it."""
    constant = [*TRAIN, "analysis.schedule=constant"]
    dispatch(make_cfg(tmp_path / "first", constant))
    results = dispatch(make_cfg(tmp_path / "longer", [*constant, "analysis.epochs=3", "analysis.save_freq=3",
                                                      "analysis.eval_batch_size=17", "operator=ggn",
                                                      f"resume={tmp_path / 'first' / 'checkpoint-00002.pt'}"]))
    assert results["metrics"]["epochs_run"] == 1 and results["checkpoints"] == ["checkpoint-00003.pt"]
    assert [r["epoch"] for r in results["tables"]["epochs"]] == [1, 2, 3]


def test_resuming_a_finished_run_is_refused(trained, tmp_path):
    with pytest.raises(SuiteError, match=r"analysis.epochs=2 is invalid: the checkpoint already reached epoch 2"):
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={trained / 'sgd' / 'checkpoint-00002.pt'}"]))


# --- checkpoints that load but do not fit -------------------------------------------------------
def _drop_epoch(state):
    del state["epoch"]


def _drop_config(state):
    del state["config"]


def _other_model_buffer(state):
    state["optimizer"]["state"][0]["momentum_buffer"] = torch.zeros(3, 3)


def _fewer_parameters(state):
    state["optimizer"]["param_groups"][0]["params"] = state["optimizer"]["param_groups"][0]["params"][:2]


def _swa_average(state):
    state["optimizer"] = None


def _bad_history(state):
    state["history"] = 5


@pytest.mark.parametrize("edit,message", [
    (_drop_epoch, "holds no epoch count ('epoch' is None)"),
    (_drop_config, "holds no config to check the resumed run against"),
    (_other_model_buffer, "holds optimiser state 'momentum_buffer' of shape (3, 3) for a parameter of shape (8, 64)"),
    (_fewer_parameters, "holds optimiser state for [2] parameter tensors (per group), this model has [4]"),
    (_swa_average, "holds no optimiser state"),
    (_bad_history, "holds no training history"),
])
def test_a_loadable_checkpoint_that_does_not_fit_the_resume_is_one_line(edit, message, trained, tmp_path):
    path = _variant(trained, tmp_path, edit)
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={path}"]))
    line = _one_line(error)
    assert line.startswith(f"checkpoint {path} ") and message in line, line


@pytest.mark.parametrize("content,message", [
    ({"model": 5}, "holds no model state (its 'model' entry is an int, not a state dict)"),
    ([1, 2], "holds no model state (it holds a list, not a state dict)"),
])
@pytest.mark.parametrize("analysis", ["train", "spectrum"])
def test_a_checkpoint_without_a_model_state_is_one_line(content, message, analysis, tmp_path):
    path = tmp_path / "checkpoint-00001.pt"
    save_checkpoint(path, content)
    overrides = [*TRAIN, f"resume={path}"] if analysis == "train" else [*DIGITS, f"analysis.checkpoint={path}"]
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", overrides))
    assert _one_line(error).startswith(f"checkpoint {path} {message}")


@pytest.mark.parametrize("content", [b"not a checkpoint", b""])
def test_a_file_that_is_not_a_checkpoint_is_one_line(content, tmp_path):
    path = tmp_path / "checkpoint-00001.pt"
    path.write_bytes(content)
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", [*DIGITS, f"analysis.checkpoint={path}"]))
    assert _one_line(error).startswith(f"checkpoint {path} is not a checkpoint this suite can load safely (")


def test_an_adam_checkpoint_resumed_with_sgd_is_one_line(trained, tmp_path):
    """Through the config (optimizer.name is named) and, without one, through the state itself (today's
    torch would fail inside the first step with KeyError: 'momentum')."""
    path = trained / "adam" / "checkpoint-00001.pt"
    with pytest.raises(SuiteError, match=r"optimizer.name='sgd' is invalid: differs from 'adam'"):
        dispatch(make_cfg(tmp_path / "run", [*TRAIN, f"resume={path}"]))
    cfg = make_cfg(tmp_path / "compose", DIGITS)
    model = build_model(dict(cfg.model), 10, 1, 8)
    sgd = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    with pytest.raises(SuiteError) as error:
        load_checkpoint(path, model, sgd)
    assert _one_line(error).startswith(f"checkpoint {path} holds the state of another optimiser than SGD "
                                       "(its settings have ")
    assert "lack " in str(error.value) and "momentum" in str(error.value)


def test_the_adam_diagonal_refuses_an_sgd_checkpoint_in_one_line(trained, tmp_path):
    path = trained / "sgd" / "checkpoint-00002.pt"
    with pytest.raises(SuiteError) as error:
        dispatch(make_cfg(tmp_path / "run", [*DIGITS, *CHECKPOINT_READERS["diagonal"], f"analysis.checkpoint={path}"]))
    assert _one_line(error).startswith(f"checkpoint {path} holds the state of another optimiser than Adam")


def test_checkpoints_of_the_suite_load_with_weights_only(trained):
    """What analysis=train writes (model, optimiser state, config, history) is tensors and plain values."""
    for run in ("sgd", "adam"):
        for path in sorted((trained / run).glob("checkpoint-*.pt")):
            state = torch.load(path, weights_only=True)
            assert set(state) >= {"model", "optimizer", "epoch", "config", "history"}
