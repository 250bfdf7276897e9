"""``analysis=fd_error``: finite-difference Hessian-vector products against exact ones, measured in one run.

    python -m experiments.run analysis=fd_error model=cnn dataset=digits run_name=fd_error_cnn
    python -m experiments.run analysis=fd_error model=vgg11 model.width=0.125 dataset=cifar10 dataset.fake=true \\
        dataset.fake_train=256 dataset.fake_test=64 operator.batch_size=128 run_name=fd_error_vgg11

For each variant (``relu``: the model as built; ``smooth``: every ReLU replaced by SiLU and every max-pooling
by average pooling of the same window, so the loss is smooth and finite differences converge) and each dtype (copies of the same float64 weights), it takes
``analysis.num_vectors`` random unit vectors ``v`` and measures ``||H v_fd - H v|| / ||H v||`` against the
exact float64 product (:class:`~curvature.operators.HessianOperator`, its default route) for: the exact
product in that dtype (the floor), central differences and one Richardson step at the automatic step
(:func:`curvature.finite_difference.fd_step`), and both at every ``analysis.fixed_steps`` (the U-shaped
curve: truncation falls as ``eps^2`` / ``eps^4``, rounding grows as ``1 / eps``). Then Lanczos with
``analysis.lanczos_steps`` steps from one start vector with exact and with FD products in that dtype: the
top and bottom Ritz values and the 1-Wasserstein distance between the two Gauss quadrature measures
(:meth:`curvature.spectrum.SpectralMeasure.wasserstein`), also divided by the exact spectral radius.
Checks: the automatic-step central error on the smooth variant within ``analysis.targets.<dtype>``. The
table goes to results.json, ``fd_error.md`` and stdout; the figure is the U curve.

Hardware: 2 shared CPU cores; the digits CNN run takes about a minute, the VGG11 x1/8 one a few minutes.
Measured numbers: README, section "Finite-difference Hessian products".
"""

from __future__ import annotations

import copy

import torch
from omegaconf import DictConfig
from torch import nn
from tqdm import tqdm

from curvature import plotting
from curvature.finite_difference import FiniteDifferenceHessian
from curvature.io import write_bytes_atomic
from curvature.lanczos import lanczos
from curvature.operators import make_operator
from curvature.spectrum import SpectralMeasure
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import build_network, checkpoint_path, load_data, validate_image_dataset, validate_model
from experiments.runtime import Run, device_description
from experiments.spectrum_network import validate_operator

DTYPES = {"float32": torch.float32, "float64": torch.float64}
ACTIVATIONS = ("relu", "smooth")


def validate(cfg: DictConfig) -> dict:
    operator = validate_operator(cfg)
    if operator["names"] != ["hessian"]:
        raise V.ConfigError("operator", operator["names"], "finite differences are measured for the Hessian "
                            "only (the GGN keeps its exact route)", "operator=hessian")
    dtypes = V.get(cfg, "analysis.dtypes")
    if not (isinstance(dtypes, list) and dtypes and all(d in DTYPES for d in dtypes)):
        raise V.ConfigError("analysis.dtypes", dtypes, "must be a non-empty list of float32, float64",
                            "analysis.dtypes=[float32,float64]")
    activations = V.get(cfg, "analysis.activations")
    if not (isinstance(activations, list) and activations and all(a in ACTIVATIONS for a in activations)):
        raise V.ConfigError("analysis.activations", activations, "must be a non-empty list of relu, smooth",
                            "analysis.activations=[relu,smooth]")
    steps = V.number_list(cfg, "analysis.fixed_steps", minimum=0, strict=True)
    return {"dataset": validate_image_dataset(cfg), "model": validate_model(cfg), "operator": operator,
            "checkpoint": checkpoint_path(cfg, "analysis.checkpoint"),
            "num_vectors": V.positive_int(cfg, "analysis.num_vectors", "analysis.num_vectors=3"),
            "dtypes": dtypes, "activations": activations, "fixed_steps": steps,
            "lanczos_steps": V.positive_int(cfg, "analysis.lanczos_steps", "analysis.lanczos_steps=20"),
            "targets": {d: V.positive_number(cfg, f"analysis.targets.{d}") for d in DTYPES}}


def smooth_copy(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with every ``nn.ReLU`` replaced by ``nn.SiLU`` and every ``nn.MaxPool2d`` by an
    ``nn.AvgPool2d`` of the same window (same weights; the loss is then smooth in them)."""
    model = copy.deepcopy(model)
    for module in list(model.modules()):
        for name, child in module.named_children():
            if isinstance(child, nn.ReLU):
                setattr(module, name, nn.SiLU())
            elif isinstance(child, nn.MaxPool2d):
                setattr(module, name, nn.AvgPool2d(child.kernel_size, child.stride, child.padding,
                                                   ceil_mode=child.ceil_mode))
    return model


def relative_errors(products: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Per column ``||a - b|| / ||b||`` in float64."""
    products = products.to(torch.float64)
    return torch.linalg.vector_norm(products - reference, dim=0) / torch.linalg.vector_norm(reference, dim=0)


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "fd_error", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        splits = load_data(s["dataset"], run.device, run.seed)
        base = build_network(s["model"], splits, run.device, torch.float64, s["checkpoint"])
        loss_fn = build_loss(o)
        common = dict(bn_mode=o["bn_mode"], params=o["params"], check_deterministic=False)
        rows, lanczos_rows, curves = [], [], {}
        for activation in s["activations"]:
            model64 = base if activation == "relu" else smooth_copy(base)
            batches64 = list(splits.train.batches(o["batch_size"], dtype=torch.float64))
            exact64 = make_operator("hessian", model64, loss_fn, batches64, **common)
            gen = torch.Generator().manual_seed(run.seed)
            vectors = torch.randn(exact64.num_params, s["num_vectors"], generator=gen, dtype=torch.float64)
            vectors = (vectors / torch.linalg.vector_norm(vectors, dim=0)).to(run.device)
            with run.phase(f"exact float64 products ({activation})"):
                reference = exact64.matvec(vectors)
            run.metric("num_params", exact64.num_params)
            weight_norm = float(torch.linalg.vector_norm(torch.cat([p.detach().reshape(-1) for p in
                                                                    exact64._selected().values()])))
            run.metric("weight_norm", weight_norm)
            for dtype_name in s["dtypes"]:
                dtype = DTYPES[dtype_name]
                model = model64 if dtype == torch.float64 else copy.deepcopy(model64).to(dtype)
                batches = list(splits.train.batches(o["batch_size"], dtype=dtype))
                block = vectors.to(dtype)
                settings = [("exact", "auto", False), ("central", "auto", False), ("richardson", "auto", True)]
                settings += [(kind, eps, kind == "richardson") for eps in s["fixed_steps"]
                             for kind in ("central", "richardson")]
                label = f"{activation} {dtype_name}"
                ops = {}
                for kind, step, richardson in tqdm(settings, desc=f"products ({label})", leave=False):
                    if kind == "exact":
                        op = exact64 if dtype == torch.float64 else make_operator("hessian", model, loss_fn,
                                                                                  batches, **common)
                    else:
                        op = make_operator("hessian", model, loss_fn, batches, product="finite_difference",
                                           fd_step=step, richardson=richardson, check_layerwise=False, **common)
                    errors = relative_errors(op.matvec(block), reference)
                    if step == "auto":
                        ops[kind] = op
                    rows.append({"activation": activation, "dtype": dtype_name, "product": kind,
                                 "step": step if step != "auto" else "auto",
                                 "step_used": op.last_step if isinstance(op, FiniteDifferenceHessian) else None,
                                 "median_relative_error": float(errors.median()),
                                 "max_relative_error": float(errors.max())})
                    if step != "auto":
                        curves.setdefault((activation, dtype_name, kind), []).append((step, float(errors.median())))
                with run.phase(f"lanczos ({label})"):
                    lanczos_rows += compare_lanczos(run, ops, s["lanczos_steps"], activation, dtype_name)
        _report(run, s, rows, lanczos_rows, curves)
        return run.finish(table_files=["fd_error.md"])


def compare_lanczos(run: Run, ops: dict, steps: int, activation: str, dtype_name: str) -> list[dict]:
    """Lanczos from one start vector with exact and with FD products: Ritz values and W1 to the exact measure."""
    results = {kind: lanczos(op.matvec, op.num_params, steps, seed=run.seed, dtype=op.dtype, device=run.device)
               for kind, op in ops.items()}
    exact = SpectralMeasure.from_lanczos(results["exact"])
    radius = float(exact.nodes.abs().max())
    rows = []
    for kind, result in results.items():
        ritz = result.ritz_values[0][result.mask[0]].to(torch.float64)
        top, bottom = float(ritz.max()), float(ritz.min())
        distance = SpectralMeasure.from_lanczos(result).wasserstein(exact)
        rows.append({"activation": activation, "dtype": dtype_name, "product": kind, "steps": steps,
                     "top_ritz": top, "bottom_ritz": bottom,
                     "top_ritz_relative_difference": abs(top - float(exact.nodes.max())) / radius,
                     "wasserstein_1": distance, "wasserstein_1_relative": distance / radius})
    return rows


def _report(run: Run, s: dict, rows: list, lanczos_rows: list, curves: dict) -> None:
    for r in rows:
        if r["product"] == "central" and r["step"] == "auto" and r["activation"] == "smooth":
            target = s["targets"][r["dtype"]]
            run.check(f"central_auto_{r['dtype']}_smooth", r["max_relative_error"],
                      f"central differences at the automatic step within {target:g} of the exact product "
                      f"(smooth model, {r['dtype']})", r["max_relative_error"] <= target)
        if r["step"] == "auto":
            run.metric(f"{r['product']}_auto_{r['dtype']}_{r['activation']}_relative_error", r["max_relative_error"])
    for r in lanczos_rows:
        if r["product"] != "exact":
            run.metric(f"{r['product']}_{r['dtype']}_{r['activation']}_wasserstein_1_relative",
                       r["wasserstein_1_relative"])
    run.table("fd_error", rows)
    run.table("fd_lanczos", lanczos_rows)
    text = markdown(rows, lanczos_rows)
    print(text, flush=True)
    header = (f"Device: {device_description(run.device)}; {run.metrics['num_params']:.0f} parameters, "
              f"||w|| = {run.metrics['weight_norm']:.4g}; {s['num_vectors']} random unit vectors; "
              f"reference: the exact float64 product.")
    write_bytes_atomic(run.out_dir / "fd_error.md", (header + "\n\n" + text + "\n").encode())
    run.figure(_u_curve(rows, curves), "fd_error")


def markdown(rows: list, lanczos_rows: list) -> str:
    lines = ["| activation | dtype | product | step | step used | median rel. error | max rel. error |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        used = "" if r["step_used"] is None else f"{r['step_used']:.3g}"
        step = r["step"] if isinstance(r["step"], str) else f"{r['step']:g}"
        lines.append(f"| {r['activation']} | {r['dtype']} | {r['product']} | {step} | {used} | "
                     f"{r['median_relative_error']:.2e} | {r['max_relative_error']:.2e} |")
    lines += ["", "| activation | dtype | products | Lanczos steps | top Ritz | bottom Ritz | "
              "top Ritz diff / radius | W1 to exact | W1 / radius |", "|---|---|---|---|---|---|---|---|---|"]
    for r in lanczos_rows:
        lines.append(f"| {r['activation']} | {r['dtype']} | {r['product']} | {r['steps']} | {r['top_ritz']:.6g} | "
                     f"{r['bottom_ritz']:.6g} | {r['top_ritz_relative_difference']:.2e} | "
                     f"{r['wasserstein_1']:.3e} | {r['wasserstein_1_relative']:.2e} |")
    return "\n".join(lines)


def _u_curve(rows: list, curves: dict):
    activations = sorted({key[0] for key in curves})
    fig, axes = plotting.panel_grid(max(len(activations), 1), width=4.2, height=3.4)
    for ax, activation in zip(axes, activations):
        for (act, dtype_name, kind), points in sorted(curves.items()):
            if act != activation:
                continue
            steps, errors = zip(*sorted(points))
            line, = ax.loglog(steps, errors, marker="o" if kind == "central" else "s", ms=3,
                              ls="-" if kind == "central" else "--", label=f"{kind} {dtype_name}")
            auto = next(r for r in rows if r["activation"] == act and r["dtype"] == dtype_name
                        and r["product"] == kind and r["step"] == "auto")
            ax.plot([auto["step_used"]], [max(auto["median_relative_error"], 1e-17)], marker="*", ms=10,
                    color=line.get_color(), ls="none")
        auto = [r for r in rows if r["activation"] == activation and r["product"] == "central" and r["step"] == "auto"]
        key = next((r for r in auto if r["dtype"] == "float64"), auto[0])
        ax.set_title(f"{activation}: central, automatic step, {key['dtype']}: error {key['median_relative_error']:.1e}",
                     fontsize=9)
        ax.set_xlabel("step eps (|v| = 1); star: automatic step")
        ax.set_ylabel("median ||Hv_fd - Hv|| / ||Hv|| over v")
        ax.legend(fontsize=6)
    fig.tight_layout()
    return fig
