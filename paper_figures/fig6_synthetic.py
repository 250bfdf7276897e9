"""Paper Fig. 6 (Sec. 6.4): a synthetic NN-like spectrum (half at 0, a bulk, a few positive and
negative outliers, Haar-rotated): histogram of the eigenvalues (a), Lanczos stems after few steps (b),
the diagonal's histogram (c), Lanczos stems after more steps (d).

    python -m paper_figures.fig6_synthetic <run folder of: python -m experiments.run experiment=fig6> --out DIR

Check (PAPER.md): more steps recover the top outlier to 1e-3 relative; the diagonal's max < 0.5 x the
top eigenvalue; the mass at 0 is right only for Lanczos - the analysis's top_outlier_m*,
diagonal_max, zero_mass_m*, zero_mass_diagonal.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curvature import plotting
from paper_figures import common as C
from paper_figures.fig2_wigner import report_steps

ARTEFACT = "fig6"
CLAIM = "top outlier to 1e-3 (m large); diagonal max < 0.5 x top; mass at 0 right for Lanczos only"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                 where=lambda r: r.get("dataset.name") == "synthetic_spectrum" and "diagonal" in r.arrays)[-1]
    steps = report_steps(run)
    fig, axes = C.grid(2, 2)
    (a, b), (c, d) = axes
    plotting.histogram(a, run.array("exact_eigenvalues"), bins=60, title=f"eigenvalues (n={run.get('dataset.n')})")
    for ax, m in ((b, steps[0]), (d, steps[-1])):
        plotting.stem(ax, run.array(f"stem_nodes_m{m}"), run.array(f"stem_weights_m{m}"),
                      title=f"Lanczos stems, m={m}")
    plotting.histogram(c, run.array("diagonal"), bins=60, color="goldenrod", label="diagonal entries",
                       title="diagonal approximation")
    for ax, letter in zip((a, b, c, d), "abcd"):
        C.panel_label(ax, letter)
    fig.suptitle("Fig. 6: synthetic NN-like spectrum", fontsize=10)
    check = C.saved_checks([run], ["top_outlier_m*", "diagonal_max", "zero_mass_m*", "zero_mass_diagonal"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "fig6_synthetic", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
