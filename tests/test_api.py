"""The public API: `curvature.__all__`, `op @ v`, `op.to_scipy()`, `as_matvec`, and Lanczos defaults
equal to the command line's, in the operator's dtype."""

import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

import curvature
from curvature import GGNOperator, HessianOperator, as_matvec, dense_hessian, lanczos
from tests.cases import build, data, tiny_mlp
from tests.conftest import DEVICES

ROOT = Path(__file__).resolve().parents[1]
close = torch.testing.assert_close


def test_every_public_name_resolves():
    for name in curvature.__all__:
        assert getattr(curvature, name) is not None, name
    assert set(curvature.__all__) <= set(dir(curvature))
    # `lanczos` is the function although a module of that name exists; the module stays importable
    assert inspect.isfunction(curvature.lanczos)
    if "solve" in curvature.__all__:
        assert inspect.isfunction(curvature.solve)
    from curvature.lanczos import LanczosResult
    assert curvature.LanczosResult is LanczosResult
    with pytest.raises(AttributeError):
        curvature.no_such_name  # noqa: B018


def test_the_library_never_imports_hydra_or_wandb():
    """Every submodule of curvature imported in a fresh interpreter: no Hydra, no W&B; `import curvature`
    alone loads neither GPyTorch nor SciPy."""
    script = """
import importlib, json, pkgutil, sys
import curvature
light = sorted(m for m in ("gpytorch", "linear_operator", "scipy", "hydra", "wandb") if m in sys.modules)
names = [m.name for m in pkgutil.walk_packages(curvature.__path__, "curvature.")]
for name in names:
    importlib.import_module(name)
print(json.dumps({"light": light, "modules": names,
                  "heavy": sorted(m for m in ("hydra", "wandb") if m in sys.modules)}))
"""
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    assert found["light"] == []
    assert "curvature.operators" in found["modules"] and "curvature.models.gpt" in found["modules"]
    assert found["heavy"] == []


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", [HessianOperator, GGNOperator])
def test_matmul_is_matvec(cls, device):
    model, batches = build(tiny_mlp, device), data(device)
    op = cls(model, nn.functional.cross_entropy, batches, bn_mode="eval")
    gen = torch.Generator().manual_seed(1)
    v = torch.randn(op.num_params, generator=gen, dtype=torch.float64).to(device)
    block = torch.randn(op.num_params, 3, generator=gen, dtype=torch.float64).to(device)
    close(op @ v, op.matvec(v), rtol=0, atol=0)
    close(op @ block, op.matvec(block), rtol=0, atol=0)
    close(block.T @ op, op.matvec(block).T, rtol=0, atol=0)  # symmetric: v^T A = (A v)^T
    assert op.shape == (op.num_params, op.num_params)


def test_to_scipy_eigsh_gives_the_dense_top_eigenvalue():
    from scipy.sparse.linalg import LinearOperator, eigsh
    model, batches, loss_fn = build(tiny_mlp, "cpu"), data("cpu"), nn.functional.cross_entropy
    exact = torch.linalg.eigvalsh(dense_hessian(model, loss_fn, batches, "eval"))
    op = HessianOperator(model, loss_fn, batches, bn_mode="eval")
    A = op.to_scipy()
    assert isinstance(A, LinearOperator) and A.shape == (op.num_params,) * 2 and A.dtype == "float64"
    x = torch.randn(op.num_params, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    close(torch.from_numpy(A.matmat(x.numpy())), op.matvec(x), rtol=0, atol=0)
    close(torch.from_numpy(A.rmatvec(x[:, 0].numpy())), op.matvec(x[:, 0]), rtol=0, atol=0)
    assert A.H is not None  # the adjoint exists (it is the operator itself)
    top = eigsh(A, k=1, which="LA", tol=1e-12, v0=x[:, 0].numpy())[0][0]
    assert top == pytest.approx(float(exact[-1]), rel=1e-9)


def test_lanczos_defaults_are_the_command_lines():
    spectrum = OmegaConf.load(ROOT / "conf" / "analysis" / "spectrum.yaml")
    root = OmegaConf.load(ROOT / "conf" / "config.yaml")
    defaults = {k: p.default for k, p in inspect.signature(lanczos).parameters.items()}
    assert defaults["engine"] == spectrum.lanczos_engine
    assert defaults["num_steps"] == spectrum.num_steps
    assert defaults["num_vectors"] == spectrum.num_vectors
    assert defaults["start_kind"] == spectrum.start_vector
    assert defaults["seed"] == root.seed
    assert defaults["dtype"] is None  # the operator's dtype (the command line sets `dtype` explicitly)


def test_lanczos_follows_a_float32_operator():
    """A float32 nn.Sequential operator with no dtype given: the run is float32 and its top Ritz value is
    the float64 dense top eigenvalue to float32 accuracy."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 3))
    batches = [(torch.randn(20, 6), torch.randint(0, 3, (20,)))]
    op = HessianOperator(model, nn.functional.cross_entropy, batches)
    assert op.dtype == torch.float32
    res = lanczos(op.matvec, op.num_params, 40, return_vectors=True)
    assert res.ritz_vectors.dtype == torch.float32
    same = lanczos(op, num_steps=40)  # the operator itself
    close(same.ritz_values, res.ritz_values, rtol=0, atol=0)
    model64 = model.double()
    exact = torch.linalg.eigvalsh(dense_hessian(model64, nn.functional.cross_entropy,
                                                [(x.double(), y) for x, y in batches], "train"))
    assert float(res.ritz_values[0].max()) == pytest.approx(float(exact[-1]), rel=1e-4)
    # float64 start vectors on the float32 operator: a float64 run on float32 products
    start = torch.randn(op.num_params, 1, dtype=torch.float64)
    assert lanczos(op.matvec, op.num_params, 5, start_vectors=start).ritz_values.shape == (1, 5)


def test_as_matvec_takes_operators_tensors_and_callables():
    a = torch.randn(6, 6, dtype=torch.float32)
    a = a + a.T
    matvec, dim, dtype, device = as_matvec(a)
    assert (dim, dtype, device) == (6, torch.float32, torch.device("cpu"))
    close(matvec(torch.ones(6)), a @ torch.ones(6))
    close(as_matvec(a.numpy())[0](torch.ones(6, 2)), a @ torch.ones(6, 2))
    with pytest.raises(ValueError, match="not symmetric"):
        as_matvec(torch.triu(torch.ones(4, 4)))
    with pytest.raises(ValueError, match="square"):
        as_matvec(torch.ones(3, 4))
    with pytest.raises(ValueError, match="needs dim"):
        as_matvec(lambda x: x)
    assert as_matvec(lambda x: x, 5)[1:] == (5, torch.float64, torch.device("cpu"))

    model, batches = build(tiny_mlp, "cpu"), data("cpu")
    op = GGNOperator(model, nn.functional.cross_entropy, batches, bn_mode="eval")
    for given in (op, op.matvec):
        matvec, dim, dtype, device = as_matvec(given)
        assert (dim, dtype, device) == (op.num_params, torch.float64, op.device)
    with pytest.raises(ValueError, match="acts on"):
        as_matvec(op.matvec, op.num_params + 1)
    # a dense matrix straight into Lanczos: the same measure as its closure
    close(lanczos(a, num_steps=4).ritz_values, lanczos(lambda x: a @ x, 6, 4, dtype=torch.float32).ritz_values)
