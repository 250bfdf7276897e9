"""Character-level text for a small language model: any UTF-8 file, or Python's own source as a corpus.

The text is cut into non-overlapping windows of ``context + 1`` characters; a window's first
``context`` token ids are the inputs and its last ``context`` the targets (the next character at
every position). Windows, not characters, are split into train and test by a permutation drawn from
``split_seed``: both splits then sample every part of the corpus (a contiguous cut would test on the
last files only, a different style of code), and no character is in two windows, so no test target
is ever a training input. The split is independent of the run's ``seed``, like the digits split.

The default corpus is a fixed, ordered list of CPython standard-library modules read from
``sysconfig.get_paths()["stdlib"]``: real text on every machine with Python, no download. Files are
read as bytes and decoded as UTF-8 with no newline translation, so :attr:`TextSplits.source`'s
``sha256`` is that of the files concatenated (``cat <files> | sha256sum``); it differs between
Python versions, which is why it is recorded.
"""

from __future__ import annotations

import hashlib
import platform
import sysconfig
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from curvature.data import batch_indices, holdout_and_subsample
from curvature.errors import DataError, SuiteError
from curvature.seeding import generator as seeded_generator

# Plain modules (not packages) of every CPython from 3.8 on: ~0.7 MB of code, comments and docstrings.
DEFAULT_CORPUS = ("argparse.py", "difflib.py", "functools.py", "inspect.py", "pickle.py", "random.py",
                  "shutil.py", "textwrap.py", "threading.py", "typing.py")


def default_corpus_files() -> list[Path]:
    """The default corpus's files, in reading order, under this interpreter's standard library."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return [root / name for name in DEFAULT_CORPUS]


def read_text(paths: Sequence[Path]) -> str:
    """The files' UTF-8 text, concatenated in order; a missing, unreadable or non-UTF-8 file is a DataError."""
    pieces = []
    for path in map(Path, paths):
        try:
            raw = path.read_bytes()
        except OSError as error:
            reason = error.strerror or type(error).__name__
            raise DataError(f"text file {path} cannot be read ({reason}); set dataset.path to a readable "
                            f"UTF-8 text file") from None
        try:
            pieces.append(raw.decode("utf-8"))
        except UnicodeDecodeError as error:
            raise DataError(f"text file {path} is not UTF-8 (byte {error.start} is {raw[error.start]:#04x}); "
                            f"convert it (iconv -t UTF-8) or set dataset.path to a UTF-8 file") from None
    return "".join(pieces)


@dataclass
class TextData:
    """One split on a device: int64 token ids, ``inputs`` ``(N, T)`` and next-character ``targets`` ``(N, T)``.

    ``vocabulary[i]`` is the character of token id ``i``. The batch interface is ``ImageData``'s, so
    the training loop and the curvature operators take either.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    vocabulary: str
    name: str = "text"

    @property
    def num_classes(self) -> int:
        return len(self.vocabulary)

    def __len__(self) -> int:
        return self.inputs.shape[0]

    def subset(self, indices: torch.Tensor) -> "TextData":
        indices = torch.as_tensor(indices, device=self.inputs.device)
        return TextData(self.inputs[indices], self.targets[indices], self.vocabulary, self.name)

    def decode(self, ids: torch.Tensor) -> str:
        return "".join(self.vocabulary[i] for i in ids.reshape(-1).tolist())

    def batches(self, batch_size: int, shuffle: bool = False, augment: bool = False,
                generator: torch.Generator | None = None, dtype=torch.float32, drop_last: bool = False):
        """Yield ``(inputs, targets)``, both int64 whatever ``dtype`` (the model embeds the ids in its own
        dtype); shuffling as ``ImageData.batches``. Text has no augmentation."""
        if augment:
            raise ValueError("text has no augmentation; set dataset.augment=false")
        device = self.inputs.device
        if generator is None and shuffle:
            generator = torch.Generator(device=device).manual_seed(int(torch.randint(2**62, (1,))))
        for idx in batch_indices(len(self), batch_size, shuffle, generator, device, drop_last):
            yield self.inputs[idx], self.targets[idx]


def unigram_entropy(data: TextData) -> float:
    """Entropy in nats of the targets' character frequencies: the loss of the best prediction that
    ignores the context, a floor any model reading the context must get below."""
    counts = torch.bincount(data.targets.reshape(-1), minlength=data.num_classes).double()
    p = counts[counts > 0] / counts.sum()
    return float(-(p * p.log()).sum())


@dataclass
class TextSplits:
    """Train and test windows of one text, an optional val split held out of train, and what was read.

    ``source``: ``files`` (in order), ``sha256`` of their concatenated bytes, ``num_characters``,
    ``num_windows``, ``default_corpus`` and, for the default corpus, ``python`` (its version).
    """

    train: TextData
    test: TextData
    val: Optional[TextData]
    context: int
    source: dict

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def vocabulary(self) -> str:
        return self.train.vocabulary

    @property
    def in_channels(self) -> int:
        return 1  # one token id per position

    @property
    def input_size(self) -> int:
        return self.context


def load_text(path=None, context: int = 32, test_fraction: float = 0.1, split_seed: int = 0, device="cpu",
              val_size: int = 0, num_subsamples: int | None = None, seed: int = 0) -> TextSplits:
    """The windows of the UTF-8 file ``path`` (None: :data:`DEFAULT_CORPUS`) on ``device``.

    ``val_size`` and ``num_subsamples`` act on the train windows as in ``curvature.data.load_splits``
    (same named streams of ``seed``).
    """
    if int(context) != context or context < 1:
        raise SuiteError(f"dataset.context={context!r} must be a positive integer")
    if not 0 < test_fraction < 1:
        raise SuiteError(f"dataset.test_fraction={test_fraction!r} must lie strictly between 0 and 1")
    files = default_corpus_files() if path is None else [Path(path).expanduser()]
    text = read_text(files)
    codes = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    alphabet, ids = np.unique(codes, return_inverse=True)  # sorted by code point, as sorted(set(text))
    width = context + 1
    num_windows = len(ids) // width
    test_count = max(1, round(test_fraction * num_windows))
    if num_windows - test_count < 1:
        what = f"text file {files[0]}" if path is not None else "the default corpus"
        raise DataError(f"{what} holds {len(text)} characters, too few for one train and one test window "
                        f"of {width}; give a longer text or a smaller dataset.context")
    windows = torch.from_numpy(ids[:num_windows * width].astype(np.int64).reshape(num_windows, width))
    order = torch.randperm(num_windows, generator=seeded_generator(split_seed, "text.split"))
    vocabulary = "".join(map(chr, alphabet))

    def split(rows: torch.Tensor) -> TextData:
        chosen = windows[rows.sort().values].to(device)  # in text order within a split
        return TextData(chosen[:, :-1], chosen[:, 1:], vocabulary)

    train, test = split(order[test_count:]), split(order[:test_count])
    train, val = holdout_and_subsample(train, val_size, num_subsamples, seed, "this text", device)
    source = {"files": [str(f) for f in files], "sha256": hashlib.sha256(text.encode("utf-8")).hexdigest(),
              "num_characters": len(text), "num_windows": num_windows, "default_corpus": path is None}
    if path is None:
        source["python"] = platform.python_version()
    return TextSplits(train, test, val, int(context), source)
