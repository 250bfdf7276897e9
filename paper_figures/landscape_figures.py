"""Shared drawing for Figs. 9-12: train (a) and test (b) loss or accuracy along Ritz directions.

Reads a run of ``analysis=landscape``: ``arrays.npz`` holds ``t`` and ``<direction>_<split>_<metric>``,
``tables.directions`` the Ritz value / curvature of each direction. Check (PAPER.md): the loss at
t = 0 equals the evaluated loss along every direction (loss_at_t0_consistent) and, in float64 runs,
the second difference of the train loss at small t matches the Ritz value (curvature_matches_ritz).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

CLAIM = ("loss at t = 0 equals the evaluated loss along every direction; curvature at 0 matches the Ritz "
         "value (float64 runs)")


def landscape_figure(artefact: str, figure: str, dataset: str, metric: str, results_dirs: Sequence[Path],
                     out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), artefact, analysis="landscape",
                  where=lambda r: r.get("dataset.name") == dataset)
    own = [r for r in runs if (r.experiment or "").split("_")[0] == artefact]
    run = (own or runs)[-1]
    t = run.array("t")
    rows = run.tables.get("directions", [])
    fig, (row,) = C.grid(1, 2, width=4.2, height=3.2)
    zero = int(np.argmin(np.abs(t)))
    for ax, split, letter in zip(row, ("train", "test"), "ab"):
        for i, d in enumerate(rows):
            colour = f"C{i % 10}"
            y = run.array(f"{d['direction']}_{split}_{metric}")
            ritz = d["kind"] == "ritz"
            label = (f"{d['direction']}: theta={d['ritz_value']:.3g}" if ritz else d["direction"])
            ax.plot(t, y, color=colour, marker="." if ritz else None, ls="-" if ritz else ":", label=label)
            if metric == "loss" and ritz:
                ax.plot(t, y[zero] + d["model_curvature"] * t ** 2 / 2, color=colour, ls="--", lw=0.7)
        ax.set(xlabel="t (unit-norm direction)", ylabel=f"{split} {metric}")
        bn = f", BN {run.get('analysis.bn_mode')}" if run.results.get("batch_norm", True) else ""  # older runs: unknown
        ax.set_title(f"{split} {metric}{bn}", fontsize=9)
        C.panel_label(ax, letter)
    row[0].legend(fontsize=6)
    weights = "trained checkpoint" if run.get("analysis.checkpoint") else "initial weights"
    width = run.get("model.width", 1.0)
    fig.suptitle(f"{figure}: {metric} along {run.results.get('operator', 'hessian')} Ritz directions, "
                 f"{run.get('model.name')}{'' if width in (1, 1.0) else f' x{width:g}'} / {dataset}"
                 f"{' (fake)' if run.get('dataset.fake') else ''}, {weights}"
                 + ("" if metric == "accuracy" else "; dashed: loss0 + theta t^2 / 2"), fontsize=9)
    check = C.saved_checks([run], ["loss_at_t0_consistent"], CLAIM)
    if "curvature_matches_ritz" in run.checks:
        extra = C.saved_checks([run], ["curvature_matches_ritz"], CLAIM)
        check = C.Check(CLAIM, f"{check.value}, {extra.value}", check.passed and extra.passed)
    else:
        check.value += ", curvature_matches_ritz not run (float32)"
    return C.finish(artefact, fig, out_dir, f"{artefact}_landscape_{dataset}_{metric}", check, [run])
