"""``analysis=spectrum`` on a network: Lanczos spectra of the Hessian / GGN of the mean loss.

    python -m experiments.run experiment=fig7 analysis.checkpoint=<trained VGG16 checkpoint>
    python -m experiments.run experiment=fig7_smoke                    # CPU, fake CIFAR, small width

Loads a training checkpoint (or the initial weights), builds each operator over the chosen split
(``dataset.num_subsamples`` gives a seeded subset), runs Lanczos, and saves Ritz values, weights,
residual bounds, the stem summary, seconds per Lanczos iteration and peak memory (the paper's
"Computational Cost" paragraph), with two or more start vectors the standard errors and 95% intervals
over vectors (table ``uncertainty``, metrics ``<operator>_<quantity>_stderr`` / ``_ci95_low`` /
``_ci95_high``; see :func:`curvature.spectrum.uncertainty`), and with ``analysis.save_ritz_vectors=true``
the Ritz vectors in ``ritz_vectors_<operator>.pt``: a dict with ``ritz_values`` (k, m), ``ritz_vectors``
(k, m, P), ``param_names``, ``param_shapes``, ``num_params``, ``model`` (the model config) and ``checkpoint``,
which the landscape analysis reads. Small models also get the exact eigenvalues from the dense
P x P matrix (P products) and the 1-Wasserstein distance to them: with ``analysis.exact_max_dim=auto``
only when that costs no more than the Lanczos run itself, with an integer whenever
``num_params <= analysis.exact_max_dim``; announced in the notes, timed in the cost table
(``exact_seconds``, ``exact_share_of_run``). ``results.json``'s ``data`` entry says which samples were
used: the dataset settings, split, batch size, normalisation and SHA-256 digests of the samples.
"""

from __future__ import annotations

import hashlib
import math
import time

import torch
from omegaconf import DictConfig
from torch import nn

from curvature import plotting
from curvature.dense import operator_matrix
from curvature.distributed import DistributedOperator, shard
from curvature.io import torch_save_atomic
from curvature.lanczos import lanczos
from curvature.microbatch import describe_splits
from curvature.operators import CACHE_MODES, OPERATORS, make_operator
from curvature.spectrum import SpectralMeasure, uncertainty
from curvature.training import peak_memory_bytes
from experiments import blocks as B
from experiments import fsdp as fsdp_route
from experiments import lanczos_state
from experiments import validate as V
from experiments.loss_config import build_loss, validate_loss
from experiments.networks import (build_network, checkpoint_files, checkpoint_path, load_data,
                                  require_trained, validate_image_dataset, validate_model)
from experiments.runtime import Run

DENSE_CHUNK = 32     # unit vectors per product while building the dense matrix (operator_matrix's default)
AUTO_MAX_DIM = 4000  # exact_max_dim=auto never goes past the old default: the estimate leaves out the
                     # P^2 memory and eigh's P^3, negligible below it (4000^2 float64: 128 MB)
PROBE_SHARE = 0.25   # auto's timing probe costs at most this share of the Lanczos run, even when a
                     # block of products is no faster than its columns one by one

def validate_operator(cfg: DictConfig, finite_difference: bool = False) -> dict:
    """The operator settings; ``finite_difference``: the analysis passes ``o["product"]`` to ``make_operator``."""
    ops = V.get(cfg, "analysis.operators", None)
    if ops is None:
        ops = [V.choice(cfg, "operator.name", list(OPERATORS), "operator=hessian")]
    else:
        ops = V.choice_list(cfg, "analysis.operators", OPERATORS, "analysis.operators=[ggn,hessian]", non_empty=True)
    params = V.get(cfg, "operator.params", None)
    if params is not None and not (isinstance(params, list) and all(isinstance(p, str) for p in params)):
        raise V.ConfigError("operator.params", params, "must be a list of glob patterns",
                            "operator.params=[features.0.*]")
    return {"names": ops, **validate_loss(cfg),
            "bn_mode": V.choice(cfg, "operator.bn_mode", ["train", "eval"]),
            "params": params,
            "batch_size": V.positive_int(cfg, "operator.batch_size", "operator.batch_size=256"),
            "hvp_mode": V.get(cfg, "operator.hvp_mode", "auto"),
            "check_deterministic": V.boolean(cfg, "operator.check_deterministic"),
            "cache": None if V.get(cfg, "operator.cache", None) is None else
            V.choice(cfg, "operator.cache", list(CACHE_MODES)),
            "layerwise": V.choice(cfg, "operator.layerwise", ["auto", True, False], "operator.layerwise=auto")
            if V.get(cfg, "operator.layerwise", None) is not None else "auto",
            "fisher": fisher_options(cfg), "product": product_options(cfg, ops, finite_difference)}


def product_options(cfg: DictConfig, names: list, supported: bool) -> dict:
    """``make_operator``'s ``product``, ``fd_step`` and ``richardson`` (:mod:`curvature.finite_difference`)."""
    product = V.choice(cfg, "operator.product", ["exact", "finite_difference"], "operator.product=exact") \
        if V.get(cfg, "operator.product", None) is not None else "exact"
    if product == "exact":
        return {"product": "exact"}
    if not supported:
        raise V.ConfigError("operator.product", product, "this analysis takes exact products only (finite "
                            "differences run in analysis=spectrum, trace, top_eigen and fd_error)", "operator.product=exact")
    if any(name != "hessian" for name in names):
        other = next(name for name in names if name != "hessian")
        raise V.ConfigError("operator.product", product, f"finite differences are for the Hessian only: the "
                            f"{other} keeps its exact route", "operator=hessian or operator.product=exact")
    step = V.get(cfg, "operator.fd_step", "auto")
    if step != "auto":
        step = V.positive_number(cfg, "operator.fd_step", "operator.fd_step=auto")
    richardson = V.boolean(cfg, "operator.richardson") if V.get(cfg, "operator.richardson", None) is not None \
        else False
    return {"product": product, "fd_step": step, "richardson": richardson}


def fisher_options(cfg: DictConfig) -> dict:
    """``make_operator``'s options for the Fisher (the other operators drop them): kind, draws, their seed."""
    from curvature.fisher import FISHER_KINDS
    return {"kind": V.choice(cfg, "operator.kind", list(FISHER_KINDS), "operator.kind=empirical")
            if V.get(cfg, "operator.kind", None) is not None else "empirical",
            "mc_samples": V.positive_int(cfg, "operator.mc_samples", "operator.mc_samples=1")
            if V.get(cfg, "operator.mc_samples", None) is not None else 1,
            "seed": V.integer(cfg, "seed", minimum=0, example="seed=0")}


def validate_network(cfg: DictConfig, common: dict) -> dict:
    dataset = validate_image_dataset(cfg, allow_text=True)
    series = checkpoint_files(cfg, "analysis.checkpoint")  # a folder or a list: experiments/spectrum_checkpoints.py
    settings = {**common, "dataset": dataset, "model": validate_model(cfg),
                "blocks": B.validate(cfg),
                "operator": validate_operator(cfg, finite_difference=True),
                "checkpoint": series[0] if series else checkpoint_path(cfg, "analysis.checkpoint"),
                "checkpoints": series,
                "data_split": V.choice(cfg, "analysis.data_split", ["train", "test"]),
                "compare_vectors": V.boolean(cfg, "analysis.compare_vectors"),
                "expect_negative_mass": V.boolean(cfg, "analysis.expect_negative_mass"),
                "supports_distributed": True}  # distributed=true: batches sharded, products all-reduced
    require_trained(cfg, settings["checkpoint"])
    fsdp_route.validate(cfg, settings)  # distributed=fsdp: Hessian by finite differences, no saved vectors
    if settings["compare_vectors"] and settings["num_vectors"] < 2:
        raise V.ConfigError("analysis.num_vectors", settings["num_vectors"],
                            "compare_vectors needs at least two start vectors", "analysis.num_vectors=2")
    if settings["operator"]["hvp_mode"] not in ("auto", "forward_over_reverse", "reverse_over_reverse"):
        raise V.ConfigError("operator.hvp_mode", settings["operator"]["hvp_mode"],
                            "must be auto, forward_over_reverse or reverse_over_reverse", "operator.hvp_mode=auto")
    return settings


def network_data(run: Run, s: dict) -> tuple:
    """``(model, data, batches)`` of a network analysis: the weights (noted), the ``data_split`` and its
    batches of ``operator.batch_size`` in a fixed order without augmentation."""
    splits = load_data(s["dataset"], run.device, run.seed)
    model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
    run.note(f"weights: {s['checkpoint'] or 'initial (seed ' + str(run.seed) + ')'}")
    data = splits.train if s["data_split"] == "train" else splits.test
    return model, data, list(data.batches(s["operator"]["batch_size"], dtype=run.dtype))


def run_network(run: Run) -> dict:
    s = run.settings
    states = lanczos_state.load_states(run, s["operator"]["names"])  # resume=true: before any work
    model, data, batches = network_data(run, s)
    o = s["operator"]
    samples = _data_record(run, s, data, batches) if run.is_main else None  # before sharding: all samples
    if run.dist_info:  # whole batches per rank, so BatchNorm train mode sees the same batches
        batches = shard(batches, run.rank, run.world_size)
    run.metric("num_samples", len(data))
    loss_fn = build_loss(o)
    blocks = B.groups(s, model)  # before any Lanczos work: a bad group fails at once
    V.parameter_names(model, o["params"])  # so is a glob list matching no parameter
    cost, panels, block_rows, error_rows = [], [], [], []
    for name in o["names"]:
        op = build_operator(run, s, name, model, loss_fn, batches)
        result, seconds, row = operator_spectrum(run, s, name, op, len(data), states)
        cost.append(row)
        run.metric(f"{name}_seconds_per_iteration", cost[-1]["seconds_per_iteration"])
        run.metric(f"{name}_peak_memory_bytes", cost[-1]["peak_memory_bytes"])
        measure = SpectralMeasure.from_lanczos(result)
        exact, exact_cost = _exact_eigenvalues(run, s, name, op, seconds)
        cost[-1].update(exact_cost)
        run.metric(f"{name}_exact_seconds", exact_cost["exact_seconds"])
        _record(run, s, name, op, model, result, measure, exact)
        error_rows += record_uncertainty(run, result, s["tolerances"]["zero_node"], prefix=f"{name}_",
                                         label=f"{name}: ", operator=name)
        panels.append((name, measure, exact, SpectralMeasure.per_vector(result)))
        if blocks is not None:  # through this operator's products: the blocks share its primal cache
            block_rows += B.run_blocks(run, name, op, measure, blocks)
    elapsed = time.perf_counter() - run.t0
    for row in cost:  # the share of the run so far (only drawing and writing remain)
        row["exact_share_of_run"] = row["exact_seconds"] / elapsed
    run.metric("num_params", cost[0]["num_params"])
    run.table("cost", cost)
    if block_rows:
        run.table("blocks", block_rows)
    if error_rows:
        run.table("uncertainty", error_rows)
    run.figure(_draw(panels, s, has_batch_norm(model)), "spectrum")
    results = run.finish(lanczos={"num_steps": s["num_steps"], "num_vectors": s["num_vectors"],
                                  "engine": s["lanczos_engine"]},
                         operator={**o, "names": o["names"]}, checkpoint=s["checkpoint"], data=samples)
    lanczos_state.remove_states(run, o["names"])
    return results


def build_operator(run: Run, s: dict, name: str, model: nn.Module, loss_fn, batches):
    """The curvature operator ``name`` of ``model`` over ``batches``, as ``s["operator"]`` sets it up."""
    o = s["operator"]
    if run.fsdp:  # parameters and Lanczos vectors sharded (experiments/fsdp.py)
        return fsdp_route.build(run, s, model, loss_fn, batches)
    op = operator_from_settings(o, name, model, loss_fn, batches)
    return DistributedOperator(op) if run.dist_info else op


def operator_from_settings(o: dict, name: str, model: nn.Module, loss_fn, batches):
    """``make_operator`` with every setting of ``validate_operator``'s dict ``o`` (the one place that maps
    the operator group onto the library's keywords; used by the spectrum, trace and top_eigen analyses)."""
    return make_operator(name, model, loss_fn, batches, bn_mode=o["bn_mode"], params=o["params"],
                         mode=o["hvp_mode"], check_deterministic=o["check_deterministic"], cache=o["cache"],
                         layerwise=o["layerwise"], **o["fisher"], **o["product"])


def operator_spectrum(run: Run, s: dict, name: str, op, num_samples: int, states: dict,
                      key: str | None = None, label: str = "") -> tuple:
    """Lanczos on ``op`` with the run's start vectors: ``(result, seconds, cost-table row)``, the notes
    on how the products ran. ``key`` names its saved Lanczos state (default ``name``); ``label``
    prefixes the notes that belong to this run of it alone (the checkpoint, in a series)."""
    key = key or name
    if run.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(run.device)
    op.num_products, op.product_seconds = 0, 0.0
    start = time.perf_counter()
    memory = {}  # distributed=fsdp: bytes per rank
    with lanczos_state.keep_partial(run, key, prefix=f"{key}_"):
        if run.fsdp:
            result, memory = fsdp_route.spectrum(run, s, op, name)
        else:
            result = lanczos(op.matvec, op.num_params, s["num_steps"], num_vectors=s["num_vectors"],
                             seed=run.seed, dtype=run.dtype, device=run.device, start_kind=s["start_vector"],
                             return_vectors=s["save_ritz_vectors"], progress=True,
                             **lanczos_state.lanczos_options(run, key, states))
    seconds = time.perf_counter() - start
    for note in result.notes:
        run.note(f"{label}{name}: {note}")
    if describe_splits(op):  # CUDA OOM: products fell back to micro-batches
        run.note(f"{label}{name}: {describe_splits(op)}")
        run.metric(f"{name}_oom_split_batches", len(op.oom_splits))
    run.note(f"{name} products: {op.engine}" + (f" ({op.layerwise_reason})" if op.engine != "layerwise" else "")
             + f"; loss {op.loss.describe()}")
    for note in op.notes:
        run.note(f"{name}: {note}")
    if not op.forward_ad:
        run.note(f"{name}: reverse-mode products only (no forward-mode AD: {op.forward_ad_reason})")
    if name == "hessian" and op.engine != "layerwise":
        run.note(f"hessian-vector products: {op.mode}" +
                 (f" (auto: {', '.join(f'{k} {v:.3g} s' for k, v in op.mode_seconds.items())})"
                  if op.mode_seconds else ""))
    mode = "layerwise" if op.engine == "layerwise" else getattr(op, "mode", "dual_forward")
    row = {"operator": name, "product_mode": mode, "num_params": op.num_params, "num_samples": num_samples,
           "lanczos_steps": int(result.num_steps.max()), "operator_products": op.num_products,
           "seconds_total": seconds, "seconds_per_iteration": seconds / max(op.num_products, 1),
           "seconds_per_product": op.product_seconds / max(op.num_products, 1),
           "lanczos_overhead_fraction": 1 - op.product_seconds / seconds if seconds else 0.0,
           "peak_memory_bytes": peak_memory_bytes(run.device),
           "peak_memory_kind": "cuda_max_allocated" if run.device.type == "cuda" else "process_max_rss",
           "device": str(run.device), "dtype": str(run.dtype).replace("torch.", "")}
    return result, seconds, {**row, **memory}


def record_uncertainty(run: Run, result, zero_node: float, prefix: str = "", suffix: str = "",
                       label: str = "", **keys) -> list[dict]:
    """Metrics ``<prefix><quantity>_{stderr,ci95_low,ci95_high}<suffix>`` and the ``uncertainty`` table's
    rows (``keys`` prepended) for :func:`curvature.spectrum.uncertainty` over the start vectors of
    ``result``; mass near zero: nodes with |node| <= ``zero_node`` x the largest |Ritz value|. One
    start vector: a note instead, and no rows."""
    if result.num_vectors < 2:
        run.note(f"{label}normalised_trace from one start vector has no error estimate (one start vector: "
                 "no interval); analysis.num_vectors >= 2 gives standard errors and 95% intervals")
        return []
    measures = SpectralMeasure.per_vector(result)
    near = zero_node * max(float(m.nodes.abs().max()) for m in measures)
    rows = uncertainty(measures, intervals={"near_zero": (-near, near)})
    for quantity, row in rows.items():
        for key in ("stderr", "ci95_low", "ci95_high"):
            run.metric(f"{prefix}{quantity}_{key}{suffix}", row[key])
    return [{**keys, "quantity": quantity, **row} for quantity, row in rows.items()]


def _exact_eigenvalues(run: Run, s: dict, name: str, op, lanczos_seconds: float):
    """The exact eigenvalues from the dense P x P matrix (P products in blocks of columns), or None, and
    the cost-table entries.

    An integer ``analysis.exact_max_dim`` builds the matrix whenever P is at most it (0: never);
    ``auto`` only when the estimated cost is at most the Lanczos run's seconds (see :func:`_dense_plan`),
    so the check never dwarfs the analysis unless asked.
    """
    p, limit = op.num_params, s["exact_max_dim"]
    cost = {"exact": "off", "exact_seconds": 0.0, "exact_estimated_seconds": None}
    if limit == 0:
        return None, cost
    if run.fsdp:
        run.note(f"{name}: no exact eigenvalues under distributed=fsdp (the dense {p} x {p} matrix is what "
                 "sharding avoids)")
        return None, {**cost, "exact": "skipped: fsdp"}
    if p > (AUTO_MAX_DIM if limit == "auto" else limit):
        run.note(f"{name}: no exact eigenvalues: {p} parameters > analysis.exact_max_dim={limit}" +
                 (f" (auto builds up to {AUTO_MAX_DIM})" if limit == "auto" else ""))
        return None, {**cost, "exact": "skipped: size"}
    plan = _dense_plan(run, op, s["num_vectors"], lanczos_seconds, build_anyway=limit != "auto")
    estimate = "?" if plan["estimate"] is None else f"{plan['estimate']:.3g}"
    cost = {**cost, "exact_seconds": plan["probe_seconds"], "exact_estimated_seconds": plan["estimate"]}
    if plan["why"]:
        run.note(f"{name}: no exact eigenvalues (analysis.exact_max_dim=auto): the dense {p} x {p} matrix "
                 f"would take about {estimate} s ({plan['why']}), more than the {lanczos_seconds:.3g} s of "
                 f"Lanczos; analysis.exact_max_dim={p} computes them anyway")
        return None, {**cost, "exact": "skipped: cost"}
    text = (f"{name}: exact eigenvalues: building the dense {p} x {p} matrix from {p} products, estimated "
            f"{estimate} s ({plan['basis']}) next to {lanczos_seconds:.3g} s of Lanczos")
    run.note(text)
    if run.is_main:
        print(text, flush=True)
    start = time.perf_counter()
    matrix = operator_matrix(op, plan["chunk"], progress=True, first=plan["first"]).to(torch.float64)
    exact = torch.linalg.eigvalsh(matrix).cpu()
    seconds = plan["probe_seconds"] + time.perf_counter() - start
    if run.is_main:
        print(f"{name}: exact eigenvalues in {seconds:.3g} s", flush=True)
    return exact, {**cost, "exact": "computed", "exact_seconds": seconds}


def _dense_plan(run: Run, op, num_vectors: int, lanczos_seconds: float, build_anyway: bool) -> dict:
    """How to build the dense matrix, its estimated seconds, and ``why`` not to (None: build).

    The estimate is P x the seconds per column of the Lanczos run's products (each takes its
    ``num_vectors`` start vectors at once). When that exceeds the Lanczos run, ``auto`` times one
    block of the matrix's first columns (kept for the build) and estimates from it instead: a block
    at most DENSE_CHUNK wide and narrow enough to cost at most PROBE_SHARE of the Lanczos run even if
    no faster than its columns one by one, and not tried at all when blocks that wide as cheap as
    one Lanczos product would already cost more than the Lanczos run.
    """
    p = op.num_params
    plan = {"chunk": DENSE_CHUNK, "first": None, "probe_seconds": 0.0, "estimate": None, "why": None,
            "basis": "no product timed in this process: its Lanczos state was resumed"}
    if not op.num_products:
        return plan if build_anyway else {**plan, "why": plan["basis"]}
    per_product = op.product_seconds / op.num_products
    per_column = per_product / num_vectors
    plan.update(estimate=p * per_column, basis=f"{p} columns at {per_column:.3g} s, as in the Lanczos products")
    if build_anyway or _least(run, op, p * per_column <= lanczos_seconds):
        return plan
    widest = int(PROBE_SHARE * lanczos_seconds / max(per_column, 1e-9))  # the probe's cost cap
    chunk = int(_least(run, op, min(DENSE_CHUNK, p, max(1, widest))))
    blocks = math.ceil(p / chunk)
    if not _least(run, op, blocks * per_product <= lanczos_seconds):
        return {**plan, "why": f"{plan['basis']}; even {blocks} blocks of {chunk} as cheap as one product "
                               f"would take {blocks * per_product:.3g} s"}
    start = time.perf_counter()
    first = op.matvec(torch.eye(p, chunk, dtype=op.dtype, device=op.device))
    probe = time.perf_counter() - start
    plan.update(chunk=chunk, first=first, probe_seconds=probe, estimate=blocks * probe,
                basis=f"{blocks} blocks of {chunk} columns at {probe:.3g} s, measured")
    if not _least(run, op, blocks * probe <= lanczos_seconds):
        plan["why"] = plan["basis"]
    return plan


def _least(run: Run, op, value: float) -> float:
    """The smallest ``value`` over the ranks (of flags: True only when all say so). The dense matrix is
    built from collective products, so every rank must take the same branch and block width,
    whatever its own timings say."""
    if not run.dist_info:
        return value
    import torch.distributed as dist
    least = torch.tensor([float(value)], dtype=torch.float64, device=op.device)
    dist.all_reduce(least, op=dist.ReduceOp.MIN)
    return float(least.item())


def _data_record(run: Run, s: dict, data, batches) -> dict:
    """What rebuilds the samples of this run, and SHA-256 digests to check a rebuild against.

    ``ImageData.subset`` keeps no indices, so the digests stand in for them: ``split_sha256`` of the
    split as stored (uint8 images (N, C, H, W) then int64 labels; text: input then target ids),
    independent of dtype and device; ``batches_sha256`` of each batch in order, its inputs (images
    normalised, in the run's dtype) then its targets. Both over C-order bytes of this machine
    (little-endian on x86 and ARM).
    """
    stored = [data.images, data.labels] if hasattr(data, "images") else [data.inputs, data.targets]
    split, used = hashlib.sha256(), hashlib.sha256()
    for tensor in stored:
        split.update(_bytes(tensor))
    for inputs, targets in batches:
        used.update(_bytes(inputs))
        used.update(_bytes(targets))
    record = {"dataset": s["dataset"], "seed": run.seed, "split": s["data_split"], "num_samples": len(data),
              "batch_size": s["operator"]["batch_size"], "num_batches": len(batches),
              "order": "the split's own order: no shuffling, no augmentation",
              "inputs_dtype": str(batches[0][0].dtype).replace("torch.", "") if batches else None,
              "split_sha256": split.hexdigest(), "batches_sha256": used.hexdigest()}
    if hasattr(data, "mean"):
        record["normalisation"] = {"mean": list(data.mean), "std": list(data.std),
                                   "inputs": "(x / 255 - mean) / std per channel"}
    return record


def _bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().numpy()


def has_batch_norm(model: nn.Module) -> bool:
    """Whether ``operator.bn_mode`` means anything for this model (figure titles say it only then)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def _record(run: Run, s: dict, name: str, op, model, result, measure, exact) -> None:
    tol = s["tolerances"]
    for key in ("tridiagonal", "ritz_values", "ritz_weights", "residual_bounds", "mask"):
        run.array(f"{name}_{key}", getattr(result, key))
    for key, value in measure.summary().items():
        run.metric(f"{name}_{key}", value)
    operator_checks(run, s, name, measure, exact)
    if exact is not None:
        run.array(f"{name}_exact_eigenvalues", exact)
        run.metric(f"{name}_wasserstein_to_exact", measure.wasserstein(exact))
        run.metric(f"{name}_exact_max_eigenvalue", float(exact.max()))
        run.metric(f"{name}_exact_min_eigenvalue", float(exact.min()))
    if s["compare_vectors"]:
        _compare_vectors(run, name, result, tol["vectors"])
    if result.ritz_vectors is not None and run.is_main:
        named = dict(model.named_parameters())
        torch_save_atomic(run.out_dir / f"ritz_vectors_{name}.pt", {
            "ritz_values": result.ritz_values, "ritz_vectors": result.ritz_vectors.cpu(),
            "mask": result.mask, "param_names": op.names,
            "param_shapes": [tuple(named[n].shape) for n in op.names], "num_params": op.num_params,
            "model": s["model"], "checkpoint": s["checkpoint"], "operator": name})
        run.note(f"Ritz vectors of the {name}: ritz_vectors_{name}.pt")


def operator_checks(run: Run, s: dict, name: str, measure, exact, suffix: str = "") -> None:
    """The checks of one operator's measure: the GGN / Fisher have no negative stems, the Hessian has
    negative mass (``expect_negative_mass``), the top stem is the top exact eigenvalue; ``suffix`` ends
    the check names (the checkpoint, in a series)."""
    tol = s["tolerances"]
    top, bottom = float(measure.nodes.max()), float(measure.nodes.min())
    if name in ("ggn", "fisher"):
        run.check(f"{name}_psd{suffix}", bottom / abs(top) if top else 0.0,
                  f"min Ritz value >= -{tol['psd']:g} x max", bottom >= -tol["psd"] * abs(top))
    if name == "hessian" and s["expect_negative_mass"]:
        weight = measure.summary()["negative_weight"]
        run.check(f"hessian_negative_mass{suffix}", weight, "> 0 (the Hessian is indefinite)", weight > 0)
    if exact is not None:
        err = abs(top - float(exact.max())) / abs(float(exact.max()))
        run.check(f"{name}_top_ritz_vs_exact{suffix}", err, "|max Ritz value - max eigenvalue| / max <= 1e-3",
                  err <= 1e-3)


def _compare_vectors(run: Run, name: str, result, tol: float) -> None:
    """fig8: the spectra seen from start vectors 0 and 1 agree at the extremes and in moments 1-4."""
    a = SpectralMeasure.from_lanczos(result, vector=0)
    b = SpectralMeasure.from_lanczos(result, vector=1)
    scale = max(abs(float(a.nodes.max())), abs(float(a.nodes.min())))
    for label, x, y in (("max", a.nodes.max(), b.nodes.max()), ("min", a.nodes.min(), b.nodes.min())):
        diff = abs(float(x) - float(y)) / scale
        run.check(f"{name}_vectors_{label}_ritz", diff, f"|difference| / spectral radius <= {tol}", diff <= tol)
    # the moment convention of the matrix checks: differences relative to rho^k
    worst = max(abs(a.moment(k) - b.moment(k)) / scale ** k for k in range(1, 5))
    run.check(f"{name}_vectors_moments", worst, f"max_k |m_k(v0) - m_k(v1)| / rho^k <= {tol}", worst <= tol)


def _draw(panels, s, batch_norm: bool):
    """Per operator: the stems (Ritz values and weights), and on one probability scale the CDF of the
    Lanczos measure, its 95% band over start vectors (k >= 2) and the exact eigenvalues' CDF."""
    fig, axes = plotting.panel_grid(2 * len(panels))
    bn = f", bn {s['operator']['bn_mode']}" if batch_norm else ""  # bn_mode changes nothing without BatchNorm
    for (name, measure, exact, per_vector), ax, cdf_ax in zip(panels, axes[0::2], axes[1::2]):
        title = f"{name}: Lanczos m={s['num_steps']}, {s['num_vectors']} vector(s){bn}"
        plotting.stem(ax, measure.nodes, measure.weights, title=title)
        cdf_title = f"{name}: CDF"
        if exact is not None:
            cdf_title += f", W1 to exact = {measure.wasserstein(exact):.3g}"
        plotting.cdf(cdf_ax, measure, per_vector, exact, title=cdf_title)
    fig.tight_layout()
    return fig
