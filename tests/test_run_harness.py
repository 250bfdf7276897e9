"""The run harness: one line per error, error.log, the run-folder lock, run.log phases, leftovers.

The command line runs for real in subprocesses; where a fault has to be injected (a bug of the suite, a
run held mid-way), the subprocess patches one function and then calls the real entry point
``experiments.run.main``.
"""

import errno
import json
import os
import re
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from curvature.io import DiskFullError, write_bytes_atomic
from experiments.harness import describe
from experiments.run import dispatch
from experiments.run_folder import LOCK_NAME, FolderBusyError
from experiments.tracking import validate_logger
from tests.conftest import ROOT, make_cfg, run_cli

SMALL = ["dataset.n=60", "analysis.num_steps=8", "logger=none"]


def _lines(stderr: str) -> list[str]:
    return [line for line in stderr.strip().splitlines() if line.strip()]


def _patched_cli(patch: str, *args: str, wait=True):
    """``python -c`` that applies ``patch`` and runs the real command line with ``args``."""
    code = "import sys\n" + textwrap.dedent(patch) + \
        f"\nsys.argv = ['experiments.run', *{list(args)!r}]\nimport experiments.run\nexperiments.run.main()\n"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_SILENT": "true", "HYDRA_FULL_ERROR": "0"}
    cmd = [sys.executable, "-c", code]
    if wait:
        return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


# --- the run-folder lock ------------------------------------------------------------------------
def test_a_second_run_into_a_busy_folder_is_refused_in_one_line_and_the_first_completes(tmp_path):
    out, go = tmp_path / "run", tmp_path / "go"
    hold = f"""
        import time, pathlib, experiments.spectrum as S
        real = S.lanczos
        def held(*a, **k):  # hold the run (and its lock) until the test says go
            while not pathlib.Path({str(go)!r}).exists():
                time.sleep(0.05)
            return real(*a, **k)
        S.lanczos = held
    """
    first = _patched_cli(hold, *SMALL, f"hydra.run.dir={out}", wait=False)
    try:
        end = time.monotonic() + 120
        while not (out / LOCK_NAME).exists():
            assert first.poll() is None, first.stderr.read()
            assert time.monotonic() < end
            time.sleep(0.05)
        second = run_cli("dataset.n=61", *SMALL[1:], f"hydra.run.dir={out}")
        assert second.returncode == 2 and "Traceback" not in second.stderr
        (line,) = _lines(second.stderr)
        assert line.startswith(f"error: run folder {out} is in use by another run (pid {first.pid}")
    finally:
        go.touch()
        stdout, stderr = first.communicate(timeout=120)
    assert first.returncode == 0, stderr[-2000:]
    results = json.loads((out / "results.json").read_text())
    assert results["config"]["dataset"]["n"] == 60
    assert "dataset.n=61" not in (out / ".hydra" / "overrides.yaml").read_text()  # refused before Hydra wrote
    assert not (out / LOCK_NAME).exists()
    # run.log (Hydra's job log) holds the phases with their seconds
    log = (out / "run.log").read_text()
    for phase in ("setup \\(validation, run folder, seeds\\)", "lanczos \\(matrix\\)", "write results"):
        assert re.search(rf"phase {phase}: \d+\.\d s", log), log
    assert [p["name"] for p in results["phases"]][:2] == ["setup", "lanczos (matrix)"]


def test_a_stale_lock_is_taken_over_and_a_live_one_refused(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    host = socket.gethostname()
    (out / LOCK_NAME).write_text(json.dumps({"pid": os.getppid(), "host": host, "token": "x",
                                             "started_at": "2026-01-01T00:00:00+00:00"}))
    with pytest.raises(FolderBusyError, match=rf"in use by another run \(pid {os.getppid()},"):
        dispatch(make_cfg(out, SMALL))
    assert not (out / "results.json").exists()

    dead = _dead_pid()
    (out / LOCK_NAME).write_text(json.dumps({"pid": dead, "host": host, "token": "y", "started_at": "earlier"}))
    results = dispatch(make_cfg(out, SMALL))
    assert any(f"took over the lock of an earlier run in this folder (pid {dead}" in n for n in results["notes"])
    assert not (out / LOCK_NAME).exists()


# --- one line per error -----------------------------------------------------------------------
def test_an_internal_error_is_one_line_with_the_traceback_in_error_log_and_keeps_what_completed(tmp_path):
    out = tmp_path / "run"
    bug = """
        import experiments.spectrum as S
        def broken(result):
            return {}["a key the code forgot"]
        S.SpectralMeasure.from_lanczos = staticmethod(broken)
    """
    proc = _patched_cli(bug, *SMALL, f"hydra.run.dir={out}")
    assert proc.returncode == 3, proc.stderr
    (line,) = _lines(proc.stderr)
    assert line == (f"internal error: KeyError: 'a key the code forgot' (full traceback in {out}/error.log; "
                    f"what completed is in {out}/results.partial.json)")
    log = (out / "error.log").read_text()
    assert "Traceback (most recent call last)" in log and "in broken" in log
    partial = json.loads((out / "results.partial.json").read_text())
    assert partial["completed"]["matrix"] == {"lanczos_finished": True}
    assert [p["name"] for p in partial["phases"]] == ["setup", "lanczos (matrix)"]
    assert partial["failed_in_phase"] is None and not (out / "results.json").exists()
    assert not (out / LOCK_NAME).exists()


def test_an_error_in_the_users_model_names_the_module_and_its_file_and_line(tmp_path, monkeypatch):
    package = tmp_path / "user"
    package.mkdir()
    (package / "shapebug_nets.py").write_text(textwrap.dedent("""\
        from torch import nn


        class ShapeBug(nn.Module):
            def __init__(self, num_classes=10):
                super().__init__()
                self.fc = nn.Linear(32, num_classes)

            def forward(self, x):
                return self.fc(x.flatten(1))  # digits are 8 x 8 = 64 features, not 32
        """))
    monkeypatch.setenv("PYTHONPATH", str(package))
    out = tmp_path / "run"
    proc = run_cli("dataset=digits", "model=custom", "model._target_=shapebug_nets.ShapeBug",
                   "dataset.num_subsamples=64", "analysis.num_steps=3", "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = _lines(proc.stderr)
    assert line.startswith("error: ") and "shapes cannot be multiplied" in line
    assert f"{package / 'shapebug_nets.py'}:10 in forward, module shapebug_nets" in line
    assert "model._target_=shapebug_nets.ShapeBug" in line and f"{out}/error.log" in line
    assert "shapebug_nets.py" in (out / "error.log").read_text()


def test_an_unknown_group_option_is_a_short_paragraph_with_the_choices(tmp_path):
    proc = run_cli("model=nonexistent", f"hydra.run.dir={tmp_path}")
    assert proc.returncode == 2
    lines = _lines(proc.stderr)
    assert lines[0] == "error: unknown option 'nonexistent' for group model (Could not find 'model/nonexistent')."
    assert lines[1].startswith("  Available options in 'model': cnn, custom, ") and len(lines) == 3
    assert lines[2].strip().startswith("choose one of them, e.g. model=")


def test_bad_logger_settings_fail_up_front_in_one_line(tmp_path, monkeypatch):
    out = tmp_path / "run"
    proc = run_cli("logger.mode=sometimes", *SMALL[:2], f"hydra.run.dir={out}")
    assert proc.returncode == 2
    (line,) = _lines(proc.stderr)
    assert line.startswith("error: config key logger.mode='sometimes' is invalid: must be one of offline")
    assert not (out / "wandb").exists()

    wandb = {"name": "wandb", "mode": "offline"}
    monkeypatch.setenv("WANDB_MODE", "")            # set but blank: as if unset
    assert validate_logger(wandb)["mode"] == "offline" and "WANDB_MODE" not in os.environ
    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(Exception, match="WANDB_MODE='sometimes' is invalid"):
        validate_logger(wandb)
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    with pytest.raises(Exception, match="logger.mode=online needs a W&B API key"):
        validate_logger({**wandb, "mode": "online"})
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)   # a key is enough: nothing is contacted here
    assert validate_logger({**wandb, "mode": "online"})["mode"] == "online"


def test_more_lanczos_steps_than_the_matrix_has_rows_fails_up_front(tmp_path):
    out = tmp_path / "run"
    proc = run_cli("dataset=wigner", "dataset.n=20", "analysis.num_steps=50", "analysis.checkpoint_every=5",
                   "logger=none", f"hydra.run.dir={out}")
    assert proc.returncode == 2
    (line,) = _lines(proc.stderr)
    assert line.startswith("error: config key analysis.num_steps=50 is invalid: at most dataset.n=20")
    assert not list(out.glob("lanczos-state-*")) and not (out / "results.partial.json").exists()


def test_out_of_memory_and_a_full_disk_are_one_line_saying_what_to_do(tmp_path, monkeypatch):
    cfg = make_cfg(tmp_path / "oom", ["dataset.n=10000000"])
    oom = RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                       "you tried to allocate 800000000000000 bytes. Error code 12")
    line, code = describe(oom, cfg, tmp_path)
    assert code == 2 and line == ("error: out of memory (RuntimeError: tried to allocate 728 TB): "
                                  "reduce dataset.n (now 10000000)")

    def full(fd):
        raise OSError(errno.ENOSPC, "No space left on device")
    monkeypatch.setattr(os, "fsync", full)
    target = tmp_path / "lanczos-state-matrix.pt"
    with pytest.raises(DiskFullError, match=f"no space left on the device while writing {target} ") as info:
        write_bytes_atomic(target, b"x" * 1000)
    assert "\n" not in str(info.value) and "partial file was removed" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == []   # no target, no .tmp left


# --- leftovers of a kill -9, resume -----------------------------------------------------------
def test_resume_cleans_what_a_kill_left_and_notes_the_resume_once(tmp_path, monkeypatch):
    out = tmp_path / "run"
    base = ["dataset.n=80", "analysis.checkpoint_every=4", "analysis.exact_max_dim=0", "logger=none"]
    import experiments.spectrum as S

    def killed(result):  # the run dies after its Lanczos state is saved, before results.json
        raise KeyboardInterrupt
    monkeypatch.setattr(S.SpectralMeasure, "from_lanczos", staticmethod(killed))
    with pytest.raises(KeyboardInterrupt):
        dispatch(make_cfg(out, base + ["analysis.num_steps=8"]))
    monkeypatch.undo()
    assert (out / "lanczos-state-matrix.pt").is_file() and not (out / "results.json").exists()
    # what a kill -9 at the wrong moment leaves: a staging folder, a temporary, the dead run's lock
    (out / ".staging-k1ll3d").mkdir()
    (out / ".staging-k1ll3d" / "results.json").write_text("{")
    (out / ".lanczos-state-matrix.pt.x8f2a1.tmp").write_bytes(b"half a state")
    (out / LOCK_NAME).write_text(json.dumps({"pid": _dead_pid(), "host": socket.gethostname()}))

    results = dispatch(make_cfg(out, base + ["analysis.num_steps=16", "resume=true"]))
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []
    leftovers = [n for n in results["notes"] if n.startswith("removed 2 leftover(s) of an interrupted run")]
    assert len(leftovers) == 1
    assert ".staging-k1ll3d" in leftovers[0] and ".lanczos-state-matrix.pt.x8f2a1.tmp" in leftovers[0]
    resumed = [n for n in results["notes"] if "resumed" in n]
    assert resumed == ["matrix: resumed from lanczos-state-matrix.pt after step 8 "
                       "(the cost table covers the resumed part only)"]
    assert results["lanczos"]["num_steps"] == [16]
    assert "phase lanczos (matrix)" in (out / "run.log").read_text()
