"""``analysis=diagonal``: a diagonal approximation against Lanczos stems and the exact spectrum.

The diagonal's entries, read as a spectrum (each with weight 1/P), are compared with the Lanczos
measure and, where the dimension allows (``analysis.exact_max_dim``), the exact eigenvalues: the
1-Wasserstein distance of each to the exact spectrum (or of the diagonal to the Lanczos measure when
there is none), their extremes and mass at zero. The checks of PAPER.md listed in ``analysis.checks``
are run (fig5: ``lanczos_beats_diagonal``; fig6: ``diagonal_max``, ``zero_mass``; fig7:
``diagonal_max_differs``).

    python -m experiments.run -m experiment=fig5                    # MP and Wigner
    python -m experiments.run experiment=fig7_diagonal_smoke        # MC diag-GGN of a small VGG16
"""

from __future__ import annotations

import time

import torch
from omegaconf import DictConfig

from curvature import diagonal as D
from curvature import plotting
from curvature.dense import operator_matrix
from curvature.errors import SuiteError
from curvature.lanczos import lanczos
from curvature.operators import OPERATORS, make_operator
from curvature.spectrum import SpectralMeasure
from curvature.training import load_optimizer_state, read_checkpoint
from experiments import validate as V
from experiments.loss_config import build_loss, is_plain
from experiments.matrices import build_matrix, validate_matrix_dataset
from experiments.networks import (build_network, checkpoint_path, load_data, require_trained,
                                  validate_image_dataset, validate_model)
from experiments.runtime import Run
from experiments.spectrum_network import validate_operator

METHODS = ("exact", "mc_ggn", "hutchinson", "adam")
NETWORK_ONLY = ("mc_ggn", "adam")
CHECKS = ("lanczos_beats_diagonal", "diagonal_max", "zero_mass", "diagonal_max_differs")


def validate(cfg: DictConfig) -> dict:
    s = {"method": V.choice(cfg, "analysis.method", METHODS, "analysis.method=exact"),
         "num_samples": V.positive_int(cfg, "analysis.num_samples", "analysis.num_samples=10"),
         "block_size": V.positive_int(cfg, "analysis.block_size", "analysis.block_size=16"),
         "bias_correction": V.boolean(cfg, "analysis.bias_correction"),
         "lanczos_steps": V.integer(cfg, "analysis.lanczos_steps", minimum=0, example="analysis.lanczos_steps=30"),
         "num_vectors": V.positive_int(cfg, "analysis.num_vectors", "analysis.num_vectors=1"),
         "start_vector": V.choice(cfg, "analysis.start_vector", ["gaussian", "rademacher"]),
         "exact_max_dim": V.integer(cfg, "analysis.exact_max_dim", minimum=0, example="analysis.exact_max_dim=4000"),
         "histogram_bins": V.positive_int(cfg, "analysis.histogram_bins", "analysis.histogram_bins=60"),
         "tolerances": {k: V.positive_number(cfg, f"analysis.tolerances.{k}") for k in
                        ("wasserstein_ratio", "diagonal_max", "zero_mass", "zero_node", "max_differs")}}
    s["checks"] = V.choice_list(cfg, "analysis.checks", CHECKS, "analysis.checks=[lanczos_beats_diagonal]", default=[])
    if V.get(cfg, "dataset.kind", "matrix") == "matrix":
        if s["method"] in NETWORK_ONLY:
            raise V.ConfigError("analysis.method", s["method"], "needs a network on an image dataset; "
                                "matrices take exact or hutchinson", "analysis.method=exact")
        return {**s, "kind": "matrix", "dataset": validate_matrix_dataset(cfg)}
    s.update(kind="network", dataset=validate_image_dataset(cfg), model=validate_model(cfg),
             operator=validate_operator(cfg), target=V.choice(cfg, "operator.name", list(OPERATORS)),
             checkpoint=checkpoint_path(cfg, "analysis.checkpoint"),
             data_split=V.choice(cfg, "analysis.data_split", ["train", "test"]))
    if s["method"] == "mc_ggn":
        s["target"] = "ggn"
    if not is_plain(s["operator"]):
        raise V.ConfigError("operator.loss", s["operator"]["loss"], "the diagonal estimators take the plain "
                            "cross_entropy or mse (mean, no label smoothing)",
                            "operator.loss=cross_entropy operator.reduction=mean operator.label_smoothing=0")
    if s["method"] == "adam" and s["checkpoint"] is None:
        raise V.ConfigError("analysis.checkpoint", None, "the Adam diagonal is read from a checkpoint's "
                            "optimiser state: give the checkpoint written by analysis=train",
                            "analysis.checkpoint=outputs/<run>/checkpoint-00300.pt")
    require_trained(cfg, s["checkpoint"])
    return s


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "diagonal", validate=validate) as run:
        s = run.settings
        start = time.perf_counter()
        if s["kind"] == "matrix":
            diagonal, std_error, stems, exact, extra = _matrix(run, s)
        else:
            diagonal, std_error, stems, exact, extra = _network(run, s)
        run.metric("seconds_total", time.perf_counter() - start)
        _record(run, s, diagonal, std_error, stems, exact, extra.get("atom_at_zero"))
        run.figure(_draw(s, diagonal, stems, exact, extra["title"]), "diagonal")
        return run.finish(method=s["method"], lanczos={"num_steps": s["lanczos_steps"],
                                                       "num_vectors": s["num_vectors"]},
                          **{k: v for k, v in extra.items() if k not in ("title", "atom_at_zero")})


def _lanczos_measure(run: Run, s: dict, matvec, dim: int) -> SpectralMeasure:
    result = lanczos(matvec, dim, s["lanczos_steps"], num_vectors=s["num_vectors"], seed=run.seed,
                     dtype=run.dtype, device=run.device, start_kind=s["start_vector"], progress=True)
    for note in result.notes:
        run.note(note)
    return SpectralMeasure.from_lanczos(result)


def _matrix(run: Run, s: dict):
    problem = build_matrix(s["dataset"], run.dtype, run.device)
    matrix = problem.matrix
    std_error = None
    if s["method"] == "exact":
        diagonal = D.matrix_diagonal(matrix)
    else:
        estimate = D.hutchinson_diagonal(lambda v: matrix @ v, problem.dim, s["num_samples"], s["block_size"],
                                         seed=run.seed, dtype=run.dtype, device=run.device)
        diagonal, std_error = estimate.mean, estimate.std_error
    stems = {}
    if s["lanczos_steps"] > 0:
        stems["lanczos"] = _lanczos_measure(run, s, lambda x: matrix @ x, problem.dim)
    exact = torch.linalg.eigvalsh(matrix.to(torch.float64)).cpu() if problem.dim <= s["exact_max_dim"] \
        else problem.eigenvalues
    title = f"{problem.name.replace('_', ' ')} (n={problem.dim})"
    return diagonal, std_error, stems, exact, {"title": title, "dataset": problem.params,
                                               "atom_at_zero": problem.atom_at_zero or None}


def _network(run: Run, s: dict):
    splits = load_data(s["dataset"], run.device, run.seed)
    model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
    run.note(f"weights: {s['checkpoint'] or 'initial (seed ' + str(run.seed) + ')'}")
    data = splits.train if s["data_split"] == "train" else splits.test
    o = s["operator"]
    batches = list(data.batches(o["batch_size"], dtype=run.dtype))
    loss_fn = build_loss(o)
    run.metric("num_samples", len(data))

    def operator(name):
        return make_operator(name, model, loss_fn, batches, bn_mode=o["bn_mode"], params=o["params"],
                             mode=o["hvp_mode"], check_deterministic=o["check_deterministic"], cache=o["cache"],
                             layerwise=o["layerwise"], **o["fisher"])

    std_error, method = None, s["method"]
    try:
        if method == "exact" and s["target"] == "ggn":
            diagonal = D.ggn_diagonal(model, loss_fn, batches, o["bn_mode"], o["params"], s["block_size"])
        elif method == "exact":
            diagonal = D.operator_diagonal(operator(s["target"]), chunk=s["block_size"])
        elif method == "mc_ggn":
            estimate = D.mc_ggn_diagonal(model, loss_fn, batches, s["num_samples"], o["bn_mode"], o["params"],
                                         seed=run.seed, chunk_size=s["block_size"])
            diagonal, std_error = estimate.mean, estimate.std_error
        elif method == "hutchinson":
            op = operator(s["target"])
            estimate = D.hutchinson_diagonal(op, op.num_params, s["num_samples"], s["block_size"],
                                             seed=run.seed, dtype=run.dtype, device=run.device)
            diagonal, std_error = estimate.mean, estimate.std_error
        else:
            diagonal = D.adam_diagonal(_adam_state(s["checkpoint"], model), model, o["params"],
                                       s["bias_correction"])
    except ValueError as error:  # an unsupported loss for the chosen method
        raise V.ConfigError("operator.loss", o["loss"], str(error), "operator.loss=cross_entropy") from None
    stems, exact = {}, None
    for name in o["names"] if s["lanczos_steps"] > 0 else []:
        op = operator(name)
        stems[name] = _lanczos_measure(run, s, op.matvec, op.num_params)
    reference = s["target"] if method != "adam" else o["names"][0]
    num_params = int(diagonal.numel())
    run.metric("num_params", num_params)
    if num_params <= s["exact_max_dim"]:
        exact = torch.linalg.eigvalsh(operator_matrix(operator(reference)).to(torch.float64)).cpu()
    title = f"{s['model']['name']} / {s['dataset']['name']}: {reference}"
    return diagonal, std_error, stems, exact, {"title": title, "checkpoint": s["checkpoint"],
                                               "operator": {**o, "diagonal_of": reference}}


def _adam_state(path: str, model) -> dict:
    """The checkpoint's Adam state, read safely and checked against the model (one-line errors)."""
    state = read_checkpoint(path).get("optimizer")
    if not state:
        raise SuiteError(f"checkpoint {path} holds no optimiser state (an SWA average?): "
                         "give a checkpoint of a run with optimizer=adam")
    adam = torch.optim.Adam(model.parameters())
    load_optimizer_state(path, adam, state)  # another optimiser's or another model's state: one line
    return adam.state_dict()


def _record(run: Run, s: dict, diagonal, std_error, stems, exact, atom_at_zero) -> None:
    tol = s["tolerances"]
    diagonal = diagonal.detach().to("cpu", torch.float64)
    diag = SpectralMeasure.from_eigenvalues(diagonal)
    run.array("diagonal", diagonal)
    if std_error is not None:
        run.array("diagonal_std_error", std_error.detach().cpu())
        run.metric("diagonal_max_std_error", float(std_error.max()))
    for name, measure in stems.items():
        run.array(f"{name}_stem_nodes", measure.nodes)
        run.array(f"{name}_stem_weights", measure.weights)
    if exact is not None:
        run.array("exact_eigenvalues", exact)
    first = next(iter(stems.values()), None)
    rho = max(abs(float(x)) for x in (exact if exact is not None else first.nodes if first else diagonal)
              .aminmax())
    near = tol["zero_node"] * rho
    for name, measure in [("diagonal", diag), *stems.items()] + ([("exact", SpectralMeasure.from_eigenvalues(
            exact))] if exact is not None else []):
        lo, hi = measure.support()
        run.metric(f"{name}_max", hi)
        run.metric(f"{name}_min", lo)
        run.metric(f"{name}_zero_mass", measure.mass_near(0.0, near))
    if exact is not None:
        run.note("1-Wasserstein distances are to the exact eigenvalues")
        w_diag = diag.wasserstein(exact)
        for name, measure in stems.items():
            run.metric(f"wasserstein_{name}", measure.wasserstein(exact))
    elif first is not None:
        reference = next(iter(stems))
        run.note(f"no exact spectrum: the diagonal's 1-Wasserstein distance is to the {reference} Lanczos measure")
        w_diag = diag.wasserstein(first)
    else:
        w_diag = None
    if w_diag is not None:
        run.metric("wasserstein_diagonal", w_diag)
    _checks(run, s, diag, stems, exact, atom_at_zero, near, w_diag)
    produced = {"zero_mass": "zero_mass_diagonal"}
    for name in s["checks"]:
        if produced.get(name, name) not in run.checks:
            run.note(f"check {name} skipped: it needs " +
                     ("Lanczos stems" if name == "diagonal_max_differs" else "the exact eigenvalues"))


def _checks(run: Run, s: dict, diag, stems, exact, atom_at_zero, near, w_diag) -> None:
    tol, checks = s["tolerances"], s["checks"]
    first_name, first = next(iter(stems.items()), (None, None))
    if "lanczos_beats_diagonal" in checks and exact is not None and first is not None:
        w_lanczos = first.wasserstein(exact)
        ratio = w_diag / w_lanczos if w_lanczos > 0 else float("inf")
        run.check("lanczos_beats_diagonal", ratio, f"W1(diagonal, exact) / W1(Lanczos m={s['lanczos_steps']}, "
                  f"exact) >= {tol['wasserstein_ratio']:g}", ratio >= tol["wasserstein_ratio"])
    if "diagonal_max" in checks and exact is not None:
        ratio = float(diag.nodes.max()) / float(exact.max())
        run.check("diagonal_max", ratio, f"max diagonal entry < {tol['diagonal_max']:g} x top eigenvalue",
                  ratio < tol["diagonal_max"])
    if "zero_mass" in checks and exact is not None:
        expected = atom_at_zero if atom_at_zero is not None else \
            SpectralMeasure.from_eigenvalues(exact).mass_near(0.0, near)
        run.metric("zero_mass_expected", expected)
        if first is not None:
            err = abs(first.mass_near(0.0, near) - expected)
            run.check(f"zero_mass_m{s['lanczos_steps']}", err, f"|Lanczos mass at 0 - {expected:.3g}| <= "
                      f"{tol['zero_mass']}", err <= tol["zero_mass"])
        err = abs(diag.mass_near(0.0, near) - expected)
        run.check("zero_mass_diagonal", err, f"the diagonal misses the mass at 0 by more than {tol['zero_mass']}",
                  err > tol["zero_mass"])
    if "diagonal_max_differs" in checks and first is not None:
        measure = stems.get("ggn", first) if s["method"] == "mc_ggn" else first
        top = float(measure.nodes.max())
        diff = abs(float(diag.nodes.max()) - top) / abs(top)
        run.check("diagonal_max_differs", diff, f"|max diagonal - max Ritz value| / |max Ritz value| > "
                  f"{tol['max_differs']:g}", diff > tol["max_differs"])


def _draw(s: dict, diagonal, stems, exact, title):
    diagonal = diagonal.detach().to("cpu", torch.float64)
    panels = 1 + len(stems) + (exact is not None)
    fig, axes = plotting.panel_grid(panels)
    axes = iter(axes)
    if exact is not None:
        plotting.histogram(next(axes), exact, bins=s["histogram_bins"], title=f"{title}: exact eigenvalues")
    for name, measure in stems.items():
        plotting.stem(next(axes), measure.nodes, measure.weights,
                      title=f"{name}: Lanczos m={s['lanczos_steps']}, {s['num_vectors']} vector(s)")
    label = {"exact": "exact diagonal", "mc_ggn": f"MC diag-GGN ({s['num_samples']} sample(s))",
             "hutchinson": f"Hutchinson ({s['num_samples']} vectors)", "adam": "Adam sqrt(v)"}[s["method"]]
    plotting.histogram(next(axes), diagonal, bins=s["histogram_bins"], color="goldenrod", label="diagonal entries",
                       title=label)
    fig.tight_layout()
    return fig
