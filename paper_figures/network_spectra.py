"""Shared drawing for the network-spectrum figures (Figs. 7, 8, 13): stems of saved Lanczos runs."""

from __future__ import annotations

import numpy as np

from curvature import plotting
from paper_figures import common as C


def stems(run: C.SavedRun, operator: str, vector: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of the saved Lanczos measure of ``operator`` (averaged over start vectors,
    or of one start vector), from ``<operator>_ritz_values / _ritz_weights / _mask`` of shape (k, m)."""
    values = np.atleast_2d(run.array(f"{operator}_ritz_values"))
    weights = np.atleast_2d(run.array(f"{operator}_ritz_weights"))
    mask = np.atleast_2d(run.arrays.get(f"{operator}_mask", np.ones_like(values, dtype=bool))).astype(bool)
    rows = range(values.shape[0]) if vector is None else [vector]
    nodes = np.concatenate([values[i][mask[i]] for i in rows])
    mass = np.concatenate([weights[i][mask[i]] for i in rows]) / len(rows)
    return nodes, mass


def stem_panel(ax, run: C.SavedRun, operator: str, vector: int | None = None, colour: str = "tab:red") -> None:
    nodes, weights = stems(run, operator, vector)
    m = run.get("analysis.num_steps")
    who = "all start vectors" if vector is None else f"start vector {vector}"
    plotting.stem(ax, nodes, weights, color=colour,
                  title=f"{operator}: Lanczos m={m}, {who}\nmax {nodes.max():.3g}, min {nodes.min():.3g}")


def describe(run: C.SavedRun) -> str:
    """'vgg16 x0.0625 / cifar100 (256 images, initial weights)' from the run's config."""
    width = run.get("model.width", 1.0)
    images = run.metrics.get("num_samples")
    weights = "trained checkpoint" if run.get("analysis.checkpoint") else "initial weights"
    return (f"{run.get('model.name')}{'' if width in (1, 1.0, None) else f' x{width:g}'} / "
            f"{run.get('dataset.name')}{' (fake)' if run.get('dataset.fake') else ''}, "
            f"{int(images) if images else '?'} images, {weights}")
