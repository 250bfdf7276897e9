"""Which route a curvature operator's products take, decided on the first batch before any long run.

* :func:`preflight`: one product on 4 samples finds out whether forward-mode AD runs through the model
  (some fused kernels have no forward-mode formula: then only reverse-mode routes are used) and whether
  the model can be differentiated twice at all; if not, a one-line error names the module at fault.
* :func:`layerwise_plan`: layer-wise products (``layerwise="auto"``, default) for a model that is a chain
  of standard layers (the suite's VGGs, MLP and SmallCNN, or any ``nn.Sequential`` of Conv2d/Linear/
  activations/pooling/Flatten/Dropout and running-statistics BatchNorm) with cross-entropy or MSE:
  written out layer by layer (:mod:`curvature.layerwise`, Pearlmutter's R-operator) with the fastest
  convolution kernels instead of autograd's double backward, measured 1.3x faster than autograd's cached
  product on a CPU VGG. One product is checked against autograd in float64; if they differ the operator
  falls back to autograd with a warning. Anything else (ResNets, BatchNorm with batch statistics, other
  losses) uses autograd.
* :func:`fastest_mode`: the Hessian's forward-over-reverse or reverse-over-reverse mode, by timing both.

Each takes the operator (:class:`curvature.operators.CurvatureOperator`) and calls its products.
"""

from __future__ import annotations

import copy
import time
import warnings

import torch
import torch.autograd.forward_ad as fwAD
from torch import nn
from torch.func import jvp

from curvature.batches import slice_inputs
from curvature.errors import SuiteError
from curvature.functional import curvature_mode
from curvature.graph_cache import GraphCache

LAYERWISE_CHOICES = ("auto", True, False)
#: the float64 cross-check of layer-wise against autograd products must agree to this relative error
LAYERWISE_CHECK_TOLERANCE = 1e-9


# --- pre-flight: forward-mode AD and double differentiability -------------------------------------
def preflight(op) -> None:
    """One product on 4 samples of the first batch with the route ``op`` will take.

    Sets ``op.forward_ad`` and ``op.forward_ad_reason``; a product that fails raises a one-line
    :class:`SuiteError` naming the module at fault.
    """
    inputs, targets = op.batches[0]
    n = int(targets.shape[0])
    x, y = slice_inputs(inputs, n, min(n, 4)), targets[:min(n, 4)]
    gen = torch.Generator().manual_seed(2)
    v = op.unflatten(torch.randn(op.num_params, 1, generator=gen, dtype=torch.float64)
                     .to(dtype=op.dtype, device=op.device))
    params = op._selected()
    with curvature_mode(op.model, op.bn_mode):
        try:
            jvp(op.forward_fn(x), (params,), ({k: t[0] for k, t in v.items()},))
        except Exception as exc:  # noqa: BLE001 - any failure means: no forward-mode route
            op.forward_ad, op.forward_ad_reason = False, _first_line(exc)
        try:
            op._fresh_product(x, y, params, v)
        except SuiteError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported as one line naming the module
            raise SuiteError(_failure_message(op, x, y, params, exc)) from exc


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def _failure_message(op, inputs, targets, params: dict, exc: BaseException) -> str:
    """One line for a product that failed on the first batch: the module at fault and what to do."""
    kind = type(op).__name__.replace("Operator", "")
    name, module, cause = _failing_module(op, inputs, params)
    if name is None:
        try:
            op.loss(op.forward_fn(inputs)(params), targets)
        except Exception as loss_exc:  # noqa: BLE001
            return (f"the loss {op.loss.describe()} fails on the model's outputs ({_first_line(loss_exc)}): "
                    "check the targets' shape and the loss")
        return (f"the {kind} product fails on the first batch ({_first_line(exc)}); no single module is at fault: "
                "check the loss and the model's forward")
    if cause == "forward":
        return (f"the model fails in module '{name}' ({type(module).__name__}) on the first batch: "
                f"{_first_line(exc)}; fix the model (its forward raises)")
    return (f"the {kind} product cannot differentiate module '{name}' ({type(module).__name__}) twice: "
            f"{_first_line(exc)}; replace it by a twice-differentiable equivalent (composite PyTorch ops) "
            "or exclude the model part that uses it")


def _failing_module(op, inputs, params: dict):
    """``(name, module, "forward" | "derivative")`` of the innermost module at fault, or ``(None, None, None)``.

    A forward that raises is pinned on the innermost module being run; otherwise every module call of
    one forward pass is differentiated twice on its own inputs, smallest modules first.
    """
    named = {id(m): (n or type(op.model).__name__) for n, m in op.model.named_modules()}
    stack, calls, hooks = [], [], []

    def enter(module, args, kwargs):
        stack.append(module)

    def leave(module, args, kwargs, output):
        stack.pop()
        calls.append((module, args, kwargs))

    for m in op.model.modules():
        hooks.append(m.register_forward_pre_hook(enter, with_kwargs=True))
        hooks.append(m.register_forward_hook(leave, with_kwargs=True))
    try:
        with torch.no_grad():
            op.forward_fn(inputs)(params)
    except Exception:  # noqa: BLE001
        if stack:
            return named.get(id(stack[-1]), type(stack[-1]).__name__), stack[-1], "forward"
        return None, None, None
    finally:
        for h in hooks:
            h.remove()
    size = {id(m): sum(1 for _ in m.modules()) for m in op.model.modules()}
    for module, args, kwargs in sorted(calls, key=lambda c: size[id(c[0])]):
        try:
            _differentiate_twice(module, args, kwargs, op.forward_ad)
        except Exception:  # noqa: BLE001
            return named.get(id(module), type(module).__name__), module, "derivative"
    return None, None, None


def _differentiate_twice(module: nn.Module, args, kwargs, forward_ad: bool) -> None:
    leaves: list[torch.Tensor] = []

    def leaf(x):
        if torch.is_tensor(x) and x.is_floating_point():
            t = x.detach().requires_grad_(True)
            leaves.append(t)
            return t
        if isinstance(x, (tuple, list)):
            return type(x)(leaf(v) for v in x)
        if isinstance(x, dict):
            return {k: leaf(v) for k, v in x.items()}
        return x

    args, kwargs = leaf(args), leaf(kwargs)
    leaves += [p for p in module.parameters() if p.requires_grad]
    with torch.enable_grad():
        out = module(*args, **kwargs)
        outs = [o for o in (out if isinstance(out, (tuple, list)) else [out])
                if torch.is_tensor(o) and o.is_floating_point() and o.requires_grad]
        if not outs or not leaves:
            return
        first = sum((o * torch.randn_like(o)).sum() for o in outs)
        grads = [g for g in torch.autograd.grad(first, leaves, create_graph=True, allow_unused=True)
                 if g is not None and g.requires_grad]
        if grads:
            second = sum((g * torch.randn_like(g)).sum() for g in grads)
            torch.autograd.grad(second, leaves, allow_unused=True)
    if forward_ad:
        with fwAD.dual_level():
            module(*[fwAD.make_dual(t, torch.randn_like(t)) if torch.is_tensor(t) and t.is_floating_point() else t
                     for t in args], **kwargs)


# --- layer-wise or autograd ----------------------------------------------------------------------
def layerwise_plan(op, choice, check: bool = True) -> tuple:
    """``(plan, reason)``: the layer-wise plan when the model and loss allow it and it matches autograd.

    ``choice``: ``"auto"`` (use it when possible), ``True`` (required: a one-line error otherwise),
    ``False`` (autograd products). The check (:func:`layerwise_error`) compares one product with
    autograd's in float64; callers that build many operators of one model (an optimiser,
    per-batch statistics) check the first only.
    """
    from curvature.layerwise import build_plan

    if choice not in LAYERWISE_CHOICES:
        raise ValueError(f"layerwise must be auto, true or false, got {choice!r}")
    if choice is False:
        return None, "operator.layerwise=false"
    if op.forward is not None or not torch.is_tensor(op.batches[0][0]):
        plan, reason = None, "the model takes a forward hook or dict inputs"
    else:
        plan, reason = build_plan(op.model, op.loss_fn, op.names, op.bn_mode)
    if plan is not None and check:
        error = layerwise_error(op)
        if not error <= LAYERWISE_CHECK_TOLERANCE:  # NaN fails too
            plan, reason = None, f"layer-wise product differs from autograd's by {error:.1e} (float64)"
            warnings.warn(f"{type(op).__name__}: {reason}; using autograd products", RuntimeWarning,
                          stacklevel=5)
    if plan is None and choice is True:
        raise SuiteError(f"operator.layerwise=true but the layer-wise products do not apply: {reason}; "
                         "set operator.layerwise=auto")
    return plan, reason


def layerwise_error(op) -> float:
    """Relative difference of a layer-wise and an autograd product, in float64 on a few samples.

    Float64 separates a wrong layer chain from rounding: in float32 two exact methods already
    differ by up to 1e-3 relative on a VGG at initialisation (cancellation in the product).
    Runs on a float64 copy of the model (unless it is float64) and the first batch's first 8 samples.
    """
    from curvature.layerwise import build_plan

    probe = copy.copy(op)  # same settings (Hessian mode, names, BN mode); its own model, data and cache
    probe.model = op.model if op.dtype == torch.float64 else copy.deepcopy(op.model).to(torch.float64)
    inputs, targets = op.batches[0]
    inputs, targets = (t[:8].to(torch.float64) if t.is_floating_point() else t[:8] for t in (inputs, targets))
    probe.batches, probe.dtype, probe.plan = [(inputs, targets)], torch.float64, None
    probe.graph_cache = GraphCache(probe.model, probe.batches, op.device, "none")
    gen = torch.Generator().manual_seed(1)
    tangents = probe.unflatten(torch.randn(op.num_params, 1, generator=gen, dtype=torch.float64).to(op.device))
    params = probe._selected()
    with curvature_mode(probe.model, op.bn_mode):
        reference = probe.flatten(probe._fresh_product(inputs, targets, params, tangents), batched=True)
        probe.plan = build_plan(probe.model, op.loss_fn, op.names, op.bn_mode)[0]
        got = probe.flatten(probe._layerwise_product(probe._layerwise_prepare(inputs, targets, params),
                                                     targets, tangents), batched=True)
    return float((got - reference).norm() / reference.norm().clamp(min=1e-300))


# --- the Hessian's autograd mode ----------------------------------------------------------------
def fastest_mode(op, modes) -> tuple[str, dict]:
    """Time one product of each mode on the first batch (after a warm-up): ``(fastest, seconds per mode)``.

    Which wins depends on the network and dtype: forward-over-reverse was faster for a small
    float64 CNN, reverse-over-reverse for a 1M-parameter float32 VGG (both on CPU).
    """
    inputs, targets = op.batches[0]
    v = op.unflatten(torch.ones(op.num_params, 1, dtype=op.dtype, device=op.device))
    params = op._selected()
    seconds = {}
    with curvature_mode(op.model, op.bn_mode):
        for mode in modes:
            op.mode = mode
            op.batch_product(inputs, targets, params, v)  # warm-up
            if op.device.type == "cuda":
                torch.cuda.synchronize(op.device)
            start = time.perf_counter()
            op.batch_product(inputs, targets, params, v)
            if op.device.type == "cuda":
                torch.cuda.synchronize(op.device)
            seconds[mode] = time.perf_counter() - start
    return min(seconds, key=seconds.get), seconds
