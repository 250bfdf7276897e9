"""Diagonal blocks of a curvature operator: the Hessian / GGN restricted to groups of parameters.

``block_groups(model, "layer")`` names one block per module that owns parameters directly (a
Linear's weight and bias together, a MultiheadAttention's packed q/k/v projection as one); a list of
glob groups names one block per group. :class:`BlockOperator` multiplies by the block ``H_BB`` of an
operator ``H`` through ``H``'s own products (pad with zeros, multiply, restrict), so every block of
one operator shares its per-batch primal cache: one forward (and backward) per batch for all blocks.

    op = HessianOperator(model, loss_fn, batches)
    for name, names in block_groups(model, "layer", op.names).items():
        result = lanczos(BlockOperator(op, names).matvec, ...)
"""

from __future__ import annotations

import fnmatch
from itertools import combinations
from typing import Optional, Sequence, Union

import torch
from torch import nn

from curvature.errors import SuiteError
from curvature.spectrum import SpectralMeasure

BlockSpec = Union[str, Sequence[Sequence[str]]]


def block_groups(model: nn.Module, spec: BlockSpec = "layer",
                 names: Optional[Sequence[str]] = None) -> dict[str, list[str]]:
    """``{block name: [parameter names]}`` in model order, among ``names`` (default: every trainable one).

    ``"layer"``: one block per module owning parameters, named by the module (``"(root)"`` for the
    model's own). A list of lists of glob patterns: one block per list, named by its patterns joined
    with ``|``; a list that matches nothing is a one-line error. Groups may overlap (each block is a
    principal submatrix on its own).
    """
    allowed = [n for n, p in model.named_parameters() if p.requires_grad] if names is None else list(names)
    order = {n: i for i, n in enumerate(allowed)}
    groups: dict[str, list[str]] = {}
    if spec == "layer":
        for module_name, module in model.named_modules():
            own = [f"{module_name}.{n}" if module_name else n for n, _ in module.named_parameters(recurse=False)]
            own = [n for n in own if n in order]
            if own:
                groups[module_name or "(root)"] = sorted(own, key=order.__getitem__)
        return groups
    if isinstance(spec, str) or not spec:
        raise SuiteError(f"blocks must be 'layer' or a list of lists of glob patterns, got {spec!r}")
    for patterns in spec:
        chosen = [n for n in allowed if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
        if not chosen:
            raise SuiteError(f"block {list(patterns)} matches no parameter; parameters are named like "
                             f"{', '.join(allowed[:4])}, ...")
        groups["|".join(patterns)] = chosen
    return groups


class BlockOperator:
    """The diagonal block ``H_BB`` (|B| x |B|) of a curvature operator ``H`` over parameters ``B``.

    ``H_BB v = (H [0 .. v .. 0])_B``: ``v`` placed at B's entries of a zero vector of the parent's
    size, multiplied by the parent (its batching, reduction and primal cache), restricted to B's
    entries. ``names`` must be among ``parent.names``; B's entries follow the parent's order.
    """

    def __init__(self, parent, names: Sequence[str]):
        offsets, start = {}, 0
        for name, size in zip(parent.names, parent.sizes):
            offsets[name] = (start, size)
            start += size
        missing = [n for n in names if n not in offsets]
        if missing:
            raise SuiteError(f"block parameters {missing[:3]} are not among the operator's parameters")
        ordered = [n for n in parent.names if n in set(names)]
        self.parent = parent
        self.names = ordered
        self.indices = torch.cat([torch.arange(offsets[n][0], sum(offsets[n])) for n in ordered]).to(parent.device)
        self.num_params = int(self.indices.numel())
        self.dtype, self.device = parent.dtype, parent.device

    def matvec(self, v: torch.Tensor) -> torch.Tensor:
        if v.shape[0] != self.num_params:
            raise ValueError(f"vector has {v.shape[0]} entries, the block has {self.num_params}")
        single = v.dim() == 1
        block = v.unsqueeze(1) if single else v
        full = torch.zeros(self.parent.num_params, block.shape[1], dtype=self.dtype, device=self.device)
        full[self.indices] = block.to(dtype=self.dtype, device=self.device)
        out = self.parent.matvec(full)[self.indices]
        return out.squeeze(1) if single else out

    __matmul__ = matvec


def normalised(measure: SpectralMeasure) -> SpectralMeasure:
    """The measure with its nodes divided by its largest |node| (support in [-1, 1]; unchanged if all 0).

    Compares the *shape* of block spectra whose scales differ by orders of magnitude (an embedding's
    curvature against a LayerNorm's), as the block-heterogeneity question asks.
    """
    scale = float(measure.nodes.abs().max())
    return SpectralMeasure(measure.nodes / scale if scale > 0 else measure.nodes, measure.weights)


def mean_pairwise_wasserstein(measures: Sequence[SpectralMeasure]) -> float:
    """Mean 1-Wasserstein distance over all pairs of the :func:`normalised` measures (in [0, 2]); 0 for one."""
    shapes = [normalised(m) for m in measures]
    pairs = list(combinations(shapes, 2))
    return sum(a.wasserstein(b) for a, b in pairs) / len(pairs) if pairs else 0.0
