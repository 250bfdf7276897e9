"""``analysis=spectrum``: the Lanczos spectral density of an operator, with checks and a figure.

On an image (or text) dataset it takes the Hessian / GGN of a network (:mod:`experiments.spectrum_network`).
On a matrix dataset (``wigner``, ``marchenko_pastur``, ``synthetic_spectrum``) it runs Lanczos on the
dense matrix, computes the exact eigenvalues when the matrix is small enough, and reports the
checks of PAPER.md for fig2, fig3, fig4 and fig6: support, moments, mass at zero, outlier recovery,
the diagonal baseline and 1-Wasserstein distances; with two or more start vectors, standard errors and
95% intervals over vectors for each ``analysis.report_steps`` (table ``uncertainty``, metrics
``<quantity>_stderr_m<m>``).

    python -m experiments.run experiment=fig2
"""

from __future__ import annotations

import torch
from omegaconf import DictConfig

from curvature import plotting
from curvature.lanczos import lanczos
from curvature.spectrum import SpectralMeasure, relative_moment_errors
from experiments import lanczos_state
from experiments import validate as V
from experiments.matrices import build_matrix, validate_matrix_dataset
from experiments.runtime import Run
from experiments.spectrum_checkpoints import run_series, validate_series
from experiments.spectrum_network import record_uncertainty, run_network, validate_network

# analysis.exact_max_dim=auto on a matrix dataset: the matrix is already in memory and eigh of a
# 4000 x 4000 one takes seconds, next to Lanczos's own; networks decide from measured cost instead.
MATRIX_AUTO_MAX_DIM = 4000

def validate(cfg: DictConfig) -> dict:
    common = _validate_common(cfg)
    if V.get(cfg, "dataset.kind", "matrix") == "matrix":
        if V.get(cfg, "analysis.blocks", None) is not None:
            raise V.ConfigError("analysis.blocks", V.get(cfg, "analysis.blocks"),
                                "blocks are groups of a network's parameters: a matrix dataset has none",
                                "analysis.blocks=null")
        dataset = validate_matrix_dataset(cfg)
        if common["num_steps"] > dataset["n"]:  # Lanczos on an n x n matrix stops after n steps
            raise V.ConfigError("analysis.num_steps", common["num_steps"], f"at most dataset.n={dataset['n']} "
                                "(Lanczos on an n x n matrix takes at most n steps)",
                                f"analysis.num_steps={dataset['n']}")
        return {**common, "kind": "matrix", "dataset": dataset}
    settings = {**validate_network(cfg, common), "kind": "network"}
    if settings["checkpoints"]:  # a folder or a list of checkpoints: one spectrum each
        validate_series(cfg, settings)
    return settings


def _validate_common(cfg: DictConfig) -> dict:
    num_steps = V.positive_int(cfg, "analysis.num_steps", "analysis.num_steps=30")
    report = V.get(cfg, "analysis.report_steps", None)
    report = [num_steps] if report is None else V.int_list(
        cfg, "analysis.report_steps", 1, num_steps, f"analysis.report_steps=[{num_steps}]")
    tol = {name: V.positive_number(cfg, f"analysis.tolerances.{name}")
           for name in ("support", "moments", "zero_mass", "zero_node", "outlier", "psd", "vectors")}
    return {
        "num_steps": num_steps,
        "report_steps": sorted(set(report)),
        "num_vectors": V.positive_int(cfg, "analysis.num_vectors", "analysis.num_vectors=1"),
        "start_vector": V.choice(cfg, "analysis.start_vector", ["gaussian", "rademacher"]),
        "exact_max_dim": V.integer_or_auto(cfg, "analysis.exact_max_dim", minimum=0,
                                           example="analysis.exact_max_dim=auto"),
        "save_ritz_vectors": V.boolean(cfg, "analysis.save_ritz_vectors"),
        "histogram_bins": V.positive_int(cfg, "analysis.histogram_bins", "analysis.histogram_bins=60"),
        "show_diagonal": V.boolean(cfg, "analysis.show_diagonal"),
        "tolerances": tol,
        **lanczos_state.validate(cfg),
    }


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "spectrum", validate=validate) as run:
        if run.settings["kind"] == "network":
            return run_series(run) if run.settings["checkpoints"] else run_network(run)
        s = run.settings
        states = lanczos_state.load_states(run, ["matrix"])
        problem = build_matrix(s["dataset"], run.dtype, run.device)
        matrix = problem.matrix
        with lanczos_state.keep_partial(run, "matrix"):
            result = lanczos(lambda x: matrix @ x, problem.dim, s["num_steps"],
                             num_vectors=s["num_vectors"], seed=run.seed, dtype=run.dtype,
                             device=run.device, start_kind=s["start_vector"],
                             return_vectors=s["save_ritz_vectors"], progress=True,
                             **lanczos_state.lanczos_options(run, "matrix", states))
        for note in result.notes:
            run.note(note)
        exact = None
        limit = MATRIX_AUTO_MAX_DIM if s["exact_max_dim"] == "auto" else s["exact_max_dim"]
        if problem.dim <= limit:
            exact = torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu()
        elif problem.eigenvalues is not None:
            exact = problem.eigenvalues
        diagonal = torch.diagonal(matrix).to("cpu", torch.float64) if s["show_diagonal"] else None
        measures = {m: SpectralMeasure.from_lanczos(result.truncated(m)) for m in s["report_steps"]}
        _record(run, s, problem, result, measures, exact, diagonal)
        run.figure(_draw(s, problem, measures, exact, diagonal), "spectrum")
        extra = (s["lanczos_engine"] == "gpytorch")  # GPyTorch: m + 1 products, native: m
        results = run.finish(lanczos={"num_steps": result.num_steps.tolist(),
                                      "operator_scale": result.operator_scale, "engine": s["lanczos_engine"],
                                      "operator_products": int(min(s["num_steps"] + extra, problem.dim))},
                             dataset=problem.params)
        lanczos_state.remove_states(run, ["matrix"])
        return results


def _record(run: Run, s: dict, problem, result, measures, exact, diagonal) -> None:
    tol = s["tolerances"]
    run.array("tridiagonal", result.tridiagonal)
    run.array("ritz_values", result.ritz_values)
    run.array("ritz_weights", result.ritz_weights)
    run.array("residual_bounds", result.residual_bounds)
    run.array("mask", result.mask)
    if result.ritz_vectors is not None:
        run.array("ritz_vectors", result.ritz_vectors)
    if exact is not None:
        run.array("exact_eigenvalues", exact)
    if diagonal is not None:
        run.array("diagonal", diagonal)
    for m, measure in measures.items():
        run.array(f"stem_nodes_m{m}", measure.nodes)
        run.array(f"stem_weights_m{m}", measure.weights)
        for key, value in measure.summary().items():
            run.metric(f"{key}_m{m}", value)
    errors = [row for m in measures for row in record_uncertainty(
        run, result.truncated(m), tol["zero_node"], suffix=f"_m{m}", num_steps=m)]
    if errors:
        run.table("uncertainty", errors)

    final = max(measures)
    rho = float(exact.abs().max()) if exact is not None else float(result.ritz_values.abs().max())
    if exact is not None:
        run.metric("exact_max_eigenvalue", float(exact.max()))
        run.metric("exact_min_eigenvalue", float(exact.min()))
        for m, measure in measures.items():
            run.metric(f"wasserstein_m{m}", measure.wasserstein(exact))
            errors = relative_moment_errors(measure, exact, 4)
            for k, err in errors.items():
                run.metric(f"moment{k}_error_m{m}", err)
            worst = max(errors.values())
            run.check(f"moments_m{m}", worst, f"max_k |m_k - exact m_k| / rho^k <= {tol['moments']}",
                      worst <= tol["moments"])

    if problem.edges is not None:
        low, high = problem.edges
        if problem.atom_at_zero > 0:
            low = min(low, 0.0)
        run.metric("analytic_edge_low", low)
        run.metric("analytic_edge_high", high)
        scale = max(abs(low), abs(high))
        for m, measure in measures.items():
            lo, hi = measure.support()
            outside = max(low - lo, hi - high, 0.0) / scale
            run.metric(f"edge_gap_m{m}", max(abs(lo - low), abs(hi - high)) / scale)
            run.check(f"support_m{m}", outside,
                      f"stems inside the edges [{low:.4g}, {high:.4g}] +- {tol['support']:.0%}",
                      outside <= tol["support"])
        lo, hi = measures[final].support()
        gap = max(abs(lo - low), abs(hi - high)) / scale
        run.check(f"edge_reach_m{final}", gap,
                  f"extreme stems within {tol['support']:.0%} of both edges", gap <= tol["support"])

    if problem.atom_at_zero > 0:
        near = tol["zero_node"] * rho
        lanczos_mass = measures[final].mass_near(0.0, near)
        run.metric(f"zero_mass_m{final}", lanczos_mass)
        run.metric("zero_mass_expected", problem.atom_at_zero)
        run.check(f"zero_mass_m{final}", abs(lanczos_mass - problem.atom_at_zero),
                  f"|stem weight with |node| < {tol['zero_node']:g} rho - {problem.atom_at_zero:.3g}| "
                  f"<= {tol['zero_mass']}", abs(lanczos_mass - problem.atom_at_zero) <= tol["zero_mass"])
        if diagonal is not None:
            diag_mass = SpectralMeasure.from_eigenvalues(diagonal).mass_near(0.0, near)
            run.metric("zero_mass_diagonal", diag_mass)
            run.check("zero_mass_diagonal", abs(diag_mass - problem.atom_at_zero),
                      f"the diagonal misses the mass at 0 by more than {tol['zero_mass']}",
                      abs(diag_mass - problem.atom_at_zero) > tol["zero_mass"])

    if problem.name == "synthetic_spectrum" and exact is not None and \
            problem.params["num_positive_outliers"] > 0:
        top = float(exact.max())
        err = abs(float(measures[final].nodes.max()) - top) / abs(top)
        run.check(f"top_outlier_m{final}", err, f"|max Ritz value - top eigenvalue| / top <= {tol['outlier']}",
                  err <= tol["outlier"])
        if diagonal is not None:
            ratio = float(diagonal.max()) / top
            run.check("diagonal_max", ratio, "max diagonal entry < 0.5 x top eigenvalue", ratio < 0.5)

    if diagonal is not None:
        run.metric("diagonal_max", float(diagonal.max()))
        run.metric("diagonal_min", float(diagonal.min()))
        if exact is not None:
            run.metric("wasserstein_diagonal", SpectralMeasure.from_eigenvalues(diagonal).wasserstein(exact))


def _draw(s: dict, problem, measures, exact, diagonal):
    panels = 1 + len(measures) + (diagonal is not None)
    fig, axes = plotting.panel_grid(panels)
    axes = iter(axes)
    name = problem.name.replace("_", " ")
    if exact is not None:
        lo, hi = float(exact.min()), float(exact.max())
        pad = 0.05 * (hi - lo if hi > lo else 1.0)
        curve = None
        if problem.density is not None:
            x = torch.linspace(lo - pad, hi + pad, 400, dtype=torch.float64)
            curve = (x, problem.density(x))
        plotting.histogram(next(axes), exact, bins=s["histogram_bins"], density_curve=curve,
                           atom=(0.0, problem.atom_at_zero) if problem.atom_at_zero else None,
                           title=f"{name}: exact eigenvalues (n={problem.dim})")
    steps = sorted(measures)
    if diagonal is not None and len(steps) > 1:  # paper Fig. 6 order: hist, few steps, diagonal, more
        order = [("stem", steps[0]), ("diag", None)] + [("stem", m) for m in steps[1:]]
    else:
        order = [("stem", m) for m in steps] + ([("diag", None)] if diagonal is not None else [])
    for kind, m in order:
        if kind == "stem":
            plotting.stem(next(axes), measures[m].nodes, measures[m].weights,
                          title=f"Lanczos stems, m={m}, {s['num_vectors']} vector(s)")
        else:
            plotting.histogram(next(axes), diagonal, bins=s["histogram_bins"], color="goldenrod",
                               label="diagonal entries", title="diagonal approximation")
    if exact is None:
        next(axes).set_visible(False)
    fig.tight_layout()
    return fig
