"""The saved Lanczos state of ``analysis=spectrum``: checkpoints, ``resume=true``, partial results.

A spectrum run with ``analysis.checkpoint_every=k > 0`` (native engine) writes
``lanczos-state-<operator>.pt`` (``matrix`` for matrix datasets; ``<checkpoint>-<operator>`` for a folder of
checkpoints, :mod:`experiments.spectrum_checkpoints`) into its run folder, atomically,
every ``k`` steps and when that operator's Lanczos run ends; the files are deleted once
``results.json`` is in place. After a crash or a kill,

    python -m experiments.run <same overrides> resume=true hydra.run.dir=<the run folder>

continues every operator from its file (an operator that had finished is not recomputed) and gives
the tridiagonal of an uninterrupted run. The file holds a fingerprint of the config: every key that
decides the operator or the start vectors. A resume whose config differs in such a key is refused,
naming it; keys in FREE_KEYS (step count, plotting, checks, device, logging) may change.
"""

from __future__ import annotations

import logging
import tempfile
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch

from curvature.errors import SuiteError
from curvature.io import torch_save_atomic
from curvature.lanczos import LanczosNumericalError
from curvature.lanczos_basis import BASIS_KINDS
from experiments import validate as V

log = logging.getLogger(__name__)
STATE_PREFIX = "lanczos-state-"
BASIS_PREFIX = "lanczos-basis-"
#: Keys that do not change the Lanczos sequence (or only at rounding level): free to differ on resume.
FREE_KEYS = ("output_dir", "overwrite", "resume", "logger", "run_name", "experiment_id", "device",
             "distributed", "analysis.num_steps", "analysis.report_steps", "analysis.checkpoint_every",
             "analysis.lanczos_engine", "analysis.operators", "analysis.save_ritz_vectors",
             "analysis.exact_max_dim", "analysis.histogram_bins", "analysis.show_diagonal",
             "analysis.tolerances", "analysis.compare_vectors", "analysis.expect_negative_mass",
             "analysis.require_checkpoint", "analysis.negative_band", "operator.hvp_mode",
             "operator.check_deterministic", "operator.cache", "operator.layerwise",
             "analysis.basis_device", "analysis.basis_dir", "analysis.basis_chunk_mb")


def validate(cfg) -> dict:
    """``analysis.checkpoint_every``, ``analysis.lanczos_engine`` and where the basis lives, checked
    together."""
    every = V.integer(cfg, "analysis.checkpoint_every", minimum=0, example="analysis.checkpoint_every=10")
    engine = V.choice(cfg, "analysis.lanczos_engine", ["native", "gpytorch"])
    if engine == "gpytorch" and every > 0:
        raise V.ConfigError("analysis.checkpoint_every", every, "only the native engine can save its "
                            "state (GPyTorch's loop cannot be checkpointed)", "analysis.checkpoint_every=0")
    return {"checkpoint_every": every, "lanczos_engine": engine, **_validate_basis(cfg, engine)}


def _validate_basis(cfg, engine: str) -> dict:
    """``analysis.basis_device`` / ``basis_dir`` / ``basis_chunk_mb``; a disk folder is probed now,
    before any work (null: the run folder, which the run harness probes)."""
    kind = V.choice(cfg, "analysis.basis_device", list(BASIS_KINDS), "analysis.basis_device=cpu")
    if kind != "device" and engine != "native":
        raise V.ConfigError("analysis.basis_device", kind, "only the native engine streams its basis "
                            "(GPyTorch keeps it on the device)", "analysis.lanczos_engine=native")
    folder = V.get(cfg, "analysis.basis_dir", None)
    if folder is not None and kind == "disk":
        try:
            Path(folder).mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=folder):
                pass
        except OSError as error:
            raise V.ConfigError("analysis.basis_dir", str(folder), "the Lanczos basis file cannot be written "
                                f"there ({error.strerror or error})",
                                "analysis.basis_dir=<a writable folder>") from None
    return {"basis_device": kind, "basis_dir": None if folder is None else Path(folder),
            "basis_chunk_mb": V.positive_number(cfg, "analysis.basis_chunk_mb", "analysis.basis_chunk_mb=256")}


def basis_path(run, name: str) -> Path:
    """The file of operator ``name``'s disk basis (one per process in a distributed run)."""
    folder = run.settings.get("basis_dir") or run.out_dir
    rank = f"-rank{run.rank}" if getattr(run, "dist_info", None) else ""
    return Path(folder) / f"{BASIS_PREFIX}{name}{rank}.bin"


def state_path(run, name: str) -> Path:
    return run.out_dir / f"{STATE_PREFIX}{name}.pt"


def fingerprint(config: dict, free_keys: tuple[str, ...] = FREE_KEYS) -> dict[str, Any]:
    """The resolved config flattened to dotted keys, without ``free_keys`` (and the keys below them)."""
    flat: dict[str, Any] = {}

    def walk(node, prefix):
        if isinstance(node, dict):
            for key, value in node.items():
                walk(value, f"{prefix}{key}.")
        else:
            key = prefix[:-1]
            if not any(key == free or key.startswith(free + ".") for free in free_keys):
                flat[key] = node
    walk(config, "")
    return flat


def refuse_differences(ours: dict[str, Any], theirs: dict[str, Any], path: Path) -> None:
    """A one-line ConfigError naming the first key whose value differs between this run's fingerprint
    and the one saved in ``path`` (names and ``_target_`` first: they explain the rest)."""
    def order(key):
        return not key.endswith(("name", "_target_")), key
    for key in sorted(set(ours) | set(theirs), key=order):
        if ours.get(key, "<unset>") != theirs.get(key, "<unset>"):
            raise V.ConfigError(key, ours.get(key, "<unset>"), f"differs from {theirs.get(key, '<unset>')!r}, "
                                f"the value {Path(path).name} was computed with; resume needs the same",
                                f"{key}={theirs.get(key)} (or resume=null to start afresh)")


def load_states(run, names: list[str]) -> dict[str, dict]:
    """With ``resume=true``: the saved state of each operator that has one, checked against this
    run's config. Nothing to resume, an unreadable file or a differing key is a one-line error."""
    if run.resume is not True:
        return {}
    if run.settings["lanczos_engine"] != "native":
        raise V.ConfigError("analysis.lanczos_engine", "gpytorch", "resume=true continues the native "
                            "engine's saved state", "analysis.lanczos_engine=native")
    paths = {name: state_path(run, name) for name in names}
    if not any(p.is_file() for p in paths.values()):
        raise V.ConfigError("resume", True, f"nothing to resume: no {STATE_PREFIX}"
                            f"{{{','.join(names)}}}.pt in {run.out_dir}",
                            "hydra.run.dir=<the folder of the interrupted run>, or resume=null to start afresh")
    ours = fingerprint(run.config)
    states = {}
    for name, path in paths.items():
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as error:
            raise SuiteError(f"{path} is not a readable Lanczos state ({type(error).__name__}): delete "
                             "it to start that operator afresh") from None
        theirs = state.get("fingerprint") if isinstance(state, dict) else None
        if not isinstance(theirs, dict):
            raise SuiteError(f"{path} holds no config fingerprint: not a state of analysis=spectrum")
        refuse_differences(ours, theirs, path)
        states[name] = state
    return states


def lanczos_options(run, name: str, states: dict[str, dict]) -> dict:
    """Keyword arguments of :func:`curvature.lanczos.lanczos` for operator ``name``."""
    s = run.settings
    options: dict[str, Any] = {"engine": s["lanczos_engine"]}
    if s.get("basis_device", "device") != "device":
        options.update(basis_device=s["basis_device"], basis_chunk_mb=s["basis_chunk_mb"],
                       basis_file=basis_path(run, name))
    if s["checkpoint_every"] > 0:
        path, print_ = state_path(run, name), fingerprint(run.config)

        def save(state: dict) -> None:
            if getattr(run, "is_main", True):  # distributed: every rank holds the same state
                torch_save_atomic(path, {**state, "fingerprint": print_, "operator": name})
                log.info("lanczos (%s): step %d of %d saved to %s", name, int(state["step"]), s["num_steps"],
                         path.name)  # the progress of a long run, in run.log
        options.update(checkpoint=save, checkpoint_every=s["checkpoint_every"])
    if name in states:
        options["resume_state"] = states[name]
        saved = states[name].get("basis_file")  # a disk basis: found beside the state if the folder moved
        if saved is not None and not Path(saved).is_file() and basis_path(run, name).is_file():
            options["resume_state"] = {**states[name], "basis_file": str(basis_path(run, name))}
        step = int(states[name]["step"])
        # curvature.lanczos notes the resume too; this note says it with the file: keep one of the two
        for n in {step, min(step, s["num_steps"])}:
            library = f"resumed from the saved Lanczos state after step {n}"
            run.superseded_notes |= {library, f"{name}: {library}"}
        run.note(f"{name}: resumed from {state_path(run, name).name} after step {step} "
                 "(the cost table covers the resumed part only)")
    return options


def remove_states(run, names: list[str]) -> None:
    """After results.json is in place the saved states (and their disk bases) are of no further use."""
    for name in names:
        if (getattr(run, "settings", None) or {}).get("basis_device") == "disk":  # every process its own file
            basis_path(run, name).unlink(missing_ok=True)
        if getattr(run, "is_main", True):
            state_path(run, name).unlink(missing_ok=True)


@contextmanager
def keep_partial(run, name: str, prefix: str = ""):
    """On a NaN/Inf product: keep the steps completed before it as ``<prefix>tridiagonal`` etc.
    (arrays.partial.npz) and record them under ``completed`` in results.partial.json. The Lanczos run
    is a phase of the run (timed in run.log)."""
    phase = run.phase(f"lanczos ({name})") if hasattr(run, "phase") else nullcontext()
    try:
        with phase:
            yield
    except LanczosNumericalError as error:
        done = error.partial
        if done is not None:
            for key in ("tridiagonal", "ritz_values", "ritz_weights", "mask"):
                run.array(f"{prefix}{key}", getattr(done, key))
        run.completed[name] = {"lanczos_steps_completed": 0 if done is None else int(done.num_steps.max()),
                               "failed_at_step": error.step}
        raise
    run.completed[name] = {"lanczos_finished": True}
