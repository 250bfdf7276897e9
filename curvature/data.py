"""Image datasets resident on the compute device: CIFAR-10, CIFAR-100 and scikit-learn's digits.

A split lives as ONE uint8 tensor ``(N, C, H, W)`` on the device; batches are cut from it by index,
and normalisation and the standard CIFAR augmentation (4-pixel zero-pad random crop, horizontal
flip) run vectorised on that device, seeded by a ``torch.Generator``. No PIL, no torchvision.

CIFAR is read from the official python-pickle archives (https://www.cs.toronto.edu/~kriz/cifar.html)
under ``data_dir`` and every file's md5 is checked against the official value. Test fixtures are
written in the same format by :func:`write_fake_cifar`, which adds a ``FAKE_CIFAR.json`` manifest;
when it is present the md5s listed there are checked instead, so a corrupt fixture is still caught.
Either way a batch is unpickled by a restricted unpickler that builds numpy arrays, lists, bytes and
numbers only (:class:`_CifarUnpickler`): no file can make the reader run code.

Command line (no Hydra)::

    python -m curvature.data download cifar10 [--data-dir DIR]
    python -m curvature.data fake cifar100 --data-dir DIR [--train N --test N --seed S]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
import tarfile
import tempfile
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from curvature.errors import DataError, SuiteError
from curvature.seeding import generator as seeded_generator

FAKE_MANIFEST = "FAKE_CIFAR.json"
_PIXELS = 3 * 32 * 32


@dataclass(frozen=True)
class _CifarSpec:
    title: str
    folder: str
    url: str
    archive_md5: str
    train_files: tuple[str, ...]
    test_file: str
    meta_file: str
    label_key: bytes
    num_classes: int
    file_md5: dict  # official md5 of each data file (the archive lists none for the meta file)


CIFAR = {
    "cifar10": _CifarSpec(
        "CIFAR-10", "cifar-10-batches-py", "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "c58f30108f718f92721af3b95e74349a", tuple(f"data_batch_{i}" for i in range(1, 6)),
        "test_batch", "batches.meta", b"labels", 10,
        {"data_batch_1": "c99cafc152244af753f735de768cd75f",
         "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
         "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
         "data_batch_4": "634d18415352ddfa80567beed471001a",
         "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
         "test_batch": "40351d587109b95175f43aff81a1287e"}),
    "cifar100": _CifarSpec(
        "CIFAR-100", "cifar-100-python", "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "eb9058c3a382ffc7106e4002c42a8d85", ("train",), "test", "meta", b"fine_labels", 100,
        {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"}),
}
DATASETS = (*CIFAR, "digits")
CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/deep-curvature-suite/data``, with ``~/.cache`` when the variable is unset."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "deep-curvature-suite" / "data"


def _spec(which: str) -> _CifarSpec:
    if which not in CIFAR:
        raise SuiteError(f"dataset.name={which!r} is not a CIFAR dataset; choose one of {sorted(CIFAR)}")
    return CIFAR[which]


def _md5(path: Path) -> str:
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fix(which: str, data_dir: Path) -> str:
    return f"`python -m curvature.data download {which} --data-dir {data_dir}` (or set dataset.download=true)"


# ---------------------------------------------------------------------------------------- reading
def _expected_md5s(which: str, folder: Path) -> dict:
    manifest = folder / FAKE_MANIFEST
    if not manifest.exists():
        return CIFAR[which].file_md5
    try:
        return dict(json.loads(manifest.read_text())["md5"])
    except (ValueError, KeyError, TypeError) as err:
        raise DataError(f"{manifest} is not a valid fake-data manifest ({err}); rewrite it with "
                        f"`python -m curvature.data fake {which} --data-dir {folder.parent}`") from None


def verify_cifar(which: str, data_dir) -> Path:
    """Check that every file is present with the right md5; returns the dataset folder."""
    spec, data_dir = _spec(which), Path(data_dir).expanduser()
    folder = data_dir / spec.folder
    for name in (*spec.train_files, spec.test_file, spec.meta_file):
        if not (folder / name).is_file():
            raise DataError(f"{spec.title} not found in data_dir={data_dir} (missing {folder / name}); "
                            f"download it with {_fix(which, data_dir)}")
    for name, expected in _expected_md5s(which, folder).items():
        if not (folder / name).is_file():
            raise DataError(f"{folder / name} is listed in {folder / FAKE_MANIFEST} but missing; rewrite the "
                            f"fake data with `python -m curvature.data fake {which} --data-dir {data_dir}`")
        actual = _md5(folder / name)
        if actual != expected:
            raise DataError(f"{folder / name} is corrupt (md5 {actual}, expected {expected}); delete "
                            f"{folder} and re-download with {_fix(which, data_dir)}")
    return folder


class _Refused(pickle.UnpicklingError):
    """A pickle asked for something a CIFAR batch never holds."""


def _latin1(text, encoding):
    """``_codecs.encode`` as Python 3's protocol-2 pickles use it for bytes, and for nothing else."""
    if not isinstance(text, str) or encoding != "latin1":
        raise _Refused("it asks for _codecs.encode other than for bytes")
    return text.encode("latin1")


_multiarray = (getattr(np, "_core", None) or np.core).multiarray
#: Everything a CIFAR python-format batch asks for: numpy's array reconstruction (under numpy 1's and
#: numpy 2's module names), the array and dtype types, numpy scalars, and bytes as Python 3 writes them.
_CIFAR_GLOBALS = {("numpy.core.multiarray", "_reconstruct"): _multiarray._reconstruct,
                  ("numpy._core.multiarray", "_reconstruct"): _multiarray._reconstruct,
                  ("numpy.core.multiarray", "scalar"): _multiarray.scalar,
                  ("numpy._core.multiarray", "scalar"): _multiarray.scalar,
                  ("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                  ("_codecs", "encode"): _latin1}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that builds dicts, lists, bytes, numbers and numpy arrays only: a file that asks
    for any other global (a function to call, a class to build) is refused before anything runs, so
    a planted batch cannot run code whatever the md5 guard or a FAKE_CIFAR.json manifest says."""

    def find_class(self, module, name):
        found = _CIFAR_GLOBALS.get((module, name))
        if found is None:
            raise _Refused(f"it asks for {module}.{name}")
        return found


def load_cifar_pickle(path: Path):
    """One file of the CIFAR python-format archive, read with :class:`_CifarUnpickler`."""
    with open(path, "rb") as f:
        return _CifarUnpickler(f, encoding="bytes").load()


def _read_batch(path: Path, spec: _CifarSpec, fix: str) -> tuple[np.ndarray, np.ndarray]:
    try:
        batch = load_cifar_pickle(path)
        data, labels = batch[b"data"], batch[spec.label_key]
    except _Refused as err:
        raise DataError(f"{path} is not a {spec.title} batch this suite can read safely ({err}; a batch holds "
                        f"only arrays, lists and bytes); delete it and re-download with {fix}") from None
    except Exception as err:  # any unpickling failure means the same thing to the user
        raise DataError(f"{path} is not a {spec.title} batch ({type(err).__name__}: {err}); "
                        f"re-download with {fix}") from None
    data, labels = np.asarray(data), np.asarray(labels)
    if labels.size == 0:  # an empty list reads as float64
        labels = labels.astype(np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise DataError(f"{path}: data has shape {data.shape} and dtype {data.dtype}, expected N x {_PIXELS} "
                        f"uint8; the file is not in {spec.title} format, re-download with {fix}")
    if labels.shape != (len(data),) or not np.issubdtype(labels.dtype, np.integer):
        raise DataError(f"{path}: {spec.label_key.decode()} has shape {labels.shape}, expected "
                        f"({len(data)},) integers; the file is not in {spec.title} format, "
                        f"re-download with {fix}")
    if labels.size and (labels.min() < 0 or labels.max() >= spec.num_classes):
        raise DataError(f"{path}: labels span [{labels.min()}, {labels.max()}], outside "
                        f"[0, {spec.num_classes}); the file is not {spec.title}, re-download with {fix}")
    # Rows are channel-major (1024 red, 1024 green, 1024 blue), each plane 32x32 row-major.
    return data.reshape(-1, 3, 32, 32), labels.astype(np.int64)


def read_cifar(which: str, data_dir) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(train_x, train_y, test_x, test_y)``: images uint8 ``(N, 3, 32, 32)``, labels int64 ``(N,)``."""
    spec, data_dir = _spec(which), Path(data_dir).expanduser()
    folder, fix = verify_cifar(which, data_dir), _fix(which, data_dir)
    train = [_read_batch(folder / name, spec, fix) for name in spec.train_files]
    test_x, test_y = _read_batch(folder / spec.test_file, spec, fix)
    return (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train]), test_x, test_y)


# -------------------------------------------------------------------------------------- download
def _safe_extract(archive: Path, target: Path) -> None:
    """Extract regular files and folders only; reject links, devices and paths leaving ``target``."""
    root = target.resolve()
    with tarfile.open(archive, "r:gz") as tar:
        members = tar.getmembers()
        for member in members:
            dest = (root / member.name).resolve()
            if not (member.isfile() or member.isdir()) or not dest.is_relative_to(root):
                raise DataError(f"{archive} holds an unsafe entry {member.name!r}; refusing to extract it")
        # The "data" filter (Python >= 3.11.4) repeats these checks and also drops odd permissions.
        extra = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
        tar.extractall(root, members=members, **extra)


def download_cifar(which: str, data_dir=None, *, force: bool = False, url: str | None = None,
                   md5: str | None = None) -> Path:
    """Fetch, verify and unpack the official archive into ``data_dir``; returns the dataset folder.

    Nothing is downloaded when the folder already verifies (unless ``force``). The archive goes to a
    temporary file and is unpacked in a temporary folder next to the target, which is renamed into
    place only after every md5 checks out, so an interrupted download never leaves a half folder.
    ``url``/``md5`` override the official ones (tests use a local ``file://`` archive).
    """
    spec = _spec(which)
    data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
    if not force:
        try:
            return verify_cifar(which, data_dir)
        except DataError:
            pass
    url, md5 = url or spec.url, md5 or spec.archive_md5
    data_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=data_dir, prefix=f".{which}-download-") as tmp:
        archive, digest = Path(tmp) / "archive.tar.gz", hashlib.md5()
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(archive, "wb") as out:
                for block in iter(lambda: response.read(1 << 20), b""):
                    digest.update(block)
                    out.write(block)
        except OSError as err:
            raise DataError(f"could not download {url} ({err}); check the network, or fetch it by hand "
                            f"and unpack it into data_dir={data_dir}") from None
        if digest.hexdigest() != md5:
            raise DataError(f"the archive downloaded from {url} is corrupt (md5 {digest.hexdigest()}, "
                            f"expected {md5}); re-download with {_fix(which, data_dir)}")
        unpacked = Path(tmp) / "unpacked"
        unpacked.mkdir()
        _safe_extract(archive, unpacked)
        try:
            verify_cifar(which, unpacked)
        except DataError as err:
            raise DataError(f"the archive from {url} does not hold a valid {spec.title}: {err}") from None
        folder = data_dir / spec.folder
        if folder.exists():  # a corrupt or partial copy: move it aside first, then swap atomically
            old = Path(tmp) / "old"
            os.replace(folder, old)
        os.replace(unpacked / spec.folder, folder)
    return folder


# ------------------------------------------------------------------------------------- fake data
def fake_cifar_arrays(which: str = "cifar10", num_train: int = 100, num_test: int = 50, seed: int = 0):
    """The arrays :func:`write_fake_cifar` writes: ``(train_x, train_y, test_x, test_y)`` as from read_cifar.

    Each class has its own colour and stripe orientation/frequency, plus pixel noise, so a small
    network learns it well above chance; every class appears when there are enough images.
    """
    num_classes = _spec(which).num_classes
    rng = np.random.default_rng(seeded_generator(seed, f"data.fake_{which}").initial_seed())
    colour = rng.uniform(50, 205, size=(num_classes, 3, 1, 1))
    angle = rng.uniform(0, np.pi, size=num_classes)
    freq = rng.uniform(0.2, 0.8, size=num_classes)
    yy, xx = np.meshgrid(np.arange(32), np.arange(32), indexing="ij")

    def draw(n: int):
        labels = rng.permutation(np.arange(n) % num_classes).astype(np.int64)
        phase = (np.cos(angle[labels])[:, None, None] * xx + np.sin(angle[labels])[:, None, None] * yy)
        stripes = 40 * np.sin(freq[labels][:, None, None] * phase)[:, None]
        pixels = colour[labels] + stripes + rng.normal(0, 20, size=(n, 3, 32, 32))
        return np.clip(np.rint(pixels), 0, 255).astype(np.uint8), labels

    train_x, train_y = draw(num_train)
    test_x, test_y = draw(num_test)
    return train_x, train_y, test_x, test_y


def _dump(path: Path, obj: dict) -> None:
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)  # the protocol of the official (Python 2) pickles


def write_fake_cifar(root, which: str = "cifar10", num_train: int = 100, num_test: int = 50,
                     seed: int = 0) -> Path:
    """Write a small CIFAR in the exact official layout under ``root``, plus a FAKE_CIFAR.json manifest.

    Same folder and file names, pickle keys and dtypes as the real archive (CIFAR-10: five training
    batches); the images are :func:`fake_cifar_arrays`. Returns the dataset folder.
    """
    spec = _spec(which)
    folder = Path(root).expanduser() / spec.folder
    folder.mkdir(parents=True, exist_ok=True)
    train_x, train_y, test_x, test_y = fake_cifar_arrays(which, num_train, num_test, seed)

    def batch(x, y, label: str, offset: int = 0) -> dict:
        out = {b"batch_label": label.encode(), b"data": x.reshape(len(x), _PIXELS),
               b"filenames": [f"fake_{offset + i:06d}.png".encode() for i in range(len(x))]}
        if which == "cifar10":
            out[b"labels"] = y.tolist()
        else:
            out[b"fine_labels"], out[b"coarse_labels"] = y.tolist(), (y // 5).tolist()
        return out

    chunks = np.array_split(np.arange(num_train), len(spec.train_files))
    for i, (name, idx) in enumerate(zip(spec.train_files, chunks), start=1):
        label = f"training batch {i} of {len(spec.train_files)}"
        _dump(folder / name, batch(train_x[idx], train_y[idx], label, int(idx[0]) if len(idx) else 0))
    _dump(folder / spec.test_file, batch(test_x, test_y, "testing batch 1 of 1"))
    if which == "cifar10":
        meta = {b"num_cases_per_batch": len(chunks[0]), b"label_names": [c.encode() for c in CIFAR10_CLASSES],
                b"num_vis": _PIXELS}
    else:
        meta = {b"fine_label_names": [f"fine_{c:02d}".encode() for c in range(100)],
                b"coarse_label_names": [f"coarse_{c:02d}".encode() for c in range(20)]}
    _dump(folder / spec.meta_file, meta)
    names = (*spec.train_files, spec.test_file, spec.meta_file)
    manifest = {"dataset": which, "fake": True, "num_train": num_train, "num_test": num_test, "seed": seed,
                "md5": {name: _md5(folder / name) for name in names}}
    (folder / FAKE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    return folder


# ------------------------------------------------------------------------------- device tensors
def augment(images: torch.Tensor, generator: torch.Generator, padding: int = 4) -> torch.Tensor:
    """Random crop of the zero-padded image and horizontal flip (p = 1/2), one gather for the batch.

    ``images`` uint8 ``(N, C, H, W)``; output has the same dtype, shape and device. Offsets and flips
    are drawn on the generator's device, so the same seed gives the same batch on any device.
    """
    n, c, h, w = images.shape
    padded = images.new_zeros(n, c, h + 2 * padding, w + 2 * padding)
    padded[:, :, padding:padding + h, padding:padding + w] = images
    draw = dict(generator=generator, device=generator.device)
    dy = torch.randint(0, 2 * padding + 1, (n,), **draw).to(images.device)
    dx = torch.randint(0, 2 * padding + 1, (n,), **draw).to(images.device)
    flip = torch.randint(0, 2, (n,), **draw).to(images.device, torch.bool)
    rows = dy[:, None] + torch.arange(h, device=images.device)
    # Flipping the crop is reading its columns backwards: fold it into the same gather.
    cols = dx[:, None] + torch.where(flip[:, None], torch.arange(w - 1, -1, -1, device=images.device),
                                     torch.arange(w, device=images.device))
    batch = torch.arange(n, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]


_augment = augment  # ImageData.batches has an argument of the same name


def _channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Exact per-channel mean and std (population) in [0, 1] units, from a histogram of the uint8 values."""
    values = torch.arange(256, dtype=torch.float64) / 255
    means, stds = [], []
    for ch in range(images.shape[1]):
        counts = torch.bincount(images[:, ch].reshape(-1), minlength=256).cpu().double()
        mean = (counts * values).sum() / counts.sum()
        means.append(float(mean))
        stds.append(float(((counts * (values - mean) ** 2).sum() / counts.sum()).sqrt()))
    return tuple(means), tuple(stds)


@dataclass
class ImageData:
    """One split resident on a device: uint8 images ``(N, C, H, W)`` and int64 labels ``(N,)``.

    ``mean``/``std`` are per-channel statistics of the full official TRAIN split in [0, 1] units, shared
    by every split (and by any val hold-out or subsample) so a model sees identical inputs whichever
    subset a later run loads.
    """

    images: torch.Tensor
    labels: torch.Tensor
    num_classes: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str
    _constants: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def __len__(self) -> int:
        return self.images.shape[0]

    def subset(self, indices: torch.Tensor) -> "ImageData":
        indices = torch.as_tensor(indices, device=self.images.device)
        return ImageData(self.images[indices], self.labels[indices], self.num_classes, self.mean,
                         self.std, self.name)

    def normalise(self, images_uint8: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
        """``(x / 255 - mean) / std`` per channel, in ``dtype`` on the images' device."""
        key = (dtype, images_uint8.device)
        if key not in self._constants:  # built once: a host-to-device copy per batch would stall the GPU
            self._constants[key] = tuple(torch.tensor(v, dtype=dtype, device=key[1]).view(1, -1, 1, 1)
                                         for v in (self.mean, self.std))
        mean, std = self._constants[key]
        return (images_uint8.to(dtype) / 255 - mean) / std

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, dtype=torch.float32, drop_last: bool = False):
        """Yield ``(inputs, labels)``: normalised ``dtype`` inputs on the device, one pass over the split.

        The last partial batch is kept unless ``drop_last``. Without a ``generator``, shuffling and
        augmentation draw from one seeded from torch's default generator (so ``torch.manual_seed`` holds).
        """
        device = self.images.device
        if generator is None and (shuffle or augment):
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,))))
        for idx in batch_indices(len(self), batch_size, shuffle, generator, device, drop_last):
            images = self.images[idx]
            if augment:
                images = _augment(images, generator)
            yield self.normalise(images, dtype), self.labels[idx]


def batch_indices(n: int, batch_size: int, shuffle: bool, generator: torch.Generator | None,
                  device: torch.device, drop_last: bool = False):
    """Index tensors of one pass over ``n`` samples in batches (a ``generator`` permutation when shuffling)."""
    if int(batch_size) != batch_size or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size}")
    if shuffle:
        order = torch.randperm(n, generator=generator, device=generator.device).to(device)
    else:
        order = torch.arange(n, device=device)
    stop = n - n % batch_size if drop_last else n
    for start in range(0, stop, batch_size):
        yield order[start:start + batch_size]


@dataclass
class DataSplits:
    """Train and test splits of one dataset, and an optional validation split held out of train."""

    train: ImageData
    test: ImageData
    val: ImageData | None = None

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def in_channels(self) -> int:
        return self.train.images.shape[1]

    @property
    def input_size(self) -> int:
        return self.train.images.shape[2]


DIGITS_TRAIN, DIGITS_SPLIT_SEED = 1437, 1797  # fixed split, independent of the user seed


def read_digits() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """scikit-learn's 8x8 digits as uint8 ``(N, 1, 8, 8)`` (``rint(v * 255 / 16)``), fixed 1437/360 split."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DataError("dataset digits needs scikit-learn, which is not installed; "
                        "install it with `pip install scikit-learn`") from None
    digits = load_digits()
    images = np.rint(digits.images * (255 / 16)).astype(np.uint8)[:, None]
    labels = digits.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(images))
    train, test = order[:DIGITS_TRAIN], order[DIGITS_TRAIN:]
    return images[train], labels[train], images[test], labels[test]


def load_splits(name: str, data_dir=None, device="cpu", download: bool = False, val_size: int = 0,
                num_subsamples: int | None = None, seed: int = 0) -> DataSplits:
    """Load a dataset onto ``device``; ``name`` in {cifar10, cifar100, digits}.

    ``val_size`` train images are held out as the val split and ``num_subsamples`` (None: all) of the
    remaining train images are kept, each drawn from its own stream of ``seed``: the two never overlap.
    """
    if name == "digits":
        train_x, train_y, test_x, test_y = read_digits()
        num_classes = 10
    elif name in CIFAR:
        data_dir = Path(data_dir).expanduser() if data_dir is not None else default_data_dir()
        if download:  # fetches only when the files are missing or fail their md5
            download_cifar(name, data_dir)
        train_x, train_y, test_x, test_y = read_cifar(name, data_dir)
        num_classes = CIFAR[name].num_classes
    else:
        raise SuiteError(f"dataset.name={name!r} is not an image dataset; choose one of {list(DATASETS)}")
    train_images = torch.from_numpy(train_x).to(device)
    mean, std = _channel_stats(train_images)

    def split(x, y):
        return ImageData(x, torch.from_numpy(y).to(device), num_classes, mean, std, name)

    train, test = split(train_images, train_y), split(torch.from_numpy(test_x).to(device), test_y)
    train, val = holdout_and_subsample(train, val_size, num_subsamples, seed, name, device)
    return DataSplits(train, test, val)


def holdout_and_subsample(train, val_size: int, num_subsamples, seed: int, what: str, device):
    """``(train, val)``: ``val_size`` seeded samples held out of ``train``, then a seeded subset of the rest."""
    val = None
    if not 0 <= val_size < len(train):
        raise SuiteError(f"dataset.val_size={val_size} must lie in [0, {len(train)}) for {what}")
    if val_size:
        order = torch.randperm(len(train), generator=seeded_generator(seed, "data.val_split")).to(device)
        train, val = train.subset(order[val_size:]), train.subset(order[:val_size])
    if num_subsamples is not None:
        if not 0 < num_subsamples <= len(train):
            raise SuiteError(f"dataset.num_subsamples={num_subsamples} must lie in [1, {len(train)}] for "
                             f"{what} with val_size={val_size}")
        keep = torch.randperm(len(train), generator=seeded_generator(seed, "data.subsample"))[:num_subsamples]
        train = train.subset(keep.to(device))
    return train, val


# ------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m curvature.data", description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    get = commands.add_parser("download", help="download, verify and unpack the official archive")
    get.add_argument("dataset", choices=sorted(CIFAR))
    get.add_argument("--data-dir", default=None, help=f"default: {default_data_dir()}")
    get.add_argument("--force", action="store_true", help="download even if the files verify")
    fake = commands.add_parser("fake", help="write a small fake dataset in the official format")
    fake.add_argument("dataset", choices=sorted(CIFAR))
    fake.add_argument("--data-dir", required=True)
    fake.add_argument("--train", type=int, default=100)
    fake.add_argument("--test", type=int, default=50)
    fake.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        if args.command == "download":
            folder = download_cifar(args.dataset, args.data_dir, force=args.force)
        else:
            folder = write_fake_cifar(args.data_dir, args.dataset, args.train, args.test, args.seed)
    except SuiteError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
