"""``analysis=benchmark``: the cost of curvature products relative to a gradient, measured in one run.

    python -m experiments.run experiment=benchmark_cpu     # VGG16 x0.25 (~1M parameters), fake CIFAR-10

For the chosen model and data it times (median of ``analysis.repeats`` runs after one warm-up) one
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
from curvature.operators import LOSSES, HessianOperator, curvature_mode, make_operator
from curvature.io import write_bytes_atomic
from curvature.timing import median_seconds
from curvature.training import peak_memory_bytes
from experiments import validate as V
from experiments.networks import build_network, checkpoint_path, load_data, validate_image_dataset, validate_model
from experiments.runtime import Run, device_description
from experiments.side_by_side import markdown as side_markdown
from experiments.side_by_side import side_by_side, validate_side_by_side
from experiments.spectrum_network import validate_operator

HVP_MODES = ("forward_over_reverse", "reverse_over_reverse")


def validate(cfg: DictConfig) -> dict:
    dataset = validate_image_dataset(cfg)
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
    """One gradient of the batch-size-weighted mean loss (the reference cost)."""
    total = sum(int(y.shape[0]) for _, y in batches)
    params = [p for p in model.parameters() if p.requires_grad]
    with curvature_mode(model, bn_mode), torch.enable_grad():
        grads = [torch.zeros_like(p) for p in params]
        for inputs, targets in batches:
            batch = torch.autograd.grad(loss_fn(model(inputs), targets), params)
            for g, b in zip(grads, batch):
                g.add_(b, alpha=targets.shape[0] / total)


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "benchmark", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        splits = load_data(s["dataset"], run.device, run.seed)
        model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
        batches = list(splits.train.batches(o["batch_size"], dtype=run.dtype))
        loss_fn = LOSSES[o["loss"]]
        rows = []

        def measure(quantity: str, fn) -> float:
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            seconds = median_seconds(fn, s["repeats"], run.device)
            rows.append({"quantity": quantity, "seconds": seconds, "peak_memory_bytes": peak_memory_bytes(run.device)})
            print(f"{quantity}: {seconds:.4f} s", flush=True)
            return seconds

        grad_s = measure("gradient", lambda: full_gradient(model, loss_fn, batches, o["bn_mode"]))
        # The layer-wise products run convolutions in the channels-last format on a CPU; the same
        # gradient in that format is the stricter reference, so both gradients are timed.
        model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
        batches_cl = [(_channels_last(x), y) for x, y in batches]
        grad_cl_s = measure("gradient (channels-last)", lambda: full_gradient(model_cl, loss_fn, batches_cl, o["bn_mode"]))
        del model_cl, batches_cl
        fastest_grad_s = min(grad_s, grad_cl_s)
        common = dict(bn_mode=o["bn_mode"], params=o["params"], check_deterministic=False)
        hvp = {}
        for mode in HVP_MODES:
            op = HessianOperator(model, loss_fn, batches, mode=mode, cache="none", layerwise=False, **common)
            v = torch.randn(op.num_params, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
            v = v.to(device=run.device, dtype=run.dtype)
            hvp[mode] = measure(f"hessian_product (autograd {mode}, primal recomputed)", lambda: op.matvec(v))
        fastest = min(hvp, key=hvp.get)

        def cached_rows(label: str, **kwargs) -> tuple:
            op = HessianOperator(model, loss_fn, batches, cache="all", **common, **kwargs)
            first = measure(f"hessian_product ({label} cached: first, builds the cache)",
                            lambda: (op.clear_cache(), op.matvec(v)))
            op.matvec(v)
            return op, first, measure(f"hessian_product ({label} cached: repeated)", lambda: op.matvec(v))

        autograd_op, _, _ = cached_rows("autograd", layerwise=False)
        run.metric("hessian_cache_megabytes_autograd", autograd_op.cache_bytes / 2**20)
        del autograd_op
        engine = HessianOperator(model, loss_fn, batches, cache="none", **common)
        if engine.engine == "layerwise":
            lw_fresh = measure("hessian_product (layerwise, primal recomputed)", lambda: engine.matvec(v))
            run.metric("hessian_ratio_layerwise_primal_recomputed", lw_fresh / grad_s)
            cached, first_s, repeated_s = cached_rows("layerwise")
        else:
            run.note(f"layer-wise products do not apply ({engine.layerwise_reason}): the default path is autograd's")
            cached, first_s, repeated_s = cached_rows("autograd", layerwise=False)
        run.metric("hessian_cache_megabytes", cached.cache_bytes / 2**20)
        del cached, engine
        ggn_autograd = make_operator("ggn", model, loss_fn, batches, layerwise=False, **common)
        measure("ggn_product (autograd, dual-number forward)", lambda: ggn_autograd.matvec(v))
        del ggn_autograd
        ggn = make_operator("ggn", model, loss_fn, batches, **common)  # the default path
        ggn_s = measure(f"ggn_product (default: {ggn.engine}, cache {ggn.cache})", lambda: ggn.matvec(v))
        del ggn

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
