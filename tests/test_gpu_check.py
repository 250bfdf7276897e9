"""``make gpu-check`` (experiments/gpu_check.py): its tiny mode end to end on a CPU, its failures and budget,
and (marked ``gpu``, skipped without CUDA) the GPU facts it relies on: CUDA float64 products of CIFAR-shaped
networks equal CPU float64 products built by plain double backward, and peak memory as CUDA counts it."""

from __future__ import annotations

import copy
import json
import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from experiments import gpu_check as G
from experiments.peers import PEERS
from tests.conftest import ROOT

# The documented columns (README "GPU check"), written out here so a change of format fails this test.
COLUMNS = ["step", "model", "row", "s / step", "x gradient", "peak MiB", "vs pyhessian",
           "vs hessian_eigenthings", "vs curvlinops", "vs backpack"]


#: one xdist worker runs the whole module (under ``pytest --dist loadgroup``), so its module fixtures
#: are built once, not once per worker
pytestmark = pytest.mark.xdist_group("gpu_check")


def _table(markdown: str) -> list[list[str]]:
    lines = [ln for ln in markdown.splitlines() if ln.startswith("|")]
    return [[c.strip() for c in ln.strip("|").split("|")] for ln in lines]


@pytest.fixture(scope="module")
def tiny_report(tmp_path_factory):
    """The tiny mode of one benchmark step and the cost step, as `make gpu-check TINY=1` runs them."""
    out = tmp_path_factory.mktemp("gpu_check")
    code, report = G.check(["vgg16", "cost"], "tiny", out)
    return code, report, out


def test_tiny_mode_writes_one_table_with_every_column(tiny_report):
    code, report, out = tiny_report
    assert code == 0, report["steps"]
    assert [s["status"] for s in report["steps"]] == ["ok", "ok"]
    saved = json.loads((out / "gpu_check.json").read_text())
    assert saved["columns"] == COLUMNS and saved["mode"] == "tiny"
    assert saved["environment"]["torch"] == torch.__version__ and saved["environment"]["commit"]
    table = _table((out / "gpu_check.md").read_text())
    assert table[0] == COLUMNS and set(table[1]) == {"---"}
    assert len(table) - 2 == len(saved["rows"]) and all(len(r) == len(COLUMNS) for r in table)
    assert {r["step"] for r in saved["rows"]} == {"vgg16", "cost"}
    assert not list(out.glob("*.tmp")) and not list(out.glob(".*.tmp"))  # written atomically


def test_tiny_mode_numbers_are_finite_positive_and_read_from_the_steps_results(tiny_report):
    _, report, out = tiny_report
    for row in report["rows"]:
        for key in ("seconds_per_step", "x_gradient", "peak_mib", *G.PEER_COLUMNS):
            assert row[key] is None or (math.isfinite(row[key]) and row[key] > 0), (row["row"], key)
        assert row["peak_mib"] is not None
    bench = json.loads((out / "vgg16" / "results.json").read_text())
    steps, gradient = bench["config"]["analysis"]["side_steps"], bench["metrics"]["gradient_seconds"]
    rows = {r["row"]: r for r in report["rows"] if r["step"] == "vgg16"}
    for side in bench["tables"]["side_by_side"]:
        row = rows[side["row"]]
        per_step = side["seconds"] / (steps * side["vectors"])
        assert row["seconds_per_step"] == pytest.approx(per_step, rel=1e-12)
        assert row["x_gradient"] == pytest.approx(per_step / gradient, rel=1e-12)
        assert row["peak_mib"] == side["peak_memory_mb"]
    for peer in PEERS:  # every peer ran; its ratio to itself is 1
        assert rows[peer][f"vs {peer}"] == pytest.approx(1.0, rel=1e-12)
    assert rows["benchmark: hessian product, default path"]["x_gradient"] == bench["metrics"]["hessian_ratio"]
    cost = json.loads((out / "cost" / "results.json").read_text())["tables"]["cost"]
    per_iteration = sorted(r["seconds_per_step"] for r in report["rows"] if r["step"] == "cost")
    assert per_iteration == sorted(r["seconds_per_iteration"] for r in cost) and len(cost) == 2


def test_a_failed_step_is_named_and_the_others_still_run(tmp_path, capsys):
    code, report = G.check(["cost"], "tiny", tmp_path, extra={"cost": ["analysis.num_steps=0"]})
    (step,) = report["steps"]
    assert code == 1 and step["status"] == "failed" and "analysis.num_steps" in step["message"]
    assert "cost failed" in capsys.readouterr().err
    assert json.loads((tmp_path / "gpu_check.json").read_text())["steps"][0]["status"] == "failed"


def test_the_budget_stops_the_running_step_and_skips_the_rest(tmp_path, capsys):
    code, report = G.check(["vgg16", "cost"], "tiny", tmp_path, budget=1.0)
    assert code == 1
    assert [s["status"] for s in report["steps"]] == ["stopped: budget", "not run"]
    assert report["steps"][0]["seconds"] < 30  # stopped, not waited for
    err = capsys.readouterr().err
    assert "vgg16 stopped: budget" in err and "budget ran out" in err and "--budget" in err
    assert (tmp_path / "gpu_check.md").is_file() and not (tmp_path / "vgg16" / "results.json").exists()


@pytest.mark.parametrize("argv, fragment", [
    (["--steps", "vgg16,nope"], "--steps: unknown step(s) nope"),
    (["--budget", "0"], "--budget"),
    (["--set", "tests:dataset.fake_train=8"], "--set tests:"),
    (["--set", "vgg16:no_equals_sign"], "--set vgg16:"),
    (["--tiny", "--full"], "not allowed with"),
])
def test_bad_arguments_are_one_line_with_status_2(argv, fragment, capsys):
    with pytest.raises(SystemExit) as exit_:
        G.main(argv)
    assert exit_.value.code == 2 and fragment in capsys.readouterr().err


def test_a_folder_with_a_report_is_not_overwritten(tmp_path, capsys):
    (tmp_path / "gpu_check.json").write_text("{}")
    assert G.main(["--out", str(tmp_path), "--steps", "cost"]) == 2
    assert "already holds a gpu_check.json" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, argv, mode", [(False, [], "tiny"), (True, [], "full"), (True, ["--tiny"], "tiny"),
                                              (False, ["--full"], "full")])
def test_the_mode_follows_cuda_unless_forced(cuda, argv, mode, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    assert G._parse(argv)[1] == mode


def test_pytest_summary_lines():
    assert G._pytest_summary("...\n=== 3 skipped, 1100 deselected in 9.70s ===\n", 0) == "3 skipped, 1100 deselected"
    assert G._pytest_summary("1 failed, 2 passed in 3.1s\n", 1) == "1 failed, 2 passed"
    assert G._pytest_summary("1164 deselected in 9.7s\n", 5).endswith("(no gpu-marked test collected)")


@pytest.mark.slow
def test_the_whole_tiny_check_from_the_command_line(tmp_path):
    """What `make gpu-check TINY=1` runs: every step, the gpu-marked tests included (skipped on a CPU)."""
    proc = subprocess.run([sys.executable, "-m", "experiments.gpu_check", "--tiny", "--out", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert [s["name"] for s in report["steps"]] == list(G.STEPS) and {s["status"] for s in report["steps"]} == {"ok"}
    assert {r["step"] for r in report["rows"]} == {"vgg16", "preresnet20", "cost"}
    tests = report["steps"][0]["message"]
    assert ("skipped" in tests) if not torch.cuda.is_available() else ("passed" in tests and "failed" not in tests)


# --- GPU facts (marked gpu: skipped without CUDA) ----------------------------------------------------
def _reference_product(name: str, model, batches, v: torch.Tensor) -> torch.Tensor:
    """The Hessian or GGN product of the mean cross-entropy on CPU in float64 by plain autograd: double
    backward for the Hessian, J^T H_L J v (J v by the double-vjp trick) for the GGN."""
    params = [p for p in model.parameters() if p.requires_grad]
    vs = [c.reshape(p.shape) for c, p in zip(torch.split(v, [p.numel() for p in params]), params)]
    total = sum(len(y) for _, y in batches)
    out = [torch.zeros_like(p) for p in params]
    for x, y in batches:
        z = model(x)
        if name == "hessian":
            grads = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum") / total, params, create_graph=True)
            parts = torch.autograd.grad(grads, params, vs)
        else:
            u = torch.zeros_like(z, requires_grad=True)
            jt_u = torch.autograd.grad(z, params, u, create_graph=True)
            jv = torch.autograd.grad(jt_u, u, vs)[0]
            p = z.softmax(1).detach()
            h_jv = (p * jv - p * (p * jv).sum(1, keepdim=True)) / total
            parts = torch.autograd.grad(z, params, h_jv)
        for o, part in zip(out, parts):
            o.add_(part)
    return torch.cat([o.reshape(-1) for o in out])


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
@pytest.mark.parametrize("name", ["hessian", "ggn"])
@pytest.mark.parametrize("model_name, width", [("vgg16", 1 / 16), ("preresnet20", 0.125)])
def test_float64_products_of_cifar_networks_equal_plain_double_backward(model_name, width, name, bn_mode, device):
    """On CUDA (cuDNN's convolution algorithms, the layer-wise rules on the GPU) as on the CPU, where this
    also checks the reference itself."""
    from curvature.models import get_model
    from curvature.operators import make_operator
    torch.manual_seed(0)
    model = get_model(model_name, 10, width=width).double().eval()
    for bn in (m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)):
        bn.train(bn_mode == "train")  # BatchNorm in the operator's mode, dropout off (as the operators run)
    x, y = torch.randn(8, 3, 32, 32, dtype=torch.float64), torch.randint(0, 10, (8,))
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    v = torch.randn(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    expected = _reference_product(name, copy.deepcopy(model), batches, v)
    dev = torch.device(device)
    op = make_operator(name, model.to(dev), F.cross_entropy, [(a.to(dev), b.to(dev)) for a, b in batches],
                       bn_mode=bn_mode, check_deterministic=False)
    got = op.matvec(v.to(dev)).cpu()
    assert (got - expected).norm() <= 1e-10 * expected.norm(), (op.engine, (got - expected).norm() / expected.norm())


@pytest.mark.gpu
def test_cuda_peak_memory_counts_an_allocation_exactly():
    from curvature.training import peak_memory_bytes
    from experiments.side_by_side import PeakMemory
    cuda, size = torch.device("cuda"), 64 * 2**20
    with PeakMemory(cuda) as memory:
        block = torch.empty(size // 4, dtype=torch.float32, device=cuda)
    assert size <= memory.peak <= size + 2**20
    assert peak_memory_bytes(cuda) >= size
    del block


@pytest.mark.gpu
def test_the_tiny_check_runs_on_cuda(tmp_path):
    code, report = G.check(["vgg16", "cost"], "tiny", tmp_path)
    assert code == 0, report["steps"]
    name = torch.cuda.get_device_name(0)
    assert all(s["device"] == name for s in report["steps"]) and report["environment"]["cuda"]
    for step in ("vgg16", "cost"):
        assert json.loads((tmp_path / step / "results.json").read_text())["provenance"]["device"] == "cuda"
