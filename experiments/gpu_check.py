"""``make gpu-check``: one command that measures the suite on one GPU and writes one table.

    make gpu-check                                   # CUDA present: full sizes; without CUDA: tiny sizes
    make gpu-check TINY=1                            # tiny sizes on any device (1-2 min on 2 CPU cores)
    python -m experiments.gpu_check [--tiny | --full] [--steps vgg16,cost] [--budget 480] [--out DIR]
                                    [--set vgg16:analysis.side_vectors=0 ...]

Steps, in order, each the suite's own command in a subprocess with fixed overrides (``STEPS``; ``--set``
adds more): ``tests`` (``pytest -m gpu``: GPU-only tests, which skip without CUDA), ``vgg16`` and
``preresnet20`` (``experiment=benchmark_peers`` at the paper's width on fake CIFAR-10-shaped data: the
product benchmark and the side-by-side Lanczos against every peer), ``cost`` (``experiment=cost`` on
fake CIFAR-100-shaped data). Each analysis writes its own run folder ``<out>/<step>/`` (results.json
with config and commit) and log ``<out>/<step>.log``; this driver reads their results.json and writes
``<out>/gpu_check.json`` and ``<out>/gpu_check.md`` atomically (default ``<out>``:
``outputs/gpu_check/<UTC time>``).

The table has one row per measured path (columns: ``MARKDOWN_HEADER``): seconds per Lanczos step, its
cost over one full-data gradient of the same run, peak memory, and each peer's seconds per step over the
row's (> 1: the row is faster). A hard wall-clock budget (``--budget``, 480 s) stops the step running
when it is spent. Exit status: 0 when every step ran, 1 when one failed or the budget ran out (named on
stderr), 2 for bad arguments. Failed *checks* of a step (speed targets) are listed, not fatal.

Hardware: one GPU, under 8 minutes (not yet run on one: no GPU was lent to this work); tiny mode, same
code paths: about 1-2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from curvature.io import write_bytes_atomic
from experiments.peers import PEERS
from experiments.runtime import PROJECT_ROOT, device_description, git_commit, write_json_atomic

BUDGET_SECONDS = 480.0
MODES = ("full", "tiny")
#: the fake data of the benchmark steps: full = 16 batches of 256, tiny = 2 batches of 16 (equal batches:
#: every peer then weights them as the suite does); no augmentation, so every row sees the same images
_DATA = {"full": ["dataset.fake=true", "dataset.fake_train=4096", "dataset.fake_test=64", "dataset.augment=false",
                  "operator.batch_size=256"],
         "tiny": ["dataset.fake=true", "dataset.fake_train=32", "dataset.fake_test=32", "dataset.augment=false",
                  "operator.batch_size=16"]}
_BENCH = {"full": ["analysis.repeats=3", "analysis.lanczos_steps=20", "analysis.side_steps=20",
                   "analysis.side_vectors=4"],
          "tiny": ["analysis.repeats=1", "analysis.lanczos_steps=2", "analysis.side_steps=2",
                   "analysis.side_vectors=2"]}


@dataclass(frozen=True)
class Step:
    """One command of the check: ``kind`` says how its output is read (pytest / benchmark / cost)."""

    name: str
    kind: str
    args: dict = field(default_factory=dict)  # mode -> the command's arguments

    def command(self, mode: str, folder: Path, extra: list[str]) -> list[str]:
        if self.kind == "pytest":
            return [sys.executable, "-m", "pytest", "-q", "-rs", "-m", "gpu", "-p", "no:cacheprovider", "tests"]
        return [sys.executable, "-m", "experiments.run", *self.args[mode], *extra, "logger=none",
                f"hydra.run.dir={folder}", "overwrite=true"]


STEPS = {s.name: s for s in (
    Step("tests", "pytest"),
    *(Step(model, "benchmark", {mode: ["experiment=benchmark_peers", f"model={model}", f"model.width={width[mode]}",
                                       *_DATA[mode], *_BENCH[mode]] for mode in MODES})
      for model, width in (("vgg16", {"full": 1.0, "tiny": 0.0625}), ("preresnet20", {"full": 1.0, "tiny": 0.125}))),
    # the cost preset (VGG16, CIFAR-100 shape, BatchNorm train mode, batch 256) on 10,240 fake images: its
    # seconds per step scale with the images, x4.9 for the paper's 50,000
    Step("cost", "cost", {"full": ["experiment=cost", "dataset.fake=true", "dataset.fake_train=10240",
                                   "dataset.fake_test=64", "analysis.num_steps=10"],
                          "tiny": ["experiment=cost", "dataset.fake=true", "dataset.fake_train=32",
                                   "dataset.fake_test=32", "model.width=0.0625", "operator.batch_size=16",
                                   "analysis.num_steps=3"]}),
)}
PEER_COLUMNS = tuple(f"vs {p}" for p in PEERS)
MARKDOWN_HEADER = ("step", "model", "row", "s / step", "x gradient", "peak MiB", *PEER_COLUMNS)


# --- running the steps ---------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    command: list[str]
    status: str = "not run"      # ok | failed | stopped: budget | not run
    seconds: float = 0.0
    message: str = ""            # the failure's one line, pytest's summary, or the failed checks
    rows: list = field(default_factory=list)
    device: str = ""


def run_step(step: Step, mode: str, out: Path, extra: list[str], seconds_left: float) -> Outcome:
    folder, log_path = out / step.name, out / f"{step.name}.log"
    outcome = Outcome(step.name, step.command(mode, folder, extra))
    if seconds_left <= 0:
        outcome.message = "the budget was spent before it started"
        return outcome
    code, outcome.seconds = _launch(outcome.command, log_path, seconds_left)
    text = log_path.read_text(errors="replace")
    if code is None:
        outcome.status, outcome.message = "stopped: budget", f"stopped after {outcome.seconds:.0f} s"
    elif step.kind == "pytest":
        outcome.message = _pytest_summary(text, code)
        outcome.status = "ok" if code == 0 else "failed"  # 5 (no gpu-marked test collected) fails too
    elif code != 0:
        outcome.status, outcome.message = "failed", _error_line(text, code)
    else:
        _read_results(step, folder / "results.json", outcome)
    return outcome


def _launch(cmd: list[str], log_path: Path, seconds_left: float) -> tuple[int | None, float]:
    """Run ``cmd`` with its output in ``log_path``; its exit status (None: stopped at the budget) and seconds."""
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0",
           "PYTHONUNBUFFERED": "1", "MPLBACKEND": "Agg"}
    start = time.perf_counter()
    with open(log_path, "w") as log:
        log.write(" ".join(cmd) + "\n")
        log.flush()
        proc = subprocess.Popen(cmd, cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: stopped as a whole
        try:
            code = proc.wait(timeout=seconds_left)
        except subprocess.TimeoutExpired:
            _stop(proc)
            code = None
        except BaseException:  # Ctrl-C: take the step down with us
            _stop(proc)
            raise
    return code, time.perf_counter() - start


def _read_results(step: Step, path: Path, outcome: Outcome) -> None:
    try:
        results = json.loads(path.read_text())
        outcome.rows = (benchmark_rows if step.kind == "benchmark" else cost_rows)(step.name, results)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError, StopIteration) as error:
        outcome.status, outcome.message = "failed", f"unreadable {path}: {error!r}"
        return
    checks = results.get("checks", {})
    failed = [k for k, c in checks.items() if not c["passed"]]
    outcome.status, outcome.device = "ok", results.get("provenance", {}).get("device_name", "")
    outcome.message = f"{len(checks) - len(failed)}/{len(checks)} checks passed" + \
        (f" (failed: {', '.join(failed)})" if failed else "")


def _stop(proc: subprocess.Popen) -> None:
    for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 10)):
        try:
            os.killpg(proc.pid, sig)
            proc.wait(timeout=wait)
            return
        except ProcessLookupError:
            return
        except subprocess.TimeoutExpired:
            continue


def _pytest_summary(text: str, code: int) -> str:
    found = re.findall(r"^=*\s*(\d+ (?:passed|failed|skipped|deselected|errors?).*?)(?: in [\d.]+s.*)?=*$",
                       text, flags=re.M)
    return (found[-1].strip() if found else f"pytest exit status {code}") + \
        (" (no gpu-marked test collected)" if code == 5 else "")


def _error_line(text: str, code: int) -> str:
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith(("error:", "internal error:"))
              or re.match(r"^\w+(Error|Exception)\b", ln)]
    return (errors[-1] if errors else (lines[-1] if lines else f"exit status {code}"))[:300]


# --- reading the results into table rows -----------------------------------------------------------
def _model(results: dict, num_params: int) -> str:
    model = results["config"]["model"]
    size = f"{num_params / 1e6:.3g}M" if num_params >= 1e6 else f"{num_params / 1e3:.3g}k"
    return f"{model['name']} x{model.get('width', 1):g} ({size} params)"


def _row(step, model, label, per_step, x_gradient, peak_mib, vs=None) -> dict:
    return {"step": step, "model": model, "row": label, "seconds_per_step": per_step, "x_gradient": x_gradient,
            "peak_mib": peak_mib, **{f"vs {p}": (vs or {}).get(p) for p in PEERS}}


def benchmark_rows(step: str, results: dict) -> list[dict]:
    """analysis=benchmark: the default Hessian path's Lanczos step and product, the GGN product, then every
    side-by-side row per start vector (its wall time including set-up over the steps)."""
    m, tables = results["metrics"], results["tables"]
    model, gradient = _model(results, int(m["num_params"])), m["gradient_seconds"]
    find = lambda prefix: next(r for r in tables["benchmark"] if r["quantity"].startswith(prefix))  # noqa: E731
    rows = [_row(step, model, "benchmark: hessian product, default path", m["lanczos_seconds_per_iteration"],
                 m["hessian_ratio"], find("lanczos_iteration")["peak_memory_bytes"] / 2**20),
            _row(step, model, "benchmark: ggn product, default path", None, m["ggn_ratio"],
                 find("ggn_product (default")["peak_memory_bytes"] / 2**20)]
    steps = results["config"]["analysis"]["side_steps"]
    side = tables.get("side_by_side", [])
    per_step = {r["row"]: r["seconds"] / (steps * r["vectors"]) for r in side}
    for r in side:
        s = per_step[r["row"]]
        rows.append(_row(step, model, r["row"], s, s / gradient, r["peak_memory_mb"],
                         {p: per_step[p] / s for p in PEERS if p in per_step}))
    return rows


def cost_rows(step: str, results: dict) -> list[dict]:
    """analysis=spectrum's cost table: seconds per Lanczos iteration and peak memory of each operator."""
    cost = results["tables"]["cost"]
    model = _model(results, int(cost[0]["num_params"]))
    return [_row(step, model, f"cost: {r['operator']} ({r['num_samples']} images)", r["seconds_per_iteration"],
                 None, r["peak_memory_bytes"] / 2**20) for r in cost]


# --- the report ------------------------------------------------------------------------------------
def environment() -> dict:
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else device_description(torch.device("cpu")),
            "cuda_available": cuda, "torch": torch.__version__, "cuda": torch.version.cuda,
            "cudnn": torch.backends.cudnn.version() if cuda else None, "python": sys.version.split()[0],
            **git_commit()}


def markdown(report: dict) -> str:
    env, fmt = report["environment"], lambda x, f: "-" if x is None else format(x, f)  # noqa: E731
    commit = f"{env['commit'][:12]}{' (uncommitted changes)' if env.get('dirty') else ''}"
    lines = [f"GPU check, {report['mode']} mode: {env['device']}; torch {env['torch']}, CUDA {env['cuda'] or '-'}, "
             f"cuDNN {env['cudnn'] or '-'}; commit {commit}; {report['total_seconds']:.0f} s of a "
             f"{report['budget_seconds']:.0f} s budget; {report['started_at']}.", ""]
    for o in report["steps"]:
        lines.append(f"- `{o['name']}` {o['status']} in {o['seconds']:.0f} s" + (f" on {o['device']}" if o["device"]
                     else "") + (f": {o['message']}" if o["message"] else ""))
    lines += ["", "| " + " | ".join(MARKDOWN_HEADER) + " |", "|" + "---|" * len(MARKDOWN_HEADER)]
    for r in report["rows"]:
        cells = [r["step"], r["model"], r["row"], fmt(r["seconds_per_step"], ".3g"), fmt(r["x_gradient"], ".2f"),
                 fmt(r["peak_mib"], ".0f"), *(fmt(r[c], ".2f") for c in PEER_COLUMNS)]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def check(steps: list[str], mode: str, out: Path, budget: float = BUDGET_SECONDS,
          extra: dict[str, list[str]] | None = None) -> tuple[int, dict]:
    """Run ``steps`` in order within ``budget`` seconds, write the report; return (exit status, report)."""
    out = Path(out).resolve()  # the steps run from the project root
    out.mkdir(parents=True, exist_ok=True)
    started = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    t0, outcomes = time.perf_counter(), []
    for i, name in enumerate(steps, 1):
        left = budget - (time.perf_counter() - t0)
        print(f"[{i}/{len(steps)}] {name}: " + (f"running (log: {out / f'{name}.log'})" if left > 0
                                                 else "not run (budget spent)"), flush=True)
        outcome = run_step(STEPS[name], mode, out, (extra or {}).get(name, []), left)
        if outcome.status != "not run":
            print(f"[{i}/{len(steps)}] {name}: {outcome.status} in {outcome.seconds:.0f} s"
                  + (f": {outcome.message}" if outcome.message else ""), flush=True)
        outcomes.append(outcome)
    report = {"mode": mode, "budget_seconds": budget, "total_seconds": time.perf_counter() - t0,
              "started_at": started, "environment": environment(), "columns": list(MARKDOWN_HEADER),
              "steps": [{k: v for k, v in vars(o).items() if k != "rows"} for o in outcomes],
              "rows": [r for o in outcomes for r in o.rows]}
    write_json_atomic(out / "gpu_check.json", report)
    text = markdown(report)
    write_bytes_atomic(out / "gpu_check.md", text.encode())
    print("\n" + text + f"\nwritten: {out / 'gpu_check.md'} and {out / 'gpu_check.json'}", flush=True)
    bad = [o for o in outcomes if o.status != "ok"]
    if bad:
        over = report["total_seconds"] >= budget or any(o.status != "failed" for o in bad)
        why = "; ".join(f"{o.name} {o.status}" + (f" ({o.message})" if o.message else "") for o in bad)
        print(f"gpu-check: {len(bad)} of {len(steps)} step(s) did not complete: {why}" +
              (f". The {budget:.0f} s budget ran out: raise it (--budget), run fewer steps (--steps) or "
               "smaller ones (--set vgg16:dataset.fake_train=2048)"
               if over else "") + f"; logs in {out}", file=sys.stderr, flush=True)
    return (1 if bad else 0), report


def _parse(argv: list[str] | None) -> tuple[argparse.Namespace, str, dict]:
    parser = argparse.ArgumentParser(prog="python -m experiments.gpu_check", description=__doc__.split("\n")[0])
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument("--tiny", action="store_true", help="tiny sizes (default without CUDA)")
    sizes.add_argument("--full", action="store_true", help="full sizes (default with CUDA)")
    parser.add_argument("--steps", default=",".join(STEPS), help=f"comma-separated subset of {','.join(STEPS)}")
    parser.add_argument("--budget", type=float, default=BUDGET_SECONDS, help="wall-clock seconds for all steps")
    parser.add_argument("--out", type=Path, default=None, help="run folder (default outputs/gpu_check/<UTC time>)")
    parser.add_argument("--set", action="append", default=[], metavar="STEP:KEY=VALUE",
                        help="one more override for one step's command")
    args = parser.parse_args(argv)
    steps = [s for s in args.steps.split(",") if s]
    unknown = [s for s in steps if s not in STEPS]
    if unknown or not steps:
        parser.error(f"--steps: unknown step(s) {', '.join(unknown) or '(none given)'}; choose from {','.join(STEPS)}")
    if not (args.budget > 0 and math.isfinite(args.budget)):
        parser.error(f"--budget: {args.budget} is not a positive number of seconds, e.g. --budget 480")
    extra: dict[str, list[str]] = {}
    for item in args.set:
        step, _, override = item.partition(":")
        if step not in STEPS or STEPS[step].kind == "pytest" or "=" not in override:
            parser.error(f"--set {item}: expected STEP:KEY=VALUE with STEP one of "
                         f"{','.join(n for n, s in STEPS.items() if s.kind != 'pytest')}")
        extra.setdefault(step, []).append(override)
    mode = "tiny" if args.tiny else "full" if args.full else ("full" if torch.cuda.is_available() else "tiny")
    args.steps = steps
    return args, mode, extra


def main(argv: list[str] | None = None) -> int:
    args, mode, extra = _parse(argv)
    out = args.out or PROJECT_ROOT / "outputs" / "gpu_check" / _dt.datetime.now(_dt.timezone.utc).strftime(
        "%Y-%m-%d_%H-%M-%S")
    if (out / "gpu_check.json").exists():
        print(f"error: {out} already holds a gpu_check.json; give another --out", file=sys.stderr)
        return 2
    if mode == "full" and not torch.cuda.is_available():
        print("note: no CUDA device; full sizes on a CPU will not fit the budget (--tiny for the CPU check)",
              flush=True)
    elif mode == "tiny" and not args.tiny:
        print("note: no CUDA device: tiny mode (the same steps at tiny sizes); --full forces full sizes", flush=True)
    try:
        code, _ = check(args.steps, mode, out, args.budget, extra)
    except KeyboardInterrupt:
        print(f"gpu-check: interrupted (Ctrl-C); the step running was stopped; no report written; logs in {out}",
              file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    raise SystemExit(main())
