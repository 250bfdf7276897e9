"""A tiny GPT: a causal transformer language model built from torch's own modules.

Token and learned position embeddings, ``depth`` pre-LayerNorm blocks (causal multi-head
self-attention, then a GELU MLP of hidden width ``4 * width``, each added back to the residual
stream), a final LayerNorm and a linear head: the GPT-2 layout (Radford et al., 2019) at a size that
trains on a CPU. Parameters: ``V W + T W + depth (12 W^2 + 13 W) + 2 W + W V + V`` for vocabulary
``V``, context ``T`` and width ``W`` (no weight tying, so every matrix is its own curvature block).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel


class Block(nn.Module):
    """``x + attention(LN(x))``, then ``x + MLP(LN(x))``; attention sees only earlier positions."""

    def __init__(self, width: int, heads: int, dropout: float):
        super().__init__()
        self.ln_attention = nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, dropout=dropout, batch_first=True)
        self.ln_mlp = nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width),
                                 nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.ln_attention(x)
        x = x + self.attention(h, h, h, attn_mask=mask, need_weights=False)[0]
        return x + self.mlp(self.ln_mlp(x))


class GPTTiny(nn.Module):
    """Logits ``(N, T, vocab_size)`` of the next token at every position of ``(N, T)`` token ids, T <= context.

    The logits at position ``t`` depend on tokens ``0..t`` only (a boolean causal mask: a masked
    score is ``-inf`` and gets exactly zero attention weight).
    """

    def __init__(self, vocab_size: int, context: int = 32, width: int = 64, depth: int = 2, heads: int = 4,
                 dropout: float = 0.0):
        super().__init__()
        for key, value in (("vocab_size", vocab_size), ("context", context), ("width", width),
                           ("depth", depth), ("heads", heads)):
            if int(value) != value or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if width % heads:
            raise ValueError(f"width {width} must be a multiple of heads {heads} (each head takes width / heads)")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout!r}")
        self.context = int(context)
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.dropout = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(depth))
        self.ln_final = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)
        # GPT-2's initialisation: N(0, 0.02) matrices, zero biases; LayerNorms keep (1, 0). torch's
        # default N(0, 1) embeddings would swamp the residual stream at this width.
        for name, p in self.named_parameters():
            if p.dim() >= 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias"):
                nn.init.zeros_(p)

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        positions, mask = causal_positions(idx.shape, idx.dtype, idx.device, self.context)
        x = self.dropout(self.token(idx) + self.position(positions))
        # The fused attention kernels (flash on CPU and CUDA, memory-efficient) have neither a double
        # backward nor forward-mode AD, so every Hessian-vector product would fail through them; the
        # math kernel has both and, at these sizes, trains as fast (measured on CPU, torch 2.13).
        with sdpa_kernel(SDPBackend.MATH):
            for block in self.blocks:
                x = block(x, mask)
        return self.head(self.ln_final(x))


@torch.fx.wrap
def causal_positions(shape: torch.Size, dtype: torch.dtype, device: torch.device, context: int) -> tuple:
    """The positions ``0..T-1`` and the ``(T, T)`` boolean causal mask (True: not seen) for token ids of
    ``shape`` ``(N, T)``; a ValueError for ids that are not ``(N, T)`` integers or longer than ``context``.

    A function of the ids' shape, dtype and device only, wrapped for ``torch.fx``: a traced GPTTiny calls
    it as one node of constant arguments, which the graph plan (:mod:`curvature.graph_plan`) evaluates as
    a constant, so the checks' branches never see a traced value.
    """
    if len(shape) != 2 or dtype.is_floating_point:
        raise ValueError(f"GPTTiny takes (N, T) integer token ids, got {dtype} of shape {tuple(shape)}")
    length = shape[1]
    if length > context:
        raise ValueError(f"a sequence of {length} tokens is longer than the context of {context}")
    positions = torch.arange(length, device=device)
    return positions, torch.ones(length, length, dtype=torch.bool, device=device).triu(1)
