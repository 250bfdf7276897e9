"""Paper Table 1 (App. B.1; Golub & Van Loan Table 10.1.1): the Lanczos bound term L = 1/C_{k-1}(2r-1)^2
against the power-iteration term R = r^{-2(k-1)}. (a) the table itself, (b) both terms against k,
(c) the measured errors of both methods and their bounds at the smallest gap.

    python -m paper_figures.table1_lanczos_vs_power <run folder of: python -m experiments.run experiment=table1> --out DIR

Check (PAPER.md): r = 1.5, k = 5 gives L = 1.06e-4 and R = 3.9e-2; plus the empirical run: both
methods within their bounds, Lanczos ahead - table1_*, *_within_bound, lanczos_beats_power.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "table1"
CLAIM = "L = 1.06e-4, R = 3.9e-2 at r = 1.5, k = 5; measured errors within the bounds, Lanczos ahead"


def table_panel(ax, rows: list[dict]) -> None:
    ratios = sorted({r["ratio"] for r in rows}, reverse=True)
    steps = sorted({r["k"] for r in rows})
    cell = {(r["ratio"], r["k"]): r for r in rows}
    text, labels = [], []
    for q in ratios:
        for key, letter in (("lanczos", "L"), ("power", "R")):
            labels.append(f"{letter}, r={q:g}")
            text.append([f"{cell[(q, k)][key]:.2e}" if (q, k) in cell else "" for k in steps])
    ax.axis("off")
    table = ax.table(cellText=text, rowLabels=labels, colLabels=[f"k={k}" for k in steps],
                     loc="center", cellLoc="center")
    table.auto_set_font_size(False)
    table.set_fontsize(6.5)
    table.scale(1.0, 1.3)
    ax.set_title("Table 1: L (Lanczos) and R (power)", fontsize=9)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="theory",
                 where=lambda r: r.get("analysis.claim") == "table1")[-1]
    rows = run.tables.get("table1")
    if not rows:
        raise C.FigureInputError(f"{run.folder / C.RESULTS} holds no table1 rows: rerun experiment=table1")
    fig, (row,) = C.grid(1, 3, width=4.0)
    table_panel(row[0], rows)
    for q in sorted({r["ratio"] for r in rows}, reverse=True):
        sub = [r for r in rows if r["ratio"] == q]
        line, = row[1].semilogy([r["k"] for r in sub], [r["lanczos"] for r in sub], "o-", ms=3, label=f"L, r={q:g}")
        row[1].semilogy([r["k"] for r in sub], [r["power"] for r in sub], "s--", ms=3, color=line.get_color(),
                        label=f"R, r={q:g}")
    row[1].set(xlabel="k", ylabel="bound term")
    row[1].legend(fontsize=6)
    ratios, steps = run.array("ratios"), run.array("steps")
    i = int(np.argmin(ratios))
    floor = 1e-17
    for method, colour in (("lanczos", "tab:red"), ("power", "tab:blue")):
        row[2].semilogy(steps, np.maximum(run.array(f"{method}_error")[i], floor), "o-", ms=3, color=colour,
                        label=f"{method} error")
        row[2].semilogy(steps, np.maximum(run.array(f"{method}_bound")[i], floor), "--", lw=0.8, color=colour,
                        label=f"{method} bound")
    row[2].set(xlabel="products k", ylabel="relative error of lambda_1")
    row[2].set_title(f"measured, r = {ratios[i]:g}, n = {run.get('analysis.table1.empirical_dim')}", fontsize=9)
    row[2].legend(fontsize=6)
    for ax, letter in zip(row, "abc"):
        C.panel_label(ax, letter)
    check = C.saved_checks([run], ["table1_*", "*_within_bound", "lanczos_beats_power"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "table1_lanczos_vs_power", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
