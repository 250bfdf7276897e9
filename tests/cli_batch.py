"""Many runs of the real CLI for the price of one interpreter start: a small fork server.

    python -m tests.cli_batch rows.json results.json [--jobs 2] [--timeout 120]

``rows.json`` is a list of ``{"id": str, "args": [override, ...], "dir": run folder}``. This process
imports ``experiments.run`` (torch, Hydra, every analysis module) once, then for each row forks a child
that sets ``sys.argv = ["experiments.run", *args, "hydra.run.dir=<dir>"]``, sends its fd 1 and 2 to
files and runs ``experiments.run`` as ``__main__`` (its real ``@hydra.main`` entry point, as
``python -m experiments.run`` does); the child's exit
status is the CLI's. At most ``--jobs`` children run at once. ``results.json`` maps each id to
``{"status", "stdout", "stderr", "seconds", "cpu_s"}``; a child killed by a signal gets ``-signal``.

A subprocess per row would pay ~4 s of interpreter and torch import each; a forked child pays only
Hydra's composition and the run itself. Children start from the parent's memory, so Hydra's global
state (never initialised here) is fresh in each.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import runpy
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _warm_up() -> None:
    """Import everything a run imports, once, before any fork."""
    os.environ.update({"WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"})
    import torch
    torch.set_num_threads(1)   # two children at a time on two cores; no thread pools before fork
    torch.set_num_interop_threads(1)
    import experiments.run  # noqa: F401
    for path in sorted((ROOT / "conf" / "analysis").glob("*.yaml")):
        try:
            importlib.import_module(f"experiments.{path.stem}")
        except Exception:  # noqa: BLE001 - a module being written elsewhere: its rows report it themselves
            pass
    from experiments import schema
    for group in schema.GROUPS:    # the defaults of every group, read once
        schema.options(group)
    schema.root_defaults()
    from hydra.core.plugins import Plugins
    Plugins.instance()          # plugin discovery (a package scan) once, inherited by every child
    _memoize_yaml()


def _memoize_yaml() -> None:
    """Parse each yaml text once: ``OmegaConf.load`` returns a deep copy of the config parsed from the
    same text before (Hydra composes twice per run, ~45 files each; parsing is most of a row's time).
    Keyed by the text itself, so an edited file is parsed afresh. Filled here with every file of conf/
    and Hydra's own configs, so the children find them all."""
    import copy
    import io

    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    load, parsed = OmegaConf.load, {}

    def cached(file_):
        if isinstance(file_, (str, Path)):
            with open(file_, encoding="utf-8") as handle:
                return cached(handle)
        text = file_.read()
        if text not in parsed:
            parsed[text] = load(io.BytesIO(text) if isinstance(text, bytes) else io.StringIO(text))
        return copy.deepcopy(parsed[text])

    OmegaConf.load = cached
    for path in sorted((ROOT / "conf").rglob("*.yaml")):
        cached(path)
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        compose(config_name="config", return_hydra_config=True)


def _child(row: dict, out: Path, timeout: int) -> None:
    """In the forked child: run the CLI on the row's overrides; never returns."""
    code = 1
    try:
        signal.alarm(timeout)
        os.chdir(ROOT)
        for fd, name in ((1, "stdout"), (2, "stderr")):
            handle = os.open(out / f"{row['id']}.{name}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            os.dup2(handle, fd)
            os.close(handle)
        sys.argv = ["experiments.run", *row["args"], f"hydra.run.dir={row['dir']}"]
        sys.modules.pop("experiments.run", None)  # runpy runs a fresh copy as __main__, as `python -m` would
        try:   # as `python -m experiments.run` does: the module's code as __main__ (Hydra finds conf/ from it)
            runpy.run_module("experiments.run", run_name="__main__", alter_sys=True)
            code = 0
        except SystemExit as done:
            code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
    except BaseException:  # noqa: BLE001 - report, as the interpreter would, and exit 1
        import traceback
        traceback.print_exc()
        code = 1
    finally:
        try:
            sys.stdout.flush()
            sys.stderr.flush()
        finally:
            os._exit(code)


def run_rows(rows: list[dict], out: Path, jobs: int = 2, timeout: int = 120) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    pending, running, results = list(rows), {}, {}
    while pending or running:
        while pending and len(running) < jobs:
            row = pending.pop(0)
            pid = os.fork()
            if pid == 0:
                _child(row, out, timeout)
            running[pid] = (row, time.perf_counter())
        pid, status, usage = os.wait4(-1, 0)
        row, started = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        results[row["id"]] = {"status": code, "seconds": round(time.perf_counter() - started, 3),
                              "cpu_s": round(usage.ru_utime + usage.ru_stime, 3),
                              **{name: (out / f"{row['id']}.{name}").read_text(errors="replace")
                                 for name in ("stdout", "stderr")}}
    return results


def run_batch(rows: list[dict], root: Path, jobs: int = 2, timeout: int = 120) -> dict:
    """From a test: run ``rows`` (as in ``rows.json``) through this fork server in one subprocess, so a
    module's k CLI runs pay one interpreter start instead of k. By row id, a ``subprocess.CompletedProcess``
    of the row's CLI run (its exit status as ``returncode``; a child killed by a signal: ``-signal``)."""
    import subprocess
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "rows.json").write_text(json.dumps(rows))
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    subprocess.run([sys.executable, "-m", "tests.cli_batch", str(root / "rows.json"), str(root / "results.json"),
                    "--jobs", str(jobs), "--timeout", str(timeout)], cwd=ROOT, env=env, check=True,
                   timeout=timeout * max(1, len(rows)) + 60)
    results = json.loads((root / "results.json").read_text())["rows"]
    return {row["id"]: subprocess.CompletedProcess(["experiments.run", *row["args"]], results[row["id"]]["status"],
                                                   results[row["id"]]["stdout"], results[row["id"]]["stderr"])
            for row in rows}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("rows", type=Path)
    parser.add_argument("results", type=Path)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=120)
    args = parser.parse_args(argv)
    rows = json.loads(args.rows.read_text())
    _warm_up()
    t0 = time.perf_counter()
    results = run_rows(rows, args.results.parent / (args.results.stem + "-streams"), args.jobs, args.timeout)
    args.results.write_text(json.dumps({"wall_time_s": time.perf_counter() - t0, "rows": results}, indent=1))


if __name__ == "__main__":
    main()
