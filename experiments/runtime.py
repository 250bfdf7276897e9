"""What every analysis shares: devices, dtypes, seeds, provenance and atomic result files.

An analysis does its work inside ``with Run(cfg, "name", validate=...) as run:`` and calls
``run.metric``, ``run.check``, ``run.array``, ``run.figure`` and finally ``run.finish()``, which writes
``arrays.npz``, the figures (PNG and PDF) and ``results.json`` into the run folder. Everything is first
written to a staging folder and renamed into place, ``results.json`` last, so a run folder holds
either a complete result or none: a failure midway leaves no results file.

The run claims its folder with ``.run.lock`` (:mod:`experiments.run_folder`) before writing anything,
removes what an interrupted run left there (``.staging-*`` folders, ``.*.tmp`` files), and logs its
phases with their timings to ``run.log`` (``with run.phase("name"):``). A failure after some work keeps
what completed in ``results.partial.json``.
"""

from __future__ import annotations

import datetime as _dt
import io
import json
import logging
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
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from curvature.distributed import backend_for, env_info, env_info_from_submitit
from curvature.errors import NumericalError, SuiteError
from curvature.io import remove_stale_temporaries, write_bytes_atomic
from experiments import validate as V
from experiments.run_folder import RunLock
from experiments.tracking import NullTracker, make_tracker, validate_logger

log = logging.getLogger(__name__)
RUN_LOG = "run.log"

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


def resolve_distributed(cfg: DictConfig, device: torch.device):
    """``distributed=true`` (data sharded) or ``fsdp`` (model and Lanczos vectors sharded too): this
    process's rank info from torchrun's variables, and its device.

    Validates only (no process group yet). CUDA runs use ``cuda:LOCAL_RANK``, one GPU per process.
    """
    flag = V.get(cfg, "distributed", False)
    if not (isinstance(flag, bool) or flag == "fsdp"):
        raise V.ConfigError("distributed", flag, "must be true or false, or fsdp", "distributed=true")
    if not flag:
        return None, device
    word = "fsdp" if flag == "fsdp" else "true"
    info = env_info() or env_info_from_submitit()
    if info is None:
        raise V.ConfigError("distributed", flag, f"distributed={word} needs torchrun's RANK, WORLD_SIZE, "
                            "LOCAL_RANK, MASTER_ADDR and MASTER_PORT (or a SLURM/submitit job); launch with torchrun",
                            f"torchrun --nproc_per_node=2 -m experiments.run ... distributed={word}")
    if device.type == "cuda":
        visible = torch.cuda.device_count()  # 1 where the scheduler binds one GPU to each task
        if info.local_rank >= visible and visible != 1:
            raise V.ConfigError("distributed", True, f"LOCAL_RANK {info.local_rank} has no GPU "
                                f"({visible} visible)", "torchrun --nproc_per_node=<number of GPUs>")
        device = torch.device("cuda", info.local_rank if info.local_rank < visible else 0)
    return info, device


#: Analyses that can continue a killed run, and the state they continue from.
RESUMABLE = {"spectrum": "its Lanczos state (lanczos-state-<operator>.pt)",
             "train": "its last checkpoint-XXXXX.pt"}
PARTIAL_RESULTS = "results.partial.json"
PARTIAL_ARRAYS = "arrays.partial.npz"


def resolve_resume(cfg: DictConfig, analysis: str):
    """``resume``: None (start afresh), True (continue the run in this output folder from its saved
    state) or, for analysis=train, the path of a checkpoint to continue from."""
    value = V.get(cfg, "resume", None)
    if value is None or value is False:
        return None
    if analysis not in RESUMABLE:
        raise V.ConfigError("resume", value, f"analysis={analysis} saves no state to continue from "
                            f"(resumable: {', '.join(RESUMABLE)})", "resume=null")
    if value is True or (analysis == "train" and isinstance(value, str)):
        return value
    raise V.ConfigError("resume", value, "must be true (continue the run in this output folder from "
                        f"{RESUMABLE[analysis]})" + (" or a checkpoint path" if analysis == "train" else ""),
                        "resume=true hydra.run.dir=<the run folder>")


def ensure_writable(folder: Path) -> None:
    """Fail before any work when the run folder cannot be created or written (read-only, a file)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise V.ConfigError("output_dir", str(folder), f"cannot write there ({error.strerror or error})",
                            "hydra.run.dir=<a writable folder>") from None


def latest_checkpoint(cfg: DictConfig) -> str:
    """``resume=true`` for analysis=train: the newest checkpoint-XXXXX.pt in the run folder."""
    folder = output_dir(cfg)
    found = sorted(folder.glob("checkpoint-[0-9]*.pt"))
    if not found:
        raise V.ConfigError("resume", True, f"nothing to resume: no checkpoint-XXXXX.pt in {folder}",
                            "hydra.run.dir=<the folder of the interrupted run>, or resume=<checkpoint path>")
    return str(found[-1])


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
    if not (PROJECT_ROOT / ".git").exists():
        # an installed copy (site-packages): a git repository around the venv is not the suite's code
        from curvature import __version__
        return {"commit": "unknown", "dirty": None, "installed_version": __version__}
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
        self.completed: dict[str, Any] = {}  # what finished so far, for results.partial.json
        self.logged: list[dict] = []          # rows given to run.log (training curves)
        self.dist_info = None  # distributed=true: rank, world_size, local_rank (EnvInfo)
        self._owns_process_group = False
        self.phases: list[dict] = []          # completed phases and their seconds (run.log, results)
        self.current_phase: str | None = None
        self.failed_phase: str | None = None     # the innermost phase an error left
        self.superseded_notes: set[str] = set()  # notes said better by one already given
        self._lock: RunLock | None = None
        self._log_handler: logging.Handler | None = None

    @property
    def rank(self) -> int:
        return self.dist_info.rank if self.dist_info else 0

    @property
    def world_size(self) -> int:
        return self.dist_info.world_size if self.dist_info else 1

    @property
    def fsdp(self) -> bool:
        """``distributed=fsdp``: parameters sharded by FSDP2, and the Lanczos vectors like them."""
        return bool(self.dist_info) and V.get(self.cfg, "distributed", False) == "fsdp"

    @property
    def is_main(self) -> bool:
        """Only rank 0 writes results, figures and W&B; the other ranks only compute."""
        return self.rank == 0

    # context protocol ---------------------------------------------------------------------------
    def __enter__(self) -> "Run":
        self.t0 = time.perf_counter()
        self.started_at = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        # Validate everything before anything is written anywhere.
        self.seed = V.integer(self.cfg, "seed", minimum=0, maximum=2**63 - 1, example="seed=0")
        self.device = resolve_device(self.cfg)
        self.dtype = resolve_dtype(self.cfg)
        self.dist_info, self.device = resolve_distributed(self.cfg, self.device)
        self.resume = resolve_resume(self.cfg, self.analysis)
        self.settings = self._validate(self.cfg) if self._validate else None
        if self.dist_info and not (isinstance(self.settings, dict) and self.settings.get("supports_distributed")):
            raise V.ConfigError("distributed", True, f"analysis={analysis_label(self)} does not shard its "
                                "work; only analysis=spectrum on an image dataset does", "distributed=false")
        logger_cfg = validate_logger(V.get(self.cfg, "logger", {"name": "none"})) if self.is_main \
            else {"name": "none"}
        self.config = OmegaConf.to_container(self.cfg, resolve=True)
        self.out_dir = output_dir(self.cfg)
        ensure_writable(self.out_dir)
        if self.is_main:  # distributed=true: rank 0 owns the folder, the other ranks write nothing
            self._lock = RunLock(self.out_dir).claim()
        try:
            self._start_log()
            if self._lock and self._lock.stale_note():
                self._say(self._lock.stale_note())
            if self.is_main:
                removed = remove_stale_temporaries(self.out_dir)  # safe: we hold the folder
                if removed:
                    self._say(f"removed {len(removed)} leftover(s) of an interrupted run: {', '.join(removed)}")
            if (self.out_dir / "results.json").exists() and not V.get(self.cfg, "overwrite", False):
                raise V.ConfigError("output_dir", str(self.out_dir),
                                    "this folder already holds a results.json", "overwrite=true")
            seed_everything(self.seed)
            if self.dist_info:
                self._init_process_group()
            self.tracker = make_tracker(logger_cfg, self.out_dir, self.config, name=self.run_name)
        except BaseException:
            self._release()
            raise
        seconds = time.perf_counter() - self.t0
        self.phases.append({"name": "setup", "seconds": seconds})
        log.info("phase setup (validation, run folder, seeds): %.1f s", seconds)
        return self

    def _say(self, text: str) -> None:
        self.note(text)
        log.info(text)

    def _start_log(self) -> None:
        """Send the suite's log records to ``run.log`` in the run folder: Hydra's job logging does that
        already; without Hydra (``dispatch(cfg)`` from Python) a handler of our own does."""
        suite = logging.getLogger("experiments")
        if suite.level == logging.NOTSET or suite.level > logging.INFO:
            suite.setLevel(logging.INFO)
        target = str((self.out_dir / RUN_LOG).resolve())
        handlers = logging.getLogger().handlers + suite.handlers
        if any(getattr(h, "baseFilename", None) == target for h in handlers) or not self.is_main:
            return
        self._log_handler = logging.FileHandler(target)
        self._log_handler.setFormatter(logging.Formatter("[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
        suite.addHandler(self._log_handler)

    def _release(self) -> None:
        if self._log_handler is not None:
            logging.getLogger("experiments").removeHandler(self._log_handler)
            self._log_handler.close()
            self._log_handler = None
        if self._lock is not None:
            self._lock.release()

    @contextmanager
    def phase(self, name: str):
        """Time a part of the run: its start and end go to run.log, and a completed phase is listed in
        results.json (and in results.partial.json when a later phase fails)."""
        outer, self.current_phase = self.current_phase, name
        log.info("phase %s: started", name)
        start = time.perf_counter()
        try:
            yield
        except BaseException as error:
            self.failed_phase = self.failed_phase or name
            log.info("phase %s: failed after %.1f s (%s)", name, time.perf_counter() - start,
                     type(error).__name__)
            raise
        finally:
            self.current_phase = outer
        seconds = time.perf_counter() - start
        self.phases.append({"name": name, "seconds": seconds})
        log.info("phase %s: %.1f s", name, seconds)

    def _init_process_group(self) -> None:
        import torch.distributed as dist
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if not dist.is_initialized():
            dist.init_process_group(backend_for(self.device), init_method="env://")
            self._owns_process_group = True
        self.note(f"distributed: {self.world_size} processes, backend {dist.get_backend()}")

    def __exit__(self, exc_type, exc, tb) -> bool:
        try:
            if exc is not None and self.is_main and self.results is None and \
                    (isinstance(exc, NumericalError) or self.completed or self.arrays or self.logged
                     or len(self.phases) > 1):
                self._keep_partial(exc)
            if exc is None:
                log.info("run finished in %.1f s", time.perf_counter() - self.t0)
            else:
                # the error itself is the command line's one line (also appended to run.log there)
                log.info("run failed after %.1f s%s (%s)", time.perf_counter() - self.t0,
                         f" in phase {self.failed_phase}" if self.failed_phase else "", type(exc).__name__)
            self.tracker.finish(failed=exc_type is not None)
            if self._owns_process_group:
                import torch.distributed as dist
                dist.destroy_process_group()
                self._owns_process_group = False
            for fig in self._figures.values():
                _close(fig)
        finally:
            self._release()
        return False

    def _keep_partial(self, exc: BaseException) -> None:
        """Write results.partial.json; a SuiteError's message then says where it is, any other error
        carries the path as ``partial_results`` (the command line prints it)."""
        try:
            path = self.partial(exc)
        except (OSError, SuiteError) as error:  # e.g. the disk is full: keep the first error
            log.warning("could not write %s: %s", PARTIAL_RESULTS, error)
            return
        log.info("what completed is in %s", path)
        if isinstance(exc, SuiteError) and exc.args and isinstance(exc.args[0], str):
            exc.args = (f"{exc.args[0]}; what completed is in {path}",) + exc.args[1:]
        else:
            try:
                exc.partial_results = str(path)
            except AttributeError:
                pass

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
        if text not in self.superseded_notes and text not in self.notes:
            self.notes.append(text)

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        self.logged.append({"step": step, **values})
        self.tracker.log(values, step=step)

    def partial(self, error: BaseException) -> Path:
        """Write ``results.partial.json`` (``"partial": true``, the error, ``completed``, the metrics,
        tables, notes and logged rows so far) and ``arrays.partial.npz``, atomically; never
        ``results.json``. Returns the JSON file's path."""
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if self.arrays:
            save_npz_atomic(self.out_dir / PARTIAL_ARRAYS, self.arrays)
        path = self.out_dir / PARTIAL_RESULTS
        write_json_atomic(path, {
            "partial": True, "analysis": self.analysis, "run_name": self.run_name,
            "error": f"{type(error).__name__}: {error}", "completed": self.completed,
            "metrics": self.metrics, "checks": self.checks, "tables": self.tables, "notes": self.notes,
            "logged": self.logged, "phases": self.phases, "failed_in_phase": self.failed_phase,
            "files": {"arrays": PARTIAL_ARRAYS if self.arrays else None},
            "config": getattr(self, "config", None), "started_at": self.started_at,
            "wall_time_s": time.perf_counter() - self.t0})
        return path

    # writing ------------------------------------------------------------------------------------
    def finish(self, **extra) -> dict:
        """Write arrays, figures and results.json (last) atomically; log them; return the results.

        Ranks other than 0 (``distributed=true``) write nothing and return the results in memory.
        """
        if not self.is_main:
            self.results = {"analysis": self.analysis, "run_name": self.run_name, "rank": self.rank,
                            "metrics": self.metrics, "checks": self.checks, "notes": self.notes, **extra,
                            "files": {"arrays": None, "figures": []}}
            return self.results
        with self.phase("write results"):
            return self._finish(extra)

    def _finish(self, extra: dict) -> dict:
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
                          "dtype": str(self.dtype).replace("torch.", ""),
                          "world_size": self.world_size}
            self.results = {
                "analysis": self.analysis,
                "experiment": V.get(self.cfg, "experiment_id", None),
                "run_name": self.run_name,
                "metrics": self.metrics,
                "checks": self.checks,
                "all_checks_passed": all(c["passed"] for c in self.checks.values()),
                "tables": self.tables,
                "notes": self.notes,
                "phases": self.phases,
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
            for name in (PARTIAL_RESULTS, PARTIAL_ARRAYS):  # left by an earlier, failed attempt
                (self.out_dir / name).unlink(missing_ok=True)
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


def analysis_label(run: "Run") -> str:
    kind = run.settings.get("kind") if isinstance(run.settings, dict) else None
    return run.analysis + (f" on a {kind} dataset" if kind else "")


def _close(fig) -> None:
    import matplotlib.pyplot as plt
    plt.close(fig)

