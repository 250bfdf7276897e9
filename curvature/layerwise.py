"""Layer-wise Hessian and GGN products for sequential networks (Pearlmutter's R-operator, by hand).

Autograd's Hessian-vector product of a convolutional network differentiates the backward pass a
second time; for a convolution that second pass (``_convolution_double_backward``) computes the weight
terms as convolutions over transposed batch and channel axes, which on a CPU costs about as much again
as the kernels it needs. For a network that is a chain of standard layers the same product can be
written out layer by layer with the library's fastest kernels (forward convolution, and the input and
weight halves of ``convolution_backward``), which is what this module does.

For ``z = W * x + b`` (a convolution or a linear map) and a direction ``V`` in the weights, with
``R{.}`` the directional derivative along ``V``:

* R-forward:  ``R{z} = W * R{x} + V_W * x + V_b``;
* R-backward: ``R{g_x} = W^T R{g_z} + V_W^T g_z``, ``R{g_W} = R{g_z} (x) x + g_z (x) R{x}``,
  ``R{g_b} = sum R{g_z}``,

where ``g`` are the primal gradients of the loss and ``(x)`` is the weight-gradient contraction.
ReLU and max-pooling are piecewise linear, so ``R`` passes through their masks and indices; the
loss contributes ``R{g_out} = H_L R{z_out}`` with ``H_L`` in closed form. The Hessian product is
``R{g_W}``; the GGN product is the plain backward pass of ``H_L R{z_out}``.

What a product needs from the primal (each layer's input, ReLU masks, pooling indices and, for the
Hessian, each parametrised layer's output gradient) does not depend on the vector, so
:meth:`LayerwisePlan.prepare` computes it once per batch and :meth:`LayerwisePlan.hessian` /
:meth:`LayerwisePlan.ggn` reuse it for every product: the cache the operators keep.

Supported layers: ``Conv2d`` (zero padding, ``groups=1``), ``Linear``, ``ReLU``, ``Tanh``, ``Sigmoid``, ``MaxPool2d``,
``AvgPool2d``, ``AdaptiveAvgPool2d``, ``Flatten``, ``Dropout`` (off) and ``Identity``, and
``BatchNorm1d/2d`` normalising with running statistics (``bn_mode="eval"``). Losses: cross-entropy
and the suite's MSE, mean-reduced. The chain comes from the model's ``curvature_layers()`` when it
defines one (the suite's VGG, MLP and SmallCNN do), or from an ``nn.Sequential``.
:func:`build_plan` returns ``None`` with a reason for anything else (ResNets' skip connections,
BatchNorm with batch statistics, other losses), and the operators fall back to autograd; they also
check the chain against ``model(x)`` on the first batch before trusting it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from curvature import operators as _ops

_POOLS = (nn.AvgPool2d, nn.AdaptiveAvgPool2d)
_PASS = (nn.Dropout, nn.Identity)
_BN = (nn.BatchNorm1d, nn.BatchNorm2d)
_SMOOTH = (nn.Tanh, nn.Sigmoid)


def layer_chain(model: nn.Module) -> Optional[list[nn.Module]]:
    """The model as a flat list of layers applied in turn, or None if it does not say."""
    if hasattr(model, "curvature_layers"):
        layers = list(model.curvature_layers())
    elif isinstance(model, nn.Sequential):
        layers = list(model)
    else:
        return None
    flat: list[nn.Module] = []
    for layer in layers:
        if isinstance(layer, nn.Sequential):
            inner = layer_chain(layer)
            if inner is None:
                return None
            flat.extend(inner)
        else:
            flat.append(layer)
    return flat


def _unsupported(layer: nn.Module, bn_mode: str) -> Optional[str]:
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            return f"{type(layer).__name__} with groups/padding mode/string padding"
        return None
    if isinstance(layer, _BN):
        if bn_mode != "eval" or layer.running_mean is None:
            return "BatchNorm with batch statistics (bn_mode=train)"
        return None
    if isinstance(layer, nn.MaxPool2d):
        return "MaxPool2d with dilation" if layer.dilation not in (1, (1, 1)) else None
    if isinstance(layer, (nn.Linear, nn.ReLU, nn.Flatten, *_SMOOTH, *_POOLS, *_PASS)):
        return None
    return f"layer type {type(layer).__name__}"


def build_plan(model: nn.Module, loss_fn: Callable, names: Sequence[str], bn_mode: str
               ) -> tuple[Optional["LayerwisePlan"], str]:
    """A plan for ``model`` or ``(None, reason)`` when the layer-wise path does not apply."""
    if loss_fn is not F.cross_entropy and loss_fn is not _ops.mse_loss:
        return None, "the loss is not cross-entropy or the suite's MSE"
    layers = layer_chain(model)
    if layers is None:
        return None, f"{type(model).__name__} is not a chain of layers (no curvature_layers())"
    for layer in layers:
        reason = _unsupported(layer, bn_mode)
        if reason:
            return None, reason
    prefix = {id(m): name for name, m in model.named_modules()}
    owned: dict[str, tuple[int, str]] = {}
    for index, layer in enumerate(layers):
        for pname, _ in layer.named_parameters(recurse=False):
            if id(layer) not in prefix:
                return None, "a layer of curvature_layers() is not a submodule of the model"
            full = f"{prefix[id(layer)]}.{pname}" if prefix[id(layer)] else pname
            if full in owned:
                return None, f"parameter {full} is used by two layers"
            owned[full] = (index, pname)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if set(trainable) - set(owned):
        return None, "the layer chain does not use every parameter"
    return LayerwisePlan(layers, prefix, loss_fn, names), ""


def _bshape(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector shaped to broadcast over ``like`` (channels in dim 1)."""
    return t.view(1, -1, *([1] * (like.dim() - 2)))


def _sum_channels(t: torch.Tensor) -> torch.Tensor:
    return t.sum(dim=[d for d in range(t.dim()) if d != 1])


class LayerwisePlan:
    """Primal pass, Hessian and GGN products of one batch for a chain of supported layers.

    ``params`` arguments are ``{full parameter name: tensor}`` for every parameter of the model;
    ``tangents`` ``{name: tensor}`` for the selected ones (``names``), and products return
    ``{name: tensor}`` for the selected ones.
    """

    def __init__(self, layers: list[nn.Module], prefix: dict, loss_fn: Callable, names: Sequence[str]):
        self.layers = layers
        self.loss_fn = loss_fn
        self.names = list(names)
        self.keys: list[dict[str, str]] = []  # per layer: local parameter name -> full name
        for layer in layers:
            base = prefix.get(id(layer), "")
            self.keys.append({p: (f"{base}.{p}" if base else p) for p, _ in layer.named_parameters(recurse=False)})
        selected = set(self.names)
        touched = [i for i, keys in enumerate(self.keys) if selected & set(keys.values())]
        self.first = touched[0] if touched else len(layers)  # nothing below it is differentiated
        self.used = {full for keys in self.keys for full in keys.values()}
        self.has_conv = any(isinstance(layer, nn.Conv2d) for layer in layers)
        #: layers whose R-backward needs the primal output gradient and R{input}: the parametrised
        #: ones and the smooth activations (ReLU and max-pooling are piecewise linear)
        self.second_order = [isinstance(layer, (nn.Conv2d, nn.Linear, *_BN, *_SMOOTH)) for layer in layers]

    # --- the primal ----------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, params: dict, keep: bool = False):
        """Outputs; with ``keep``, also each layer's saved input and auxiliary data (from ``first`` on)."""
        x, saved = inputs, []
        for index, layer in enumerate(self.layers):
            x_in = x
            x, aux = self._forward(layer, x, self._p(index, params))
            saved.append((x_in, aux) if keep and index >= self.first else None)
        return x, saved

    def prepare(self, inputs: torch.Tensor, targets: torch.Tensor, params: dict, gradients: bool) -> dict:
        """Everything a product reuses: saved inputs and masks, output, and (Hessian) output gradients.

        On a CPU, convolutional networks run in the channels-last memory format (oneDNN's fast
        kernels: a CPU VGG gradient takes 0.7-0.9x the time); the results are the same tensors.
        """
        channels_last = self.has_conv and inputs.device.type == "cpu" and inputs.dim() == 4
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            params = {n: _to_cl(t) for n, t in params.items() if n in self.used}
        with torch.no_grad():
            outputs, saved = self.forward(inputs, params, keep=True)
            primal = {"saved": saved, "outputs": outputs, "grads": None, "params": params,
                      "channels_last": channels_last}
            if gradients:
                g = self._loss_gradient(outputs, targets)
                grads = [None] * len(self.layers)
                for index in range(len(self.layers) - 1, self.first - 1, -1):
                    if self.second_order[index]:  # only these layers' R-backward reads g
                        grads[index] = g
                    if index > self.first:
                        g = self._backward_input(self.layers[index], g, saved[index], self._p(index, params))
                primal["grads"] = grads
        return primal

    # --- products ----------------------------------------------------------------------------
    def hessian(self, primal: dict, targets: torch.Tensor, tangents: dict) -> dict:
        """Hessian of the batch loss times one direction (``{name: tensor}`` over the selected names)."""
        return self._product(primal, targets, tangents, hessian=True)

    def ggn(self, primal: dict, targets: torch.Tensor, tangents: dict) -> dict:
        """GGN of the batch loss times one direction: ``J^T H_L J v`` (R-forward, then a backward pass)."""
        return self._product(primal, targets, tangents, hessian=False)

    def _product(self, primal: dict, targets: torch.Tensor, tangents: dict, hessian: bool) -> dict:
        """R-forward to ``H_L R{z_out}``, then the R-backward (Hessian) or a plain backward of it (GGN)."""
        params, tangents = primal["params"], self._tangents(primal, tangents)
        with torch.no_grad():
            rxs = self._r_forward(primal, params, tangents)
            g = _ops.loss_hessian_product(self.loss_fn, primal["outputs"], targets, rxs[-1])
            out: dict[str, torch.Tensor] = {}
            for index in range(len(self.layers) - 1, self.first - 1, -1):
                if hessian:
                    g = self._r_backward(index, g, primal, rxs[index], params, tangents, out,
                                         need_input=index > self.first)
                else:
                    g = self._backward_params(index, g, primal["saved"][index], params, out,
                                              need_input=index > self.first)
        return {n: out[n] for n in self.names}

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _tangents(primal: dict, tangents: dict) -> dict:
        return {n: _to_cl(t) for n, t in tangents.items()} if primal["channels_last"] else tangents

    def _p(self, index: int, params: dict) -> dict:
        return {local: params[full] for local, full in self.keys[index].items()}

    def _v(self, index: int, tangents: dict) -> dict:
        return {local: tangents[full] for local, full in self.keys[index].items() if full in tangents}

    def _loss_gradient(self, outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        if self.loss_fn is F.cross_entropy:
            g = torch.softmax(outputs, dim=-1)
            if targets.is_floating_point():  # class probabilities (label smoothing, mixup)
                return (g - targets) / outputs.shape[0]
            g[torch.arange(g.shape[0], device=g.device), targets] -= 1.0
            return g / outputs.shape[0]
        if not targets.is_floating_point():
            targets = F.one_hot(targets, outputs.shape[-1]).to(outputs.dtype)
        return 2.0 * (outputs - targets) / outputs.numel()

    def _r_forward(self, primal: dict, params: dict, tangents: dict) -> list:
        """R{input} of every layer from ``first`` on, and R{output} last (None: zero)."""
        rx, rxs = None, [None] * (len(self.layers) + 1)
        for index in range(self.first, len(self.layers)):
            rxs[index] = rx if self.second_order[index] else None  # only these read R{input} again
            x, aux = primal["saved"][index]
            rx = self._r_layer(self.layers[index], rx, x, aux, self._p(index, params), self._v(index, tangents))
        rxs[-1] = rx
        return rxs

    @staticmethod
    def _forward(layer: nn.Module, x: torch.Tensor, p: dict):
        if isinstance(layer, nn.Conv2d):
            y = F.conv2d(x, p["weight"], p.get("bias"), layer.stride, layer.padding, layer.dilation)
            return y, y.shape
        if isinstance(layer, nn.Linear):
            y = F.linear(x, p["weight"], p.get("bias"))
            return y, y.shape
        if isinstance(layer, nn.ReLU):
            return torch.relu(x), None
        if isinstance(layer, _SMOOTH):
            y = torch.tanh(x) if isinstance(layer, nn.Tanh) else torch.sigmoid(x)
            return y, y
        if isinstance(layer, nn.MaxPool2d):
            return F.max_pool2d(x, layer.kernel_size, layer.stride, layer.padding, 1, layer.ceil_mode,
                                return_indices=True)
        if isinstance(layer, _BN):
            scale = torch.rsqrt(layer.running_var + layer.eps)
            xhat = (x - _bshape(layer.running_mean, x)) * _bshape(scale, x)
            y = xhat * _bshape(p["weight"], x) + _bshape(p["bias"], x) if "weight" in p else xhat
            return y, (xhat, scale)
        if isinstance(layer, nn.Flatten):
            return layer(x), None
        if isinstance(layer, _POOLS):
            return layer(x), None
        return x, None  # Dropout (off) and Identity

    @staticmethod
    def _r_layer(layer: nn.Module, rx, x, aux, p: dict, v: dict):
        """R{output} from R{input} (None: zero) and the layer's own direction ``v``."""
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            conv = isinstance(layer, nn.Conv2d)
            op = ((lambda a, w: F.conv2d(a, w, None, layer.stride, layer.padding, layer.dilation)) if conv
                  else (lambda a, w: F.linear(a, w)))
            out = None
            if rx is not None and "weight" in v:
                out = op(rx, p["weight"]) + op(x, v["weight"])
            elif rx is not None:
                out = op(rx, p["weight"])
            elif "weight" in v:
                out = op(x, v["weight"])
            if "bias" in v:  # aux: the output's shape
                bias = v["bias"].view(1, -1, 1, 1) if conv else v["bias"]
                out = bias.expand(aux) if out is None else out + bias
            return out
        if rx is None and not v:
            return None
        if isinstance(layer, nn.ReLU):  # the mask z > 0, from the saved input z
            return torch.ops.aten.threshold_backward(rx, x, 0)
        if isinstance(layer, _SMOOTH):
            return rx * _derivatives(layer, aux)[0]
        if isinstance(layer, nn.MaxPool2d):
            n, c = aux.shape[:2]
            return rx.reshape(n, c, -1).gather(2, aux.reshape(n, c, -1)).view(aux.shape)
        if isinstance(layer, _BN):
            xhat, scale = aux
            out = None if rx is None else rx * _bshape(scale * p["weight"] if "weight" in p else scale, rx)
            if "weight" in v:
                term = xhat * _bshape(v["weight"], xhat)
                out = term if out is None else out + term
            if "bias" in v:
                term = _bshape(v["bias"], xhat)
                out = term.expand_as(xhat).contiguous() if out is None else out + term
            return out
        return layer(rx)  # Flatten, pools (linear), Dropout/Identity

    def _backward_input(self, layer: nn.Module, g: torch.Tensor, saved, p: dict) -> torch.Tensor:
        """The primal gradient of the layer's input from that of its output."""
        x, aux = saved
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            return _layer_backward(layer, g, x, p["weight"], True, False, False)[0]
        if isinstance(layer, nn.ReLU):
            return torch.ops.aten.threshold_backward(g, x, 0)
        if isinstance(layer, _SMOOTH):
            return g * _derivatives(layer, aux)[0]
        if isinstance(layer, nn.MaxPool2d):
            return torch.ops.aten.max_pool2d_with_indices_backward(
                g, x, _pair(layer.kernel_size), _pair(layer.stride), _pair(layer.padding), [1, 1],
                layer.ceil_mode, aux)
        if isinstance(layer, _BN):
            scale = aux[1]
            return g * _bshape(scale * p["weight"] if "weight" in p else scale, g)
        if isinstance(layer, (nn.Flatten, *_POOLS)):
            with torch.enable_grad():
                probe = torch.zeros_like(x, requires_grad=True)
                return torch.autograd.grad(layer(probe), probe, g)[0]  # linear: the transpose
        return g

    def _backward_params(self, index: int, g, saved, params: dict, out: dict, need_input: bool):
        """Plain backward step: the selected parameters' gradients for output gradient ``g``."""
        layer, keys = self.layers[index], self.keys[index]
        p = self._p(index, params)
        x, aux = saved
        if isinstance(layer, (nn.Conv2d, nn.Linear)):  # input, weight and bias gradients in one call
            want_w = keys["weight"] in self.names
            want_b = "bias" in keys and keys["bias"] in self.names
            gi, gw, gb = _layer_backward(layer, g, x, p["weight"], need_input, want_w, want_b)
            if want_w:
                out[keys["weight"]] = gw
            if want_b:
                out[keys["bias"]] = gb
            return gi
        if isinstance(layer, _BN) and "weight" in keys:
            if keys["weight"] in self.names:
                out[keys["weight"]] = _sum_channels(g * aux[0])
            if keys["bias"] in self.names:
                out[keys["bias"]] = _sum_channels(g)
        return self._backward_input(layer, g, saved, p) if need_input else None

    def _r_backward(self, index: int, rg, primal: dict, rx, params: dict, tangents: dict, out: dict,
                    need_input: bool):
        """R{gradient of the input} from R{gradient of the output}; R{parameter gradients} into ``out``."""
        layer, keys = self.layers[index], self.keys[index]
        x, aux = primal["saved"][index]
        g = primal["grads"][index]
        p, v = self._p(index, params), self._v(index, tangents)
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            # Two backward passes through the layer: of R{g} with (x, W), and of g with (R{x}, V):
            # R{g_x} = W^T R{g} + V^T g,  R{g_W} = R{g} (x) x + g (x) R{x},  R{g_b} = sum R{g}.
            want_w = keys["weight"] in self.names
            want_b = "bias" in keys and keys["bias"] in self.names
            gi, gw, gb = _layer_backward(layer, rg, x, p["weight"], need_input, want_w, want_b)
            if "weight" in v or (want_w and rx is not None):
                gi2, gw2, _ = _layer_backward(layer, g, rx if rx is not None else x, v.get("weight", p["weight"]),
                                              need_input and "weight" in v, want_w and rx is not None, False)
                gi = gi + gi2 if gi2 is not None else gi
                gw = gw + gw2 if gw2 is not None else gw
            if want_w:
                out[keys["weight"]] = gw
            if want_b:
                out[keys["bias"]] = gb
            return gi
        if isinstance(layer, _BN):
            xhat, scale = aux
            if "weight" in keys:
                if keys["weight"] in self.names:
                    term = rg * xhat if rx is None else rg * xhat + g * rx * _bshape(scale, rx)
                    out[keys["weight"]] = _sum_channels(term)
                if keys["bias"] in self.names:
                    out[keys["bias"]] = _sum_channels(rg)
            if not need_input:
                return None
            result = self._backward_input(layer, rg, (x, aux), p)
            if "weight" in v:
                result = result + g * _bshape(scale * v["weight"], g)
            return result
        if isinstance(layer, _SMOOTH) and need_input:  # R{s'(z) g} = s'(z) R{g} + s''(z) R{z} g
            first, second = _derivatives(layer, aux)
            result = rg * first
            return result if rx is None else result + second * rx * g
        return self._backward_input(layer, rg, (x, aux), p) if need_input else None


def _derivatives(layer: nn.Module, y: torch.Tensor) -> tuple:
    """First and second derivatives of tanh or the logistic sigmoid, from the output ``y``."""
    if isinstance(layer, nn.Tanh):
        first = 1.0 - y * y
        return first, -2.0 * y * first
    first = y * (1.0 - y)
    return first, first * (1.0 - 2.0 * y)


def _pair(value) -> list:
    return list(value) if isinstance(value, (tuple, list)) else [value, value]


def _to_cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last) if t.dim() == 4 else t


def _layer_backward(layer: nn.Module, g: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, need_input: bool,
                    need_weight: bool, need_bias: bool) -> tuple:
    """Input, weight and bias gradients of a convolution or linear map (None where not needed)."""
    if isinstance(layer, nn.Linear):
        gi = g @ weight if need_input else None
        gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1]) if need_weight else None
        return gi, gw, g.reshape(-1, g.shape[-1]).sum(0) if need_bias else None
    if not (need_input or need_weight or need_bias):
        return None, None, None
    return tuple(torch.ops.aten.convolution_backward(
        g, x, weight, [weight.shape[0]] if need_bias else None, list(layer.stride), list(layer.padding),
        list(layer.dilation), False, [0, 0], 1, [need_input, need_weight, need_bias]))
