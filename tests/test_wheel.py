"""Installable like a library: the wheel holds the code and the configs, and its `deep-curvature` command
runs a paper preset from a folder outside the checkout.

The wheel is built from a copy of the checkout and installed, without the editable project, into a fresh
venv that sees the test environment's dependencies through a .pth path line (whose own .pth files, the
editable finder among them, stay inactive). About 30 s on 2 CPU cores: build 5 s, install 4 s, the run.
"""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CODE = ("curvature", "experiments", "paper_figures")
#: what the copy leaves out: environments, run folders, build leftovers (a stale build/lib would leak
#: deleted modules into the wheel)
SKIP = shutil.ignore_patterns(".venv", ".git", "outputs", "multirun", "wandb", "build", "dist", "*.egg-info",
                              "__pycache__", ".pytest_cache")


def _packages_in_checkout() -> set[str]:
    found = {".".join(d.relative_to(ROOT).parts) for top in CODE for d in [ROOT / top, *(ROOT / top).rglob("*")]
             if d.is_dir() and (d / "__init__.py").is_file()}
    conf = ROOT / "conf"
    found |= {".".join(["experiments", "conf", *d.relative_to(conf).parts]) for d in [conf, *conf.rglob("*")]
              if d.is_dir() and d.name != "__pycache__" and any(d.rglob("*.yaml"))}
    return found


def test_pyproject_lists_every_package_and_config_folder():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert set(config["tool"]["setuptools"]["packages"]) == _packages_in_checkout()
    assert config["project"]["scripts"]["deep-curvature"] == "experiments.run:main"


def _run(*args, **kwargs) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=300, **kwargs)
    assert proc.returncode == 0, f"{' '.join(map(str, args))}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
    return proc


def test_the_installed_command_runs_a_preset_from_any_folder(tmp_path):
    src, dist, venv, elsewhere = (tmp_path / n for n in ("src", "dist", "venv", "elsewhere"))
    shutil.copytree(ROOT, src, ignore=SKIP)
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "--no-input"]
    _run(*pip, "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", dist, src)
    (wheel,) = dist.glob("deep_curvature_suite-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    yaml_files = sorted(str(p.relative_to(ROOT)) for p in (ROOT / "conf").rglob("*.yaml"))
    assert sorted(n.removeprefix("experiments/") for n in names if n.endswith(".yaml")) == yaml_files
    assert "experiments/conf/__init__.py" in names and "curvature/operators.py" in names

    _run(sys.executable, "-m", "venv", "--without-pip", venv)
    python = venv / "bin" / "python"
    # Installed before the dependencies are linked in, so that pip sees no other copy of the project.
    _run(*pip, "--python", python, "install", "--no-deps", "--no-index", "-q", wheel)
    site = Path(_run(python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])").stdout.strip())
    ours = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    (site / "_test_environment.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(WANDB_MODE="disabled", HYDRA_FULL_ERROR="0")
    elsewhere.mkdir()
    where = _run(python, "-c", "import importlib.util as u; print(u.find_spec('experiments.conf').origin); "
                 "print(u.find_spec('curvature').origin)", cwd=elsewhere, env=env).stdout.split()
    assert all(Path(p).is_relative_to(site) for p in where), where  # the wheel's copy, not the checkout

    run = elsewhere / "run"
    proc = _run(venv / "bin" / "deep-curvature", "experiment=thm1", "logger=none", f"hydra.run.dir={run}",
                cwd=elsewhere, env=env)
    assert "2/2 checks passed" in proc.stdout
    results = json.loads((run / "results.json").read_text())
    assert results["config"]["experiment_id"] == "thm1" and results["all_checks_passed"]


@pytest.mark.skipif(not (ROOT / "conf" / "config.yaml").is_file(), reason="needs the checkout")
def test_a_checkout_reads_its_own_conf_folder():
    from experiments.config_source import config_dir, config_path
    assert config_dir() == ROOT / "conf" and Path(config_path()) == ROOT / "conf"
