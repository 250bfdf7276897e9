"""Paper Fig. 11 (Sec. 9): VGG16 on CIFAR-10 at the end of training, train (a) and test (b) loss along the
unit-norm Hessian Ritz directions (largest, second largest, most negative, nearest zero) and two random
baselines.

    python -m paper_figures.fig11_landscape_cifar10_loss <run of experiment=fig11> --out DIR
    (the run reads Ritz vectors saved by: python -m experiments.run experiment=fig13 operator=hessian
     analysis.operators=null analysis.save_ritz_vectors=true analysis.checkpoint=<checkpoint>)

Check (PAPER.md): the loss at t = 0 equals the evaluated loss; the curvature of the train-loss curve at 0
matches the Ritz value (float64) - loss_at_t0_consistent, curvature_matches_ritz.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from paper_figures import common as C
from paper_figures.landscape_figures import landscape_figure

ARTEFACT = "fig11"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    return landscape_figure(ARTEFACT, "Fig. 11", "cifar10", "loss", results_dirs, out_dir)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
