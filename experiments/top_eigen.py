"""``analysis=top_eigen``: the top-k eigenpairs of a network's Hessian / GGN to a residual tolerance.

    python -m experiments.run analysis=top_eigen dataset=digits model=cnn
    python -m experiments.run analysis=top_eigen dataset=digits model=cnn model.channels=[4,2] \
        analysis.checkpoint=outputs/demo/train/checkpoint-00010.pt

Thick-restart Lanczos with locking (:func:`curvature.top_eigen.top_eigenpairs`) runs until ``k`` pairs
have relative residual ``||H u - lambda u|| / |lambda| <= analysis.tol``, then verifies them with ``k``
true products. Beside it (``analysis.baseline``) PyHessian's method, power iteration with deflation,
on the same operator, stopping at the same tolerance on the residual (``analysis.power_criterion=residual``)
or on PyHessian's own rule (``eigenvalue``: the eigenvalue's relative change), its true residuals
reported either way. The ``methods`` table holds, per operator and method, the eigenvalues, residuals,
products and seconds; with at most ``analysis.exact_max_dim`` parameters the dense eigenvalues are
computed too and checked against the ``k`` values to ``tol``. Power iteration converges to the
largest ``|lambda|``, so it runs only for ``which=largest`` or ``magnitude``.

Measured (2 CPU cores shared with 7 other jobs, load ~10, float64, k=5, tol=1e-3):
* the default digits CNN, initial weights (9,930 parameters, 1,437 images), ``analysis.baseline=false``:
  Lanczos converged in 54 products + 5 to verify (5 restarts), top eigenvalue 0.97996, max relative
  residual 9.1e-4; 433 s wall (378 s CPU, load ~4): about 7 s a product here, so not under a minute.
* the trained demo CNN (``model.channels=[4,2]``, 444 parameters, checkpoint-00010.pt, 1,437 images):
  Lanczos 15 + 5 products (8.7 s), power iteration at the same tolerance 128 (31.7 s), dense check
  9.2e-8; 72 s wall in all.
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from curvature.dense import operator_matrix
from curvature.top_eigen import CRITERIA, WHICH, power_iteration, select, top_eigenpairs
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import (checkpoint_path, require_trained,
                                  validate_image_dataset, validate_model)
from experiments.runtime import Run
from experiments.spectrum_network import network_data, operator_from_settings, validate_operator


def validate(cfg: DictConfig) -> dict:
    basis = V.get(cfg, "analysis.basis_size", None)
    s = {"k": V.positive_int(cfg, "analysis.k", "analysis.k=5"),
         "which": V.choice(cfg, "analysis.which", WHICH, "analysis.which=largest"),
         "tol": V.positive_number(cfg, "analysis.tol", "analysis.tol=1e-3"),
         "max_matvecs": V.positive_int(cfg, "analysis.max_matvecs", "analysis.max_matvecs=2000"),
         "basis_size": None if basis is None else V.positive_int(cfg, "analysis.basis_size",
                                                                 "analysis.basis_size=20"),
         "block_size": V.positive_int(cfg, "analysis.block_size", "analysis.block_size=1"),
         "baseline": V.boolean(cfg, "analysis.baseline"),
         "power_criterion": V.choice(cfg, "analysis.power_criterion", CRITERIA, "analysis.power_criterion=residual"),
         "power_max_iter": V.positive_int(cfg, "analysis.power_max_iter", "analysis.power_max_iter=1000"),
         "exact_max_dim": V.integer(cfg, "analysis.exact_max_dim", minimum=0, example="analysis.exact_max_dim=2000"),
         "save_eigenvectors": V.boolean(cfg, "analysis.save_eigenvectors"),
         "dataset": validate_image_dataset(cfg, allow_text=True), "model": validate_model(cfg),
         "operator": validate_operator(cfg, finite_difference=True), "checkpoint": checkpoint_path(cfg, "analysis.checkpoint"),
         "data_split": V.choice(cfg, "analysis.data_split", ["train", "test"])}
    if s["basis_size"] is not None and s["basis_size"] < s["k"] + s["block_size"] + 1:
        raise V.ConfigError("analysis.basis_size", s["basis_size"], "must be at least k + block_size + 1",
                            f"analysis.basis_size={max(2 * s['k'] + 1, 20)}")
    require_trained(cfg, s["checkpoint"])
    return s


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "top_eigen", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        model, data, batches = network_data(run, s)
        loss_fn = build_loss(o)
        run.metric("num_samples", len(data))
        rows = []
        for name in o["names"]:
            op = operator_from_settings(o, name, model, loss_fn, batches)
            run.metric("num_params", op.num_params)
            rows += _solve(run, s, name, op)
        run.table("methods", rows)
        return run.finish(operator=o, checkpoint=s["checkpoint"],
                          top_eigen={k: s[k] for k in ("k", "which", "tol", "max_matvecs", "basis_size",
                                                       "block_size", "power_criterion", "power_max_iter")})


def _solve(run: Run, s: dict, name: str, op) -> list[dict]:
    """Lanczos, then the baseline and the dense check, on one operator; the table rows."""
    start = time.perf_counter()
    result = top_eigenpairs(op, s["k"], which=s["which"], tol=s["tol"], max_matvecs=s["max_matvecs"],
                            basis_size=s["basis_size"], block_size=s["block_size"], seed=run.seed)
    rows = [_record(run, s, name, "lanczos", result, time.perf_counter() - start)]
    run.check(f"{name}_lanczos_converged", float(result.residuals.max()), f"every relative residual <= {s['tol']:g}",
              result.all_converged)
    if s["baseline"] and s["which"] in ("largest", "magnitude"):
        start = time.perf_counter()
        power = power_iteration(op, s["k"], tol=s["tol"], max_iter=s["power_max_iter"], seed=run.seed,
                                criterion=s["power_criterion"])
        rows.append(_record(run, s, name, "power_iteration", power, time.perf_counter() - start))
        reached = bool((power.residual_estimates <= s["tol"]).all())
        if result.all_converged and reached:
            # an eigenvalue is within about its pair's relative residual of the true one
            bound = 2 * max(s["tol"], float(power.residuals.max()))
            gap = _relative_gap(power.eigenvalues.sort(descending=True).values,
                                result.eigenvalues.sort(descending=True).values)
            run.check(f"{name}_power_matches_lanczos", gap, f"relative difference <= {bound:.3g} (2 x the "
                      "larger of tol and power iteration's true residual)", gap <= bound)
        else:
            run.note(f"{name}: eigenvalues of the two methods not compared: "
                     f"{'power iteration' if result.all_converged else 'Lanczos'} did not reach tol on every pair")
        run.metric(f"{name}_power_over_lanczos_products", power.num_matvecs / max(result.num_matvecs, 1))
    elif s["baseline"]:
        run.note(f"{name}: no power-iteration baseline for which={s['which']}: it converges to the largest |lambda|")
    if op.num_params <= s["exact_max_dim"]:
        start = time.perf_counter()
        exact = torch.linalg.eigvalsh(operator_matrix(op).to(torch.float64)).cpu()
        run.metric(f"{name}_exact_seconds", time.perf_counter() - start)
        run.array(f"{name}_exact_eigenvalues", exact)
        wanted = select(exact, s["which"], s["k"])
        scale = torch.maximum(wanted.abs(), torch.tensor(result.residual_floor, dtype=torch.float64))
        error = float(((result.eigenvalues - wanted).abs() / scale).max())
        run.metric(f"{name}_lanczos_error_vs_exact", error)
        run.check(f"{name}_matches_exact", error, f"|lambda_i - exact_i| / |exact_i| <= {s['tol']:g}",
                  error <= s["tol"])
    else:
        run.note(f"{name}: no dense eigenvalues: {op.num_params} parameters > analysis.exact_max_dim="
                 f"{s['exact_max_dim']}")
    return rows


def _relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs() / b.abs().clamp(min=1e-300)).max())


def _record(run: Run, s: dict, name: str, method: str, result, seconds: float) -> dict:
    prefix = f"{name}_{method}"
    run.array(f"{prefix}_eigenvalues", result.eigenvalues)
    run.array(f"{prefix}_residuals", result.residuals)
    if s["save_eigenvectors"]:
        run.array(f"{prefix}_eigenvectors", result.eigenvectors.detach().cpu())
    run.metric(f"{prefix}_products", result.num_matvecs)
    run.metric(f"{prefix}_seconds", seconds)
    run.metric(f"{prefix}_max_relative_residual", float(result.residuals.max()))
    run.metric(f"{prefix}_num_converged", int(result.converged.sum()))
    run.metric(f"{prefix}_max_eigenvalue", float(result.eigenvalues.max()))
    for note in result.notes:
        run.note(f"{name} {method}: {note}")
    return {"operator": name, **result.summary(), "seconds": seconds,
            "products_per_second": result.num_matvecs / seconds if seconds else None,
            "num_params": result.eigenvectors.shape[0]}
