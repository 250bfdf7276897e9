"""``analysis=trace``: stochastic trace estimates of a curvature operator, against the exact trace.

    python -m experiments.run analysis=trace dataset=digits model=cnn analysis.method=all
    python -m experiments.run analysis=trace dataset=synthetic_spectrum analysis.method=all

Measured (2-core CPU shared with other jobs, load ~7, OMP_NUM_THREADS=1, float64): the first command,
CNN of 9,930 parameters on the 1,437 digits, 24 products per estimator: 54 s inside the run (65 s with
start-up); Hessian trace at the initial weights, seed 0: Hutchinson 6.06 +- 2.56, Hutch++ 13.30 +- 2.29,
SLQ 6.62 +- 3.47 (value +- standard error). No exact trace at that size by default (P products);
the CNN has ReLU and no BatchNorm, so each output is linear in each single parameter and
``tr(H) = tr(G)``, which ``analysis.operators=[hessian,ggn]`` gives exactly from ``diag(G)``.

On an image (or text) dataset: the Hessian / GGN of the mean loss (``operator`` group, or
``analysis.operators``) of the model at ``analysis.checkpoint`` (or its initial weights) over the chosen
split; on a matrix dataset (``wigner``, ``marchenko_pastur``, ``synthetic_spectrum``): the dense matrix.
Each estimator of ``analysis.method`` (:mod:`curvature.trace`) gets ``analysis.num_matvecs`` products;
results hold per operator and method the estimate, its standard error, 95% interval, the products used
and seconds (metrics ``<operator>_<method>_*`` and the ``trace`` table), the per-sample terms
(``arrays.npz``), and, when known, the exact trace and the check ``|estimate - exact| <= k x stderr``
(``k = analysis.stderr_multiple`` read as a coverage level and widened by Student's t for the few terms
behind the standard error). The exact trace: a matrix's diagonal; a network's from P products with
blocks of unit vectors when ``P <= analysis.exact_max_dim``, or for the GGN with a plain loss from the
exact ``diag(G)`` (C backprops per sample, any P; ``analysis.exact_ggn``). ``analysis.peers`` adds the
peers' Hessian trace estimators at the same products (:mod:`experiments.peer_trace`) to the table.
"""

from __future__ import annotations

import math
import time

import torch
from omegaconf import DictConfig

from curvature import diagonal as D
from curvature.trace import DISTRIBUTIONS, hutchinson, hutchpp, slq_trace
from experiments import validate as V
from experiments.loss_config import build_loss, is_plain
from experiments.matrices import build_matrix, validate_matrix_dataset
from experiments.networks import (checkpoint_path, require_trained,
                                  validate_image_dataset, validate_model)
from experiments.peer_trace import PEERS, peer_traces
from experiments.runtime import Run
from experiments.spectrum_network import (_data_record, network_data, operator_from_settings,
                                          validate_operator)

METHODS = ("hutchinson", "hutchpp", "slq")


def validate(cfg: DictConfig) -> dict:
    method = V.choice(cfg, "analysis.method", METHODS + ("all",), "analysis.method=hutchpp")
    s = {"methods": list(METHODS) if method == "all" else [method],
         "num_matvecs": V.positive_int(cfg, "analysis.num_matvecs", "analysis.num_matvecs=24"),
         "distribution": V.choice(cfg, "analysis.distribution", DISTRIBUTIONS),
         "slq_steps": V.positive_int(cfg, "analysis.slq_steps", "analysis.slq_steps=3"),
         "block_size": V.positive_int(cfg, "analysis.block_size", "analysis.block_size=16"),
         "exact_max_dim": V.integer(cfg, "analysis.exact_max_dim", minimum=0, example="analysis.exact_max_dim=2000"),
         "exact_ggn": V.boolean(cfg, "analysis.exact_ggn"),
         "stderr_multiple": V.positive_number(cfg, "analysis.stderr_multiple", "analysis.stderr_multiple=3.0")}
    if "hutchpp" in s["methods"] and s["num_matvecs"] < 3:
        raise V.ConfigError("analysis.num_matvecs", s["num_matvecs"], "Hutch++ needs at least 3 products "
                            "(sketch, range, complement)", "analysis.num_matvecs=24")
    peers = V.choice_list(cfg, "analysis.peers", PEERS, "analysis.peers=[hessian_eigenthings]", default=[])
    s["peers"] = peers
    if V.get(cfg, "dataset.kind", "matrix") == "matrix":
        if peers:
            raise V.ConfigError("analysis.peers", peers, "the peers take a network's Hessian: a matrix "
                                "dataset has none", "analysis.peers=[]")
        return {**s, "kind": "matrix", "dataset": validate_matrix_dataset(cfg)}
    s.update(kind="network", dataset=validate_image_dataset(cfg, allow_text=True), model=validate_model(cfg),
             operator=validate_operator(cfg, finite_difference=True), checkpoint=checkpoint_path(cfg, "analysis.checkpoint"),
             data_split=V.choice(cfg, "analysis.data_split", ["train", "test"]))
    o = s["operator"]
    if peers and ("hessian" not in o["names"] or not is_plain(o) or o["loss"] != "cross_entropy" or o["params"]):
        raise V.ConfigError("analysis.peers", peers, "the peers estimate the Hessian of the plain mean "
                            "cross-entropy in every parameter: include hessian in the operators, keep the plain "
                            "loss and operator.params=null", "operator=hessian operator.loss=cross_entropy")
    require_trained(cfg, s["checkpoint"])
    return s


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "trace", validate=validate) as run:
        s = run.settings
        rows = []
        if s["kind"] == "matrix":
            problem = build_matrix(s["dataset"], run.dtype, run.device)
            run.metric("dim", problem.dim)
            exact = {"seconds": 0.0, "trace": float(torch.diagonal(problem.matrix).sum()), "route": "diagonal"}
            rows += _estimate(run, s, "matrix", problem.matrix, exact)
            extra = {"dataset": problem.params}
        else:
            network_rows, data = _network(run, s)
            rows += network_rows
            extra = {"operator": s["operator"], "checkpoint": s["checkpoint"], "data": data}
        run.table("trace", rows)
        return run.finish(trace={k: s[k] for k in ("methods", "num_matvecs", "distribution", "slq_steps",
                                                   "block_size", "exact_max_dim", "exact_ggn",
                                                   "stderr_multiple", "peers")}, **extra)


def _network(run: Run, s: dict) -> tuple[list[dict], dict]:
    model, data, batches = network_data(run, s)
    o = s["operator"]
    record = _data_record(run, s, data, batches)
    run.metric("num_samples", len(data))
    loss_fn = build_loss(o)
    rows = []
    for name in o["names"]:
        op = operator_from_settings(o, name, model, loss_fn, batches)
        run.metric("num_params", op.num_params)
        run.note(f"{name} products: {op.engine}; loss {op.loss.describe()}")
        for note in op.notes:
            run.note(f"{name}: {note}")
        exact = _exact_trace(run, s, name, op, model, loss_fn, batches)
        rows += _estimate(run, s, name, op, exact)
        if name == "hessian":
            for peer in s["peers"]:
                for estimate in peer_traces(peer, model, batches, s["num_matvecs"], run.seed):
                    for note in estimate.parts.get("notes", []):
                        run.note(f"{estimate.method}: {note}")
                    rows.append(_row(run, s, name, estimate, estimate.parts["seconds"], exact, peer=True))
    return rows, record


def _exact_trace(run: Run, s: dict, name: str, op, model, loss_fn, batches) -> dict | None:
    """``{"trace", "seconds", "route"}`` of the operator, or None when it would cost too much."""
    p, o = op.num_params, s["operator"]
    start = time.perf_counter()
    if name == "ggn" and s["exact_ggn"] and is_plain(o) and o["loss"] in ("cross_entropy", "mse"):
        diagonal = D.ggn_diagonal(model, loss_fn, batches, o["bn_mode"], o["params"], s["block_size"])
        route = "sum of the exact diag(G): C backprops per sample"
    elif p <= s["exact_max_dim"]:
        diagonal = D.operator_diagonal(op, chunk=s["block_size"])
        route = f"sum of e_j^T A e_j: {p} products with blocks of unit vectors"
    else:
        run.note(f"{name}: no exact trace: {p} parameters > analysis.exact_max_dim={s['exact_max_dim']}")
        return None
    exact = {"trace": float(diagonal.sum()), "seconds": time.perf_counter() - start, "route": route}
    run.note(f"{name}: exact trace {exact['trace']:.6g} ({route}) in {exact['seconds']:.3g} s")
    return exact


def _estimate(run: Run, s: dict, name: str, A, exact: dict | None) -> list[dict]:
    if exact is not None:
        run.metric(f"{name}_exact_trace", exact["trace"])
        run.metric(f"{name}_exact_seconds", exact["seconds"])
    rows = []
    for method in s["methods"]:
        start = time.perf_counter()
        if method == "hutchinson":
            estimate = hutchinson(A, s["num_matvecs"], run.seed, s["distribution"], block_size=s["block_size"])
        elif method == "hutchpp":
            estimate = hutchpp(A, s["num_matvecs"], run.seed, block_size=s["block_size"])
        else:
            estimate = slq_trace(A, s["num_matvecs"], run.seed, num_steps=min(s["slq_steps"], s["num_matvecs"]))
            for note in estimate.parts.get("notes", []):
                run.note(f"{name} slq: {note}")
        rows.append(_row(run, s, name, estimate, time.perf_counter() - start, exact))
    return rows


def _row(run: Run, s: dict, name: str, estimate, seconds: float, exact: dict | None, peer: bool = False) -> dict:
    """One table row, its metrics and per-sample terms, and (against the exact trace) its check."""
    low, high = estimate.interval(0.95)
    key = f"{name}_{estimate.method.replace(':', '_').replace('+', 'p')}"
    row = {"operator": name, "method": estimate.method, "estimate": estimate.estimate, "stderr": estimate.stderr,
           "ci95_low": low, "ci95_high": high, "num_matvecs": estimate.num_matvecs,
           "num_samples": int(estimate.samples.numel()), "seconds": seconds, "source": "peer" if peer else "suite",
           **{k: v for k, v in estimate.parts.items() if k not in ("notes", "seconds")}}
    for field in ("estimate", "stderr", "ci95_low", "ci95_high", "num_matvecs", "seconds"):
        run.metric(f"{key}_{field}", row[field])
    run.array(f"{key}_samples", estimate.samples)
    if exact is not None:
        value, target, passed = _compare(row, estimate, exact["trace"], s["stderr_multiple"])
        if not peer:  # a peer's miss is reported in its row, not as a check of this run
            run.check(f"{key}_within_{s['stderr_multiple']:g}_sigma", value, target, passed)
    return row


def _compare(row: dict, estimate, exact: float, k: float) -> tuple[float, str, bool]:
    """Adds the error to ``row``; returns the check: |error| in standard errors, its target, pass.

    ``k`` normal sigmas are read as a coverage level (99.73% for 3) and the interval is Student's t on the
    number of terms behind the standard error, so few terms (Hutch++'s complement, SLQ's vectors) do
    not fail the check more often than many.
    """
    error = estimate.estimate - exact
    row.update(exact=exact, error=error, relative_error=error / abs(exact) if exact else None)
    if not (estimate.stderr > 0 and math.isfinite(estimate.stderr)):
        # an exact estimate (Hutch++ whose sketch spans the space) must be exact to rounding
        row["error_in_stderr"] = None
        return abs(error), "stderr 0: |estimate - exact| <= 1e-8 max(1, |exact|)", \
            abs(error) <= 1e-8 * max(1.0, abs(exact))
    level = math.erf(k / math.sqrt(2))
    low, high = estimate.interval(level)
    row["error_in_stderr"] = abs(error) / estimate.stderr
    target = (f"exact inside the {level:.2%} interval (t, {row['num_samples'] - 1} dof): "
              f"|error| <= {(high - low) / 2 / estimate.stderr:.3g} x stderr")
    return row["error_in_stderr"], target, low <= exact <= high
