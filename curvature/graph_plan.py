"""Layer-wise Hessian and GGN products for networks that are graphs, not chains (residual networks).

:mod:`curvature.layerwise` runs Pearlmutter's R-operator layer by layer down a chain. A residual
network is a directed acyclic graph of the same layers plus a few tensor functions, which
``torch.fx.symbolic_trace`` writes out node by node. :class:`GraphPlan` runs the same steps over
that graph: the primal and the R-forward in the graph's (topological) order, the backward and the
R-backward in reverse, with gradients accumulating where a node's output feeds several nodes.

``call_module`` nodes use the layer rules (:mod:`curvature.layer_rules`); a rule's ``bind`` says which
argument is the differentiated input and which are constants it reads (``nn.MultiheadAttention``'s
self-attention: query, key and value one node, ``attn_mask`` a constant), and a layer whose input is a
constant (an ``Embedding`` of positions) is differentiated in its parameters only. A layer that returns a
tuple (attention) is read through its first entry. The functions below get small rules of their own:

* a sum of two tensors (``+``, ``torch.add``, ``Tensor.add``): ``R{z} = R{a} + R{b}``; its backward
  sends ``g`` to both inputs (summed back over broadcast axes);
* ``torch.cat``: ``R`` is concatenated, ``g`` split;
* reshapes (``flatten``, ``view``, ``reshape``, ``squeeze``, ``unsqueeze``, ``contiguous``) and a
  shift by a number (``x + 1``): ``R`` takes the output's shape, ``g`` the input's;
* fixed linear maps (``mean``, ``sum``, ``F.adaptive_avg_pool2d``, ``F.avg_pool2d``, multiplication
  or division by a number): ``R`` goes through the map, ``g`` through its transpose;
* ``F.relu`` / ``torch.relu`` / ``Tensor.relu``, ``torch.tanh``, ``torch.sigmoid`` (and their methods),
  ``F.silu``: the layer rules of ``ReLU``, ``Tanh``, ``Sigmoid``, ``SiLU``;
* ``x.size(...)``, ``x.shape``, ``x.dim()``, ``x.dtype``, ``x.device``, and any function of constants only
  (indexing, ``torch.arange(T)``, a causal mask, a ``torch.fx.wrap``-ped helper): constants of the primal
  pass, evaluated per batch.

Anything else (a ``get_attr`` node reading a parameter directly, a product of two tensors, several
outputs, an untraceable forward) gives ``(None, reason naming the node)``.
"""

from __future__ import annotations

import operator
from typing import Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import fx, nn

from curvature.layer_rules import (IdentityRule, LayerRule, ReLURule, SigmoidRule, SiLURule, TanhRule, rule_class,
                                   to_channels_last)
from curvature.losses import Loss

_ADD = {operator.add, operator.iadd, torch.add, "add"}
_CAT = {torch.cat, torch.concat}
_RESHAPE = {torch.flatten, torch.squeeze, torch.unsqueeze, torch.reshape,
            "flatten", "view", "reshape", "squeeze", "unsqueeze", "contiguous"}
_LINEAR = {torch.mean, torch.sum, F.adaptive_avg_pool2d, F.avg_pool2d, "mean", "sum",
           operator.mul, operator.truediv, operator.neg, torch.neg, "neg"}
_RELU = {F.relu, torch.relu, "relu"}
_SMOOTH = {torch.tanh: TanhRule, "tanh": TanhRule, torch.sigmoid: SigmoidRule, "sigmoid": SigmoidRule,
           F.silu: SiLURule}  # their rules read nothing from a layer
_CONSTANT = {"size", "dim", getattr, operator.getitem}  # shapes and their entries


def _describe(node: fx.Node) -> str:
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    return f"node {node.name} ({node.op} {target})"


class _Step:
    """One node of the plan: ``kind`` is ``rule`` (a layer rule on one tensor input), ``add``, ``cat`` or
    ``constant``; ``inputs`` the indices of its tensor inputs; ``keys`` local -> full parameter names."""

    def __init__(self, kind: str, inputs: list, rule: Optional[LayerRule] = None, keys: Optional[dict] = None,
                 call: Optional[Callable] = None, node: Optional[fx.Node] = None, bound: Optional[Callable] = None):
        self.kind, self.inputs, self.rule, self.keys = kind, inputs, rule, keys or {}
        self.call, self.node = call, node  # call(env) -> resolved (args, kwargs) for function rules
        self.bound = bound  # bound(env) -> {name: constant} a layer rule reads from p (an attention mask)


class _FunctionRule(LayerRule):
    """A tensor function of one tensor input; ``p`` carries the resolved call (a function of ``x``)."""

    def forward(self, x, p):
        return p["call"](x), p["call"]


class _ReshapeRule(_FunctionRule):
    """``R`` takes the output's shape, ``g`` the input's (reshapes, and shifts by a number)."""

    def forward(self, x, p):
        y = p["call"](x)
        return y, (x.shape, y.shape)

    def r_forward(self, rx, x, aux, p, v):
        return rx.reshape(aux[1])

    def backward_input(self, g, x, aux, p):
        return g.reshape(aux[0])


class _LinearFunctionRule(_FunctionRule):
    """A fixed linear map: ``R`` goes through it, ``g`` through its transpose (by autograd: it is linear)."""

    def r_forward(self, rx, x, aux, p, v):
        return aux(rx)

    def backward_input(self, g, x, aux, p):
        with torch.enable_grad():
            probe = torch.zeros_like(x, requires_grad=True)
            return torch.autograd.grad(aux(probe), probe, g)[0]


def build_graph_plan(model: nn.Module, loss: Loss, names: Sequence[str], bn_mode: str
                     ) -> tuple[Optional["GraphPlan"], str]:
    """A :class:`GraphPlan` from ``model``'s fx graph, or ``(None, reason)``."""
    try:
        graph = fx.symbolic_trace(model).graph
    except Exception as exc:  # noqa: BLE001 - any tracing failure means: no graph plan
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        return None, f"{type(model).__name__} is not a chain and torch.fx cannot trace it ({first})"
    steps: list[_Step] = []
    index: dict[fx.Node, int] = {}
    owned: dict[str, str] = {}
    output = None
    for node in graph.nodes:
        if node.op == "output":
            if not isinstance(node.args[0], fx.Node) or node.args[0] not in index:
                return None, f"{_describe(node)}: the output is not one tensor"
            output = index[node.args[0]]
            continue
        step, reason = _step(model, node, index, steps, bn_mode)
        if step is None:
            return None, reason
        for full in step.keys.values():
            if full in owned:
                return None, f"parameter {full} is used by two nodes ({owned[full]}, {node.name})"
            owned[full] = node.name
        index[node] = len(steps)
        steps.append(step)
    if sum(s.kind == "input" for s in steps) != 1:
        return None, "the model takes more than one input tensor"
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    missing = set(trainable) - set(owned)
    if missing:
        return None, f"the traced graph does not use every parameter (e.g. {sorted(missing)[0]})"
    return GraphPlan(steps, output, loss, names, any(isinstance(m, nn.Conv2d) for m in model.modules())), ""


def _step(model: nn.Module, node: fx.Node, index: dict, steps: list, bn_mode: str) -> tuple:
    """The plan's step for one fx node, or ``(None, reason)``."""
    def is_constant(arg) -> bool:
        return not isinstance(arg, fx.Node) or steps[index[arg]].kind == "constant"

    tensors = [a for a in node.all_input_nodes if a in index and not is_constant(a)]
    if node.op == "placeholder":
        return _Step("input", []), ""
    if node.op == "get_attr":
        return None, f"{_describe(node)}: reads a parameter or buffer outside a layer"
    tuples = [a for a in node.all_input_nodes if steps[index[a]].kind == "rule"
              and steps[index[a]].rule.returns_tuple]
    if tuples:  # a layer that returns (output, extras): only its output, entry 0, is differentiated
        source = tuples[0].name
        if not (node.target is operator.getitem and node.args[0] is tuples[0] and isinstance(node.args[1], int)):
            return None, f"{_describe(node)}: uses the tuple {source} returns other than by an index"
        if node.args[1] == 0:
            return _Step("rule", [index[tuples[0]]], IdentityRule(None)), ""
        if node.users:
            return None, f"{_describe(node)}: reads entry {node.args[1]} of {source} (only entry 0 is differentiated)"
        return _Step("constant", [], call=lambda env: None, node=node), ""  # an unused (..., _) unpacking
    if node.op == "call_module":
        return _module_step(model, node, index, tensors, is_constant, bn_mode)
    target = node.target
    if node.op not in ("call_function", "call_method"):
        return None, f"{_describe(node)}: unsupported"
    if (node.op == "call_method" and target in ("size", "dim")) or (target is getattr and node.args[1:] in (
            ("shape",), ("ndim",), ("dtype",), ("device",))) or all(is_constant(a) for a in node.all_input_nodes):
        return _Step("constant", [], call=_constant(node, index), node=node), ""
    operands = [a for a in node.args if isinstance(a, fx.Node) and not is_constant(a)]
    if target in _ADD and len(operands) == 2 and len(node.args) == 2 and not node.kwargs:
        return _Step("add", [index[a] for a in operands], node=node), ""
    if target in _CAT and len(node.args) >= 1 and isinstance(node.args[0], (list, tuple)) \
            and all(isinstance(a, fx.Node) and not is_constant(a) for a in node.args[0]):
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
        return _Step("cat", [index[a] for a in node.args[0]], call=dim, node=node), ""
    if len(tensors) != 1 or not isinstance(node.args[0] if node.args else None, fx.Node) \
            or node.args[0] is not tensors[0]:
        return None, f"{_describe(node)}: unsupported (not a function of one tensor)"
    if target in _RELU:
        rule = ReLURule(None)
    elif target in _SMOOTH:
        rule = _SMOOTH[target](None)
    elif target in _RESHAPE or (target in _ADD and len(node.args) == 2 and isinstance(node.args[1], (int, float))):
        rule = _ReshapeRule(None)
    elif target in _LINEAR and (target not in (operator.mul, operator.truediv)
                                or isinstance(node.args[1], (int, float))):
        rule = _LinearFunctionRule(None)
    else:
        return None, f"{_describe(node)}: unsupported"
    return _Step("rule", [index[tensors[0]]], rule, call=_resolver(node, index), node=node), ""


def _module_step(model: nn.Module, node: fx.Node, index: dict, tensors: list, is_constant: Callable,
                 bn_mode: str) -> tuple:
    """A layer rule's step: one input (a tensor, or a constant when the layer moves only with its parameters),
    other arguments constants the rule reads; ``(None, reason)`` otherwise."""
    layer = model.get_submodule(node.target)
    rule = rule_class(layer, bn_mode)
    reason = f"layer type {type(layer).__name__}" if rule is None else rule.why_unsupported(layer, bn_mode)
    if not reason:
        x, constants, reason = rule.bind(layer, node.args, dict(node.kwargs))
    if not reason:
        moving: list = []
        fx.node.map_arg(constants, lambda n: n if is_constant(n) else moving.append(n))
        if not isinstance(x, fx.Node) or tensors not in ([x], []) or (not tensors and not is_constant(x)):
            reason = "not one tensor input"
        elif moving:
            reason = f"argument {moving[0].name} is not a constant"
    if reason:
        return None, f"{_describe(node)}: {reason}"
    keys = {p: f"{node.target}.{p}" for p, _ in layer.named_parameters()}  # out_proj.weight for a submodule's
    bound = None
    if constants:
        def bound(env: list) -> dict:
            return dict(fx.node.map_arg(constants, lambda n: env[index[n]]))
    return _Step("rule", [index[x]], rule(layer), keys, node=node, bound=bound), ""


def _constant(node: fx.Node, index: dict) -> Callable:
    """``env -> value`` of a node of constants (``x.size(0)``, ``x.shape[1]``, ``torch.arange(T)``)."""
    def value(env: list):
        args = fx.node.map_arg(node.args, lambda n: env[index[n]])
        kwargs = fx.node.map_arg(dict(node.kwargs), lambda n: env[index[n]])
        if node.op == "call_method":
            return getattr(args[0], node.target)(*args[1:], **kwargs)
        return node.target(*args, **kwargs)

    return value


def _resolver(node: fx.Node, index: dict) -> Callable:
    """``env -> (x -> output)``: the node's function of its tensor input, other arguments resolved."""
    def resolve(env: list):
        rest = fx.node.map_arg(node.args[1:], lambda n: env[index[n]])
        kwargs = dict(fx.node.map_arg(dict(node.kwargs), lambda n: env[index[n]]))
        kwargs.pop("inplace", None)
        # the plan runs convolutions in the channels-last format, where a view may need a copy
        target = "reshape" if node.target == "view" else node.target
        if node.op == "call_method":
            return lambda x: getattr(x, target)(*rest, **kwargs)
        return lambda x: target(x, *rest, **kwargs)

    return resolve


class GraphPlan:
    """Primal pass, Hessian and GGN products of one batch for a traced graph of supported nodes.

    The same interface as :class:`curvature.layerwise.LayerwisePlan`: ``params`` are
    ``{full name: tensor}`` for every parameter, ``tangents`` and the products ``{name: tensor}`` for
    the selected ones (``names``).
    """

    def __init__(self, steps: list, output: int, loss: Loss, names: Sequence[str], has_conv: bool):
        self.steps, self.output, self.loss, self.names = steps, output, loss, list(names)
        self.has_conv = has_conv
        selected = set(self.names)
        self.wanted = [{local for local, full in s.keys.items() if full in selected} for s in steps]
        self.used = {full for s in steps for full in s.keys.values()}
        reaches = [False] * len(steps)  # reaches the output
        reaches[output] = True
        for i in range(len(steps) - 1, -1, -1):
            if reaches[i]:
                for j in steps[i].inputs:
                    reaches[j] = True
        moved = [False] * len(steps)  # depends on a selected parameter
        for i, s in enumerate(steps):
            moved[i] = bool(self.wanted[i]) or any(moved[j] for j in s.inputs)
        #: the nodes the products differentiate: downstream of a selected parameter, upstream of the output
        self.live = [m and r for m, r in zip(moved, reaches)]
        self.second_order = [self.live[i] and s.kind == "rule" and s.rule.second_order for i, s in enumerate(steps)]
        keep = set()
        for i, s in enumerate(steps):
            if self.live[i]:
                keep.update(s.inputs)
        keep.add(output)
        self.keep = keep  # outputs the products read again: live nodes' inputs and the model's output
        #: per node, the R{input} a second-order node reads in the R-backward
        self.keep_r = {j for i, s in enumerate(steps) if self.second_order[i] for j in s.inputs}
        last = {}
        for i, s in enumerate(steps):
            for j in s.inputs:
                last[j] = i
        self.last_use = last

    # --- the primal ----------------------------------------------------------------------------
    def prepare(self, inputs: torch.Tensor, targets: torch.Tensor, params: dict, gradients: bool) -> dict:
        """Saved node outputs and rule data, the output, and (Hessian) the second-order nodes' output gradients."""
        channels_last = self.has_conv and inputs.device.type == "cpu" and inputs.dim() == 4
        if channels_last:
            inputs = inputs.contiguous(memory_format=torch.channels_last)
            params = {n: to_channels_last(t) for n, t in params.items() if n in self.used}
        env: list = [None] * len(self.steps)
        aux: list = [None] * len(self.steps)
        with torch.no_grad():
            for i, s in enumerate(self.steps):
                if s.kind == "input":
                    env[i] = inputs
                elif s.kind == "constant":
                    env[i] = s.call(env)
                elif s.kind == "add":
                    a, b = (env[j] for j in s.inputs)
                    env[i], aux[i] = a + b, (a.shape, b.shape)
                elif s.kind == "cat":
                    parts = [env[j] for j in s.inputs]
                    env[i], aux[i] = torch.cat(parts, s.call), [t.shape[s.call] for t in parts]
                else:
                    p = self._p(i, params) if s.call is None else {"call": s.call(env)}
                    if s.bound is not None:
                        p.update(s.bound(env))
                    env[i], aux[i] = s.rule.forward(env[s.inputs[0]], p)
                    if self.live[i] and s.call is None:
                        aux[i] = (aux[i], p)
            outputs = env[self.output]
            saved = [t if i in self.keep else None for i, t in enumerate(env)]
            primal = {"saved": saved, "aux": aux, "outputs": outputs, "grads": None, "channels_last": channels_last}
            if gradients:
                grads: list = [None] * len(self.steps)
                g: list = [None] * len(self.steps)
                g[self.output] = self.loss.gradient(outputs, targets)
                for i in range(len(self.steps) - 1, -1, -1):
                    if not self.live[i] or g[i] is None:
                        continue
                    if self.second_order[i]:
                        grads[i] = g[i]
                    self._send(i, self._backward_input(primal, i, g[i]), g)
                    g[i] = None
                primal["grads"] = grads
        return primal

    def _backward_input(self, primal: dict, i: int, g: torch.Tensor) -> list:
        """The gradients of node ``i``'s live inputs (None for the others)."""
        s, aux = self.steps[i], primal["aux"][i]
        if s.kind == "add":
            return [g if g.shape == shape else g.sum_to_size(shape) for shape in aux]
        if s.kind == "cat":
            return list(torch.split(g, aux, s.call))
        if s.kind == "rule" and self.live[s.inputs[0]]:
            x = primal["saved"][s.inputs[0]]
            rule_aux, p = aux if s.call is None else (aux, None)
            return [s.rule.backward_input(g, x, rule_aux, p)]
        return [None]

    def _send(self, i: int, grads: list, acc: list) -> None:
        """Adds each input's gradient to its accumulator (live inputs only)."""
        for j, grad in zip(self.steps[i].inputs, grads):
            if grad is not None and self.live[j]:
                acc[j] = grad if acc[j] is None else acc[j] + grad

    # --- products ----------------------------------------------------------------------------
    def hessian(self, primal: dict, targets: torch.Tensor, tangents: dict) -> dict:
        """Hessian of the batch loss times one direction (``{name: tensor}`` over the selected names)."""
        return self._product(primal, targets, tangents, hessian=True)

    def ggn(self, primal: dict, targets: torch.Tensor, tangents: dict) -> dict:
        """GGN of the batch loss times one direction: ``J^T H_L J v`` (R-forward, then a backward pass)."""
        return self._product(primal, targets, tangents, hessian=False)

    def _product(self, primal: dict, targets: torch.Tensor, tangents: dict, hessian: bool) -> dict:
        if primal["channels_last"]:
            tangents = {n: to_channels_last(t) for n, t in tangents.items()}
        out: dict[str, torch.Tensor] = {}
        with torch.no_grad():
            rs = self._r_forward(primal, tangents)
            r_out = rs[self.output]
            outputs = primal["outputs"]
            rg: list = [None] * len(self.steps)
            rg[self.output] = self.loss.hessian_product(
                outputs, targets, r_out if r_out is not None else torch.zeros_like(outputs))
            for i in range(len(self.steps) - 1, -1, -1):
                if not self.live[i] or rg[i] is None:
                    continue
                s, g_i = self.steps[i], rg[i]
                rg[i] = None
                if s.kind != "rule":  # a sum or a concatenation: the transpose of its R-forward
                    self._send(i, self._backward_input(primal, i, g_i), rg)
                    continue
                rule_aux, p = primal["aux"][i] if s.call is None else (primal["aux"][i], None)
                j = s.inputs[0]
                x, need_input, want = primal["saved"][j], self.live[j], self.wanted[i]
                if hessian:
                    g_x, grads = s.rule.r_backward(g_i, primal["grads"][i], rs[j], x, rule_aux, p,
                                                   self._v(i, tangents), want, need_input)
                else:
                    g_x, grads = s.rule.backward_params(g_i, x, rule_aux, p, want, need_input)
                self._send(i, [g_x], rg)
                for local, tensor in grads.items():
                    out[s.keys[local]] = tensor
        return {n: out[n] for n in self.names}

    def _r_forward(self, primal: dict, tangents: dict) -> list:
        """``R{output}`` of every live node that a later step reads (None: zero)."""
        rs: list = [None] * len(self.steps)
        for i, s in enumerate(self.steps):
            if not self.live[i]:
                continue
            ins = [rs[j] for j in s.inputs]
            aux = primal["aux"][i]
            if s.kind == "add":
                present = [r for r in ins if r is not None]
                r = present[0] + present[1] if len(present) == 2 else present[0] if present else None
                if r is not None and r.shape != torch.broadcast_shapes(*aux):
                    r = r.expand(torch.broadcast_shapes(*aux))
            elif s.kind == "cat":
                parts = [r if r is not None else torch.zeros_like(primal["saved"][j]) for r, j in zip(ins, s.inputs)]
                r = torch.cat(parts, s.call) if any(t is not None for t in ins) else None
            elif s.call is not None:
                r = None if ins[0] is None else s.rule.r_forward(ins[0], primal["saved"][s.inputs[0]], aux, None, {})
            else:
                v = self._v(i, tangents)
                rule_aux, p = aux
                r = s.rule.r_forward(ins[0], primal["saved"][s.inputs[0]], rule_aux, p, v) \
                    if ins[0] is not None or v else None
            rs[i] = r
            for j in s.inputs:  # free what no later step reads
                if self.last_use.get(j) == i and j not in self.keep_r:
                    rs[j] = None
        return rs

    # --- helpers ---------------------------------------------------------------------------------
    def _p(self, i: int, params: dict) -> dict:
        return {local: params[full] for local, full in self.steps[i].keys.items()}

    def _v(self, i: int, tangents: dict) -> dict:
        return {local: tangents[full] for local, full in self.steps[i].keys.items() if full in tangents}

