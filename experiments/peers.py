"""Adapters that run the same Lanczos job through other curvature packages (``analysis.peers``).

Every adapter gets the same model (dropout off, BatchNorm-free or in eval mode), the same list of
batches in a fixed order, the same mean cross-entropy loss, the same unit start vector and the same
number of Lanczos steps, and returns the same fields: Ritz values and weights of its tridiagonal, the
number of curvature products it ran, and notes on what had to be patched. Timing and memory are
measured around the call by ``experiments/benchmark.py``.

A language model's batches (``(N, T)`` token targets, ``(N, T, V)`` logits) reach every peer through
:class:`TokenRows`: the same model with its logits as ``(N T, V)`` rows and the targets as ``(N T,)``, so
each peer's mean cross-entropy over rows is the suite's mean token cross-entropy (each peer weights a
batch by its rows or samples, proportional to its tokens for the fixed-length windows of ``dataset=text``).

* ``pyhessian`` (PyPI 0.1): ``hessian(...).density(iter=m, n_v=1)``, its own Lanczos with full
  reorthogonalisation, one double-backward Hessian product per step (m products). Patched here:
  it calls ``torch.eig``, removed from torch, after the last step (replaced by ``torch.linalg.eigh``),
  and it draws its Rademacher start vector with ``torch.randint_like`` (replaced by the shared
  vector's signs; it normalises by ``norm + 1e-6``). It forces ``model.eval()``; the mode is restored.
* ``hessian_eigenthings`` (1.0.0a5): ``lanczos_tridiagonal(HessianOperator, v0, m)``, exactly m products
  (its ``lanczos(k=...)`` would run ``min(2k, n-1)`` steps). It averages batches without weights,
  which is the suite's matrix only for equal batch sizes (a note says so otherwise).
* ``curvlinops`` (3.0.1): ``HessianLinearOperator`` (``torch.func`` forward-over-reverse, no primal
  reuse, determinism check off) driven by the suite's Lanczos (m + 1 products, as the suite's rows).
* ``backpack`` (1.7.1): ``backpack.hessianfree.hvp.hessian_vector_product`` per batch (double
  backward via its R-op), batch-size weighted, driven by the suite's Lanczos (m + 1 products).
"""

from __future__ import annotations

import importlib
import types
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from curvature.lanczos import lanczos
from curvature.operators import curvature_mode

PEERS = ("pyhessian", "hessian_eigenthings", "curvlinops", "backpack")
MODULES = {"pyhessian": "pyhessian", "hessian_eigenthings": "hessian_eigenthings",
           "curvlinops": "curvlinops", "backpack": "backpack.hessianfree.hvp"}


@dataclass
class PeerResult:
    ritz_values: torch.Tensor   # (m,) float64, ascending
    ritz_weights: torch.Tensor  # (m,) float64, sum 1
    num_products: int
    notes: list[str] = field(default_factory=list)


def missing(name: str) -> str | None:
    """None when the peer imports; otherwise why not (with the install command)."""
    try:
        importlib.import_module(MODULES[name])
    except ImportError as error:
        return f"{name} is not installed ({error}); pip install --no-deps -r requirements/peers.txt"
    return None


def from_tridiagonal(alphas, betas) -> tuple[torch.Tensor, torch.Tensor]:
    """Ritz values and Gauss-quadrature weights of the tridiagonal with diagonal alphas."""
    alphas = torch.as_tensor(alphas, dtype=torch.float64).cpu()
    betas = torch.as_tensor(betas, dtype=torch.float64).cpu()[: len(alphas) - 1]
    t = torch.diag(alphas) + torch.diag(betas, 1) + torch.diag(betas, -1)
    values, vectors = torch.linalg.eigh(t)
    return values, vectors[0] ** 2


def _split(model, flat: torch.Tensor) -> list[torch.Tensor]:
    params = [p for p in model.parameters() if p.requires_grad]
    return [c.reshape(p.shape) for c, p in zip(torch.split(flat, [p.numel() for p in params]), params)]


class TokenRows(nn.Module):
    """``model`` with ``(N, T, V)`` logits reshaped to ``(N T, V)`` rows (the peers' losses take ``(rows, classes)``).

    With the targets flattened to ``(N T,)`` alongside, ``F.cross_entropy`` (mean over rows) is the mean
    token cross-entropy the suite's :class:`curvature.losses.CrossEntropy` computes from ``(N, T, V)``
    logits and ``(N, T)`` targets; the parameters are the model's, in the same order.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        logits = self.model(inputs)
        return logits.reshape(-1, logits.shape[-1])


def as_rows(model, batches) -> tuple:
    """``(model, batches)`` as a peer takes them: language-model batches (integer ``(N, T)`` targets) through
    :class:`TokenRows` with flattened targets, classification batches as they are."""
    if all(y.dim() == 1 or y.is_floating_point() for _, y in batches):
        return model, batches
    return TokenRows(model).train(model.training), [(x, y.reshape(-1)) for x, y in batches]


def run_peer(name: str, model, batches, start: torch.Tensor, num_steps: int) -> PeerResult:
    """Run ``num_steps`` Hessian Lanczos steps of the mean cross-entropy from unit vector ``start``."""
    why = missing(name)
    if why:
        raise ImportError(why)
    with curvature_mode(model, "eval"):  # restores every module's mode, the wrapper's too
        model, batches = as_rows(model, batches)
        return {"pyhessian": _pyhessian, "hessian_eigenthings": _eigenthings, "curvlinops": _curvlinops,
                "backpack": _backpack}[name](model, batches, start, num_steps)


@contextmanager
def _patched_pyhessian_torch(module, model, start: torch.Tensor):
    """Swap the ``torch`` that pyhessian.hessian sees: working ``eig``, the shared start vector."""
    signs = iter(_split(model, start))

    def randint_like(p, high=2, device=None):
        return (next(signs) > 0).to(p.dtype)  # pyhessian then maps 0 -> -1

    def eig(t, eigenvectors=True):
        values, vectors = torch.linalg.eigh(t.double())
        return (torch.stack([values, torch.zeros_like(values)], 1).to(t.dtype), vectors.to(t.dtype))

    shim = types.SimpleNamespace(**{k: getattr(torch, k) for k in dir(torch) if not k.startswith("__")})
    shim.randint_like, shim.eig = randint_like, eig
    original = module.torch
    module.torch = shim
    try:
        yield
    finally:
        module.torch = original


class _Counted:
    """A product function that counts its calls (every row reports the products it really used)."""

    def __init__(self, product):
        self.product, self.calls = product, 0

    def __call__(self, v):
        self.calls += 1
        return self.product(v)


def _pyhessian(model, batches, start, num_steps) -> PeerResult:
    pyh = importlib.import_module("pyhessian.hessian")  # the module (the package exports the class)
    was_training = model.training
    cuda = start.device.type == "cuda"
    with _patched_pyhessian_torch(pyh, model, start):
        h = pyh.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=cuda)
        counted = h.dataloader_hv_product = _Counted(h.dataloader_hv_product)
        with warnings.catch_warnings():  # its loss.backward(create_graph=True); .grad is cleared below
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            values, weights = h.density(iter=num_steps, n_v=1)
    model.train(was_training)
    model.zero_grad(set_to_none=True)  # pyhessian leaves create_graph gradients in .grad
    values = torch.tensor(values[0], dtype=torch.float64)
    order = torch.argsort(values)
    return PeerResult(values[order], torch.tensor(weights[0], dtype=torch.float64)[order], counted.calls,
                      ["patched: torch.eig -> torch.linalg.eigh; start vector from the shared one"])


def _eigenthings(model, batches, start, num_steps) -> PeerResult:
    import hessian_eigenthings as he
    op = he.HessianOperator(model, batches, he.supervised_loss(F.cross_entropy), full_dataset=True)
    counted = op.matvec = _Counted(op.matvec)
    td = he.lanczos_tridiagonal(op, start, num_steps, reorthogonalize=True)
    values, weights = from_tridiagonal(td.alphas, td.betas)
    notes = []
    if len({int(y.shape[0]) for _, y in batches}) > 1:
        notes.append("uneven batches: hessian_eigenthings averages batches without size weights")
    return PeerResult(values, weights, counted.calls, notes)


def _with_suite_lanczos(matvec, dim, start, num_steps, notes) -> PeerResult:
    counted = _Counted(matvec)
    res = lanczos(counted, dim, num_steps, start_vectors=start.unsqueeze(-1), dtype=start.dtype,
                  device=start.device, engine="gpytorch")  # m + 1 products, as the benchmark reports
    return PeerResult(res.ritz_values[0], res.ritz_weights[0], counted.calls, notes)


def _curvlinops(model, batches, start, num_steps) -> PeerResult:
    import curvlinops
    params = [p for p in model.parameters() if p.requires_grad]
    op = curvlinops.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, batches,
                                          progressbar=False, check_deterministic=False)
    return _with_suite_lanczos(lambda v: op @ v, start.numel(), start, num_steps,
                               ["HessianLinearOperator driven by the suite's Lanczos"])


def _backpack(model, batches, start, num_steps) -> PeerResult:
    from backpack.hessianfree.hvp import hessian_vector_product
    params = [p for p in model.parameters() if p.requires_grad]
    total = sum(int(y.shape[0]) for _, y in batches)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        columns = v.unsqueeze(-1) if v.dim() == 1 else v
        out = torch.zeros_like(columns)
        with torch.enable_grad():
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                for j in range(columns.shape[1]):
                    hv = hessian_vector_product(loss, params, _split(model, columns[:, j]))
                    out[:, j] += torch.cat([h.reshape(-1) for h in hv]) * (y.shape[0] / total)
        return out.squeeze(-1) if v.dim() == 1 else out

    return _with_suite_lanczos(matvec, start.numel(), start, num_steps,
                               ["backpack.hessianfree hessian_vector_product driven by the suite's Lanczos"])
