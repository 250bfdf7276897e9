"""Data-parallel curvature products over ``torch.distributed``.

Every process holds the whole model and the same Lanczos state; the data are split across processes.
With batches ``b`` of sizes ``n_b`` split into shards ``S_r`` (``N_r = sum_{b in S_r} n_b``, ``N`` the
total), a local :class:`~curvature.operators.CurvatureOperator` on shard ``r`` returns the mean
``A_r v = sum_{b in S_r} (n_b / N_r) A_b v``; :class:`DistributedOperator` all-reduces
``(N_r / N) A_r v`` over the process group, which is ``sum_b (n_b / N) A_b v``, the product of the
single-process operator over all the data, with uneven shards weighted exactly by their sample counts.

Sharding splits a list of *batches*, not samples, so that each batch keeps its composition: with
BatchNorm in ``train`` mode (batch statistics) a product depends on which samples share a batch.

Typical use (under ``torchrun``, after ``torch.distributed.init_process_group``)::

    batches = shard(all_batches, dist.get_rank(), dist.get_world_size())
    op = DistributedOperator(HessianOperator(model, loss_fn, batches))
    result = lanczos(op.matvec, op.num_params, num_steps=100)   # identical on every rank

The all-reduce runs on the operator's device: CPU tensors with the ``gloo`` backend, ``cuda:LOCAL_RANK``
tensors with ``nccl``. This module never initialises a process group itself; :func:`env_info` only
reads the variables ``torchrun`` sets (:func:`env_info_from_submitit` sets them from a SLURM /
submitit job first).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Optional, Sequence, TypeVar

import torch
import torch.distributed as dist

from curvature.errors import SuiteError

T = TypeVar("T")

#: The environment ``torchrun`` gives each worker.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


@dataclass(frozen=True)
class EnvInfo:
    """This process's place in a ``torchrun`` launch."""

    rank: int
    world_size: int
    local_rank: int


def env_info(environ: Optional[dict] = None) -> Optional[EnvInfo]:
    """Rank, world size and local rank from ``torchrun``'s variables; None when any is missing."""
    env = os.environ if environ is None else environ
    if any(name not in env for name in TORCHRUN_VARIABLES):
        return None
    try:
        return EnvInfo(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env["LOCAL_RANK"]))
    except ValueError:
        return None


def env_info_from_submitit() -> Optional[EnvInfo]:
    """Inside a submitit job (SLURM, or submitit's local executor): export torchrun's variables from it.

    Lets ``hydra/launcher=slurm hydra.launcher.tasks_per_node=4`` run one process per GPU with
    ``env://`` initialisation; None outside such a job or without submitit. ``CUDA_VISIBLE_DEVICES``
    is left alone: each process picks ``cuda:LOCAL_RANK``.
    """
    try:
        from submitit import JobEnvironment
        from submitit.helpers import TorchDistributedEnvironment
        JobEnvironment()
    except (ImportError, RuntimeError, KeyError):
        return None
    # overwrite: torchrun's set is incomplete here (env_info failed), e.g. a cluster-wide MASTER_ADDR
    TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
    return env_info()


def backend_for(device: torch.device) -> str:
    """``nccl`` for CUDA tensors, ``gloo`` for CPU tensors."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def shard(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Items ``rank, rank + world_size, ...``: the shards of all ranks partition ``items``.

    Round-robin keeps the shards within one item of each other in length (batches of a fixed size
    plus one partial batch: the sample counts differ by less than one batch). Every rank must get at
    least one item, since an operator over no data is undefined.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    items = list(items)
    if len(items) < world_size:
        raise SuiteError(f"{len(items)} batches cannot be shared by {world_size} processes: use a "
                         "smaller operator.batch_size or fewer processes (torchrun --nproc_per_node)")
    return items[rank::world_size]


def all_reduce_sum(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """Sum ``tensor`` over the process group in place (made contiguous first); returns it."""
    tensor = tensor.contiguous()
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


class DistributedOperator:
    """The curvature of the mean loss over the union of every rank's data, P x P.

    Wraps a local operator (any object with ``matvec``, ``num_params``, ``num_samples``, ``dtype``,
    ``device``); other attributes (``names``, ``mode``, ``num_products``, ...) are the local
    operator's, and setting them sets them there. ``matvec`` is a collective call: every rank must
    call it with the same vector, in the same order. ``product_seconds`` includes the all-reduce,
    whose share is also kept in ``communication_seconds``.
    """

    _OWN = ("op", "group", "world_size", "local_samples", "num_samples", "communication_seconds")

    def __init__(self, op, group=None):
        if not dist.is_available() or not dist.is_initialized():
            raise SuiteError("DistributedOperator needs an initialised process group "
                             "(torch.distributed.init_process_group), e.g. under torchrun")
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "group", group)
        object.__setattr__(self, "world_size", dist.get_world_size(group))
        object.__setattr__(self, "local_samples", int(op.num_samples))
        count = torch.tensor([op.num_samples], dtype=torch.int64, device=op.device)
        object.__setattr__(self, "num_samples", int(all_reduce_sum(count, group).item()))
        object.__setattr__(self, "communication_seconds", 0.0)

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        """The product of the global mean-loss curvature with ``v`` ((P,) or (P, k)), same on all ranks."""
        local = self.op.matvec(v)  # the local mean: sum over this shard of (n_b / N_r) A_b v
        start = time.perf_counter()
        total = all_reduce_sum(local * (self.local_samples / self.num_samples), self.group)
        if total.device.type == "cuda":
            torch.cuda.synchronize(total.device)
        seconds = time.perf_counter() - start
        object.__setattr__(self, "communication_seconds", self.communication_seconds + seconds)
        self.op.product_seconds = getattr(self.op, "product_seconds", 0.0) + seconds
        return total

    __matmul__ = matvec

    def __getattr__(self, name):
        if name == "op":  # not yet set (e.g. during unpickling): avoid recursing
            raise AttributeError(name)
        return getattr(self.op, name)

    def __setattr__(self, name, value):
        if name in self._OWN:
            object.__setattr__(self, name, value)
        else:
            setattr(self.op, name, value)
