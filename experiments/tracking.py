"""Experiment tracking. The only module of the suite that imports wandb.

``logger=wandb`` (the default) runs W&B in offline mode unless ``logger.mode=online``: the run's
files land in ``<run folder>/wandb/`` and can be uploaded later with ``wandb sync``. No login is ever
needed offline. ``logger=none`` logs nothing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterable


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
    raise ValueError(f"unknown logger {kind!r}")
