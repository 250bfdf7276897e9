"""SWATS: Adam switching to SGD (Keskar & Socher 2017, "Improving Generalization Performance by
Switching from Adam to SGD", Algorithm 1).

Adam phase, step k, gradient g_k (plus ``weight_decay * w``, an L2 term as in the paper):

    m_k = b1 m + (1 - b1) g_k,   a_k = b2 a + (1 - b2) g_k^2
    p_k = -lr sqrt(1 - b2^k) / (1 - b1^k) * m_k / (sqrt(a_k) + eps),   w += p_k
    gamma_k = p_k^T p_k / (-p_k^T g_k)            (the SGD rate whose step projects onto p_k)
    lambda_k = b2 lambda + (1 - b2) gamma_k
    switch when k > 1 and |lambda_k / (1 - b2^k) - gamma_k| < switch_tol, with
    Lambda = lambda_k / (1 - b2^k) the SGD rate.

SGD phase: ``v = b1 v + g``, ``w -= (1 - b1) * Lambda * v``. The paper uses one vector ``w`` and one
``eps`` (1e-9) for both roles; here each parameter group runs the rule on its own (with the usual single
group, ``model.parameters()``, that is the paper's global switch) and ``switch_tol`` defaults to
``eps``. Two additions: the switch also needs ``Lambda > 0`` (a negative estimate would ascend), and
after the switch a learning-rate schedule scales ``Lambda`` by ``lr / lr_at_switch``.
"""

from __future__ import annotations

import math
from typing import Optional

import torch


class SWATS(torch.optim.Optimizer):
    """Adam until the projected SGD learning rate settles, then SGD with momentum at that rate.

    Per-group state (in ``param_groups``, so it is checkpointed): ``phase`` (``adam`` | ``sgd``),
    ``swats_step``, ``swats_lambda``, ``sgd_lr`` (Lambda), ``switch_step``, ``lr_at_switch``.
    """

    def __init__(self, params, lr: float = 1e-3, betas=(0.9, 0.999), eps: float = 1e-9,
                 weight_decay: float = 0.0, switch_tol: Optional[float] = None):
        b1, b2 = betas
        checks = {"lr": lr > 0, "betas": 0 <= b1 < 1 and 0 <= b2 < 1, "eps": eps >= 0,
                  "weight_decay": weight_decay >= 0, "switch_tol": switch_tol is None or switch_tol >= 0}
        bad = [key for key, ok in checks.items() if not ok]
        if bad:
            raise ValueError(f"SWATS: invalid {', '.join(bad)} (lr > 0, betas in [0, 1), eps, weight_decay "
                             "and switch_tol >= 0)")
        defaults = dict(lr=lr, betas=(b1, b2), eps=eps, weight_decay=weight_decay,
                        switch_tol=eps if switch_tol is None else switch_tol, phase="adam", swats_step=0,
                        swats_lambda=0.0, sgd_lr=None, switch_step=None, lr_at_switch=None)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            group["swats_step"] += 1
            grads = [p.grad.add(p, alpha=group["weight_decay"]) if group["weight_decay"] else p.grad
                     for p in params]
            if group["phase"] == "sgd":
                self._sgd_step(group, params, grads)
            else:
                self._adam_step(group, params, grads)
        return loss

    def _sgd_step(self, group, params, grads) -> None:
        b1 = group["betas"][0]
        rate = (1 - b1) * group["sgd_lr"] * group["lr"] / group["lr_at_switch"]
        for p, g in zip(params, grads):
            state = self.state[p]
            if "sgd_buffer" not in state:
                state["sgd_buffer"] = torch.zeros_like(p)
            state["sgd_buffer"].mul_(b1).add_(g)
            p.add_(state["sgd_buffer"], alpha=-rate)

    def _adam_step(self, group, params, grads) -> None:
        (b1, b2), k = group["betas"], group["swats_step"]
        scale = group["lr"] * math.sqrt(1 - b2 ** k) / (1 - b1 ** k)
        step_sq, step_dot_grad = [], []
        for p, g in zip(params, grads):
            state = self.state[p]
            if "exp_avg" not in state:
                state["exp_avg"], state["exp_avg_sq"] = torch.zeros_like(p), torch.zeros_like(p)
            m, a = state["exp_avg"], state["exp_avg_sq"]
            m.mul_(b1).add_(g, alpha=1 - b1)
            a.mul_(b2).addcmul_(g, g, value=1 - b2)
            step = m / (a.sqrt() + group["eps"]) * -scale
            p.add_(step)
            step_sq.append((step * step).sum().double())
            step_dot_grad.append((step * g).sum().double())
        step_sq, step_dot_grad = float(torch.stack(step_sq).sum()), float(torch.stack(step_dot_grad).sum())
        if step_dot_grad == 0:
            return
        gamma = step_sq / -step_dot_grad
        group["swats_lambda"] = b2 * group["swats_lambda"] + (1 - b2) * gamma
        estimate = group["swats_lambda"] / (1 - b2 ** k)
        if k > 1 and estimate > 0 and abs(estimate - gamma) < group["switch_tol"]:
            group.update(phase="sgd", sgd_lr=estimate, switch_step=k, lr_at_switch=group["lr"])
