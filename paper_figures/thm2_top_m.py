"""Paper Thm. 2 (Sec. 4): with a random start vector the m Ritz values are not the top m eigenvalues.
(a) the fraction of draws whose i-th largest Ritz value matches the i-th largest eigenvalue; (b) the
top m eigenvalues against the Ritz values of draw 0; (c) matches per draw.

    python -m paper_figures.thm2_top_m <run folder of: python -m experiments.run experiment=thm2> --out DIR

Check (PAPER.md): the overlap of the m Ritz values with the top-m eigenvalues is well below m -
thm2_matched (every draw matches at most half).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "thm2"
CLAIM = "Ritz values match well below m of the top-m eigenvalues"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="theory",
                 where=lambda r: r.get("analysis.claim") == "thm2")[-1]
    matched, counts = run.array("matched").astype(float), run.array("matched_counts")
    ritz, mask, top = run.array("ritz_values"), run.array("mask").astype(bool), run.array("top_eigenvalues")
    m = top.size
    ranks = np.arange(1, m + 1)
    fig, (row,) = C.grid(1, 3)
    row[0].bar(ranks, matched.mean(0), color="tab:blue")
    row[0].set(xlabel="rank i", ylabel="fraction of draws matched", title=f"{counts.size} random start vectors")
    first = np.sort(ritz[0][mask[0]])[::-1]
    row[1].plot(ranks, top, "ks", ms=4, label="top m eigenvalues")
    row[1].plot(np.arange(1, first.size + 1), first, "o", color="tab:red", ms=3, label="Ritz values, draw 0")
    row[1].set(xlabel="rank i", ylabel="value", title=f"i-th largest, m = {m}")
    row[1].legend(fontsize=7)
    row[2].hist(counts, bins=np.arange(-0.5, m + 1.5), color="tab:green")
    row[2].axvline(m, color="k", ls="--", lw=0.8, label="m")
    row[2].set(xlabel="matched of the top m", ylabel="draws", title=f"mean {counts.mean():.2f} of {m}")
    row[2].legend(fontsize=7)
    for ax, letter in zip(row, "abc"):
        ax.title.set_fontsize(9)
        C.panel_label(ax, letter)
    fig.suptitle("Thm. 2: Lanczos does not return the top m eigenvalues", fontsize=10)
    check = C.saved_checks([run], ["thm2_matched"], CLAIM)
    check.value += f" (mean {counts.mean():.2f} of {m})"
    return C.finish(ARTEFACT, fig, out_dir, "thm2_top_m", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
