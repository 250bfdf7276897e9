"""``operator.product=finite_difference`` in analysis=trace and analysis=top_eigen (the shared
``operator_from_settings`` passes the product settings through): on a smooth float64 model the results
equal the exact-product run's to the finite-difference error (central differences at the automatic step
are about 1e-10 relative here, tests/test_finite_difference.py), and the exact run's own dense check passes."""

from __future__ import annotations

import json

import pytest

from experiments.run import dispatch
from tests.conftest import make_cfg

SMOOTH = ["dataset=digits", "model=mlp", "model.hidden=[4]", "model.activation=tanh", "dataset.num_subsamples=64",
          "operator.batch_size=32", "dtype=float64"]


def _pair(tmp_path, overrides):
    exact = dispatch(make_cfg(tmp_path / "exact", [*SMOOTH, *overrides]))
    fd = dispatch(make_cfg(tmp_path / "fd", [*SMOOTH, *overrides, "operator.product=finite_difference"]))
    saved = json.loads((tmp_path / "fd" / "results.json").read_text())
    assert saved["config"]["operator"]["product"] == "finite_difference"
    return exact, fd, saved


def test_trace_with_finite_difference_products_equals_the_exact_products_estimates(tmp_path):
    exact, fd, saved = _pair(tmp_path, ["analysis=trace", "analysis.method=all", "analysis.num_matvecs=12",
                                        "analysis.slq_steps=3", "analysis.exact_max_dim=400"])
    rows_exact = {r["method"]: r for r in exact["tables"]["trace"]}
    rows_fd = {r["method"]: r for r in fd["tables"]["trace"]}
    assert set(rows_fd) == {"hutchinson", "hutchpp", "slq"}
    scale = abs(rows_exact["hutchinson"]["exact"])
    for method, row in rows_fd.items():  # same probes, products equal to ~1e-10: same estimates
        assert row["estimate"] == pytest.approx(rows_exact[method]["estimate"], abs=1e-6 * scale), method
        assert row["exact"] == pytest.approx(rows_exact[method]["exact"], abs=1e-6 * scale)
    assert any(note.startswith("hessian products: finite_difference") for note in saved["notes"]), saved["notes"]


def test_top_eigen_with_finite_difference_products_finds_the_dense_eigenvalues(tmp_path):
    exact, fd, _ = _pair(tmp_path, ["analysis=top_eigen", "analysis.k=2", "analysis.tol=1e-6"])
    assert exact["checks"]["hessian_matches_exact"]["passed"]  # the exact route against the dense matrix
    assert fd["checks"]["hessian_matches_exact"]["passed"]
    (lanczos_exact,) = [r for r in exact["tables"]["methods"] if r["method"] == "lanczos"]
    (lanczos_fd,) = [r for r in fd["tables"]["methods"] if r["method"] == "lanczos"]
    for a, b in zip(lanczos_fd["eigenvalues"], lanczos_exact["eigenvalues"]):
        assert a == pytest.approx(b, rel=1e-6)
