"""Model-sharded Lanczos: two gloo processes with ``fully_shard`` give the single-process spectrum.

Two processes each hold half of every parameter (FSDP2, dim-0 shards, uneven) and half of the batches
(uneven sample counts) of a float64 MLP with BatchNorm in train mode and tanh (smooth, so finite
differences are a valid arbiter). Their Hessian products are central differences of gradients and their
Lanczos basis is sharded like the parameters. References, built in this process by routes the code
under test does not use: a single-process finite-difference run (plain autograd gradients of the
unwrapped model over all batches, the same step rule, unsharded Lanczos) and the exact single-process
run (double-backward Hessian products), plus the dense Hessian.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp
from torch import nn
from torch.func import functional_call

from curvature.dense import dense_hessian
from curvature.distributed import shard
from curvature.errors import SuiteError
from curvature.finite_difference import fd_hessian_product, fd_step
from curvature.functional import curvature_mode
from curvature.lanczos import lanczos, random_start_vectors
from curvature.operators import HessianOperator, LOSSES
from experiments import validate as V
from tests.conftest import make_cfg
from tests.test_distributed import NETWORK, TORCHRUN_VARIABLES, free_port

#: the command line's fsdp route against its single-process finite-difference run (float64)
CLI = [o for o in NETWORK if not o.startswith("analysis.operators")] + [
    "analysis.operators=[hessian]", "operator.product=finite_difference", "dtype=float64"]

WORLD_SIZE = 2
NUM_SAMPLES, BATCH_SIZE = 37, 8  # 5 batches: rank 0 gets 3 (21 samples), rank 1 gets 2 (16)
STEPS, VECTORS = 20, 2
LOSS = LOSSES["cross_entropy"]
#: what the tridiagonal / Ritz values / products of the sharded run may differ from the single-process
#: FD run's, relative to the largest |entry|: the gradients are summed in another order (over ranks,
#: not batches), and that rounding (~1e-16 |g|) is divided by the step (~1e-6); measured 1.1e-11
#: (tridiagonal), 2.9e-12 (Ritz values), 3.2e-12 (products), 4.9e-11 (basis entries)
ROUNDING = 1e-9
#: finite differences against exact products, relative to the largest |entry| / the spectral radius.
#: Measured with the step rule of curvature.finite_difference: products 2.4e-8 off the dense Hessian
#: (central) and 2.2e-8 (Richardson): the third derivative of this BatchNorm MLP is ~1000x the rule's
#: model of it, so truncation dominates; Ritz values after 20 steps 2.7e-7 off the exact run's
FD_PRODUCT, FD_RITZ = 1e-6, 1e-5


def problem():
    """A float64 MLP with BatchNorm (63 parameters), its batches and a probe vector (P, 2)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(NUM_SAMPLES, 4, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 3, (NUM_SAMPLES,), generator=gen)
    batches = [(x[i:i + BATCH_SIZE], y[i:i + BATCH_SIZE]) for i in range(0, NUM_SAMPLES, BATCH_SIZE)]
    probe = torch.randn(sum(p.numel() for p in model.parameters()), 2, generator=gen, dtype=torch.float64)
    return model, batches, probe


def _worker(rank: int, port: int, out_dir: str) -> None:
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}",
                                         rank=rank, world_size=WORLD_SIZE)
    try:
        from curvature.fsdp import ShardedFiniteDifferenceHessian, shard_model, sharded_lanczos
        model, batches, probe = problem()
        try:  # a model that did not go through fully_shard
            ShardedFiniteDifferenceHessian(model, LOSS, batches)
            unsharded = None
        except SuiteError as error:
            unsharded = str(error)
        shard_model(model)
        before = {n: p.full_tensor().clone() for n, p in model.named_parameters()}
        op = ShardedFiniteDifferenceHessian(model, LOSS, shard(batches, rank, WORLD_SIZE), bn_mode="train")
        product = op.matvec(op.layout.local_shard(probe))
        richardson = ShardedFiniteDifferenceHessian(model, LOSS, shard(batches, rank, WORLD_SIZE), bn_mode="train",
                                                    richardson=True).matvec(op.layout.local_shard(probe))
        result = sharded_lanczos(op, STEPS, num_vectors=VECTORS, seed=0, return_basis=True)
        restored = all(torch.equal(p.full_tensor(), before[n]) for n, p in model.named_parameters())
        torch.save({"product": product, "richardson": richardson, "tridiagonal": result.tridiagonal, "ritz_values": result.ritz_values,
                    "basis": result.basis, "slices": op.layout.slices, "num_local": op.num_local,
                    "num_params": op.num_params, "num_samples": op.num_samples,
                    "local_samples": op.local_samples, "restored": restored, "unsharded": unsharded,
                    "local_param_numel": sum(p.to_local().numel() for p in model.parameters())},
                   os.path.join(out_dir, f"rank{rank}.pt"))
        # the command line's route, in this process group (torchrun's variables; Run finds the group)
        os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD_SIZE), LOCAL_RANK=str(rank),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        from experiments.spectrum import run
        run(make_cfg(Path(out_dir) / "cli", CLI + ["distributed=fsdp"]))
    finally:
        torch.distributed.destroy_process_group()


@pytest.fixture(scope="module")
def sharded_runs(tmp_path_factory):
    out_dir = tmp_path_factory.mktemp("fsdp")
    mp.spawn(_worker, args=(free_port(), str(out_dir)), nprocs=WORLD_SIZE, join=True)
    return [{**torch.load(out_dir / f"rank{r}.pt"), "cli": out_dir / "cli"} for r in range(WORLD_SIZE)]


def single_process_fd(model, batches):
    """The single-process finite-difference Hessian product: plain autograd gradients of the whole
    model over all batches (weights n_b / N), the same step rule on the whole vectors' norms."""
    names = [n for n, _ in model.named_parameters()]
    weights = [p.detach() for p in model.parameters()]
    total = sum(y.shape[0] for _, y in batches)

    def gradient(params):
        params = [p.detach().requires_grad_(True) for p in params]
        with curvature_mode(model, "train"):
            loss = sum(y.shape[0] / total * LOSS(functional_call(model, dict(zip(names, params)), (x,)), y)
                       for x, y in batches)
        return list(torch.autograd.grad(loss, params))

    w_norm = torch.cat([w.reshape(-1) for w in weights]).norm().item()

    def matvec(v):
        columns = []
        for col in v.reshape(v.shape[0], -1).T:
            pieces = list(col.split([w.numel() for w in weights]))
            pieces = [p.reshape(w.shape) for p, w in zip(pieces, weights)]
            out = fd_hessian_product(gradient, weights, pieces, fd_step(w_norm, col.norm().item(), col.dtype))
            columns.append(torch.cat([o.reshape(-1) for o in out]))
        return torch.stack(columns, 1).reshape(v.shape)
    return matvec


@pytest.fixture(scope="module")
def references():
    model, batches, probe = problem()
    p = probe.shape[0]
    start = random_start_vectors(p, VECTORS, seed=0)
    fd = single_process_fd(model, batches)
    exact_op = HessianOperator(model, LOSS, batches, bn_mode="train", check_deterministic=False)
    return {"fd_product": fd(probe), "fd": lanczos(fd, p, STEPS, start_vectors=start, return_basis=True),
            "exact": lanczos(exact_op.matvec, p, STEPS, start_vectors=start),
            "dense": dense_hessian(model, LOSS, batches, bn_mode="train"), "probe": probe}


def local(full: torch.Tensor, slices) -> torch.Tensor:
    return torch.cat([full[a:b] for a, b in slices])


def test_each_rank_holds_only_its_shard_of_the_basis(sharded_runs):
    p = sharded_runs[0]["num_params"]
    sizes = [run["num_local"] for run in sharded_runs]
    assert p == 63 and sum(sizes) == p and all(0 < n < p for n in sizes)
    assert sizes == [run["local_param_numel"] for run in sharded_runs]  # vectors sharded like the weights
    for run in sharded_runs:
        assert run["basis"].shape == (VECTORS, run["num_local"], STEPS)
        assert run["product"].shape == (run["num_local"], 2)
    covered = sorted(i for run in sharded_runs for a, b in run["slices"] for i in range(a, b))
    assert covered == list(range(p))  # the shards partition the global vector
    assert [run["local_samples"] for run in sharded_runs] == [21, 16]  # and uneven batch counts
    assert all(run["num_samples"] == NUM_SAMPLES for run in sharded_runs)
    assert all(run["restored"] for run in sharded_runs)  # weights back bit for bit after every product


def test_sharded_tridiagonal_equals_the_single_process_fd_run(sharded_runs, references):
    rank0, rank1 = sharded_runs
    assert torch.equal(rank0["tridiagonal"], rank1["tridiagonal"])  # the same on every rank
    fd = references["fd"]
    scale = fd.tridiagonal.abs().max()
    torch.testing.assert_close(rank0["tridiagonal"], fd.tridiagonal, rtol=0, atol=ROUNDING * scale)
    torch.testing.assert_close(rank0["ritz_values"], fd.ritz_values, rtol=0, atol=ROUNDING * scale)
    for run in sharded_runs:  # products and basis: this rank's rows of the single-process ones
        expected = local(references["fd_product"], run["slices"])
        torch.testing.assert_close(run["product"], expected, rtol=0,
                                   atol=ROUNDING * references["fd_product"].abs().max())
        torch.testing.assert_close(run["basis"], local(fd.basis.transpose(0, 1), run["slices"]).transpose(0, 1),
                                   rtol=0, atol=ROUNDING)


def test_sharded_ritz_values_are_close_to_the_exact_ones(sharded_runs, references):
    exact, dense = references["exact"], references["dense"]
    radius = torch.linalg.eigvalsh(dense).abs().max()
    difference = (sharded_runs[0]["ritz_values"] - exact.ritz_values).abs().max() / radius
    assert difference <= FD_RITZ, f"{difference:.3g}"
    # and the products themselves (central, and one Richardson step) against the dense Hessian
    product = torch.cat([local(dense @ references["probe"], run["slices"]) for run in sharded_runs])
    for key in ("product", "richardson"):
        measured = torch.cat([run[key] for run in sharded_runs])
        error = (measured - product).abs().max() / product.abs().max()
        assert error <= FD_PRODUCT, f"{key}: {error:.3g}"


def test_the_sharded_operator_needs_a_process_group_and_a_sharded_model(sharded_runs):
    from curvature.fsdp import ShardedFiniteDifferenceHessian
    model, batches, _ = problem()
    with pytest.raises(SuiteError, match="init_process_group"):
        ShardedFiniteDifferenceHessian(model, LOSS, batches)
    message = sharded_runs[0]["unsharded"]
    assert message and "0.weight is not sharded" in message and "fully_shard" in message and "\n" not in message


def test_the_command_line_route_equals_a_single_process_fd_run(sharded_runs, tmp_path):
    """distributed=fsdp through experiments.spectrum (torchrun's variables, an existing group) against
    the same config with distributed=false: the same tridiagonal to rounding, and bytes per rank."""
    from experiments.spectrum import run
    folder = sharded_runs[0]["cli"]
    single = run(make_cfg(tmp_path, CLI))
    results = json.loads((folder / "results.json").read_text())
    assert results["provenance"]["world_size"] == WORLD_SIZE
    assert any("central differences of gradients (fully_shard over 2 processes" in n for n in results["notes"])
    sharded, reference = np.load(folder / "arrays.npz"), np.load(tmp_path / "arrays.npz")
    for key in ("hessian_tridiagonal", "hessian_ritz_values"):
        np.testing.assert_allclose(sharded[key], reference[key], rtol=0,
                                   atol=ROUNDING * np.abs(reference[key]).max())
    (row,) = results["tables"]["cost"]
    p, m = row["num_params"], row["lanczos_steps"]
    assert p == single["tables"]["cost"][0]["num_params"] and row["world_size"] == WORLD_SIZE
    assert row["basis_bytes_one_process"] == (m + 1) * p * 8  # one start vector, float64
    assert row["basis_bytes_one_process"] / 2 <= row["basis_bytes_per_rank"] < row["basis_bytes_one_process"]
    assert row["param_bytes_one_process"] == p * 8
    assert row["param_bytes_one_process"] / 2 <= row["param_bytes_per_rank"] < row["param_bytes_one_process"]


FSDP_NETWORK = [o for o in NETWORK if not o.startswith("analysis.operators")] + ["analysis.operators=[hessian]"]


def _outside_torchrun(monkeypatch):
    for name in list(os.environ):
        if name in TORCHRUN_VARIABLES or name.startswith(("SLURM_", "SUBMITIT_")):
            monkeypatch.delenv(name)


def test_fsdp_without_torchrun_is_a_one_line_error(tmp_path, monkeypatch):
    _outside_torchrun(monkeypatch)
    from experiments.spectrum import run
    with pytest.raises(V.ConfigError, match=r"needs torchrun.*torchrun --nproc_per_node=2 -m experiments\.run "
                                            r"\.\.\. distributed=fsdp") as error:
        run(make_cfg(tmp_path, FSDP_NETWORK + ["distributed=fsdp"]))
    assert "\n" not in str(error.value)
    assert not (tmp_path / "results.json").exists()


@pytest.mark.parametrize("overrides, message", [
    (["analysis.operators=[ggn]"], r"analysis.operators.*distributed=fsdp takes the Hessian only"),
    (["analysis.operators=[hessian,ggn]"], r"analysis.operators.*distributed=fsdp takes the Hessian only"),
    (["operator.product=exact"], r"operator.product='exact'.*finite-difference.*operator.product=finite_difference"),
    (["operator.product=finite_difference", "analysis.save_ritz_vectors=true"],
     r"analysis.save_ritz_vectors=True.*not with distributed=fsdp"),
])
def test_fsdp_takes_the_hessian_by_finite_differences_only(tmp_path, monkeypatch, overrides, message):
    env = {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    from experiments.spectrum import run
    with pytest.raises(V.ConfigError, match=message) as error:
        run(make_cfg(tmp_path, FSDP_NETWORK + ["distributed=fsdp"] + overrides))
    assert "\n" not in str(error.value)
    assert not torch.distributed.is_initialized()
    assert not (tmp_path / "results.json").exists()
