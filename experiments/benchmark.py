"""``analysis=benchmark``: the cost of curvature products relative to a gradient, measured in one run.

    python -m experiments.run experiment=benchmark_cpu     # VGG16 x0.25 (~1M parameters), fake CIFAR-10

For the chosen model and data it times (median of ``analysis.repeats`` rounds after a warm-up round;
each round runs every quantity in turn, so a slow spell of a shared machine hits all of them alike) one
full-data gradient (with the model as given, and in the channels-last memory format that the
layer-wise products use on a CPU), autograd's Hessian-vector product in each mode with the primal
recomputed, autograd's and the layer-wise product from a cached primal (the first product, which
builds the cache, and a repeated one), the layer-wise product with the primal recomputed, the GGN
product (autograd and default), and a Lanczos run of ``analysis.lanczos_steps`` steps on the default
path, whose time beyond the products is the Lanczos bookkeeping (reorthogonalisation). Ratios to
the gradient (and to the faster of the two gradients) and the bookkeeping share are checked against
``analysis.targets``; the table goes to results.json, W&B and stdout (Markdown, for the README).

With ``analysis.peers=[pyhessian,hessian_eigenthings,curvlinops,backpack]`` (or ``[]`` for the suite's
rows only, ``analysis.side_by_side=true``) a second table runs the same Lanczos job
(``analysis.side_steps`` steps, one shared Rademacher start vector) through the suite's paths and each
peer: wall time including operator set-up, peak memory above the row's start, curvature products,
top Ritz value and the first four moments of the spectral measure against the suite's default row;
see :mod:`experiments.side_by_side`.

    python -m experiments.run experiment=benchmark_peers     # VGG16 x3/16 (~0.54M), 2048 fake images
"""

from __future__ import annotations

import copy
import time

import torch
from omegaconf import DictConfig

from curvature import plotting
from curvature.lanczos import lanczos
from curvature.losses import as_loss
from curvature.operators import HessianOperator, curvature_mode, make_operator
from curvature.io import write_bytes_atomic
from curvature.timing import interleaved_median_seconds
from curvature.training import peak_memory_bytes
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import build_network, checkpoint_path, load_data, validate_image_dataset, validate_model
from experiments.runtime import Run, device_description
from experiments.side_by_side import markdown as side_markdown
from experiments.side_by_side import side_by_side, validate_side_by_side
from experiments.spectrum_network import validate_operator

HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")


def validate(cfg: DictConfig) -> dict:
    dataset = validate_image_dataset(cfg, allow_text=True)
    return {"dataset": dataset, "model": validate_model(cfg), "operator": validate_operator(cfg),
            "checkpoint": checkpoint_path(cfg, "analysis.checkpoint"),
            "repeats": V.positive_int(cfg, "analysis.repeats", "analysis.repeats=3"),
            "lanczos_steps": V.positive_int(cfg, "analysis.lanczos_steps", "analysis.lanczos_steps=100"),
            "targets": {k: V.positive_number(cfg, f"analysis.targets.{k}")
                        for k in ("hessian_ratio", "ggn_ratio", "bookkeeping")},
            "side_by_side": validate_side_by_side(cfg)}


def _channels_last(x: torch.Tensor) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if x.dim() == 4 else x


def full_gradient(model, loss_fn, batches, bn_mode: str) -> None:
    """One gradient of the dataset's mean loss, batches weighted as the operators weight them (the reference cost)."""
    loss = as_loss(loss_fn)
    denominators = [loss.denominator(y) for _, y in batches]
    params = [p for p in model.parameters() if p.requires_grad]
    with curvature_mode(model, bn_mode), torch.enable_grad():
        grads = [torch.zeros_like(p) for p in params]
        for (inputs, targets), d in zip(batches, denominators):
            batch = torch.autograd.grad(loss(model(inputs), targets), params)
            for g, b in zip(grads, batch):
                g.add_(b, alpha=loss.batch_weight(d, sum(denominators)))


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "benchmark", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        splits = load_data(s["dataset"], run.device, run.seed)
        model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
        batches = list(splits.train.batches(o["batch_size"], dtype=run.dtype))
        loss_fn = build_loss(o)
        rows = []
        common = dict(bn_mode=o["bn_mode"], params=o["params"], check_deterministic=False)
        # The layer-wise products run convolutions in the channels-last format on a CPU; the same
        # gradient in that format is the stricter reference, so both gradients are timed.
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        batches_cl = [(_channels_last(x), y) for x, y in batches]
        ops = {mode: HessianOperator(model, loss_fn, batches, mode=mode, cache="none", layerwise=False, **common)
               for mode in HVP_MODES}
        v = torch.randn(ops[HVP_MODES[0]].num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
        v = v.to(device=run.device, dtype=run.dtype)
        ops["autograd cached"] = HessianOperator(model, loss_fn, batches, cache="all", layerwise=False, **common)
        layerwise = HessianOperator(model, loss_fn, batches, cache="none", **common)
        if layerwise.engine == "layerwise":
            ops["layerwise"] = layerwise
            ops["layerwise cached"] = HessianOperator(model, loss_fn, batches, cache="all", **common)
            default = "layerwise cached"
        else:
            run.note(f"layer-wise products do not apply ({layerwise.layerwise_reason}): the default path is autograd's")
            default = "autograd cached"
        ops["ggn autograd"] = make_operator("ggn", model, loss_fn, batches, layerwise=False, **common)
        ops["ggn"] = make_operator("ggn", model, loss_fn, batches, **common)  # the default path

        jobs = {"gradient": lambda: full_gradient(model, loss_fn, batches, o["bn_mode"]),
                "gradient (channels-last)": lambda: full_gradient(model_cl, loss_fn, batches_cl, o["bn_mode"])}
        for mode in HVP_MODES:
            jobs[f"hessian_product (autograd {mode}, primal recomputed)"] = lambda op=ops[mode]: op.matvec(v)
        for key in ("autograd cached", "layerwise cached"):
            if key in ops:  # the first product of a run builds the cache; the repeated one reuses it
                jobs[f"hessian_product ({key}: first, builds the cache)"] = \
                    lambda op=ops[key]: (op.clear_cache(), op.matvec(v))
                jobs[f"hessian_product ({key}: repeated)"] = lambda op=ops[key]: op.matvec(v)
            if key == "autograd cached" and "layerwise" in ops:
                jobs["hessian_product (layerwise, primal recomputed)"] = lambda op=ops["layerwise"]: op.matvec(v)
        jobs["ggn_product (autograd, dual-number forward)"] = lambda op=ops["ggn autograd"]: op.matvec(v)
        ggn_label = f"ggn_product (default: {ops['ggn'].engine}, cache {ops['ggn'].cache})"
        jobs[ggn_label] = lambda op=ops["ggn"]: op.matvec(v)
        seconds = _interleaved(jobs, s["repeats"], run.device, rows)
        grad_s, grad_cl_s = seconds["gradient"], seconds["gradient (channels-last)"]
        fastest_grad_s = min(grad_s, grad_cl_s)
        hvp = {mode: seconds[f"hessian_product (autograd {mode}, primal recomputed)"] for mode in HVP_MODES}
        fastest = min(hvp, key=hvp.get)
        first_s = seconds[f"hessian_product ({default}: first, builds the cache)"]
        repeated_s = seconds[f"hessian_product ({default}: repeated)"]
        ggn_s = seconds[ggn_label]
        if "layerwise" in ops:
            run.metric("hessian_ratio_layerwise_primal_recomputed",
                       seconds["hessian_product (layerwise, primal recomputed)"] / grad_s)
        run.metric("hessian_cache_megabytes_autograd", ops["autograd cached"].cache_bytes / 2**20)
        run.metric("hessian_cache_megabytes", ops[default].cache_bytes / 2**20)
        del ops, jobs, layerwise, model_cl, batches_cl

        op = HessianOperator(model, loss_fn, batches, **common)  # the default path
        op.matvec(v)  # warm-up outside the timed run
        op.num_products, op.product_seconds = 0, 0.0
        start = time.perf_counter()
        lanczos(op.matvec, op.num_params, s["lanczos_steps"], seed=run.seed, dtype=run.dtype,
                device=run.device, progress=True, engine="native")  # analysis=spectrum's default engine
        total = time.perf_counter() - start
        per_iteration = total / op.num_products
        bookkeeping = 1.0 - op.product_seconds / total
        rows.append({"quantity": f"lanczos_iteration ({s['lanczos_steps']} steps, hessian, default path: {op.engine})",
                     "seconds": per_iteration, "peak_memory_bytes": peak_memory_bytes(run.device)})
        for row in rows:
            row["ratio_to_gradient"] = row["seconds"] / grad_s
            row["ratio_to_fastest_gradient"] = row["seconds"] / fastest_grad_s

        hessian_ratio, ggn_ratio = repeated_s / grad_s, ggn_s / grad_s
        t = s["targets"]
        run.metric("num_params", op.num_params)
        run.metric("num_samples", len(splits.train))
        run.note(f"default Hessian products: {op.engine}")
        run.metric("gradient_seconds", grad_s)
        run.metric("gradient_channels_last_seconds", grad_cl_s)
        run.metric("hessian_ratio", hessian_ratio)
        run.metric("ggn_ratio", ggn_ratio)
        run.metric("lanczos_seconds_per_iteration", per_iteration)
        run.metric("lanczos_bookkeeping_fraction", bookkeeping)
        for mode in HVP_MODES:
            run.metric(f"hessian_ratio_{mode}", hvp[mode] / grad_s)
        run.metric("hessian_ratio_first_product", first_s / grad_s)
        run.metric("hessian_ratio_primal_recomputed", hvp[fastest] / grad_s)
        run.metric("hessian_ratio_vs_fastest_gradient", repeated_s / fastest_grad_s)
        run.metric("hessian_ratio_first_product_vs_fastest_gradient", first_s / fastest_grad_s)
        run.metric("ggn_ratio_vs_fastest_gradient", ggn_s / fastest_grad_s)
        run.check("hessian_ratio", hessian_ratio,
                  f"repeated Hessian product (default path) <= {t['hessian_ratio']} x gradient",
                  hessian_ratio <= t["hessian_ratio"])
        run.check("hessian_ratio_first_product", first_s / grad_s,
                  f"first Hessian product (builds the cache) <= {t['hessian_ratio']} x gradient",
                  first_s / grad_s <= t["hessian_ratio"])
        run.check("hessian_ratio_vs_fastest_gradient", repeated_s / fastest_grad_s,
                  f"repeated Hessian product <= {t['hessian_ratio']} x the faster of the two gradients",
                  repeated_s / fastest_grad_s <= t["hessian_ratio"])
        run.check("ggn_ratio", ggn_ratio, f"GGN product <= {t['ggn_ratio']} x gradient", ggn_ratio <= t["ggn_ratio"])
        run.check("lanczos_bookkeeping", bookkeeping,
                  f"Lanczos time beyond products <= {t['bookkeeping']:.0%} of an iteration",
                  bookkeeping <= t["bookkeeping"])
        run.note(f"fastest Hessian-vector mode here: {fastest}")
        run.table("benchmark", rows)
        print(markdown(rows, run), flush=True)
        run.figure(_bars(rows), "benchmark")
        text = [f"Device: {device_description(run.device)}, {str(run.dtype).replace('torch.', '')}; "
                f"{op.num_params:,} parameters, {len(splits.train)} samples, batch {o['batch_size']}.",
                f"Command: `python -m experiments.run {' '.join(_overrides())}`", "", markdown(rows, run)]
        if s["side_by_side"]["enabled"]:
            rows2 = side_by_side(run, model, loss_fn, batches, s)
            text += ["", f"Lanczos, {s['side_by_side']['steps']} steps, side by side:", "", side_markdown(rows2)]
        write_bytes_atomic(run.out_dir / "benchmark.md", ("\n".join(text) + "\n").encode())
        return run.finish(fastest_hvp_mode=fastest, table_files=["benchmark.md"])


def _interleaved(jobs: dict, repeats: int, device: torch.device, rows: list) -> dict:
    """Median seconds of each job over interleaved rounds (:func:`interleaved_median_seconds`); appends
    a row per job. Peak memory: CUDA's peak allocated during the job's calls, on a CPU the process's
    peak resident size so far."""
    peaks = dict.fromkeys(jobs, 0)

    def record(label: str) -> None:
        peaks[label] = max(peaks[label], peak_memory_bytes(device))

    seconds = interleaved_median_seconds(jobs, repeats, device, after=record)
    for label in jobs:
        rows.append({"quantity": label, "seconds": seconds[label], "peak_memory_bytes": peaks[label]})
        print(f"{label}: {seconds[label]:.4f} s", flush=True)
    return seconds


def _overrides() -> list[str]:
    """The command-line overrides of this run (Hydra's), for the table's header."""
    try:
        from hydra.core.hydra_config import HydraConfig
        return list(HydraConfig.get().overrides.task)
    except ValueError:
        return ["<called from Python>"]


def markdown(rows: list[dict], run: Run) -> str:
    lines = ["| quantity | seconds | x gradient | x fastest gradient | peak memory (MB) |",
             "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['quantity']} | {r['seconds']:.4f} | {r['ratio_to_gradient']:.2f} | "
                     f"{r['ratio_to_fastest_gradient']:.2f} | {r['peak_memory_bytes'] / 2**20:.0f} |")
    return "\n".join(lines)


def _bars(rows: list[dict]):
    fig, (ax,) = plotting.panel_grid(1, width=6.0)
    ax.barh([r["quantity"] for r in rows], [r["ratio_to_gradient"] for r in rows], color="tab:blue")
    ax.set_xlabel("time / full-data gradient")
    fig.tight_layout()
    return fig
