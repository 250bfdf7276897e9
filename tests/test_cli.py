"""The real command line in a subprocess: a run, a Hydra multirun, W&B offline files, bad input."""

import json
import sys
from pathlib import Path

import pytest

from tests.cli_batch import run_batch
from tests.conftest import run_cli

sys.path.insert(0, str(Path(__file__).parent))
from wandb_files import read_run  # noqa: E402

SMALL = ["dataset.n=150", "analysis.num_steps=10"]


#: one xdist worker runs the whole module (under ``pytest --dist loadgroup``), so its module fixtures
#: are built once, not once per worker
pytestmark = pytest.mark.xdist_group("cli")


def _complete(folder: Path) -> dict:
    results = json.loads((folder / "results.json").read_text())
    for name in ["arrays.npz", "spectrum.png", "spectrum.pdf"]:
        assert (folder / name).is_file(), name
    return results


def test_cli_run_end_to_end_with_wandb_offline(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("experiment=fig2", *SMALL, "analysis.report_steps=[5,10]", f"hydra.run.dir={out}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert f"{out}/spectrum.png" in proc.stdout
    results = _complete(out)
    assert results["config"]["logger"]["name"] == "wandb"
    assert len(results["provenance"]["commit"]) == 40 or results["provenance"]["commit"] == "unknown"

    # W&B wrote real offline files; read them back and compare with results.json.
    (run_dir,) = (out / "wandb").glob("offline-run-*")
    logged = read_run(run_dir)
    assert logged["config"]["analysis"]["num_steps"] == 10
    assert logged["config"]["dataset"]["n"] == 150
    for name, value in results["metrics"].items():
        assert logged["summary"][f"metrics/{name}"] == pytest.approx(value)
    for name, check in results["checks"].items():
        assert logged["summary"][f"checks/{name}"] == pytest.approx(check["value"])
    assert "spectrum-results" in logged["artifacts"]
    images = [row["figures/spectrum/path"] for row in logged["history"] if "figures/spectrum/path" in row]
    assert images and (run_dir / "files" / images[0]).stat().st_size > 1000
    assert logged["exit_code"] == 0


def test_hydra_multirun_gives_one_complete_folder_per_job(tmp_path):
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "dataset=wigner,marchenko_pastur", "analysis.num_steps=10,30", "dataset.n=120",
                   "logger=none", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    folders = sorted(p.parent for p in sweep.glob("*/results.json"))
    assert len(folders) == 4
    seen = set()
    for folder in folders:
        results = _complete(folder)
        seen.add((results["config"]["dataset"]["name"], results["config"]["analysis"]["num_steps"]))
    assert seen == {("wigner", 10), ("wigner", 30), ("marchenko_pastur", 10), ("marchenko_pastur", 30)}


def test_preset_sweep_from_the_config(tmp_path):
    """fig4's preset declares its own sweep over two ratios (hydra.sweeper.params)."""
    sweep = tmp_path / "fig4"
    proc = run_cli("-m", "experiment=fig4", "dataset.n=150", "logger=none", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-2000:]
    ratios = sorted(json.loads(p.read_text())["config"]["dataset"]["ratio"]
                    for p in sweep.glob("*/results.json"))
    assert ratios == [0.25, 0.5]


BAD_KEYS = [
    ("analysis.num_steps=0", "analysis.num_steps"),
    ("analysis.num_steps=abc", "analysis.num_steps"),
    ("dataset.n=-5", "dataset.n"),
    ("dtype=float16", "dtype"),
    ("device=tpu", "device"),
    ("analysis.report_steps=[5,999]", "analysis.report_steps"),
]
UNKNOWN_GROUPS = ["analysis", "dataset", "logger"]


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    """The bad-input runs below through the real CLI entry point, forked from one warmed-up interpreter
    (tests/cli_batch.py; one interpreter start instead of nine). test_bad_ratio_for_marchenko_pastur and the
    runs above keep a fresh ``python -m experiments.run`` each."""
    root = tmp_path_factory.mktemp("cli_bad")
    rows = [{"id": f"bad{i}", "args": [override, "logger=none"], "dir": str(root / f"bad{i}")}
            for i, (override, _) in enumerate(BAD_KEYS)]
    rows += [{"id": group, "args": [f"{group}=nonexistent"], "dir": str(root / group)} for group in UNKNOWN_GROUPS]
    return root, run_batch(rows, root / "batch")


@pytest.mark.parametrize("override,key", BAD_KEYS)
def test_bad_input_is_one_line_naming_the_key(override, key, batch):
    root, procs = batch
    row_id = f"bad{BAD_KEYS.index((override, key))}"
    out, proc = root / row_id, procs[row_id]
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("error: ") and key in lines[0]
    assert "Traceback" not in proc.stderr
    assert not (out / "results.json").exists()
    assert not list(out.glob("*.npz")) and not list(out.glob("*.png"))


def test_bad_ratio_for_marchenko_pastur(tmp_path):
    out = tmp_path / "bad"
    proc = run_cli("dataset=marchenko_pastur", "dataset.ratio=0", f"hydra.run.dir={out}")
    assert proc.returncode != 0 and "dataset.ratio" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (out / "results.json").exists() and not (out / "wandb").exists()


@pytest.mark.parametrize("group", UNKNOWN_GROUPS)
def test_unknown_option_fails_with_hydras_list_of_choices(group, batch):
    proc = batch[1][group]
    assert proc.returncode != 0
    assert f"Could not find '{group}/nonexistent'" in proc.stderr
    assert f"Available options in '{group}'" in proc.stderr
