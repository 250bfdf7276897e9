"""Hessian-vector products from gradients alone: central differences, optionally Richardson-extrapolated.

``H v ~ D(eps) = (g(w + eps v) - g(w - eps v)) / (2 eps)`` needs two gradients and no second derivative, so
it runs wherever gradients do (FSDP-sharded parameters, kernels without a double-backward formula).

Error of the central difference, with ``t = eps ||v||`` the length of the step in weight space (Taylor in
``eps``, the even terms cancel):

* truncation ``D(eps) - H v = eps^2 / 6 T[v, v, v] + O(eps^4)``, ``T`` the third derivative of the loss;
* rounding: each gradient carries an error ``~ u (||w|| ||H|| + |g|)`` (``u`` the unit roundoff, the
  ``||w||`` part from rounding ``w + eps v`` itself), divided by ``2 eps``.

Take the third derivative on the scale of the weights, ``||T[v,v,v]|| ~ ||H|| ||v||^3 / s`` with
``s = 1 + ||w||`` (the ``1`` for weights near zero); relative to ``||H v|| ~ ||H|| ||v||`` the two errors are
``(t / s)^2`` and ``u s / t``, balanced at ``t ~ u^(1/3) s``:

    ``eps = u^(1/3) (1 + ||w||) / ||v||``                       (central, relative error ~ u^(2/3))

One Richardson step ``R = (4 D(eps/2) - D(eps)) / 3`` cancels the ``eps^2`` term: truncation
``O(eps^4)``, i.e. ``(t / s)^4`` relative, while rounding grows by a constant, so the balance moves to
``t ~ u^(1/5) s``:

    ``eps = u^(1/5) (1 + ||w||) / ||v||``                       (Richardson, relative error ~ u^(4/5))

In float64 (``u = 2.2e-16``) that is a relative step of 6e-6 (central) and 7e-4 (Richardson); in float32
(``u = 1.2e-7``) 4.9e-3 and 4.1e-2. The rule is the textbook one for a directional derivative
(Nocedal & Wright, *Numerical Optimization*, section 8.1, for the cube root); the measured error against
exact products is in the README (``analysis=fd_error``).

Where the scale assumption fails: BatchNorm with batch statistics of a few samples curves the loss on a
scale set by the pre-activations' spread, not ``1 + ||w||`` (a tiny tanh net with BN measured 1e-8 at the
automatic step, 1e-11 without BN); and a loss that is not twice differentiable (ReLU, max-pooling) has a
gradient that jumps where a unit changes sign: the difference quotient counts those jumps, which the exact
Hessian (ReLU'' = 0) leaves out, so the error does not vanish at any step (measured in the README).
"""

from __future__ import annotations

from typing import Callable, Optional, Union

import torch

from curvature.errors import SuiteError
from curvature.operators import CurvatureOperator

__all__ = ["fd_step", "fd_hessian_product", "FiniteDifferenceHessian", "PRODUCTS", "finite_difference_operator"]

#: ``operator.product``: exact (double backward or layer-wise) or finite differences of gradients
PRODUCTS = ("exact", "finite_difference")
#: modules whose output is not twice differentiable in their input (a note warns about them)
PIECEWISE_LINEAR = (torch.nn.ReLU, torch.nn.ReLU6, torch.nn.LeakyReLU, torch.nn.PReLU, torch.nn.Hardtanh,
                    torch.nn.MaxPool1d, torch.nn.MaxPool2d, torch.nn.MaxPool3d, torch.nn.AdaptiveMaxPool2d)

Weights = Union[torch.Tensor, list, tuple, dict]


def fd_step(weight_norm: float, vector_norm: float, dtype: torch.dtype, richardson: bool = False) -> float:
    """The difference step ``eps`` for ``H v`` at weights of norm ``weight_norm`` (module docstring).

    ``eps = u^p (1 + weight_norm) / vector_norm`` with ``u`` the unit roundoff of ``dtype`` and ``p = 1/3``
    (central differences) or ``1/5`` (one Richardson step, which evaluates ``eps`` and ``eps / 2``).
    """
    if not vector_norm > 0.0 or not torch.isfinite(torch.tensor(float(vector_norm))):
        raise ValueError(f"fd_step needs a finite, positive vector norm, got {vector_norm}")
    if not weight_norm >= 0.0:
        raise ValueError(f"fd_step needs a finite, non-negative weight norm, got {weight_norm}")
    unit = torch.finfo(dtype).eps
    power = 1.0 / 5.0 if richardson else 1.0 / 3.0
    return unit ** power * (1.0 + float(weight_norm)) / float(vector_norm)


def _leaves(tree: Weights) -> list:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return list(tree.values())
    return list(tree)


def _rebuild(tree: Weights, leaves: list) -> Weights:
    if isinstance(tree, torch.Tensor):
        return leaves[0]
    if isinstance(tree, dict):
        return dict(zip(tree, leaves))
    return type(tree)(leaves)


def _norm(leaves: list) -> float:
    return float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(t.double()) for t in leaves])))


def fd_hessian_product(grad_fn: Callable[[Weights], Weights], params: Weights, v: Weights,
                       eps: Optional[float] = None, richardson: bool = False) -> Weights:
    """``H v`` as central differences of ``grad_fn``, the (full-data) gradient at given weights.

    ``params`` and ``v`` are one tensor, a list/tuple of tensors or a dict of tensors, with the same
    structure; ``grad_fn`` takes weights of that structure and returns the gradient in it; so does the
    result. ``params`` is never modified (``grad_fn`` gets new tensors ``w +- eps v``). ``eps=None`` takes
    :func:`fd_step` from the norms of ``params`` and ``v`` (pass ``eps`` when those norms need a reduction
    across processes). ``richardson=True`` returns ``(4 D(eps/2) - D(eps)) / 3``: four gradients, error
    ``O(eps^4)``. A zero ``v`` gives zeros without calling ``grad_fn``.
    """
    w, d = _leaves(params), _leaves(v)
    if len(w) != len(d) or any(a.shape != b.shape for a, b in zip(w, d)):
        raise ValueError("fd_hessian_product: params and v must have the same structure and shapes")
    if eps is None:
        vector_norm = _norm(d)
        if vector_norm == 0.0:
            return _rebuild(params, [torch.zeros_like(a) for a in w])
        eps = fd_step(_norm(w), vector_norm, w[0].dtype, richardson)
    if not eps > 0.0:
        raise ValueError(f"fd_hessian_product needs a positive step eps, got {eps}")

    def central(step: float) -> list:
        plus = _leaves(grad_fn(_rebuild(params, [a + step * b for a, b in zip(w, d)])))
        minus = _leaves(grad_fn(_rebuild(params, [a - step * b for a, b in zip(w, d)])))
        return [(p - m) / (2.0 * step) for p, m in zip(plus, minus)]

    coarse = central(eps)
    if not richardson:
        return _rebuild(params, coarse)
    fine = central(eps / 2.0)
    return _rebuild(params, [(4.0 * f - c) / 3.0 for f, c in zip(fine, coarse)])


class FiniteDifferenceHessian(CurvatureOperator):
    """The Hessian of the dataset's mean loss, P x P, as central differences of gradients.

    Per batch and vector, :func:`fd_hessian_product` of the batch gradient; the base class sums the batches
    with the exact operator's weights ``c_b``, so ``op @ v`` is the central difference of the full-data
    gradient ``sum_b c_b g_b`` (the difference is linear in the gradient). The step comes from the norms of
    the whole selected weight vector and of ``v`` (:func:`fd_step`, the same for every batch) unless
    ``step`` is a number: then ``w +- step v``. BatchNorm follows ``bn_mode`` as in the exact operator
    (batch statistics without running-stat updates, or running statistics). The weights are never
    written: the gradients are taken at new tensors through ``functional_call``. ``last_step`` is the step
    of the latest column. No layer-wise plan and no graph cache: a product is 2 gradients per batch (4 with
    ``richardson``), against about 2 for an exact product.
    """

    default_cache = "none"

    def __init__(self, model, loss_fn, batches, step: Union[str, float] = "auto", richardson: bool = False,
                 **kwargs):
        if not (step == "auto" or (isinstance(step, (int, float)) and not isinstance(step, bool)
                                   and 0.0 < float(step) < float("inf"))):
            raise ValueError(f"step must be auto or a positive number, got {step!r}")
        if not isinstance(richardson, bool):
            raise ValueError(f"richardson must be true or false, got {richardson!r}")
        if kwargs.get("layerwise") is True:
            raise SuiteError("operator.layerwise=true: finite-difference products take gradients through "
                             "autograd, not the layer-wise plan; set operator.layerwise=auto")
        self.step, self.richardson, self.last_step = step, richardson, None
        # the product mode the analyses report next to the exact Hessian's forward/reverse choice
        self.mode, self.mode_seconds = "finite_difference" + ("_richardson" if richardson else ""), {}
        kwargs["layerwise"], kwargs["cache"] = False, "none"  # a product keeps no primal between vectors
        super().__init__(model, loss_fn, batches, **kwargs)
        self.layerwise_reason = "finite differences of gradients (operator.product=finite_difference)"
        kinks = sorted({type(m).__name__ for m in model.modules() if isinstance(m, PIECEWISE_LINEAR)})
        if kinks:
            self.notes.append(f"the model has piecewise-linear modules ({', '.join(kinks)}): finite differences "
                              "also count the gradient's jumps at their kinks, which the exact Hessian leaves out "
                              "(the README measures the error); use operator.product=exact for such models")

    @property
    def engine(self) -> str:
        return "finite_difference"

    def _fresh_product(self, inputs, targets, params, vectors):
        fixed = self._fixed()

        def gradient(weights: dict) -> dict:
            leaves = {n: t.detach().requires_grad_(True) for n, t in weights.items()}
            with torch.enable_grad():
                loss = self.loss_fn(self._call({**fixed, **leaves}, inputs), targets)
                grads = torch.autograd.grad(loss, list(leaves.values()), materialize_grads=True)
            return dict(zip(leaves, grads))

        weight_norm = _norm(list(params.values()))
        columns = []
        for j in range(next(iter(vectors.values())).shape[0]):
            tangent = {n: t[j] for n, t in vectors.items()}
            vector_norm = _norm(list(tangent.values()))
            if vector_norm == 0.0:
                columns.append({n: torch.zeros_like(t) for n, t in tangent.items()})
                continue
            eps = fd_step(weight_norm, vector_norm, self.dtype, self.richardson) if self.step == "auto" \
                else float(self.step)
            self.last_step = eps
            columns.append(fd_hessian_product(gradient, params, tangent, eps, self.richardson))
        return {n: torch.stack([c[n] for c in columns]) for n in params}


def finite_difference_operator(name: str, model, loss_fn, batches, fd_step: Union[str, float] = "auto",
                               richardson: bool = False, **kwargs) -> FiniteDifferenceHessian:
    """``make_operator(name, ..., product="finite_difference")``: the Hessian only (the GGN and the Fisher
    are products of first derivatives already, and keep their exact routes)."""
    if name != "hessian":
        raise SuiteError(f"operator.product=finite_difference is for the Hessian only: the {name} keeps its "
                         "exact route (no second derivatives to replace); set operator.product=exact")
    kwargs.pop("mode", None)  # the exact Hessian's forward/reverse choice: no meaning here
    return FiniteDifferenceHessian(model, loss_fn, batches, step=fd_step, richardson=richardson, **kwargs)
