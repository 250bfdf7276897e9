"""One rule per layer kind: what :class:`curvature.layerwise.LayerwisePlan` needs to know about a layer.

A rule is bound to one layer and gives, in the notation of :mod:`curvature.layerwise` (``x`` the
layer's input, ``y`` its output, ``g`` primal gradients of the loss, ``R{.}`` directional derivatives
along the parameter direction ``v``):

* :meth:`~LayerRule.why_unsupported`: a reason the layer-wise path cannot take this layer, or None;
* :meth:`~LayerRule.forward`: ``(y, aux)``, ``aux`` being what the other steps reuse (a mask, indices);
* :meth:`~LayerRule.r_forward`: ``R{y}`` from ``R{x}`` (None: zero) and the layer's own direction;
* :meth:`~LayerRule.backward_input`: ``g_x`` from ``g_y``;
* :meth:`~LayerRule.backward_params`: the plain backward step, ``g_x`` and the parameter gradients;
* :meth:`~LayerRule.r_backward`: ``R{g_x}`` and ``R{parameter gradients}`` from ``R{g_y}``;
* :attr:`~LayerRule.second_order`: whether the R-backward also reads the primal ``g_y`` and ``R{x}``
  (parametrised layers and curved activations; piecewise-linear layers pass ``R`` through their masks);
* :meth:`~LayerRule.bind` (graph plan): which argument of a call is ``x`` and which are constants the rule
  reads (an attention mask, handed to it in ``p`` by name); :attr:`~LayerRule.returns_tuple`: the
  layer returns a tuple whose first entry is ``y``.

Parameters are dictionaries by the layer's local names (``weight``, ``bias``, ``out_proj.weight`` for a
submodule's); ``want`` is the set of local names whose gradients are asked for. Adding a layer kind means
adding one rule and one line in :data:`LAYER_RULES`.
"""

from __future__ import annotations

import inspect
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn


class LayerRule:
    """The interface; its defaults are those of the identity map (no parameters, ``R`` and ``g`` pass)."""

    second_order = False
    returns_tuple = False

    def __init__(self, layer: nn.Module):
        self.layer = layer

    @classmethod
    def why_unsupported(cls, layer: nn.Module, bn_mode: str) -> Optional[str]:
        return None

    @classmethod
    def bind(cls, layer: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """``(x, constants, reason)`` for a call ``layer(*args, **kwargs)``: the argument that is the input,
        ``{name: argument}`` of the others the rule reads from ``p``, and why the call is unsupported (or None)."""
        if len(args) != 1 or kwargs:
            return None, {}, "not one tensor input"
        return args[0], {}, None

    @classmethod
    def variant(cls, layer: nn.Module, bn_mode: str) -> type["LayerRule"]:
        """The rule class that handles ``layer`` in BatchNorm mode ``bn_mode`` (this one, by default)."""
        return cls

    def forward(self, x: torch.Tensor, p: dict) -> tuple:
        return x, None

    def r_forward(self, rx, x, aux, p: dict, v: dict):
        """``R{y}``; the plan calls it only when ``R{x}`` or ``v`` is non-zero."""
        return rx

    def backward_input(self, g: torch.Tensor, x, aux, p: dict) -> torch.Tensor:
        return g

    def backward_params(self, g, x, aux, p: dict, want: set, need_input: bool) -> tuple:
        return (self.backward_input(g, x, aux, p) if need_input else None), {}

    def r_backward(self, rg, g, rx, x, aux, p: dict, v: dict, want: set, need_input: bool) -> tuple:
        """``(R{g_x}, {local name: R{g_param}})``; ``g`` and ``rx`` are None unless :attr:`second_order`."""
        return self.backward_params(rg, x, aux, p, want, need_input)


class IdentityRule(LayerRule):
    """``Identity`` and ``Dropout`` (switched off by the operators' curvature mode)."""


class LinearPassRule(LayerRule):
    """A fixed linear map (``Flatten``, average pooling): ``R`` passes through it, the backward is its transpose."""

    def forward(self, x, p):
        return self.layer(x), None

    def r_forward(self, rx, x, aux, p, v):
        return self.layer(rx)

    def backward_input(self, g, x, aux, p):
        with torch.enable_grad():
            probe = torch.zeros_like(x, requires_grad=True)
            return torch.autograd.grad(self.layer(probe), probe, g)[0]  # linear: the transpose


class ReLURule(LayerRule):
    """Piecewise linear: the mask ``x > 0``, read from the saved input, carries ``R`` and ``g`` alike."""

    def forward(self, x, p):
        return torch.relu(x), None

    def r_forward(self, rx, x, aux, p, v):
        return torch.ops.aten.threshold_backward(rx, x, 0)

    def backward_input(self, g, x, aux, p):
        return torch.ops.aten.threshold_backward(g, x, 0)


class LeakyReLURule(LayerRule):
    """Piecewise linear with slope ``negative_slope`` where ``x <= 0`` (``leaky_relu_backward``'s convention)."""

    def forward(self, x, p):
        return F.leaky_relu(x, self.layer.negative_slope), None

    def r_forward(self, rx, x, aux, p, v):
        return self.backward_input(rx, x, aux, p)

    def backward_input(self, g, x, aux, p):
        return torch.ops.aten.leaky_relu_backward(g, x, self.layer.negative_slope, False)


class MaxPoolRule(LayerRule):
    """Piecewise linear: the pooling indices pick ``R{x}`` and scatter ``g`` back."""

    @classmethod
    def why_unsupported(cls, layer, bn_mode):
        return "MaxPool2d with dilation" if layer.dilation not in (1, (1, 1)) else None

    def forward(self, x, p):
        layer = self.layer
        return F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, 1, layer.ceil_mode,
                            return_indices=True)

    def r_forward(self, rx, x, aux, p, v):
        n, c = aux.shape[:2]
        return rx.reshape(n, c, -1).gather(2, aux.reshape(n, c, -1)).view(aux.shape)

    def backward_input(self, g, x, aux, p):
        layer = self.layer
        return torch.ops.aten.max_pool2d_with_indices_backward(
            g, x, _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding), [1, 1], layer.ceil_mode, aux)


class SmoothActivationRule(LayerRule):
    """An elementwise ``y = s(x)`` with ``s''`` not zero: ``R{y} = s'(x) R{x}``, ``g_x = s'(x) g_y`` and
    ``R{g_x} = s'(x) R{g_y} + s''(x) R{x} g_y``. Subclasses give ``s`` and its two derivatives, from the
    input ``x`` or from ``aux`` (the output, for tanh and the sigmoid; both derivatives, for GELU)."""

    second_order = True

    def activation(self, x: torch.Tensor) -> tuple:
        """``(y, aux)``."""
        raise NotImplementedError

    def first(self, x: torch.Tensor, aux) -> torch.Tensor:
        """``s'(x)``."""
        raise NotImplementedError

    def second(self, x: torch.Tensor, aux, first: torch.Tensor) -> torch.Tensor:
        """``s''(x)``, given ``first = s'(x)``."""
        raise NotImplementedError

    def forward(self, x, p):
        return self.activation(x)

    def r_forward(self, rx, x, aux, p, v):
        return rx * self.first(x, aux)

    def backward_input(self, g, x, aux, p):
        return g * self.first(x, aux)

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        if not need_input:
            return None, {}
        first = self.first(x, aux)
        result = rg * first
        return (result if rx is None else result.addcmul_(self.second(x, aux, first) * rx, g)), {}


class TanhRule(SmoothActivationRule):
    """``s' = 1 - y^2``, ``s'' = -2 y s'`` from the output ``y``."""

    def activation(self, x):
        y = torch.tanh(x)
        return y, y

    def first(self, x, y):
        return 1.0 - y * y

    def second(self, x, y, first):
        return -2.0 * y * first


class SigmoidRule(SmoothActivationRule):
    """``s' = y (1 - y)``, ``s'' = s' (1 - 2 y)`` from the output ``y``."""

    def activation(self, x):
        y = torch.sigmoid(x)
        return y, y

    def first(self, x, y):
        return y * (1.0 - y)

    def second(self, x, y, first):
        return first * (1.0 - 2.0 * y)


_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_GELU_TANH_CUBIC = 0.044715  # torch's tanh approximation: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))


class GELURule(SmoothActivationRule):
    """``x Phi(x)``: ``s' = Phi + x phi``, ``s'' = phi (2 - x^2)``; for ``approximate="tanh"``,
    ``0.5 x (1 + t)`` with ``t = tanh(u)``, ``u = c (x + a x^3)``: ``s' = (1 + t)/2 + x (1 - t^2) u' / 2``,
    ``s'' = (1 - t^2) (u' + x (u'' - 2 t u'^2) / 2)``."""

    def activation(self, x):
        """``(y, (s', s'', kept))``: the derivatives (an ``erf`` and ``exp`` or a ``tanh`` each) once per
        batch; ``kept`` holds ``s'' g_y`` of the batch's output gradient (:func:`_kept`)."""
        return F.gelu(x, approximate=self.layer.approximate), (*self._derivatives(x), {})

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        """``s' R{g_y} + (s'' g_y) R{x}``: ``s'' g_y`` is the same in every product of a batch, so one
        multiplication and one fused multiply-add per product."""
        if not need_input:
            return None, {}
        result = rg * aux[0]
        if rx is None:
            return result, {}
        return result.addcmul_(_kept(aux[2], "g", (g,), lambda: aux[1] * g), rx), {}

    def first(self, x, aux):
        return aux[0]

    def second(self, x, aux, first):
        return aux[1]

    def _tanh_terms(self, x):
        t = torch.tanh(_SQRT_2_OVER_PI * (x + _GELU_TANH_CUBIC * x ** 3))
        du = _SQRT_2_OVER_PI * (1.0 + 3.0 * _GELU_TANH_CUBIC * x * x)
        return t, du

    def _derivatives(self, x) -> tuple:
        if self.layer.approximate == "tanh":
            t, du = self._tanh_terms(x)
            d2u = 6.0 * _SQRT_2_OVER_PI * _GELU_TANH_CUBIC * x
            return (0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * du,
                    (1.0 - t * t) * (du + 0.5 * x * (d2u - 2.0 * t * du * du)))
        density = torch.exp(-0.5 * x * x) / math.sqrt(2.0 * math.pi)
        return 0.5 * (1.0 + torch.erf(x / math.sqrt(2.0))) + x * density, density * (2.0 - x * x)


class SiLURule(SmoothActivationRule):
    """``x sigma(x)``: ``s' = sigma (1 + x (1 - sigma))``, ``s'' = sigma (1 - sigma) (2 + x (1 - 2 sigma))``."""

    def activation(self, x):
        return F.silu(x), None

    def first(self, x, aux):
        sig = torch.sigmoid(x)
        return sig * (1.0 + x * (1.0 - sig))

    def second(self, x, aux, first):
        sig = torch.sigmoid(x)
        return sig * (1.0 - sig) * (2.0 + x * (1.0 - 2.0 * sig))


class SoftplusRule(SmoothActivationRule):
    """``log(1 + exp(beta x)) / beta``, and ``x`` where ``beta x > threshold`` (as ``F.softplus``):
    ``s' = sigma(beta x)``, ``s'' = beta sigma (1 - sigma)``, and 1 and 0 on the linear part."""

    def activation(self, x):
        return F.softplus(x, self.layer.beta, self.layer.threshold), None

    def first(self, x, aux):
        z = self.layer.beta * x
        return torch.where(z > self.layer.threshold, torch.ones_like(x), torch.sigmoid(z))

    def second(self, x, aux, first):
        z = self.layer.beta * x
        return torch.where(z > self.layer.threshold, torch.zeros_like(x), self.layer.beta * first * (1.0 - first))


class LinearMapRule(LayerRule):
    """``y = W * x + b``, a convolution (zero padding, ``groups=1``) or a linear map.

    R-forward ``R{y} = W * R{x} + V_W * x + V_b``; R-backward ``R{g_x} = W^T R{g_y} + V_W^T g_y``,
    ``R{g_W} = R{g_y} (x) x + g_y (x) R{x}``, ``R{g_b} = sum R{g_y}``: two backward passes through the
    layer, of ``R{g_y}`` with ``(x, W)`` and of ``g_y`` with ``(R{x}, V_W)``. ``aux``: the output's shape.
    """

    second_order = True

    def __init__(self, layer):
        super().__init__(layer)
        self.conv = isinstance(layer, nn.Conv2d)

    @classmethod
    def why_unsupported(cls, layer, bn_mode):
        if isinstance(layer, nn.Conv2d) and (layer.groups != 1 or layer.padding_mode != "zeros"
                                             or isinstance(layer.padding, str)):
            return f"{type(layer).__name__} with groups/padding mode/string padding"
        return None

    def _map(self, x, weight, bias=None):
        layer = self.layer
        return F.conv2d(x, weight, bias, layer.stride, layer.padding, layer.dilation) if self.conv else \
            F.linear(x, weight, bias)

    def forward(self, x, p):
        y = self._map(x, p["weight"], p.get("bias"))
        return y, y.shape

    def r_forward(self, rx, x, aux, p, v):
        if not self.conv:
            return self._linear_r_forward(rx, x, aux, p, v)
        out = None
        if rx is not None and "weight" in v:
            out = self._map(rx, p["weight"]) + self._map(x, v["weight"])
        elif rx is not None:
            out = self._map(rx, p["weight"])
        elif "weight" in v:
            out = self._map(x, v["weight"])
        if "bias" in v:
            bias = v["bias"].view(1, -1, 1, 1) if self.conv else v["bias"]
            out = bias.expand(aux) if out is None else out + bias
        return out

    def backward_input(self, g, x, aux, p):
        return self._backward(g, x, p["weight"], True, False, False)[0]

    def backward_params(self, g, x, aux, p, want, need_input):
        gi, gw, gb = self._backward(g, x, p["weight"], need_input, "weight" in want, "bias" in want)
        return gi, self._named(gw, gb)

    def _linear_r_forward(self, rx, x, aux, p, v):
        """A linear map's ``R{y}`` in one buffer: ``V_b + x V_W^T`` (addmm), then ``R{x} W^T`` added in place."""
        out = _linear_r_rows(x, v.get("weight"), rx, p["weight"], v.get("bias"))
        return v["bias"].expand(aux).contiguous() if out is None else out.view(aux)

    def _linear_r_backward(self, rg, g, rx, x, p, v, want, need_input) -> tuple:
        """A linear map's R-backward (:func:`_linear_r_grads`)."""
        gi, gw, gb = _linear_r_grads(rg, g, rx, x, p["weight"], v.get("weight"), "weight" in want,
                                     "bias" in want, need_input)
        return (None if gi is None else gi.view(x.shape)), self._named(gw, gb)

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        if not self.conv:
            return self._linear_r_backward(rg, g, rx, x, p, v, want, need_input)
        want_w, want_b = "weight" in want, "bias" in want
        gi, gw, gb = self._backward(rg, x, p["weight"], need_input, want_w, want_b)
        if "weight" in v or (want_w and rx is not None):
            gi2, gw2, _ = self._backward(g, rx if rx is not None else x, v.get("weight", p["weight"]),
                                         need_input and "weight" in v, want_w and rx is not None, False)
            gi = gi + gi2 if gi2 is not None else gi
            gw = gw + gw2 if gw2 is not None else gw
        return gi, self._named(gw, gb)

    @staticmethod
    def _named(gw, gb) -> dict:
        grads = {}
        if gw is not None:
            grads["weight"] = gw
        if gb is not None:
            grads["bias"] = gb
        return grads

    def _backward(self, g, x, weight, need_input: bool, need_weight: bool, need_bias: bool) -> tuple:
        """Input, weight and bias gradients (None where not needed) in one call of the backward kernel."""
        if not self.conv:
            gi = g @ weight if need_input else None
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need_weight else None
            return gi, gw, g.reshape(-1, g.shape[-1]).sum(0) if need_bias else None
        if not (need_input or need_weight or need_bias):
            return None, None, None
        layer = self.layer
        return tuple(torch.ops.aten.convolution_backward(
            g, x, weight, [weight.shape[0]] if need_bias else None, list(layer.stride), list(layer.padding),
            list(layer.dilation), False, [0, 0], 1, [need_input, need_weight, need_bias]))


class _ChannelAffineRule(LayerRule):
    """A per-channel ``y = gamma xhat + beta`` with ``aux = (xhat, s)``: ``g_gamma = sum g_y xhat``,
    ``g_beta = sum g_y`` whichever statistics ``xhat`` comes from."""

    second_order = True

    def backward_params(self, g, x, aux, p, want, need_input):
        grads = {}
        if "weight" in want:
            grads["weight"] = _sum_channels(g * aux[0])
        if "bias" in want:
            grads["bias"] = _sum_channels(g)
        return (self.backward_input(g, x, aux, p) if need_input else None), grads


class BatchNormEvalRule(_ChannelAffineRule):
    """BatchNorm with running statistics: the per-channel affine map ``y = gamma xhat + beta`` with
    ``xhat = (x - mean) s``, ``s = 1 / sqrt(var + eps)``; ``aux = (xhat, s)``.
    ``R{g_gamma} = sum R{g_y} xhat + g_y R{x} s``, ``R{g_x} = gamma s R{g_y} + V_gamma s g_y``."""

    second_order = True

    @classmethod
    def variant(cls, layer, bn_mode):
        """Batch statistics in ``train`` mode (the operators' curvature mode switches tracking off) and
        for layers that keep no running statistics."""
        return BatchNormTrainRule if bn_mode == "train" or layer.running_mean is None else cls

    def forward(self, x, p):
        layer = self.layer
        scale = torch.rsqrt(layer.running_var + layer.eps)
        xhat = (x - _bshape(layer.running_mean, x)) * _bshape(scale, x)
        y = xhat * _bshape(p["weight"], x) + _bshape(p["bias"], x) if "weight" in p else xhat
        return y, (xhat, scale)

    def r_forward(self, rx, x, aux, p, v):
        xhat, scale = aux
        terms = [] if rx is None else [(scale * p["weight"] if "weight" in p else scale, rx)]
        if "weight" in v:
            terms.append((v["weight"], xhat))
        bias = _bshape(v["bias"] if "bias" in v else torch.zeros_like(scale), xhat)
        return _combine(bias, terms) if terms else bias.expand_as(xhat).contiguous()

    def backward_input(self, g, x, aux, p):
        scale = aux[1]
        return g * _bshape(scale * p["weight"] if "weight" in p else scale, g)

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        xhat, scale = aux
        grads = {}
        if "weight" in want:
            grads["weight"] = _sum_channels(rg * xhat)
            if rx is not None:
                grads["weight"] = grads["weight"] + scale * _sum_channels(g * rx)
        if "bias" in want:
            grads["bias"] = _sum_channels(rg)
        if not need_input:
            return None, grads
        if "weight" not in v:
            return self.backward_input(rg, x, aux, p), grads
        terms = [(scale * p["weight"], rg), (scale * v["weight"], g)]
        return _combine(torch.zeros_like(_bshape(scale, g)), terms), grads


class BatchNormTrainRule(_ChannelAffineRule):
    """BatchNorm with batch statistics. Per channel, ``E`` the mean over the batch (and spatial) axes,
    ``s = 1 / sqrt(var + eps)`` (biased variance, as torch normalises), ``xhat = (x - E x) s``,
    ``y = gamma xhat + beta``; ``aux = (xhat, s)``. With ``a = gamma g_y`` and ``k = E[xhat R{x}]``:

    * backward: ``g_x = s (a - E a - xhat E[a xhat])``, ``g_gamma = sum g_y xhat``, ``g_beta = sum g_y``;
    * R-forward: ``R{xhat} = s (R{x} - E R{x} - xhat k)``, ``R{y} = gamma R{xhat} + V_gamma xhat + V_beta``;
    * R-backward: ``R{s} = -s^2 k``, ``R{a} = gamma R{g_y} + V_gamma g_y``,
      ``R{g_x} = (R{s} / s) g_x + s (R{a} - E R{a} - R{xhat} E[a xhat] - xhat E[R{a} xhat + a R{xhat}])``,
      ``R{g_gamma} = sum R{g_y} xhat + g_y R{xhat}``, ``R{g_beta} = sum R{g_y}``.

    Every term is a per-channel multiple of ``R{g_y}``, ``g_y``, ``xhat``, ``R{x}`` or one, so each
    result is formed in one sweep from per-channel means (the elementwise passes, not the reductions,
    are what costs on a CPU). Every sample's output depends on every sample's input, so the rule is
    second order even without parameters.
    """

    second_order = True

    def forward(self, x, p):
        var, mean = torch.var_mean(x, dim=_other_dims(x), correction=0)
        scale = torch.rsqrt(var + self.layer.eps)
        y = _combine(_bshape(p["bias"] - p["weight"] * scale * mean, x) if "weight" in p else
                     _bshape(-scale * mean, x), [(p["weight"] * scale if "weight" in p else scale, x)])
        xhat = _combine(_bshape(-scale * mean, x), [(scale, x)])
        return y, (xhat, scale)

    def r_forward(self, rx, x, aux, p, v):
        xhat, s = aux
        gamma = p["weight"] if "weight" in p else torch.ones_like(s)
        c_xhat = v["weight"] if "weight" in v else torch.zeros_like(s)
        c0 = v["bias"] if "bias" in v else torch.zeros_like(s)
        terms = []
        if rx is not None:
            m_rx, k = _channel_mean(rx), _channel_mean(xhat, rx)
            terms.append((gamma * s, rx))
            c_xhat, c0 = c_xhat - gamma * s * k, c0 - gamma * s * m_rx
        terms.append((c_xhat, xhat))
        return _combine(_bshape(c0, xhat), terms)

    def backward_input(self, g, x, aux, p):
        xhat, s = aux
        gs = p["weight"] * s if "weight" in p else s
        return _combine(_bshape(-gs * _channel_mean(g), g), [(gs, g), (-gs * _channel_mean(g, xhat), xhat)])

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        xhat, s = aux
        count = xhat.numel() // xhat.shape[1]
        gamma = p["weight"] if "weight" in p else torch.ones_like(s)
        v_gamma = v.get("weight")
        e_rg, e_rg_xhat = _channel_mean(rg), _channel_mean(rg, xhat)
        needs_g = need_input or (rx is not None and "weight" in want)
        e_g, e_g_xhat = (_channel_mean(g), _channel_mean(g, xhat)) if needs_g else (None, None)
        k = m_rx = e_g_rxhat = 0.0
        if rx is not None:
            m_rx, k = _channel_mean(rx), _channel_mean(xhat, rx)
            if needs_g:  # E[g R{xhat}]
                e_g_rxhat = s * (_channel_mean(g, rx) - m_rx * e_g - k * e_g_xhat)
        grads = {}
        if "weight" in want:
            grads["weight"] = count * (e_rg_xhat + e_g_rxhat)
        if "bias" in want:
            grads["bias"] = count * e_rg
        if not need_input:
            return None, grads
        e_ra, e_ra_xhat = gamma * e_rg, gamma * e_rg_xhat
        c_g = -s * s * k * gamma
        if v_gamma is not None:
            e_ra, e_ra_xhat, c_g = e_ra + v_gamma * e_g, e_ra_xhat + v_gamma * e_g_xhat, c_g + s * v_gamma
        terms = [(s * gamma, rg), (c_g, g),
                 (-s * e_ra_xhat + 2.0 * s * s * k * gamma * e_g_xhat - s * gamma * e_g_rxhat, xhat)]
        if rx is not None:
            terms.append((-s * s * gamma * e_g_xhat, rx))
        c0 = -s * e_ra + s * s * gamma * (k * e_g + e_g_xhat * m_rx)
        return _combine(_bshape(c0, g), terms), grads


class LayerNormRule(LayerRule):
    """LayerNorm: :class:`BatchNormTrainRule`'s formulas with ``E`` the mean over the normalised (last)
    dimensions of each sample and position, and an elementwise (not per-channel) ``gamma``, ``beta``;
    the parameter gradients sum over the leading dimensions. ``aux = (xhat, s, kept)``, ``s`` per row;
    ``kept`` holds the primal backward's ``a = gamma g_y``, ``g_x``, ``E[a xhat]`` once per batch, and a
    product's ``R{xhat}``, ``k = E[xhat R{x}]`` from its R-forward to its R-backward (:func:`_kept`)."""

    second_order = True

    def _dims(self, x):
        return list(range(x.dim() - len(self.layer.normalized_shape), x.dim()))

    def _lead(self, x):
        return list(range(x.dim() - len(self.layer.normalized_shape)))

    def forward(self, x, p):
        var, mean = torch.var_mean(x, dim=self._dims(x), correction=0, keepdim=True)
        scale = torch.rsqrt(var + self.layer.eps)
        xhat = (x - mean) * scale
        y = xhat * p["weight"] if "weight" in p else xhat
        return (y + p["bias"] if "bias" in p else y), (xhat, scale, {})

    def _r_xhat(self, rx, aux) -> tuple:
        """``(R{xhat}, k)`` with ``R{xhat} = s (R{x} - E R{x} - xhat k)``."""
        xhat, scale, kept = aux

        def terms():
            dims = self._dims(rx)
            k = (xhat * rx).mean(dims, keepdim=True)
            return (rx - rx.mean(dims, keepdim=True)).addcmul_(xhat, k, value=-1.0).mul_(scale), k
        return _kept(kept, "r", (rx,), terms)

    def _normalise_backward(self, a, xhat, scale):
        """``s (a - E a - xhat E[a xhat])``."""
        dims = self._dims(a)
        return torch.addcmul(a - a.mean(dims, keepdim=True), xhat, (a * xhat).mean(dims, keepdim=True),
                             value=-1.0) * scale

    def _primal_backward(self, g, aux, p) -> tuple:
        """``(a, g_x, E[a xhat])`` of the output gradient ``g`` (kept: the same tensor in every product of a batch)."""
        xhat, scale, kept = aux

        def terms():
            a = g * p["weight"] if "weight" in p else g
            return a, self._normalise_backward(a, xhat, scale), (a * xhat).mean(self._dims(a), keepdim=True)
        return _kept(kept, "g", (g,), terms)

    def r_forward(self, rx, x, aux, p, v):
        xhat = aux[0]
        out = None
        if rx is not None:  # a fresh buffer (R{xhat} is kept for the R-backward), the other terms added in place
            rxhat = self._r_xhat(rx, aux)[0]
            out = rxhat * p["weight"] if "weight" in p else rxhat.clone()
        if "weight" in v:
            out = xhat * v["weight"] if out is None else out.addcmul_(xhat, v["weight"])
        if "bias" in v:
            out = (v["bias"].expand_as(xhat).contiguous()) if out is None else out.add_(v["bias"])
        return out

    def backward_input(self, g, x, aux, p):
        return self._primal_backward(g, aux, p)[1]

    def backward_params(self, g, x, aux, p, want, need_input):
        aux[2].pop("r", None)  # a GGN product's R-forward terms: not read again
        grads = {}
        if "weight" in want:
            grads["weight"] = (g * aux[0]).sum(self._lead(g))
        if "bias" in want:
            grads["bias"] = g.sum(self._lead(g))
        if not need_input:
            return None, grads
        return self._normalise_backward(g * p["weight"] if "weight" in p else g, aux[0], aux[1]), grads

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        xhat, scale, kept = aux
        rxhat, k = (None, None) if rx is None else self._r_xhat(rx, aux)
        kept.pop("r", None)  # this product's R-forward terms: read for the last time here
        grads = {}
        lead = self._lead(g)
        if "weight" in want:
            grads["weight"] = (rg * xhat if rxhat is None else (rg * xhat).addcmul_(g, rxhat)).sum(lead)
        if "bias" in want:
            grads["bias"] = rg.sum(lead)
        if not need_input:
            return None, grads
        # R{g_x} = s (R{a} - E R{a} - xhat (E[R{a} xhat] + E[a R{xhat}]) - k g_x - E[a xhat] R{xhat}), each
        # term a per-row multiple of one tensor, accumulated in place in the fresh buffer R{a}
        dims = self._dims(g)
        ra = rg * p["weight"] if "weight" in p else rg.clone()
        if "weight" in v:
            ra.addcmul_(g, v["weight"])
        e_ra = ra.mean(dims, keepdim=True)
        c_xhat = (ra * xhat).mean(dims, keepdim=True)
        if rxhat is not None:
            a, g_x, e_a_xhat = self._primal_backward(g, aux, p)
            c_xhat.add_((a * rxhat).mean(dims, keepdim=True))
        ra.sub_(e_ra).addcmul_(xhat, c_xhat, value=-1.0)
        if rxhat is not None:
            ra.addcmul_(g_x, k, value=-1.0).addcmul_(rxhat, e_a_xhat, value=-1.0)
        return ra.mul_(scale), grads


class EmbeddingRule(LayerRule):
    """``y = W[idx]``: linear in ``W`` and not differentiable in the (integer) input, so
    ``R{y} = V_W[idx]``, ``g_W`` and ``R{g_W}`` scatter ``g_y`` and ``R{g_y}`` back to the rows
    (``index_add``), and there is no second-order term."""

    @classmethod
    def why_unsupported(cls, layer, bn_mode):
        # the padding row moves the outputs but gets no gradient: autograd's "Hessian" is then not
        # symmetric (forward-over-reverse and reverse-over-reverse give transposes), so no rule matches both
        return "Embedding with padding_idx, max_norm or scale_grad_by_freq" if layer.padding_idx is not None \
            or layer.max_norm is not None or layer.scale_grad_by_freq else None

    def forward(self, x, p):
        return F.embedding(x, p["weight"]), None

    def r_forward(self, rx, x, aux, p, v):
        return F.embedding(x, v["weight"]) if "weight" in v else None

    def backward_input(self, g, x, aux, p):
        return None

    def backward_params(self, g, x, aux, p, want, need_input):
        if "weight" not in want:
            return None, {}
        dim = p["weight"].shape[1]
        return None, {"weight": torch.zeros_like(p["weight"]).index_add_(0, x.reshape(-1), g.reshape(-1, dim))}


_IN_PROJ = {"in_proj_weight", "in_proj_bias"}


class MultiheadAttentionRule(LayerRule):
    """Self-attention ``nn.MultiheadAttention(x, x, x, attn_mask=M)`` (``batch_first``) in the math form:
    ``[Q K V] = x W_in^T + b_in`` split into ``h`` heads of width ``d``, ``S = Q K^T / sqrt(d) + M``,
    ``P = softmax(S)`` by rows, ``O = P V`` (heads merged), ``y = O W_o^T + b_o``. With ``R{.}`` along the
    direction, ``g`` output gradients, ``^T`` over the last two axes and ``rowsum`` over the last:

    * R-forward: ``R{[Q K V]} = R{x} W_in^T + x V_in^T + V_b_in``, ``R{S} = (R{Q} K^T + Q R{K}^T) / sqrt(d)``,
      ``R{P} = P (R{S} - rowsum(P R{S}))``, ``R{O} = R{P} V + P R{V}``, ``R{y} = R{O} W_o^T + O V_o^T + V_b_o``;
    * backward: ``g_O = g_y W_o``, ``g_P = g_O V^T``, ``g_V = P^T g_O``, ``g_S = P (g_P - rowsum(P g_P))``,
      ``g_Q = g_S K / sqrt(d)``, ``g_K = g_S^T Q / sqrt(d)``, ``g_x = g_[QKV] W_in``, ``g_W_in = g_[QKV]^T x``,
      ``g_W_o = g_y^T O``, the biases' gradients the sums;
    * R-backward: each backward formula differentiated along the direction, the softmax's second-order
      term included: ``R{g_S} = P (R{g_P} - rowsum(P R{g_P})) + R{P} (g_P - rowsum(P g_P)) - P rowsum(R{P} g_P)``.

    ``M`` is a constant of the graph: boolean (True: not seen, a score of ``-inf`` and a weight of exactly
    zero) or float (added). ``aux``: ``Q``, ``K``, ``V`` by heads, ``P``, ``O``, and the primal backward's
    ``g_O``, ``g_P``, ``g_S``, ``g_[QKV]``, computed once per batch (the output gradient is the same
    tensor in every Hessian product of a batch), and for the R-backward the R-forward's ``R{[QKV]}``,
    ``R{P}``, ``R{O}`` of the same product (kept until then). Dropout is off in the operators' curvature mode.
    """

    second_order = True
    returns_tuple = True  # (output, attention weights or None)

    def __init__(self, layer):
        super().__init__(layer)
        self.scale = 1.0 / math.sqrt(layer.head_dim)

    @classmethod
    def why_unsupported(cls, layer, bn_mode):
        if not layer._qkv_same_embed_dim:
            return "MultiheadAttention with kdim/vdim other than embed_dim"
        if layer.bias_k is not None or layer.add_zero_attn:
            return "MultiheadAttention with add_bias_kv or add_zero_attn"
        return None if layer.batch_first else "MultiheadAttention with batch_first=False"

    @classmethod
    def bind(cls, layer, args, kwargs):
        try:
            call = inspect.signature(layer.forward).bind(*args, **kwargs).arguments
        except TypeError as error:
            return None, {}, f"arguments ({error})"
        if not (call["query"] is call["key"] is call["value"]):
            return None, {}, "not self-attention (query, key and value are different nodes)"
        if call.get("key_padding_mask") is not None:
            return None, {}, "a key_padding_mask"
        if call.get("is_causal"):
            return None, {}, "is_causal=True (pass the causal mask as attn_mask)"
        return call["query"], {"attn_mask": call.get("attn_mask")}, None

    # --- shapes: (..., T, E) <-> (..., h, T, d) -----------------------------------------------------
    def _heads(self, t):
        """Contiguous once, so the batched products that read it (most, twice) do not each copy it."""
        return t.unflatten(-1, (self.layer.num_heads, -1)).transpose(-3, -2).contiguous()

    @staticmethod
    def _merge(t):
        return t.transpose(-3, -2).flatten(-2)

    def forward(self, x, p):
        q, k, v = (self._heads(t) for t in F.linear(x, p["in_proj_weight"], p.get("in_proj_bias")).chunk(3, -1))
        scores = q @ k.transpose(-2, -1) * self.scale
        mask = p.get("attn_mask")
        if mask is not None:
            mask = mask.view(scores.shape) if mask.dim() == 3 and scores.dim() == 4 else mask  # (N h, T, T)
            scores = scores.masked_fill(mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
        prob = torch.softmax(scores, -1)
        o = self._merge(prob @ v)
        return F.linear(o, p["out_proj.weight"], p.get("out_proj.bias")), {"q": q, "k": k, "v": v, "prob": prob,
                                                                           "o": o}

    def _r_qkv(self, rx, x, p, v) -> Optional[list]:
        """``R{Q}, R{K}, R{V}`` by heads, or None (zero): the terms accumulated in one buffer (addmm)."""
        out = _linear_r_rows(x, v.get("in_proj_weight"), rx, p["in_proj_weight"], v.get("in_proj_bias"))
        if out is None:
            if "in_proj_bias" not in v:
                return None
            out = v["in_proj_bias"].expand(x.shape[:-1].numel(), -1)
        return self._split_heads(out.view(*x.shape[:-1], -1))

    def _split_heads(self, t) -> list:
        """``(..., T, 3 E)`` as three contiguous ``(..., h, T, d)`` tensors, in one copy."""
        heads = self.layer.num_heads
        t = t.unflatten(-1, (3, heads, -1)).movedim(-3, 0).transpose(-3, -2).contiguous()
        return list(t.unbind(0))

    def _r_attention(self, rqkv, aux) -> tuple:
        """``R{P}`` and ``R{O}`` (heads merged), accumulated in place on fresh buffers (baddbmm, addcmul)."""
        rq, rk, rv = (_b3(t) for t in rqkv)
        q, k, v, prob = _b3(aux["q"]), _b3(aux["k"]), _b3(aux["v"]), _b3(aux["prob"])
        prs = torch.bmm(rq, k.transpose(-2, -1)).baddbmm_(q, rk.transpose(-2, -1), beta=self.scale,
                                                          alpha=self.scale).mul_(prob)
        rp = prs.addcmul_(prob, prs.sum(-1, keepdim=True), value=-1.0)
        ro = torch.bmm(rp, v).baddbmm_(prob, rv)
        shape = aux["prob"].shape
        return rp.view(shape), self._merge(ro.view(*shape[:-1], -1))

    def _r_terms(self, rx, x, aux, p, v) -> tuple:
        """``(R{[QKV]}, R{P}, R{O})`` (Nones: zero), kept from this product's R-forward for its R-backward."""
        def terms():
            rqkv = self._r_qkv(rx, x, p, v)
            return (None, None, None) if rqkv is None else (rqkv, *self._r_attention(rqkv, aux))
        return _kept(aux, "r", (rx, v.get("in_proj_weight"), v.get("in_proj_bias")), terms)

    def r_forward(self, rx, x, aux, p, v):
        ro = self._r_terms(rx, x, aux, p, v)[2]
        out = None if ro is None else F.linear(ro, p["out_proj.weight"])
        if "out_proj.weight" in v:
            term = F.linear(aux["o"], v["out_proj.weight"], v.get("out_proj.bias"))
            out = term if out is None else out + term
        elif "out_proj.bias" in v:
            out = v["out_proj.bias"].expand_as(aux["o"]).contiguous() if out is None else out + v["out_proj.bias"]
        return out

    def _backward_core(self, g, aux, p) -> tuple:
        """``g_O`` (by heads), ``g_P``, ``g_P - rowsum(P g_P)``, ``g_S`` and ``g_[QKV]`` (merged) of ``g_y = g``."""
        q, k, v, prob = aux["q"], aux["k"], aux["v"], aux["prob"]
        go = self._heads(g @ p["out_proj.weight"])
        gp = go @ v.transpose(-2, -1)
        centred = gp - (prob * gp).sum(-1, keepdim=True)
        gs = prob * centred
        gqkv = torch.cat([self._merge(gs @ k * self.scale), self._merge(gs.transpose(-2, -1) @ q * self.scale),
                          self._merge(prob.transpose(-2, -1) @ go)], -1)
        return go, gp, centred, gs, gqkv

    def _primal_backward(self, g, aux, p) -> tuple:
        return _kept(aux, "g", (g,), lambda: self._backward_core(g, aux, p))

    def _grads(self, g, gqkv, x, o, want) -> dict:
        """The parameter gradients in ``want`` from ``g_y = g``, ``g_[QKV]``, the input and ``O``."""
        grads = {}
        if "in_proj_weight" in want:
            grads["in_proj_weight"] = _rows(gqkv).T @ _rows(x)
        if "in_proj_bias" in want:
            grads["in_proj_bias"] = _rows(gqkv).sum(0)
        if "out_proj.weight" in want:
            grads["out_proj.weight"] = _rows(g).T @ _rows(o)
        if "out_proj.bias" in want:
            grads["out_proj.bias"] = _rows(g).sum(0)
        return grads

    def backward_input(self, g, x, aux, p):
        return self._primal_backward(g, aux, p)[-1] @ p["in_proj_weight"]

    def backward_params(self, g, x, aux, p, want, need_input):
        aux.pop("r", None)  # a GGN product's R-forward terms: not read again
        if not (need_input or want & _IN_PROJ):
            return None, self._grads(g, None, x, aux["o"], want)
        gqkv = self._backward_core(g, aux, p)[-1]
        return (gqkv @ p["in_proj_weight"] if need_input else None), self._grads(g, gqkv, x, aux["o"], want)

    def r_backward(self, rg, g, rx, x, aux, p, v, want, need_input):
        shape = aux["prob"].shape
        q, k, vv, prob = _b3(aux["q"]), _b3(aux["k"]), _b3(aux["v"]), _b3(aux["prob"])
        go, gp, centred, gs, gqkv = self._primal_backward(g, aux, p)
        go, gp, centred, gs = _b3(go), _b3(gp), _b3(centred), _b3(gs)
        rqkv, rp, ro = self._r_terms(rx, x, aux, p, v)
        aux.pop("r", None)
        rgo, gw, gb = _linear_r_grads(rg, g, ro, aux["o"], p["out_proj.weight"], v.get("out_proj.weight"),
                                      "out_proj.weight" in want, "out_proj.bias" in want,
                                      bool(need_input or want & _IN_PROJ))
        grads = {k: t for k, t in (("out_proj.weight", gw), ("out_proj.bias", gb)) if t is not None}
        if rgo is None:
            return None, grads
        rgo = _b3(self._heads(rgo.view(rg.shape)))
        rgp, rgv = torch.bmm(rgo, vv.transpose(-2, -1)), torch.bmm(prob.transpose(-2, -1), rgo)
        if rqkv is not None:
            rq, rk, rv = (_b3(t) for t in rqkv)
            rp = _b3(rp)
            rgp.baddbmm_(go, rv.transpose(-2, -1))
            rgv.baddbmm_(rp.transpose(-2, -1), go)
        rows = (prob * rgp).sum(-1, keepdim=True)
        if rp is not None:
            rows.add_((rp * gp).sum(-1, keepdim=True))
        rgs = rgp.sub_(rows).mul_(prob)  # R{g_S}, in R{g_P}'s buffer (not read again)
        if rp is not None:
            rgs.addcmul_(rp, centred)
        rgq, rgk = torch.bmm(rgs, k), torch.bmm(rgs.transpose(-2, -1), q)
        if rqkv is not None:
            rgq.baddbmm_(gs, rk, beta=self.scale, alpha=self.scale)
            rgk.baddbmm_(gs.transpose(-2, -1), rq, beta=self.scale, alpha=self.scale)
        else:
            rgq.mul_(self.scale)
            rgk.mul_(self.scale)
        heads = shape[:-1] + (-1,)
        rgqkv = torch.stack([t.view(heads).transpose(-3, -2) for t in (rgq, rgk, rgv)], -3).flatten(-3)
        gi, gw, gb = _linear_r_grads(rgqkv, gqkv, rx, x, p["in_proj_weight"], v.get("in_proj_weight"),
                                     "in_proj_weight" in want, "in_proj_bias" in want, need_input)
        grads.update((k, t) for k, t in (("in_proj_weight", gw), ("in_proj_bias", gb)) if t is not None)
        return (None if gi is None else gi.view(x.shape)), grads


#: layer types and their rules; the first entry whose types match a layer is its rule
LAYER_RULES: list[tuple[tuple[type, ...], type[LayerRule]]] = [
    ((nn.Conv2d, nn.Linear), LinearMapRule),
    ((nn.BatchNorm1d, nn.BatchNorm2d), BatchNormEvalRule),
    ((nn.LayerNorm,), LayerNormRule),
    ((nn.Embedding,), EmbeddingRule),
    ((nn.MultiheadAttention,), MultiheadAttentionRule),
    ((nn.ReLU,), ReLURule),
    ((nn.LeakyReLU,), LeakyReLURule),
    ((nn.Tanh,), TanhRule),
    ((nn.Sigmoid,), SigmoidRule),
    ((nn.GELU,), GELURule),
    ((nn.SiLU,), SiLURule),
    ((nn.Softplus,), SoftplusRule),
    ((nn.MaxPool2d,), MaxPoolRule),
    ((nn.Flatten, nn.AvgPool2d, nn.AdaptiveAvgPool2d), LinearPassRule),
    ((nn.Dropout, nn.Identity), IdentityRule),
]


def rule_class(layer: nn.Module, bn_mode: str = "eval") -> Optional[type[LayerRule]]:
    """The rule for ``layer``'s kind (in BatchNorm mode ``bn_mode``), or None when the layer-wise path has none."""
    for types, rule in LAYER_RULES:
        if isinstance(layer, types):
            return rule.variant(layer, bn_mode)
    return None


def to_channels_last(t: torch.Tensor) -> torch.Tensor:
    """A 4-d tensor in the channels-last memory format (oneDNN's fast CPU kernels); others as they are."""
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _kept(kept: dict, slot: str, key: tuple, terms: Callable):
    """``terms()``, kept in ``kept[slot]`` while the tensors of ``key`` are the same objects: a rule's primal
    backward terms keyed by the output gradient (one tensor per batch, reused by every Hessian product), or a
    product's R-forward terms keyed by ``R{x}`` and the direction (reused by its R-backward; the R-backward, or
    a GGN product's plain backward, drops them)."""
    memo = kept.get(slot)
    if memo is not None and len(memo[0]) == len(key) and all(a is b for a, b in zip(memo[0], key)):
        return memo[1]
    value = terms()
    kept[slot] = (key, value)
    return value


def _b3(t: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """``(..., T, S)`` as ``(batch, T, S)`` for bmm/baddbmm (a view of the contiguous tensors the rules make)."""
    return None if t is None else t.reshape(-1, *t.shape[-2:])


def _bshape(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``like`` (channels in dim 1)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _channel_mean(a: torch.Tensor, b: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Per channel (dim 1): the mean of ``a``, or of ``a * b``."""
    return (a if b is None else a * b).mean(_other_dims(a))


def _combine(base: torch.Tensor, terms: list) -> torch.Tensor:
    """``base + sum_i c_i * t_i`` for per-channel vectors ``c_i``, one elementwise pass per term."""
    out = None
    for c, t in terms:
        out = torch.addcmul(base, _bshape(c, t), t) if out is None else out.addcmul_(_bshape(c, t), t)
    return out if out is not None else base


def _other_dims(t: torch.Tensor) -> list:
    return [d for d in range(t.dim()) if d != 1]


def _sum_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


def _linear_r_rows(x, v_weight, rx, weight, v_bias) -> Optional[torch.Tensor]:
    """``R{y}`` of ``y = x W^T + b`` as rows ``(n, out)`` in one buffer: ``V_b + x V_W^T`` (addmm), then
    ``R{x} W^T`` added in place; None when every term is zero (``v_bias`` alone is left to the caller)."""
    out = None
    for inputs, w in ((x, v_weight), (rx, weight)):
        if inputs is None or w is None:
            continue
        if out is not None:
            out.addmm_(_rows(inputs), w.T)
        elif v_bias is not None:
            out = torch.addmm(v_bias, _rows(inputs), w.T)
        else:
            out = _rows(inputs) @ w.T
    return out


def _linear_r_grads(rg, g, rx, x, weight, v_weight, want_weight: bool, want_bias: bool,
                    need_input: bool) -> tuple:
    """The R-backward of ``y = x W^T + b`` from ``g = g_y``, ``rg = R{g_y}``, the input ``x`` and ``rx = R{x}``
    (None: zero): ``R{g_W} = rg^T x + g^T rx``, ``R{g_b} = sum rg`` and, as rows, ``R{g_x} = rg W + g V_W``
    (``v_weight`` None: zero), each pair of terms in one buffer (addmm); None for what is not asked for.
    Used by the Linear rule and by attention's input and output projections."""
    gw = gb = gi = None
    if want_weight:
        gw = _rows(rg).T @ _rows(x)
        if rx is not None:
            gw.addmm_(_rows(g).T, _rows(rx))
    if want_bias:
        gb = _rows(rg).sum(0)
    if need_input:
        gi = _rows(rg) @ weight
        if v_weight is not None:
            gi.addmm_(_rows(g), v_weight)
    return gi, gw, gb


def _rows(t: torch.Tensor) -> torch.Tensor:
    """``(..., F)`` as ``(rows, F)``: a linear map's weight gradient contracts every leading axis."""
    return t.reshape(-1, t.shape[-1])


def _pair(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]
