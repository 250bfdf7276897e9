"""Lanczos on row shards (the ``reduce`` hook) and with its basis on the device, in host memory or on disk.

Ground truth: the unsharded, in-device run of the same problem (itself tested against GPyTorch and
dense eigenvalues in test_lanczos*.py), and dense eigenvalues where all steps are taken.
"""

import functools
import operator
import threading

import numpy as np
import pytest
import torch

from curvature.errors import SuiteError
from curvature.lanczos import lanczos, random_start_vectors
from curvature.lanczos_basis import LanczosBasis
from curvature.random_matrices import wigner
from experiments.run import dispatch
from tests.conftest import make_cfg


class LockstepShards:
    """``n`` shards of one problem, one thread each, meeting at a barrier for every collective:
    ``reduce`` sums the shards' tensors in shard order, ``gather`` stacks their rows."""

    def __init__(self, n: int):
        self.barrier = threading.Barrier(n, timeout=60)
        self.slots = [None] * n
        self.calls = [0] * n

    def _exchange(self, rank: int, tensor: torch.Tensor) -> list:
        self.slots[rank] = tensor
        self.barrier.wait()
        out = list(self.slots)
        self.barrier.wait()  # nobody overwrites a slot before everyone has read it
        return out

    def reduce(self, rank: int):
        def summed(tensor: torch.Tensor) -> torch.Tensor:
            self.calls[rank] += 1
            return functools.reduce(operator.add, self._exchange(rank, tensor))
        return summed

    def gather(self, rank: int, rows: torch.Tensor) -> torch.Tensor:
        return torch.cat(self._exchange(rank, rows), dim=0)


def run_sharded(a: torch.Tensor, bounds: list, steps: int, start: torch.Tensor, **kw) -> list:
    """lanczos on the rows ``bounds[r]:bounds[r+1]`` of ``a`` and ``start`` in one thread per shard."""
    n = len(bounds) - 1
    shards, results, errors = LockstepShards(n), [None] * n, []

    def work(rank):
        rows = slice(bounds[rank], bounds[rank + 1])
        try:
            results[rank] = lanczos(lambda x: a[rows] @ shards.gather(rank, x), rows.stop - rows.start,
                                    steps, start_vectors=start[rows], reduce=shards.reduce(rank), **kw)
        except BaseException as error:  # re-raised below, in the test's thread
            errors.append(error)
            shards.barrier.abort()
    threads = [threading.Thread(target=work, args=(r,)) for r in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    assert all(c > 0 for c in shards.calls)
    return results


def _null_space_problem():
    a = torch.diag(torch.cat([torch.zeros(10), torch.arange(1.0, 31.0)]).double())
    v = torch.zeros(40, 2, dtype=torch.float64)
    v[:10, 0] = 1.0                                       # A v = 0: stops after one step
    v[:, 1] = torch.linspace(-1, 1, 40, dtype=torch.float64) + 0.3
    return a, v


SHARD_CASES = {
    # name: (matrix, steps, start vectors, shard bounds)
    "wigner_uneven_shards": lambda: (wigner(300, seed=1), 40, random_start_vectors(300, 2, seed=3),
                                     [0, 130, 300]),
    "three_shards": lambda: (wigner(200, seed=2), 30, random_start_vectors(200, 1, seed=4),
                             [0, 50, 120, 200]),
    "all_steps_recover_eigenvalues": lambda: (torch.diag(torch.arange(1.0, 41.0).double()), 60,
                                              random_start_vectors(40, 1, seed=1), [0, 17, 40]),
    "invariant_beside_generic": lambda: (_null_space_problem()[0], 8, _null_space_problem()[1],
                                         [0, 25, 40]),
}


@pytest.mark.parametrize("case", list(SHARD_CASES))
def test_row_shards_with_a_summing_reduce_reproduce_the_unsharded_run(case):
    a, steps, start, bounds = SHARD_CASES[case]()
    whole = lanczos(lambda x: a @ x, a.shape[0], steps, start_vectors=start, return_basis=True)
    parts = run_sharded(a, bounds, steps, start, return_basis=True)
    scale = float(torch.linalg.matrix_norm(a, 2))
    for part in parts:  # every process ends with the same tridiagonal, the unsharded one to rounding
        assert torch.equal(part.tridiagonal, parts[0].tridiagonal)
        assert part.num_steps.tolist() == whole.num_steps.tolist()
        assert part.notes == whole.notes
        torch.testing.assert_close(part.tridiagonal, whole.tridiagonal, rtol=0, atol=1e-10 * scale)
        torch.testing.assert_close(part.final_beta, whole.final_beta, rtol=0, atol=1e-8 * scale)
    # the shards' basis rows stack to the unsharded basis
    torch.testing.assert_close(torch.cat([p.basis for p in parts], dim=1), whole.basis, rtol=0, atol=1e-8)
    if case == "all_steps_recover_eigenvalues":
        torch.testing.assert_close(parts[0].ritz_values[0], torch.arange(1.0, 41.0).double(),
                                   rtol=0, atol=1e-8)


def test_identity_reduce_on_one_shard_changes_no_bit():
    a = wigner(150, seed=5)
    start = random_start_vectors(150, 3, seed=2)
    plain = lanczos(lambda x: a @ x, 150, 30, start_vectors=start, return_vectors=True)
    calls = []
    hooked = lanczos(lambda x: a @ x, 150, 30, start_vectors=start, return_vectors=True,
                     reduce=lambda t: calls.append(1) or t)
    assert len(calls) > 30
    for name in ("tridiagonal", "ritz_values", "ritz_weights", "residual_bounds", "final_beta",
                 "ritz_vectors"):
        assert torch.equal(getattr(plain, name), getattr(hooked, name)), name


def test_reduce_is_refused_without_start_vectors_or_with_gpytorch():
    a = wigner(50, seed=0)
    with pytest.raises(ValueError, match="start_vectors"):
        lanczos(lambda x: a @ x, 50, 5, reduce=lambda t: t)
    with pytest.raises(ValueError, match="native"):
        lanczos(lambda x: a @ x, 50, 5, start_vectors=torch.ones(50, 1, dtype=torch.float64),
                reduce=lambda t: t, engine="gpytorch")


# --- where the basis lives: device, host memory, a memory-mapped file -----------------------------
STORAGE_CASES = {
    "one_vector": lambda: (wigner(240, seed=1), 40, {"seed": 2}),
    "three_vectors": lambda: (wigner(240, seed=1), 30, {"num_vectors": 3, "seed": 5}),
    "invariant_beside_generic": lambda: (_null_space_problem()[0], 8,
                                         {"start_vectors": _null_space_problem()[1]}),
    "float32": lambda: (wigner(200, seed=3).float(), 30, {"seed": 1, "num_vectors": 2, "dtype": torch.float32}),
}


@pytest.mark.parametrize("tiles", ["rows", "columns"])
@pytest.mark.parametrize("kind", ["cpu", "disk"])
@pytest.mark.parametrize("case", list(STORAGE_CASES))
def test_each_basis_kind_gives_the_device_kinds_tridiagonal(kind, case, tiles, tmp_path):
    a, steps, kw = STORAGE_CASES[case]()
    run = functools.partial(lanczos, lambda x: a @ x, a.shape[0], steps, return_basis=True,
                            return_vectors=True, **kw)
    ref = run()
    # one tile holds the whole basis: the same products as on the device, bit for bit
    whole = run(basis_device=kind, basis_file=tmp_path / "basis.bin")
    for name in ("tridiagonal", "final_beta", "num_steps", "ritz_weights", "basis", "ritz_vectors"):
        assert torch.equal(getattr(whole, name), getattr(ref, name)), name
    assert whole.notes == ref.notes
    # tiles of 2 whole rows, or of 3 columns of all rows: the parts are added in another order, equal to rounding
    itemsize = torch.finfo(kw.get("dtype", torch.float64)).bits // 8
    elements = 2 * a.shape[0] if tiles == "rows" else 3 * (steps + 1)
    tiled = run(basis_device=kind, basis_file=tmp_path / "basis.bin", basis_chunk_mb=elements * itemsize / 2 ** 20)
    eps = torch.finfo(kw.get("dtype", torch.float64)).eps
    scale = float(torch.linalg.matrix_norm(a.double(), 2))
    assert tiled.num_steps.tolist() == ref.num_steps.tolist()
    torch.testing.assert_close(tiled.tridiagonal, ref.tridiagonal, rtol=0, atol=1e3 * eps * scale)
    torch.testing.assert_close(tiled.basis, ref.basis, rtol=0, atol=1e4 * eps)
    assert list(tmp_path.iterdir()) == []                                    # the file is gone


@pytest.mark.parametrize("kind,tile_elements,expected_tiles", [
    ("device", None, None), ("cpu", 10 ** 6, 1), ("cpu", 2 * 50, 3), ("disk", 3 * 6, 17), ("disk", 2 * 50, 3)])
def test_the_tiled_products_are_the_dense_products(kind, tile_elements, expected_tiles, tmp_path):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(2, 6, 50, generator=gen, dtype=torch.float64)      # 2 vectors, rows q_0 .. q_5, P = 50
    chunk = (tile_elements or 1) * 8 / 2 ** 20
    basis = LanczosBasis(kind, 2, 6, 50, torch.float64, torch.device("cpu"), tmp_path / "q.bin", chunk)
    for i in range(2):
        for j in range(6):
            basis.write(i, j, q[i, j])
    r, c = torch.randn(50, generator=gen, dtype=torch.float64), torch.randn(6, generator=gen, dtype=torch.float64)
    for i in range(2):
        torch.testing.assert_close(basis.coefficients(i, 5, r), q[i] @ r, rtol=0, atol=1e-13)
        torch.testing.assert_close(basis.combination(i, 5, c), q[i].T @ c, rtol=0, atol=1e-13)
        torch.testing.assert_close(basis.coefficients(i, 2, r), q[i, :3] @ r, rtol=0, atol=1e-13)
        assert torch.equal(basis.row(i, 4), q[i, 4]) and torch.equal(basis.block([1], 3), q[1:, 3].T)
    if expected_tiles is not None:  # rows 0..5 of 50 entries: 2 rows a tile, or 3 columns of all 6 rows
        assert len(list(basis._tiles(0, 5))) == expected_tiles
    basis.close()
    assert list(tmp_path.iterdir()) == []


def test_the_disk_basis_is_a_file_in_the_given_folder_removed_at_the_end_unless_kept(tmp_path):
    a = wigner(100, seed=0)
    path = tmp_path / "sub" / "basis.bin"
    seen = []

    def matvec(x):
        seen.append(path.stat().st_size if path.exists() else None)
        return a @ x
    lanczos(matvec, 100, 10, num_vectors=2, basis_device="disk", basis_file=path)
    assert seen[0] is None                  # the first product (the operator scale) comes before the basis
    assert seen[1] == 11 * 2 * 100 * 8      # rows q_0 .. q_10 of two vectors, float64, reserved up front
    assert not path.exists()
    lanczos(lambda x: a @ x, 100, 10, basis_device="disk", basis_file=path, keep_basis=True)
    assert path.is_file()
    path.unlink()

    def poisoned(x):  # a failed run removes its file too (no checkpoint refers to it)
        if len(seen) > 3:
            return x * float("nan")
        seen.append(1)
        return a @ x
    with pytest.raises(FloatingPointError):
        lanczos(poisoned, 100, 10, basis_device="disk", basis_file=path)
    assert not path.exists()


def test_a_disk_basis_in_an_unwritable_place_is_one_line_naming_the_file(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(SuiteError, match=r"cannot write the Lanczos basis file .*a_file/basis\.bin") as info:
        lanczos(lambda x: x, 50, 5, basis_device="disk", basis_file=blocker / "basis.bin")
    assert "\n" not in str(info.value)
    with pytest.raises(ValueError, match="basis_file"):
        lanczos(lambda x: x, 50, 5, basis_device="disk")
    with pytest.raises(SuiteError, match=r"no room in host memory for the Lanczos basis \(3\.73e\+05 GiB\)"):
        LanczosBasis("cpu", 1, 10 ** 6, 10 ** 8, torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="basis_device must be one of device, cpu, disk"):
        lanczos(lambda x: x, 50, 5, basis_device="gpu")
    with pytest.raises(ValueError, match="native"):
        lanczos(lambda x: x, 50, 5, basis_device="cpu", engine="gpytorch")


@pytest.mark.parametrize("saved_kind,resumed_kind", [("device", "device"), ("cpu", "cpu"), ("disk", "disk"),
                                                     ("disk", "device"), ("device", "disk")])
def test_resume_with_each_kind_equals_the_uninterrupted_run(saved_kind, resumed_kind, tmp_path):
    a = wigner(200, seed=4)
    common = dict(num_vectors=2, seed=3, basis_chunk_mb=1e-3)   # several tiles for cpu and disk
    saved_file, resumed_file = tmp_path / "saved.bin", tmp_path / "resumed.bin"
    states = []
    full = lanczos(lambda x: a @ x, 200, 30, basis_device=saved_kind, basis_file=saved_file,
                   checkpoint=states.append, checkpoint_every=7, **common)
    assert [s["step"] for s in states] == [7, 14, 21, 28, 30]
    if saved_kind == "disk":  # the state names the file and the rows' CRCs instead of copying the rows
        assert "basis" not in states[0] and states[0]["basis_file"] == str(saved_file.resolve())
        assert saved_file.is_file()           # kept: the checkpoint refers to it
    same_file = saved_kind == resumed_kind == "disk"
    for state in states[1:-1]:
        calls = []

        def counted(x):
            calls.append(1)
            return a @ x
        resumed = lanczos(counted, 200, 30, basis_device=resumed_kind,
                          basis_file=saved_file if same_file else resumed_file, resume_state=state, **common)
        assert len(calls) == 30 - state["step"]
        if saved_kind == resumed_kind:  # the same operations on the same rows: bit for bit
            assert torch.equal(resumed.tridiagonal, full.tridiagonal)
            assert torch.equal(resumed.final_beta, full.final_beta)
        else:                           # tiled products on one side, whole ones on the other
            torch.testing.assert_close(resumed.tridiagonal, full.tridiagonal, rtol=0, atol=1e-12)
            torch.testing.assert_close(resumed.final_beta, full.final_beta, rtol=0, atol=1e-12)
        assert not resumed_file.exists()


def test_a_disk_basis_a_crash_left_behind_is_trusted_only_where_the_state_vouches_for_it(tmp_path):
    a = wigner(150, seed=2)
    path = tmp_path / "basis.bin"
    states = []
    full = lanczos(lambda x: a @ x, 150, 20, seed=1, basis_device="disk", basis_file=path,
                   checkpoint=states.append, checkpoint_every=5)
    state = states[1]                                   # after step 10: rows q_0 .. q_10 vouched for
    row_bytes = 150 * 8
    data = bytearray(path.read_bytes())
    data[15 * row_bytes: 16 * row_bytes] = bytes(row_bytes)   # a half-written later row: not used
    path.write_bytes(bytes(data))
    resumed = lanczos(lambda x: a @ x, 150, 20, seed=1, basis_device="disk", basis_file=path,
                      resume_state=state)
    assert torch.equal(resumed.tridiagonal, full.tridiagonal)
    data[3 * row_bytes + 8: 3 * row_bytes + 16] = bytes(8)    # a row the state needs differs
    path.write_bytes(bytes(data))
    with pytest.raises(SuiteError, match=r"basis\.bin does not hold the Lanczos basis .*row 3 of start vector 0"):
        lanczos(lambda x: a @ x, 150, 20, seed=1, basis_device="disk", basis_file=path, resume_state=state)
    path.unlink()
    with pytest.raises(SuiteError, match=r"basis\.bin, the Lanczos basis file of the saved Lanczos state, is missing"):
        lanczos(lambda x: a @ x, 150, 20, seed=1, resume_state=state)


# --- analysis=spectrum: analysis.basis_device / basis_dir / basis_chunk_mb -----------------------
MATRIX = ["analysis=spectrum", "dataset=wigner", "dataset.n=150", "analysis.num_steps=20",
          "analysis.checkpoint_every=5", "analysis.exact_max_dim=0"]


def test_spectrum_with_a_disk_basis_matches_the_device_run_and_leaves_no_file(tmp_path):
    dispatch(make_cfg(tmp_path / "device", MATRIX))
    elsewhere = tmp_path / "scratch"
    results = dispatch(make_cfg(tmp_path / "disk", MATRIX + ["analysis.basis_device=disk",
                                                             f"analysis.basis_dir={elsewhere}",
                                                             "analysis.basis_chunk_mb=0.001"]))
    assert results["config"]["analysis"]["basis_device"] == "disk"
    a, b = np.load(tmp_path / "device" / "arrays.npz"), np.load(tmp_path / "disk" / "arrays.npz")
    np.testing.assert_allclose(a["tridiagonal"], b["tridiagonal"], rtol=0, atol=1e-12)
    assert list(elsewhere.iterdir()) == []                       # removed with the state after results
    assert not list((tmp_path / "disk").glob("lanczos-*"))


@pytest.mark.parametrize("override,key", [
    ("analysis.basis_device=gpu", "analysis.basis_device"),
    ("analysis.basis_chunk_mb=0", "analysis.basis_chunk_mb"),
])
def test_bad_basis_settings_are_refused_naming_the_key(override, key, tmp_path):
    with pytest.raises(SuiteError, match=key.replace(".", r"\.")):
        dispatch(make_cfg(tmp_path, MATRIX + [override]))


def test_a_disk_basis_with_gpytorch_is_refused(tmp_path):
    with pytest.raises(SuiteError, match=r"analysis\.basis_device='cpu' is invalid: only the native engine"):
        dispatch(make_cfg(tmp_path, MATRIX + ["analysis.basis_device=cpu", "analysis.lanczos_engine=gpytorch",
                                              "analysis.checkpoint_every=0"]))


def test_an_unwritable_basis_dir_is_one_line_naming_it_before_any_work(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = tmp_path / "run"
    with pytest.raises(SuiteError) as info:  # the CLI prints it as "error: <message>", exit 2 (test_bad_input)
        dispatch(make_cfg(out, MATRIX + ["analysis.basis_device=disk", f"analysis.basis_dir={blocker}/sub"]))
    assert str(info.value).startswith(f"config key analysis.basis_dir='{blocker}/sub' is invalid: the Lanczos "
                                      "basis file cannot be written there")
    assert "\n" not in str(info.value)
    assert not out.exists() or not any(out.iterdir())


def test_the_memory_benchmark_sees_the_basis_leave_the_device(tmp_path):
    from experiments.basis_memory import main
    payload = main(["--dim", "20000", "--steps", "12", "--chunk-mb", "0.2", "--folder", str(tmp_path / "b"),
                    "--out", str(tmp_path / "out.json"), "--device", "cpu"])
    rows = {row["kind"]: row for row in payload["rows"]}
    vector = 20000 * 4
    # the device kind holds the 13 rows of the basis; cpu and disk hold a tile (2 rows) instead
    assert rows["device"]["peak_device_bytes"] >= 13 * vector
    for kind in ("cpu", "disk"):
        assert rows[kind]["peak_device_bytes"] <= rows["device"]["peak_device_bytes"] - 10 * vector
        assert rows[kind]["streamed_bytes"] > 0 and rows[kind]["max_tridiagonal_deviation"] < 1e-3
    assert (tmp_path / "out.json").is_file() and list((tmp_path / "b").iterdir()) == []
