"""A symmetric operator as the rest of the numerical world takes it: ``op @ v``, SciPy, or a closure.

:class:`SymmetricOperatorMixin` gives any class with ``matvec``, ``num_params``, ``dtype`` and
``device`` (the curvature operators, block and distributed operators) ``op @ v`` and
:meth:`~SymmetricOperatorMixin.to_scipy`, a ``scipy.sparse.linalg.LinearOperator`` for ``eigsh``,
``cg`` or ``minres``. :func:`as_matvec` turns whatever an estimator is handed (an operator, its bound
``matvec``, a dense symmetric tensor, or a plain closure) into one ``(matvec, dim, dtype, device)``,
so that every estimator accepts the same things.

SciPy is imported only when :meth:`~SymmetricOperatorMixin.to_scipy` is called, so
``import curvature`` stays light.
"""

from __future__ import annotations

from typing import Any, Callable, Optional

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

__all__ = ["SymmetricOperatorMixin", "as_matvec", "to_scipy"]

#: Relative tolerance of the symmetry check on a dense matrix: ``max|A - A^T| <= tol * max|A|``.
SYMMETRY_TOL = 1e-6


class SymmetricOperatorMixin:
    """``op @ v`` and ``op.to_scipy()`` for a symmetric P x P operator.

    The class supplies ``matvec`` ((P,) or (P, k) -> same shape), ``num_params`` (P), ``dtype`` and
    ``device``. ``v @ op`` is ``op @ v`` transposed (the operator is symmetric).
    """

    def __matmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v)

    def __rmatmul__(self, v: torch.Tensor) -> torch.Tensor:
        return self.matvec(v) if v.dim() == 1 else self.matvec(v.T).T

    @property
    def shape(self) -> tuple[int, int]:
        return (self.num_params, self.num_params)

    def to_scipy(self):
        """This operator as a ``scipy.sparse.linalg.LinearOperator`` (see :func:`to_scipy`)."""
        return to_scipy(self)


def to_scipy(operator: Any):
    """A ``scipy.sparse.linalg.LinearOperator`` of shape (P, P) over ``operator`` (anything
    :func:`as_matvec` takes).

    NumPy in, NumPy out: vectors are converted to the operator's dtype and device, products come back
    as NumPy arrays of the operator's dtype on the CPU. ``matvec`` and ``matmat`` go to the operator
    (a (P, k) block in one call); ``rmatvec`` / ``rmatmat`` are the same functions, since the operator
    is symmetric, and the adjoint is the operator itself.
    """
    import numpy as np
    from scipy.sparse.linalg import LinearOperator

    matvec, dim, dtype, device = as_matvec(operator)

    def apply(x):
        block = torch.as_tensor(np.asarray(x)).to(dtype=dtype, device=device)
        with torch.no_grad():
            return matvec(block).detach().to("cpu").numpy()

    numpy_dtype = torch.empty((), dtype=dtype).numpy().dtype
    return LinearOperator((dim, dim), matvec=apply, rmatvec=apply, matmat=apply, rmatmat=apply,
                          dtype=numpy_dtype)


def as_matvec(A: Any, dim: Optional[int] = None) -> tuple[Matvec, int, torch.dtype, torch.device]:
    """``(matvec, dim, dtype, device)`` of a symmetric operator given in any of these forms:

    * an operator object: anything with ``matvec`` and a size (``num_params``, ``dim`` or a square
      ``shape``); ``dtype`` and ``device`` attributes are used when present;
    * the bound ``matvec`` of such an object (``op.matvec``): the same, read from the object;
    * a dense square tensor (or NumPy array), checked to be symmetric: ``matvec`` is ``A @ x``;
    * any other callable on (P,) / (P, k) tensors: ``dim`` must be given.

    ``dim``, when given for an operator or tensor, must equal its size. Where a dtype or device is not
    known (a plain callable, an object without them) it is float64 on the CPU. ``matvec`` takes and
    returns (P,) or (P, k) tensors, as the operator does (a closure keeps whatever it accepts).
    """
    if isinstance(A, torch.Tensor) or type(A).__module__ == "numpy":
        return _dense(torch.as_tensor(A), dim)
    if hasattr(A, "matvec") and _size(A) is not None:  # an operator object
        owner, matvec = A, A.matvec
    else:  # a bound method of one (op.matvec), or a plain closure (owner None)
        owner, matvec = getattr(A, "__self__", None), A
        if owner is not None and (not hasattr(owner, "matvec") or _size(owner) is None):
            owner = None
    if owner is not None:
        size = _size(owner)
        if dim is not None and dim != size:
            raise ValueError(f"dim={dim} but the operator acts on {size} entries")
        return matvec, size, _dtype(owner), _device(owner)
    if not callable(A):
        raise TypeError(f"expected an operator (with matvec), a square tensor or a callable, got {type(A).__name__}")
    if dim is None:
        raise ValueError("a plain matvec callable needs dim (the operator's size P)")
    return A, int(dim), _dtype(A), _device(A)


def _size(owner: Any) -> Optional[int]:
    for name in ("num_params", "dim"):
        value = getattr(owner, name, None)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    shape = getattr(owner, "shape", None)
    if isinstance(shape, tuple) and len(shape) == 2 and shape[0] == shape[1]:
        return int(shape[0])
    return None


def _dtype(owner: Any) -> torch.dtype:
    value = getattr(owner, "dtype", None)
    return value if isinstance(value, torch.dtype) else torch.float64


def _device(owner: Any) -> torch.device:
    value = getattr(owner, "device", None)
    return torch.device(value) if isinstance(value, (str, torch.device)) else torch.device("cpu")


def _dense(A: torch.Tensor, dim: Optional[int]):
    if A.dim() != 2 or A.shape[0] != A.shape[1]:
        raise ValueError(f"a dense operator must be a square matrix, got shape {tuple(A.shape)}")
    if dim is not None and dim != A.shape[0]:
        raise ValueError(f"dim={dim} but the matrix is {A.shape[0]} x {A.shape[0]}")
    if not A.is_floating_point():
        A = A.to(torch.float64)
    scale = float(A.abs().max()) if A.numel() else 0.0
    if float((A - A.T).abs().max()) > SYMMETRY_TOL * scale:
        raise ValueError("the dense matrix is not symmetric (max |A - A^T| > 1e-6 max |A|): the "
                         "estimators assume a symmetric operator; pass (A + A.T) / 2")
    return (lambda x: A @ x.to(dtype=A.dtype, device=A.device)), A.shape[0], A.dtype, A.device
