"""The one entry point: ``python -m experiments.run [group=option ...] [key=value ...]``.

A thin ``@hydra.main`` shell: it composes ``conf/config.yaml``, points ``output_dir`` at Hydra's run
folder and calls ``experiments.<analysis>.run(cfg)``. Bad input (a ``SuiteError``) is printed as one
line on stderr and exits with status 2; an unknown group option fails in Hydra with its list of
choices.
"""

from __future__ import annotations

import importlib
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from curvature.errors import SuiteError
from experiments.runtime import report_user_error


def dispatch(cfg: DictConfig) -> dict:
    """Run the analysis named by ``cfg.analysis.name`` and return its results."""
    module = importlib.import_module(f"experiments.{cfg.analysis.name}")
    return module.run(cfg)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> None:
    with open_dict(cfg):
        cfg.output_dir = HydraConfig.get().runtime.output_dir
    try:
        results = dispatch(cfg)
    except SuiteError as error:
        report_user_error(error)
        sys.exit(2)
    checks = results.get("checks", {})
    failed = [name for name, c in checks.items() if not c["passed"]]
    verdict = (f"{len(checks) - len(failed)}/{len(checks)} checks passed" +
               (f" (failed: {', '.join(failed)})" if failed else "")) if checks else "done"
    print(f"{results['run_name']}: {verdict}; results in {cfg.output_dir}/results.json")
    for name in results.get("files", {}).get("figures", []):
        if name.endswith(".png"):
            print(f"figure: {cfg.output_dir}/{name}")


if __name__ == "__main__":
    main()
