"""The network as the curvature operators differentiate it: which parameters, in which module modes.

:func:`select_parameters` names the trainable parameters a curvature matrix is taken in;
:func:`curvature_mode` puts the network in the state products run in (dropout off, BatchNorm with batch
or running statistics and no running-statistic updates, attention through twice-differentiable kernels);
:class:`Hooked` lets ``functional_call`` swap the weights of a model called through a user's forward.
"""

from __future__ import annotations

import fnmatch
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

from curvature.errors import SuiteError

BN_MODES = ("train", "eval")


@contextmanager
def curvature_mode(model: nn.Module, bn_mode: str):
    """Dropout off; BatchNorm in batch-statistics (``train``) or running-statistics (``eval``) mode;
    attention through twice-differentiable kernels.

    In ``train`` mode running-statistic tracking is switched off for the duration, so BatchNorm
    normalises with batch statistics but writes nothing to its buffers: products are pure functions,
    as ``torch.func`` transforms need, and repeated products agree.
    """
    if bn_mode not in BN_MODES:
        raise ValueError(f"bn_mode must be 'train' or 'eval', got {bn_mode!r}")
    saved = [(m, m.training, getattr(m, "track_running_stats", None)) for m in model.modules()]
    fastpath = torch.backends.mha.get_fastpath_enabled()
    model.eval()
    if bn_mode == "train":
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.train()
                m.track_running_stats = False
    # Attention through the composite (math) kernels: the fused ones (flash / memory-efficient SDPA,
    # nn.MultiheadAttention's fast path) have neither forward-mode nor second derivatives.
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with sdpa_kernel(SDPBackend.MATH):
            yield model
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
        for m, training, tracking in saved:
            m.training = training
            if tracking is not None:
                m.track_running_stats = tracking


def select_parameters(model: nn.Module, patterns: Optional[Sequence[str]] = None) -> list[str]:
    """Names of the trainable parameters matching any glob pattern (all when ``patterns`` is None)."""
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if patterns:
        chosen = [n for n in names if any(fnmatch.fnmatchcase(n, pat) for pat in patterns)]
        if not chosen:
            raise SuiteError(f"no parameter matches {list(patterns)}; parameters are named like "
                             f"{', '.join(names[:4])}, ... (glob patterns, e.g. 'features.0.*')")
        return chosen
    return names


class Hooked(nn.Module):
    """A model called through a user's ``forward(model, inputs)``, so ``functional_call`` can swap its weights."""

    def __init__(self, model: nn.Module, forward: Callable):
        super().__init__()
        self.model = model
        self.hook = forward

    def forward(self, inputs):
        return self.hook(self.model, inputs)
