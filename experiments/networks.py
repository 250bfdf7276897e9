"""What every network analysis shares: the image (or text) dataset, the model, an optional checkpoint.

``dataset.fake=true`` runs a CIFAR preset on small fake files in the official format (written once
into ``dataset.data_dir``, default ``<cache>/fake-<name>-<train>-<test>``): the CPU smoke variant of
the paper's GPU presets, on the same code paths. ``dataset=text`` (windows of characters,
:mod:`curvature.text`) goes with a language model (``model=gpt_tiny`` or a ``_target_``) in the
analyses that pass ``allow_text=True``.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import torch
from omegaconf import DictConfig

from curvature.data import DataSplits, default_data_dir, load_splits, verify_cifar, write_fake_cifar
from curvature.errors import DataError
from curvature.models import MODELS, build_model
from curvature.text import TextSplits, load_text
from curvature.training import load_checkpoint
from experiments import validate as V

IMAGE_DATASETS = ("cifar10", "cifar100", "digits")
LANGUAGE_MODELS = ("gpt_tiny",)


def validate_image_dataset(cfg: DictConfig, allow_text: bool = False) -> dict:
    """The dataset settings; ``allow_text``: the analysis also takes ``dataset=text``."""
    name = V.get(cfg, "dataset.name")
    if name == "text" and allow_text:
        return validate_text_dataset(cfg)
    if name not in IMAGE_DATASETS:
        accepted = IMAGE_DATASETS + (("text",) if allow_text else ())
        raise V.ConfigError("dataset", name, f"this analysis needs an image dataset: {', '.join(accepted)}",
                            "dataset=digits")
    num = V.get(cfg, "dataset.num_subsamples", None)
    if num is not None:
        num = V.positive_int(cfg, "dataset.num_subsamples", "dataset.num_subsamples=5000")
    fake = V.get(cfg, "dataset.fake", False)
    if fake is not False:
        fake = V.boolean(cfg, "dataset.fake")
        if fake and name == "digits":
            raise V.ConfigError("dataset.fake", fake, "digits is real data that ships with scikit-learn",
                                "dataset.fake=false")
    settings = {"name": name, "data_dir": V.get(cfg, "dataset.data_dir", None),
                "download": V.boolean(cfg, "dataset.download"),
                "val_size": V.integer(cfg, "dataset.val_size", minimum=0, example="dataset.val_size=0"),
                "num_subsamples": num, "augment": V.boolean(cfg, "dataset.augment"), "fake": fake}
    if fake:
        settings["fake_train"] = V.positive_int(cfg, "dataset.fake_train", "dataset.fake_train=512")
        settings["fake_test"] = V.positive_int(cfg, "dataset.fake_test", "dataset.fake_test=256")
    return settings


def validate_text_dataset(cfg: DictConfig) -> dict:
    path = V.get(cfg, "dataset.path", None)
    if path is not None and not isinstance(path, str):
        raise V.ConfigError("dataset.path", path, "must be the path of a UTF-8 text file, or null for the "
                            "default corpus", "dataset.path=notes.txt")
    if V.boolean(cfg, "dataset.augment"):
        raise V.ConfigError("dataset.augment", True, "text has no augmentation", "dataset.augment=false")
    num = V.get(cfg, "dataset.num_subsamples", None)
    return {"name": "text", "kind": "text", "path": path, "augment": False,
            "context": V.positive_int(cfg, "dataset.context", "dataset.context=32"),
            "test_fraction": V.number(cfg, "dataset.test_fraction", 0, 1, strict_minimum=True,
                                      example="dataset.test_fraction=0.1"),
            "split_seed": V.integer(cfg, "dataset.split_seed", minimum=0, example="dataset.split_seed=0"),
            "val_size": V.integer(cfg, "dataset.val_size", minimum=0, example="dataset.val_size=0"),
            "num_subsamples": None if num is None else
            V.positive_int(cfg, "dataset.num_subsamples", "dataset.num_subsamples=5000")}


def validate_model(cfg: DictConfig) -> dict:
    model = V.get(cfg, "model", None)
    if not isinstance(model, dict) or not model.get("name"):
        raise V.ConfigError("model", model, "choose a network", "model=cnn")
    text, name = V.get(cfg, "dataset.name", None) == "text", model["name"]
    if name in LANGUAGE_MODELS and not text:
        raise V.ConfigError("model", name, "a language model reads token ids: it needs dataset=text",
                            "dataset=text")
    if text and name in MODELS and name not in LANGUAGE_MODELS:
        raise V.ConfigError("model", name, f"dataset=text needs a language model: {', '.join(LANGUAGE_MODELS)}, "
                            "or model._target_ of one taking (N, T) token ids", "model=gpt_tiny")
    if "width" in model:
        V.positive_number(cfg, "model.width", "model.width=0.25")
    return model


def load_data(d: dict, device: torch.device, seed: int) -> DataSplits | TextSplits:
    """The splits of a validated dataset, writing the fake CIFAR files first when asked for."""
    if d.get("kind") == "text":
        return load_text(d["path"], d["context"], d["test_fraction"], d["split_seed"], device=device,
                         val_size=d["val_size"], num_subsamples=d["num_subsamples"], seed=seed)
    data_dir = d["data_dir"]
    if d.get("fake"):
        data_dir = Path(data_dir) if data_dir else \
            default_data_dir() / f"fake-{d['name']}-{d['fake_train']}-{d['fake_test']}"
        try:
            verify_cifar(d["name"], data_dir)
        except DataError:
            write_fake_cifar(data_dir, d["name"], num_train=d["fake_train"], num_test=d["fake_test"], seed=0)
    return load_splits(d["name"], data_dir, device=device, download=d["download"], val_size=d["val_size"],
                       num_subsamples=d["num_subsamples"], seed=seed)


def build_network(model_cfg: dict, splits: DataSplits | TextSplits, device: torch.device, dtype: torch.dtype,
                  checkpoint: Optional[str] = None) -> torch.nn.Module:
    """The model for the dataset's shape, with a checkpoint's weights when one is given."""
    model = build_model(model_cfg, splits.num_classes, splits.in_channels, splits.input_size)
    model = model.to(device=device, dtype=dtype)
    if checkpoint:  # read safely, refused when it holds NaN/Inf or does not fit (curvature.training)
        load_checkpoint(checkpoint, model, map_location=device)
        model.to(dtype=dtype)
    return model


def checkpoint_path(cfg: DictConfig, key: str) -> Optional[str]:
    """A checkpoint path from the config (None allowed); a missing file is a one-line error."""
    path = V.get(cfg, key, None)
    if path is not None and not Path(str(path)).is_file():
        raise V.ConfigError(key, path, "no such checkpoint file",
                            f"{key}=outputs/<run>/checkpoint-00010.pt")
    return None if path is None else str(path)


#: The checkpoints analysis=train writes every ``analysis.save_freq`` epochs (not checkpoint-swa.pt).
CHECKPOINT_FILE = re.compile(r"checkpoint-(\d+)\.pt")


def checkpoint_files(cfg: DictConfig, key: str) -> Optional[list[str]]:
    """A folder or a list of files and folders in ``key``: the checkpoint files it names, in order (a
    folder: its ``checkpoint-XXXXX.pt`` in epoch order; ``checkpoint-swa.pt`` only when named). None when
    ``key`` is null or one file. A missing entry, a folder without checkpoints or a file named twice is a
    one-line error naming it."""
    value = V.get(cfg, key, None)
    if value is None or (isinstance(value, str) and not Path(value).is_dir()):
        return None
    entries = value if isinstance(value, list) else [value]
    example = f"{key}=outputs/<train run>"
    if not entries:
        raise V.ConfigError(key, value, "an empty list names no checkpoint", example)
    paths: list[str] = []
    for entry in entries:
        path = Path(str(entry))
        if path.is_dir():
            found = [f for f in path.iterdir() if CHECKPOINT_FILE.fullmatch(f.name) and f.is_file()]
            if not found:
                what = "is empty" if not any(path.iterdir()) else "holds no checkpoint-XXXXX.pt"
                raise V.ConfigError(key, str(entry), f"the folder {what} (analysis=train writes one every "
                                    "analysis.save_freq epochs; name checkpoint-swa.pt as a file)", example)
            paths += [str(f) for f in sorted(found, key=lambda f: int(CHECKPOINT_FILE.fullmatch(f.name)[1]))]
        elif path.is_file():
            paths.append(str(path))
        else:
            raise V.ConfigError(key, str(entry), "no such checkpoint file or folder", example)
    twice = next((p for i, p in enumerate(paths) if Path(p).resolve() in {Path(q).resolve() for q in paths[:i]}),
                 None)
    if twice is not None:
        raise V.ConfigError(key, twice, "this checkpoint is named twice (a folder lists all of its own)", example)
    return paths


def require_trained(cfg: DictConfig, checkpoint: Optional[str],
                    why: str = "this preset is of a trained network") -> None:
    """Refuse initial weights when ``analysis.require_checkpoint`` is set (presets of trained networks)."""
    if checkpoint is None and V.get(cfg, "analysis.require_checkpoint", False):
        raise V.ConfigError("analysis.checkpoint", None, f"{why}: give the checkpoint written by analysis=train",
                            "analysis.checkpoint=outputs/<run>/checkpoint-00300.pt")
