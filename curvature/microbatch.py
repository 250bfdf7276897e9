"""Out-of-memory fallback for per-batch curvature products: split the batch, recombine exactly.

A batch product of a mean-reduced loss is the size-weighted mean of the products of its parts:
with ``n = n_a + n_b``, ``H(batch) v = (n_a / n) H(a) v + (n_b / n) H(b) v``. So when a product
raises ``torch.OutOfMemoryError`` (``torch.cuda.OutOfMemoryError``) we halve the batch, recursively
until the parts fit, and recombine: the result equals the unsplit product up to rounding. This
holds when samples do not interact, which BatchNorm in batch-statistics mode breaks (its statistics
are over the batch), so such a model gets a one-line error asking for a smaller batch instead.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from curvature.errors import SuiteError

Product = Callable[[torch.Tensor, torch.Tensor], Any]


def split_product(product: Product, inputs: torch.Tensor, targets: torch.Tensor, *,
                  splittable: bool = True, record: Callable[[int, int], None] | None = None,
                  what: str = "batch") -> Any:
    """``product(inputs, targets)`` (a tensor or a dict of tensors), halving the batch on OOM.

    ``record(n, half)`` is called for every split of a batch of ``n`` samples. A batch of one
    sample that does not fit, or a batch that may not be split, is a :class:`SuiteError`.
    """
    try:
        return product(inputs, targets)
    except torch.OutOfMemoryError:
        pass  # leave the except block first, so the failed attempt's tensors can be freed
    n = int(targets.shape[0])
    if not splittable:
        raise SuiteError(f"out of memory in the curvature product of {what} ({n} samples); BatchNorm in "
                         "batch-statistics mode cannot be split exactly: lower operator.batch_size or "
                         "use operator.bn_mode=eval")
    if n <= 1:
        raise SuiteError(f"out of memory in the curvature product of {what} even for one sample: "
                         "use a smaller model, operator.params=[<a subset>] or a larger GPU")
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    half = n // 2
    if record is not None:
        record(n, half)
    first = split_product(product, inputs[:half], targets[:half], splittable=True, record=record, what=what)
    second = split_product(product, inputs[half:], targets[half:], splittable=True, record=record, what=what)
    return _combine(first, second, half / n, (n - half) / n)


def _combine(a: Any, b: Any, wa: float, wb: float) -> Any:
    if isinstance(a, dict):
        return {key: _combine(a[key], b[key], wa, wb) for key in a}
    return a * wa + b * wb


def has_batch_statistics(model: nn.Module, bn_mode: str) -> bool:
    """True when the products normalise with batch statistics (BatchNorm, ``bn_mode="train"``)."""
    return bn_mode == "train" and any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())


def operator_batch_product(op, index: int, inputs, targets, params: dict, vectors: dict) -> dict:
    """``op.batch_product`` with the OOM fallback; splits are kept in ``op.oom_splits``
    ({batch index: smallest micro-batch size}) for the results to report."""
    def record(n: int, half: int) -> None:
        if not op.__dict__.get("oom_splits") and hasattr(op, "stop_caching"):
            op.stop_caching()  # memory is short: drop cached batch graphs, recompute from now on
        splits = op.__dict__.setdefault("oom_splits", {})
        splits[index] = min(splits.get(index, n), half)

    return split_product(lambda x, y: op.batch_product(x, y, params, vectors), inputs, targets,
                         splittable=not has_batch_statistics(op.model, op.bn_mode), record=record,
                         what=f"batch {index}")


def describe_splits(op) -> str | None:
    """A results note when products fell back to micro-batches, else None."""
    splits = getattr(op, "oom_splits", None)
    if not splits:
        return None
    smallest = min(splits.values())
    return (f"CUDA out of memory: {len(splits)} batch(es) were split into micro-batches (smallest "
            f"{smallest} samples) and recombined by size; same products up to rounding")
