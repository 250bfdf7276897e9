"""Paper Fig. 8 (Sec. 8): the same Hessian spectrum seen from two random start vectors: stems of
vector 0 (a) and vector 1 (b).

    python -m paper_figures.fig8_two_vectors <run of experiment=fig8> --out DIR

Check (PAPER.md): extremal Ritz values agree within a few % (5% of the spectral radius); the stem
measures' first 4 moments agree within 5% - hessian_vectors_max_ritz, _min_ritz, _moments.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from paper_figures import common as C
from paper_figures.network_spectra import describe, stem_panel

ARTEFACT = "fig8"
CLAIM = "two start vectors: extremal Ritz values and moments 1-4 agree within 5%"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                 where=lambda r: "hessian_ritz_values" in r.arrays and r.get("analysis.num_vectors", 1) >= 2)[-1]
    fig, (row,) = C.grid(1, 2)
    stem_panel(row[0], run, "hessian", vector=0)
    stem_panel(row[1], run, "hessian", vector=1, colour="tab:purple")
    for ax, letter in zip(row, "ab"):
        C.panel_label(ax, letter)
    fig.suptitle(f"Fig. 8: {describe(run)}", fontsize=10)
    check = C.saved_checks([run], ["hessian_vectors_*"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "fig8_two_vectors", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
