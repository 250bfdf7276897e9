"""Data-parallel curvature products: two gloo processes on the CPU give the single-process operator.

The library test spawns two processes that each hold half of the batches (uneven sample counts) of a
float64 CNN with BatchNorm in train mode; their all-reduced products must equal the dense Hessian /
GGN times the vector, and their Lanczos tridiagonals the single-process run's. The end-to-end test
runs the real CLI under torchrun and compares with a single-process run of the same config.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn

from curvature.dense import dense_ggn, dense_hessian
from curvature.distributed import DistributedOperator, backend_for, env_info, shard
from curvature.errors import SuiteError
from curvature.lanczos import lanczos
from curvature.operators import GGNOperator, HessianOperator, LOSSES
from experiments import validate as V
from experiments.run import dispatch
from tests.conftest import ROOT, make_cfg, run_cli

WORLD_SIZE = 2
NUM_SAMPLES, BATCH_SIZE = 45, 8  # 6 batches: rank 0 gets 3 batches (24 samples), rank 1 3 (21)
STEPS, VECTORS = 20, 2
OPERATORS = {"hessian": (HessianOperator, dense_hessian), "ggn": (GGNOperator, dense_ggn)}
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def problem():
    """A float64 CNN with BatchNorm (232 parameters), its batches and a fixed probe vector."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.BatchNorm2d(3), nn.Tanh(), nn.Flatten(),
                          nn.Linear(3 * 4 * 4, 4)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 1, 6, 6, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (NUM_SAMPLES,), generator=gen)
    batches = [(x[i:i + BATCH_SIZE], y[i:i + BATCH_SIZE]) for i in range(0, NUM_SAMPLES, BATCH_SIZE)]
    num_params = sum(p.numel() for p in model.parameters())
    probe = torch.randn(num_params, 3, generator=gen, dtype=torch.float64)
    return model, batches, probe


def products_and_lanczos(make_op):
    """The probe products and the Lanczos result of one operator (local or distributed)."""
    model, batches, probe = problem()
    op = make_op(model, batches)
    result = lanczos(op.matvec, op.num_params, STEPS, num_vectors=VECTORS, seed=0)
    return {"matvec": op.matvec(probe), "matvec_single": op.matvec(probe[:, 0]),
            "tridiagonal": result.tridiagonal, "ritz_values": result.ritz_values,
            "num_samples": op.num_samples, "local_samples": getattr(op, "local_samples", op.num_samples)}


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=WORLD_SIZE)
    try:
        out = {}
        for name, (cls, _) in OPERATORS.items():
            out[name] = products_and_lanczos(lambda model, batches: DistributedOperator(
                cls(model, LOSSES["cross_entropy"], shard(batches, rank, WORLD_SIZE), bn_mode="train")))
        torch.save(out, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def distributed_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("ranks")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [torch.load(out_dir / f"rank{r}.pt") for r in range(WORLD_SIZE)]


@pytest.mark.parametrize("name", list(OPERATORS))
def test_two_gloo_processes_give_the_single_process_operator(distributed_runs, name):
    cls, dense = OPERATORS[name]
    single = products_and_lanczos(lambda model, batches: cls(model, LOSSES["cross_entropy"], batches,
                                                             bn_mode="train"))
    model, batches, probe = problem()
    exact = dense(model, LOSSES["cross_entropy"], batches, bn_mode="train") @ probe
    rank0, rank1 = (run[name] for run in distributed_runs)
    # every rank holds the same state, bit for bit
    for key in ("matvec", "tridiagonal", "ritz_values"):
        assert torch.equal(rank0[key], rank1[key]), key
    assert rank0["num_samples"] == NUM_SAMPLES
    assert sorted(r["local_samples"] for r in (rank0, rank1)) == [21, 24]  # uneven shards
    # the product is the global mean-loss curvature: dense float64 matrix, and the single process
    scale = exact.abs().max()
    torch.testing.assert_close(rank0["matvec"], exact, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(rank0["matvec_single"], exact[:, 0], rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(rank0["matvec"], single["matvec"], rtol=0, atol=1e-12 * scale)
    # the Lanczos tridiagonal of the single-process run
    t_scale = single["tridiagonal"].abs().max()
    torch.testing.assert_close(rank0["tridiagonal"], single["tridiagonal"], rtol=0, atol=1e-6 * t_scale)
    torch.testing.assert_close(rank0["ritz_values"], single["ritz_values"], rtol=0, atol=1e-6 * t_scale)


def test_shard_partitions_the_batches():
    items = list(range(11))
    shards = [shard(items, r, 3) for r in range(3)]
    assert sorted(sum(shards, [])) == items
    assert [len(s) for s in shards] == [4, 4, 3]
    with pytest.raises(SuiteError, match="operator.batch_size"):
        shard(items[:2], 0, 3)
    with pytest.raises(ValueError):
        shard(items, 3, 3)


def test_env_info_reads_torchrun_variables():
    env = {"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "1"}
    info = env_info(env)
    assert (info.rank, info.world_size, info.local_rank) == (1, 4, 1)
    assert env_info({k: v for k, v in env.items() if k != "MASTER_ADDR"}) is None


@pytest.mark.parametrize("local_rank, visible, expected", [(1, 4, "cuda:1"), (1, 1, "cuda:0"), (3, 2, None)])
def test_cuda_ranks_get_their_own_gpu(tmp_path, monkeypatch, local_rank, visible, expected):
    """The NCCL path's device choice, without a GPU: cuda:LOCAL_RANK, or the one GPU a scheduler bound."""
    from experiments.runtime import resolve_distributed
    env = {"RANK": str(local_rank), "WORLD_SIZE": "4", "LOCAL_RANK": str(local_rank),
           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    cfg = make_cfg(tmp_path, ["distributed=true"])
    if expected is None:
        with pytest.raises(V.ConfigError, match="LOCAL_RANK 3 has no GPU"):
            resolve_distributed(cfg, torch.device("cuda"))
        return
    info, device = resolve_distributed(cfg, torch.device("cuda"))
    assert (info.rank, info.world_size, str(device)) == (local_rank, 4, expected)
    assert backend_for(device) == "nccl" and backend_for(torch.device("cpu")) == "gloo"


def test_operator_needs_a_process_group():
    model, batches, _ = problem()
    with pytest.raises(SuiteError, match="init_process_group"):
        DistributedOperator(HessianOperator(model, LOSSES["cross_entropy"], batches))


# --- the entry point ------------------------------------------------------------------------------
NETWORK = ["dataset=digits", "model=mlp", "model.hidden=[6]", "dataset.num_subsamples=300",
           "operator.batch_size=64", "analysis=spectrum", "analysis.operators=[hessian,ggn]",
           "analysis.num_steps=12",
           "analysis.exact_max_dim=0", "device=cpu", "logger=none"]


def test_distributed_without_torchrun_is_a_one_line_error(tmp_path, monkeypatch):
    for name in list(os.environ):  # also outside any SLURM / submitit job, which could supply them
        if name in TORCHRUN_VARIABLES or name.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(name)
    from experiments.spectrum import run
    with pytest.raises(V.ConfigError, match=r"needs torchrun.*torchrun --nproc_per_node=2 -m experiments\.run"):
        run(make_cfg(tmp_path, NETWORK + ["distributed=true"]))
    assert not (tmp_path / "results.json").exists()


def test_distributed_refuses_an_analysis_that_does_not_shard(tmp_path, monkeypatch):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from experiments.spectrum import run
    with pytest.raises(V.ConfigError, match="matrix dataset does not shard"):
        run(make_cfg(tmp_path, ["dataset.n=20", "analysis.num_steps=3", "distributed=true"]))
    assert not torch.distributed.is_initialized()


def test_torchrun_cli_matches_a_single_process_run(tmp_path):
    dispatch(make_cfg(tmp_path / "single", NETWORK))  # the reference, in-process: torchrun is what is tested
    env = {k: v for k, v in os.environ.items() if k not in TORCHRUN_VARIABLES}
    env.update(WANDB_MODE="offline", HYDRA_FULL_ERROR="0", OMP_NUM_THREADS="1")
    ddp_dir = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={WORLD_SIZE}", "-m", "experiments.run", *NETWORK,
                           "distributed=true",
                           f"hydra.run.dir={ddp_dir}"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((ddp_dir / "results.json").read_text())
    assert results["provenance"]["world_size"] == WORLD_SIZE
    assert any("distributed: 2 processes, backend gloo" in n for n in results["notes"])
    assert not list(ddp_dir.glob(".staging-*"))
    ddp, ref = np.load(ddp_dir / "arrays.npz"), np.load(tmp_path / "single" / "arrays.npz")
    for key in ("hessian_ritz_values", "ggn_ritz_values", "hessian_tridiagonal", "ggn_tridiagonal"):
        np.testing.assert_allclose(ddp[key], ref[key], rtol=0, atol=1e-8 * np.abs(ref[key]).max())


@pytest.mark.slow
def test_submitit_tasks_run_one_distributed_job(tmp_path):
    """hydra/launcher=local with 2 tasks: ranks come from submitit (as on SLURM), results once."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    single = run_cli(*NETWORK, f"hydra.run.dir={tmp_path / 'single'}")
    assert single.returncode == 0, single.stderr[-2000:]
    sweep = tmp_path / "sweep"
    proc = run_cli("-m", "hydra/launcher=local", "hydra.launcher.tasks_per_node=2", *NETWORK,
                   "distributed=true", f"hydra.sweep.dir={sweep}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    (folder,) = [p for p in sweep.iterdir() if p.is_dir() and not p.name.startswith(".")]
    assert json.loads((folder / "results.json").read_text())["provenance"]["world_size"] == 2
    ddp, ref = np.load(folder / "arrays.npz"), np.load(tmp_path / "single" / "arrays.npz")
    for key in ("hessian_ritz_values", "ggn_ritz_values"):
        np.testing.assert_allclose(ddp[key], ref[key], rtol=0, atol=1e-8 * np.abs(ref[key]).max())
