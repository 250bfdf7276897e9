"""Per-block Hessian spectra of a trained tiny GPT against a trained CNN (Zhang et al. 2024, "Why
Transformers Need Adam: A Hessian Perspective": a transformer's blocks have heterogeneous spectra, a
CNN's alike): the block measures, each divided by its largest |Ritz value|, as CDFs (a, b), and the
saved heterogeneity numbers, mean pairwise 1-Wasserstein distance of those measures (c).

    python -m paper_figures.blocks_gpt_vs_cnn <the two runs of experiment=blocks_gpt_vs_cnn_smoke> --out DIR

Check: the claim as stated, GPT's Hessian block heterogeneity > the CNN's; FAIL says the runs do not
show it (a finding, not a bug). The commands and the numbers of the smoke run are in the preset's header.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "blocks"
CLAIM = "transformer blocks heterogeneous, CNN blocks alike: GPT's Hessian block heterogeneity > CNN's"
WHOLE = "(whole)"
OPERATORS = ("hessian", "ggn")


def block_measures(run: C.SavedRun, operator: str) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(block name, nodes / max |node|, weights) of every block of ``operator``, averaged over start vectors."""
    names = [r["block"] for r in run.tables["blocks"] if r["operator"] == operator and r["block"] != WHOLE]
    out = []
    for i, name in enumerate(names):
        values = np.atleast_2d(run.array(f"{operator}_block{i}_ritz_values"))
        weights = np.atleast_2d(run.array(f"{operator}_block{i}_ritz_weights"))
        mask = np.atleast_2d(run.array(f"{operator}_block{i}_mask")).astype(bool)
        nodes = np.concatenate([values[k][mask[k]] for k in range(len(values))])
        mass = np.concatenate([weights[k][mask[k]] for k in range(len(values))]) / len(values)
        scale = np.abs(nodes).max()
        out.append((name, nodes / scale if scale > 0 else nodes, mass))
    return out


def cdf_panel(ax, run: C.SavedRun, label: str) -> None:
    for name, nodes, weights in block_measures(run, "hessian"):
        order = np.argsort(nodes)
        ax.step(np.r_[-1.0, nodes[order], 1.0], np.r_[0.0, np.cumsum(weights[order]), 1.0], where="post",
                lw=1, alpha=0.8, label=name)
    value = run.metrics["hessian_block_heterogeneity"]
    ax.set(xlim=(-1.05, 1.05), ylim=(0, 1.02), xlabel="Ritz value / block's max |Ritz value|", ylabel="CDF")
    ax.set_title(f"{label}: {int(run.metrics['num_blocks'])} Hessian blocks\nheterogeneity {value:.3g}", fontsize=9)
    if int(run.metrics["num_blocks"]) <= 8:
        ax.legend(fontsize=6)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="spectrum",
                  where=lambda r: "blocks" in r.tables and "hessian_block_heterogeneity" in r.metrics)
    gpt = [r for r in runs if r.get("model.name") == "gpt_tiny"]
    cnn = [r for r in runs if r.get("model.name") != "gpt_tiny"]
    if not gpt or not cnn:
        raise C.FigureInputError(f"{ARTEFACT}: needs a blocks run of model=gpt_tiny and one of another model; "
                                 f"found {len(gpt)} and {len(cnn)}: see conf/experiment/blocks_gpt_vs_cnn_smoke.yaml")
    gpt, cnn = gpt[-1], cnn[-1]
    labels = {id(gpt): "gpt_tiny / text", id(cnn): f"{cnn.get('model.name')} / {cnn.get('dataset.name')}"}
    fig, (row,) = C.grid(1, 3)
    cdf_panel(row[0], gpt, labels[id(gpt)])
    cdf_panel(row[1], cnn, labels[id(cnn)])
    ops = [o for o in OPERATORS if all(f"{o}_block_heterogeneity" in r.metrics for r in (gpt, cnn))]
    x = np.arange(len(ops))
    for shift, run in ((-0.2, gpt), (0.2, cnn)):
        row[2].bar(x + shift, [run.metrics[f"{o}_block_heterogeneity"] for o in ops], width=0.4, label=labels[id(run)])
    row[2].set_xticks(x, ops)
    row[2].set(ylabel="mean pairwise W1 (normalised)")
    row[2].legend(fontsize=7)
    g, c = gpt.metrics["hessian_block_heterogeneity"], cnn.metrics["hessian_block_heterogeneity"]
    row[2].set_title(f"GPT / CNN = {g / c if c else float('inf'):.3g} (Hessian)", fontsize=9)
    for ax, letter in zip(row, "abc"):
        C.panel_label(ax, letter)
    value = "; ".join(f"{o}: gpt {C.fmt(gpt.metrics[f'{o}_block_heterogeneity'])}, "
                      f"cnn {C.fmt(cnn.metrics[f'{o}_block_heterogeneity'])}" for o in ops)
    return C.finish(ARTEFACT, fig, out_dir, "blocks_gpt_vs_cnn", C.Check(CLAIM, value, g > c), [gpt, cnn])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
