"""Training and evaluation of classifiers on device-resident data (the paper's Sec. 7 recipe).

A batch's loss is a mean over its samples, or over its tokens for a language model's ``(N, T, V)``
logits with ``(N, T)`` targets (:class:`curvature.losses.CrossEntropy`); accuracies count the same
rows (samples or tokens), and epoch means weight each batch by its number of them.

Randomness is re-seeded at every epoch from ``(seed, epoch)`` (data order, augmentation, dropout), so
a run resumed from the checkpoint written after epoch ``e`` ends with the same weights as an
uninterrupted run: the checkpoint holds everything else (model, optimiser, SWA state).
"""

from __future__ import annotations

import math
import resource
import sys
import time
from pathlib import Path
from typing import Callable, Mapping, Optional

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from curvature.errors import DataError, NumericalError, SuiteError
from curvature.io import first_non_finite, load_torch_file, torch_save_atomic
from curvature.losses import as_loss
from curvature.seeding import stream_seed


def linear_decay_factor(epoch: int, epochs: int, final_ratio: float = 0.01) -> float:
    """The original package's schedule: with t = epoch / epochs, 1 for t <= 0.5, then linear down
    to ``final_ratio`` at t = 0.9, then ``final_ratio`` (from the start when ``epochs`` is 0: SWA from epoch 0)."""
    t = epoch / epochs if epochs > 0 else 1.0
    if t <= 0.5:
        return 1.0
    if t <= 0.9:
        return 1.0 - (1.0 - final_ratio) * (t - 0.5) / 0.4
    return final_ratio


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr


def seed_epoch(seed: int, epoch: int, device: torch.device) -> torch.Generator:
    """Seed dropout (the global RNG) and return the data-order/augmentation generator for ``epoch``."""
    torch.manual_seed(stream_seed(seed, f"train.dropout.{epoch}"))
    gen = torch.Generator(device=device)
    gen.manual_seed(stream_seed(seed, f"train.data.{epoch}"))
    return gen


def _topk_correct(logits: torch.Tensor, labels: torch.Tensor, k: int) -> int:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return int((top == labels.unsqueeze(-1)).any(-1).sum())


def train_epoch(model: torch.nn.Module, data, optimizer: torch.optim.Optimizer, batch_size: int,
                generator: torch.Generator, augment: bool, dtype: torch.dtype = torch.float32,
                loss_fn: Callable = F.cross_entropy, epoch: int = 0, progress: bool = True,
                after_step: Optional[Callable[[], None]] = None) -> dict:
    """One pass over ``data`` (an ``ImageData`` or ``TextData``) in shuffled mini-batches; returns loss /
    accuracies per sample or token, and ``images_per_s`` in samples (windows of text) per second.

    An optimiser with ``observe(inputs, labels, logits)`` (K-FAC, the Newton optimisers) is shown each
    batch after the forward pass and before the backward. ``step_time_s`` sums the time of those
    calls and of ``optimizer.step()`` (host clock: on CUDA it includes only what the step waits for).
    """
    model.train()
    loss_of = as_loss(loss_fn)
    total_loss, counted, correct, top5, predicted, seen = 0.0, 0.0, 0, 0, 0, 0
    observe = getattr(optimizer, "observe", None)
    step_time = 0.0
    start = time.perf_counter()
    num_batches = math.ceil(len(data) / batch_size)
    batches = data.batches(batch_size, shuffle=True, augment=augment, generator=generator, dtype=dtype)
    for index, (inputs, labels) in enumerate(tqdm(batches, total=num_batches, desc=f"epoch {epoch}",
                                                  unit="batch", leave=False, disable=None if progress else True)):
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = loss_of(logits, labels)
        if not torch.isfinite(loss):
            raise NumericalError(f"training loss is {float(loss.detach())} at epoch {epoch}, batch {index}: "
                                 "lower the learning rate (optimizer.lr) or check the data")
        tick = time.perf_counter()
        if observe is not None:
            observe(inputs, labels, logits)
        step_time += time.perf_counter() - tick
        loss.backward()
        tick = time.perf_counter()
        optimizer.step()
        step_time += time.perf_counter() - tick
        if after_step is not None:
            after_step()
        denominator = loss_of.denominator(labels)  # what the batch mean divided by: samples or tokens
        total_loss += float(loss.detach()) * denominator
        counted += denominator
        correct += _topk_correct(logits.detach(), labels, 1)
        top5 += _topk_correct(logits.detach(), labels, 5)
        predicted += labels.numel()
        seen += labels.shape[0]
    elapsed = time.perf_counter() - start
    return {"loss": total_loss / counted, "accuracy": correct / predicted, "top5_accuracy": top5 / predicted,
            "time_s": elapsed, "images_per_s": seen / elapsed if elapsed > 0 else float("nan"),
            "step_time_s": step_time, "num_steps": num_batches}


def curvature_sampler(data, batch_size: int, generator: torch.Generator, augment: bool,
                      dtype: torch.dtype = torch.float32) -> Callable[[], tuple]:
    """A callable drawing one ``(inputs, labels)`` batch of ``batch_size`` random training images per
    call (without replacement within a batch) from ``generator``: the Newton optimisers' curvature
    batches, on their own random stream."""
    size = min(batch_size, len(data))

    def draw() -> tuple:
        order = torch.randperm(len(data), generator=generator, device=generator.device)[:size]
        subset = data.subset(order)  # subset() moves the indices to the data's device
        return next(subset.batches(size, augment=augment, generator=generator, dtype=dtype))
    return draw


@torch.no_grad()
def evaluate(model: torch.nn.Module, data, batch_size: int = 1000, dtype: torch.dtype = torch.float32,
             loss_fn: Callable = F.cross_entropy) -> dict:
    """Mean loss and top-1 / top-5 accuracy over ``data`` (per sample, or per token of a language
    model) in eval mode (BatchNorm running stats)."""
    was_training = model.training
    model.eval()
    mean_of = as_loss(loss_fn)
    # A closed-form rule can sum (a batch of ignored tokens adds 0, not NaN); a user's callable gives
    # what it gives: its mean times the batch's denominator is its sum.
    sum_of = as_loss(loss_fn, reduction="sum") if mean_of.closed_form else None
    total_loss, counted, correct, top5, predicted = 0.0, 0.0, 0, 0, 0
    for inputs, labels in data.batches(batch_size, dtype=dtype):
        logits = model(inputs)
        denominator = mean_of.denominator(labels)
        if sum_of is not None:
            total_loss += float(sum_of(logits, labels))
        else:
            total_loss += float(mean_of(logits, labels)) * (denominator if mean_of.reduction == "mean" else 1.0)
        counted += denominator
        correct += _topk_correct(logits, labels, 1)
        top5 += _topk_correct(logits, labels, 5)
        predicted += labels.numel()
    model.train(was_training)
    return {"loss": total_loss / counted, "accuracy": correct / predicted, "top5_accuracy": top5 / predicted}


def weight_norms(model: torch.nn.Module) -> dict:
    """L2 norm of all parameters together and their largest absolute entry."""
    params = [p.detach().flatten() for p in model.parameters()]
    flat = torch.cat(params) if params else torch.zeros(1)
    return {"weight_l2": float(flat.norm()), "weight_linf": float(flat.abs().max())}


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA peak allocated on GPU; the process's peak resident set size on CPU."""
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


# --- checkpoints --------------------------------------------------------------------------------
def checkpoint_name(epoch: int) -> str:
    return f"checkpoint-{epoch:05d}.pt"


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomic ``torch.save``: a killed run never leaves half a checkpoint."""
    torch_save_atomic(path, state)


#: Optimiser state entries that hold one value per parameter entry (torch's optimisers, SWATS, K-FAC).
PARAM_SHAPED = ("momentum_buffer", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "square_avg", "grad_avg",
                "acc_delta", "sum", "prev", "step_size", "ax", "sgd_buffer")
_FROM_TRAIN = "give a checkpoint-XXXXX.pt written by analysis=train (or regenerate it with analysis=train)"


def _kind(value) -> str:
    name = type(value).__name__
    return "None" if value is None else f"{'an' if name[0] in 'aeiou' else 'a'} {name}"


def refuse_non_finite(path, tensors, prefix: str = "") -> None:
    """A one-line ``DataError`` naming ``path`` and the first tensor holding NaN or Inf (bad input,
    not a failure of this run: no partial results)."""
    found = first_non_finite(tensors, prefix)
    if found is not None:
        raise DataError(f"checkpoint {path} holds non-finite values in tensor '{found[0]}' ({found[1]}): "
                        "it comes from a diverged run; use an earlier checkpoint")


def read_checkpoint(path: Path, map_location="cpu") -> dict:
    """The dict :func:`save_checkpoint` wrote, read with ``weights_only=True`` (no code runs from the
    file) and checked: a dict whose ``model`` (and ``swa_model``, if any) is a state dict of finite
    tensors. The one function every analysis reads a checkpoint through; anything else is a one-line
    ``SuiteError`` naming the file."""
    state = load_torch_file(path, "checkpoint", _FROM_TRAIN, map_location)
    weights = state.get("model") if isinstance(state, dict) else None
    if not (isinstance(weights, Mapping) and all(isinstance(k, str) for k in weights)):
        what = f"its 'model' entry is {_kind(weights)}" if isinstance(state, dict) else f"it holds {_kind(state)}"
        raise SuiteError(f"checkpoint {path} holds no model state ({what}, not a state dict): {_FROM_TRAIN}")
    refuse_non_finite(path, weights)
    if isinstance(state.get("swa_model"), Mapping):
        refuse_non_finite(path, state["swa_model"], "swa_model.")
    return state


def load_model_state(path, model: torch.nn.Module, weights: Mapping) -> None:
    """``model.load_state_dict(weights)``; a state of another model is a one-line SuiteError."""
    try:
        model.load_state_dict(weights)
    except (RuntimeError, TypeError, ValueError, AttributeError, KeyError) as error:
        first = str(error).strip().splitlines()
        detail = next((line.strip() for line in first[1:] if line.strip()), first[0] if first else "")
        raise SuiteError(f"checkpoint {path} does not fit the chosen model ({detail}): choose the "
                         "model, width and dataset it was trained with") from None
    loaded = model.state_dict()
    found = first_non_finite(loaded)
    if found is not None:  # finite in the file, but too large for the model's dtype
        raise DataError(f"checkpoint {path}: tensor '{found[0]}' overflows {loaded[found[0]].dtype} "
                        f"when loaded ({found[1]}); use dtype=float64 or an earlier checkpoint")


def load_optimizer_state(path, optimizer: torch.optim.Optimizer, saved) -> None:
    """``optimizer.load_state_dict(saved)`` after checking that ``saved`` is the state of this kind of
    optimiser over parameters of these shapes, with finite tensors: a one-line SuiteError otherwise
    (torch would fail later, inside a step, with a KeyError or a shape mismatch)."""
    groups = saved.get("param_groups") if isinstance(saved, Mapping) else None
    if not (isinstance(groups, list) and all(isinstance(g, Mapping) and isinstance(g.get("params"), list)
                                             for g in groups) and isinstance(saved.get("state"), Mapping)):
        raise SuiteError(f"checkpoint {path} holds no optimiser state (its 'optimizer' entry is {_kind(saved)}, "
                         f"not an optimizer.state_dict()): {_FROM_TRAIN}")
    refuse_non_finite(path, saved["state"], "optimizer.state.")
    ours = optimizer.param_groups
    counts = ([len(g["params"]) for g in groups], [len(g["params"]) for g in ours])
    if counts[0] != counts[1]:
        raise SuiteError(f"checkpoint {path} holds optimiser state for {counts[0]} parameter tensors (per group), "
                         f"this model has {counts[1]}: the state is of another model; choose the model it was "
                         "trained with")
    # Settings on one side only, both ways, mean another optimiser (Adam's betas vs SGD's momentum); a
    # key missing from the file alone is one a newer torch added, and its __setstate__ fills it in.
    have, need = {k for g in groups for k in g}, {k for g in ours for k in g}
    if have - need and need - have:
        raise SuiteError(f"checkpoint {path} holds the state of another optimiser than {type(optimizer).__name__} "
                         f"(its settings have {', '.join(sorted(have - need))} and lack "
                         f"{', '.join(sorted(need - have))}): choose the optimizer it was trained with")
    params = dict(zip((i for g in groups for i in g["params"]), (p for g in ours for p in g["params"])))
    for index, entries in saved["state"].items():
        param = params.get(index)
        for key, value in (entries.items() if isinstance(entries, Mapping) and param is not None else ()):
            if key in PARAM_SHAPED and isinstance(value, torch.Tensor) and value.shape != param.shape:
                raise SuiteError(f"checkpoint {path} holds optimiser state '{key}' of shape {tuple(value.shape)} "
                                 f"for a parameter of shape {tuple(param.shape)}: the state is of another model; "
                                 "choose the model it was trained with")
    try:
        optimizer.load_state_dict(saved)
    except (RuntimeError, TypeError, ValueError, KeyError) as error:
        detail = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise SuiteError(f"checkpoint {path} holds an optimiser state {type(optimizer).__name__} cannot load "
                         f"({detail}): choose the optimizer and model it was trained with") from None


def load_checkpoint(path: Path, model: torch.nn.Module,
                    optimizer: Optional[torch.optim.Optimizer] = None,
                    map_location="cpu") -> dict:
    """Load a checkpoint written by :func:`save_checkpoint` into ``model`` (and ``optimizer``, when
    the checkpoint holds an optimiser state); returns the checkpoint's dict (:func:`read_checkpoint`).

    A missing, unreadable, unsafe or ill-fitting file raises a one-line ``SuiteError`` naming it.
    """
    state = read_checkpoint(path, map_location)
    load_model_state(path, model, state["model"])
    if optimizer is not None and state.get("optimizer") is not None:
        load_optimizer_state(path, optimizer, state["optimizer"])
    return state
