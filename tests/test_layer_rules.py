"""Layer rules added to the layer-wise products, and losses reaching them as objects.

The smooth activations (GELU exact and tanh, SiLU, Softplus with its linear part) and LeakyReLU
against dense float64 Hessians and GGNs; loss modules with class weights, label smoothing and sum
reduction against autograd's products of the same operator.
"""

import pytest
import torch
from torch import nn
from torch.func import functional_call

from curvature.dense import dense_ggn, dense_hessian
from curvature.layerwise import build_plan
from curvature.losses import loss_rule
from curvature.operators import make_operator

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

ACTIVATIONS = {
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
    "softplus": nn.Softplus,
    "softplus_linear_part": lambda: nn.Softplus(beta=2.0, threshold=0.5),  # many inputs past the threshold
    "leaky_relu": lambda: nn.LeakyReLU(0.1),
}


def mlp(act):
    return nn.Sequential(nn.Flatten(), nn.Linear(8, 6), act(), nn.Linear(6, 5), act(), nn.Linear(5, 3))


def conv_chain(act):
    return nn.Sequential(nn.Conv2d(2, 3, 3, padding=1), act(), nn.Conv2d(3, 2, 2, stride=2), act(),
                         nn.Flatten(), nn.Linear(8, 3))


CHAINS = {"mlp": (mlp, (8,)), "conv": (conv_chain, (2, 4, 4))}


def batches(shape, sizes=(5, 3), seed=0, device="cpu", soft=False):
    gen = torch.Generator().manual_seed(seed)
    data = []
    for n in sizes:
        x = 1.5 * torch.randn(n, *shape, generator=gen, dtype=torch.float64)
        y = torch.randn(n, 3, generator=gen, dtype=torch.float64) if soft else torch.randint(0, 3, (n,), generator=gen)
        data.append((x.to(device), y.to(device)))
    return data


def close(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("loss", ["cross_entropy", "mse"])
@pytest.mark.parametrize("chain", list(CHAINS))
@pytest.mark.parametrize("act", list(ACTIVATIONS))
def test_activation_rules_give_the_dense_hessian_and_ggn(act, chain, loss, device):
    maker, shape = CHAINS[chain]
    torch.manual_seed(0)
    model = maker(ACTIVATIONS[act]).double().to(device)
    data, loss_fn = batches(shape, device=device), loss_rule(loss)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1)).to(device)
    for name, dense in (("hessian", dense_hessian), ("ggn", dense_ggn)):
        op = make_operator(name, model, loss_fn, data, bn_mode="eval", layerwise=True)
        assert op.engine == "layerwise"
        close(op.matvec(v), dense(model, loss_fn, data, "eval") @ v)


LOSS_MODULES = {
    "ce_weighted_smoothed": (lambda: nn.CrossEntropyLoss(label_smoothing=0.1,
                                                         weight=torch.tensor([0.5, 2.0, 1.0], dtype=torch.float64)),
                             False),
    "ce_sum": (lambda: nn.CrossEntropyLoss(reduction="sum"), False),
    "mse_module": (nn.MSELoss, True),
}


def autograd_products(model, loss_fn, x, y, tangents):
    """Hessian and GGN products of ``loss_fn(model(x), y)`` in the parameters, reverse over reverse
    (``nn.MSELoss`` has no forward-over-reverse formula)."""
    names = [n for n, _ in model.named_parameters()]
    leaves = [p.detach().requires_grad_(True) for _, p in model.named_parameters()]
    v = [tangents[n] for n in names]
    with torch.enable_grad():
        outputs = functional_call(model, dict(zip(names, leaves)), (x,))
        grads = torch.autograd.grad(loss_fn(outputs, y), leaves, create_graph=True)
        hessian = torch.autograd.grad(grads, leaves, v, retain_graph=True)
        u = torch.zeros_like(outputs, requires_grad=True)  # J v as the derivative of u -> J^T u
        (jv,) = torch.autograd.grad(torch.autograd.grad(outputs, leaves, u, create_graph=True), u, v)
        z = outputs.detach().requires_grad_(True)
        (gz,) = torch.autograd.grad(loss_fn(z, y), z, create_graph=True)
        (hjv,) = torch.autograd.grad(gz, z, jv)
        ggn = torch.autograd.grad(outputs, leaves, hjv)
    return dict(zip(names, hessian)), dict(zip(names, ggn))


@pytest.mark.parametrize("key", list(LOSS_MODULES))
def test_loss_modules_reach_the_layerwise_plan(key):
    """The plan with a loss module equals autograd's products of that module, batch by batch."""
    make_loss, soft = LOSS_MODULES[key]
    torch.manual_seed(0)
    model = conv_chain(nn.SiLU).double()
    loss_fn = make_loss()
    names = [n for n, _ in model.named_parameters()]
    plan, reason = build_plan(model, loss_fn, names, "eval")
    assert plan is not None, reason
    gen = torch.Generator().manual_seed(2)
    tangents = {n: torch.randn(p.shape, generator=gen, dtype=torch.float64) for n, p in model.named_parameters()}
    params = {n: p.detach() for n, p in model.named_parameters()}
    for x, y in batches((2, 4, 4), soft=soft):
        hessian, ggn = autograd_products(model, loss_fn, x, y, tangents)
        got_h = plan.hessian(plan.prepare(x, y, params, gradients=True), y, tangents)
        got_g = plan.ggn(plan.prepare(x, y, params, gradients=False), y, tangents)
        for n in names:
            close(got_h[n], hessian[n])
            close(got_g[n], ggn[n])


@pytest.mark.parametrize("key", list(LOSS_MODULES))
def test_loss_modules_give_the_autograd_operators_products(key):
    make_loss, soft = LOSS_MODULES[key]
    torch.manual_seed(0)
    model = mlp(nn.GELU).double()
    loss_fn, data = make_loss(), batches((8,), soft=soft)
    v = torch.randn(sum(p.numel() for p in model.parameters()), 2, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1))
    for name in ("hessian", "ggn"):
        fast = make_operator(name, model, loss_fn, data, bn_mode="eval", layerwise=True)
        slow = make_operator(name, model, loss_fn, data, bn_mode="eval", layerwise=False)
        assert fast.engine == "layerwise" and slow.engine == "autograd"
        close(fast.matvec(v), slow.matvec(v))


def test_a_loss_without_closed_form_hessian_is_declined_with_its_name():
    def huber(outputs, targets):
        return nn.functional.huber_loss(outputs, targets)

    plan, reason = build_plan(mlp(nn.GELU), huber, ["1.weight"], "eval")
    assert plan is None and reason == "the loss huber (reduction mean) has no closed-form output Hessian"
