"""The graph plan through ``nn.MultiheadAttention`` (self-attention rule) and constant graph nodes (positions,
masks): Hessian and GGN products equal dense float64 matrices built by another route.

Ground truth: the whole dataset as one batch (so the batch weighting is not taken from the suite),
the Hessian by ``torch.autograd.functional.hessian`` of the loss in the flat weights, the GGN as
``J^T H_z J`` from the explicit Jacobian of all logits and the explicit Hessian of the loss in them.
"""

from __future__ import annotations

import fnmatch
from functools import lru_cache

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from curvature.functional import curvature_mode
from curvature.graph_plan import GraphPlan
from curvature.layerwise import build_plan
from curvature.losses import CrossEntropy
from curvature.models import GPTTiny
from curvature.operators import GGNOperator, HessianOperator, make_operator
from curvature.routes import layerwise_error

DT = torch.float64


class AttentionClassifier(nn.Module):
    """Token and position embeddings, one pre-LayerNorm block (self-attention with a ``mask`` of kind
    none / bool / float, then a GELU MLP, each added back) and a linear head on the mean over positions."""

    def __init__(self, mask="none", bias=True, vocab=7, width=6, heads=2, classes=3, context=5):
        super().__init__()
        self.mask = mask
        self.token, self.position = nn.Embedding(vocab, width), nn.Embedding(context, width)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = nn.MultiheadAttention(width, heads, bias=bias, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, classes)

    def forward(self, idx):
        positions = torch.arange(idx.shape[1], device=idx.device)  # constants of the graph
        h = self.token(idx) + self.position(positions)
        mask = None
        if self.mask == "bool":  # every position sees itself and the next one only
            mask = (positions[None, :] - positions[:, None]).abs() > 1
        elif self.mask == "float":  # a distance penalty (ALiBi-like), finite everywhere
            mask = -0.7 * (positions[None, :] - positions[:, None]).abs().to(h.dtype)
        a = self.norm1(h)
        h = h + self.attention(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


def gpt():
    """Two blocks of 2 heads of width 2 (583 parameters; the dense Hessian is built by P products)."""
    return GPTTiny(7, context=6, width=4, depth=2, heads=2)


#: model maker, targets per position (a language model) or per sequence, parameter subsets (None: all)
CASES = {
    "gpt_tiny": (gpt, True, [None, ["blocks.0.attention.*", "position.weight", "blocks.1.ln_mlp.bias",
                                     "head.bias"]]),
    "classifier": (AttentionClassifier, False, [None, ["token.weight", "attention.out_proj.*"]]),
    "classifier_float_mask": (lambda: AttentionClassifier("float"), False, [None]),
    "classifier_bool_mask": (lambda: AttentionClassifier("bool"), False, [None, ["attention.in_proj_*"]]),
    "classifier_no_bias": (lambda: AttentionClassifier(bias=False), False, [None]),
}


def data(lm: bool, sizes=(3, 4, 2), length=5, vocab=7, classes=3):
    """Uneven batches of token ids; targets per position (vocabulary) or per sequence (classes)."""
    gen = torch.Generator().manual_seed(0)
    return [(torch.randint(0, vocab, (n, length), generator=gen),
             torch.randint(0, vocab, (n, length), generator=gen) if lm else torch.randint(0, classes, (n,),
                                                                                           generator=gen))
            for n in sizes]


@lru_cache(maxsize=None)
def model(key):
    torch.manual_seed(0)
    net = CASES[key][0]().to(DT)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # away from GPT-2's small initialisation, so every term of the Hessian matters
        for p in net.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=gen, dtype=DT))
    return net


@lru_cache(maxsize=None)
def dense(key, subset):
    """(Hessian, GGN) of the mean loss over all data in the selected parameters (flat, float64)."""
    net, lm = model(key), CASES[key][1]
    inputs, targets = (torch.cat(t) for t in zip(*data(lm)))
    names = [n for n, _ in net.named_parameters() if subset is None or n in subset]
    params = dict(net.named_parameters())
    sizes = [params[n].numel() for n in names]

    def logits(w):
        chunks = dict(zip(names, (c.reshape(params[n].shape) for n, c in zip(names, torch.split(w, sizes)))))
        return functional_call(net, {**{n: p.detach() for n, p in params.items()}, **chunks}, (inputs,))

    def loss(z):
        return F.cross_entropy(z.reshape(-1, z.shape[-1]), targets.reshape(-1))

    w0 = torch.cat([params[n].detach().reshape(-1) for n in names])
    with curvature_mode(net, "eval"):
        hessian = torch.autograd.functional.hessian(lambda w: loss(logits(w)), w0, vectorize=True)
        z0 = logits(w0).detach()
        jac = torch.autograd.functional.jacobian(lambda w: logits(w).reshape(-1), w0, vectorize=True)
        h_z = torch.autograd.functional.hessian(lambda z: loss(z.reshape(z0.shape)), z0.reshape(-1), vectorize=True)
    return hessian, jac.T @ h_z @ jac


def _subset(key, patterns):
    if patterns is None:
        return None
    return tuple(n for n, _ in model(key).named_parameters() if any(fnmatch.fnmatchcase(n, p) for p in patterns))


@pytest.mark.parametrize("name", ["hessian", "ggn"])
@pytest.mark.parametrize("key", list(CASES))
def test_attention_products_equal_the_dense_matrices(key, name):
    net, lm, subsets = model(key), CASES[key][1], CASES[key][2]
    for patterns in subsets:
        exact = dense(key, _subset(key, patterns))[0 if name == "hessian" else 1]
        op = make_operator(name, net, CrossEntropy(), data(lm), bn_mode="eval", params=patterns, layerwise=True)
        assert op.engine == "layerwise" and isinstance(op.plan, GraphPlan)
        v = torch.randn(op.num_params, 2, dtype=DT, generator=torch.Generator().manual_seed(2))
        for _ in range(2):  # the second round reuses the cached primal (and the attention's backward terms)
            torch.testing.assert_close(op.matvec(v), exact @ v, rtol=1e-8, atol=1e-10 * float(exact.abs().max()))


def test_gpt_tiny_operators_take_the_layerwise_path_and_pass_their_own_check():
    """float32 GPT, default settings: the plan is built, and the operators' float64 first-batch check
    (8 samples against autograd's product) accepts it."""
    torch.manual_seed(0)
    net = GPTTiny(11, context=8, width=16, depth=2, heads=4)
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 11, (6, 8), generator=gen), torch.randint(0, 11, (6, 8), generator=gen))
               for _ in range(2)]
    for cls in (HessianOperator, GGNOperator):
        op = cls(net, CrossEntropy(), batches, bn_mode="eval")
        assert op.engine == "layerwise", op.layerwise_reason
        assert layerwise_error(op) < 1e-12
        out = op.matvec(torch.randn(op.num_params, dtype=torch.float32))
        assert out.dtype == torch.float32 and torch.isfinite(out).all()


def test_gpt_tiny_keeps_its_errors_for_bad_input():
    net = GPTTiny(11, context=8, width=8, depth=1, heads=2)
    with pytest.raises(ValueError, match="integer token ids, got torch.float32 of shape \\(2, 3\\)"):
        net(torch.randn(2, 3))
    with pytest.raises(ValueError, match="integer token ids, got torch.int64 of shape \\(4,\\)"):
        net(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="9 tokens is longer than the context of 8"):
        net(torch.zeros(2, 9, dtype=torch.long))


class Attending(nn.Module):
    """Attention called in a way the rule refuses (``how``); ``side`` makes a key of its own where needed."""

    def __init__(self, how):
        super().__init__()
        self.how = how
        kdim = 3 if how == "kdim" else None
        self.attention = nn.MultiheadAttention(4, 2, batch_first=how != "seq_first", kdim=kdim, vdim=kdim)
        self.side = nn.Linear(4, kdim or 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x):
        kwargs = dict(need_weights=self.how == "weights")
        if self.how == "padding":
            kwargs["key_padding_mask"] = torch.arange(x.shape[1]).expand(x.shape[0], -1) < 0  # nothing padded
        side = self.side(x)
        key = side if self.how in ("cross", "kdim") else x
        out, weights = self.attention(x, key, key, **kwargs)
        if self.how == "weights":
            out = out + weights.sum(-1, keepdim=True)
        return self.head(out.mean(1)) + 0.0 * side.mean((1, 2)).unsqueeze(1)


@pytest.mark.parametrize("how,reason", [
    ("padding", "key_padding_mask"), ("kdim", "kdim/vdim"), ("cross", "not self-attention"),
    ("seq_first", "batch_first=False"), ("weights", "reads entry 1")])
def test_unsupported_attention_falls_back_with_the_reason(how, reason):
    net = Attending(how).to(DT)
    plan, why = build_plan(net, CrossEntropy(), [n for n, _ in net.named_parameters()], "eval")
    assert plan is None and reason in why, why
    op = HessianOperator(net, CrossEntropy(), [(torch.randn(3, 5, 4, dtype=DT), torch.randint(0, 3, (3,)))])
    assert op.engine == "autograd" and reason in op.layerwise_reason
