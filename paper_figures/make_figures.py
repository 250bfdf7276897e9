"""Regenerate every paper artefact: run its presets through Hydra, draw its figure, write REPORT.md.

    python -m paper_figures.make_figures                      # SCALE=smoke: 2 CPU cores, < 30 min
    python -m paper_figures.make_figures --scale paper        # a GPU with CIFAR on disk
    python -m paper_figures.make_figures --only fig2,table1 --force
    make figures [SCALE=paper] [FORCE=1]

Each artefact names the jobs it needs (``ARTEFACTS``); a job is a preset with per-scale overrides
(``JOBS``), run as ``python -m experiments.run [-m] experiment=<preset> ...`` in a subprocess, into
``<outputs>/<scale>/<job>/<n>/`` (a fresh ``n`` per invocation). Overrides may name another job's result:
``{checkpoint:JOB}`` (its last checkpoint) or ``{dir:JOB}`` (its run folder); that job runs first.

Reruns skip runs whose results already exist for the same resolved config: each expected run's config
is composed with Hydra in-process (multiruns expanded as Hydra's basic sweeper does) and hashed
without output_dir / overwrite / logger, and compared with the ``config`` of every results.json found
under the job's folder. Only the missing runs are run; ``--force`` runs all. A failed run does not stop
the others: its artefact is marked failed in REPORT.md with the one-line error.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from paper_figures import common as C

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"
SCALES = ("smoke", "paper")
IGNORED_KEYS = ("output_dir", "overwrite", "logger")


# --- the tables: jobs and artefacts --------------------------------------------------------------
@dataclass(frozen=True)
class Job:
    """A preset per scale with its overrides; ``multirun``: the preset declares a Hydra sweep."""

    presets: dict
    overrides: dict = field(default_factory=dict)
    multirun: bool = False

    def preset(self, scale: str) -> str:
        return self.presets[scale]

    def args(self, scale: str) -> list[str]:
        return [f"experiment={self.preset(scale)}", *self.overrides.get(scale, [])]


def _same(preset: str, **kw) -> Job:
    return Job({"smoke": preset, "paper": preset}, **kw)


FAKE_TRAIN = ["dataset.fake=true", "dataset.fake_train=256", "dataset.fake_test=64", "model.width=0.0625",
              "analysis.epochs=2", "analysis.save_freq=2"]
RITZ = ["operator=hessian", "analysis.operators=null", "analysis.save_ritz_vectors=true"]


def _network(smoke: str, paper: str, train: str, extra: tuple = ()) -> Job:
    """A preset on a trained network: the checkpoint of ``train`` (smoke: a 2-epoch run on fake data)."""
    common = [f"analysis.checkpoint={{checkpoint:{train}}}", *extra]
    return Job({"smoke": smoke, "paper": paper}, {"smoke": common, "paper": common})


def _landscape(n: int, ritz: str, train: str) -> Job:
    return _network(f"fig{n}_smoke", f"fig{n}", train, (f"analysis.spectrum_dir={{dir:{ritz}}}",))


JOBS: dict[str, Job] = {
    "fig1": Job({"smoke": "fig1_smoke", "paper": "fig1"}, multirun=True),
    "fig2": _same("fig2"), "fig3": _same("fig3"), "fig4": _same("fig4", multirun=True),
    "fig5": _same("fig5", multirun=True), "fig6": _same("fig6"),
    "table1": _same("table1"), "thm1": _same("thm1"), "thm2": _same("thm2"), "thm5": _same("thm5"),
    # smoke: up to n = 2000 (the n = 4000 exact curve alone takes a minute on 2 cores); paper: to 10000
    "lemma1": _same("lemma1", multirun=True, overrides={
        "smoke": ["analysis.lemma1.sizes=[100,200,400,1000,2000]"],
        "paper": ["analysis.lemma1.sizes=[100,200,400,1000,2000,4000,10000]"]}),
    "train_cifar100": _same("train_vgg16_cifar100", overrides={"smoke": FAKE_TRAIN}),
    "train_cifar10": _same("train_vgg16_cifar100", overrides={
        "smoke": ["dataset=cifar10", "run_name=train_vgg16_cifar10", *FAKE_TRAIN],
        "paper": ["dataset=cifar10", "run_name=train_vgg16_cifar10"]}),
    "fig7": _network("fig7_smoke", "fig7", "train_cifar100"),
    "fig7_diagonal": _network("fig7_diagonal_smoke", "fig7_diagonal", "train_cifar100"),
    "fig8": _network("fig8_smoke", "fig8", "train_cifar100"),
    "fig13": _network("fig13_smoke", "fig13", "train_cifar10"),
    "ritz_cifar100": _network("fig7_smoke", "fig7", "train_cifar100", (*RITZ, "run_name=ritz_cifar100")),
    "ritz_cifar10": _network("fig13_smoke", "fig13", "train_cifar10", (*RITZ, "run_name=ritz_cifar10")),
    "fig9": _landscape(9, "ritz_cifar100", "train_cifar100"),
    "fig10": _landscape(10, "ritz_cifar100", "train_cifar100"),
    "fig11": _landscape(11, "ritz_cifar10", "train_cifar10"),
    "fig12": _landscape(12, "ritz_cifar10", "train_cifar10"),
    "cost": Job({"smoke": "cost_smoke", "paper": "cost"}),
    # per-block spectra (Zhang et al. 2024): one preset, its GPT default and a CNN override; no paper scale yet
    "train_gpt": _same("train_gpt_tiny", overrides={"smoke": ["analysis.epochs=3"]}),
    "train_digits": _same("train_digits", overrides={"smoke": ["analysis.epochs=10"]}),
    "blocks_gpt": _network("blocks_gpt_vs_cnn_smoke", "blocks_gpt_vs_cnn_smoke", "train_gpt"),
    "blocks_cnn": _network("blocks_gpt_vs_cnn_smoke", "blocks_gpt_vs_cnn_smoke", "train_digits",
                           ("dataset=digits", "model=cnn", "dataset.num_subsamples=256")),
    # beyond the paper: Cohen et al. (2021); the full preset at both scales (CPU, minutes): smaller shows no edge
    "edge_of_stability": _same("edge_of_stability"),
}

# artefact -> (figure script, the jobs whose runs it reads), in PAPER.md's order
ARTEFACTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "fig1": ("fig1_optimisers", ("fig1",)),
    "fig2": ("fig2_wigner", ("fig2",)),
    "fig3": ("fig3_mp_rank_deficient", ("fig3",)),
    "fig4": ("fig4_mp_full_rank", ("fig4",)),
    "fig5": ("fig5_diagonal", ("fig5",)),
    "fig6": ("fig6_synthetic", ("fig6",)),
    "fig7": ("fig7_vgg16_cifar100", ("fig7", "fig7_diagonal")),
    "fig8": ("fig8_two_vectors", ("fig8",)),
    "fig9": ("fig9_landscape_cifar100_loss", ("fig9",)),
    "fig10": ("fig10_landscape_cifar100_accuracy", ("fig10",)),
    "fig11": ("fig11_landscape_cifar10_loss", ("fig11",)),
    "fig12": ("fig12_landscape_cifar10_accuracy", ("fig12",)),
    "fig13": ("fig13_vgg16_cifar10", ("fig13",)),
    "table1": ("table1_lanczos_vs_power", ("table1",)),
    "thm1": ("thm1_shift", ("thm1",)),
    "thm2": ("thm2_top_m", ("thm2",)),
    "thm5": ("thm5_smoothing", ("thm5",)),
    "lemma1": ("lemma1_one_vector", ("lemma1",)),
    "cost": ("cost", ("cost",)),
    "blocks": ("blocks_gpt_vs_cnn", ("blocks_gpt", "blocks_cnn")),
    "edge_of_stability": ("edge_of_stability", ("edge_of_stability",)),
}
PLACEHOLDER = re.compile(r"\{(checkpoint|dir):(\w+)\}")


# --- configs and their hashes --------------------------------------------------------------------
def config_hash(config: dict) -> str:
    """Hash of a resolved config, without the keys that only say where and how results are written."""
    kept = {k: v for k, v in config.items() if k not in IGNORED_KEYS}
    return hashlib.sha256(json.dumps(kept, sort_keys=True, default=str).encode()).hexdigest()[:16]


def expand(args: list[str], multirun: bool) -> list[list[str]]:
    """The override lists of each run, as ``python -m experiments.run [-m] args`` would launch them."""
    if not multirun:
        return [list(args)]
    from hydra import compose, initialize_config_dir
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name="config", overrides=list(args), return_hydra_config=True)
    params = OmegaConf.to_container(cfg.hydra.sweeper.params or {}, resolve=False)
    parsed = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()] + list(args))
    return BasicSweeper.split_arguments(parsed, None)[0]


def resolved_config(args: list[str]) -> dict:
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return OmegaConf.to_container(compose(config_name="config", overrides=list(args)), resolve=True)


def index_results(folder: Path) -> dict[str, Path]:
    """hash -> run folder of every complete result under ``folder`` (the newest wins)."""
    found: dict[str, tuple[float, Path]] = {}
    for path in sorted(folder.rglob(C.RESULTS)) if folder.is_dir() else []:
        try:
            config = json.loads(path.read_text())["config"]
        except (OSError, ValueError, KeyError):
            continue
        key, mtime = config_hash(config), path.stat().st_mtime
        if key not in found or mtime >= found[key][0]:
            found[key] = (mtime, path.parent)
    return {k: v for k, (_, v) in found.items()}


# --- running the jobs -----------------------------------------------------------------------------
@dataclass
class JobState:
    name: str
    command: str = ""
    folders: list[Path] = field(default_factory=list)
    error: str | None = None
    ran: int = 0
    reused: int = 0


class Driver:
    def __init__(self, scale: str, outputs: Path, force: bool = False, logger: str = "none",
                 extra: dict[str, list[str]] | None = None, python: str = sys.executable):
        self.scale, self.root, self.force, self.logger = scale, Path(outputs) / scale, force, logger
        self.extra, self.python = extra or {}, python
        self.states: dict[str, JobState] = {}

    def job_args(self, name: str) -> list[str]:
        return JOBS[name].args(self.scale) + self.extra.get(name, [])

    def resolve(self, name: str, args: list[str]) -> list[str]:
        """Fill ``{checkpoint:JOB}`` / ``{dir:JOB}``, running those jobs first."""
        def fill(match):
            kind, dep = match.groups()
            state = self.run_job(dep)
            if state.error or not state.folders:
                raise RuntimeError(f"needs job {dep}, which failed: {state.error}")
            folder = state.folders[-1]
            if kind == "dir":
                return str(folder)
            checkpoints = json.loads((folder / C.RESULTS).read_text()).get("checkpoints") or []
            if not checkpoints:
                raise RuntimeError(f"needs a checkpoint of job {dep}; {folder} holds none")
            return str(folder / checkpoints[-1])
        return [PLACEHOLDER.sub(fill, a) for a in args]

    def command(self, name: str, args: list[str]) -> str:
        return "python -m experiments.run " + ("-m " if JOBS[name].multirun else "") + " ".join(args)

    def run_job(self, name: str) -> JobState:
        if name in self.states:
            return self.states[name]
        state = self.states[name] = JobState(name)
        job = JOBS[name]
        try:
            preset = CONF / "experiment" / f"{job.preset(self.scale)}.yaml"
            if not preset.is_file():
                raise RuntimeError(f"preset {preset.relative_to(ROOT)} does not exist")
            template = self.job_args(name)
            state.command = self.command(name, [PLACEHOLDER.sub(lambda m: f"<{m.group(1)} of {m.group(2)}>", a)
                                                for a in template])
            args = self.resolve(name, template)
            members = expand(args, job.multirun)
            expected = [(member, config_hash(resolved_config(member))) for member in members]
        except Exception as error:  # noqa: BLE001 - reported per job, the others go on
            state.error = _one_line(error)
            return state
        folder = self.root / name
        have = {} if self.force else index_results(folder)
        missing = [member for member, key in expected if key not in have]
        state.reused = len(expected) - len(missing)
        if missing:
            print(f"[{self.scale}] {name}: running {len(missing)} of {len(expected)} run(s)", flush=True)
            batches = [args] if len(missing) == len(expected) else missing
            for batch in batches:
                error = self._launch(name, batch, folder)
                state.error = state.error or error
            have = index_results(folder)
            state.ran = len(missing)
        else:
            print(f"[{self.scale}] {name}: {len(expected)} run(s) up to date", flush=True)
        state.folders = [have[key] for _, key in expected if key in have]
        absent = len(expected) - len(state.folders)
        if absent and not state.error:
            state.error = f"{absent} run(s) wrote no results"
        elif not absent:
            state.error = None
        return state

    def _launch(self, name: str, args: list[str], folder: Path) -> str | None:
        folder.mkdir(parents=True, exist_ok=True)
        n = 1 + max((int(p.name) for p in folder.iterdir() if p.name.isdigit()), default=0)
        target = folder / str(n)
        multirun = JOBS[name].multirun
        where = [f"hydra.sweep.dir={target}", "hydra.sweep.subdir=${hydra.job.num}"] if multirun \
            else [f"hydra.run.dir={target}"]
        cmd = [self.python, "-m", "experiments.run", *(["-m"] if multirun else []), *args,
               f"logger={self.logger}", *where]
        env = {**os.environ, "WANDB_MODE": os.environ.get("WANDB_MODE", "offline"), "WANDB_SILENT": "true",
               "HYDRA_FULL_ERROR": "0", "PYTHONUNBUFFERED": "1"}
        start = time.perf_counter()
        with open(folder / f"{n}.log", "w") as log:
            log.write(" ".join(cmd) + "\n")
            log.flush()
            code = subprocess.run(cmd, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"[{self.scale}] {name}: exit {code} after {time.perf_counter() - start:.0f} s "
              f"(log: {folder / f'{n}.log'})", flush=True)
        return None if code == 0 else _error_from_log(folder / f"{n}.log", code)


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}" if not isinstance(error, RuntimeError) \
        else (text[0] if text else "failed")


def _error_from_log(path: Path, code: int) -> str:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:") or re.match(r"^\w+(Error|Exception)\b", ln)]
    return (errors[-1] if errors else (lines[-1] if lines else f"exit status {code}"))[:300]


# --- figures and the report ------------------------------------------------------------------------
@dataclass
class Row:
    artefact: str
    commands: list[str]
    device: str
    figure: Path | None
    value: str
    status: str  # PASS | FAIL | FAILED (a run or the figure failed)
    seconds: float = 0.0


def draw(artefact: str, folders: list[Path], out_dir: Path):
    module = importlib.import_module(f"paper_figures.{ARTEFACTS[artefact][0]}")
    return module.main(folders, out_dir)


def make_row(driver: Driver, artefact: str, figures_dir: Path) -> Row:
    script, jobs = ARTEFACTS[artefact]
    states = [driver.run_job(j) for j in jobs]
    commands = [s.command for s in states] + [f"python -m paper_figures.{script} <run folders> --out <dir>"]
    failed = [s for s in states if s.error]
    folders = [f for s in states for f in s.folders]
    runs = [C.SavedRun.load(f) for f in folders]
    devices = sorted({r.results.get("provenance", {}).get("device_name", "?") for r in runs})
    device = f"{', '.join(devices) or '-'}; {driver.scale}"
    seconds = sum(float(r.results.get("wall_time_s") or 0.0) for r in runs)
    if failed:
        return Row(artefact, commands, device, None, f"{failed[0].name}: {failed[0].error}", "FAILED", seconds)
    try:
        outcome = draw(artefact, folders, figures_dir)
    except Exception as error:  # noqa: BLE001 - one artefact's figure must not stop the report
        return Row(artefact, commands, device, None, f"figure script: {_one_line(error)}", "FAILED", seconds)
    png = next(p for p in outcome.figures if p.suffix == ".png")
    return Row(artefact, commands, device, png, outcome.check.value,
               "PASS" if outcome.check.passed else "FAIL", seconds)


def shrink_png(src: Path, dst_dir: Path, max_width: int = 1100) -> Path:
    """A small copy of a figure for the committed gallery."""
    from PIL import Image
    dst_dir.mkdir(parents=True, exist_ok=True)
    dst = dst_dir / src.name
    with Image.open(src) as image:
        image = image.convert("RGB")
        if image.width > max_width:
            image = image.resize((max_width, round(image.height * max_width / image.width)), Image.LANCZOS)
        image.save(dst, optimize=True)
    return dst


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def write_report(rows: list[Row], path: Path, scale: str) -> None:
    lines = [f"# Paper artefacts: {scale} scale", "",
             f"Generated by `python -m paper_figures.make_figures --scale {scale}` (`make figures"
             f"{'' if scale == 'smoke' else ' SCALE=' + scale}`); do not edit.",
             "Smoke scale runs the same code paths at small sizes (digits, fake CIFAR, VGG16 at width 1/16, "
             "2-epoch checkpoints): its network figures show what the code draws, not the paper's numbers."
             if scale == "smoke" else "Paper scale: the settings of PAPER.md.", "",
             "| artefact | command | device & scale | figure | check value | pass/fail |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        command = "<br>".join(f"`{_cell(c)}`" for c in r.commands)
        figure = f"[{r.figure.name}]({os.path.relpath(r.figure, path.parent)})" if r.figure else "-"
        lines.append(f"| {r.artefact} | {command} | {_cell(r.device)} | {figure} | {_cell(r.value)} | {r.status} |")
    passed = sum(r.status == "PASS" for r in rows)
    lines += ["", f"{passed} of {len(rows)} artefacts pass; the runs' own wall time adds up to "
              f"{sum(r.seconds for r in rows) / 60:.1f} min (runs shared between artefacts counted once each)."]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")


def make_figures(scale: str = "smoke", only: list[str] | None = None, outputs: Path = ROOT / "outputs" / "figures",
                 report: Path = ROOT / "paper_figures" / "REPORT.md", gallery: Path | None = None,
                 force: bool = False, extra: dict[str, list[str]] | None = None) -> list[Row]:
    if scale not in SCALES:
        raise C.FigureInputError(f"--scale {scale}: must be one of {', '.join(SCALES)} (e.g. --scale smoke)")
    names = list(ARTEFACTS) if not only else only
    unknown = [a for a in names if a not in ARTEFACTS]
    if unknown:
        raise C.FigureInputError(f"--only {','.join(unknown)}: unknown artefact(s); choose from {', '.join(ARTEFACTS)}")
    bad = [k for k in (extra or {}) if k not in JOBS]
    if bad:
        raise C.FigureInputError(f"--extra {bad[0]}:...: unknown job; choose from {', '.join(JOBS)}")
    driver = Driver(scale, outputs, force=force, extra=extra)
    figures_dir = Path(outputs) / scale / "figures"
    rows = []
    for artefact in names:
        row = make_row(driver, artefact, figures_dir)
        if gallery is not None and row.figure is not None:
            row.figure = shrink_png(row.figure, Path(gallery))
        print(f"{artefact}: {row.status} | {row.value}", flush=True)
        rows.append(row)
    write_report(rows, Path(report), scale)
    print(f"report: {report}")
    return rows


def _extras(items: list[str]) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for item in items:
        job, sep, override = item.partition(":")
        if not sep or "=" not in override:
            raise C.FigureInputError(f"--extra {item}: expected JOB:key=value, e.g. --extra fig2:dataset.n=300")
        out.setdefault(job, []).append(override)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m paper_figures.make_figures", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", default="smoke", help="smoke (default; 2 CPU cores) or paper (a GPU, CIFAR on disk)")
    parser.add_argument("--only", default="", help="comma-separated artefacts (default: all)")
    parser.add_argument("--outputs", type=Path, default=ROOT / "outputs" / "figures", help="runs and figures go here")
    parser.add_argument("--report", type=Path, default=ROOT / "paper_figures" / "REPORT.md")
    parser.add_argument("--gallery", type=Path, default=None, help="also write small PNGs here (docs/figures)")
    parser.add_argument("--force", action="store_true", help="rerun every run, even those with results")
    parser.add_argument("--extra", action="append", default=[], help="JOB:key=value, an override for one job")
    args = parser.parse_args(argv)
    try:
        rows = make_figures(args.scale, [a for a in args.only.split(",") if a] or None, args.outputs, args.report,
                            args.gallery, args.force, _extras(args.extra))
    except C.FigureInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    return 0 if all(r.status == "PASS" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
