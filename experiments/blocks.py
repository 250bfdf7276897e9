"""``analysis.blocks`` of a network spectrum run: the Lanczos spectrum of every block's diagonal block.

    python -m experiments.run dataset=digits model=cnn analysis.blocks=layer analysis.operators=[ggn,hessian]
    python -m experiments.run ... 'analysis.blocks=[[conv1.*],[conv2.*,fc.*]]'   # glob groups

For each operator, after the whole spectrum, every block B (:func:`curvature.blocks.block_groups`)
gets ``analysis.num_steps`` Lanczos steps (at most |B|) on ``H_BB`` through the whole operator's
products, so the blocks share its per-batch primal cache. Saved: the ``blocks`` table (one row per
block and operator, plus the whole: parameters, max / min Ritz value, negative mass, trace estimate
``|B| x sum_i w_i lambda_i``), arrays ``<op>_block<i>_ritz_values / _ritz_weights / _mask`` (i in
table order), the figure ``blocks_<op>`` (one panel per block plus the whole) and the metric
``<op>_block_heterogeneity``: the mean pairwise 1-Wasserstein distance of the block measures, each
divided by its largest |Ritz value| (shape, not scale; 0 = all blocks alike, at most 2). The block
runs are not checkpointed (``resume=true`` recomputes them).
"""

from __future__ import annotations

import math

from omegaconf import DictConfig

from curvature import plotting
from curvature.blocks import BlockOperator, block_groups, mean_pairwise_wasserstein
from curvature.errors import SuiteError
from curvature.lanczos import lanczos
from curvature.operators import select_parameters
from curvature.spectrum import SpectralMeasure
from experiments import validate as V
from experiments.runtime import Run

WHOLE = "(whole)"
EXAMPLE = "analysis.blocks=layer"


def validate(cfg: DictConfig):
    """None (off), ``"layer"``, or a list of non-empty lists of glob patterns."""
    blocks = V.get(cfg, "analysis.blocks", None)
    if blocks is None or blocks == "layer":
        return blocks
    if not (isinstance(blocks, list) and blocks and all(
            isinstance(g, list) and g and all(isinstance(p, str) and p for p in g) for g in blocks)):
        raise V.ConfigError("analysis.blocks", blocks, "must be null, layer, or a list of lists of glob patterns",
                            f"{EXAMPLE} or 'analysis.blocks=[[conv1.*],[fc.*]]'")
    return blocks


def groups(s: dict, model) -> dict[str, list[str]] | None:
    """The blocks among the operators' parameters (``operator.params``), or None when off; called before
    any Lanczos work, so a group that matches nothing costs nothing."""
    if s["blocks"] is None:
        return None
    try:
        return block_groups(model, s["blocks"], select_parameters(model, s["operator"]["params"]))
    except SuiteError as error:
        raise V.ConfigError("analysis.blocks", s["blocks"], str(error), EXAMPLE) from None


def run_blocks(run: Run, name: str, op, whole: SpectralMeasure, groups: dict[str, list[str]]) -> list[dict]:
    """Lanczos on every block of operator ``name``; records arrays, the metric and the figure; returns
    the table rows (the whole first)."""
    s = run.settings
    rows, measures = [_row(name, WHOLE, op.num_params, op.names, whole)], []
    for index, (block, names) in enumerate(groups.items()):
        sub = BlockOperator(op, names)
        result = lanczos(sub.matvec, sub.num_params, min(s["num_steps"], sub.num_params),
                         num_vectors=s["num_vectors"], seed=run.seed, dtype=run.dtype, device=run.device,
                         start_kind=s["start_vector"], engine=s["lanczos_engine"])
        for note in result.notes:
            run.note(f"{name} block {block}: {note}")
        for key in ("ritz_values", "ritz_weights", "mask"):
            run.array(f"{name}_block{index}_{key}", getattr(result, key))
        measures.append(SpectralMeasure.from_lanczos(result))
        rows.append(_row(name, block, sub.num_params, sub.names, measures[-1]))
    heterogeneity = mean_pairwise_wasserstein(measures)
    run.metric(f"{name}_block_heterogeneity", heterogeneity)
    run.metric("num_blocks", len(measures))
    run.note(f"{name}: {len(measures)} blocks ({'one per layer' if s['blocks'] == 'layer' else 'glob groups'}); "
             f"heterogeneity = mean pairwise W1 of the block spectra divided by their largest |Ritz value| "
             f"= {heterogeneity:.4g}")
    run.figure(_draw(name, s, rows, [whole, *measures], heterogeneity), f"blocks_{name}")
    return rows


def _row(operator: str, block: str, size: int, names, measure: SpectralMeasure) -> dict:
    summary = measure.summary()
    return {"operator": operator, "block": block, "num_params": size, "parameters": " ".join(names),
            "max_ritz_value": summary["max_ritz_value"], "min_ritz_value": summary["min_ritz_value"],
            "negative_weight": summary["negative_weight"], "normalised_trace": summary["normalised_trace"],
            "trace_estimate": size * summary["normalised_trace"]}


def _draw(name: str, s: dict, rows: list[dict], measures: list[SpectralMeasure], heterogeneity: float):
    cols = min(len(measures), 5)
    fig, axes = plotting.plt.subplots(math.ceil(len(measures) / cols), cols, squeeze=False,
                                      figsize=(3.2 * cols, 2.6 * math.ceil(len(measures) / cols)))
    for ax, row, measure in zip(axes.flat, rows, measures):
        plotting.stem(ax, measure.nodes, measure.weights, color="tab:blue" if row["block"] == WHOLE else "tab:red",
                      title=f"{row['block']} ({row['num_params']:,} params)\n"
                            f"max {row['max_ritz_value']:.3g}, min {row['min_ritz_value']:.3g}")
        ax.title.set_fontsize(8)
    for ax in list(axes.flat)[len(measures):]:
        ax.axis("off")
    fig.suptitle(f"{name} blocks: heterogeneity (mean pairwise W1, normalised) = {heterogeneity:.3g}; "
                 f"Lanczos m<={s['num_steps']}", fontsize=10)
    fig.tight_layout()
    return fig
