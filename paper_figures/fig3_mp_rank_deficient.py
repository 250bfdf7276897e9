"""Paper Fig. 3 (Sec. 6.2): Marcenko-Pastur with half the eigenvalues exactly 0 (n = 2t): the Lanczos
stems (a) beside the histogram of the exact eigenvalues with the MP law and its atom at 0 (b).

    python -m paper_figures.fig3_mp_rank_deficient <run folder of: python -m experiments.run experiment=fig3> --out DIR

Check (PAPER.md): stem weight at 0 (nodes with |node| < 1e-6 rho) within 0.05 of 0.5 - the
analysis's zero_mass_m*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from curvature import plotting
from curvature.random_matrices import marchenko_pastur_atom, marchenko_pastur_density, marchenko_pastur_edges
from paper_figures import common as C
from paper_figures.fig2_wigner import report_steps

ARTEFACT = "fig3"
CLAIM = "stem weight at 0 within 0.05 of 0.5"


def mp_histogram(ax, run: C.SavedRun, title: str) -> None:
    ratio = float(run.get("dataset.ratio"))
    low, high = marchenko_pastur_edges(ratio)
    x = np.linspace(max(low - 0.05 * high, 1e-9), 1.05 * high, 400)
    atom = marchenko_pastur_atom(ratio)
    exact = run.array("exact_eigenvalues")
    plotting.histogram(ax, exact, bins=60, density_curve=(x, marchenko_pastur_density(x, ratio).numpy()),
                       atom=(0.0, atom) if atom else None, title=title)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                 where=lambda r: r.get("dataset.name") == "marchenko_pastur" and r.get("dataset.ratio", 0) > 1)[-1]
    m = report_steps(run)[-1]
    fig, (row,) = C.grid(1, 2)
    plotting.stem(row[0], run.array(f"stem_nodes_m{m}"), run.array(f"stem_weights_m{m}"),
                  title=f"Lanczos stems, m={m}: weight {run.metrics.get(f'zero_mass_m{m}', float('nan')):.3f} at 0")
    mp_histogram(row[1], run, f"exact eigenvalues + MP law (q={run.get('dataset.ratio'):g})")
    for ax, letter in zip(row, "ab"):
        C.panel_label(ax, letter)
    fig.suptitle(f"Fig. 3: Marcenko-Pastur, n={run.get('dataset.n')}, half the eigenvalues 0", fontsize=10)
    check = C.saved_checks([run], ["zero_mass_m*"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "fig3_mp_rank_deficient", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
