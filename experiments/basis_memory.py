"""Peak device memory of Lanczos with its basis on the device, in host memory or on disk (one run).

    python -m experiments.basis_memory [--dim 1000000] [--steps 40] [--vectors 1] [--chunk-mb 8]
                                       [--dtype float32] [--out outputs/basis_memory.json]

Runs :func:`curvature.lanczos.lanczos` three times on the same operator (a diagonal plus a rank-4 term,
so a product costs O(P) and the basis dominates), once for each ``basis_device``, and prints one table:
the peak device bytes of the run, that peak over ``P`` times the element size (in "vectors"), the
basis' own size, seconds, and the largest deviation of the tridiagonal from the device run's.

What "device bytes" is: on CUDA, ``torch.cuda.max_memory_allocated`` during the run minus the bytes
allocated before it. On a CPU-only machine the device is the host, so this script counts the storages
torch operations create while the run is active (a ``TorchDispatchMode`` follows every op's outputs
and their release: the operator's products, the Lanczos vectors in flight, the streamed tiles, and the
basis itself for ``device``), leaving out the storage that the ``cpu`` / ``disk`` kinds keep off the
device (the host tensor, the memory-mapped file). Timing shares the machine with whatever else runs.

Measured (2 shared CPU cores, torch 2.13 CPU; README "Basis beyond device memory"): P = 1e6 float32,
m = 40, one vector, 8 MB tiles: device 190.7 MB peak (50 vectors: the basis' 41 and 9 in flight), cpu
and disk 42.0 MB (11 vectors: 9 in flight and the 2-row tile), whatever m; the tridiagonals of the
three agree to float32 rounding.
"""

from __future__ import annotations

import argparse
import importlib
import json
import time
import weakref
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from curvature.io import write_bytes_atomic
from curvature.lanczos_basis import BASIS_KINDS, LanczosBasis

lanczos_module = importlib.import_module("curvature.lanczos")  # the module (curvature.lanczos is the function)


class TorchBytes(TorchDispatchMode):
    """Live and peak bytes of the storages torch ops create on ``device`` while the mode is active,
    less the storages listed in ``excluded`` (known off-device storage); the peak is computed at the
    end, from the allocation and release events in order."""

    def __init__(self, device: torch.device):
        super().__init__()
        self.device = device
        self.counts: dict[int, int] = {}
        self.events: list[tuple[int, int]] = []   # (storage pointer, +bytes / -bytes)
        self.sizes: dict[int, int] = {}
        self.excluded: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type == self.device.type:
                storage = tensor.untyped_storage()
                ptr = storage.data_ptr()
                if self.counts.get(ptr, 0) == 0:
                    self.sizes[ptr] = storage.nbytes()
                    self.events.append((ptr, self.sizes[ptr]))
                self.counts[ptr] = self.counts.get(ptr, 0) + 1
                weakref.finalize(tensor, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        self.counts[ptr] -= 1
        if self.counts[ptr] == 0:
            self.events.append((ptr, -self.sizes[ptr]))

    def peak(self) -> int:
        live = best = 0
        for ptr, change in self.events:
            if ptr not in self.excluded:
                live += change
                best = max(best, live)
        return best


def measure(kind: str, matvec, start: torch.Tensor, steps: int, chunk_mb: float, folder: Path) -> dict:
    """One Lanczos run with the basis in ``kind``: peak device bytes, seconds, the result."""
    device = start.device
    off_device: list[int] = []
    made: list[LanczosBasis] = []

    class Recorded(LanczosBasis):  # remembers where the cpu/disk kinds keep their rows, and the basis
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            off_device.append(self._q.untyped_storage().data_ptr())
            made.append(self)

    lanczos_module.LanczosBasis, original = Recorded, lanczos_module.LanczosBasis
    try:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            torch.cuda.reset_peak_memory_stats(device)
            before = torch.cuda.memory_allocated(device)
            t0 = time.perf_counter()
            result = lanczos_module.lanczos(matvec, start.shape[0], steps, start_vectors=start,
                                            basis_device=kind, basis_file=folder / "basis.bin",
                                            basis_chunk_mb=chunk_mb)
            torch.cuda.synchronize(device)
            seconds = time.perf_counter() - t0
            peak = torch.cuda.max_memory_allocated(device) - before
        else:
            tracker = TorchBytes(device)
            t0 = time.perf_counter()
            with tracker:
                result = lanczos_module.lanczos(matvec, start.shape[0], steps, start_vectors=start,
                                                basis_device=kind, basis_file=folder / "basis.bin",
                                                basis_chunk_mb=chunk_mb)
            seconds = time.perf_counter() - t0
            if kind != "device":
                tracker.excluded = set(off_device)
            peak = tracker.peak()
    finally:
        lanczos_module.LanczosBasis = original
    return {"kind": kind, "peak_device_bytes": peak, "seconds": seconds, "streamed_bytes": made[0].streamed_bytes,
            "result": result}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dim", type=int, default=1_000_000)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--vectors", type=int, default=1)
    parser.add_argument("--chunk-mb", type=float, default=8.0)
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--folder", type=Path, default=Path("outputs/basis_memory"))
    parser.add_argument("--out", type=Path, default=Path("outputs/basis_memory.json"))
    args = parser.parse_args(argv)
    dtype, device = getattr(torch, args.dtype), torch.device(args.device)
    gen = torch.Generator().manual_seed(0)
    diagonal = torch.rand(args.dim, generator=gen, dtype=torch.float64).to(device, dtype)
    low_rank = (torch.randn(args.dim, 4, generator=gen, dtype=torch.float64) / args.dim ** 0.5).to(device, dtype)
    start = torch.randn(args.dim, args.vectors, generator=gen, dtype=torch.float64).to(device, dtype)

    def matvec(x):
        return diagonal.unsqueeze(-1) * x + low_rank @ (low_rank.T @ x)
    args.folder.mkdir(parents=True, exist_ok=True)
    for kind in BASIS_KINDS:  # warm-up (first calls, the dispatch mode's set-up), not measured
        measure(kind, lambda x: x * 2.0, start[:1000] + 1, 3, args.chunk_mb, args.folder)
    rows = [measure(kind, matvec, start, args.steps, args.chunk_mb, args.folder) for kind in BASIS_KINDS]
    itemsize = torch.empty((), dtype=dtype).element_size()
    vector = args.dim * itemsize
    reference = rows[0]["result"].tridiagonal
    # the same run in float64 on the device: how far float32 rounding alone moves T (context for the deviation)
    exact = lanczos_module.lanczos(lambda x: matvec(x.to(dtype)).double(), args.dim, args.steps,
                                   start_vectors=start.double()).tridiagonal
    table = []
    for row in rows:
        result = row.pop("result")
        table.append({**row, "peak_device_vectors": row["peak_device_bytes"] / vector,
                      "basis_bytes": args.vectors * (args.steps + 1) * vector,
                      "tile_bytes": int(args.chunk_mb * 2 ** 20),
                      "max_tridiagonal_deviation": float((result.tridiagonal - reference).abs().max()),
                      "max_deviation_from_float64": float((result.tridiagonal - exact).abs().max()),
                      "streamed_over_m2_P_bytes": row["streamed_bytes"] / (args.steps ** 2 * args.vectors * vector),
                      "seconds_over_device": row["seconds"] / rows[0]["seconds"]})
    header = ("| basis_device | peak device MB | peak / (P x bytes) | basis MB | streamed / (m^2 k P bytes) | "
              "seconds (x device) | max abs dev. of T from device | from float64 |")
    lines = [header, "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for row in table:
        lines.append(f"| {row['kind']} | {row['peak_device_bytes'] / 2 ** 20:.1f} | {row['peak_device_vectors']:.2f} | "
                     f"{row['basis_bytes'] / 2 ** 20:.1f} | {row['streamed_over_m2_P_bytes']:.2f} | "
                     f"{row['seconds']:.2f} ({row['seconds_over_device']:.2f}x) | "
                     f"{row['max_tridiagonal_deviation']:.2e} | {row['max_deviation_from_float64']:.2e} |")
    print(f"P={args.dim} {args.dtype} m={args.steps} k={args.vectors} tile={args.chunk_mb} MB on {device}")
    print("\n".join(lines))
    payload = {"dim": args.dim, "steps": args.steps, "vectors": args.vectors, "chunk_mb": args.chunk_mb,
               "dtype": args.dtype, "device": str(device), "rows": table, "markdown": "\n".join(lines)}
    write_bytes_atomic(args.out, json.dumps(payload, indent=2).encode())
    return payload


if __name__ == "__main__":
    main()
