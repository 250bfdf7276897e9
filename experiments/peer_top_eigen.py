"""Top-k Hessian eigenvalues of one digits CNN by the suite and by its peers, at one tolerance.

    python -m experiments.peer_top_eigen --checkpoint outputs/demo/train/checkpoint-00010.pt \
        --channels 4 2 --k 5 --tol 1e-3 --out /tmp/peer_top_eigen.json

Rows (same model, same batches in the same order, mean cross-entropy, float64, eval mode):

* ``suite lanczos``: :func:`curvature.top_eigen.top_eigenpairs` (thick restart with locking), ``which=largest``.
* ``suite power``: :func:`curvature.top_eigen.power_iteration`, ``criterion=residual``.
* ``hessian_eigenthings lanczos`` (1.0.0a5): ``lanczos(op, k, max_iter, tol, which="LA")`` runs a fixed
  number of steps with no restart; the smallest ``max_iter`` (from ``2k``, doubled) whose pairs all pass
  its own test (``|beta_m s_m,i| < tol |lambda_i|``) is reported, and the products of every attempt.
* ``hessian_eigenthings power`` (1.0.0a5): ``deflated_power_iteration(op, k, max_iter, tol)``: stops when
  both the relative change and the deflated relative residual are below ``tol``.
* ``curvlinops eigsh`` (3.0): its ``HessianLinearOperator(...).to_scipy()`` into SciPy's ``eigsh(k,
  which="LA", tol)`` (ARPACK's implicitly restarted Lanczos), the route curvlinops documents for top
  eigenvalues; products counted as columns through its ``_matmat``.
* ``pyhessian power`` (0.1): ``hessian(...).eigenvalues(maxIter, tol, top_n=k)``: stops on the relative
  change of the eigenvalue alone (its rule), ``torch.randn`` start vectors under ``torch.manual_seed(seed)``.

Every row's eigenvectors are then checked with the suite's operator: the true relative residual
``||H u - lambda u|| / |lambda||`` (products not counted to the row). Peer glue only; nothing here is an
analysis (see ``analysis=top_eigen`` for that).
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import warnings

import torch
import torch.nn.functional as F

from curvature.data import load_splits
from curvature.models import build_model
from curvature.operators import HessianOperator, curvature_mode, get_loss
from curvature.top_eigen import power_iteration, top_eigenpairs
from curvature.training import load_checkpoint
from experiments.peers import _Counted, missing


def true_residuals(op: HessianOperator, vectors: torch.Tensor, values: torch.Tensor) -> list[float]:
    """Relative residuals of the (P, k) vectors (normalised here) with the suite's operator."""
    u = vectors.to(torch.float64)
    u = u / u.norm(dim=0, keepdim=True)
    lam = torch.as_tensor(values, dtype=torch.float64)
    return ((op.matvec(u) - u * lam).norm(dim=0) / lam.abs()).tolist()


def eigenthings_lanczos(model, batches, k: int, tol: float, seed: int, max_products: int) -> dict:
    import hessian_eigenthings as he
    op = he.HessianOperator(model, batches, he.supervised_loss(F.cross_entropy), full_dataset=True)
    counted = op.matvec = _Counted(op.matvec)
    steps, attempts = 2 * k, []
    while True:
        steps = min(steps, op.size - 1)
        before = counted.calls
        result = he.lanczos(op, k=k, max_iter=steps, tol=tol, which="LA", seed=seed, reorthogonalize=True)
        attempts.append((steps, counted.calls - before, bool(result.converged.all())))
        if result.converged.all() or steps >= op.size - 1 or counted.calls >= max_products:
            break
        steps *= 2
    return {"values": result.eigenvalues, "vectors": result.eigenvectors.T, "products": counted.calls,
            "products_last_attempt": attempts[-1][1], "converged_own_test": attempts[-1][2],
            "attempts": attempts}


def eigenthings_power(model, batches, k: int, tol: float, seed: int, max_iter: int) -> dict:
    import hessian_eigenthings as he
    op = he.HessianOperator(model, batches, he.supervised_loss(F.cross_entropy), full_dataset=True)
    counted = op.matvec = _Counted(op.matvec)
    result = he.deflated_power_iteration(op, k=k, max_iter=max_iter, tol=tol, seed=seed)
    return {"values": result.eigenvalues, "vectors": result.eigenvectors.T, "products": counted.calls,
            "converged_own_test": bool(result.converged.all())}


def curvlinops_eigsh(model, batches, k: int, tol: float, seed: int) -> dict:
    import numpy as np
    import curvlinops as cl
    from scipy.sparse.linalg import eigsh
    params = [p for p in model.parameters() if p.requires_grad]
    op = cl.HessianLinearOperator(model, torch.nn.CrossEntropyLoss(), params, batches, check_deterministic=False)
    columns, matmat = [0], op._matmat

    def counted(x):
        columns[0] += x[0].shape[-1] if isinstance(x, (list, tuple)) else (x.shape[-1] if x.dim() > 1 else 1)
        return matmat(x)

    op._matmat = counted
    start = np.random.default_rng(seed).standard_normal(op.shape[0])
    values, vectors = eigsh(op.to_scipy(), k=k, which="LA", tol=tol, v0=start)
    return {"values": torch.as_tensor(values, dtype=torch.float64),
            "vectors": torch.as_tensor(vectors, dtype=torch.float64), "products": columns[0],
            "converged_own_test": True}


def pyhessian_power(model, batches, k: int, tol: float, seed: int, max_iter: int) -> dict:
    pyh = importlib.import_module("pyhessian.hessian")
    was_training, default = model.training, torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)  # its randn/zeros vectors in the model's dtype
    torch.manual_seed(seed)
    try:
        h = pyh.hessian(model, torch.nn.CrossEntropyLoss(), dataloader=batches, cuda=False)
        counted = h.dataloader_hv_product = _Counted(h.dataloader_hv_product)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Using backward\\(\\) with create_graph=True")
            values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        torch.set_default_dtype(default)
        model.train(was_training)
        model.zero_grad(set_to_none=True)
    flat = torch.stack([torch.cat([t.reshape(-1) for t in v]) for v in vectors], dim=1)
    return {"values": torch.tensor(values, dtype=torch.float64), "vectors": flat, "products": counted.calls,
            "converged_own_test": None}


def compare(args) -> list[dict]:
    splits = load_splits("digits", num_subsamples=args.subsample, seed=args.seed)
    model = build_model({"name": "cnn", "channels": args.channels, "batch_norm": False}, splits.num_classes,
                        splits.in_channels, splits.input_size).double()
    if args.checkpoint:
        load_checkpoint(args.checkpoint, model)
        model.double()
    model.eval()
    batches = list(splits.train.batches(args.batch_size, dtype=torch.float64))
    op = HessianOperator(model, get_loss("cross_entropy"), batches, bn_mode="eval", check_deterministic=False)
    rows = []

    def row(name, run):
        start = time.perf_counter()
        out = run()
        seconds = time.perf_counter() - start
        order = torch.argsort(torch.as_tensor(out["values"], dtype=torch.float64), descending=True)
        values = torch.as_tensor(out["values"], dtype=torch.float64)[order]
        vectors = out["vectors"][:, order]
        rows.append({"method": name, "eigenvalues": values.tolist(), "products": out["products"],
                     "seconds": seconds, "true_relative_residuals": true_residuals(op, vectors, values),
                     **{k: v for k, v in out.items() if k not in ("values", "vectors", "products")}})
        print(json.dumps(rows[-1]), flush=True)

    def suite(method):
        if method == "lanczos":
            r = top_eigenpairs(op, args.k, which="largest", tol=args.tol, seed=args.seed)
        else:
            r = power_iteration(op, args.k, tol=args.tol, max_iter=args.max_iter, seed=args.seed,
                                criterion="residual")
        return {"values": r.eigenvalues, "vectors": r.eigenvectors, "products": r.num_matvecs + r.verification_matvecs,
                "converged_own_test": r.all_converged if method == "lanczos" else
                bool((r.residual_estimates <= args.tol).all())}

    with curvature_mode(model, "eval"):
        row("suite lanczos", lambda: suite("lanczos"))
        row("suite power", lambda: suite("power"))
        if not missing("hessian_eigenthings"):
            row("hessian_eigenthings lanczos",
                lambda: eigenthings_lanczos(model, batches, args.k, args.tol, args.seed, args.max_iter * args.k))
            row("hessian_eigenthings power",
                lambda: eigenthings_power(model, batches, args.k, args.tol, args.seed, args.max_iter))
        if not missing("curvlinops"):
            row("curvlinops eigsh", lambda: curvlinops_eigsh(model, batches, args.k, args.tol, args.seed))
        if not missing("pyhessian"):
            row("pyhessian power", lambda: pyhessian_power(model, batches, args.k, args.tol, args.seed, args.max_iter))
    if args.exact:
        from curvature.dense import operator_matrix
        exact = torch.linalg.eigvalsh(operator_matrix(op)).flip(0)[:args.k]
        rows.append({"method": "exact (dense eigh)", "eigenvalues": exact.tolist()})
        print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--channels", type=int, nargs="+", default=[16, 32])
    parser.add_argument("--subsample", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--tol", type=float, default=1e-3)
    parser.add_argument("--max-iter", type=int, default=1000, help="power-iteration products per pair")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--exact", action="store_true", help="also the dense eigenvalues (P products)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    rows = compare(args)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"args": vars(args), "rows": rows}, handle, indent=2)


if __name__ == "__main__":
    main()
