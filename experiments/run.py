"""The one entry point: ``python -m experiments.run [group=option ...] [key=value ...]``.

A thin ``@hydra.main`` shell: it composes ``conf/config.yaml``, points ``output_dir`` at Hydra's run
folder and calls ``experiments.<analysis>.run(cfg)``. Every error reaches the user as one line on
stderr (:mod:`experiments.harness`): bad input as ``error: ...`` with exit status 2, anything else as
``internal error: ...`` with exit status 3 and the traceback in ``<run folder>/error.log``. An unknown
group option or key is one short paragraph with Hydra's list of choices.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from experiments import harness
from experiments import validate as V
from experiments.config_source import config_dir, config_path
from experiments.schema import check_config


def dispatch(cfg: DictConfig) -> dict:
    """Run the analysis named by ``cfg.analysis.name`` and return its results."""
    check_config(cfg)
    return _analysis_module(cfg).run(cfg)


def _analysis_module(cfg: DictConfig):
    name = V.get(cfg, "analysis.name")
    known = sorted(p.stem for p in (config_dir() / "analysis").glob("*.yaml"))
    found = isinstance(name, str) and name.isidentifier() and \
        importlib.util.find_spec(f"experiments.{name}") is not None
    module = importlib.import_module(f"experiments.{name}") if found else None
    if module is None or not callable(getattr(module, "run", None)):
        raise V.ConfigError("analysis.name", name, f"no such analysis (choose one of: {', '.join(known)})",
                            f"analysis={known[0] if known else 'spectrum'}")
    return module


@hydra.main(version_base="1.3", config_path=config_path(), config_name="config")
def hydra_main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    code = harness.run_task(cfg, dispatch, _summary)
    if code:
        sys.exit(code)


def _summary(cfg: DictConfig, results: dict) -> None:
    checks = results.get("checks", {})
    failed = [name for name, c in checks.items() if not c["passed"]]
    verdict = (f"{len(checks) - len(failed)}/{len(checks)} checks passed" +
               (f" (failed: {', '.join(failed)})" if failed else "")) if checks else "done"
    print(f"{results['run_name']}: {verdict}; results in {cfg.output_dir}/results.json")
    for name in results.get("files", {}).get("figures", []):
        if name.endswith(".png"):
            print(f"figure: {cfg.output_dir}/{name}")


def main() -> None:
    """The command line: Hydra's errors and the run's as one line each (:func:`harness.cli`)."""
    harness.cli(hydra_main)


if __name__ == "__main__":
    main()
