"""A researcher's own model through the Python API: the loss objects, shapes and data sources users hold.

Ground truth by a route the operators do not use: the whole dataset as one batch through PyTorch's
own loss object (classes flattened by hand where PyTorch needs it), the dense Hessian by
``torch.autograd.functional.hessian`` of the flat weights, the dense GGN as ``J^T H_out J`` from the
explicit Jacobian of all outputs and the explicit Hessian of the loss in them (no closed forms).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.testing import assert_close
from torch.utils.data import DataLoader, TensorDataset

from curvature.errors import SuiteError
from curvature.operators import GGNOperator, HessianOperator

DT = torch.float64


# --- models a user brings -----------------------------------------------------------------
class TinyTransformer(nn.Module):
    """A classifier from torch's own attention, LayerNorm and GELU (residual blocks, mean pooling)."""

    def __init__(self, vocab=7, width=4, heads=2, classes=3, causal=False, lm=False):
        super().__init__()
        self.embed = nn.Embedding(vocab, width)
        self.pos = nn.Parameter(0.1 * torch.randn(6, width))
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.GELU(), nn.Linear(2 * width, width))
        self.head = nn.Linear(width, vocab if lm else classes)
        self.causal, self.lm = causal, lm

    def forward(self, idx):
        t = idx.shape[1]
        h = self.embed(idx) + self.pos[:t]
        mask = torch.triu(torch.ones(t, t, dtype=torch.bool, device=idx.device), 1) if self.causal else None
        a = self.norm1(h)
        h = h + self.attn(a, a, a, attn_mask=mask, need_weights=False)[0]
        h = h + self.mlp(self.norm2(h))
        return self.head(h) if self.lm else self.head(h.mean(1))


class SDPAModel(nn.Module):
    """Attention written with F.scaled_dot_product_attention (causal), as user transformers do."""

    def __init__(self, dim=6, classes=3):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, classes)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.out(F.scaled_dot_product_attention(q, k, v, is_causal=True).mean(1))


# --- the independent ground truth ------------------------------------------------------------
def flat_forward(model):
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    shapes, sizes = [p.shape for _, p in named], [p.numel() for _, p in named]
    w0 = torch.cat([p.detach().reshape(-1) for _, p in named])

    def forward(w, inputs):
        chunks = torch.split(w, sizes)
        params = {n: c.reshape(s) for (n, _), c, s in zip(named, chunks, shapes)}
        out = functional_call(model, params, (), inputs) if isinstance(inputs, dict) else \
            functional_call(model, params, (inputs,))
        return out

    return w0, forward


def dense_truth(model, whole_loss, inputs):
    """(H, G) of ``whole_loss(outputs of all data)`` in the flat weights, in float64."""
    model.eval()
    w0, forward = flat_forward(model)
    with sdpa_kernel(SDPBackend.MATH):
        hess = torch.autograd.functional.hessian(lambda w: whole_loss(forward(w, inputs)), w0, vectorize=True)
        z0 = forward(w0, inputs).detach()
        jac = torch.autograd.functional.jacobian(lambda w: forward(w, inputs).reshape(-1), w0, vectorize=True)
        h_out = torch.autograd.functional.hessian(lambda z: whole_loss(z.reshape(z0.shape)), z0.reshape(-1),
                                                  vectorize=True)
    return hess, jac.T @ h_out @ jac


def assert_products(op, dense, k=3):
    v = torch.randn(op.num_params, k, dtype=DT)
    got, want = op.matvec(v), dense @ v
    rel = float((got - want).norm() / want.norm())
    assert rel < 1e-8, f"{type(op).__name__} ({op.engine}): relative error {rel:.2e}"


def token_data(n=10, t=5, vocab=7, seed=0, ignore=None):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(0, vocab, (n, t), generator=gen)
    y = torch.randint(0, vocab, (n, t), generator=gen)
    if ignore is not None:
        y[torch.rand(n, t, generator=gen) < 0.3] = ignore
        y[0] = ignore  # one sample counts no token at all
    return x, y


# --- the held-out cases -----------------------------------------------------------------------
@pytest.mark.parametrize("bn_mode", ["eval", "train"])
def test_transformer_classifier_with_a_loss_object_and_a_dataloader(bn_mode):
    torch.manual_seed(0)
    model = TinyTransformer().to(DT)
    x, _ = token_data()
    y = torch.randint(0, 3, (10,), generator=torch.Generator().manual_seed(1))
    loss = nn.CrossEntropyLoss()
    hess, ggn = dense_truth(model, lambda out: loss(out, y), x)
    loader = DataLoader(TensorDataset(x, y), batch_size=4)  # uneven batches 4, 4, 2
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        op = cls(model, nn.CrossEntropyLoss(), loader, bn_mode=bn_mode)
        assert op.forward_ad, op.forward_ad_reason  # math attention kernels: forward mode works too
        assert_products(op, dense)


def test_causal_language_model_token_cross_entropy_with_ignore_index():
    torch.manual_seed(1)
    model = TinyTransformer(causal=True, lm=True).to(DT)
    x, y = token_data(ignore=-1)
    loss = nn.CrossEntropyLoss(ignore_index=-1)
    hess, ggn = dense_truth(model, lambda out: loss(out.reshape(-1, 7), y.reshape(-1)), x)
    batches = [(x[:3], y[:3]), (x[3:8], y[3:8]), (x[8:], y[8:])]  # counted tokens differ per batch
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        op = cls(model, nn.CrossEntropyLoss(ignore_index=-1), batches)
        assert_products(op, dense)


@pytest.mark.parametrize("options", [dict(label_smoothing=0.1), dict(weight="w"), dict(reduction="sum"),
                                     dict(weight="w", label_smoothing=0.2, ignore_index=2)])
def test_cross_entropy_options_on_a_chain(options):
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 4)).to(DT)
    gen = torch.Generator().manual_seed(3)
    x, y = torch.randn(11, 5, generator=gen, dtype=DT), torch.randint(0, 4, (11,), generator=gen)
    options = {k: (torch.rand(4, generator=gen, dtype=DT) + 0.5 if v == "w" else v) for k, v in options.items()}
    loss = nn.CrossEntropyLoss(**options)
    hess, ggn = dense_truth(model, lambda out: loss(out, y), x)
    batches = [(x[:4], y[:4]), (x[4:], y[4:])]
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        op = cls(model, nn.CrossEntropyLoss(**options), batches, bn_mode="eval")
        assert_products(op, dense)


def test_mse_loss_object_with_regression_targets():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(3, 5), nn.Sigmoid(), nn.Linear(5, 2)).to(DT)
    gen = torch.Generator().manual_seed(4)
    x, y = torch.randn(9, 3, generator=gen, dtype=DT), torch.randn(9, 2, generator=gen, dtype=DT)
    for reduction in ("mean", "sum"):
        loss = nn.MSELoss(reduction=reduction)
        hess, ggn = dense_truth(model, lambda out: loss(out, y), x)
        for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
            assert_products(cls(model, nn.MSELoss(reduction=reduction), [(x[:5], y[:5]), (x[5:], y[5:])]), dense)


def test_hugging_face_style_dict_batches_with_a_forward_hook():
    torch.manual_seed(4)
    model = TinyTransformer(lm=True).to(DT)
    x, y = token_data(n=6, ignore=-100)
    hess, ggn = dense_truth(model, lambda out: F.cross_entropy(out.reshape(-1, 7), y.reshape(-1)), x)
    batches = [{"input_ids": x[:2], "labels": y[:2]}, {"input_ids": x[2:], "labels": y[2:]}]
    forward = lambda model, inputs: model(inputs["input_ids"])  # noqa: E731
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        op = cls(model, nn.CrossEntropyLoss(), batches, forward=forward)
        assert op.engine == "autograd" and "forward hook" in op.layerwise_reason
        assert_products(op, dense)


def test_scaled_dot_product_attention_model():
    torch.manual_seed(5)
    model = SDPAModel().to(DT)
    gen = torch.Generator().manual_seed(5)
    x, y = torch.randn(8, 4, 6, generator=gen, dtype=DT), torch.randint(0, 3, (8,), generator=gen)
    hess, ggn = dense_truth(model, lambda out: F.cross_entropy(out, y), x)
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        assert_products(cls(model, F.cross_entropy, [(x[:3], y[:3]), (x[3:], y[3:])]), dense)


# --- routes without forward mode, and models that cannot be differentiated twice ---------------
class _NoForwardMode(torch.autograd.Function):
    """softplus with a twice-differentiable backward and no forward-mode formula (like fused kernels)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return F.softplus(x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * torch.sigmoid(x)


class _BackwardOfExp(torch.autograd.Function):
    """exp's backward as a kernel with no derivative of its own (like fused kernels without double backward)."""

    @staticmethod
    def forward(ctx, g, x):
        return g * x.exp()

    @staticmethod
    def backward(ctx, gg):
        raise NotImplementedError("the derivative of this kernel's backward is not implemented")


class _FirstOrderOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return x.exp()

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return _BackwardOfExp.apply(g, x)


class Wrap(nn.Module):
    def __init__(self, fn):
        super().__init__()
        self.fn = fn

    def forward(self, x):
        return self.fn.apply(x)


def test_a_kernel_without_forward_mode_takes_the_reverse_routes():
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 5), Wrap(_NoForwardMode), nn.Linear(5, 3)).to(DT)
    gen = torch.Generator().manual_seed(6)
    x, y = torch.randn(7, 4, generator=gen, dtype=DT), torch.randint(0, 3, (7,), generator=gen)
    hess, ggn = dense_truth(model, lambda out: F.cross_entropy(out, y), x)
    for cls, dense in ((HessianOperator, hess), (GGNOperator, ggn)):
        for cache in ("none", "all"):
            op = cls(model, F.cross_entropy, [(x, y)], cache=cache)
            assert not op.forward_ad and "jvp" in op.forward_ad_reason
            assert_products(op, dense)
    with pytest.raises(SuiteError, match="hvp_mode=forward_over_reverse needs forward-mode AD.*hvp_mode=auto"):
        HessianOperator(model, F.cross_entropy, [(x, y)], mode="forward_over_reverse")


def test_a_module_that_cannot_be_differentiated_twice_is_named_before_any_long_work():
    model = nn.Sequential(nn.Linear(4, 5), Wrap(_FirstOrderOnly), nn.Linear(5, 3)).to(DT)
    x, y = torch.randn(64, 4, dtype=DT), torch.randint(0, 3, (64,))
    batches = [(x, y)] * 50
    start = time.perf_counter()
    with pytest.raises(SuiteError) as info:
        HessianOperator(model, F.cross_entropy, batches)
    assert time.perf_counter() - start < 10  # on the first batch, not after a pass over the data
    message = str(info.value)
    assert "\n" not in message and "module '1' (Wrap)" in message and "twice" in message


def test_a_shape_bug_in_the_users_model_is_one_line_naming_the_module():
    class Buggy(nn.Module):
        def __init__(self):
            super().__init__()
            self.body = nn.Sequential(nn.Linear(4, 6), nn.ReLU())
            self.head = nn.Linear(5, 3)  # wrong input width

        def forward(self, x):
            return self.head(self.body(x))

    x, y = torch.randn(8, 4, dtype=DT), torch.randint(0, 3, (8,))
    with pytest.raises(SuiteError) as info:
        GGNOperator(Buggy().to(DT), F.cross_entropy, [(x, y)])
    message = str(info.value)
    assert "\n" not in message and "module 'head' (Linear)" in message and "forward raises" in message


def test_dataset_weighting_counts_tokens_not_samples():
    """Two batches with 1 and 9 counted tokens: the dataset loss is the mean over the 10 tokens."""
    torch.manual_seed(7)
    model = TinyTransformer(lm=True).to(DT)
    x, y = token_data(n=4, ignore=None)
    y = y.clone()
    y[:2] = -100
    y[0, 0] = 3  # batch 1: one counted token; batch 2: every token of its two samples (10)
    op = HessianOperator(model, nn.CrossEntropyLoss(), [(x[:2], y[:2]), (x[2:], y[2:])])
    assert op.data.denominators == [1.0, 10.0]
    assert_close(torch.tensor(op.data.weights, dtype=DT), torch.tensor([1 / 11, 10 / 11], dtype=DT))
    assert math.isclose(sum(op.data.weights), 1.0)


def test_evaluation_with_a_users_mean_loss_callable_is_the_per_sample_mean():
    from curvature.training import evaluate

    class Data:
        def __init__(self, x, y):
            self.x, self.y = x, y

        def batches(self, batch_size, dtype=None):
            for i in range(0, len(self.y), batch_size):
                yield self.x[i:i + batch_size], self.y[i:i + batch_size]

    torch.manual_seed(8)
    model = nn.Linear(3, 4).to(DT)
    x, y = torch.randn(7, 3, dtype=DT), torch.randint(0, 4, (7,))
    users_loss = lambda out, t: F.cross_entropy(out, t)  # noqa: E731  (a callable the suite does not know)
    got = evaluate(model, Data(x, y), batch_size=3, dtype=DT, loss_fn=users_loss)["loss"]
    assert math.isclose(got, float(F.cross_entropy(model(x), y).detach()), rel_tol=1e-12)


def test_the_cli_loss_settings_reach_the_operators(tmp_path):
    """`operator.label_smoothing` and a loss `_target_` with the same option give the same operator (equal
    Ritz values), and one that differs from the plain loss's (the option is not dropped)."""
    import numpy as np

    from experiments.run import dispatch
    from tests.conftest import make_cfg

    base = ["dataset=digits", "model=mlp", "model.hidden=[8]", "dataset.num_subsamples=100",
            "analysis.num_steps=8", "analysis.exact_max_dim=0", "dtype=float64"]
    runs = {"plain": [], "named": ["operator.label_smoothing=0.1"],
            "target": ["operator.loss={_target_:torch.nn.CrossEntropyLoss,label_smoothing:0.1}"]}
    ritz = {}
    for name, extra in runs.items():
        dispatch(make_cfg(tmp_path / name, [*base, *extra]))
        ritz[name] = np.load(tmp_path / name / "arrays.npz")["hessian_ritz_values"]
    np.testing.assert_allclose(ritz["named"], ritz["target"], rtol=1e-12, atol=0)
    assert not np.allclose(ritz["plain"], ritz["named"], rtol=1e-6)
