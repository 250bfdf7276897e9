"""Edge of stability (Cohen et al. 2021; an artefact beyond the paper): full-batch gradient descent on
digits, per loss a column: (a/b) the training loss against steps, (c/d) the sharpness with its ``2/eta``
line, one colour per learning rate, the band of ``sharpness x eta/2`` over the last 30% in the titles.

    python -m experiments.run experiment=edge_of_stability
    python -m paper_figures.edge_of_stability <its run folder> --out DIR

Check: every check of the run passes: per variant the sharpness starts below and peaks at >= 0.9 x 2/eta;
MSE's stays within 1 +- 0.1 of 2/eta over the last 30% of the steps, cross-entropy's at or below
1.1 x 2/eta (it drifts below as the loss vanishes); the loss falls to <= half its start (MSE's
non-monotonically). Measured (2 CPU cores under load): mse_lr0.75 1.05 [1.02, 1.08], mse_lr0.5 1.03
[0.913, 1.06], cross_entropy_lr0.5 0.139 [0.115, 0.176], cross_entropy_lr0.4 0.164 [0.134, 0.208]: PASS.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from experiments.edge_of_stability import figure
from paper_figures import common as C

ARTEFACT = "edge_of_stability"
CLAIM = ("sharpness x eta/2 rises to >= 0.9, then over the last 30% of the steps (median [min, max]) stays "
         "within 1 +- 0.1 (MSE) or <= 1.1 (cross-entropy); the loss falls (MSE: non-monotonically)")


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    run = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="edge_of_stability")[-1]
    variants, rows = run.results.get("variants") or [], run.tables.get("variants") or []
    if not variants or len(rows) != len(variants):
        raise C.FigureInputError(f"{ARTEFACT}: {run.folder} holds no variants table: rerun its preset")
    curves = {v["name"]: {k: run.array(f"{v['name']}_{k}") for k in ("loss", "steps", "sharpness")}
              for v in variants}
    fig = figure(variants, curves, rows, (run.results.get("edge_of_stability") or {}).get("final_fraction"))
    parts = [f"{r['variant']}: {C.fmt(r['final_ratio_median'])} [{C.fmt(r['final_ratio_min'])}, "
             f"{C.fmt(r['final_ratio_max'])}]" if "final_ratio_median" in r else f"{r['variant']}: diverged"
             for r in rows]
    failed = [name for name, c in run.checks.items() if not c["passed"]]
    value = "beyond the paper (Cohen et al. 2021): " + "; ".join(parts) + \
        (f" (failed: {', '.join(failed)})" if failed else "")
    check = C.Check(CLAIM, value, bool(run.checks) and not failed)
    return C.finish(ARTEFACT, fig, out_dir, "edge_of_stability", check, [run])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
