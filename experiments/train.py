"""``analysis=train``: train a network with checkpoints, per-epoch statistics and SWA.

    python -m experiments.run experiment=train_digits                 # CPU, ~30 s, >= 90% test acc
    python -m experiments.run experiment=train_vgg16_cifar100         # the paper's recipe (GPU)
    python -m experiments.run experiment=train_digits resume=outputs/.../checkpoint-00010.pt
    python -m experiments.run experiment=train_digits optimizer=ggn_newton analysis.step_cost=true
    python -m experiments.run experiment=train_gpt_tiny                # CPU, a character-level GPT

Optimisers with ``set_curvature_sampler`` (the Newton ones) get curvature batches drawn from the
training split on their own stream, re-seeded per epoch from ``(seed, epoch)`` like the data order, so
a resumed run stays exact. On ``dataset=text`` losses and accuracies are per token (first-order
optimisers only, so far). ``analysis.step_cost`` times the chosen optimiser's step against SGD's on
the same batch, on copies of the initial model, before training.

``analysis.curvature.every=<steps>`` tracks curvature during training (:class:`curvature.sharpness.CurvatureTracker`):
before the first optimiser step and after every ``every``-th, the ``analysis.curvature.quantities``
(``top_eigenvalue`` warm-started from the previous Ritz vector, with its residual; ``trace``; ``spectrum``)
of the training loss's Hessian (or GGN) over a fixed, seeded subset of the train split
(``analysis.curvature.data``). Each measurement is a row of the ``curvature`` table and is logged to W&B
as it happens (``curvature/<quantity>`` at W&B step = optimiser step; with tracking on, the epoch rows are
logged at the optimiser step that ends the epoch, with an ``epoch`` value). Each epoch row holds the
latest values (``curvature_<quantity>``), the epoch's tracking seconds (``tracking_time_s``, inside
``epoch_time_s``) and their share of it (``tracking_share``); ``images_per_s`` leaves tracking out. The
metrics hold the whole run's tracking seconds and share, and with ``analysis.curvature.compare_cold=true``
the products of the warm starts against cold starts at the same steps. The tracker's state (warm-start
vector, rows) is saved in every checkpoint, so a resumed run continues the curve exactly.

    python -m experiments.run experiment=train_digits analysis.curvature.every=10 \
        'analysis.curvature.quantities=[top_eigenvalue,trace]' analysis.curvature.compare_cold=true
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig
from torch.optim.swa_utils import AveragedModel, update_bn

from curvature import plotting
from curvature.errors import SuiteError
from curvature.losses import as_loss
from curvature.models import count_parameters
from curvature.optim import build_optimizer
from curvature.seeding import stream_seed
from curvature.sharpness import QUANTITIES, CurvatureTracker, tracking_batches
from curvature.text import unigram_entropy
from curvature.timing import median_seconds
from curvature.training import (checkpoint_name, curvature_sampler, evaluate, linear_decay_factor,
                                load_model_state, load_optimizer_state, peak_memory_bytes, read_checkpoint,
                                save_checkpoint, seed_epoch, set_lr, train_epoch, weight_norms)
from experiments import validate as V
from experiments.lanczos_state import fingerprint, refuse_differences
from experiments.networks import (build_network, checkpoint_path, load_data, validate_image_dataset,
                                  validate_model)
from experiments.runtime import Run, latest_checkpoint

def validate(cfg: DictConfig) -> dict:
    dataset = validate_image_dataset(cfg, allow_text=True)  # first: other keys interpolate from it
    epochs = V.positive_int(cfg, "analysis.epochs", "analysis.epochs=20")
    optimizer = V.get(cfg, "optimizer")
    V.positive_number(cfg, "optimizer.lr", "optimizer.lr=0.05")
    if dataset["name"] == "text" and optimizer.get("name") in SECOND_ORDER:
        raise V.ConfigError("optimizer", optimizer["name"], "the second-order optimisers do not train on "
                            "dataset=text yet", "optimizer=adam")
    for key in ("momentum", "weight_decay"):
        if key in optimizer:
            V.number(cfg, f"optimizer.{key}", minimum=0, example=f"optimizer.{key}=0.0")
    _validate_second_order(cfg, optimizer)
    swa = {"enabled": V.boolean(cfg, "analysis.swa.enabled")}
    if swa["enabled"]:
        swa["start"] = V.integer(cfg, "analysis.swa.start", 0, epochs - 1, f"analysis.swa.start={epochs // 2}")
        swa["lr"] = V.positive_number(cfg, "analysis.swa.lr", "analysis.swa.lr=0.05")
        swa["bn_update"] = V.boolean(cfg, "analysis.swa.bn_update")
    resume = latest_checkpoint(cfg) if V.get(cfg, "resume", None) is True else checkpoint_path(cfg, "resume")
    return {
        "epochs": epochs,
        "batch_size": V.positive_int(cfg, "analysis.batch_size", "analysis.batch_size=128"),
        "eval_batch_size": V.positive_int(cfg, "analysis.eval_batch_size", "analysis.eval_batch_size=1000"),
        "schedule": V.choice(cfg, "analysis.schedule", ["linear", "constant"]),
        "lr_final_ratio": V.number(cfg, "analysis.lr_final_ratio", 0, 1, strict_minimum=True,
                                   example="analysis.lr_final_ratio=0.01"),
        "save_freq": V.positive_int(cfg, "analysis.save_freq", "analysis.save_freq=25"),
        "target_test_accuracy": None if V.get(cfg, "analysis.target_test_accuracy", None) is None else
        V.number(cfg, "analysis.target_test_accuracy", 0, 1, example="analysis.target_test_accuracy=0.9"),
        "check_test_loss": V.boolean(cfg, "analysis.check_test_loss"),
        "step_cost": V.boolean(cfg, "analysis.step_cost"),
        "step_cost_repeats": V.positive_int(cfg, "analysis.step_cost_repeats", "analysis.step_cost_repeats=3"),
        "swa": swa, "optimizer": optimizer, "model": validate_model(cfg),
        "dataset": dataset, "resume": resume, "curvature": validate_curvature(cfg),
    }


def validate_curvature(cfg: DictConfig) -> dict:
    """``analysis.curvature``: ``{"every": 0}`` when off (or absent), else every setting of the tracker."""
    key = "analysis.curvature"
    if V.get(cfg, key, None) is None:
        return {"every": 0}
    every = V.integer(cfg, f"{key}.every", minimum=0, example=f"{key}.every=10")
    if every == 0:
        return {"every": 0}
    quantities = V.get(cfg, f"{key}.quantities")
    if not (isinstance(quantities, list) and quantities and all(q in QUANTITIES for q in quantities)
            and len(set(quantities)) == len(quantities)):
        raise V.ConfigError(f"{key}.quantities", quantities, f"must be a non-empty list of distinct names "
                            f"drawn from {', '.join(QUANTITIES)}", f"{key}.quantities=[top_eigenvalue,trace]")
    num_samples = V.get(cfg, f"{key}.data.num_samples", None)
    c = {"every": every, "quantities": quantities,
         "operator": V.choice(cfg, f"{key}.operator", ["hessian", "ggn"], f"{key}.operator=hessian"),
         "bn_mode": V.choice(cfg, f"{key}.bn_mode", ["train", "eval"], f"{key}.bn_mode=train"),
         "num_samples": None if num_samples is None else
         V.positive_int(cfg, f"{key}.data.num_samples", f"{key}.data.num_samples=256"),
         "batch_size": V.positive_int(cfg, f"{key}.data.batch_size", f"{key}.data.batch_size=256"),
         "tol": V.positive_number(cfg, f"{key}.tol", f"{key}.tol=1e-4"),
         "max_matvecs": V.positive_int(cfg, f"{key}.max_matvecs", f"{key}.max_matvecs=300"),
         "warm_start": V.boolean(cfg, f"{key}.warm_start"), "compare_cold": V.boolean(cfg, f"{key}.compare_cold"),
         "trace_probes": V.positive_int(cfg, f"{key}.trace_probes", f"{key}.trace_probes=10"),
         "spectrum_steps": V.positive_int(cfg, f"{key}.spectrum_steps", f"{key}.spectrum_steps=20"),
         "spectrum_vectors": V.positive_int(cfg, f"{key}.spectrum_vectors", f"{key}.spectrum_vectors=1")}
    if c["compare_cold"] and "top_eigenvalue" not in quantities:
        raise V.ConfigError(f"{key}.compare_cold", True, "compares warm and cold starts of the top eigenvalue, "
                            "which is not tracked", f"{key}.quantities=[top_eigenvalue]")
    if c["compare_cold"] and not c["warm_start"]:
        raise V.ConfigError(f"{key}.compare_cold", True, "compares the warm start with a cold one, and "
                            f"{key}.warm_start=false", f"{key}.warm_start=true")
    return c


SECOND_ORDER = ("kfac", "saddle_free_newton", "ggn_newton")


def _validate_second_order(cfg: DictConfig, optimizer: dict) -> None:
    """Keys of the Newton / K-FAC / SWATS optimisers, when present (null means: use the default rule)."""
    for key in ("damping", "damping_ratio"):
        if optimizer.get(key) is not None:
            V.positive_number(cfg, f"optimizer.{key}", f"optimizer.{key}=1.0")
    for key in ("lanczos_steps", "curvature_batch_size", "cov_update_period", "inv_update_period"):
        if key in optimizer:
            V.positive_int(cfg, f"optimizer.{key}", f"optimizer.{key}=10")
    for key in ("eps", "switch_tol"):
        if optimizer.get(key) is not None:
            V.number(cfg, f"optimizer.{key}", minimum=0, example=f"optimizer.{key}=1e-9")
    if "stat_decay" in optimizer:
        V.number(cfg, "optimizer.stat_decay", 0, 0.999999, example="optimizer.stat_decay=0.95")
    for key, options in (("bn_mode", ["train", "eval"]), ("start_vector", ["random", "gradient"]),
                         ("hvp_mode", ["auto", "forward_over_reverse", "reverse_over_reverse"])):
        if key in optimizer:
            V.choice(cfg, f"optimizer.{key}", options)


def make_optimizer(s: dict, model: torch.nn.Module) -> torch.optim.Optimizer:
    """The configured optimiser over ``model``; a value its constructor rejects is a config error."""
    try:
        return build_optimizer(s["optimizer"], model.parameters(), model=model, loss_fn=F.cross_entropy)
    except ValueError as error:
        raise V.ConfigError("optimizer", s["optimizer"].get("name"), str(error),
                            "optimizer=sgd, or fix the key named above") from None


def measure_step_cost(run: Run, s: dict, model: torch.nn.Module, splits) -> dict:
    """Median seconds of one full training step (forward, observe, backward, step) of the configured
    optimiser and of plain SGD, on copies of ``model`` and the same first training batch."""
    inputs, labels = next(splits.train.batches(s["batch_size"], dtype=run.dtype))
    loss_of = as_loss(F.cross_entropy)  # per sample, or per token of a language model
    sgd_settings = {"name": "sgd", "lr": s["optimizer"]["lr"], "momentum": 0.9}
    timings = {}
    for label, settings in (("optimizer", s["optimizer"]), ("sgd", sgd_settings)):
        copy_ = copy.deepcopy(model)
        opt = make_optimizer({**s, "optimizer": settings}, copy_)
        observe = getattr(opt, "observe", None)

        def step():
            opt.zero_grad(set_to_none=True)
            logits = copy_(inputs)
            loss = loss_of(logits, labels)
            if observe is not None:
                observe(inputs, labels, logits)
            loss.backward()
            opt.step()

        timings[label] = median_seconds(step, s["step_cost_repeats"], run.device)
    return {"step_seconds": timings["optimizer"], "sgd_step_seconds": timings["sgd"],
            "step_cost_vs_sgd": timings["optimizer"] / timings["sgd"]}


def learning_rate(s: dict, epoch: int) -> float:
    base = s["optimizer"]["lr"]
    if s["schedule"] == "constant":
        return base
    if s["swa"]["enabled"]:  # decay to the SWA rate by swa.start, then hold it (Izmailov et al.)
        return base * linear_decay_factor(epoch, s["swa"]["start"], s["swa"]["lr"] / base)
    return base * linear_decay_factor(epoch, s["epochs"], s["lr_final_ratio"])


def _check_tracking_data(s: dict, splits) -> None:
    c = s["curvature"]
    if c["every"] and c["num_samples"] is not None and c["num_samples"] > len(splits.train):
        raise V.ConfigError("analysis.curvature.data.num_samples", c["num_samples"], f"the train split holds only "
                            f"{len(splits.train)} samples", f"analysis.curvature.data.num_samples={len(splits.train)} "
                            "(or null: all of them)")


class Tracking:
    """``analysis.curvature`` inside the training loop: a :class:`CurvatureTracker` over a fixed, seeded
    subset of the train split, measured every ``every`` optimiser steps; each row logged as it comes."""

    def __init__(self, run: Run, s: dict, model: torch.nn.Module, splits):
        c = s["curvature"]
        self.run, self.every = run, c["every"]
        batches = tracking_batches(splits.train, c["num_samples"], c["batch_size"], run.seed, run.dtype)
        self.tracker = CurvatureTracker(
            model, F.cross_entropy, batches, quantities=c["quantities"], operator=c["operator"],
            bn_mode=c["bn_mode"], tol=c["tol"], max_matvecs=c["max_matvecs"], warm_start=c["warm_start"],
            compare_cold=c["compare_cold"], trace_probes=c["trace_probes"], spectrum_steps=c["spectrum_steps"],
            spectrum_vectors=c["spectrum_vectors"], seed=run.seed)
        self.steps_per_epoch = math.ceil(len(splits.train) / s["batch_size"])
        self.step, self.epoch, self.epoch_seconds = 0, 0, 0.0
        run.metric("curvature_tracking_samples", self.tracker.op.num_samples)

    def resume(self, path, state, epoch: int) -> None:
        """Continue from a checkpoint's tracker state (written after ``epoch`` epochs)."""
        if state is None:
            raise SuiteError(f"checkpoint {path} holds no curvature tracker state: resume it with "
                             "analysis.curvature.every=0, or train afresh with tracking on")
        try:
            self.tracker.load_state_dict(state)
        except ValueError as error:
            raise SuiteError(f"checkpoint {path}: {error}: resume from a checkpoint-XXXXX.pt of this run") from None
        self.step = epoch * self.steps_per_epoch

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.epoch_seconds = epoch, 0.0

    def after_step(self) -> None:
        self.step += 1
        if self.step % self.every == 0:
            self.epoch_seconds += self.measure(self.epoch)

    def measure(self, epoch: int) -> float:
        """One row at the current step: kept by the tracker, logged to W&B; returns its seconds."""
        row = self.tracker.measure(self.step, epoch=epoch)
        self.run.log({f"curvature/{k}": v for k, v in row.items()
                      if isinstance(v, (int, float)) and k != "step"}, step=self.step)
        return row["seconds"]

    def epoch_columns(self, train: dict) -> dict:
        """The epoch row's tracking columns: its seconds and share, the latest measured values."""
        seconds, wall = self.epoch_seconds, train["time_s"]
        latest = self.tracker.rows[-1] if self.tracker.rows else {}
        columns = {"tracking_time_s": seconds, "tracking_share": seconds / wall if wall > 0 else math.nan,
                   "images_per_s": train["images_per_s"] * wall / (wall - seconds) if wall > seconds else math.nan,
                   "optimizer_step": self.step}
        columns.update({f"curvature_{k}": v for k, v in latest.items()
                        if isinstance(v, (int, float)) and not isinstance(v, bool) and k not in ("epoch",)})
        return columns

    def finish(self, history: list[dict]) -> None:
        """The ``curvature`` table and the run's tracking metrics (over every row, resumed ones too)."""
        run, rows = self.run, self.tracker.rows
        run.table("curvature", rows)
        seconds = sum(r["seconds"] for r in rows)
        before = sum(r["seconds"] for r in rows if r["epoch"] == 0)  # the initial measurement, outside epochs
        run.metric("curvature_tracked_steps", len(rows))
        run.metric("curvature_tracking_seconds", seconds)
        run.metric("curvature_tracking_share", seconds / (history[-1]["train_time_s"] + before))
        if "top_eigenvalue" in self.tracker.quantities:
            values = [r["top_eigenvalue"] for r in rows]
            run.metric("curvature_final_top_eigenvalue", values[-1])
            run.metric("curvature_max_top_eigenvalue", max(values))
            run.metric("curvature_mean_top_eigenvalue_products",
                       sum(r["top_eigenvalue_products"] for r in rows) / len(rows))
            run.metric("curvature_max_top_eigenvalue_residual", max(r["top_eigenvalue_residual"] for r in rows))
            missed = [r["step"] for r in rows if not r["top_eigenvalue_converged"]]
            if missed:
                run.note(f"curvature: the top eigenvalue missed analysis.curvature.tol={self.tracker.tol:g} at "
                         f"{len(missed)} of {len(rows)} steps (first: step {missed[0]}); raise "
                         "analysis.curvature.max_matvecs or use dtype=float64")
            if self.tracker.compare_cold:  # a diagnostic: its seconds are in the share above, and left out here
                saving = self.tracker.warm_start_saving()
                for key in ("steps_compared", "warm_products", "cold_products", "saving"):
                    run.metric(f"curvature_warm_start_{key}", saving[key])
                cold = sum(r["cold_seconds"] for r in rows)
                run.metric("curvature_cold_comparison_seconds", cold)
                run.metric("curvature_tracking_share_without_cold",
                           (seconds - cold) / (history[-1]["train_time_s"] + before - cold))
        if "trace" in self.tracker.quantities:
            run.metric("curvature_final_trace", rows[-1]["trace"])


def run(cfg: DictConfig) -> dict:
    with Run(cfg, "train", validate=validate) as run:
        s = run.settings
        d = s["dataset"]
        splits = load_data(d, run.device, run.seed)
        _check_tracking_data(s, splits)
        model = build_network(s["model"], splits, run.device, run.dtype)
        if s["step_cost"]:  # before the real optimiser exists: K-FAC's hooks must not be copied
            for key, value in measure_step_cost(run, s, model, splits).items():
                run.metric(key, value)
        optimizer = make_optimizer(s, model)
        swa_model = AveragedModel(model) if s["swa"]["enabled"] else None
        tracking = Tracking(run, s, model, splits) if s["curvature"]["every"] else None
        history, start = [], 0
        if s["resume"]:
            start, history = resume(run, s, model, optimizer, swa_model, tracking)
        run.metric("num_parameters", count_parameters(model))
        if tracking is not None and start == 0:
            tracking.measure(epoch=0)  # the initial weights, before the first step

        checkpoints = []
        for epoch in range(start, s["epochs"]):
            lr = learning_rate(s, epoch)
            set_lr(optimizer, lr)
            generator = seed_epoch(run.seed, epoch, run.device)
            if hasattr(optimizer, "set_curvature_sampler"):
                curvature_generator = torch.Generator(device=run.device)
                curvature_generator.manual_seed(stream_seed(run.seed, f"train.curvature.{epoch}"))
                optimizer.set_curvature_sampler(curvature_sampler(
                    splits.train, optimizer.curvature_batch_size, curvature_generator, d["augment"], run.dtype))
            if run.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(run.device)
            if tracking is not None:
                tracking.start_epoch(epoch + 1)
            train = train_epoch(model, splits.train, optimizer, s["batch_size"], generator,
                                augment=d["augment"], dtype=run.dtype, epoch=epoch + 1,
                                after_step=tracking.after_step if tracking is not None else None)
            if swa_model is not None and epoch >= s["swa"]["start"]:
                swa_model.update_parameters(model)
            test = evaluate(model, splits.test, s["eval_batch_size"], run.dtype)
            row = {"epoch": epoch + 1, "lr": lr, "train_loss": train["loss"],
                   "train_accuracy": train["accuracy"], "train_top5_accuracy": train["top5_accuracy"],
                   "test_loss": test["loss"], "test_accuracy": test["accuracy"],
                   "test_top5_accuracy": test["top5_accuracy"], "epoch_time_s": train["time_s"],
                   "images_per_s": train["images_per_s"], "train_error": 1.0 - train["accuracy"],
                   "train_time_s": (history[-1].get("train_time_s", 0.0) if history else 0.0) + train["time_s"],
                   "step_time_s": train["step_time_s"] / max(train["num_steps"], 1),
                   "peak_memory_bytes": peak_memory_bytes(run.device), **weight_norms(model)}
            if splits.val is not None:
                val = evaluate(model, splits.val, s["eval_batch_size"], run.dtype)
                row.update(val_loss=val["loss"], val_accuracy=val["accuracy"])
            if tracking is not None:
                row.update(tracking.epoch_columns(train))
            history.append(row)
            if tracking is None:
                run.log({k: v for k, v in row.items() if k != "epoch"}, step=epoch + 1)
            else:  # W&B steps are optimiser steps: the curvature rows were logged at theirs
                run.log({k: v for k, v in row.items() if not k.startswith("curvature_")}, step=tracking.step)
            print(f"epoch {epoch + 1}/{s['epochs']}: train loss {train['loss']:.4f} acc "
                  f"{train['accuracy']:.3f} | test loss {test['loss']:.4f} acc {test['accuracy']:.3f} | "
                  f"{train['images_per_s']:.0f} {'windows' if d['name'] == 'text' else 'img'}/s", flush=True)
            if (epoch + 1) % s["save_freq"] == 0 or epoch + 1 == s["epochs"]:
                path = run.out_dir / checkpoint_name(epoch + 1)
                save_checkpoint(path, {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                       "epoch": epoch + 1, "config": run.config, "history": history,
                                       "swa_model": swa_model.state_dict() if swa_model else None,
                                       "curvature_tracker": tracking.tracker.state_dict() if tracking else None})
                checkpoints.append(path.name)

        last = history[-1]
        for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "test_top5_accuracy",
                    "images_per_s", "peak_memory_bytes", "weight_l2", "weight_linf"):
            run.metric(key, last[key])
        run.metric("epochs_run", s["epochs"] - start)
        run.metric("mean_images_per_s", sum(r["images_per_s"] for r in history) / len(history))
        run.metric("final_train_error", last["train_error"])
        run.metric("train_time_s", last["train_time_s"])
        run.metric("mean_step_seconds", sum(r["step_time_s"] for r in history) / len(history))
        for key in ("damping", "kfac_steps"):
            if key in optimizer.param_groups[0]:
                run.metric(f"optimizer_{key}", optimizer.param_groups[0][key])
        if hasattr(optimizer, "skipped_steps"):
            run.metric("skipped_steps", optimizer.skipped_steps)
        if optimizer.param_groups[0].get("switch_step") is not None:
            run.metric("swats_switch_step", optimizer.param_groups[0]["switch_step"])
            run.metric("swats_sgd_lr", optimizer.param_groups[0]["sgd_lr"])
        if s["target_test_accuracy"] is not None:
            run.check("test_accuracy", last["test_accuracy"], f">= {s['target_test_accuracy']}",
                      last["test_accuracy"] >= s["target_test_accuracy"])
        if s["check_test_loss"]:
            _check_test_loss(run, history, splits.train if d["name"] == "text" else None)
        if swa_model is not None and swa_model.n_averaged.item() > 0:
            _finish_swa(run, s, splits, swa_model)
        if tracking is not None:
            tracking.finish(history)
        run.table("epochs", history)
        run.figure(_curves(history, tracking.tracker.rows if tracking else []), "training_curves")
        source = {"data_source": splits.source} if d["name"] == "text" else {}  # which text was read
        extra = {"curvature": s["curvature"]} if tracking else {}
        return run.finish(checkpoints=checkpoints, num_parameters=count_parameters(model), **source, **extra)


#: Keys that leave the weights of every epoch as they are: free to differ between a checkpoint's
#: config and the config that resumes it (where to log and save, what to check, where the files are).
RESUME_FREE_KEYS = ("output_dir", "overwrite", "resume", "logger", "run_name", "experiment_id", "device",
                    "distributed", "operator", "dataset.data_dir", "dataset.download", "analysis.save_freq",
                    "analysis.eval_batch_size", "analysis.target_test_accuracy", "analysis.check_test_loss",
                    "analysis.step_cost", "analysis.step_cost_repeats", "analysis.swa.bn_update")


def resume(run: Run, s: dict, model, optimizer, swa_model, tracking=None) -> tuple[int, list[dict]]:
    """Load ``s["resume"]`` into the model, optimiser, SWA average and curvature tracker; returns
    ``(epoch, history)``.

    The checkpoint's config must equal this run's in every key outside RESUME_FREE_KEYS (and
    ``analysis.epochs`` when the learning rate does not depend on it), so that the resumed run ends
    where an uninterrupted one would; anything else is a one-line error naming the key or the file.
    """
    path = s["resume"]
    state = read_checkpoint(path, map_location=run.device)
    load_model_state(path, model, state["model"])
    epoch, history, config = state.get("epoch"), state.get("history", []), state.get("config")
    if isinstance(epoch, bool) or not isinstance(epoch, int) or epoch < 0:
        raise SuiteError(f"checkpoint {path} holds no epoch count ('epoch' is {epoch!r}): resume from a "
                         "checkpoint-XXXXX.pt written by analysis=train")
    if not isinstance(config, dict):
        raise SuiteError(f"checkpoint {path} holds no config to check the resumed run against: resume from a "
                         "checkpoint-XXXXX.pt written by analysis=train")
    epochs_free = s["schedule"] == "constant" or s["swa"]["enabled"]  # else the schedule depends on epochs
    free = RESUME_FREE_KEYS + (("analysis.epochs",) if epochs_free else ()) + \
        (("analysis.curvature",) if tracking is None else ())  # off: its keys change nothing
    refuse_differences(fingerprint(run.config, free), fingerprint(config, free), Path(path))
    if state.get("optimizer") is None:
        raise SuiteError(f"checkpoint {path} holds no optimiser state (checkpoint-swa.pt is an average of "
                         "weights, not a point of the run): resume from a checkpoint-XXXXX.pt")
    load_optimizer_state(path, optimizer, state["optimizer"])
    if not (isinstance(history, list) and all(isinstance(row, dict) for row in history)):
        raise SuiteError(f"checkpoint {path} holds no training history (a list of per-epoch rows): resume from "
                         "a checkpoint-XXXXX.pt written by analysis=train")
    if swa_model is not None and state.get("swa_model") is not None:
        load_model_state(path, swa_model, state["swa_model"])
    if tracking is not None:
        tracking.resume(path, state.get("curvature_tracker"), epoch)
    if epoch >= s["epochs"]:
        raise V.ConfigError("analysis.epochs", s["epochs"], f"the checkpoint already reached epoch {epoch}: "
                            "nothing left to train", f"analysis.epochs={epoch + 1} with analysis.schedule=constant")
    run.note(f"resumed from {path} after epoch {epoch}")
    return epoch, list(history)


def _check_test_loss(run: Run, history: list[dict], text_train=None) -> None:
    """The test loss fell below the first epoch's; on text, also below what character frequencies alone
    give (the train split's unigram entropy): the model uses the context."""
    first, last = history[0]["test_loss"], history[-1]["test_loss"]
    run.check("test_loss_falls", last, f"< {first:.4f} (epoch {history[0]['epoch']})", last < first)
    if text_train is not None:
        floor = unigram_entropy(text_train)
        run.metric("unigram_entropy", floor)
        run.check("test_loss_below_unigram", last, f"< {floor:.4f} (unigram entropy of the train text)",
                  last < floor)


def _finish_swa(run: Run, s: dict, splits, swa_model: AveragedModel) -> None:
    if s["swa"]["bn_update"]:
        update_bn((x for x, _ in splits.train.batches(s["batch_size"], dtype=run.dtype)), swa_model,
                  device=run.device)
    test = evaluate(swa_model.module, splits.test, s["eval_batch_size"], run.dtype)
    train = evaluate(swa_model.module, splits.train, s["eval_batch_size"], run.dtype)
    run.metric("swa_test_loss", test["loss"])
    run.metric("swa_test_accuracy", test["accuracy"])
    run.metric("swa_train_loss", train["loss"])
    run.metric("swa_train_accuracy", train["accuracy"])
    run.metric("swa_models_averaged", float(swa_model.n_averaged))
    path = run.out_dir / "checkpoint-swa.pt"
    save_checkpoint(path, {"model": swa_model.module.state_dict(), "optimizer": None,
                           "epoch": s["epochs"], "config": run.config, "swa": True})


def _curves(history: list[dict], tracked: list[dict] = ()):
    fig, axes = plotting.panel_grid(4 if tracked else 3)
    epochs = [r["epoch"] for r in history]
    for ax, key, label in ((axes[0], "loss", "loss"), (axes[1], "accuracy", "top-1 accuracy")):
        ax.plot(epochs, [r[f"train_{key}"] for r in history], label="train")
        ax.plot(epochs, [r[f"test_{key}"] for r in history], label="test")
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend(fontsize=7)
    axes[2].plot(epochs, [r["lr"] for r in history], color="k")
    axes[2].set_xlabel("epoch")
    axes[2].set_ylabel("learning rate")
    if any(math.isfinite(r["train_loss"]) and r["train_loss"] > 0 for r in history):
        axes[0].set_yscale("log")
    if tracked:
        _sharpness_panel(axes[3], tracked)
    fig.tight_layout()
    return fig


def _sharpness_panel(ax, rows: list[dict]) -> None:
    """The tracked curvature against optimiser steps: the top eigenvalue, else the trace, else the
    largest Ritz value of the spectrum; the last value in the title."""
    key, label = next((k, text) for k, text in (("top_eigenvalue", "top eigenvalue (sharpness)"),
                                                 ("trace", "trace (Hutchinson)"),
                                                 ("spectrum_max_ritz_value", "largest Ritz value"))
                      if k in rows[0])
    steps = [r["step"] for r in rows]
    ax.plot(steps, [r[key] for r in rows], color="tab:red", marker="." if len(rows) < 50 else None)
    if key == "trace":
        low = [r["trace"] - 2 * r["trace_stderr"] for r in rows]
        high = [r["trace"] + 2 * r["trace_stderr"] for r in rows]
        ax.fill_between(steps, low, high, color="tab:red", alpha=0.2, lw=0, label="+-2 standard errors")
        ax.legend(fontsize=7)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0]}: {rows[-1][key]:.4g} at step {steps[-1]}", fontsize=9)
