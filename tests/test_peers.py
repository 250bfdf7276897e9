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


def _token_job(sizes=(5, 5, 5)):
    """A tiny GPT (float64) and equal-size batches of (N, T) token ids with next-token targets."""
    from curvature.models import GPTTiny
    torch.manual_seed(0)
    model = GPTTiny(7, context=6, width=8, depth=1, heads=2).double()
    gen = torch.Generator().manual_seed(0)
    batches = [(torch.randint(0, 7, (n, 6), generator=gen), torch.randint(0, 7, (n, 6), generator=gen))
               for n in sizes]
    return model, batches


# torch 2.13: torch.func.jvp over jacrev (curvlinops' Hessian product) gives wrong Hessian rows for LayerNorm
# weights (0.35 relative on Linear-LayerNorm-Linear, measured; jvp over grad and double backward agree).
_WRONG_ON_LAYERNORM = pytest.mark.xfail(strict=True, reason="torch.func jvp(jacrev) is wrong on LayerNorm weights")


@pytest.mark.parametrize("name,module", [pytest.param(n, peers.MODULES[n], marks=_WRONG_ON_LAYERNORM)
                                         if n == "curvlinops" else (n, peers.MODULES[n]) for n in peers.PEERS])
def test_peer_matches_the_suite_on_a_language_model(name, module):
    """(N, T, V) logits reach the peers as (N T, V) rows: the same mean token cross-entropy, the same Ritz values."""
    from curvature.losses import CrossEntropy
    require(module)
    model, batches = _token_job()
    start = random_start_vectors(sum(q.numel() for q in model.parameters()), 1, "rademacher", seed=3)[:, 0]
    op = HessianOperator(model, CrossEntropy(), batches, bn_mode="eval")
    assert op.engine == "layerwise"
    ours = lanczos(op.matvec, op.num_params, STEPS, start_vectors=start.unsqueeze(-1))
    theirs = peers.run_peer(name, model, batches, start, STEPS)
    assert model.training and type(model).__name__ == "GPTTiny"  # the wrapper is the peer's only
    assert float(theirs.ritz_values[-1]) == pytest.approx(float(ours.ritz_values[0][-1]), rel=1e-6)


def test_side_by_side_on_text_runs_with_a_peer(tmp_path):
    """analysis=benchmark on dataset=text with model=gpt_tiny, end to end at a tiny size, one peer."""
    import random

    from experiments.run import dispatch
    from tests.conftest import make_cfg
    require("hessian_eigenthings")
    text = tmp_path / "text.txt"
    text.write_text("".join(random.Random(0).choices("abcdef gh\n", k=600)), encoding="utf-8")
    results = dispatch(make_cfg(tmp_path / "run", [
        "analysis=benchmark", "dataset=text", f"dataset.path={text}", "dataset.context=8",
        "dataset.num_subsamples=24", "operator.batch_size=8", "model=gpt_tiny", "model.width=8", "model.depth=1",
        "model.heads=2", "dtype=float64", "analysis.repeats=1", "analysis.lanczos_steps=2", "analysis.side_steps=4",
        "analysis.side_vectors=0", "analysis.peers=[hessian_eigenthings]"]))
    rows = {r["row"]: r for r in results["tables"]["side_by_side"]}
    assert "layerwise products" in rows["suite hessian (default: cached primal)"]["notes"]
    assert rows["hessian_eigenthings"]["products"] == 4
    assert rows["hessian_eigenthings"]["top_ritz_rel_diff"] < 1e-8
    assert "speedup_vs_fastest_peer" in results["metrics"]
