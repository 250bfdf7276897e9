"""The benchmark's peer adapters compute the suite's Lanczos result on the same job (tiny model, float64).

Each peer is an optional extra (requirements/peers.txt, installed with --no-deps by `make test`);
outside CI a missing one skips, in CI (CI=true) it fails.
"""

import pytest
import torch

from curvature.lanczos import lanczos, random_start_vectors
from curvature.operators import HessianOperator, get_loss
from experiments import peers
from tests.conftest import require
from tests.test_operators import build, data, tiny_mlp

STEPS = 8


def suite_result(model, batches, start):
    op = HessianOperator(model, get_loss("cross_entropy"), batches, bn_mode="eval")
    res = lanczos(op.matvec, op.num_params, STEPS, start_vectors=start.unsqueeze(-1))
    return res.ritz_values[0], res.ritz_weights[0]


@pytest.mark.parametrize("name,module", [(n, peers.MODULES[n]) for n in peers.PEERS])
def test_peer_matches_the_suite(name, module):
    require(module)
    model, batches = build(tiny_mlp, "cpu"), data("cpu", sizes=(6, 6, 6))
    p = sum(q.numel() for q in model.parameters())
    start = random_start_vectors(p, 1, "rademacher", seed=3)[:, 0]
    values, weights = suite_result(model, batches, start)
    theirs = peers.run_peer(name, model, batches, start, STEPS)
    assert model.training  # modes restored (pyhessian forces eval)
    assert theirs.num_products == (STEPS if name in ("pyhessian", "hessian_eigenthings") else STEPS + 1)
    assert float(theirs.ritz_values[-1]) == pytest.approx(float(values[-1]), rel=1e-4)
    rho = float(values.abs().max())
    for k in range(1, 5):
        ours_k = float((weights * values ** k).sum())
        theirs_k = float((theirs.ritz_weights * theirs.ritz_values ** k).sum())
        assert abs(ours_k - theirs_k) / rho ** k < 1e-4


def test_missing_peer_names_the_install_command(monkeypatch):
    monkeypatch.setitem(peers.MODULES, "curvlinops", "no_such_module_xyz")
    assert "requirements/peers.txt" in peers.missing("curvlinops")
    with pytest.raises(ImportError, match="not installed"):
        peers.run_peer("curvlinops", build(tiny_mlp, "cpu"), data("cpu"), torch.ones(1), 2)


def test_side_by_side_config_errors(cfg_factory, monkeypatch):
    from experiments import validate as V
    from experiments.side_by_side import validate_side_by_side
    base = ["analysis=benchmark", "dataset=digits", "model=cnn"]
    with pytest.raises(V.ConfigError, match="analysis.peers"):
        validate_side_by_side(cfg_factory(*base, "analysis.peers=[nosuchpeer]"))
    monkeypatch.setitem(peers.MODULES, "backpack", "no_such_module_xyz")
    with pytest.raises(V.ConfigError, match="requirements/peers.txt"):
        validate_side_by_side(cfg_factory(*base, "analysis.peers=[backpack]"))
    with pytest.raises(V.ConfigError, match="operator.loss"):
        validate_side_by_side(cfg_factory(*base, "analysis.peers=[pyhessian]", "operator.loss=mse"))
    settings = validate_side_by_side(cfg_factory(*base))
    assert not settings["enabled"] and settings["peers"] == []
