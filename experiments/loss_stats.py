"""``analysis=loss_stats``: mini-batch loss / gradient / curvature statistics over training checkpoints.

    python -m experiments.run analysis=loss_stats dataset=digits model=mlp analysis.checkpoint_dir=outputs/<train run>
    python -m experiments.run analysis=loss_stats dataset=digits model=mlp     # initial weights only

For one checkpoint (``analysis.checkpoint``), a list (``analysis.checkpoints``) or every
``checkpoint-XXXXX.pt`` of a folder (``analysis.checkpoint_dir``, in epoch order), the statistics of
:mod:`curvature.stats` (the original package's compute_loss_stats) over the train split in batches of
``analysis.batch_size``, for ``operator.name`` (hessian | ggn), with one fixed random unit z (seeded).
Writes a table (one row per checkpoint) and a figure of each statistic over training.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from omegaconf import DictConfig

from curvature import plotting
from curvature.stats import STATISTICS, loss_statistics
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import build_network, load_data, validate_image_dataset, validate_model
from experiments.runtime import Run
from experiments.spectrum_network import validate_operator


def _checkpoints(cfg: DictConfig) -> list:
    one = V.get(cfg, "analysis.checkpoint", None)
    many = V.get(cfg, "analysis.checkpoints", None)
    folder = V.get(cfg, "analysis.checkpoint_dir", None)
    if sum(x is not None for x in (one, many, folder)) > 1:
        raise V.ConfigError("analysis.checkpoint", one, "give one of checkpoint, checkpoints, checkpoint_dir",
                            "analysis.checkpoint_dir=outputs/<train run>")
    if folder is not None:
        paths = sorted(Path(str(folder)).glob("checkpoint-[0-9]*.pt"))
        if not paths:
            raise V.ConfigError("analysis.checkpoint_dir", folder, "holds no checkpoint-XXXXX.pt",
                                "analysis.checkpoint_dir=outputs/<train run>")
        return [str(p) for p in paths]
    paths = [one] if one is not None else (many or [None])
    for p in paths:
        if p is not None and not Path(str(p)).is_file():
            raise V.ConfigError("analysis.checkpoints", p, "no such checkpoint file",
                                "analysis.checkpoints=[outputs/<run>/checkpoint-00010.pt]")
    return [None if p is None else str(p) for p in paths]


def validate(cfg: DictConfig) -> dict:
    return {"dataset": validate_image_dataset(cfg), "model": validate_model(cfg),
            "operator": validate_operator(cfg), "checkpoints": _checkpoints(cfg),
            "batch_size": V.positive_int(cfg, "analysis.batch_size", "analysis.batch_size=128")}


def _epoch(path) -> float:
    match = re.search(r"checkpoint-(\d+)\.pt$", str(path or ""))
    return float(match.group(1)) if match else float("nan")


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "loss_stats", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        if len(o["names"]) != 1:
            raise V.ConfigError("analysis.operators", o["names"], "loss_stats takes one operator", "operator=ggn")
        splits = load_data(s["dataset"], run.device, run.seed)
        batches = list(splits.train.batches(s["batch_size"], dtype=run.dtype))
        rows = []
        for path in s["checkpoints"]:
            model = build_network(s["model"], splits, run.device, run.dtype, path)
            V.parameter_names(model, o["params"])
            stats = loss_statistics(model, build_loss(o), batches, o["names"][0], o["bn_mode"], o["params"],
                                    seed=run.seed)
            rows.append({"checkpoint": path, "epoch": _epoch(path), **stats})
        if len(batches) < 2:  # a variance over mini-batches needs two of them; 0.0 would read as "no noise"
            for row in rows:
                row.update({key: float("nan") for key in STATISTICS if key.endswith("_variance")})
            note = (f"one mini-batch: analysis.batch_size={s['batch_size']} covers the whole train split, so the "
                    "variances (which need >= 2 batches) are reported as null; lower analysis.batch_size")
            run.note(note)
            print(f"note: {note}")
        run.table("loss_stats", rows)
        for key in STATISTICS:
            run.array(key, np.array([r[key] for r in rows]))
            run.metric(key, rows[-1][key])
        run.figure(_draw(rows, o["names"][0]), "loss_stats")
        return run.finish(checkpoints=s["checkpoints"], operator=o["names"][0])


def _draw(rows, operator):
    fig, axes = plotting.panel_grid(len(STATISTICS))
    x = [r["epoch"] for r in rows]
    if any(np.isnan(x)):
        x = list(range(len(rows)))
    for ax, key in zip(axes, STATISTICS):
        ax.plot(x, [r[key] for r in rows], marker="o")
        ax.set_title(key.replace("curvature", operator), fontsize=8)
        ax.set_xlabel("epoch")
    fig.tight_layout()
    return fig
