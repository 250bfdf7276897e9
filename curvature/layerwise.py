"""Layer-wise Hessian and GGN products for chains of layers (Pearlmutter's R-operator, by hand).

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

Each layer kind's part is one rule object (:mod:`curvature.layer_rules`); the plan only loops over
the layers. Supported layers: ``Conv2d`` (zero padding, ``groups=1``), ``Linear``, ``ReLU``,
``LeakyReLU``, ``Tanh``, ``Sigmoid``, ``GELU``, ``SiLU``, ``Softplus``, ``MaxPool2d``, ``AvgPool2d``,
``AdaptiveAvgPool2d``, ``Flatten``, ``Dropout`` (off), ``Identity``, ``LayerNorm``, ``Embedding`` (no
``padding_idx``), and ``BatchNorm1d/2d`` with running statistics (``bn_mode="eval"``) or batch statistics
(``bn_mode="train"``). Losses: those
with a closed-form output Hessian (:mod:`curvature.losses`: cross-entropy with class weights and label
smoothing, MSE; mean or sum reduction). The chain comes from the model's ``curvature_layers()`` when it
defines one (the suite's VGG, MLP and SmallCNN do), or from an ``nn.Sequential``; any other model
(ResNets' skip connections, a user's module) is traced by ``torch.fx`` into a
:class:`curvature.graph_plan.GraphPlan`, which runs the same rules over the graph. :func:`build_plan`
returns ``None`` with a reason for anything else (an unsupported layer or graph node, an untraceable
forward, other losses), and the operators fall back to autograd; they also check the plan against
autograd's product on the first batch before trusting it.
"""

from __future__ import annotations

from typing import Callable, Optional, Sequence, Union

import torch
from torch import nn

from curvature.layer_rules import LayerRule, rule_class, to_channels_last
from curvature.losses import Loss, as_loss


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
    rule = rule_class(layer, bn_mode)
    return f"layer type {type(layer).__name__}" if rule is None else rule.why_unsupported(layer, bn_mode)


def build_plan(model: nn.Module, loss_fn: Union[Callable, Loss], names: Sequence[str], bn_mode: str
               ) -> tuple[Optional["LayerwisePlan"], str]:
    """A plan for ``model`` or ``(None, reason)`` when the layer-wise path does not apply.

    ``loss_fn``: a loss callable or module, or a :class:`curvature.losses.Loss`; its output Hessian
    must have a closed form.
    """
    loss = as_loss(loss_fn)
    if not loss.closed_form:
        return None, f"the loss {loss.describe()} has no closed-form output Hessian"
    layers = layer_chain(model)
    if layers is None:
        from curvature.graph_plan import build_graph_plan  # residual networks and other traced graphs

        return build_graph_plan(model, loss, names, bn_mode)
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
    return LayerwisePlan(layers, prefix, loss, names, bn_mode), ""


class LayerwisePlan:
    """Primal pass, Hessian and GGN products of one batch for a chain of supported layers.

    ``params`` arguments are ``{full parameter name: tensor}`` for every parameter of the model;
    ``tangents`` ``{name: tensor}`` for the selected ones (``names``), and products return
    ``{name: tensor}`` for the selected ones. ``loss``: a :class:`curvature.losses.Loss` with a
    closed-form output Hessian.
    """

    def __init__(self, layers: list[nn.Module], prefix: dict, loss: Loss, names: Sequence[str],
                 bn_mode: str = "eval"):
        self.layers = layers
        self.rules: list[LayerRule] = [rule_class(layer, bn_mode)(layer) for layer in layers]
        self.loss = loss
        self.names = list(names)
        selected = set(self.names)
        self.keys: list[dict[str, str]] = []  # per layer: local parameter name -> full name
        for layer in layers:
            base = prefix.get(id(layer), "")
            self.keys.append({p: (f"{base}.{p}" if base else p) for p, _ in layer.named_parameters(recurse=False)})
        #: per layer: the local names of its selected parameters
        self.wanted = [{local for local, full in keys.items() if full in selected} for keys in self.keys]
        touched = [i for i, wanted in enumerate(self.wanted) if wanted]
        self.first = touched[0] if touched else len(layers)  # nothing below it is differentiated
        self.used = {full for keys in self.keys for full in keys.values()}
        self.has_conv = any(isinstance(layer, nn.Conv2d) for layer in layers)
        #: layers whose R-backward needs the primal output gradient and R{input}: the parametrised
        #: ones and the curved activations (piecewise-linear layers pass R through their masks)
        self.second_order = [rule.second_order for rule in self.rules]

    # --- the primal ----------------------------------------------------------------------------
    def forward(self, inputs: torch.Tensor, params: dict, keep: bool = False):
        """Outputs; with ``keep``, also each layer's saved input and auxiliary data (from ``first`` on)."""
        x, saved = inputs, []
        for index, rule in enumerate(self.rules):
            x_in = x
            x, aux = rule.forward(x, self._p(index, params))
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
            params = {n: to_channels_last(t) for n, t in params.items() if n in self.used}
        with torch.no_grad():
            outputs, saved = self.forward(inputs, params, keep=True)
            primal = {"saved": saved, "outputs": outputs, "grads": None, "params": params,
                      "channels_last": channels_last}
            if gradients:
                g = self.loss.gradient(outputs, targets)
                grads = [None] * len(self.layers)
                for index in range(len(self.layers) - 1, self.first - 1, -1):
                    if self.second_order[index]:  # only these layers' R-backward reads g
                        grads[index] = g
                    if index > self.first:
                        g = self.rules[index].backward_input(g, *saved[index], self._p(index, params))
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
            g = self.loss.hessian_product(primal["outputs"], targets, rxs[-1])
            out: dict[str, torch.Tensor] = {}
            for index in range(len(self.layers) - 1, self.first - 1, -1):
                rule, keys, want = self.rules[index], self.keys[index], self.wanted[index]
                x, aux = primal["saved"][index]
                p, need_input = self._p(index, params), index > self.first
                if hessian:
                    g, grads = rule.r_backward(g, primal["grads"][index], rxs[index], x, aux, p,
                                               self._v(index, tangents), want, need_input)
                else:
                    g, grads = rule.backward_params(g, x, aux, p, want, need_input)
                for local, tensor in grads.items():
                    out[keys[local]] = tensor
        return {n: out[n] for n in self.names}

    def _r_forward(self, primal: dict, params: dict, tangents: dict) -> list:
        """R{input} of every layer from ``first`` on, and R{output} last (None: zero)."""
        rx, rxs = None, [None] * (len(self.layers) + 1)
        for index in range(self.first, len(self.layers)):
            rxs[index] = rx if self.second_order[index] else None  # only these read R{input} again
            v = self._v(index, tangents)
            if rx is not None or v:  # otherwise R{output} is zero too
                x, aux = primal["saved"][index]
                rx = self.rules[index].r_forward(rx, x, aux, self._p(index, params), v)
        rxs[-1] = rx
        return rxs

    # --- helpers ---------------------------------------------------------------------------------
    @staticmethod
    def _tangents(primal: dict, tangents: dict) -> dict:
        return {n: to_channels_last(t) for n, t in tangents.items()} if primal["channels_last"] else tangents

    def _p(self, index: int, params: dict) -> dict:
        return {local: params[full] for local, full in self.keys[index].items()}

    def _v(self, index: int, tangents: dict) -> dict:
        return {local: tangents[full] for local, full in self.keys[index].items() if full in tangents}

