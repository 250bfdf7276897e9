"""The data of a curvature operator: a fixed list of batches, their loss denominators and provenance.

A curvature operator is a fixed matrix only if every product sees the same data, so the batches
are read once: a list of ``(inputs, targets)`` is used as it is (the same tensors, so the per-batch
primal cache recognises them); any other iterable (a ``DataLoader``, a generator) is read once in the
order it gives. A shuffling ``DataLoader`` is read once too, with a note: the dataset's mean loss does
not depend on the order, but which samples share a batch does (BatchNorm with batch statistics).

Batches may be ``(inputs, targets)`` pairs or dicts (Hugging Face style, ``{"input_ids": ..., "labels":
...}``): ``unpack(batch) -> (inputs, targets)`` says how to split one; by default a dict's ``labels``
(or ``label``/``targets``) entry is the target and the rest are keyword inputs of the model.
"""

from __future__ import annotations

from typing import Any, Callable, Iterable, Optional

import torch

from curvature.errors import SuiteError

__all__ = ["OperatorData", "default_unpack", "model_outputs", "slice_inputs", "tensors_in", "versions"]

_TARGET_KEYS = ("labels", "label", "targets")


def default_unpack(batch) -> tuple[Any, torch.Tensor]:
    """``(inputs, targets)`` of a pair/list batch or a dict batch (its ``labels`` entry the targets)."""
    if isinstance(batch, dict):
        key = next((k for k in _TARGET_KEYS if k in batch), None)
        if key is None:
            raise SuiteError(f"a dict batch needs a 'labels' entry (it has {', '.join(map(str, batch))}): "
                             "add one or pass unpack=lambda b: (inputs, targets)")
        return {k: v for k, v in batch.items() if k != key}, batch[key]
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise SuiteError(f"a batch must be (inputs, targets) or a dict with 'labels', got {type(batch).__name__}: "
                     "pass unpack=lambda b: (inputs, targets)")


def model_outputs(out) -> torch.Tensor:
    """The output tensor of a model's return value: itself, its ``.logits``, a dict's ``logits`` or a tuple's first."""
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict) and "logits" in out:
        return out["logits"]
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and torch.is_tensor(out[0]):
        return out[0]
    raise SuiteError(f"the model returned {type(out).__name__}, not a tensor of outputs: pass "
                     "forward=lambda model, inputs: <the logits>")


def tensors_in(x) -> list[torch.Tensor]:
    """Every tensor in ``x``: a tensor, or dicts, tuples and lists of them (nested)."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        return [t for v in x.values() for t in tensors_in(v)]
    if isinstance(x, (tuple, list)):
        return [t for v in x for t in tensors_in(v)]
    return []


def _to(x, device: torch.device):
    if torch.is_tensor(x):
        return x.to(device)
    if isinstance(x, dict):
        return {k: _to(v, device) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_to(v, device) for v in x)
    return x


def slice_inputs(x, n: int, stop: int):
    """The first ``stop`` samples of inputs (a tensor, or a dict/tuple of tensors with ``n`` rows)."""
    if torch.is_tensor(x):
        return x[:stop] if x.dim() and x.shape[0] == n else x
    if isinstance(x, dict):
        return {k: slice_inputs(v, n, stop) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(slice_inputs(v, n, stop) for v in x)
    return x


def versions(x) -> tuple:
    """Version counters of every tensor in ``x``: an in-place change shows as a new tuple."""
    return tuple(t._version for t in tensors_in(x))


class OperatorData:
    """Batches ``[(inputs, targets), ...]`` read once, with each batch's loss denominator.

    ``denominators[b]`` is what batch ``b``'s mean loss divides by (:meth:`curvature.losses.Loss.denominator`);
    ``weights[b]`` its factor in the dataset loss; ``num_samples`` the number of samples (rows of targets).
    """

    def __init__(self, source: Iterable, loss, unpack: Optional[Callable] = None,
                 device: Optional[torch.device] = None):
        self.notes: list[str] = []
        if isinstance(source, (list, tuple)) and unpack is None and all(
                isinstance(b, (list, tuple)) and len(b) == 2 and torch.is_tensor(b[1]) for b in source):
            batches = list(source)  # the caller's tensors: cached primals recognise them by identity
        else:
            if _shuffles(source):
                self.notes.append("the DataLoader shuffles: its batches were read once, in the order of "
                                  "that pass, and every product uses them")
            batches = [(unpack or default_unpack)(b) for b in source]
            if not isinstance(source, (list, tuple)):
                self.notes.append(f"read {len(batches)} batches once from a {type(source).__name__}")
        if device is not None and any(t.device != device for b in batches for t in tensors_in(b)):
            batches = [(_to(x, device), _to(y, device)) for x, y in batches]
            self.notes.append(f"batches moved to {device}")
        self.batches = batches
        self.num_samples = sum(int(y.shape[0]) for _, y in batches)
        if self.num_samples == 0:
            raise SuiteError("the operator's data is empty: check dataset.num_subsamples")
        self.denominators = [loss.denominator(y) for _, y in batches]
        total = sum(self.denominators)
        if loss.reduction == "mean" and not total > 0:
            raise SuiteError("the loss counts nothing in the operator's data (every target is ignore_index?)")
        self.total = total
        self.weights = [loss.batch_weight(d, total) for d in self.denominators]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


def _shuffles(source) -> bool:
    sampler = getattr(source, "sampler", None)
    return sampler is not None and isinstance(sampler, torch.utils.data.RandomSampler)
