"""``analysis=landscape``: train / test loss and accuracy along Ritz directions (paper Figs. 9-12).

    python -m experiments.run experiment=fig9 analysis.checkpoint=<checkpoint> analysis.spectrum_dir=<spectrum run>
    python -m experiments.run experiment=fig9_smoke                    # CPU, fake CIFAR, own small spectrum

Reads the Ritz vectors of a spectrum run (``analysis.spectrum_dir`` holding ``ritz_vectors_<operator>.pt``,
or ``analysis.ritz_vectors_file``), written by ``analysis=spectrum analysis.save_ritz_vectors=true`` on the
same model and checkpoint; with neither given (and ``analysis.require_spectrum=false``) it runs Lanczos
itself (``analysis.num_steps``) on ``operator.name`` over the train split. Directions are chosen by
``analysis.positions`` in the ascending Ritz values (default: largest, second largest, smallest / most
negative, nearest zero), plus the random baselines of ``analysis.random_directions``. For each, the loss
and accuracy at ``w0 + t v`` (t in ``linspace(-dist, dist, num_points)``) on train and test, BatchNorm per
``analysis.bn_mode``; the quadratic model ``loss0 + theta t^2 / 2`` and the range of t where it holds
within ``analysis.quadratic_tolerance``; and, for the Ritz directions, the second difference of the
operator's own loss at ``analysis.check_t`` against theta (check in float64 only).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig

from curvature import landscape as LS
from curvature.errors import SuiteError
from curvature.io import first_non_finite, load_torch_file
from curvature.lanczos import lanczos
from curvature.operators import make_operator
from experiments import validate as V
from experiments.loss_config import build_loss
from experiments.networks import (build_network, checkpoint_path, load_data, require_trained,
                                  validate_image_dataset, validate_model)
from experiments.runtime import Run
from experiments.spectrum_network import has_batch_norm, validate_operator

HOW = ("python -m experiments.run analysis=spectrum analysis.save_ritz_vectors=true "
       "analysis.checkpoint=<the same checkpoint> dataset=<same> model=<same> operator=<hessian|ggn>")


def validate(cfg: DictConfig) -> dict:
    s = {"dataset": validate_image_dataset(cfg), "model": validate_model(cfg), "operator": validate_operator(cfg),
         "checkpoint": checkpoint_path(cfg, "analysis.checkpoint"),
         "dist": V.positive_number(cfg, "analysis.dist", "analysis.dist=1.0"),
         "num_points": V.integer(cfg, "analysis.num_points", minimum=3, example="analysis.num_points=21"),
         "bn_mode": V.choice(cfg, "analysis.bn_mode", list(LS.BN_MODES)),
         "batch_size": V.positive_int(cfg, "analysis.batch_size", "analysis.batch_size=256"),
         "num_steps": V.positive_int(cfg, "analysis.num_steps", "analysis.num_steps=20"),
         "quadratic_tolerance": V.positive_number(cfg, "analysis.quadratic_tolerance", "analysis.quadratic_tolerance=0.1"),
         "check_t": V.positive_number(cfg, "analysis.check_t", "analysis.check_t=1e-3"),
         "check_tolerance": V.positive_number(cfg, "analysis.check_tolerance", "analysis.check_tolerance=1e-3"),
         "figure_metrics": V.choice_list(cfg, "analysis.figure_metrics", ["loss", "accuracy"],
                                         "analysis.figure_metrics=[loss,accuracy]", non_empty=True)}
    positions = V.get(cfg, "analysis.positions")
    if not (isinstance(positions, list) and positions and
            all(p == "near_zero" or (isinstance(p, int) and not isinstance(p, bool)) for p in positions)):
        raise V.ConfigError("analysis.positions", positions, "must be a list of integer indices into the ascending "
                            "Ritz values (-1 largest, 0 smallest) or near_zero", "analysis.positions=[-1,0,near_zero]")
    randoms = V.choice_list(cfg, "analysis.random_directions", ["gaussian", "filter"],
                            "analysis.random_directions=[gaussian,filter]")
    s["positions"], s["random_directions"] = positions, randoms
    if len(s["operator"]["names"]) != 1:
        raise V.ConfigError("analysis.operators", s["operator"]["names"], "the landscape takes one operator",
                            "operator=hessian")
    s["ritz_file"] = _ritz_file(cfg, s["operator"]["names"][0])
    if s["ritz_file"] is None:   # Lanczos here gives at most num_steps Ritz values
        check_positions(positions, s["num_steps"], f"analysis.num_steps={s['num_steps']}")
    require_trained(cfg, s["checkpoint"])
    if s["ritz_file"] is None and V.get(cfg, "analysis.require_spectrum", False):
        raise V.ConfigError("analysis.spectrum_dir", None, f"this preset reads saved Ritz vectors: produce them with "
                            f"{HOW}", "analysis.spectrum_dir=outputs/<spectrum run>")
    return s


def check_positions(positions: list, count: int, source: str) -> None:
    """Integer positions must index one of ``count`` Ritz values (-count..count-1): no wrapping around."""
    bad = [p for p in positions if p != "near_zero" and not -count <= p < count]
    if bad:
        raise V.ConfigError("analysis.positions", positions, f"{bad} out of range: {source} gives {count} Ritz "
                            f"values (indices {-count}..{count - 1})", "analysis.positions=[-1,-2,0,near_zero]")


def _ritz_file(cfg: DictConfig, operator: str):
    path = V.get(cfg, "analysis.ritz_vectors_file", None)
    folder = V.get(cfg, "analysis.spectrum_dir", None)
    if path is None and folder is not None:
        path = Path(str(folder)) / f"ritz_vectors_{operator}.pt"
    if path is not None and not Path(str(path)).is_file():
        raise V.ConfigError("analysis.spectrum_dir" if folder else "analysis.ritz_vectors_file", str(path),
                            f"no Ritz vectors file there; produce it with {HOW}", "analysis.spectrum_dir=outputs/<run>")
    return None if path is None else str(path)


RITZ_TENSORS = ("ritz_values", "ritz_vectors", "mask")


def load_ritz_vectors(path: str, model: torch.nn.Module, names: list[str]) -> dict:
    """The saved Ritz pairs, checked against the model: one-line SuiteError saying how to make the right file."""
    saved = load_torch_file(path, "Ritz vectors file", f"produce it with {HOW}")
    if not isinstance(saved, dict) or not all(isinstance(saved.get(k), torch.Tensor) for k in RITZ_TENSORS):
        raise SuiteError(f"{path} holds no Ritz vectors ({', '.join(RITZ_TENSORS)}); produce them with {HOW}")
    found = first_non_finite({k: saved[k] for k in RITZ_TENSORS})
    if found is not None:
        raise SuiteError(f"Ritz vectors file {path} holds non-finite values in tensor '{found[0]}' ({found[1]}); "
                         f"produce it again with {HOW}")
    named = dict(model.named_parameters())
    shapes = [tuple(named[n].shape) for n in names]
    if (list(saved.get("param_names", [])) != list(names) or [tuple(s) for s in saved.get("param_shapes", [])] != shapes
            or int(saved.get("num_params", -1)) != sum(named[n].numel() for n in names)):
        raise SuiteError(f"{path} is from another model or parameter set ({saved.get('num_params')} parameters, "
                         f"model {(saved.get('model') or {}).get('name')}) than this one "
                         f"({sum(named[n].numel() for n in names)}); produce the right one with {HOW}")
    return saved


def _directions(run: Run, s: dict, model, names, splits, loss_fn, op_batches):
    o = s["operator"]
    if s["ritz_file"]:
        saved = load_ritz_vectors(s["ritz_file"], model, names)
        values, vectors, mask = saved["ritz_values"][0], saved["ritz_vectors"][0], saved["mask"][0]
        run.note(f"Ritz vectors: {s['ritz_file']} ({saved.get('operator')})")
    else:
        op = make_operator(o["names"][0], model, loss_fn, op_batches, bn_mode=o["bn_mode"], params=o["params"],
                           check_deterministic=False, cache=o["cache"], layerwise=o["layerwise"], **o["fisher"])
        result = lanczos(op.matvec, op.num_params, s["num_steps"], seed=run.seed, dtype=run.dtype,
                         device=run.device, return_vectors=True)
        values, vectors, mask = result.ritz_values[0], result.ritz_vectors[0], result.mask[0]
        run.note(f"Ritz vectors: computed here ({o['names'][0]}, {s['num_steps']} Lanczos steps)")
    mask = torch.as_tensor(mask, dtype=torch.bool)
    values, vectors = values[mask].to(torch.float64), vectors[mask]
    check_positions(s["positions"], len(values), s["ritz_file"] or "the Lanczos run (it stopped early)")
    out = []
    for label, index in LS.choose_ritz_directions(values, s["positions"]):
        v = vectors[index].to(device=run.device, dtype=run.dtype)
        out.append({"label": label, "kind": "ritz", "ritz_value": float(values[index]), "vector": v / v.norm()})
    gen = torch.Generator().manual_seed(run.seed)
    for kind in s["random_directions"]:
        out.append({"label": f"random_{kind}", "kind": kind, "ritz_value": None,
                    "vector": LS.random_direction(model, names, kind, gen)})
    return out


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "landscape", validate=validate) as run:
        s, o = run.settings, run.settings["operator"]
        splits = load_data(s["dataset"], run.device, run.seed)
        model = build_network(s["model"], splits, run.device, run.dtype, s["checkpoint"])
        run.note(f"weights: {s['checkpoint'] or 'initial (seed ' + str(run.seed) + ')'}")
        loss_fn = build_loss(o)
        names = V.parameter_names(model, o["params"])
        op_batches = list(splits.train.batches(o["batch_size"], dtype=run.dtype))
        data = {"train": list(splits.train.batches(s["batch_size"], dtype=run.dtype)),
                "test": list(splits.test.batches(s["batch_size"], dtype=run.dtype))}
        ts = np.linspace(-s["dist"], s["dist"], s["num_points"])
        ts[np.abs(ts) < 1e-12 * s["dist"]] = 0.0
        directions = _directions(run, s, model, names, splits, loss_fn, op_batches)
        run.array("t", ts)
        rows, worst_t0 = [], 0.0
        for d in directions:
            curves = LS.loss_along_direction(model, names, d["vector"], ts, data, loss_fn, s["bn_mode"])
            d["curves"] = curves
            zero = int(np.argmin(np.abs(ts)))
            curvature = None if run.dtype != torch.float64 else LS.second_difference(
                model, names, d["vector"], s["check_t"], op_batches, loss_fn, o["bn_mode"])
            if d["ritz_value"] is not None:
                theta = d["ritz_value"]
            else:  # random baselines: the curvature seen on the grid's first step (robust in float32)
                tr, h = curves["train"]["loss"], ts[zero + 1]
                theta = float((tr[zero + 1] + tr[zero - 1] - 2 * tr[zero]) / h ** 2)
            d["theta"] = theta
            row = {"direction": d["label"], "kind": d["kind"], "ritz_value": d["ritz_value"], "model_curvature": theta,
                   "second_difference": curvature}
            for split in data:
                for metric in ("loss", "accuracy"):
                    run.array(f"{d['label']}_{split}_{metric}", np.array(curves[split][metric]))
                loss0 = curves[split]["loss"][zero]
                row[f"{split}_loss0"] = loss0
                lo, hi = LS.quadratic_range(ts, curves[split]["loss"], loss0, theta, s["quadratic_tolerance"])
                row[f"{split}_quadratic_t_min"], row[f"{split}_quadratic_t_max"] = lo, hi
            rows.append(row)
            run.metric(f"{d['label']}_quadratic_range", min(abs(row["train_quadratic_t_min"]), row["train_quadratic_t_max"]))
            if d["ritz_value"] is not None:
                run.metric(f"{d['label']}_ritz_value", d["ritz_value"])
        loss0s = [r["train_loss0"] for r in rows]
        worst_t0 = max(loss0s) - min(loss0s)
        run.metric("train_loss0", loss0s[0])
        run.check("loss_at_t0_consistent", worst_t0, "the loss at t = 0 is the same along every direction (== 0)",
                  worst_t0 == 0.0)
        ritz_rows = [r for r in rows if r["ritz_value"] is not None]
        scale = max(abs(r["ritz_value"]) for r in ritz_rows)
        if run.dtype == torch.float64:
            err = max(abs(r["second_difference"] - r["ritz_value"]) for r in ritz_rows) / scale if scale else 0.0
            run.metric("second_difference_error", err)
            run.check("curvature_matches_ritz", err,
                      f"max |second difference at t={s['check_t']:g} - theta| / max |theta| <= {s['check_tolerance']:g}",
                      err <= s["check_tolerance"])
        else:
            run.note("curvature_matches_ritz is checked in float64 only (dtype=float64): the second difference "
                     "at small t loses precision in float32")
        run.table("directions", rows)
        run.figure(_draw(ts, directions, s, has_batch_norm(model)), "landscape")
        return run.finish(checkpoint=s["checkpoint"], ritz_vectors_file=s["ritz_file"],
                          operator=o["names"][0], bn_mode=s["bn_mode"], batch_norm=has_batch_norm(model))


def _draw(ts, directions, s, batch_norm: bool):
    import matplotlib.pyplot as plt
    metrics = s["figure_metrics"]
    fig, axes = plt.subplots(len(metrics), 2, figsize=(8, 3 * len(metrics)), squeeze=False)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for row, metric in enumerate(metrics):
        for col, split in enumerate(("train", "test")):
            ax = axes[row, col]
            for i, d in enumerate(directions):
                c = colours[i % len(colours)]
                y = d["curves"][split][metric]
                label = (f"{d['label']}: theta={d['ritz_value']:.3g}" if d["ritz_value"] is not None
                         else f"{d['label']} (curv. {d['theta']:.3g})")
                ax.plot(ts, y, color=c, label=label, marker="." if d["kind"] == "ritz" else None,
                        linestyle="-" if d["kind"] == "ritz" else ":")
                if metric == "loss" and d["kind"] == "ritz":
                    loss0 = y[int(np.argmin(np.abs(ts)))]
                    ax.plot(ts, loss0 + d["theta"] * ts ** 2 / 2, color=c, linestyle="--", linewidth=0.8)
            if metric == "loss":
                lo = min(min(d["curves"][split]["loss"]) for d in directions)
                hi = max(max(d["curves"][split]["loss"]) for d in directions)
                ax.set_ylim(lo - 0.05 * (hi - lo + 1e-12), hi + 0.05 * (hi - lo + 1e-12))
            ax.set_title(f"{split} {metric}" + (f" (bn {s['bn_mode']})" if batch_norm else ""))
            ax.set_xlabel("t (unit-norm direction)")
    axes[0, 0].legend(fontsize=6)
    fig.tight_layout()
    return fig
