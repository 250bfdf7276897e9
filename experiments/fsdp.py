"""``distributed=fsdp`` for ``analysis=spectrum`` on a network: the model and the Lanczos vectors sharded.

    torchrun --nproc_per_node=2 -m experiments.run analysis=spectrum dataset=digits model=mlp \\
        analysis.operators=[hessian] operator.product=finite_difference distributed=fsdp

Under ``torchrun`` each process holds its whole batches (as with ``distributed=true``), ``1 / world_size``
of every parameter (``fully_shard``, FSDP2) and the same share of every Lanczos vector
(:mod:`curvature.fsdp`); Hessian products are central differences of gradients, since double backward
does not run through sharded parameters. The tridiagonal, the Ritz values and everything derived from
them are the same on every rank and equal a single-process ``operator.product=finite_difference`` run's
to rounding. The cost table gets, per operator, the per-rank memory of the parameters and of the
Lanczos basis next to a single process's (``memory_per_rank``). What sharding rules out is refused
here with a one-line error: the GGN and the Fisher (exact products only), saved Ritz vectors, block
spectra, a basis off the device, resuming, checkpoint series; the dense exact eigenvalues are skipped
(the P x P matrix is what sharding avoids) and no Lanczos state is saved.
"""

from __future__ import annotations

import resource
import sys

import torch
from omegaconf import DictConfig

from experiments import validate as V

FIX = "distributed=true (data sharded, whole model per process)"


def validate(cfg: DictConfig, s: dict) -> None:
    """One-line errors for what ``distributed=fsdp`` cannot do, before any work."""
    if V.get(cfg, "distributed", False) != "fsdp":
        return
    names = s["operator"]["names"]
    key = "analysis.operators" if V.get(cfg, "analysis.operators", None) is not None else "operator.name"
    if names != ["hessian"]:
        raise V.ConfigError(key, names if key == "analysis.operators" else names[0],
                            "distributed=fsdp takes the Hessian only (its products are finite differences of "
                            f"gradients); the {', '.join(n for n in names if n != 'hessian')} shards with {FIX}",
                            "analysis.operators=[hessian]")
    if s["operator"]["product"]["product"] != "finite_difference":
        raise V.ConfigError("operator.product", s["operator"]["product"]["product"],
                            "distributed=fsdp needs finite-difference products: double backward does not run "
                            "through FSDP-sharded parameters", "operator.product=finite_difference")
    refused = {"analysis.save_ritz_vectors": (s["save_ritz_vectors"], False),
               "analysis.blocks": (s["blocks"], None),
               "analysis.basis_device": (s.get("basis_device", "device"), "device"),
               "analysis.lanczos_engine": (s["lanczos_engine"], "native"),
               "resume": (V.get(cfg, "resume", None) or None, None),
               "analysis.checkpoint": (bool(s.get("checkpoints")) or None, None)}
    for key, (value, allowed) in refused.items():
        if value != allowed:
            shown = V.get(cfg, key, value)
            raise V.ConfigError(key, shown, "not with distributed=fsdp: each process holds only its rows of the "
                                "Lanczos vectors (one checkpoint, native engine, basis on the device, no resume)",
                                f"{key}={str(allowed).lower() if allowed is not None else 'null'} or {FIX}")


def build(run, s: dict, model, loss_fn, batches):
    """The sharded finite-difference Hessian of ``model`` (sharded here) over this rank's ``batches``."""
    from curvature.fsdp import ShardedFiniteDifferenceHessian, is_sharded, shard_model
    if not is_sharded(model):
        shard_model(model)
    o, fd = s["operator"], s["operator"]["product"]
    return ShardedFiniteDifferenceHessian(model, loss_fn, batches, bn_mode=o["bn_mode"], params=o["params"],
                                          richardson=fd["richardson"], fd_step=fd["fd_step"])


def spectrum(run, s: dict, op, name: str):
    """Lanczos on local shards (the run's seed and start-vector kind), and the per-rank memory row."""
    from curvature.fsdp import sharded_lanczos
    if s["checkpoint_every"] > 0:
        run.note(f"{name}: no Lanczos state saved under distributed=fsdp (each process holds only its rows of "
                 "the basis): analysis.checkpoint_every does not apply")
    result = sharded_lanczos(op, s["num_steps"], num_vectors=s["num_vectors"], seed=run.seed,
                             start_kind=s["start_vector"], dtype=run.dtype, progress=True)
    return result, memory_row(op, result, run.dtype)


def memory_row(op, result, dtype: torch.dtype) -> dict:
    """Bytes per rank (the largest over the ranks) of the parameters and of the Lanczos basis, next to
    one process holding everything; the peak resident memory of each rank (measured)."""
    size = torch.finfo(dtype).bits // 8
    k, rows = result.num_vectors, min(int(result.num_steps.max()), op.num_params) + 1
    mine = torch.zeros(3, op.world_size, dtype=torch.float64, device=op.device)
    mine[0, op.rank] = sum(p.to_local().numel() * p.element_size() for p in op.model.parameters())
    mine[1, op.rank] = k * rows * op.num_local * size  # lanczos's basis: k x (m + 1) x P_r
    mine[2, op.rank] = _peak_rss_bytes()
    every = op.reduce(mine).tolist()
    whole = sum(p.numel() * p.element_size() for p in op.model.parameters())
    return {"world_size": op.world_size, "param_bytes_per_rank": max(every[0]), "param_bytes_one_process": whole,
            "basis_bytes_per_rank": max(every[1]), "basis_bytes_one_process": k * rows * op.num_params * size,
            "num_local_params": op.num_local, "peak_rss_bytes_max_rank": max(every[2])}


def _peak_rss_bytes() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return float(peak if sys.platform == "darwin" else peak * 1024)
