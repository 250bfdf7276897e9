"""Paper Fig. 13: the Hessian spectrum of VGG16 on CIFAR-10 at the end of training: Lanczos GGN stems
(a) and Lanczos Hessian stems (b), as Fig. 7.

    python -m paper_figures.fig13_vgg16_cifar10 <run of experiment=fig13> --out DIR

Check (PAPER.md, as fig7): GGN Ritz values all >= -1e-6 x max; the Hessian has negative mass -
ggn_psd, hessian_negative_mass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from paper_figures import common as C
from paper_figures.fig7_vgg16_cifar100 import network_spectrum_figure

ARTEFACT = "fig13"
CLAIM = "GGN Ritz values >= -1e-6 x max; Hessian has negative mass"


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    return network_spectrum_figure(ARTEFACT, "fig13_vgg16_cifar10", CLAIM, "Fig. 13", "cifar10", results_dirs,
                                   out_dir, with_diagonal=False)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
