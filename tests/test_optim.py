"""Optimisers against closed forms (float64): Lanczos Newton on quadratics, K-FAC on one layer, the
SWATS switch rule; and each optimiser lowering the training loss on digits."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from curvature.operators import mse_loss
from curvature.optim import KFAC, SWATS, GGNNewton, SaddleFreeNewton, build_optimizer
from tests.conftest import DEVICES

DT = torch.float64


# --- Lanczos Newton -------------------------------------------------------------------------------
class Quadratic(nn.Module):
    """f(w) = 0.5 w^T A w - b^T w, returned once per input row so the mean-reduced 'loss' is f."""

    def __init__(self, A: torch.Tensor, b: torch.Tensor, w0: torch.Tensor):
        super().__init__()
        self.register_buffer("A", A)
        self.register_buffer("b", b)
        self.w = nn.Parameter(w0.clone())

    def forward(self, x):
        value = 0.5 * self.w @ self.A @ self.w - self.b @ self.w
        return value.expand(x.shape[0], 1)


def mean_output(outputs, targets):
    return outputs.mean()


def spd_and_indefinite(p: int, device, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(p, p, generator=gen, dtype=DT))
    positive = torch.linspace(0.5, 4.0, p, dtype=DT)
    signed = positive * torch.tensor([1.0, -1.0] * (p // 2) + [1.0] * (p % 2), dtype=DT)
    b = torch.randn(p, generator=gen, dtype=DT)
    w0 = torch.randn(p, generator=gen, dtype=DT)
    to = dict(device=device)
    return (q @ torch.diag(positive) @ q.T).to(**to), (q @ torch.diag(signed) @ q.T).to(**to), b.to(**to), w0.to(**to)


def newton_step(cls, model, loss_fn, batch, **settings):
    opt = cls(model.parameters(), model=model, loss_fn=loss_fn, **settings)
    x, y = batch
    opt.zero_grad()
    logits = model(x)
    opt.observe(x, y, logits)
    loss_fn(logits, y).backward()
    opt.step()
    return opt


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [SaddleFreeNewton, GGNNewton])
def test_newton_with_full_krylov_space_and_tiny_damping_lands_on_the_least_squares_minimiser(cls, device):
    """Linear least squares: Hessian = GGN = 2 X^T X / n; one step with P Lanczos steps is exact."""
    gen = torch.Generator().manual_seed(1)
    n, p = 40, 7
    x = torch.randn(n, p, generator=gen, dtype=DT).to(device)
    y = torch.randn(n, 1, generator=gen, dtype=DT).to(device)
    model = nn.Linear(p, 1, bias=False).to(device, DT)
    w_star = torch.linalg.lstsq(x, y).solution.T
    newton_step(cls, model, mse_loss, (x, y), lr=1.0, damping=1e-10, lanczos_steps=p, curvature_batch_size=n)
    assert torch.allclose(model.weight.detach(), w_star, rtol=0, atol=1e-6)


@pytest.mark.parametrize("start_vector", ["random", "gradient"])
def test_saddle_free_newton_uses_absolute_eigenvalues_on_an_indefinite_quadratic(start_vector):
    p = 6
    _, A, b, w0 = spd_and_indefinite(p, "cpu")
    model = Quadratic(A, b, w0)
    batch = (torch.zeros(3, 1, dtype=DT), torch.zeros(3, dtype=DT))
    damping = 0.3
    newton_step(SaddleFreeNewton, model, mean_output, batch, lr=0.7, damping=damping, lanczos_steps=p,
                start_vector=start_vector)
    evals, evecs = torch.linalg.eigh(A)
    abs_damped = evecs @ torch.diag(1.0 / (evals.abs() + damping)) @ evecs.T
    expected = w0 - 0.7 * abs_damped @ (A @ w0 - b)
    assert torch.allclose(model.w.detach(), expected, rtol=0, atol=1e-10)


@pytest.mark.parametrize("cls", [SaddleFreeNewton, GGNNewton])
def test_newton_with_large_damping_is_sgd_with_lr_over_damping(cls):
    """Few Lanczos steps (so both the Krylov part and its complement act); delta >> |lambda|."""
    p, lr, damping = 8, 0.5, 1e8
    A, _, b, w0 = spd_and_indefinite(p, "cpu")
    model = Quadratic(A, b, w0)
    batch = (torch.zeros(3, 1, dtype=DT), torch.zeros(3, dtype=DT))
    if cls is GGNNewton:  # the GGN of a custom 'loss' is its output Hessian's: use least squares instead
        gen = torch.Generator().manual_seed(2)
        x, y = torch.randn(30, p, generator=gen, dtype=DT), torch.randn(30, 1, generator=gen, dtype=DT)
        model, batch, loss_fn = nn.Linear(p, 1, bias=False).to(DT), (x, y), mse_loss
        w0 = model.weight.detach().clone().reshape(-1)
        grad = (2 * x.T @ (x @ w0[:, None] - y) / 30).reshape(-1)
        lam_max = float(torch.linalg.eigvalsh(2 * x.T @ x / 30).max())
    else:
        loss_fn, grad, lam_max = mean_output, A @ w0 - b, float(torch.linalg.eigvalsh(A).abs().max())
    newton_step(cls, model, loss_fn, batch, lr=lr, damping=damping, lanczos_steps=3)
    w1 = next(model.parameters()).detach().reshape(-1)
    sgd = w0 - lr / damping * grad
    # |1/(lambda + delta) - 1/delta| <= lambda / delta^2: the exact first-order gap, plus rounding
    bound = lr * float(grad.norm()) * lam_max / damping ** 2 + 1e-14 * float(w0.norm())
    assert float((w1 - sgd).norm()) <= bound
    assert float((w1 - w0).norm()) > 1e3 * bound  # the step itself is far larger than the tolerance


def test_newton_weight_decay_is_an_exact_l2_term():
    """With P Lanczos steps (A SPD) the step solves (A + wd I + delta I) d = A w - b + wd w."""
    p, wd, damping = 5, 0.2, 0.05
    A, _, b, w0 = spd_and_indefinite(p, "cpu", seed=3)
    model = Quadratic(A, b, w0)
    batch = (torch.zeros(2, 1, dtype=DT), torch.zeros(2, dtype=DT))
    newton_step(SaddleFreeNewton, model, mean_output, batch, lr=1.0, damping=damping, weight_decay=wd,
                lanczos_steps=p)
    expected = w0 - torch.linalg.solve(A + (wd + damping) * torch.eye(p, dtype=DT), A @ w0 - b + wd * w0)
    assert torch.allclose(model.w.detach(), expected, rtol=0, atol=1e-10)


def test_newton_damping_defaults_to_ratio_times_lr_and_checks_its_params():
    model = nn.Linear(3, 2).to(DT)
    opt = SaddleFreeNewton(model.parameters(), model=model, lr=0.1, damping_ratio=10)
    assert opt.param_groups[0]["damping"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="model.parameters"):
        SaddleFreeNewton([model.weight], model=model)
    with pytest.raises(ValueError, match="lanczos_steps"):
        SaddleFreeNewton(model.parameters(), model=model, lanczos_steps=0)


def test_newton_skips_a_non_finite_step_and_counts_it():
    model = nn.Linear(3, 2).to(DT)
    x, y = torch.randn(4, 3, dtype=DT), torch.tensor([0, 1, 0, 1])
    opt = GGNNewton(model.parameters(), model=model, lr=0.1, lanczos_steps=2)
    before = [p.detach().clone() for p in model.parameters()]
    logits = model(x)
    opt.observe(x, y, logits)
    F.cross_entropy(logits, y).backward()
    model.weight.grad[0, 0] = float("nan")
    with pytest.warns(RuntimeWarning, match="not finite"):
        opt.step()
    assert opt.skipped_steps == 1
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


# --- K-FAC ------------------------------------------------------------------------------------------
def kfac_one_step(model, x, y, **settings):
    opt = KFAC(model.parameters(), model=model, **settings)
    logits = model(x)
    opt.observe(x, y, logits)
    F.cross_entropy(logits, y).backward()
    grads = [p.grad.detach().clone() for p in model.parameters()]
    opt.step()
    return opt, logits.detach(), grads


@pytest.mark.parametrize("pi_damping", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_kfac_on_one_linear_layer_is_the_closed_form_natural_gradient_step(bias, pi_damping):
    """vec(step) solves (A_d kron G_d) vec(step) = vec(grad), A and G built by hand from the sampled labels."""
    gen = torch.Generator().manual_seed(4)
    n, d_in, c, lr, damping = 25, 4, 3, 0.3, 0.01
    x, y = torch.randn(n, d_in, generator=gen, dtype=DT), torch.randint(0, c, (n,), generator=gen)
    model = nn.Linear(d_in, c, bias=bias).to(DT)
    before = [p.detach().clone() for p in model.parameters()]
    opt, logits, grads = kfac_one_step(model, x, y, lr=lr, momentum=0.0, damping=damping, pi_damping=pi_damping,
                                       cov_update_period=1, inv_update_period=1, kl_clip=None, seed=7)
    sampled = opt.last_sampled_labels
    from curvature.seeding import generator
    draw = torch.multinomial(torch.softmax(logits, -1), 1, generator=generator(7, "kfac.labels.0")).squeeze(1)
    assert torch.equal(sampled, draw)  # the documented stream: the labels are reproducible
    a = torch.cat([x, torch.ones(n, 1, dtype=DT)], 1) if bias else x
    per_sample = torch.softmax(logits, -1) - F.one_hot(sampled, c).to(DT)  # d(-log p(y_s)) / d logits
    A, G = a.T @ a / n, per_sample.T @ per_sample / n
    pi = math.sqrt((A.trace() / A.shape[0]) / (G.trace() / c)) if pi_damping else 1.0
    A_d = A + pi * math.sqrt(damping) * torch.eye(A.shape[0], dtype=DT)
    G_d = G + math.sqrt(damping) / pi * torch.eye(c, dtype=DT)
    grad = torch.cat([grads[0], grads[1][:, None]], 1) if bias else grads[0]
    vec = lambda m: m.T.reshape(-1)  # column-stacking vec: vec(G^-1 M A^-1) = (A kron G)^-1 vec(M)
    step = torch.linalg.solve(torch.kron(A_d, G_d), vec(grad)).reshape(grad.shape[1], c).T
    assert torch.allclose(model.weight.detach(), before[0] - lr * step[:, :d_in], rtol=0, atol=1e-12)
    if bias:
        assert torch.allclose(model.bias.detach(), before[1] - lr * step[:, -1], rtol=0, atol=1e-12)


def test_kfac_conv_path_equals_linear_on_1x1_images():
    """A 1x1 convolution on 1x1 images is a Linear layer: same factors, same step (unfold path)."""
    gen = torch.Generator().manual_seed(5)
    n, d_in, c = 16, 5, 4
    x, y = torch.randn(n, d_in, generator=gen, dtype=DT), torch.randint(0, c, (n,), generator=gen)
    linear = nn.Linear(d_in, c).to(DT)
    conv = nn.Sequential(nn.Conv2d(d_in, c, 1), nn.Flatten()).to(DT)
    with torch.no_grad():
        conv[0].weight.copy_(linear.weight[:, :, None, None])
        conv[0].bias.copy_(linear.bias)
    settings = dict(lr=0.2, momentum=0.0, damping=0.05, cov_update_period=1, inv_update_period=1, seed=3,
                    kl_clip=1e-4)  # the clip acts (same factor for both)
    kfac_one_step(linear, x, y, **settings)
    kfac_one_step(conv, x[:, :, None, None], y, **settings)
    assert torch.allclose(conv[0].weight.detach().reshape(c, d_in), linear.weight.detach(), rtol=0, atol=1e-12)
    assert torch.allclose(conv[0].bias.detach(), linear.bias.detach(), rtol=0, atol=1e-12)


def test_kfac_refuses_in_place_activations_and_other_losses():
    model = nn.Sequential(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)).to(DT)
    opt = KFAC(model.parameters(), model=model)
    x = torch.randn(5, 3, dtype=DT)
    with pytest.raises(RuntimeError, match="in place"):
        opt.observe(x, None, model(x))
    with pytest.raises(ValueError, match="cross-entropy"):
        KFAC(model.parameters(), model=model, loss_fn=mse_loss)


# --- SWATS ------------------------------------------------------------------------------------------
def swats_reference(gradients, lr, b1, b2, eps, tol):
    """Algorithm 1 of Keskar & Socher (2017) on a gradient sequence (floats): (switch step, Lambda)."""
    p = len(gradients[0])
    m, a, lam = [0.0] * p, [0.0] * p, 0.0
    for k, g in enumerate(gradients, start=1):
        m = [b1 * mi + (1 - b1) * gi for mi, gi in zip(m, g)]
        a = [b2 * ai + (1 - b2) * gi * gi for ai, gi in zip(a, g)]
        alpha = lr * math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        step = [-alpha * mi / (math.sqrt(ai) + eps) for mi, ai in zip(m, a)]
        dot = sum(s * gi for s, gi in zip(step, g))
        gamma = sum(s * s for s in step) / -dot
        lam = b2 * lam + (1 - b2) * gamma
        if k > 1 and lam / (1 - b2 ** k) > 0 and abs(lam / (1 - b2 ** k) - gamma) < tol:
            return k, lam / (1 - b2 ** k)
    return None, None


def run_swats(gradients, **settings):
    w = nn.Parameter(torch.zeros(len(gradients[0]), dtype=DT))
    opt = SWATS([w], **settings)
    for g in gradients:
        w.grad = torch.tensor(g, dtype=DT)
        opt.step()
        if opt.param_groups[0]["phase"] == "sgd":
            break
    return opt, w


def test_swats_switches_at_step_two_on_a_constant_gradient():
    """Constant g (eps 0): every Adam step is -lr sign(g), gamma_k = lr P / ||g||_1 for all k, and the
    bias-corrected average equals it exactly from k = 2 on."""
    c, lr = [0.5, -2.0, 1.0], 1e-3
    opt, w = run_swats([c] * 5, lr=lr, eps=0.0, switch_tol=1e-12)
    group = opt.param_groups[0]
    assert group["switch_step"] == 2 and group["phase"] == "sgd"
    assert group["sgd_lr"] == pytest.approx(lr * 3 / 3.5, rel=1e-12)
    w_adam = w.detach().clone()
    assert torch.allclose(w_adam, -2 * lr * torch.tensor(c, dtype=DT).sign(), rtol=0, atol=1e-15)
    w.grad = torch.tensor(c, dtype=DT)
    opt.step()  # SGD phase: v = g, w -= (1 - b1) Lambda v
    assert torch.allclose(w.detach(), w_adam - 0.1 * group["sgd_lr"] * torch.tensor(c, dtype=DT), rtol=0, atol=1e-15)


def test_swats_switch_step_equals_algorithm_1_on_a_noisy_sequence():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(6, generator=gen, dtype=DT)
    gradients = [(base + torch.randn(6, generator=gen, dtype=DT) * 0.8 ** k).tolist() for k in range(300)]
    settings = dict(lr=1e-2, betas=(0.9, 0.999), eps=1e-8, switch_tol=1e-4)
    k_ref, rate_ref = swats_reference(gradients, settings["lr"], 0.9, 0.999, 1e-8, 1e-4)
    assert k_ref is not None and k_ref > 5  # a non-trivial switch: the test can tell steps apart
    opt, _ = run_swats(gradients, **settings)
    assert opt.param_groups[0]["switch_step"] == k_ref
    assert opt.param_groups[0]["sgd_lr"] == pytest.approx(rate_ref, rel=1e-10)
    never, _ = run_swats(gradients[:k_ref - 1], **settings)
    assert never.param_groups[0]["phase"] == "adam"


# --- every optimiser learns -------------------------------------------------------------------------
LEARNERS = {
    "sgd": {"lr": 0.1, "momentum": 0.9},
    "adam": {"lr": 1e-2},
    "saddle_free_newton": {"lr": 0.1, "lanczos_steps": 4, "curvature_batch_size": 64},
    "ggn_newton": {"lr": 0.1, "lanczos_steps": 4, "curvature_batch_size": 64},
    "kfac": {"lr": 3e-3, "cov_update_period": 2, "inv_update_period": 4},
    "swats": {"lr": 1e-2},
}


@pytest.mark.parametrize("name", LEARNERS)
def test_each_optimiser_lowers_the_training_loss_on_digits(name):
    """Two epochs of eight steps of the real training loop (observe hook included) on 512 digits."""
    from curvature.data import load_splits
    from curvature.models import get_model
    from curvature.training import curvature_sampler, evaluate, train_epoch

    torch.manual_seed(0)
    train = load_splits("digits", num_subsamples=512, seed=0).train
    model = get_model("cnn", 10)
    opt = build_optimizer({"name": name, **LEARNERS[name]}, model.parameters(), model=model, loss_fn=F.cross_entropy)
    if hasattr(opt, "set_curvature_sampler"):
        opt.set_curvature_sampler(curvature_sampler(train, 64, torch.Generator().manual_seed(1), augment=False))
    before = evaluate(model, train)["loss"]
    for epoch in range(2):
        stats = train_epoch(model, train, opt, 64, torch.Generator().manual_seed(epoch), augment=False,
                            progress=False)
    after = evaluate(model, train)["loss"]
    assert stats["num_steps"] == 8 and stats["step_time_s"] > 0
    assert after < 0.95 * before, (before, after)
    assert getattr(opt, "skipped_steps", 0) == 0


def test_build_optimizer_passes_the_model_only_where_taken_and_requires_it():
    model = nn.Linear(3, 2)
    assert isinstance(build_optimizer({"name": "swats", "lr": 1e-3}, model.parameters(), model=model), SWATS)
    with pytest.raises(ValueError, match="needs the model"):
        build_optimizer({"name": "kfac"}, model.parameters())
    assert isinstance(build_optimizer({"name": "kfac"}, model.parameters(), model=model), KFAC)


@pytest.mark.parametrize("name,extra", [
    ("ggn_newton", ["optimizer.lanczos_steps=3", "optimizer.curvature_batch_size=32"]),
    ("kfac", ["optimizer.cov_update_period=1", "optimizer.inv_update_period=3"]),
    ("swats", ["optimizer.switch_tol=1e-3"]),
])
def test_resume_with_a_stateful_optimiser_ends_with_the_same_weights(name, extra, tmp_path):
    """Curvature batches, Lanczos seeds, sampled labels, factors and the SWATS phase all survive a resume."""
    from experiments.run import dispatch
    from tests.conftest import make_cfg

    common = ["experiment=train_digits", f"optimizer={name}", *extra, "dataset.num_subsamples=128",
              "dataset.batch_size=32", "analysis.epochs=2", "analysis.save_freq=1",
              "analysis.target_test_accuracy=null"]
    dispatch(make_cfg(tmp_path / "whole", common))
    dispatch(make_cfg(tmp_path / "resumed", common + [f"resume={tmp_path / 'whole' / 'checkpoint-00001.pt'}"]))
    a, b = (torch.load(tmp_path / run / "checkpoint-00002.pt", weights_only=True) for run in ("whole", "resumed"))
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key
