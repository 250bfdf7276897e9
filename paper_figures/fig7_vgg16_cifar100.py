"""Paper Fig. 7 (Sec. 7.1): VGG16 on CIFAR-100 at the end of training: the Monte-Carlo diagonal-GGN
histogram (a), the Lanczos GGN stems (b) and the Lanczos Hessian stems (c).

    python -m paper_figures.fig7_vgg16_cifar100 <run of experiment=fig7> <run of experiment=fig7_diagonal> --out DIR

Check (PAPER.md): GGN Ritz values all >= -1e-6 x max; the Hessian has negative mass; the diag-GGN max
differs from the Lanczos max - ggn_psd, hessian_negative_mass (spectrum run), diagonal_max_differs
(diagonal run).
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from curvature import plotting
from paper_figures import common as C
from paper_figures.network_spectra import describe, stem_panel

ARTEFACT = "fig7"
STEM = "fig7_vgg16_cifar100"
CLAIM = "GGN Ritz values >= -1e-6 x max; Hessian has negative mass; diag-GGN max differs from the Lanczos max"


def network_spectrum_figure(artefact: str, stem: str, claim: str, title: str, dataset: str,
                            results_dirs: Sequence[Path], out_dir: Path, with_diagonal: bool) -> C.Outcome:
    runs = C.find_runs(results_dirs)
    spectrum = C.pick(runs, artefact, analysis="spectrum",
                      where=lambda r: r.get("dataset.name") == dataset and "hessian_ritz_values" in r.arrays
                      and "ggn_ritz_values" in r.arrays)[-1]
    diagonal = C.pick(runs, artefact, analysis="diagonal",
                      where=lambda r: r.get("dataset.name") == dataset)[-1] if with_diagonal else None
    fig, (row,) = C.grid(1, 2 + with_diagonal)
    panels = list(row)
    if diagonal is not None:
        ax = panels.pop(0)
        plotting.histogram(ax, diagonal.array("diagonal"), bins=60, color="goldenrod", label="diagonal entries",
                           title=f"MC diag-GGN ({diagonal.get('analysis.num_samples')} label sample(s))\n"
                                 f"max {diagonal.array('diagonal').max():.3g}")
        ax.set_yscale("log")
    stem_panel(panels[0], spectrum, "ggn", colour="tab:blue")
    stem_panel(panels[1], spectrum, "hessian")
    for ax, letter in zip(row, "abc"):
        C.panel_label(ax, letter)
    fig.suptitle(f"{title}: {describe(spectrum)}", fontsize=10)
    check = C.saved_checks([spectrum], ["ggn_psd", "hessian_negative_mass"], claim)
    if diagonal is not None:
        extra = C.saved_checks([diagonal], ["diagonal_max_differs"], claim)
        check = C.Check(claim, f"{check.value}, {extra.value}", check.passed and extra.passed)
    return C.finish(artefact, fig, out_dir, stem, check, [spectrum] + ([diagonal] if diagonal else []))


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    return network_spectrum_figure(ARTEFACT, STEM, CLAIM, "Fig. 7", "cifar100", results_dirs, out_dir,
                                   with_diagonal=True)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
