"""Paper Sec. 7.1 "Computational Cost": seconds and peak memory per Lanczos iteration for the GGN and
the Hessian (VGG16 / CIFAR-100 at paper scale), from the ``tables.cost`` that every network
``analysis=spectrum`` run records: (a) seconds per Lanczos iteration and per operator product, (b)
peak memory; with runs of ``analysis=benchmark`` also (c) each product's time over a gradient's.

    python -m paper_figures.cost <run of experiment=cost> [<run of experiment=benchmark_cpu>] --out DIR

Check (PAPER.md: "reported in results and README"): both operators' seconds per iteration and peak
memory were measured (finite, positive); the value line gives them and the Hessian / GGN time ratio.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np

from paper_figures import common as C

ARTEFACT = "cost"
CLAIM = "seconds and peak memory per Lanczos iteration measured for the GGN and the Hessian"


def cost_rows(run: C.SavedRun) -> dict[str, dict]:
    return {row["operator"]: row for row in run.tables.get("cost", [])}


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.find_runs(results_dirs)
    spectrum = C.pick(runs, ARTEFACT, analysis="spectrum", where=lambda r: bool(r.tables.get("cost")))[-1]
    benchmarks = [r for r in runs if r.results.get("analysis") == "benchmark" and r.tables.get("benchmark")]
    rows = cost_rows(spectrum)
    names = [n for n in ("ggn", "hessian") if n in rows] + sorted(set(rows) - {"ggn", "hessian"})
    fig, (row,) = C.grid(1, 2 + bool(benchmarks), width=3.8)
    x = np.arange(len(names))
    row[0].bar(x - 0.2, [rows[n]["seconds_per_iteration"] for n in names], 0.4, label="Lanczos iteration")
    row[0].bar(x + 0.2, [rows[n]["seconds_per_product"] for n in names], 0.4, label="operator product")
    row[0].set_xticks(x, names)
    row[0].set(ylabel="seconds")
    row[0].legend(fontsize=7)
    row[0].set_title(f"{rows[names[0]]['num_params']:,} parameters, {rows[names[0]]['num_samples']} images",
                     fontsize=9)
    row[1].bar(x, [rows[n]["peak_memory_bytes"] / 2 ** 20 for n in names], color="tab:green")
    row[1].set_xticks(x, names)
    row[1].set(ylabel="peak memory (MiB)")
    row[1].set_title(rows[names[0]].get("peak_memory_kind", ""), fontsize=9)
    if benchmarks:
        table = benchmarks[-1].tables["benchmark"]
        row[2].barh([r["quantity"] for r in table], [r["ratio_to_gradient"] for r in table], color="tab:blue")
        row[2].set(xlabel="time / full-data gradient")
        row[2].tick_params(axis="y", labelsize=6)
    for ax, letter in zip(row, "abc"):
        C.panel_label(ax, letter)
    device = spectrum.results.get("provenance", {}).get("device_name", "?")
    fig.suptitle(f"Cost per Lanczos iteration: {spectrum.get('model.name')} / {spectrum.get('dataset.name')}, "
                 f"{rows[names[0]].get('dtype')}, {device}", fontsize=9)
    measured = [n for n in ("ggn", "hessian") if n in rows and all(
        math.isfinite(rows[n][k]) and rows[n][k] > 0 for k in ("seconds_per_iteration", "peak_memory_bytes"))]
    parts = [f"{n} {rows[n]['seconds_per_iteration']:.3g} s/it, {rows[n]['peak_memory_bytes'] / 2 ** 20:.0f} MiB"
             for n in names]
    if {"ggn", "hessian"} <= set(rows):
        parts.append(f"hessian/ggn {rows['hessian']['seconds_per_iteration'] / rows['ggn']['seconds_per_iteration']:.2f}")
    check = C.Check(CLAIM, "; ".join(parts), measured == ["ggn", "hessian"])
    return C.finish(ARTEFACT, fig, out_dir, "cost", check, [spectrum] + benchmarks[-1:])


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
