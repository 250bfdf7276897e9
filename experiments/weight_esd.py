"""``analysis=weight_esd``: the WeightWatcher analyses of every Linear / Conv2d weight matrix.

For a model at initialisation, one checkpoint, or every ``checkpoint-XXXXX.pt`` of a folder (alpha
over training), each layer's ESD (eigenvalues of W^T W) gets a power-law fit (alpha, xmin, KS
distance), the norm metrics, a Marchenko-Pastur fit and soft rank and, with
``analysis.randomize=true``, the ESD of the element-shuffled matrix, ``rand_distance`` and the
correlation traps; see :mod:`curvature.weight_esd` for every formula and its source.

    python -m experiments.run experiment=train_digits analysis.save_freq=2   # 10 checkpoints, ~40 s CPU
    python -m experiments.run analysis=weight_esd dataset=digits model=cnn \\
        analysis.checkpoints_dir=outputs/<that run>                              # alpha over training
    python -m experiments.run analysis=weight_esd dataset=cifar10 model=vgg16    # VGG16 as initialised

Hardware: 2 CPU cores; about 10 s for the ten digits checkpoints (final epoch: alpha 2.05 for
features.2, 9.96 for fc, none for features.0, whose 9 eigenvalues are below min_evals) and 20 s for
VGG16 (no data is read: the dataset only fixes the input shape and the number of classes).

Writes ``weight_esd_layers.csv`` (one row per layer, or per slice, and per checkpoint), the
summary (means over layers) in ``results.json`` and W&B, ``esd_layers`` (each ESD on log-log axes
with its fit), ``correlation_flow`` (alpha per layer) and, for a folder, ``alpha_over_training``.
"""

from __future__ import annotations

import csv
import io
import math
import re
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
from matplotlib.ticker import LogFormatter
from omegaconf import DictConfig

from curvature import plotting
from curvature.data import CIFAR
from curvature.errors import SuiteError
from curvature.io import write_bytes_atomic
from curvature.models import build_model
from curvature.training import load_checkpoint
from curvature.weight_esd import (CONV2D_MODES, ESDSettings, LayerAnalysis, analyze_model, power_law_density,
                                  summarize)
from experiments import validate as V
from experiments.runtime import Run
from experiments.networks import IMAGE_DATASETS, checkpoint_path, validate_model

CSV_NAME = "weight_esd_layers.csv"
CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)\.pt$")


def dataset_shape(name: str) -> tuple[int, int, int]:
    """``(num_classes, in_channels, input_size)`` of an image dataset, without loading it."""
    return (10, 1, 8) if name == "digits" else (CIFAR[name].num_classes, 3, 32)


def checkpoint_files(folder: Path) -> list[tuple[int, Path]]:
    """``(epoch, path)`` of the ``checkpoint-XXXXX.pt`` files in ``folder``, by epoch."""
    found = [(int(m.group(1)), p) for p in Path(folder).iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return sorted(found)


def _validate_sources(cfg: DictConfig) -> list[tuple[str, int | None, Path | None]]:
    """``(label, epoch, path)`` of each model state to analyse; ``("init", None, None)`` without one."""
    single = V.get(cfg, "analysis.checkpoint", None)
    folder = V.get(cfg, "analysis.checkpoints_dir", None)
    if single is not None and folder is not None:
        raise V.ConfigError("analysis.checkpoint", single, "set either analysis.checkpoint or "
                            "analysis.checkpoints_dir, not both", "analysis.checkpoints_dir=null")
    if single is not None:
        path = Path(checkpoint_path(cfg, "analysis.checkpoint"))
        return [(path.name, None, path)]
    if folder is not None:
        if not Path(str(folder)).is_dir():
            raise V.ConfigError("analysis.checkpoints_dir", folder, "no such folder",
                                "analysis.checkpoints_dir=outputs/<train run>")
        files = checkpoint_files(Path(str(folder)))
        if not files:
            raise V.ConfigError("analysis.checkpoints_dir", folder, "holds no checkpoint-XXXXX.pt files",
                                "analysis.checkpoints_dir=outputs/<train run>")
        return [(p.name, epoch, p) for epoch, p in files]
    return [("init", None, None)]


def _validate_esd(cfg: DictConfig) -> ESDSettings:
    low = V.positive_number(cfg, "analysis.alpha_low", "analysis.alpha_low=2.0")
    high = V.number(cfg, "analysis.alpha_high", minimum=low, strict_minimum=True,
                    example="analysis.alpha_high=6.0")
    return ESDSettings(
        conv2d=V.choice(cfg, "analysis.conv2d", CONV2D_MODES),
        svd_max_dim=V.positive_int(cfg, "analysis.svd_max_dim", "analysis.svd_max_dim=2048"),
        lanczos_steps=V.integer(cfg, "analysis.lanczos_steps", minimum=2, example="analysis.lanczos_steps=300"),
        lanczos_tol=V.positive_number(cfg, "analysis.lanczos_tol", "analysis.lanczos_tol=1e-8"),
        min_evals=V.integer(cfg, "analysis.min_evals", minimum=2, example="analysis.min_evals=10"),
        zero_tol=V.number(cfg, "analysis.zero_tol", 0, 1, example="analysis.zero_tol=1e-10"),
        randomize=V.boolean(cfg, "analysis.randomize"),
        tw_margin=V.number(cfg, "analysis.tw_margin", minimum=0, example="analysis.tw_margin=4.0"),
        alpha_low=low, alpha_high=high)


def validate(cfg: DictConfig) -> dict:
    name = V.get(cfg, "dataset.name")
    if name not in IMAGE_DATASETS:
        raise V.ConfigError("dataset", name, "the model's input shape and classes come from an image "
                            f"dataset: {', '.join(IMAGE_DATASETS)}", "dataset=digits")
    return {"dataset": name, "model": validate_model(cfg), "esd": _validate_esd(cfg),
            "sources": _validate_sources(cfg),
            "histogram_bins": V.positive_int(cfg, "analysis.histogram_bins", "analysis.histogram_bins=40"),
            "max_plot_panels": V.positive_int(cfg, "analysis.max_plot_panels", "analysis.max_plot_panels=36")}


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "weight_esd", validate=validate) as run:
        s = run.settings
        model = build_model(s["model"], *dataset_shape(s["dataset"])).to(run.device)
        rows, history, final = [], [], None
        for label, epoch, path in s["sources"]:
            if path is not None:
                saved = load_checkpoint(path, model, map_location=run.device).get("epoch")
                epoch = saved if isinstance(saved, int) and not isinstance(saved, bool) else epoch or 0
            final = _analyze_state(run, s, model, label)
            rows += [{"checkpoint": label, "epoch": epoch, **a.row} for a in final]
            history.append({"checkpoint": label, "epoch": epoch, **summarize([a.row for a in final], s["esd"]),
                            **{f"alpha/{a.unit.label}": a.row["alpha"] for a in final}})
            if epoch is not None:
                run.log({f"weight_esd/{k}": v for k, v in history[-1].items() if k not in ("checkpoint", "epoch")},
                        step=epoch)
        _record(run, s, final, history)
        csv_path = run.out_dir / CSV_NAME
        write_bytes_atomic(csv_path, _csv_bytes(rows))  # before results.json, which marks completion
        results = run.finish(csv=CSV_NAME, sources=[label for label, _, _ in s["sources"]],
                             settings=asdict(s["esd"]))
        run.tracker.artifact("weight_esd-layers", [csv_path])
        return results


def _analyze_state(run: Run, s: dict, model, label: str) -> list[LayerAnalysis]:
    """Every unit of the model's current weights; skipped all-zero layers become notes."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UserWarning)
        final = analyze_model(model, s["esd"], seed=run.seed)
    for warning in caught:
        run.note(f"{label}: {warning.message}")
    if not final:
        raise SuiteError(f"{label}: the model has no Linear or Conv2d layer with nonzero weights")
    alphas = np.array([a.row["alpha"] for a in final])
    fitted = alphas[np.isfinite(alphas)]
    print(f"{label}: {len(final)} units, mean alpha {fitted.mean() if len(fitted) else math.nan:.3f}, "
          f"{np.sum(fitted < s['esd'].alpha_low)} below {s['esd'].alpha_low:g}, "
          f"{np.sum(fitted > s['esd'].alpha_high)} above {s['esd'].alpha_high:g}", flush=True)
    return final


def _record(run: Run, s: dict, final: list[LayerAnalysis], history: list[dict]) -> None:
    esd = s["esd"]
    for key, value in history[-1].items():
        if key not in ("checkpoint", "epoch") and not key.startswith("alpha/"):
            run.metric(key, value)
    run.table("layers", [a.row for a in final])
    for a in final:
        if a.row["warning"] and a.row["warning"] != "too few eigenvalues":
            run.note(f"{a.unit.label}: alpha = {a.row['alpha']:.2f}, {a.row['warning']} (WeightWatcher)")
        if a.row["method"] == "lanczos":
            run.note(f"{a.unit.label}: Lanczos ({esd.lanczos_steps} steps), {a.row['num_computed']} of "
                     f"{a.row['num_eigenvalues']} eigenvalues converged; alpha fitted on those, the MP fit "
                     "on the Ritz measure")
        if esd.randomize and a.row["num_traps"]:
            run.note(f"{a.unit.label}: {a.row['num_traps']} correlation trap(s) in the shuffled ESD")
    if s["sources"][-1][2] is None:
        run.note(f"no checkpoint given: the weights are the model's initialisation (seed {run.seed})")
    for i, a in enumerate(final):
        run.array(f"eigenvalues_{i:03d}", a.esd.eigenvalues)
        if a.random_esd is not None:
            run.array(f"shuffled_eigenvalues_{i:03d}", a.random_esd.eigenvalues)
    run.array("alpha", np.array([a.row["alpha"] for a in final]))
    run.figure(_esd_figure(final, s["histogram_bins"], s["max_plot_panels"]), "esd_layers")
    run.figure(_flow_figure(final, esd), "correlation_flow")
    if len(history) > 1:
        run.table("training", history)
        labels = [a.unit.label for a in final]
        run.array("epochs", np.array([h["epoch"] for h in history]))
        run.array("alpha_over_training",
                  np.array([[h.get(f"alpha/{k}", np.nan) for k in labels] for h in history]))
        run.figure(_training_figure(history, labels, esd), "alpha_over_training")


def _csv_bytes(rows: list[dict]) -> bytes:
    columns = list(dict.fromkeys(k for row in rows for k in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue().encode()


# --- figures --------------------------------------------------------------------------------------
def _esd_panel(ax, a: LayerAnalysis, bins: int) -> None:
    """Log-log density histogram of the ESD, the fitted tail and xmin; the shuffled ESD if any."""
    total = a.esd.num_eigenvalues
    positive = a.esd.eigenvalues[a.esd.eigenvalues > 0]
    extra = a.random_esd.eigenvalues[a.random_esd.eigenvalues > 0] if a.random_esd is not None else positive
    edges = np.geomspace(min(positive.min(), extra.min()), max(positive.max(), extra.max()) * 1.0001, bins + 1)
    layers = (((extra, "tab:red", "shuffled"),) if a.random_esd is not None else ()) + \
        ((positive, "tab:green", "ESD"),)
    for values, color, label in layers:
        density = np.histogram(values, edges)[0] / (total * np.diff(edges))
        ax.stairs(np.where(density > 0, density, np.nan), edges, color=color, label=label, lw=1.2)
    if a.power_law is not None:
        fit = a.power_law
        x = np.geomspace(fit.xmin, a.esd.lambda_max, 50)
        ax.plot(x, power_law_density(x, fit, fit.num_tail / total), "k--", lw=1, label=f"alpha={fit.alpha:.2f}")
        ax.axvline(fit.xmin, color="tab:blue", lw=0.8, ls=":", label="xmin")
    if a.random_esd is not None:
        ax.axvline(a.random_mp.threshold, color="tab:orange", lw=0.8, label="shuffled MP edge")
    ax.set_xscale("log")
    ax.set_yscale("log")
    for axis in (ax.xaxis, ax.yaxis):  # plain-text labels: mathtext ones cost seconds per figure
        axis.set_major_formatter(LogFormatter())
        axis.set_minor_formatter(LogFormatter(minor_thresholds=(0.8, 0.3)))
    ks = f", D={a.row['ks_distance']:.3f}" if math.isfinite(a.row["ks_distance"]) else ""
    ax.set_title(f"{a.unit.label} ({a.row['method']}){ks}", fontsize=7)
    ax.set_xlabel("eigenvalue of $W^TW$", fontsize=7)
    ax.set_ylabel("density", fontsize=7)
    ax.tick_params(which="both", labelsize=5)
    ax.legend(fontsize=5)


def _esd_figure(final: list[LayerAnalysis], bins: int, max_panels: int):
    shown = final[:max_panels]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plotting.plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    for ax, a in zip(axes.flat, shown):
        _esd_panel(ax, a, bins)
    for ax in list(axes.flat)[len(shown):]:
        ax.axis("off")
    if len(final) > len(shown):
        fig.suptitle(f"first {len(shown)} of {len(final)} units (analysis.max_plot_panels)", fontsize=8)
    fig.tight_layout()
    return fig


def _flow_figure(final: list[LayerAnalysis], esd: ESDSettings):
    """Correlation flow: alpha against layer depth, with WeightWatcher's thresholds."""
    fig, ax = plotting.plt.subplots(figsize=(max(4.0, 0.35 * len(final)), 3.0))
    x = np.arange(len(final))
    alphas = np.array([a.row["alpha"] for a in final])
    ax.plot(x, alphas, "o-", color="tab:blue", ms=4)
    for bound in (esd.alpha_low, esd.alpha_high):
        ax.axhline(bound, color="tab:red", ls="--", lw=0.8)
    ax.set_xticks(x, [a.unit.label for a in final], rotation=90, fontsize=6)
    ax.set_ylabel("alpha")
    ax.set_title("correlation flow: power-law exponent per layer", fontsize=9)
    fig.tight_layout()
    return fig


def _training_figure(history: list[dict], labels: list[str], esd: ESDSettings):
    fig, ax = plotting.plt.subplots(figsize=(5.0, 3.4))
    epochs = [h["epoch"] for h in history]
    for label in labels:
        ax.plot(epochs, [h.get(f"alpha/{label}", np.nan) for h in history], lw=1,
                label=label if len(labels) <= 12 else None)
    ax.plot(epochs, [h.get("alpha_mean", math.nan) for h in history], "k-", lw=2.2, label="mean")
    for bound in (esd.alpha_low, esd.alpha_high):
        ax.axhline(bound, color="tab:red", ls="--", lw=0.8)
    ax.set_xlabel("epoch")
    ax.set_ylabel("alpha")
    ax.set_title("power-law exponent over training", fontsize=9)
    ax.legend(fontsize=6, ncol=2)
    fig.tight_layout()
    return fig
