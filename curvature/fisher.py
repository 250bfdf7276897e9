"""The Fisher of a network over a dataset, empirical or Monte-Carlo, as products without forming it.

Write the dataset's loss as a weighted sum over **rows** (samples; the counted tokens of a language
model's ``(N, T, C)`` logits; the positions of ``(N, C, d...)`` logits): ``L(w) = sum_r k_r l_r(w)``,
with ``l_r`` row ``r``'s loss on its own, as a mean (its own mean-reduced loss: ``-log p(y_r | x_r)``
for cross-entropy, with label smoothing if set; the squared error averaged over the sample's ``c``
output entries for MSE) and ``k_r`` its share: ``w_r / sum_s w_s`` for ``reduction="mean"`` and ``w_r``
for ``"sum"``, where ``w_r`` is the row's weight in the loss's denominator (1; its target's class weight;
0 for an ignored token; ``c`` entries for MSE). Then, with ``g_r = d l_r / dw`` (P,):

* :class:`FisherOperator` ``kind="empirical"``: ``F = sum_r k_r g_r g_r^T`` (P x P, PSD). For a mean
  loss over ``N`` samples without class weights: ``F = (1/N) sum_i g_i g_i^T``, ``g_i`` the gradient of
  sample ``i``'s own loss (:func:`curvature.losses.mse_loss` of that sample alone, for MSE).
* ``kind="monte_carlo"``: the same with each row's target replaced by ``mc_samples`` draws from the
  model's predictive distribution, ``F = sum_r k_r (1/S) sum_s g_rs g_rs^T``: softmax for cross-entropy
  (``g_rs`` the gradient of ``-log p(yhat_rs | x_r)``, without label smoothing: the Fisher of the model's
  own distribution), and for MSE the Gaussian ``N(z_r, (c/2) I)`` whose negative log-likelihood ``l_r``
  is up to a constant. Either way ``E[F] = G``, the GGN of :class:`~curvature.operators.GGNOperator`
  (exactly, for cross-entropy without label smoothing and for MSE). Draws come from a generator seeded
  by ``(seed, batch index)``, are taken once per batch and weights, and are kept: every product sees the
  same matrix, as Lanczos needs.

A batch's product ``F_b v = sum_r k_r g_r (g_r^T v)`` runs over the rows' per-sample gradients: ``vmap``
over the samples of ``jacrev`` of the sample's row losses (``torch.func`` through ``functional_call``), in
chunks of about :data:`CHUNK_BYTES`. With the cache on (``cache="auto"``, the default) a batch's
``(rows, P)`` gradient matrix is kept while it fits the cache budget, and a product is then two matrix
products; otherwise every product recomputes the gradients.

BatchNorm: with running statistics (``bn_mode="eval"``) the samples are independent and ``F`` is exact.
With batch statistics (``bn_mode="train"``) a sample's loss depends on the whole batch, so per-sample
gradients are not defined: the operator refuses with a one-line error asking for ``bn_mode="eval"``.
"""

from __future__ import annotations

import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import jacrev, vmap

from curvature.batches import tensors_in, versions
from curvature.errors import SuiteError
from curvature.functional import curvature_mode
from curvature.losses import CrossEntropy, MeanSquaredError, as_loss
from curvature.microbatch import has_batch_statistics
from curvature.operators import CurvatureOperator

__all__ = ["FisherOperator", "FISHER_KINDS", "CHUNK_BYTES"]

FISHER_KINDS = ("empirical", "monte_carlo")
#: per-sample gradients are materialised in chunks of samples holding about this many bytes
CHUNK_BYTES = 2 ** 27


class FisherOperator(CurvatureOperator):
    """The empirical or Monte-Carlo Fisher ``sum_r k_r g_r g_r^T`` of the dataset's loss, P x P, PSD.

    See the module docstring for the rows ``r``, their shares ``k_r`` and gradients ``g_r``. For the
    mean cross-entropy over ``N`` samples: ``(1/N) sum_i g_i g_i^T`` with ``g_i`` the gradient of
    ``-log p(y_i | x_i)`` (empirical: the data's ``y_i``; Monte-Carlo: ``mc_samples`` draws
    ``yhat_i ~ softmax(f(x_i))``, averaged). ``kind``: ``"empirical"`` | ``"monte_carlo"``;
    ``mc_samples``: draws per row; ``seed``: seeds the draws. Other arguments as
    :class:`~curvature.operators.CurvatureOperator`; layer-wise products do not apply.
    """

    default_cache = "auto"

    def __init__(self, model: nn.Module, loss_fn: Callable, batches, bn_mode: str = "train", *,
                 kind: str = "empirical", mc_samples: int = 1, seed: int = 0, layerwise="auto", **kwargs):
        if kind not in FISHER_KINDS:
            raise SuiteError(f"the Fisher's kind must be empirical or monte_carlo, got {kind!r}")
        if isinstance(mc_samples, bool) or not isinstance(mc_samples, int) or mc_samples < 1:
            raise SuiteError(f"mc_samples must be a positive integer, got {mc_samples!r}")
        if layerwise is True:
            raise SuiteError("operator.layerwise=true: the Fisher has no layer-wise products (it is built from "
                             "per-sample gradients); set operator.layerwise=auto")
        if has_batch_statistics(model, bn_mode):
            raise SuiteError("the Fisher needs per-sample gradients, which BatchNorm with batch statistics "
                             "does not define (each sample's loss depends on its batch): use operator.bn_mode=eval")
        loss = as_loss(loss_fn)
        if kind == "monte_carlo" and not isinstance(loss, (CrossEntropy, MeanSquaredError)):
            raise SuiteError(f"the Monte-Carlo Fisher samples from a known predictive distribution (cross_entropy "
                             f"or mse), not from the loss {loss.describe()}: use operator.kind=empirical")
        self.kind, self.mc_samples, self.seed = kind, mc_samples if kind == "monte_carlo" else 1, int(seed)
        self.mode = "per_sample_gradients"
        self._draws: dict[int, tuple] = {}  # batch index -> (weights' state, drawn targets)
        super().__init__(model, loss, batches, bn_mode, layerwise=False, **kwargs)
        self.layerwise_reason = "the Fisher is built from per-sample gradients (torch.func), not layer-wise"
        if kind == "monte_carlo" and isinstance(loss, CrossEntropy) and loss.label_smoothing:
            self.notes.append("Monte-Carlo Fisher: draws from the softmax, gradients of -log p without the "
                              "loss's label smoothing (the Fisher of the model's own distribution)")

    @property
    def engine(self) -> str:
        return "per_sample_gradients"

    # --- the product of one batch ----------------------------------------------------------------
    def batch_product(self, inputs, targets, params: dict, vectors: dict) -> dict:
        """``F_b v`` for ``vectors`` ({name: (k, *shape)}), from the batch's kept gradients when possible."""
        kept = self._kept_gradients(inputs, targets, params)
        if kept is None:
            return self._fresh_product(inputs, targets, params, vectors)
        grads, coeffs, total = kept
        block = self.flatten(vectors, batched=True)
        return self.unflatten(self._normalise(grads.T @ (coeffs[:, None] * (grads @ block)), total))

    def _fresh_product(self, inputs, targets, params, vectors):
        block = self.flatten(vectors, batched=True)
        out, total = torch.zeros_like(block), 0.0
        for grads, coeffs, weight in self._gradient_chunks(inputs, targets, params):
            out += grads.T @ (coeffs[:, None] * (grads @ block))
            total += weight
        return self.unflatten(self._normalise(out, total))

    def _normalise(self, product: torch.Tensor, total: float) -> torch.Tensor:
        if self.loss.reduction == "sum":
            return product
        return product / total if total > 0 else torch.zeros_like(product)

    def gradients(self, inputs, targets, params: Optional[dict] = None):
        """``(G, coefficients, total weight)`` of one batch: ``G`` the (rows, P) per-row gradients (rows x
        draws for Monte-Carlo), so that the batch's mean-reduced Fisher is ``G^T diag(coefficients) G /
        total`` (``/ 1`` for a sum)."""
        params = self._selected() if params is None else params
        with curvature_mode(self.model, self.bn_mode):
            chunks = list(self._gradient_chunks(inputs, targets, params))
        return (torch.cat([c[0] for c in chunks]), torch.cat([c[1] for c in chunks]),
                sum(c[2] for c in chunks))

    def _gradient_chunks(self, inputs, targets, params: dict):
        """Per chunk of samples: (rows, P) gradients ``a_r`` with coefficients ``b_r`` such that the chunk's
        part of ``sum_r k_r g_r g_r^T`` times the batch's total weight is ``sum_r b_r a_r a_r^T``, and the
        chunk's weight ``sum_r w_r``."""
        n = int(targets.shape[0])
        drawn = self._drawn_for(inputs, targets, params) if self.kind == "monte_carlo" else None
        per_sample = jacrev(self._row_losses(), has_aux=True)
        batched = vmap(per_sample, in_dims=(None, 0, 0, None if drawn is None else 0))
        rows = max(1, targets[0].numel() if (isinstance(self.loss, CrossEntropy)
                                             and not targets.is_floating_point()) else 1) * self.mc_samples
        step = max(1, CHUNK_BYTES // (rows * self.num_params * _itemsize(self.dtype)))
        for start in range(0, n, step):
            stop = min(n, start + step)
            jac, (coeffs, weights) = batched(params, _rows_of(inputs, n, start, stop), targets[start:stop],
                                             None if drawn is None else drawn[start:stop])
            grads = torch.cat([jac[name].reshape(-1, size) for name, size in zip(self.names, self.sizes)], dim=1)
            yield grads, coeffs.reshape(-1).to(grads.dtype), float(weights.sum())

    def _row_losses(self) -> Callable:
        """``(params, x_i, y_i, drawn_i) -> (a_i (R,), (b_i (R,), w_i))`` for one sample, see above."""
        fixed, loss, kind, draws = self._fixed(), self.loss, self.kind, self.mc_samples

        def losses(params, x, y, drawn):
            z = self._call({**fixed, **params}, _one_sample(x))
            y = y.unsqueeze(0)
            if isinstance(loss, CrossEntropy):
                rows, t, _ = loss._rows(z, y)
                w = _row_weights(loss, rows, t)
                if kind == "empirical":
                    terms = F.cross_entropy(rows, t, weight=loss._weights(rows), ignore_index=loss.ignore_index,
                                            reduction="none", label_smoothing=loss.label_smoothing)
                    return terms, (torch.where(w > 0, 1.0 / torch.where(w > 0, w, 1.0), 0.0), w)
                logp = torch.log_softmax(rows, dim=-1)
                nll = -torch.gather(logp, 1, drawn.T)        # (R, S): draw s of row r
                return nll.T.reshape(-1), ((w / draws).repeat(draws), w)
            if isinstance(loss, MeanSquaredError):
                c = z.numel()
                if kind == "empirical":
                    term = ((z - loss._targets(z, y)) ** 2).sum().reshape(1)
                    return term, (torch.full((1,), 1.0 / c, dtype=z.dtype), torch.full((1,), float(c)))
                nll = ((z - drawn) ** 2).reshape(draws, -1).sum(1) / c  # drawn: (S, *z.shape[1:])
                return nll, (torch.full((draws,), c / draws, dtype=z.dtype), torch.full((1,), float(c)))
            return loss(z, y).reshape(1), (torch.ones(1, dtype=z.dtype), torch.ones(1))

        return losses

    # --- Monte-Carlo targets, drawn once per batch and weights -----------------------------------
    def sampled_targets(self, index: int) -> torch.Tensor:
        """The draws of batch ``index``: (n, S, rows per sample) class ids for cross-entropy, (n, S, *outputs
        of one sample) for MSE."""
        inputs, targets = self.batches[index]
        return self._drawn_for(inputs, targets, self._selected())

    def _drawn_for(self, inputs, targets, params: dict) -> torch.Tensor:
        """The draws for ``targets``: the operator's batch ``b`` (or a slice of it, as micro-batches and the
        pre-flight take) gets the draws made for ``b`` by the generator seeded with ``(seed, b)``."""
        state = tuple((id(t), t._version) for t in (*self.model.parameters(), *self.model.buffers()))
        for index, (x, y) in enumerate(self.batches):
            start = _row_offset(y, targets)
            if start is None:
                continue
            kept = self._draws.get(index)
            if kept is None or kept[0] != (state, versions(x), y._version):
                kept = ((state, versions(x), y._version), self._draw(x, y, params, index))
                self._draws[index] = kept
            return kept[1][start:start + int(targets.shape[0])]
        return self._draw(inputs, targets, params, -1)  # data of no batch of ours: seeded all the same

    def _draw(self, inputs, targets, params: dict, index: int) -> torch.Tensor:
        gen = torch.Generator().manual_seed((self.seed * 1_000_003 + index + 1) % 2 ** 63)
        with torch.no_grad():
            z = self._call({**self._fixed(), **params}, inputs).detach()
        n, draws = int(targets.shape[0]), self.mc_samples
        if isinstance(self.loss, CrossEntropy):
            rows = self.loss._rows(z, targets)[0]
            p = torch.softmax(rows.to(torch.float64), dim=-1).cpu()
            drawn = torch.multinomial(p, draws, replacement=True, generator=gen)       # (M, S)
            return drawn.reshape(n, -1, draws).transpose(1, 2).contiguous().to(z.device)
        noise = torch.randn((draws, *z.shape), generator=gen, dtype=torch.float64).to(z.device, z.dtype)
        scale = math.sqrt(z[0].numel() / 2.0)  # N(z, c/2): the Gaussian whose NLL the per-sample MSE is
        return (z.unsqueeze(0) + scale * noise).transpose(0, 1).contiguous()

    # --- kept gradients (the cache) ------------------------------------------------------------
    def _kept_gradients(self, inputs, targets, params: dict):
        """The batch's ``(G, coefficients, total)`` from the graph cache's store, built when it fits.

        Not through :meth:`GraphCache.get`: its saved-tensor hooks (which measure autograd graphs)
        stop ``torch.func`` transforms, and a gradient matrix's size is known before it is built.
        """
        cache = self.graph_cache
        if not (cache.enabled and cache.owns(inputs)):
            return None
        kept, key = cache.lookup(inputs, targets)
        if kept is not None:
            return kept
        rows = int(targets.numel() if isinstance(self.loss, CrossEntropy) and not targets.is_floating_point()
                   else targets.shape[0]) * self.mc_samples
        size = rows * self.num_params * _itemsize(self.dtype)
        if cache.budget_bytes is not None and cache.bytes + size > cache.budget_bytes:
            return None
        kept = self.gradients(inputs, targets, params)
        cache.graphs[id(inputs)] = (inputs, targets, key, kept)
        cache.bytes += sum(t.untyped_storage().nbytes() for t in tensors_in(kept[:2]))
        return kept


# --- helpers -----------------------------------------------------------------------------------------
def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def _row_weights(loss: CrossEntropy, rows: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Each row's weight in the mean's denominator: 1, its target's class weight, 0 when ignored."""
    if t.is_floating_point():
        return torch.ones(rows.shape[0], dtype=rows.dtype, device=rows.device)
    counted = (t != loss.ignore_index).to(rows.dtype)
    if loss.weight is None:
        return counted
    safe = torch.where(t != loss.ignore_index, t, torch.zeros_like(t))
    return loss._weights(rows)[safe] * counted


def _one_sample(x):
    """One sample's inputs (inside ``vmap``) as a batch of one."""
    if torch.is_tensor(x):
        return x.unsqueeze(0)
    if isinstance(x, dict):
        return {k: _one_sample(v) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_one_sample(v) for v in x)
    return x


def _rows_of(x, n: int, start: int, stop: int):
    """Samples ``start:stop`` of inputs with ``n`` rows (a tensor, or a dict/tuple of them)."""
    if torch.is_tensor(x):
        if not x.dim() or x.shape[0] != n:
            raise SuiteError(f"the Fisher takes per-sample gradients: every input tensor needs the batch's {n} "
                             f"samples in its first dimension, got shape {tuple(x.shape)}")
        return x[start:stop]
    if isinstance(x, dict):
        return {k: _rows_of(v, n, start, stop) for k, v in x.items()}
    if isinstance(x, (tuple, list)):
        return type(x)(_rows_of(v, n, start, stop) for v in x)
    return x


def _row_offset(whole: torch.Tensor, part: torch.Tensor) -> Optional[int]:
    """The first-dimension offset of ``part`` in ``whole`` when it is ``whole`` or a slice of its rows."""
    if part is whole:
        return 0
    if (part.dim() != whole.dim() or part.shape[1:] != whole.shape[1:] or whole.numel() == 0
            or part.untyped_storage().data_ptr() != whole.untyped_storage().data_ptr()
            or part.stride() != whole.stride()):
        return None
    shift = part.storage_offset() - whole.storage_offset()
    stride = whole.stride(0) or 1
    if shift % stride or not 0 <= shift // stride <= whole.shape[0] - part.shape[0]:
        return None
    return shift // stride
