"""``analysis=edge_of_stability``: full-batch gradient descent at the edge of stability (Cohen et al., 2021).

    python -m experiments.run experiment=edge_of_stability          # CPU, digits, a few minutes
    python -m experiments.run experiment=edge_of_stability_smoke    # CPU, seconds: the mechanics only

Gradient descent ``w <- w - eta grad L(w)`` on the mean loss over a fixed digits subset (one batch: the
whole subset) is stable on a quadratic only while the sharpness, the Hessian's top eigenvalue, stays
below ``2 / eta``. Cohen et al. found that on neural networks the sharpness rises during training
("progressive sharpening") until it reaches ``2 / eta`` and then hovers just above it, while the loss
keeps decreasing over long time scales, though not monotonically. Every variant (a loss and a learning
rate, ``analysis.mse_learning_rates`` / ``analysis.cross_entropy_learning_rates``) trains from the same
seeded initial weights (those of the model built right after ``torch.manual_seed(seed)``) for
``analysis.num_steps`` steps; every ``analysis.measure_every`` steps :class:`curvature.sharpness.CurvatureTracker`
measures the sharpness over the training batch (thick-restart Lanczos, warm-started from the previous
Ritz vector, to relative residual ``analysis.tol``). The loss is recorded at every step.

Checks per variant ``<loss>_lr<eta>``, on the ratio ``r = sharpness * eta / 2`` (1 at the stability limit):

* ``reaches_limit``: the sharpness starts below ``reach_fraction * 2 / eta`` and its peak reaches it;
* for the losses in ``analysis.hover_losses`` (MSE): ``hovers_at_limit``, every ``r`` over the last
  ``final_fraction`` of the steps within ``1 +- band``;
* for the others (cross-entropy): ``stays_at_or_below_limit``, every ``r`` over the last part at most
  ``1 + band``. With cross-entropy the loss, and with it the logits' curvature, keeps shrinking once the
  data are fitted, so the sharpness drifts below ``2 / eta`` late in training (Cohen et al., Sec. 3 and
  App. C); the band over the last part is reported, not required to sit at 1;
* for the losses in ``analysis.oscillating_losses`` (MSE): ``loss_decreases_non_monotonically``, the
  final loss at most ``loss_drop`` times the initial one and the loss rose at ``min_loss_increases`` or
  more steps; for the others ``loss_decreases`` (the drop only; the steps at which it rose are reported:
  on digits cross-entropy's loss rises only in the first few dozen steps, around the edge).

MSE is the suite's mean over all N x 10 entries of the one-hot residual; Cohen et al.'s
``1/2 ||f(x) - y||^2`` averaged over samples is 5 times it, so a learning rate ``eta`` here is
``eta / 5`` there, with the same ``sharpness * eta / 2``.

Measured (the preset: tanh MLP 64-64-64, 13,130 parameters, all 1,437 digits training images, float64,
1000 steps, sharpness every 20 steps; 2 CPU cores shared with other jobs, load ~7): 12/12 checks pass
in 4.0 min wall (2.7 min in a second run). ``sharpness x eta/2`` over the last 30%, median [min, max]:
MSE eta 0.75: 1.05 [1.02, 1.08] (reached at step 140, overshoot to 1.31 at 240, the loss rose at 287
steps); MSE eta 0.5: 1.03 [0.913, 1.06] (reached at 400, overshoot 1.19 at 640; 86 rises);
cross-entropy eta 0.5: peak 1.38 at step 20, then 0.139 [0.115, 0.176]; eta 0.4: 1.03-1.10 over steps
20-80, then 0.164 [0.134, 0.208] (the loss never rose). Sharpness measurements: 5.7-15 Hessian products
each with warm starts (MSE at the edge needs the most).
"""

from __future__ import annotations

import copy
import math

import numpy as np
import torch
from omegaconf import DictConfig
from tqdm.auto import tqdm

from curvature.operators import LOSSES
from curvature.sharpness import CurvatureTracker
from experiments import validate as V
from experiments.networks import build_network, load_data, validate_image_dataset, validate_model
from experiments.runtime import Run

LOSS_KEYS = {"mse": "analysis.mse_learning_rates", "cross_entropy": "analysis.cross_entropy_learning_rates"}
LOSS_LABELS = {"mse": "MSE", "cross_entropy": "cross-entropy"}


def validate(cfg: DictConfig) -> dict:
    variants = []
    for loss, key in LOSS_KEYS.items():
        rates = V.get(cfg, key)
        if not (isinstance(rates, list) and all(isinstance(r, (int, float)) and not isinstance(r, bool)
                                                and math.isfinite(r) and r > 0 for r in rates)):
            raise V.ConfigError(key, rates, "must be a list of learning rates > 0 (empty: no runs of this loss)",
                                f"{key}=[0.5,0.25]")
        if len(set(map(float, rates))) < len(rates):
            raise V.ConfigError(key, rates, "lists a learning rate twice", f"{key}=[0.5,0.25]")
        variants += [{"loss": loss, "lr": float(r), "name": f"{loss}_lr{float(r):g}"} for r in rates]
    if not variants:
        raise V.ConfigError(LOSS_KEYS["mse"], [], "no variant to train: give at least one learning rate",
                            f"{LOSS_KEYS['mse']}=[0.5]")
    s = {"variants": variants, "hover_losses": _losses(cfg, "analysis.hover_losses"),
         "oscillating_losses": _losses(cfg, "analysis.oscillating_losses"),
         "num_steps": V.positive_int(cfg, "analysis.num_steps", "analysis.num_steps=1000"),
         "measure_every": V.positive_int(cfg, "analysis.measure_every", "analysis.measure_every=10"),
         "tol": V.positive_number(cfg, "analysis.tol", "analysis.tol=1e-4"),
         "max_matvecs": V.positive_int(cfg, "analysis.max_matvecs", "analysis.max_matvecs=300"),
         "final_fraction": V.number(cfg, "analysis.final_fraction", 0, 1, strict_minimum=True,
                                    example="analysis.final_fraction=0.5"),
         "band": V.number(cfg, "analysis.band", 0, 1, strict_minimum=True, example="analysis.band=0.1"),
         "reach_fraction": V.number(cfg, "analysis.reach_fraction", 0, 1, strict_minimum=True,
                                    example="analysis.reach_fraction=0.9"),
         "loss_drop": V.number(cfg, "analysis.loss_drop", 0, 1, strict_minimum=True,
                               example="analysis.loss_drop=0.5"),
         "min_loss_increases": V.integer(cfg, "analysis.min_loss_increases", minimum=0,
                                         example="analysis.min_loss_increases=1"),
         "dataset": validate_image_dataset(cfg), "model": validate_model(cfg)}
    if s["measure_every"] > s["num_steps"]:
        raise V.ConfigError("analysis.measure_every", s["measure_every"], "must be at most analysis.num_steps "
                            f"({s['num_steps']}) to measure more than the initial sharpness",
                            f"analysis.measure_every={max(1, s['num_steps'] // 100)}")
    return s


def _losses(cfg: DictConfig, key: str) -> list[str]:
    return V.choice_list(cfg, key, LOSS_KEYS, f"{key}=[mse]")


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "edge_of_stability", validate=validate) as run:
        s = run.settings
        splits = load_data(s["dataset"], run.device, run.seed)
        data = splits.train
        batch = next(data.batches(len(data), dtype=run.dtype))  # full batch: the whole subset at once
        torch.manual_seed(run.seed)  # the initial weights depend on the seed only (tests rebuild them)
        initial = build_network(s["model"], splits, run.device, run.dtype)
        run.metric("num_samples", len(data))
        run.metric("num_params", sum(p.numel() for p in initial.parameters()))
        rows, curves = [], {}
        for variant in s["variants"]:
            with run.phase(variant["name"]):
                curve = train_variant(run, s, variant, copy.deepcopy(initial), batch)
            curves[variant["name"]] = curve
            rows.append(_check_variant(run, s, variant, curve))
        run.table("variants", rows)
        run.figure(figure(s["variants"], curves, rows, s["final_fraction"]), "edge_of_stability")
        return run.finish(edge_of_stability={k: s[k] for k in (
            "num_steps", "measure_every", "tol", "max_matvecs", "final_fraction", "band", "reach_fraction",
            "loss_drop", "min_loss_increases", "hover_losses", "oscillating_losses")},
            variants=[{k: v[k] for k in ("name", "loss", "lr")} for v in s["variants"]])


def train_variant(run: Run, s: dict, variant: dict, model: torch.nn.Module, batch: tuple) -> dict:
    """Full-batch gradient descent from ``model``'s weights; the loss at every step (before the update)
    and the tracked sharpness every ``measure_every`` steps. Stops early when the loss is not finite."""
    loss_fn, lr, inputs, targets = LOSSES[variant["loss"]], variant["lr"], *batch
    tracker = CurvatureTracker(model, loss_fn, [batch], quantities=("top_eigenvalue",), operator="hessian",
                               tol=s["tol"], max_matvecs=s["max_matvecs"], warm_start=True, seed=run.seed)
    params = [p for p in model.parameters() if p.requires_grad]
    losses, rows, diverged = [], [], None
    for step in tqdm(range(s["num_steps"] + 1), desc=variant["name"], unit="step", leave=False):
        loss = loss_fn(model(inputs), targets)
        if not torch.isfinite(loss):
            diverged = step
            run.note(f"{variant['name']}: the loss is not finite at step {step}: gradient descent diverged")
            break
        losses.append(float(loss.detach()))
        if step % s["measure_every"] == 0:
            rows.append(tracker.measure(step))
        if step < s["num_steps"]:
            grads = torch.autograd.grad(loss, params)
            with torch.no_grad():
                for p, g in zip(params, grads):
                    p.sub_(lr * g)
    products = [r["top_eigenvalue_products"] for r in rows]
    run.metric(f"{variant['name']}_tracking_seconds", tracker.total_seconds)
    run.metric(f"{variant['name']}_products_per_measurement", float(np.mean(products)) if products else 0.0)
    curve = {"loss": np.array(losses), "steps": np.array([r["step"] for r in rows]),
             "sharpness": np.array([r["top_eigenvalue"] for r in rows]),
             "residual": np.array([r["top_eigenvalue_residual"] for r in rows]),
             "products": np.array(products), "diverged": diverged}
    for key in ("loss", "steps", "sharpness", "residual", "products"):
        run.array(f"{variant['name']}_{key}", curve[key])
    unconverged = [r["step"] for r in rows if not r["top_eigenvalue_converged"]]
    if unconverged:
        run.note(f"{variant['name']}: the sharpness at {len(unconverged)} of {len(rows)} measurements did not "
                 f"reach tol={s['tol']:g} in {s['max_matvecs']} products (steps {unconverged[:5]}...)")
    return curve


def band_stats(ratio: np.ndarray, final_fraction: float) -> dict:
    """Median, min and max of ``ratio`` over its last ``final_fraction`` (at least one value)."""
    tail = ratio[min(len(ratio) - 1, int(math.floor(len(ratio) * (1 - final_fraction)))):]
    return {"median": float(np.median(tail)), "min": float(tail.min()), "max": float(tail.max()),
            "count": int(tail.size)}


def _check_variant(run: Run, s: dict, variant: dict, curve: dict) -> dict:
    """The checks and the table row of one variant (see the module docstring)."""
    name, lr = variant["name"], variant["lr"]
    ratio = curve["sharpness"] * lr / 2
    losses = curve["loss"]
    row = {"variant": name, "loss": variant["loss"], "lr": lr, "stability_limit": 2 / lr,
           "diverged_at_step": curve["diverged"]}
    if curve["diverged"] is not None or ratio.size < 2:
        for check in ("reaches_limit", "band", "loss_decreases_non_monotonically"):
            run.check(f"{name}_{check}", float("nan"), "gradient descent must not diverge", False)
        return row
    band = band_stats(ratio, s["final_fraction"])
    increases = int((np.diff(losses) > 0).sum())
    peak = int(ratio.argmax())
    reached = np.nonzero(ratio >= s["reach_fraction"])[0]
    row.update(initial_sharpness=float(curve["sharpness"][0]), peak_sharpness=float(curve["sharpness"][peak]),
               peak_ratio=float(ratio[peak]), peak_step=int(curve["steps"][peak]),
               first_reach_step=int(curve["steps"][reached[0]]) if reached.size else None,
               final_ratio_median=band["median"], final_ratio_min=band["min"], final_ratio_max=band["max"],
               final_measurements=band["count"], initial_loss=float(losses[0]), final_loss=float(losses[-1]),
               loss_increases=increases, mean_products=float(curve["products"].mean()))
    for key in ("peak_ratio", "final_ratio_median", "final_ratio_min", "final_ratio_max", "final_loss"):
        run.metric(f"{name}_{key}", row[key])
    run.check(f"{name}_reaches_limit", row["peak_ratio"],
              f"starts below and peaks at >= {s['reach_fraction']:g} x 2/eta (initial ratio {ratio[0]:.3g})",
              bool(ratio[0] < s["reach_fraction"] <= row["peak_ratio"]))
    last = f"over the last {s['final_fraction']:.0%} of the steps"
    if variant["loss"] in s["hover_losses"]:
        deviation = max(abs(band["min"] - 1), abs(band["max"] - 1))
        run.check(f"{name}_hovers_at_limit", deviation, f"|sharpness x eta/2 - 1| <= {s['band']:g} {last} "
                  f"(median {band['median']:.3f}, range {band['min']:.3f}-{band['max']:.3f})",
                  bool(deviation <= s["band"]))
    else:
        run.check(f"{name}_stays_at_or_below_limit", band["max"], f"sharpness x eta/2 <= {1 + s['band']:g} "
                  f"{last} (median {band['median']:.3f}, range {band['min']:.3f}-{band['max']:.3f}; "
                  "it drifts below 2/eta as the loss vanishes)", bool(band["max"] <= 1 + s["band"]))
    dropped = bool(losses[-1] <= s["loss_drop"] * losses[0])
    if variant["loss"] in s["oscillating_losses"]:
        run.check(f"{name}_loss_decreases_non_monotonically", losses[-1] / losses[0],
                  f"final / initial loss <= {s['loss_drop']:g} and the loss rose at >= {s['min_loss_increases']} "
                  f"steps ({increases} of {len(losses) - 1})", dropped and increases >= s["min_loss_increases"])
    else:
        run.check(f"{name}_loss_decreases", losses[-1] / losses[0], f"final / initial loss <= {s['loss_drop']:g} "
                  f"(the loss rose at {increases} of {len(losses) - 1} steps)", dropped)
    return row


def figure(variants: list[dict], curves: dict, rows: list[dict], final_fraction: float | None = None):
    """Cohen et al.'s Fig. 1 layout: per loss a column, the training loss above, the sharpness with its
    ``2 / eta`` line below, one colour per learning rate; the measured band in the titles, the last
    ``final_fraction`` of the steps (where it is taken) shaded."""
    import matplotlib.pyplot as plt

    from curvature import plotting  # noqa: F401  (the headless backend)

    losses = list(dict.fromkeys(v["loss"] for v in variants))
    fig, axes = plt.subplots(2, len(losses), figsize=(4.6 * len(losses), 6.2), squeeze=False, sharex="col")
    by_name = {r["variant"]: r for r in rows}
    for col, loss in enumerate(losses):
        top, bottom = axes[0, col], axes[1, col]
        bands = []
        for i, v in enumerate(x for x in variants if x["loss"] == loss):
            color, curve, row = f"C{i}", curves[v["name"]], by_name[v["name"]]
            top.plot(np.arange(curve["loss"].size), curve["loss"], color=color, lw=1, label=f"eta = {v['lr']:g}")
            bottom.plot(curve["steps"], curve["sharpness"], color=color, lw=1.2, label=f"eta = {v['lr']:g}")
            bottom.axhline(2 / v["lr"], color=color, ls="--", lw=0.9)
            if "final_ratio_median" in row:
                bands.append(f"{v['lr']:g}: {row['final_ratio_median']:.2f} "
                             f"[{row['final_ratio_min']:.2f}, {row['final_ratio_max']:.2f}]")
        steps = max(int(curves[v["name"]]["loss"].size) - 1 for v in variants if v["loss"] == loss)
        if final_fraction is not None and steps > 0:
            bottom.axvspan(steps * (1 - final_fraction), steps, color="0.9", zorder=0)
        top.set_yscale("log")
        top.set(ylabel="training loss", title=f"{LOSS_LABELS[loss]}: full-batch gradient descent")
        top.legend(fontsize=7)
        bottom.set(xlabel="step", ylabel="sharpness (top Hessian eigenvalue)")
        part = f"last {final_fraction:.0%} (shaded)" if final_fraction is not None else "last part"
        bottom.set_title(f"sharpness x eta/2 over the {part}, median [range]:\n" + "; ".join(bands) +
                         " (dashed: 2/eta)", fontsize=8)
        bottom.legend(fontsize=7)
    fig.suptitle("Edge of stability (Cohen et al. 2021) on digits", fontsize=10)
    fig.tight_layout()
    return fig
