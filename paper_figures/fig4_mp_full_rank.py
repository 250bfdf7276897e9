"""Paper Fig. 4 (Sec. 6.2): full-rank Marcenko-Pastur at two ratios q = n/t: for each, the Lanczos
stems (a, c) and the histogram of the exact eigenvalues with the MP law (b, d).

    python -m paper_figures.fig4_mp_full_rank <sweep folder of: python -m experiments.run -m experiment=fig4> --out DIR

Check (PAPER.md): stems inside the MP edges (1 -+ sqrt q)^2 +-5% and reaching them - the analysis's
support_m* and edge_reach_m*, at every ratio.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curvature import plotting
from paper_figures import common as C
from paper_figures.fig2_wigner import report_steps
from paper_figures.fig3_mp_rank_deficient import mp_histogram

ARTEFACT = "fig4"
CLAIM = "stems inside the MP edges (1 -+ sqrt q)^2 +-5% and reaching both"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                  where=lambda r: r.get("dataset.name") == "marchenko_pastur" and r.get("dataset.ratio", 2) <= 1)
    by_ratio = {}
    for run in runs:  # one run per ratio (the last found wins), largest ratio first as in the paper
        by_ratio[float(run.get("dataset.ratio"))] = run
    runs = [by_ratio[q] for q in sorted(by_ratio, reverse=True)]
    fig, axes = C.grid(len(runs), 2)
    letters = iter("abcdefgh")
    for (stem_ax, hist_ax), run in zip(axes, runs):
        m, q = report_steps(run)[-1], run.get("dataset.ratio")
        plotting.stem(stem_ax, run.array(f"stem_nodes_m{m}"), run.array(f"stem_weights_m{m}"),
                      title=f"q={q:g}: Lanczos stems, m={m}")
        mp_histogram(hist_ax, run, f"q={q:g}: exact eigenvalues + MP law")
        C.panel_label(stem_ax, next(letters))
        C.panel_label(hist_ax, next(letters))
    fig.suptitle(f"Fig. 4: full-rank Marcenko-Pastur, n={runs[0].get('dataset.n')}", fontsize=10)
    check = C.saved_checks(runs, ["support_m*", "edge_reach_m*"], CLAIM,
                           label=lambda r: f"q={r.get('dataset.ratio'):g}")
    return C.finish(ARTEFACT, fig, out_dir, "fig4_mp_full_rank", check, runs)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
