"""Paper Thm. 5 (Sec. 8.1): Gaussian kernel smoothing biases the moments. Top row: each saved spectrum
(exact eigenvalues, Lanczos stems) smoothed at every bandwidth sigma (a std in eigenvalue units);
bottom row: the measured bias of the even moments against sigma beside Thm. 5's closed form.

    python -m paper_figures.thm5_smoothing <run folder of: python -m experiments.run experiment=thm5> --out DIR

Check (PAPER.md): the measured bias equals the formula to 1e-6 - thm5_*.
The smoothed curves are sums of Gaussians at the saved nodes (drawing, no curvature is computed).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "thm5"
CLAIM = "measured moment bias of the smoothed density = Thm. 5's formula to 1e-6"


def smoothed(nodes: np.ndarray, weights: np.ndarray, x: np.ndarray, sigma: float) -> np.ndarray:
    z = (x[:, None] - nodes[None, :]) / sigma
    return (np.exp(-0.5 * z ** 2) @ weights) / (sigma * np.sqrt(2 * np.pi))


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="kernel_smoothing")[-1]
    names = sorted(k[:-len("_moments")] for k in run.tables if k.endswith("_moments"))
    fig, axes = C.grid(2, len(names), width=4.2)
    letters = iter("abcdefgh")
    for col, name in enumerate(names):
        nodes, weights = run.array(f"{name}_nodes"), run.array(f"{name}_weights")
        bands = run.tables[f"{name}_bandwidths"]
        pad = 4 * max(b["sigma"] for b in bands)
        x = np.linspace(nodes.min() - pad, nodes.max() + pad, 3000)
        top = axes[0, col]
        for b in bands:
            y = smoothed(nodes, weights, x, b["sigma"])
            top.semilogy(x, np.maximum(y, 1e-12), lw=0.9, label=f"sigma={b['sigma']:.3g}")
        top.set_ylim(bottom=1e-5)
        top.set(xlabel="eigenvalue", ylabel="smoothed density")
        top.set_title(f"{name}: Gaussian kernel, std sigma", fontsize=9)
        top.legend(fontsize=6)
        bottom = axes[1, col]
        rows = run.tables[f"{name}_moments"]
        for k in sorted({r["k"] for r in rows if r["k"] >= 2 and r["k"] % 2 == 0}):
            sub = sorted((r for r in rows if r["k"] == k), key=lambda r: r["sigma"])
            line, = bottom.loglog([r["sigma"] for r in sub], [r["bias"] for r in sub], "o", ms=4,
                                  label=f"measured, k={k}")
            bottom.loglog([r["sigma"] for r in sub], [r["bias_formula"] for r in sub], "-", lw=0.8,
                          color=line.get_color(), label=f"Thm. 5, k={k}")
        bottom.set(xlabel="sigma", ylabel="m_k(smoothed) - m_k")
        bottom.set_title(f"{name}: moment bias vs bandwidth", fontsize=9)
        bottom.legend(fontsize=6)
        C.panel_label(top, next(letters))
        C.panel_label(bottom, next(letters))
    check = C.saved_checks([run], ["thm5_*"], CLAIM)
    return C.finish(ARTEFACT, fig, out_dir, "thm5_smoothing", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
