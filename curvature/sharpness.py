"""Curvature tracked during training: the top eigenvalue (sharpness), the trace and the spectrum of the
Hessian (or GGN) of the loss over a fixed set of batches, measured again and again as the weights move.

    tracker = CurvatureTracker(model, F.cross_entropy, batches, quantities=("top_eigenvalue", "trace"))
    for step in ...:                        # after each optimiser step (or every few)
        row = tracker.measure(step)         # {"step", "top_eigenvalue", "top_eigenvalue_residual", ...}
    state = tracker.state_dict()            # into the training checkpoint; load_state_dict(state) resumes

One operator (:func:`curvature.operators.make_operator`) is built once over ``batches``; its products
read the model's current weights each time (a per-batch graph kept from an earlier step is dropped:
its version counters changed), so a measurement sees the weights of the moment. Dropout is off and
BatchNorm writes nothing during products (:func:`curvature.functional.curvature_mode`), and nothing
here draws from the global random stream: training with tracking on follows the same path as without.

Quantities (``quantities``, any of :data:`QUANTITIES`), each by the suite's own estimator:

* ``top_eigenvalue``: the largest (algebraic) eigenvalue by :func:`curvature.top_eigen.top_eigenpairs`
  (thick-restart Lanczos, ``k=1``) to relative residual ``tol``, at most ``max_matvecs`` products; the
  row holds the eigenvalue, its true relative residual ``||H u - lambda u|| / |lambda|`` (one verifying
  product, counted in ``top_eigenvalue_products``) and whether it reached ``tol``. With ``warm_start``
  (default) each measurement starts from the previous one's Ritz vector: the operator changes little
  between close steps, so the start vector is already near the top eigenvector. ``compare_cold`` also
  runs the seeded cold start at each warm-started step and records its products
  (``top_eigenvalue_cold_products``, ``top_eigenvalue_cold``): :meth:`CurvatureTracker.warm_start_saving`
  sums both, a measured saving rather than a promise.
* ``trace``: Hutchinson's estimate with ``trace_probes`` Rademacher probes
  (:func:`curvature.trace.hutchinson`) and its standard error. The probes are the same at every
  step (one seed), so the curve's step-to-step changes are not probe noise.
* ``spectrum``: ``spectrum_steps`` Lanczos steps from ``spectrum_vectors`` seeded start vectors
  (:func:`curvature.lanczos.lanczos`); the row holds the Ritz values and weights of the Gauss
  quadrature measure and its summary (:meth:`curvature.spectrum.SpectralMeasure.summary`: extreme
  Ritz values, negative weight, normalised trace).

Every row also holds ``loss`` (the mean loss over the tracking batches), ``products`` and ``seconds``
(the measurement's wall time, the cold comparison included; ``cold_seconds`` the comparison alone).

Defaults: ``operator="hessian"``, ``bn_mode="train"`` (batch statistics, the loss the optimiser sees and
the suite's operator default), ``tol=1e-4`` (the eigenvalue is then accurate to about ``tol**2`` relative
for a separated top eigenvalue, to ``tol`` in any case), ``max_matvecs=300``, ``trace_probes=10``,
``spectrum_steps=20``, ``spectrum_vectors=1``, ``seed=0``: those of ``conf/analysis/train.yaml``'s
``curvature`` group. In float32 the residual floor is about ``sqrt(eps) = 3e-4``: track in float64 for
``tol`` below that.
"""

from __future__ import annotations

import time
from typing import Callable, Iterable, Optional, Sequence

import torch

from curvature.functional import curvature_mode
from curvature.lanczos import lanczos
from curvature.operators import make_operator
from curvature.seeding import generator
from curvature.spectrum import SpectralMeasure
from curvature.top_eigen import top_eigenpairs
from curvature.trace import hutchinson

__all__ = ["CurvatureTracker", "QUANTITIES", "tracking_batches"]

QUANTITIES = ("top_eigenvalue", "trace", "spectrum")
STATE_FORMAT = "deep-curvature-suite/curvature-tracker/1"


def tracking_batches(data, num_samples: Optional[int], batch_size: int, seed: int,
                     dtype: torch.dtype = torch.float32) -> list[tuple]:
    """A fixed, seeded subset of ``num_samples`` samples of ``data`` (an ``ImageData`` or ``TextData``;
    all of it when None) as ``(inputs, targets)`` batches of ``batch_size``, in a fixed order, without
    augmentation. The subset depends on ``seed`` only (its own stream, ``sharpness.data``)."""
    total = len(data)
    if num_samples is not None and not 1 <= num_samples <= total:
        raise ValueError(f"num_samples must be in [1, {total}] (the data's size), got {num_samples}")
    if num_samples is not None and num_samples < total:
        order = torch.randperm(total, generator=generator(seed, "sharpness.data"))[:num_samples]
        data = data.subset(order.sort().values)
    return list(data.batches(batch_size, dtype=dtype))


class CurvatureTracker:
    """Top eigenvalue / trace / spectrum of one curvature operator of ``model`` over ``batches``,
    measured on demand (:meth:`measure`), with the warm-start vector and the rows kept for resuming.

    ``batches``: what :func:`curvature.operators.make_operator` takes (a list of ``(inputs, targets)``);
    ``operator``: ``hessian``, ``ggn`` or ``fisher``; ``operator_options``: more keywords for it
    (``params``, ``cache``, ``layerwise``, ...). See the module docstring for the rest.
    """

    def __init__(self, model: torch.nn.Module, loss_fn: Callable, batches: Iterable,
                 quantities: Sequence[str] = ("top_eigenvalue",), operator: str = "hessian",
                 bn_mode: str = "train", tol: float = 1e-4, max_matvecs: int = 300, warm_start: bool = True,
                 compare_cold: bool = False, trace_probes: int = 10, spectrum_steps: int = 20,
                 spectrum_vectors: int = 1, seed: int = 0, **operator_options):
        unknown = [q for q in quantities if q not in QUANTITIES]
        if unknown or not quantities:
            raise ValueError(f"quantities must be a non-empty list drawn from {', '.join(QUANTITIES)}, "
                             f"got {list(quantities)}")
        for name, value in (("max_matvecs", max_matvecs), ("trace_probes", trace_probes),
                            ("spectrum_steps", spectrum_steps), ("spectrum_vectors", spectrum_vectors)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
        if not tol > 0:
            raise ValueError(f"tol must be > 0, got {tol}")
        self.quantities = tuple(dict.fromkeys(quantities))
        self.tol, self.max_matvecs = float(tol), max_matvecs
        self.warm_start, self.compare_cold = warm_start, compare_cold
        self.trace_probes, self.spectrum_steps, self.spectrum_vectors = trace_probes, spectrum_steps, spectrum_vectors
        self.seed = int(seed)
        options = {"check_deterministic": False, **operator_options}
        self.op = make_operator(operator, model, loss_fn, batches, bn_mode=bn_mode, **options)
        self.op.clear_cache()
        self.vector: Optional[torch.Tensor] = None  # the last top Ritz vector (the warm start)
        self.rows: list[dict] = []

    @property
    def num_params(self) -> int:
        return self.op.num_params

    @property
    def total_seconds(self) -> float:
        return sum(r["seconds"] for r in self.rows)

    # --- one measurement ------------------------------------------------------------------------
    def measure(self, step: int, **extra) -> dict:
        """Measure the quantities at the model's current weights; returns (and keeps) the row
        ``{"step": step, **extra, "loss": ..., <quantities>..., "products": ..., "seconds": ...}``."""
        start = time.perf_counter()
        row: dict = {"step": int(step), **extra, "loss": self._loss()}
        products, cold_seconds = 0, 0.0
        try:
            if "top_eigenvalue" in self.quantities:
                products += self._top_eigenvalue(row)
                cold_seconds = row.pop("_cold_seconds", 0.0)
            if "trace" in self.quantities:
                estimate = hutchinson(self.op, self.trace_probes, seed=self.seed)
                row.update(trace=estimate.estimate, trace_stderr=estimate.stderr,
                           trace_products=estimate.num_matvecs)
                products += estimate.num_matvecs
            if "spectrum" in self.quantities:
                result = lanczos(self.op, num_steps=self.spectrum_steps, num_vectors=self.spectrum_vectors,
                                 seed=self.seed)
                measure = SpectralMeasure.from_lanczos(result)
                used = int(result.num_steps.max()) * self.spectrum_vectors
                row.update({f"spectrum_{k}": v for k, v in measure.summary().items()})
                row.update(spectrum_ritz_values=measure.nodes.tolist(), spectrum_ritz_weights=measure.weights.tolist(),
                           spectrum_products=used)
                products += used
        finally:
            self.op.clear_cache()  # the graphs of these weights are stale after the next step
        row.update(products=products, seconds=time.perf_counter() - start, cold_seconds=cold_seconds)
        self.rows.append(row)
        return row

    def _loss(self) -> float:
        """The mean loss over the tracking batches (as the operator weighs them), in ``bn_mode``."""
        op, total = self.op, 0.0
        params = op._selected()
        with torch.no_grad(), curvature_mode(op.model, op.bn_mode):
            for weight, (inputs, targets) in zip(op.data.weights, op.batches):
                if weight:
                    total += weight * float(op.loss(op.forward_fn(inputs)(params), targets))
        return total

    def _top_eigenvalue(self, row: dict) -> int:
        warm = self.warm_start and self.vector is not None
        result = top_eigenpairs(self.op, 1, which="largest", tol=self.tol, max_matvecs=self.max_matvecs,
                                seed=self.seed, start_vectors=self.vector if warm else None)
        products = result.num_matvecs + result.verification_matvecs
        self.vector = result.eigenvectors[:, 0].detach().clone()
        row.update(top_eigenvalue=float(result.eigenvalues[0]), top_eigenvalue_residual=float(result.residuals[0]),
                   top_eigenvalue_converged=bool(result.converged[0]), top_eigenvalue_products=products,
                   top_eigenvalue_start="warm" if warm else "cold")
        if self.compare_cold:
            if warm:
                tick = time.perf_counter()
                cold = top_eigenpairs(self.op, 1, which="largest", tol=self.tol, max_matvecs=self.max_matvecs,
                                      seed=self.seed)
                row.update(top_eigenvalue_cold=float(cold.eigenvalues[0]),
                           top_eigenvalue_cold_products=cold.num_matvecs + cold.verification_matvecs,
                           _cold_seconds=time.perf_counter() - tick)
            else:  # the measurement itself was a cold start
                row.update(top_eigenvalue_cold=row["top_eigenvalue"], top_eigenvalue_cold_products=products)
        return products

    # --- summaries ------------------------------------------------------------------------------
    def warm_start_saving(self) -> dict:
        """Products of the warm starts and of the cold starts at the same steps (``compare_cold``),
        summed over the warm-started steps: ``saving = 1 - warm / cold`` (NaN without any)."""
        both = [r for r in self.rows if r.get("top_eigenvalue_start") == "warm" and "top_eigenvalue_cold_products" in r]
        warm = sum(r["top_eigenvalue_products"] for r in both)
        cold = sum(r["top_eigenvalue_cold_products"] for r in both)
        return {"steps_compared": len(both), "warm_products": warm, "cold_products": cold,
                "saving": 1.0 - warm / cold if cold else float("nan")}

    # --- resuming -------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The warm-start vector (CPU) and the rows so far: plain tensors, numbers, strings and lists
        (``torch.load(..., weights_only=True)`` reads them)."""
        return {"format": STATE_FORMAT, "num_params": self.num_params,
                "vector": None if self.vector is None else self.vector.detach().cpu().clone(),
                "rows": [dict(r) for r in self.rows]}

    def load_state_dict(self, state: dict) -> None:
        """Continue from :meth:`state_dict`'s output; a state of another model is a ValueError."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            raise ValueError(f"not a curvature tracker state (format {STATE_FORMAT!r} expected)")
        vector, rows = state.get("vector"), state.get("rows")
        if state.get("num_params") != self.num_params or (
                vector is not None and (not torch.is_tensor(vector) or tuple(vector.shape) != (self.num_params,))):
            raise ValueError(f"the tracker state is of a model with {state.get('num_params')} parameters, this "
                             f"operator acts on {self.num_params}")
        if vector is not None and not bool(torch.isfinite(vector).all()):
            raise ValueError("the tracker state's warm-start vector holds NaN or Inf")
        if not (isinstance(rows, list) and all(isinstance(r, dict) and "step" in r for r in rows)):
            raise ValueError("the tracker state holds no rows (a list of dicts with a 'step')")
        self.vector = None if vector is None else vector.to(dtype=self.op.dtype, device=self.op.device)
        self.rows = [dict(r) for r in rows]
