"""Wall-clock timing that waits for the GPU: what the benchmarks and the step-cost measurement share."""

from __future__ import annotations

import statistics
import time
from typing import Callable, Optional

import torch


def median_seconds(fn: Callable[[], object], repeats: int, device: torch.device) -> float:
    """Median wall time of ``repeats`` calls of ``fn`` after one warm-up call (first-call set-up of
    torch.func transforms and the allocator), synchronising CUDA around each call."""
    return interleaved_median_seconds({"fn": fn}, repeats, device)["fn"]


def interleaved_median_seconds(jobs: dict[str, Callable[[], object]], repeats: int, device: torch.device,
                               after: Optional[Callable[[str], None]] = None) -> dict[str, float]:
    """Median wall time of each job over ``repeats`` rounds that call every job in turn, after one
    warm-up round: a slow spell of a shared machine hits every job alike instead of one of them.
    CUDA is synchronised around each call; with ``after``, CUDA's peak-memory counter is reset before
    each call and ``after(label)`` runs after it (e.g. to read that call's peak)."""
    times: dict[str, list] = {label: [] for label in jobs}
    for round_ in range(repeats + 1):
        for label, fn in jobs.items():
            if device.type == "cuda":
                torch.cuda.synchronize(device)
                if after is not None:
                    torch.cuda.reset_peak_memory_stats(device)
            start = time.perf_counter()
            fn()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            if round_:
                times[label].append(time.perf_counter() - start)
            if after is not None:
                after(label)
    return {label: statistics.median(t) for label, t in times.items()}
