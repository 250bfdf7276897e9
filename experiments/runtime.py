"""What every analysis shares: devices, dtypes, seeds, provenance and atomic result files.

An analysis does its work inside ``with Run(cfg, "name", validate=...) as run:`` and calls
``run.metric``, ``run.check``, ``run.array``, ``run.figure`` and finally ``run.finish()``, which writes
``arrays.npz``, the figures (PNG and PDF) and ``results.json`` into the run folder. Everything is first
written to a staging folder and renamed into place, ``results.json`` last, so a run folder holds
either a complete result or none: a failure midway leaves no results file.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import math
import os
import platform
import random
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from curvature.errors import SuiteError
from curvature.io import write_bytes_atomic
from experiments import validate as V
from experiments.tracking import NullTracker, make_tracker

PROJECT_ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "gpytorch", "linear_operator", "hydra-core", "omegaconf", "wandb", "numpy",
            "scipy", "matplotlib")
DTYPES = {"float32": torch.float32, "float64": torch.float64}


# --- devices, dtypes, seeds --------------------------------------------------------------------
def resolve_device(cfg: DictConfig) -> torch.device:
    name = V.choice(cfg, "device", ["auto", "cpu", "cuda"], "device=auto")
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise V.ConfigError("device", name, "CUDA is not available on this machine",
                            "device=auto or device=cpu")
    return torch.device(name)


def resolve_dtype(cfg: DictConfig) -> torch.dtype:
    return DTYPES[V.choice(cfg, "dtype", list(DTYPES), "dtype=float64")]


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- provenance -----------------------------------------------------------------------------
def git_commit() -> dict[str, Any]:
    """The commit of the checkout the suite runs from, and whether it had uncommitted changes."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=PROJECT_ROOT, capture_output=True, text=True,
                              timeout=10)
    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return {"commit": "unknown", "dirty": None}
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip() != ""
        return {"commit": head.stdout.strip(), "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"commit": "unknown", "dirty": None}


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} ({os.cpu_count()} cores, " \
           f"{torch.get_num_threads()} torch threads)"


# --- atomic writes ----------------------------------------------------------------------------
def _json_safe(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    if isinstance(value, torch.Tensor):
        return _json_safe(value.detach().cpu().tolist())
    if isinstance(value, np.ndarray):
        return _json_safe(value.tolist())
    if isinstance(value, (np.floating, np.integer, np.bool_)):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_json_atomic(path: Path, payload: dict) -> None:
    text = json.dumps(_json_safe(payload), indent=2, allow_nan=False)
    write_bytes_atomic(path, (text + "\n").encode())


def save_npz_atomic(path: Path, arrays: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    np.savez(buffer, **{k: (v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v))
                        for k, v in arrays.items()})
    write_bytes_atomic(path, buffer.getvalue())


def save_figure_atomic(fig, out_dir: Path, stem: str) -> list[Path]:
    """Save a matplotlib figure as ``stem.png`` and ``stem.pdf``."""
    paths = []
    for ext in ("png", "pdf"):
        buffer = io.BytesIO()
        fig.savefig(buffer, format=ext, dpi=150 if ext == "png" else None, bbox_inches="tight")
        path = Path(out_dir) / f"{stem}.{ext}"
        write_bytes_atomic(path, buffer.getvalue())
        paths.append(path)
    return paths


# --- the run context --------------------------------------------------------------------------
def output_dir(cfg: DictConfig) -> Path:
    """The run folder: ``cfg.output_dir`` (set by the entry point to Hydra's run folder)."""
    value = OmegaConf.select(cfg, "output_dir", default=None)
    if value:
        return Path(value)
    try:
        from hydra.core.hydra_config import HydraConfig
        return Path(HydraConfig.get().runtime.output_dir)
    except ValueError:
        raise V.ConfigError("output_dir", None, "no run folder: not under Hydra and output_dir unset",
                            "output_dir=outputs/my_run") from None


class Run:
    """Context of one analysis run: validation, seeding, device, tracking, and atomic results."""

    def __init__(self, cfg: DictConfig, analysis: str, validate: Callable[[DictConfig], Any] | None = None):
        self.cfg = cfg
        self.analysis = analysis
        self._validate = validate
        self.metrics: dict[str, float] = {}
        self.checks: dict[str, dict] = {}
        self.arrays: dict[str, Any] = {}
        self.tables: dict[str, Any] = {}
        self.notes: list[str] = []
        self._figures: dict[str, Any] = {}
        self.tracker: NullTracker = NullTracker()
        self.results: dict | None = None

    # context protocol ---------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        self.t0 = time.perf_counter()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        # Validate everything before anything is written anywhere.
        self.seed = V.integer(self.cfg, "seed", minimum=0, example="seed=0")
        self.device = resolve_device(self.cfg)
        self.dtype = resolve_dtype(self.cfg)
        self.settings = self._validate(self.cfg) if self._validate else None
        self.out_dir = output_dir(self.cfg)
        if (self.out_dir / "results.json").exists() and not V.get(self.cfg, "overwrite", False):
            raise V.ConfigError("output_dir", str(self.out_dir),
                                "this folder already holds a results.json", "overwrite=true")
        seed_everything(self.seed)
        self.config = OmegaConf.to_container(self.cfg, resolve=True)
        logger_cfg = V.get(self.cfg, "logger", {"name": "none"})
        self.tracker = make_tracker(logger_cfg, self.out_dir, self.config, name=self.run_name)
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        self.tracker.finish(failed=exc_type is not None)
        for fig in self._figures.values():
            _close(fig)
        return False

    @property
    def run_name(self) -> str:
        return str(V.get(self.cfg, "run_name", self.analysis))

    # collecting results -----------------------------------------------------------------------
    def metric(self, name: str, value: float) -> None:
        self.metrics[name] = float(value)

    def check(self, name: str, value: float, target: str, passed: bool) -> None:
        """A quantitative check of PAPER.md: its measured value, the target in words, pass/fail."""
        self.checks[name] = {"value": float(value), "target": target, "passed": bool(passed)}

    def array(self, name: str, value) -> None:
        self.arrays[name] = value

    def table(self, name: str, rows: list[dict]) -> None:
        self.tables[name] = rows

    def figure(self, fig, stem: str) -> None:
        self._figures[stem] = fig

    def note(self, text: str) -> None:
        self.notes.append(text)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        self.tracker.log(values, step=step)

    # writing ------------------------------------------------------------------------------------
    def finish(self, **extra) -> dict:
        """Write arrays, figures and results.json (last) atomically; log them; return the results."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=self.out_dir))
        try:
            written = []
            if self.arrays:
                save_npz_atomic(staging / "arrays.npz", self.arrays)
                written.append("arrays.npz")
            figures = []
            for stem, fig in self._figures.items():
                figures += [p.name for p in save_figure_atomic(fig, staging, stem)]
            provenance = {**git_commit(), "packages": package_versions(),
                          "python": sys.version.split()[0], "platform": platform.platform(),
                          "hostname": socket.gethostname(), "device": str(self.device),
                          "device_name": device_description(self.device),
                          "dtype": str(self.dtype).replace("torch.", "")}
            self.results = {
                "analysis": self.analysis,
                "experiment": V.get(self.cfg, "experiment_id", None),
                "run_name": self.run_name,
                "metrics": self.metrics,
                "checks": self.checks,
                "all_checks_passed": all(c["passed"] for c in self.checks.values()),
                "tables": self.tables,
                "notes": self.notes,
                **extra,
                "files": {"arrays": "arrays.npz" if self.arrays else None, "figures": figures},
                "config": self.config,
                "provenance": provenance,
                "started_at": self.started_at,
                "wall_time_s": time.perf_counter() - self.t0,
            }
            write_json_atomic(staging / "results.json", self.results)
            for name in written + figures + ["results.json"]:  # results.json last
                os.replace(staging / name, self.out_dir / name)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
        self._log_to_tracker(figures)
        return self.results

    def _log_to_tracker(self, figures: list[str]) -> None:
        scalars = {f"metrics/{k}": v for k, v in self.metrics.items()}
        scalars.update({f"checks/{k}": float(c["value"]) for k, c in self.checks.items()})
        scalars.update({f"checks/{k}_passed": int(c["passed"]) for k, c in self.checks.items()})
        self.tracker.summary({**scalars, "all_checks_passed": int(self.results["all_checks_passed"]),
                              "wall_time_s": self.results["wall_time_s"]})
        self.tracker.images(self.out_dir / f for f in figures)
        files = [self.out_dir / "results.json"] + \
            ([self.out_dir / "arrays.npz"] if self.results["files"]["arrays"] else [])
        self.tracker.artifact(f"{self.analysis}-results", files)


def _close(fig) -> None:
    import matplotlib.pyplot as plt
    plt.close(fig)


def report_user_error(error: SuiteError) -> None:
    print(f"error: {error}", file=sys.stderr)
