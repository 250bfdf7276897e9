"""Hessian and GGN products over the shared case table (tests/cases.py) against dense float64 matrices."""

import pytest
import torch

from curvature.operators import HessianOperator, make_operator
from tests.cases import CASES


def operators(name, case, model, batches):
    """The default operator and, when it takes layer-wise products, the autograd one (``layerwise=False``)."""
    default = make_operator(name, model, case.loss, batches, bn_mode=case.bn_mode)
    if default.engine == "autograd":
        return [default]
    return [default, make_operator(name, model, case.loss, batches, bn_mode=case.bn_mode, layerwise=False)]


@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_products_equal_the_dense_matrices(case):
    model, batches = case.model(), case.batches()
    buffers_before = {k: v.clone() for k, v in model.state_dict().items()}
    v = torch.randn(sum(p.numel() for p in model.parameters()), 3, dtype=torch.float64,
                    generator=torch.Generator().manual_seed(1)).to(case.device)
    for name in ("hessian", "ggn"):
        expected = case.exact(name) @ v
        tol = case.tolerance(float(expected.abs().max()))
        for op in operators(name, case, model, batches):
            assert op.num_params == v.shape[0] and op.dtype == case.dtype
            what = f"{name} ({op.engine})"
            torch.testing.assert_close(op.matvec(v.to(case.dtype)).double(), expected, **tol,
                                       msg=lambda m: f"{what}: {m}")
            torch.testing.assert_close((op @ v[:, 0].to(case.dtype)).double(), expected[:, 0], **tol,
                                       msg=lambda m: f"{what}, one vector: {m}")
    if case.dtype == torch.float64:  # the Hessian's other autograd mode, primal recomputed every product
        rev = HessianOperator(model, case.loss, batches, bn_mode=case.bn_mode, mode="reverse_over_reverse",
                              layerwise=False, cache="none")
        torch.testing.assert_close(rev.matvec(v), case.exact("hessian") @ v, **case.tolerance())
    # products never touch BatchNorm's running statistics, and the module modes are restored
    for k, t in model.state_dict().items():
        torch.testing.assert_close(t, buffers_before[k], rtol=0, atol=0, msg=k)
    assert model.training
