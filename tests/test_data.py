"""curvature.data: the CIFAR file format (written by a fixture), its error messages, device augmentation,
batching and the seeded splits. Nothing here touches the network."""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
import tarfile

import numpy as np
import pytest
import torch

from curvature import data
from curvature.data import (CIFAR, DataSplits, ImageData, augment, default_data_dir, fake_cifar_arrays,
                            load_splits, read_cifar, write_fake_cifar)
from curvature.errors import DataError, SuiteError
from tests.conftest import DEVICES, ROOT

SIZES = dict(num_train=23, num_test=11, seed=3)


def _rewrite(folder, name, content: bytes):
    """Replace one file and update the fake manifest, so only the content check can object."""
    (folder / name).write_bytes(content)
    manifest = json.loads((folder / data.FAKE_MANIFEST).read_text())
    manifest["md5"][name] = data._md5(folder / name)
    (folder / data.FAKE_MANIFEST).write_text(json.dumps(manifest))


@pytest.mark.parametrize("which", ["cifar10", "cifar100"])
def test_reader_returns_exactly_what_the_fixture_wrote(which, tmp_path):
    folder = write_fake_cifar(tmp_path, which, **SIZES)
    spec = CIFAR[which]
    assert folder == tmp_path / spec.folder
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        [*spec.train_files, spec.test_file, spec.meta_file, data.FAKE_MANIFEST])
    got = read_cifar(which, tmp_path)
    for a, b in zip(got, fake_cifar_arrays(which, **SIZES)):
        assert a.dtype == b.dtype and np.array_equal(a, b)
    train_x, train_y, test_x, test_y = got
    assert train_x.shape == (23, 3, 32, 32) and test_x.shape == (11, 3, 32, 32)
    assert train_y.dtype == np.int64 and set(train_y) == set(range(min(23, spec.num_classes)))

    # The raw rows are channel-major: 1024 red, then green, then blue values, each plane row-major.
    with open(folder / spec.train_files[0], "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    assert raw[b"data"].dtype == np.uint8 and raw[b"data"].shape[1] == 3072
    assert isinstance(raw[spec.label_key], list)
    row, y, x = raw[b"data"][1], 5, 7
    for channel in range(3):
        assert train_x[1, channel, y, x] == row[channel * 1024 + y * 32 + x]
    assert train_y[1] == raw[spec.label_key][1]
    if which == "cifar100":
        assert len(raw[b"coarse_labels"]) == len(raw[b"fine_labels"])


def test_corrupt_file_is_named(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", **SIZES)
    blob = bytearray((folder / "data_batch_3").read_bytes())
    blob[-100] ^= 0xFF
    (folder / "data_batch_3").write_bytes(bytes(blob))
    with pytest.raises(DataError, match="data_batch_3 is corrupt.*re-download") as err:
        read_cifar("cifar10", tmp_path)
    assert "\n" not in str(err.value)


def test_real_data_is_checked_against_the_official_md5s(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar100", **SIZES)
    (folder / data.FAKE_MANIFEST).unlink()
    official = CIFAR["cifar100"].file_md5["train"]
    with pytest.raises(DataError, match=rf"cifar-100-python/train is corrupt.*expected {official}"):
        read_cifar("cifar100", tmp_path)


def test_missing_folder_names_data_dir_and_the_download_command(tmp_path):
    with pytest.raises(DataError) as err:
        read_cifar("cifar10", tmp_path / "nowhere")
    message = str(err.value)
    assert f"data_dir={tmp_path / 'nowhere'}" in message
    assert f"python -m curvature.data download cifar10 --data-dir {tmp_path / 'nowhere'}" in message
    assert "dataset.download=true" in message and "\n" not in message


def test_missing_single_file_is_named(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar100", **SIZES)
    (folder / "test").unlink()
    with pytest.raises(DataError, match=r"missing .*cifar-100-python/test\)"):
        load_splits("cifar100", tmp_path)


@pytest.mark.parametrize("bad", ["shape", "labels", "range", "pickle"])
def test_malformed_file_is_named(bad, tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10", **SIZES)
    batch = {b"data": np.zeros((4, 3072), np.uint8), b"labels": [0, 1, 2, 3], b"batch_label": b"x"}
    if bad == "shape":
        batch[b"data"] = np.zeros((4, 100), np.uint8)
    elif bad == "labels":
        batch[b"labels"] = [0, 1, 2]
    elif bad == "range":
        batch[b"labels"] = [0, 1, 2, 10]
    _rewrite(folder, "data_batch_2", b"not a pickle" if bad == "pickle" else pickle.dumps(batch, protocol=2))
    with pytest.raises(DataError, match=str(folder / "data_batch_2")):
        read_cifar("cifar10", tmp_path)


def test_default_data_dir_respects_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert default_data_dir() == tmp_path / "deep-curvature-suite" / "data"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert default_data_dir() == tmp_path / "home" / ".cache" / "deep-curvature-suite" / "data"


def _archive(tmp_path, which="cifar10"):
    source = tmp_path / "source"
    folder = write_fake_cifar(source, which, **SIZES)
    archive = tmp_path / "archive.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    return archive


def test_download_verifies_and_unpacks_atomically(tmp_path):
    archive = _archive(tmp_path)
    target = tmp_path / "cache"
    url, md5 = archive.as_uri(), data._md5(archive)
    with pytest.raises(DataError, match="corrupt"):
        data.download_cifar("cifar10", target, url=url, md5="0" * 32)
    assert not (target / "cifar-10-batches-py").exists() and not list(target.iterdir())
    folder = data.download_cifar("cifar10", target, url=url, md5=md5)
    for a, b in zip(read_cifar("cifar10", target), fake_cifar_arrays("cifar10", **SIZES)):
        assert np.array_equal(a, b)
    (folder / "test_batch").write_bytes(b"broken")  # a corrupt copy is replaced on the next download
    data.download_cifar("cifar10", target, url=url, md5=md5)
    read_cifar("cifar10", target)
    assert [p.name for p in target.iterdir()] == ["cifar-10-batches-py"]


def test_download_rejects_paths_escaping_the_target(tmp_path):
    archive = tmp_path / "evil.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        info = tarfile.TarInfo("../escaped")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"bad"))
    with pytest.raises(DataError, match="unsafe entry '../escaped'"):
        data.download_cifar("cifar10", tmp_path / "cache", url=archive.as_uri(), md5=data._md5(archive))
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "cache" / "escaped").exists()


def test_cli_writes_fake_data_and_reports_errors_in_one_line(tmp_path):
    run = [sys.executable, "-m", "curvature.data"]
    args = ["fake", "cifar100", "--data-dir", str(tmp_path), "--train", "7", "--test", "3"]
    done = subprocess.run([*run, *args], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == str(tmp_path / "cifar-100-python")
    assert read_cifar("cifar100", tmp_path)[0].shape == (7, 3, 32, 32)


def test_cli_download_error_is_one_line_with_status_2(tmp_path, capsys, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("network disabled in tests")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    assert data.main(["download", "cifar10", "--data-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "cifar-10-python.tar.gz" in err and str(tmp_path) in err


# ------------------------------------------------------------------------------ device tensors
def _images(n=64, size=8, channels=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)


@pytest.mark.parametrize("device", DEVICES)
def test_augment_is_seeded_and_keeps_dtype_and_shape(device):
    images = _images().to(device)
    first = augment(images, torch.Generator(device).manual_seed(5))
    again = augment(images, torch.Generator(device).manual_seed(5))
    other = augment(images, torch.Generator(device).manual_seed(6))
    assert first.dtype == torch.uint8 and first.shape == images.shape and first.device == images.device
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_augment_crops_are_shifts_of_the_padded_image_and_flips_flip():
    images, p = _images(n=200), 4
    out = augment(images, torch.Generator().manual_seed(0), padding=p)
    padded = torch.nn.functional.pad(images, (p, p, p, p))
    seen_shifts, seen_flips = set(), set()
    shifts = [(dy, dx) for dy in range(2 * p + 1) for dx in range(2 * p + 1)]
    for i in range(len(images)):
        crops = {(dy, dx): padded[i, :, dy:dy + 8, dx:dx + 8] for dy, dx in shifts}
        matches = {(dy, dx, flip) for (dy, dx), crop in crops.items() for flip in (0, 1)
                   if torch.equal(out[i], crop.flip(-1) if flip else crop)}
        assert len(matches) == 1, (i, matches)  # random nonzero pixels: exactly one crop fits
        (dy, dx, flip), = matches
        seen_shifts.add((dy, dx))
        seen_flips.add(flip)
    assert seen_flips == {0, 1} and len(seen_shifts) > 40  # 81 offsets, 200 draws

    no_pad = augment(images, torch.Generator().manual_seed(1), padding=0)
    flipped = torch.tensor([torch.equal(a, b.flip(-1)) for a, b in zip(no_pad, images)])
    same = torch.tensor([torch.equal(a, b) for a, b in zip(no_pad, images)])
    assert torch.all(flipped ^ same) and 60 < flipped.sum() < 140


@pytest.fixture
def cifar_splits(tmp_path):
    write_fake_cifar(tmp_path, "cifar10", num_train=500, num_test=100, seed=0)
    return lambda **kw: load_splits("cifar10", tmp_path, **kw)


@pytest.mark.parametrize("device", DEVICES)
def test_normalise_gives_zero_mean_unit_std_on_train(cifar_splits, device):
    splits = cifar_splits(device=device)
    assert isinstance(splits, DataSplits)
    assert (splits.num_classes, splits.in_channels, splits.input_size) == (10, 3, 32)
    train = splits.train
    assert train.images.dtype == torch.uint8 and train.images.device.type == device
    assert train.labels.dtype == torch.int64 and train.labels.device.type == device
    x = train.normalise(train.images, dtype=torch.float64)
    assert torch.allclose(x.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64, device=device), atol=1e-10)
    assert torch.allclose(x.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64, device=device))
    assert splits.test.mean == train.mean and splits.test.std == train.std
    assert train.normalise(train.images[:2]).dtype == torch.float32


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("augmented", [False, True])
def test_shuffled_batches_cover_every_example_once(device, augmented):
    n = 103
    ids = torch.arange(n, device=device)  # label = index, so the labels tell which examples a batch holds
    split = ImageData(_images(n=n).to(device), ids, n, (0.5,) * 3, (0.25,) * 3, "ids")
    g = torch.Generator(device).manual_seed(0)
    batches = list(split.batches(16, shuffle=True, augment=augmented, generator=g))
    assert [len(y) for _, y in batches] == [16] * 6 + [7]
    seen = torch.cat([y for _, y in batches])
    assert torch.equal(seen.sort().values, torch.arange(n, device=device))
    assert not torch.equal(seen, torch.arange(n, device=device))
    inputs, labels = batches[0]
    assert inputs.dtype == torch.float32 and inputs.shape == (16, 3, 8, 8) and inputs.device == labels.device
    if not augmented:
        assert torch.equal(inputs, split.normalise(split.images[labels]))
    again = [y for _, y in split.batches(16, shuffle=True, generator=torch.Generator(device).manual_seed(0))]
    assert torch.equal(torch.cat(again), seen)
    assert [len(y) for _, y in split.batches(16, drop_last=True)] == [16] * 6
    in_order = torch.cat([y for _, y in split.batches(50)])
    assert torch.equal(in_order, torch.arange(n, device=device))


def test_digits_loads_with_a_fixed_split():
    splits = load_splits("digits", seed=0)
    assert (len(splits.train), len(splits.test), splits.num_classes) == (1437, 360, 10)
    assert (splits.in_channels, splits.input_size, splits.val) == (1, 8, None)
    assert splits.train.images.dtype == torch.uint8 and splits.train.images.max() == 255
    other = load_splits("digits", seed=7)
    assert torch.equal(other.test.images, splits.test.images)  # the split does not follow the seed
    from sklearn.datasets import load_digits
    raw = load_digits()
    expected = [(bytes(np.rint(img * 255 / 16).astype(np.uint8)), int(y))
                for img, y in zip(raw.images, raw.target)]
    got = [(bytes(img.numpy()), int(y)) for split in (splits.train, splits.test)
           for img, y in zip(split.images, split.labels)]
    assert sorted(got) == sorted(expected)  # a partition of all 1797 (image, label) pairs
    x = splits.train.normalise(splits.train.images, torch.float64)
    assert abs(x.mean()) < 1e-10 and abs(x.std(unbiased=False) - 1) < 1e-10


def test_val_and_subsamples_are_seeded_and_disjoint(cifar_splits):
    def ids(split):  # the fake images carry pixel noise, so each one is unique
        return {bytes(img.numpy()) for img in split.images}
    full = cifar_splits()
    assert len(ids(full.train)) == 500
    splits = cifar_splits(val_size=100, num_subsamples=150, seed=1)
    assert (len(splits.train), len(splits.val), len(splits.test)) == (150, 100, 100)
    assert not ids(splits.train) & ids(splits.val)
    assert ids(splits.train) | ids(splits.val) <= ids(full.train)
    assert splits.train.mean == full.train.mean  # normalisation does not depend on the hold-out
    same = cifar_splits(val_size=100, num_subsamples=150, seed=1)
    other = cifar_splits(val_size=100, num_subsamples=150, seed=2)
    assert torch.equal(same.train.images, splits.train.images)
    assert torch.equal(same.val.images, splits.val.images)
    assert not torch.equal(other.val.images, splits.val.images)
    assert not torch.equal(other.train.images, splits.train.images)
    assert len(cifar_splits(num_subsamples=40).train) == 40


@pytest.mark.parametrize("kwargs", [dict(val_size=500), dict(val_size=-1), dict(num_subsamples=0),
                                    dict(val_size=400, num_subsamples=101)])
def test_bad_split_sizes_are_rejected(cifar_splits, kwargs):
    with pytest.raises(SuiteError, match="dataset.(val_size|num_subsamples)"):
        cifar_splits(**kwargs)


def test_unknown_dataset_is_rejected():
    with pytest.raises(SuiteError, match="dataset.name='mnist'"):
        load_splits("mnist")


def test_a_small_model_learns_the_fake_images(cifar_splits):
    """The fake classes are learnable: a linear model on 8x8-pooled images beats chance by far."""
    splits = cifar_splits()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.AvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(3 * 64, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(0)
    for _ in range(5):
        for x, y in splits.train.batches(100, shuffle=True, augment=True, generator=g):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
    with torch.no_grad():
        x, y = next(splits.test.batches(len(splits.test)))
        accuracy = (model(x).argmax(1) == y).float().mean().item()
    assert accuracy > 0.5, accuracy


def test_download_flag_leaves_verified_files_alone(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise AssertionError("the network was used although the files verify")
    monkeypatch.setattr(data.urllib.request, "urlopen", offline)
    write_fake_cifar(tmp_path, "cifar100", **SIZES)
    assert len(load_splits("cifar100", tmp_path, download=True).train) == SIZES["num_train"]
