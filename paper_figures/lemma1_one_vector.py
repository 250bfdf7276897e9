"""Paper Lemma 1 (Sec. 8): one random vector suffices in high dimension. The spread (std over unit
vectors u) of u^T A^k u against n on log-log axes, with the exact curve and the fitted slope, one
panel per matrix family and power k.

    python -m paper_figures.lemma1_one_vector <sweep folder of: python -m experiments.run -m experiment=lemma1> --out DIR

Check (PAPER.md): the spread falls like 1/sqrt(n): fitted slope about -0.5 - lemma1_slope_k*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "lemma1"
CLAIM = "std of u^T A^k u falls like n^-1/2 (log-log slope within 0.2 of -0.5)"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="theory",
                  where=lambda r: r.get("analysis.claim") == "lemma1")
    by_name = {r.get("dataset.name"): r for r in runs}
    runs = [by_name[k] for k in sorted(by_name, key=lambda n: (n != "wigner", n))]
    powers = sorted(int(k[len("spread_k"):]) for k in runs[0].arrays if k.startswith("spread_k"))
    fig, axes = C.grid(len(runs), len(powers))
    letters = iter("abcdefgh")
    for row, run in zip(axes, runs):
        sizes = run.array("sizes").astype(float)
        for ax, k in zip(row, powers):
            spread, exact = run.array(f"spread_k{k}"), run.array(f"exact_std_k{k}")
            slope = run.metrics.get(f"slope_k{k}", np.nan)
            ax.loglog(sizes, spread, "o", color="tab:red", label=f"std over {run.get('analysis.lemma1.num_draws')} vectors")
            ax.loglog(sizes, exact, "k-", lw=0.8, label="exact")
            fit = spread[0] * (sizes / sizes[0]) ** slope
            ax.loglog(sizes, fit, "--", color="tab:red", lw=0.8, label=f"slope {slope:.3f}")
            ax.set(xlabel="n", ylabel=f"std of u^T A^{k} u")
            ax.set_title(f"{run.get('dataset.name').replace('_', '-')}, k = {k}", fontsize=9)
            ax.legend(fontsize=7, loc="lower left")
            C.panel_label(ax, next(letters))
    fig.suptitle("Lemma 1: the spread of one random vector's moments shrinks like n^-1/2", fontsize=10)
    check = C.saved_checks(runs, ["lemma1_slope_k*"], CLAIM, label=lambda r: r.get("dataset.name"))
    return C.finish(ARTEFACT, fig, out_dir, "lemma1_one_vector", check, runs)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
