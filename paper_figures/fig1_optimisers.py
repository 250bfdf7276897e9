"""Paper Fig. 1 (Sec. 2.2): training error against epoch for the stochastic Lanczos Newton optimisers
(saddle-free Hessian (a), GGN (b)) at several learning rates with the damping / lr ratio fixed, against
Adam and SGD (drawn in both panels).

    python -m paper_figures.fig1_optimisers <sweep folder of: python -m experiments.run -m experiment=fig1> --out DIR

Reads each run's ``tables.epochs`` (training error = 1 - train_accuracy per epoch) and its optimiser
config. Check (PAPER.md): the Newton runs with equal damping / lr ratio end within a few % of each
other in training error - here: the final training errors of each Newton optimiser's runs that share a
ratio lie within ``TOLERANCE`` (absolute) of each other.
"""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

from paper_figures import common as C

ARTEFACT = "fig1"
TOLERANCE = 0.05  # "a few %": final training errors within 5 percentage points
CLAIM = f"Newton runs with equal damping/lr ratio end within {TOLERANCE:.0%} of each other in training error"


def damping_ratio(optimizer: dict) -> float | None:
    """damping / lr of a Newton optimiser config (explicit damping, or damping_ratio); None otherwise."""
    if "damping" not in optimizer and "damping_ratio" not in optimizer:
        return None
    if optimizer.get("damping") is not None:
        return float(optimizer["damping"]) / float(optimizer["lr"])
    return float(optimizer["damping_ratio"])


def curve(run: C.SavedRun) -> tuple[list[int], list[float]]:
    rows = run.tables.get("epochs") or []
    if not rows:
        raise C.FigureInputError(f"{run.folder / C.RESULTS} has no epochs table: rerun it with analysis=train")
    return [r["epoch"] for r in rows], [1.0 - r["train_accuracy"] for r in rows]


def label(run: C.SavedRun) -> str:
    opt = run.get("optimizer", {})
    return f"{opt.get('name')} lr={float(opt.get('lr')):g}"


def newton_check(runs: Sequence[C.SavedRun]) -> C.Check:
    groups: dict[tuple, list] = defaultdict(list)
    for run in runs:
        ratio = damping_ratio(run.get("optimizer", {}))
        if ratio is not None:
            groups[(run.get("optimizer.name"), round(ratio, 9))].append(curve(run)[1][-1])
    parts, passed = [], True
    for (name, ratio), finals in sorted(groups.items()):
        if len(finals) < 2:
            continue
        spread = max(finals) - min(finals)
        passed &= spread <= TOLERANCE
        parts.append(f"{name} (damping/lr {ratio:g}, {len(finals)} runs): spread {spread:.3g}")
    if not parts:
        return C.Check(CLAIM, "no two Newton runs share a damping/lr ratio", False)
    return C.Check(CLAIM, "; ".join(parts), passed)


def main(results_dirs: Sequence[Path], out_dir: Path) -> C.Outcome:
    runs = C.pick(C.find_runs(results_dirs), ARTEFACT, analysis="train",
                  where=lambda r: bool(r.tables.get("epochs")))
    runs = sorted(runs, key=lambda r: (r.get("optimizer.name", ""), -float(r.get("optimizer.lr", 0))))
    newton = sorted({r.get("optimizer.name") for r in runs if damping_ratio(r.get("optimizer", {})) is not None})
    baselines = [r for r in runs if damping_ratio(r.get("optimizer", {})) is None]
    fig, (row,) = C.grid(1, max(len(newton), 1), width=4.4, height=3.4)
    for ax, name, letter in zip(row, newton or [None], "abcd"):
        for run in [r for r in runs if r.get("optimizer.name") == name] + baselines:
            is_newton = run.get("optimizer.name") == name
            x, y = curve(run)
            ax.plot(x, y, marker="." if is_newton else None, ls="-" if is_newton else ":", label=label(run))
        ax.set(xlabel="epoch", ylabel="training error")
        ax.set_title(f"{name or 'no Newton runs'} vs Adam / SGD", fontsize=9)
        ax.legend(fontsize=6)
        C.panel_label(ax, letter)
    first = runs[0]
    width = first.get("model.width", 1.0)
    fig.suptitle(f"Fig. 1: {first.get('model.name')}{'' if width in (1, 1.0, None) else f' x{width:g}'} / "
                 f"{first.get('dataset.name')}{' (fake)' if first.get('dataset.fake') else ''}", fontsize=10)
    return C.finish(ARTEFACT, fig, out_dir, "fig1_optimisers", newton_check(runs), runs)


if __name__ == "__main__":
    raise SystemExit(C.cli(ARTEFACT, main))
