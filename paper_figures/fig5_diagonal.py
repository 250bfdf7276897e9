"""Paper Fig. 5 (Sec. 6.3): the diagonal approximation vs Lanczos vs the exact spectrum, for
Marcenko-Pastur (a) and Wigner (b): histograms of the exact eigenvalues and of the diagonal entries,
with the Lanczos stems on a second axis.

    python -m paper_figures.fig5_diagonal <sweep folder of: python -m experiments.run -m experiment=fig5> --out DIR

Check (PAPER.md): the 1-Wasserstein distance to the exact ESD is at least 5x smaller for Lanczos than
for the diagonal - the analysis's lanczos_beats_diagonal, for both matrices.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from curvature import plotting
from paper_figures import common as C

ARTEFACT = "fig5"
CLAIM = "W1(diagonal, exact) >= 5 x W1(Lanczos, exact)"
ORDER = ("marchenko_pastur", "wigner")


def overlay(ax, run: C.SavedRun, title: str) -> None:
    exact, diagonal = run.array("exact_eigenvalues"), run.array("diagonal")
    lo, hi = min(exact.min(), diagonal.min()), max(exact.max(), diagonal.max())
    plotting.histogram(ax, exact, bins=60, value_range=(lo, hi), label="exact eigenvalues")
    plotting.histogram(ax, diagonal, bins=60, value_range=(lo, hi), color="goldenrod", label="diagonal entries")
    twin = ax.twinx()
    plotting.stem(twin, run.array("lanczos_stem_nodes"), run.array("lanczos_stem_weights"))
    twin.set_ylabel("Lanczos weight", color="tab:red")
    w = run.metrics
    ax.set_title(f"{title}\nW1 to exact: diagonal {w.get('wasserstein_diagonal', np.nan):.3g}, "
                 f"Lanczos {w.get('wasserstein_lanczos', np.nan):.3g}", fontsize=9)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="diagonal",
                  where=lambda r: r.get("dataset.name") in ORDER and "exact_eigenvalues" in r.arrays)
    by_name = {r.get("dataset.name"): r for r in runs}
    runs = [by_name[name] for name in ORDER if name in by_name]
    fig, (row,) = C.grid(1, len(runs), width=4.2, height=3.2)
    for ax, run, letter in zip(row, runs, "ab"):
        overlay(ax, run, f"{run.get('dataset.name').replace('_', '-')} (n={run.get('dataset.n')})")
        C.panel_label(ax, letter)
    fig.suptitle("Fig. 5: diagonal approximation vs Lanczos vs exact", fontsize=10)
    check = C.saved_checks(runs, ["lanczos_beats_diagonal"], CLAIM, label=lambda r: r.get("dataset.name"))
    if len(runs) < len(ORDER):
        check = C.Check(CLAIM, check.value + f", missing: {', '.join(set(ORDER) - set(by_name))}", False)
    return C.finish(ARTEFACT, fig, out_dir, "fig5_diagonal", check, runs)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
