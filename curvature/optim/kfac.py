"""K-FAC (Martens & Grosse 2015; convolutions: Grosse & Martens 2016) for Linear and Conv2d layers.

For a layer with inputs ``a`` (a column of ones appended when it has a bias) and pre-activation
gradients ``g`` the Fisher block is approximated by ``A kron G`` with ``A = E[a a^T]`` and
``G = E[g g^T]``; the natural-gradient step of its weight matrix ``W`` (out x in, bias as last column) is
``(G + dG I)^-1 grad_W (A + dA I)^-1``. The Fisher is the true one, not the empirical one: ``g`` is
back-propagated from the loss of labels *sampled from the model*, ``y ~ softmax(logits)``, through the
graph of the training forward pass (:meth:`KFAC.observe`, called by the training loop before its own
backward). Convolutions use the patches of ``F.unfold`` as ``a``; ``A`` averages over samples and
positions, ``G`` sums over positions and averages over samples (KFC's ``Omega kron Gamma``).

Factors are running averages (``stat_decay``), updated every ``cov_update_period`` steps; their damped
inverses every ``inv_update_period`` steps. Damping ``lambda`` is split between the factors
``pi``-style (Martens & Grosse Sec. 6.3: ``dA = pi sqrt(lambda)``, ``dG = sqrt(lambda) / pi``,
``pi^2 = (tr A / dim A) / (tr G / dim G)``) or, with ``pi_damping=False``, as ``sqrt(lambda)`` each.
With ``kl_clip`` set, the natural-gradient steps are scaled by
``min(1, sqrt(kl_clip / (lr^2 sum_layers <step, grad>)))``, bounding the step's predicted KL change
(Ba, Grosse & Martens 2017). Weight decay is added to the preconditioned direction (plain L2 decay,
not curvature-scaled), then heavy-ball momentum: ``buf = momentum * buf + d``, ``w -= lr * buf``. Parameters outside supported
layers (BatchNorm, grouped convolutions, ...) get the same momentum step with ``d`` the gradient.
Only the cross-entropy loss is supported (its sampled labels define the Fisher).
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from curvature.seeding import generator


def _supported(module: nn.Module) -> bool:
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros" \
        and not isinstance(module.padding, str)


class KFAC(torch.optim.Optimizer):
    """K-FAC with sampled-label Fisher factors; see the module docstring. ``params``: any subset of the
    model's parameters; a Linear/Conv2d layer is preconditioned when its weight is among them."""

    def __init__(self, params, model: nn.Module, lr: float = 0.01, momentum: float = 0.9,
                 damping: float = 1e-3, weight_decay: float = 0.0, stat_decay: float = 0.95,
                 cov_update_period: int = 10, inv_update_period: int = 100, pi_damping: bool = True,
                 kl_clip: Optional[float] = 1e-3, seed: int = 0, loss_fn: Callable = F.cross_entropy):
        checks = {"lr": lr > 0, "momentum": 0 <= momentum < 1, "damping": damping > 0,
                  "weight_decay": weight_decay >= 0, "stat_decay": 0 <= stat_decay < 1,
                  "cov_update_period": int(cov_update_period) >= 1,
                  "inv_update_period": int(inv_update_period) >= 1, "kl_clip": kl_clip is None or kl_clip > 0,
                  "loss_fn": loss_fn is F.cross_entropy}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"KFAC: invalid {', '.join(bad)} (positive lr, damping, periods, kl_clip; momentum "
                             "and stat_decay in [0, 1); the loss must be cross-entropy)")
        super().__init__(params, dict(lr=lr, momentum=momentum, damping=damping, weight_decay=weight_decay))
        ids = {id(p) for group in self.param_groups for p in group["params"]}
        self.layers = [m for m in model.modules() if _supported(m) and id(m.weight) in ids]
        self.stat_decay, self.pi_damping, self.kl_clip, self.seed = stat_decay, pi_damping, kl_clip, int(seed)
        self.cov_update_period, self.inv_update_period = int(cov_update_period), int(inv_update_period)
        self._captured: dict = {}
        self.last_sampled_labels = None
        self._hooks = [m.register_forward_hook(self._capture) for m in self.layers]

    # --- statistics ---------------------------------------------------------------------------
    @property
    def steps(self) -> int:
        return int(self.param_groups[0].get("kfac_steps", 0))

    def _has_bias(self, module) -> bool:
        bias = module.bias
        return bias is not None and any(bias is p for g in self.param_groups for p in g["params"])

    def _capture(self, module, inputs, output) -> None:
        if module.training and torch.is_grad_enabled() and self.steps % self.cov_update_period == 0:
            self._captured[module] = (inputs[0].detach(), output, output._version)

    def _activations(self, module, a: torch.Tensor) -> torch.Tensor:
        """Rows of ``a`` (n*T, in[+1]): patches for Conv2d, last-dim features for Linear."""
        if isinstance(module, nn.Conv2d):
            a = F.unfold(a, module.kernel_size, module.dilation, module.padding, module.stride)
            a = a.transpose(1, 2).reshape(-1, a.shape[1])
        else:
            a = a.reshape(-1, a.shape[-1])
        if self._has_bias(module):
            a = torch.cat([a, torch.ones_like(a[:, :1])], dim=1)
        return a

    @staticmethod
    def _output_grads(module, g: torch.Tensor) -> torch.Tensor:
        if isinstance(module, nn.Conv2d):
            return g.permute(0, 2, 3, 1).reshape(-1, g.shape[1])
        return g.reshape(-1, g.shape[-1])

    def observe(self, inputs: torch.Tensor, labels: torch.Tensor, logits: torch.Tensor) -> None:
        """After the training forward pass, before its backward: sample ``y ~ softmax(logits)``,
        back-propagate that loss to each layer's outputs and update the factors (on stats steps)."""
        captured, self._captured = self._captured, {}
        if not captured:
            return
        for module, (_, output, version) in captured.items():
            if output._version != version:
                raise RuntimeError(f"KFAC: the output of {module} was modified in place after the layer "
                                   "(e.g. nn.ReLU(inplace=True)); use out-of-place activations")
        n = logits.shape[0]
        with torch.no_grad():
            probs = torch.softmax(logits.detach().double(), dim=-1).cpu()
            sampled = torch.multinomial(probs, 1, generator=generator(self.seed, f"kfac.labels.{self.steps}"))
            sampled = sampled.squeeze(1).to(logits.device)
        self.last_sampled_labels = sampled
        sampled_loss = F.cross_entropy(logits, sampled)
        modules = list(captured)
        grads = torch.autograd.grad(sampled_loss, [captured[m][1] for m in modules], retain_graph=True)
        decay = self.stat_decay
        with torch.no_grad():
            for module, g in zip(modules, grads):
                a = self._activations(module, captured[module][0])
                g = self._output_grads(module, g) * n  # per-sample gradients of the sampled loss
                state = self.state[module.weight]
                new_a, new_g = a.T @ a / a.shape[0], g.T @ g / n
                if "A" not in state:
                    state["A"], state["G"] = new_a, new_g
                else:
                    state["A"].mul_(decay).add_(new_a, alpha=1 - decay)
                    state["G"].mul_(decay).add_(new_g, alpha=1 - decay)

    def _update_inverses(self, module, damping: float) -> None:
        state = self.state[module.weight]
        A, G = state["A"], state["G"]
        pi = 1.0
        if self.pi_damping:
            ta, tg = float(torch.trace(A)) / A.shape[0], float(torch.trace(G)) / G.shape[0]
            pi = math.sqrt(ta / tg) if ta > 0 and tg > 0 else 1.0
        root = math.sqrt(damping)
        for key, matrix, shift in (("A_inv", A, pi * root), ("G_inv", G, root / pi)):
            values, vectors = torch.linalg.eigh(matrix)
            state[key] = (vectors / (values.clamp(min=0) + shift)) @ vectors.T

    # --- the step ----------------------------------------------------------------------------------
    def _natural_gradients(self) -> dict:
        """{id(param): preconditioned gradient} for every supported layer."""
        out = {}
        update_inverses = self.steps % self.inv_update_period == 0
        for module in self.layers:
            weight = module.weight
            if weight.grad is None:
                continue
            state = self.state[weight]
            if "A" not in state:
                raise RuntimeError("KFAC.step needs Fisher factors: call observe(inputs, labels, logits) "
                                   "after the forward pass of the first step")
            damping = next(g["damping"] for g in self.param_groups if any(p is weight for p in g["params"]))
            if update_inverses or "A_inv" not in state:
                self._update_inverses(module, damping)
            grad = weight.grad.reshape(weight.shape[0], -1)
            bias = self._has_bias(module)
            if bias:
                b_grad = module.bias.grad if module.bias.grad is not None else torch.zeros_like(module.bias)
                grad = torch.cat([grad, b_grad.unsqueeze(1)], dim=1)
            step = state["G_inv"] @ grad @ state["A_inv"]
            if bias:
                out[id(module.bias)] = step[:, -1].clone()
                step = step[:, :-1]
            out[id(weight)] = step.reshape(weight.shape)
        if self.kl_clip is not None and out:
            self._clip(out)
        return out

    def _clip(self, natural: dict) -> None:
        """Scale every natural-gradient step by nu = min(1, sqrt(kl_clip / (lr^2 sum <step, grad>)))."""
        total = 0.0
        for group in self.param_groups:
            for p in group["params"]:
                if id(p) in natural:
                    total += float((natural[id(p)] * p.grad).sum()) * group["lr"] ** 2
        if total > 0:
            nu = min(1.0, math.sqrt(self.kl_clip / total))
            for key in natural:
                natural[key].mul_(nu)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        natural = self._natural_gradients()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d = natural.get(id(p), p.grad)
                if group["weight_decay"]:
                    d = d.add(p, alpha=group["weight_decay"])
                if group["momentum"]:
                    state = self.state[p]
                    if "momentum_buffer" not in state:
                        state["momentum_buffer"] = d.clone()
                    else:
                        state["momentum_buffer"].mul_(group["momentum"]).add_(d)
                    d = state["momentum_buffer"]
                p.add_(d, alpha=-group["lr"])
        self.param_groups[0]["kfac_steps"] = self.steps + 1
        return loss
