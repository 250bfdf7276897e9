"""Experiment tracking. The only module of the suite that imports wandb.

``logger=wandb`` (the default) runs W&B in offline mode unless ``logger.mode=online``: the run's
files land in ``<run folder>/wandb/`` and can be uploaded later with ``wandb sync``. No login is ever
needed offline. ``logger=none`` logs nothing. :func:`validate_logger` checks the logger settings and
``WANDB_MODE`` before any work, so that a bad mode or a missing login is one line, not a pydantic dump
after the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable
from urllib.parse import urlparse

from curvature.errors import SuiteError

MODES = ("offline", "online", "disabled")
#: Values of WANDB_MODE that wandb itself accepts.
ENV_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")
LOGGERS = ("wandb", "none")


def _has_api_key() -> bool:
    """A W&B key in WANDB_API_KEY or in the netrc file wandb reads (NETRC, ~/.netrc, ~/_netrc)."""
    if os.environ.get("WANDB_API_KEY", "").strip():
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL") or "https://api.wandb.ai").hostname or "api.wandb.ai"
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for name in candidates:
        try:
            if host in Path(name).expanduser().read_text():
                return True
        except OSError:
            continue
    return False


def validate_logger(logger_cfg: dict) -> dict:
    """Check ``logger.*`` and the WANDB_MODE variable up-front; return the logger settings to use.

    An empty WANDB_MODE (set but blank) counts as unset. Offline never needs a login; online does, and
    without a key it fails here instead of prompting or failing midway."""
    from experiments.validate import ConfigError

    kind = logger_cfg.get("name", "none")
    if kind not in LOGGERS:
        raise ConfigError("logger.name", kind, f"must be one of {', '.join(LOGGERS)}", "logger=wandb")
    if kind == "none":
        return dict(logger_cfg)
    mode = logger_cfg.get("mode", "offline")
    if mode not in MODES:
        raise ConfigError("logger.mode", mode, f"must be one of {', '.join(MODES)}", "logger.mode=offline")
    env = os.environ.get("WANDB_MODE")
    if env is not None and not env.strip():
        del os.environ["WANDB_MODE"]  # blank: wandb would fail on it after the run; treat as unset
        env = None
    if env is not None and env not in ENV_MODES:
        raise SuiteError(f"environment variable WANDB_MODE={env!r} is invalid: must be one of "
                         f"{', '.join(ENV_MODES)}, or unset (then logger.mode={mode} decides); e.g. "
                         "unset WANDB_MODE")
    online = mode == "online" or (mode != "disabled" and env in ("online", "run", "shared"))
    if online and not _has_api_key():
        source = "logger.mode=online" if mode == "online" else f"WANDB_MODE={env}"
        raise SuiteError(f"{source} needs a W&B API key (none in WANDB_API_KEY or ~/.netrc): run `wandb "
                         "login` or set WANDB_API_KEY, or log offline with logger.mode=offline (the "
                         "default; `wandb sync` uploads later)")
    return {**logger_cfg, "mode": mode}


class NullTracker:
    """Logs nothing (``logger=none``)."""

    run_dir: Path | None = None

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def images(self, paths: Iterable[Path]) -> None:
        pass

    def artifact(self, name: str, paths: Iterable[Path]) -> None:
        pass

    def finish(self, failed: bool = False) -> None:
        pass


class WandbTracker(NullTracker):
    """A W&B run living in ``out_dir/wandb``; ``finish`` must be called (callers use ``finally``)."""

    def __init__(self, out_dir: Path, config: dict, project: str, name: str | None,
                 group: str | None, tags: list[str], mode: str, entity: str | None,
                 job_type: str | None):
        import wandb

        self._wandb = wandb
        os.environ.setdefault("WANDB_SILENT", "true")
        if mode == "offline":
            # Offline runs never need an API key; make sure no login prompt can appear.
            os.environ.setdefault("WANDB_MODE", "offline")
        self.run = wandb.init(project=project, entity=entity, name=name, group=group,
                              tags=tags or None, job_type=job_type, mode=mode, dir=str(out_dir),
                              config=config, reinit="create_new",
                              settings=wandb.Settings(silent=True, console="off",
                                                      x_disable_stats=True, disable_git=False))
        self.run_dir = Path(self.run.dir).parent if self.run.dir else None

    def log(self, values: dict[str, float], step: int | None = None) -> None:
        self.run.log(dict(values), step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def images(self, paths: Iterable[Path]) -> None:
        pictures = {f"figures/{Path(p).stem}": self._wandb.Image(str(p)) for p in paths
                    if str(p).endswith(".png")}
        if pictures:
            self.run.log(pictures)

    def artifact(self, name: str, paths: Iterable[Path]) -> None:
        art = self._wandb.Artifact(name=name, type="results")
        for path in paths:
            art.add_file(str(path))
        self.run.log_artifact(art)

    def finish(self, failed: bool = False) -> None:
        self.run.finish(exit_code=1 if failed else 0)


def make_tracker(logger_cfg: dict, out_dir: Path, config: dict, name: str | None) -> NullTracker:
    """Build the tracker chosen by the ``logger`` config group."""
    kind = logger_cfg.get("name", "none")
    if kind == "none":
        return NullTracker()
    if kind == "wandb":
        return WandbTracker(out_dir, config, project=logger_cfg.get("project", "deep-curvature-suite"),
                            name=name, group=logger_cfg.get("group"), tags=logger_cfg.get("tags") or [],
                            mode=logger_cfg.get("mode", "offline"), entity=logger_cfg.get("entity"),
                            job_type=logger_cfg.get("job_type"))
    raise SuiteError(f"config key logger.name={kind!r} is invalid: must be one of {', '.join(LOGGERS)}; "
                     "e.g. logger=wandb")
