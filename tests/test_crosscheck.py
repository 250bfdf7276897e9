"""Independent cross-check: our Hessian and GGN products equal curvlinops' on the same model and data.

curvlinops is a test-only dependency (requirements/crosscheck.txt, installed by `make test`). Outside
CI the test skips when it is missing; in CI (CI=true) a missing curvlinops fails.
"""

import pytest
import torch
from torch import nn

from curvature.operators import get_loss, make_operator
from tests.conftest import require
from tests.test_operators import build, data, tiny_cnn, tiny_mlp

curvlinops = require("curvlinops")


@pytest.mark.parametrize("maker", [tiny_mlp, tiny_cnn])
@pytest.mark.parametrize("name,loss,theirs_loss", [
    ("hessian", "cross_entropy", nn.CrossEntropyLoss()), ("ggn", "cross_entropy", nn.CrossEntropyLoss()),
    ("hessian", "mse", None), ("ggn", "mse", None)])
def test_products_equal_curvlinops(maker, name, loss, theirs_loss):
    model = build(maker, "cpu").eval()  # curvlinops cannot run BatchNorm in train mode (TRAPS.md)
    batches = data("cpu")
    if theirs_loss is None:  # MSE on one-hot targets, mean over all entries
        batches = [(x, nn.functional.one_hot(y, 3).double()) for x, y in batches]
        theirs_loss = nn.MSELoss()
    cls = {"hessian": curvlinops.HessianLinearOperator, "ggn": curvlinops.GGNLinearOperator}[name]
    theirs = cls(model, theirs_loss, list(model.parameters()), batches)
    ours = make_operator(name, model, get_loss(loss), batches, bn_mode="eval")
    v = torch.randn(ours.num_params, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(ours @ v, theirs @ v, atol=1e-12, rtol=1e-10)
