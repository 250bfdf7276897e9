"""Paper Thm. 1 (Sec. 4), "shift and invert": Lanczos on A + mu I from the same start vector gives the
Ritz values of A shifted by mu. (a) the stems of A with those of A + mu I moved back by mu; (b) the
gap |ritz(A + mu I) - mu - ritz(A)| per Ritz value.

    python -m paper_figures.thm1_shift <run folder of: python -m experiments.run experiment=thm1> --out DIR

Check (PAPER.md): Ritz values of A + mu I minus mu equal those of A to 1e-8 (float64) - thm1_mu*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from curvature import plotting
from paper_figures import common as C

ARTEFACT = "thm1"
CLAIM = "ritz(A + mu I) - mu = ritz(A) to 1e-8 (float64)"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="theory",
                 where=lambda r: r.get("analysis.claim") == "thm1")[-1]
    base, weights, shifts = run.array("ritz_values"), run.array("ritz_weights"), run.array("shifts")
    fig, (row,) = C.grid(1, 2)
    plotting.stem(row[0], base, weights, title="stems of A, and of A + mu I moved by -mu")
    tolerance = float(run.get("analysis.thm1.tolerance", 1e-8))
    for i, mu in enumerate(shifts):
        name = f"shifted_ritz_values_{i}"
        if name not in run.arrays:
            continue
        moved = run.array(name) - mu
        row[0].plot(moved, weights, "x", ms=5, label=f"A + ({mu:g}) I, minus mu")
        gap = np.abs(moved - base)
        row[1].semilogy(np.arange(1, gap.size + 1), np.maximum(gap, 1e-18), "o-", ms=3, label=f"mu = {mu:g}")
    row[0].legend(fontsize=7)
    row[1].axhline(tolerance, color="k", ls="--", lw=0.8, label=f"tolerance {tolerance:g}")
    row[1].set(xlabel="Ritz value index (ascending)", ylabel="|ritz(A + mu I) - mu - ritz(A)|")
    row[1].set_title("the shift teaches nothing", fontsize=9)
    row[1].legend(fontsize=7)
    for ax, letter in zip(row, "ab"):
        C.panel_label(ax, letter)
    fig.suptitle(f"Thm. 1: {run.get('dataset.name', '').replace('_', ' ')} (n={run.get('dataset.n')}), "
                 f"m={run.get('analysis.thm1.num_steps')}", fontsize=10)
    check = C.saved_checks([run], ["thm1_mu*"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "thm1_shift", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
