"""The peers' Hessian trace estimators on the suite's model and batches (``analysis=trace analysis.peers``).

Each adapter returns :class:`curvature.trace.TraceEstimate` rows with the products the peer really ran
(its product function is counted), so the side-by-side table compares value, standard error and
products directly. Same model (BatchNorm in eval mode, dropout off, as ``experiments.peers``), the same
fixed list of batches, mean cross-entropy.

* ``hessian_eigenthings`` (1.0.0a5): ``hessian_eigenthings.trace(HessianOperator, num_matvecs=m,
  method="hutchinson" | "hutch++", seed=...)``; its Hutch++ runs ``3 * (m // 3)`` products (a third
  each for the sketch, the range and the complement) and reports the complement's standard error, as
  the suite's does. Its operator averages batches without size weights: the suite's matrix only for
  equal batch sizes (a note says so otherwise; ``operator.batch_size=479`` splits the 1437 digits evenly).
* ``pyhessian`` (PyPI 0.1): ``hessian(...).trace(maxIter=m, tol=0.0)``, Hutchinson with Rademacher
  vectors from the global torch RNG (seeded here); ``tol=0`` so that it runs all ``m`` products (its
  default ``tol=1e-3`` stops when the running mean changes by less than 0.1%). It returns the terms
  ``v^T H v`` only; the mean and standard error are computed here. It forces ``model.eval()``; the
  mode is restored and the gradients it leaves are cleared.

* ``curvlinops`` (3.0): ``hutchinson_trace``, ``hutchpp_trace`` and ``xtrace`` (Epperly, Tropp, Webber
  2024) on its ``HessianLinearOperator`` (Rademacher vectors from the global torch RNG, seeded here). They
  return the estimate only: no standard error (the row's is NaN); the products are counted as columns
  through the operator.

hessian_eigenthings and pyhessian draw their Rademacher vectors as ``randint(0, 2)`` from a CPU generator seeded with ``seed``
(hessian_eigenthings its own, pyhessian the global one, seeded here), parameter after parameter: the same
vectors, so their Hutchinson rows agree to rounding (measured on the digits CNN), a cross-check of their
products. The suite's estimators draw from their own named streams (:mod:`curvature.seeding`).
"""

from __future__ import annotations

import importlib
import math
import time
import warnings

import torch
import torch.nn.functional as F

from curvature.operators import curvature_mode
from curvature.trace import TraceEstimate
from experiments.peers import _Counted, missing

PEERS = ("hessian_eigenthings", "pyhessian", "curvlinops")


def peer_traces(name: str, model, batches, num_matvecs: int, seed: int) -> list[TraceEstimate]:
    """The peer's trace estimates of the mean cross-entropy's Hessian, ``num_matvecs`` products each.

    ``method`` of each row is ``<peer>:<its method>``; ``parts["seconds"]`` is the wall time of its call
    (operator set-up included), ``parts["notes"]`` what differs from the suite's setting.
    """
    if name not in PEERS:
        raise ValueError(f"unknown trace peer {name!r}: choose from {', '.join(PEERS)}")
    why = missing(name)
    if why:
        raise ImportError(why)
    with curvature_mode(model, "eval"):
        return {"hessian_eigenthings": _eigenthings, "pyhessian": _pyhessian,
                "curvlinops": _curvlinops}[name](model, batches, num_matvecs, seed)


def _eigenthings(model, batches, num_matvecs, seed) -> list[TraceEstimate]:
    import hessian_eigenthings as he
    notes = []
    if len({int(y.shape[0]) for _, y in batches}) > 1:
        notes.append("uneven batches: hessian_eigenthings averages batches without size weights")
    rows = []
    for method in ("hutchinson", "hutch++"):
        start = time.perf_counter()
        op = he.HessianOperator(model, batches, he.supervised_loss(F.cross_entropy), full_dataset=True)
        counted = op.matvec = _Counted(op.matvec)
        result = he.trace(op, num_matvecs=num_matvecs, method=method, seed=seed)
        rows.append(TraceEstimate(float(result.estimate), float(result.stderr), counted.calls,
                                  f"hessian_eigenthings:{method}", result.samples.detach().to("cpu", torch.float64),
                                  {"seconds": time.perf_counter() - start, "notes": notes}))
    return rows


def _pyhessian(model, batches, num_matvecs, seed) -> list[TraceEstimate]:
    pyh = importlib.import_module("pyhessian.hessian")
    was_training = model.training
    cuda = next(model.parameters()).device.type == "cuda"
    start = time.perf_counter()
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            torch.manual_seed(seed)
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            h = pyh.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=cuda)
            counted = h.dataloader_hv_product = _Counted(h.dataloader_hv_product)
            terms = torch.tensor(h.trace(maxIter=num_matvecs, tol=0.0), dtype=torch.float64)
    finally:
        model.train(was_training)
        model.zero_grad(set_to_none=True)  # pyhessian leaves create_graph gradients in .grad
    n = terms.numel()
    stderr = float(terms.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return [TraceEstimate(float(terms.mean()), stderr, counted.calls, "pyhessian:hutchinson", terms,
                          {"seconds": time.perf_counter() - start,
                           "notes": ["trace(maxIter=m, tol=0): all m products; stderr computed from its terms"]})]


def _curvlinops(model, batches, num_matvecs, seed) -> list[TraceEstimate]:
    import curvlinops as cl
    params = [p for p in model.parameters() if p.requires_grad]
    rows = []
    for method, estimate in (("hutchinson", cl.hutchinson_trace), ("hutch++", cl.hutchpp_trace),
                             ("xtrace", cl.xtrace)):
        start = time.perf_counter()
        op = cl.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, batches,
                                      check_deterministic=False)
        columns = [0]
        matmat = op._matmat

        def counted(x, matmat=matmat):
            columns[0] += x[0].shape[-1] if isinstance(x, (list, tuple)) else (x.shape[-1] if x.dim() > 1 else 1)
            return matmat(x)

        op._matmat = counted
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            value = float(estimate(op, num_matvecs=num_matvecs - (num_matvecs % 2 if method == "xtrace" else 0)))
        rows.append(TraceEstimate(value, math.nan, columns[0], f"curvlinops:{method}",
                                  torch.empty(0, dtype=torch.float64),
                                  {"seconds": time.perf_counter() - start,
                                   "notes": ["curvlinops returns no standard error"]}))
    return rows
