"""Deep Curvature Suite: the library.

Plain PyTorch (GPyTorch only for ``lanczos(..., engine="gpytorch")``); it never imports Hydra or
W&B, so everything here works in a notebook with no config at all:

    from curvature import HessianOperator, lanczos, SpectralMeasure

    op = HessianOperator(model, torch.nn.functional.cross_entropy, batches)   # batches: [(x, y), ...]
    hv = op @ v                                   # Hessian-vector product, v of shape (P,) or (P, k)
    mu = SpectralMeasure.from_lanczos(lanczos(op, num_steps=100))
    scipy_op = op.to_scipy()                      # for scipy.sparse.linalg.eigsh, cg, minres

The names below load their module on first use, so ``import curvature`` costs what
:mod:`curvature.lanczos` costs (torch) and nothing more.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

#: public name -> the module that defines it, in groups
_EXPORTS = {
    # --- curvature operators: the Hessian / GGN of a dataset's loss as products with vectors ---
    "CurvatureOperator": "curvature.operators",
    "HessianOperator": "curvature.operators",
    "GGNOperator": "curvature.operators",
    "make_operator": "curvature.operators",
    "FisherOperator": "curvature.fisher",
    "FiniteDifferenceHessian": "curvature.finite_difference",
    "fd_hessian_product": "curvature.finite_difference",
    "fd_step": "curvature.finite_difference",
    # --- model-sharded (FSDP2) Hessian products and Lanczos on local shards of the vectors ---
    "ShardedFiniteDifferenceHessian": "curvature.fsdp",
    "sharded_lanczos": "curvature.fsdp",
    "shard_model": "curvature.fsdp",
    # --- any symmetric operator as a matvec closure or a SciPy LinearOperator ---
    "as_matvec": "curvature.linear_operator",
    "to_scipy": "curvature.linear_operator",
    # --- losses and their output Hessians (cross-entropy, MSE in closed form; any other by autograd) ---
    "as_loss": "curvature.losses",
    "Loss": "curvature.losses",
    "CrossEntropy": "curvature.losses",
    "MeanSquaredError": "curvature.losses",
    "AutogradLoss": "curvature.losses",
    # --- Lanczos and the spectral measure it gives ---
    "lanczos": "curvature.lanczos",
    "LanczosResult": "curvature.lanczos",
    "LanczosNumericalError": "curvature.lanczos",
    "random_start_vectors": "curvature.lanczos",
    "LanczosBasis": "curvature.lanczos_basis",
    "SpectralMeasure": "curvature.spectrum",
    # --- more estimators on the same operators: traces, top eigenpairs, linear solves ---
    "hutchinson": "curvature.trace",
    "hutchpp": "curvature.trace",
    "slq_trace": "curvature.trace",
    "TraceEstimate": "curvature.trace",
    "top_eigenpairs": "curvature.top_eigen",
    "power_iteration": "curvature.top_eigen",
    "EigenpairResult": "curvature.top_eigen",
    "solve": "curvature.solve",
    # --- curvature tracked during training (sharpness, trace, spectrum at chosen steps) ---
    "CurvatureTracker": "curvature.sharpness",
    "tracking_batches": "curvature.sharpness",
    "SolveResult": "curvature.solve",
    # --- exact dense matrices of small models (the ground truth of the tests) ---
    "dense_hessian": "curvature.dense",
    "dense_ggn": "curvature.dense",
    "operator_matrix": "curvature.dense",
    # --- random matrices and their analytic spectral densities ---
    "wigner": "curvature.random_matrices",
    "marchenko_pastur": "curvature.random_matrices",
    "synthetic_spectrum": "curvature.random_matrices",
    "synthetic_spectrum_eigenvalues": "curvature.random_matrices",
    "haar_orthogonal": "curvature.random_matrices",
    "semicircle_density": "curvature.random_matrices",
    "semicircle_edges": "curvature.random_matrices",
    "marchenko_pastur_density": "curvature.random_matrices",
    "marchenko_pastur_edges": "curvature.random_matrices",
    "marchenko_pastur_atom": "curvature.random_matrices",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    module = _EXPORTS.get(name)
    if module is None:  # AttributeError lets `from curvature import <submodule>` import the submodule
        raise AttributeError(f"module 'curvature' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


# Functions named like their module (curvature.lanczos.lanczos, curvature.solve.solve) are bound here at
# import: loaded lazily, the import system would set `curvature.lanczos` to the module whenever any code
# imported it first. So `curvature.lanczos` is the function; reach the module's other names with
# `from curvature.lanczos import ...` (`import curvature.lanczos as m` also gives the function).
from curvature.lanczos import lanczos  # noqa: E402

from curvature.solve import solve  # noqa: E402
