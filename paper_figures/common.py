"""What every figure script shares: finding saved runs, reading them, saving figures, the check line.

A figure script reads the ``results.json`` / ``arrays.npz`` that an analysis saved (it never trains
or computes curvature), draws the paper's layout, writes ``<stem>.png`` and ``<stem>.pdf`` and
prints one check line::

    CHECK fig2 | stems inside the semicircle edges +-5%; moments 1-4 within 5% | support_m30=0 ... | PASS

Each script has ``main(results_dirs, out_dir) -> Outcome`` and a command line
``python -m paper_figures.<script> <results folder> [...] --out <folder>``; a results folder is a run
folder (holding ``results.json``) or any folder above run folders (a Hydra multirun).
"""

from __future__ import annotations

import argparse
import fnmatch
import io
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np

from curvature import plotting  # noqa: F401  (selects the headless backend before pyplot)
from curvature.errors import SuiteError
from curvature.io import write_bytes_atomic

import matplotlib.pyplot as plt  # noqa: E402

RESULTS = "results.json"


class FigureInputError(SuiteError):
    """The results a figure needs are missing or of the wrong kind."""


# --- reading runs --------------------------------------------------------------------------------
@dataclass
class SavedRun:
    """One run folder: its results.json and (read on first use) its arrays.npz."""

    folder: Path
    results: dict
    _arrays: dict | None = field(default=None, repr=False)

    @classmethod
    def load(cls, folder: Path) -> "SavedRun":
        path = Path(folder) / RESULTS
        try:
            results = json.loads(path.read_text())
        except (OSError, ValueError) as error:
            raise FigureInputError(f"cannot read {path} ({type(error).__name__}): rerun its preset") from None
        return cls(Path(folder), results)

    @property
    def config(self) -> dict:
        return self.results.get("config", {})

    @property
    def metrics(self) -> dict:
        return self.results.get("metrics", {})

    @property
    def checks(self) -> dict:
        return self.results.get("checks", {})

    @property
    def tables(self) -> dict:
        return self.results.get("tables", {})

    @property
    def experiment(self) -> str | None:
        return self.results.get("experiment")

    def get(self, dotted: str, default=None):
        """A value of the resolved config, e.g. ``run.get("dataset.ratio")``."""
        node = self.config
        for part in dotted.split("."):
            if not isinstance(node, dict) or part not in node:
                return default
            node = node[part]
        return node

    @property
    def arrays(self) -> dict:
        if self._arrays is None:
            path = self.folder / "arrays.npz"
            if not path.is_file():
                raise FigureInputError(f"{path} is missing: rerun the run that wrote {self.folder / RESULTS}")
            with np.load(path) as data:
                self._arrays = {k: data[k] for k in data.files}
        return self._arrays

    def array(self, name: str) -> np.ndarray:
        if name not in self.arrays:
            raise FigureInputError(f"{self.folder / 'arrays.npz'} has no array {name!r} "
                                   f"(it has: {', '.join(sorted(self.arrays))})")
        return self.arrays[name]


def find_runs(paths: Iterable[Path | str]) -> list[SavedRun]:
    """Every run folder at or below the given paths, in sorted order, each once."""
    folders: list[Path] = []
    for path in map(Path, paths):
        if (path / RESULTS).is_file():
            found = [path]
        elif path.is_dir():
            found = sorted(p.parent for p in path.rglob(RESULTS))
        else:
            raise FigureInputError(f"results folder {path} does not exist")
        folders += [f for f in found if f.resolve() not in {g.resolve() for g in folders}]
    return [SavedRun.load(f) for f in folders]


def pick(runs: Sequence[SavedRun], artefact: str, *, analysis: str | None = None,
         experiments: Sequence[str] | None = None, where: Callable[[SavedRun], bool] | None = None,
         count: int | None = None) -> list[SavedRun]:
    """The runs an artefact needs; a one-line error naming what is missing and how to make it."""
    chosen = [r for r in runs
              if (analysis is None or r.results.get("analysis") == analysis)
              and (experiments is None or r.experiment in experiments)
              and (where is None or where(r))]
    if not chosen or (count is not None and len(chosen) < count):
        wanted = f"analysis={analysis}" if analysis else "runs"
        if experiments:
            wanted += f" of experiment {' or '.join(experiments)}"
        raise FigureInputError(f"{artefact}: the results folders hold {len(chosen)} {wanted}"
                               f"{f' (needs {count})' if count else ''}; run "
                               f"`python -m paper_figures.make_figures --only {artefact}`")
    return chosen


# --- the check line ------------------------------------------------------------------------------
@dataclass
class Check:
    """An artefact's check of PAPER.md: what it claims, the measured value(s), pass / fail."""

    claim: str
    value: str
    passed: bool

    def line(self, artefact: str) -> str:
        return f"CHECK {artefact} | {self.claim} | {self.value} | {'PASS' if self.passed else 'FAIL'}"


def fmt(value) -> str:
    if isinstance(value, (bool, np.bool_)):
        return str(bool(value))
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if value is None:
        return "n/a"
    value = float(value)
    return "0" if value == 0 else f"{value:.3g}"


def saved_checks(runs: Sequence[SavedRun], patterns: Sequence[str], claim: str,
                 label: Callable[[SavedRun], str] | None = None) -> Check:
    """Combine the analyses' own checks (names matched by glob patterns) over runs: all must pass."""
    parts, passed = [], True
    for run in runs:
        prefix = f"{label(run)}: " if label and len(runs) > 1 else ""
        for pattern in patterns:
            names = sorted(n for n in run.checks if fnmatch.fnmatch(n, pattern))
            if not names:
                parts.append(f"{prefix}{pattern} missing")
                passed = False
            for name in names:
                c = run.checks[name]
                parts.append(f"{prefix}{name}={fmt(c['value'])}" + ("" if c["passed"] else " (fail)"))
                passed &= bool(c["passed"])
    return Check(claim, ", ".join(parts), passed)


# --- drawing and saving --------------------------------------------------------------------------
def panel_label(ax, letter: str) -> None:
    """The paper's panel letter, (a), (b), ... in the top-left corner."""
    ax.text(-0.02, 1.02, f"({letter})", transform=ax.transAxes, fontsize=10, fontweight="bold",
            ha="right", va="bottom")


def grid(rows: int, cols: int, width: float = 3.6, height: float = 2.9):
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    return fig, axes


def save_figure(fig, out_dir: Path, stem: str, dpi: int = 150) -> list[Path]:
    """Write ``stem.png`` and ``stem.pdf`` atomically; close the figure; return the paths."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    paths = []
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=dpi if ext == "png" else None, bbox_inches="tight",
                    metadata={"CreationDate": None} if ext == "pdf" else {"Software": None})
        path = out_dir / f"{stem}.{ext}"
        write_bytes_atomic(path, buffer.getvalue())
        paths.append(path)
    plt.close(fig)
    return paths


@dataclass
class Outcome:
    """What a figure script produced: the artefact, its files and its check."""

    artefact: str
    figures: list[Path]
    check: Check
    runs: list[SavedRun] = field(default_factory=list)


def finish(artefact: str, fig, out_dir: Path, stem: str, check: Check, runs: Sequence[SavedRun]) -> Outcome:
    figures = save_figure(fig, out_dir, stem)
    print(check.line(artefact), flush=True)
    return Outcome(artefact, figures, check, list(runs))


def cli(artefact: str, main: Callable[[Sequence[Path], Path], Outcome], argv=None) -> int:
    """``python -m paper_figures.<script> RESULTS... [--out DIR]``: exit 0 on pass, 1 on fail, 2 on bad input."""
    parser = argparse.ArgumentParser(prog=f"python -m paper_figures.{artefact}",
                                     description=f"Draw the paper's {artefact} from saved results.")
    parser.add_argument("results", nargs="+", type=Path, help="run folders, or folders above them (multiruns)")
    parser.add_argument("--out", type=Path, default=Path("."), help="where the PNG and PDF go (default: .)")
    args = parser.parse_args(argv)
    try:
        outcome = main(args.results, args.out)
    except SuiteError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for path in outcome.figures:
        print(f"figure: {path}")
    return 0 if outcome.check.passed else 1
