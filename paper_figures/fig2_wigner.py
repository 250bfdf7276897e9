"""Paper Fig. 2 (Sec. 6.1): Wigner matrix, Lanczos stems (a, c) beside the exact eigenvalues with the
semicircle law (b) and the two measures' distribution functions (d).

    python -m paper_figures.fig2_wigner <run folder of: python -m experiments.run experiment=fig2> --out DIR

Check (PAPER.md): stem support within the semicircle edges +-5%; moments 1-4 of the stem measure
within 5% (of rho^k) of the exact ESD's - the analysis's support_m*, edge_reach_m*, moments_m*.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from curvature import plotting
from curvature.random_matrices import semicircle_density
from paper_figures import common as C

ARTEFACT = "fig2"
CLAIM = "stems inside the semicircle edges +-5%; stem moments 1-4 within 5% of the exact ESD's"


def report_steps(run: C.SavedRun) -> list[int]:
    return sorted(int(k[len("stem_nodes_m"):]) for k in run.arrays if k.startswith("stem_nodes_m"))


def stem_panel(ax, run: C.SavedRun, m: int, title: str) -> None:
    plotting.stem(ax, run.array(f"stem_nodes_m{m}"), run.array(f"stem_weights_m{m}"), title=title)


def cdf_panel(ax, run: C.SavedRun, steps: Sequence[int]) -> None:
    """Distribution functions of the exact ESD and of the stem measures (Gauss quadrature)."""
    exact = np.sort(run.array("exact_eigenvalues"))
    ax.step(exact, np.arange(1, exact.size + 1) / exact.size, where="post", color="k", lw=1.0, label="exact ESD")
    for m in steps:
        nodes, weights = run.array(f"stem_nodes_m{m}"), run.array(f"stem_weights_m{m}")
        order = np.argsort(nodes)
        ax.step(nodes[order], np.cumsum(weights[order]), where="post", lw=1.0, label=f"stems, m={m}")
    ax.set(xlabel="eigenvalue", ylabel="cumulative mass")
    ax.legend(fontsize=7)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                 where=lambda r: r.get("dataset.name") == "wigner")[-1]
    steps = report_steps(run)
    n, std = run.get("dataset.n"), run.get("dataset.std", 1.0)
    exact = run.array("exact_eigenvalues")
    fig, axes = C.grid(2, 2)
    (a, b), (c, d) = axes
    stem_panel(a, run, steps[0], f"Lanczos stems, m={steps[0]}")
    x = np.linspace(-2.1 * std, 2.1 * std, 400)
    plotting.histogram(b, exact, bins=60, density_curve=(x, semicircle_density(x, std).numpy()),
                       title="exact eigenvalues + semicircle law")
    stem_panel(c, run, steps[-1], f"Lanczos stems, m={steps[-1]}")
    cdf_panel(d, run, steps)
    d.set_title("distribution functions", fontsize=9)
    for ax, letter in zip((a, b, c, d), "abcd"):
        C.panel_label(ax, letter)
    fig.suptitle(f"Fig. 2: Wigner matrix (n={n}), one random start vector", fontsize=10)
    check = C.saved_checks([run], ["support_m*", "edge_reach_m*", "moments_m*"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "fig2_wigner", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
