"""Where the Lanczos basis lives: on the device, in host memory, or in a memory-mapped file.

Full reorthogonalisation keeps every Lanczos vector: ``k (m + 1)`` vectors of ``P`` entries, 400 GB
in float32 for 100 steps of a 1e9-parameter model, far beyond one accelerator. :class:`LanczosBasis`
holds them and does the two products reorthogonalisation needs, ``Q_j r`` and ``Q_j^T c`` with
``Q_j = [q_0 .. q_j]`` of one start vector:

* ``"device"``: one (k, rows, P) tensor on the run's device; each product is one call.
* ``"cpu"``: the same tensor in host memory (pinned when the device is CUDA, so copies are DMA);
* ``"disk"``: a (rows, k, P) file, memory-mapped, in a folder the caller names.

The last two stream ``Q_j`` through the device in tiles of at most ``chunk_mb``: whole rows while
a row fits (contiguous copies), else column slices of all ``j + 1`` rows; the device holds one tile
besides the Lanczos vectors in flight. With one tile (``(j + 1) P`` elements fit in ``chunk_mb``) the
products are the device kind's, bit for bit; with several, the tiles' parts are added in another
order than one matrix product adds them, which agrees to rounding.

A disk basis is the checkpoint's basis: a snapshot flushes the file and records a CRC-32 of every
row written, instead of copying ``k (m + 1) P`` numbers into the state file. Rows are written once
and never changed, so a state saved after step ``s`` stays valid while later steps append; a resume
checks every row it uses against its CRC, so a file a crash left half-written (or another run
overwrote) is refused, never trusted. The file is removed at :meth:`close` unless kept.
"""

from __future__ import annotations

import os
import zlib
from pathlib import Path
from typing import Iterator, Optional, Union

import numpy as np
import torch

from curvature.errors import SuiteError

BASIS_KINDS = ("device", "cpu", "disk")
#: Device memory one streamed tile of the basis may take (cpu and disk kinds).
DEFAULT_CHUNK_MB = 256.0


class LanczosBasis:
    """The Lanczos vectors ``q_0 .. q_{rows-1}`` of ``num_vectors`` start vectors, each of ``dim``
    entries in ``dtype``; products with them come back on ``device``.

    ``kind`` is one of :data:`BASIS_KINDS`; ``path`` the file of the disk kind. ``reuse_file``: open
    an existing file at ``path`` (to resume from it) instead of starting an empty one.
    """

    def __init__(self, kind: str, num_vectors: int, rows: int, dim: int, dtype: torch.dtype,
                 device: torch.device, path: Union[str, Path, None] = None,
                 chunk_mb: float = DEFAULT_CHUNK_MB, reuse_file: bool = False):
        if kind not in BASIS_KINDS:
            raise ValueError(f"basis_device must be one of {', '.join(BASIS_KINDS)}, got {kind!r}")
        if not chunk_mb > 0:
            raise ValueError(f"basis_chunk_mb must be > 0, got {chunk_mb}")
        if kind == "disk" and path is None:
            raise ValueError("basis_device='disk' needs basis_file (where to write the basis)")
        self.kind, self.k, self.rows, self.dim = kind, num_vectors, rows, dim
        self.dtype, self.device = dtype, torch.device(device)
        itemsize = torch.empty((), dtype=dtype).element_size()
        self.tile_elements = max(1, int(chunk_mb * 2 ** 20) // itemsize)
        self.path: Optional[Path] = None
        self._map: Optional[np.memmap] = None
        self.streamed_bytes = 0  # moved through the device by the tiled products (cpu, disk)
        # disk only: which rows were written, and the CRC-32 of each (checked on resume)
        self.written = torch.zeros(num_vectors, rows, dtype=torch.bool)
        self.checksums = torch.zeros(num_vectors, rows, dtype=torch.long)
        if kind == "device":
            try:
                self._q = torch.zeros(num_vectors, rows, dim, dtype=dtype, device=self.device)
            except torch.OutOfMemoryError:
                size = num_vectors * rows * dim * itemsize / 2 ** 30
                raise SuiteError(f"no room on {self.device} for the Lanczos basis ({size:.3g} GiB): use "
                                 "basis_device='cpu' or 'disk'") from None
        elif kind == "cpu":
            self._q = _host_zeros((num_vectors, rows, dim), dtype, pin=self.device.type == "cuda")
        else:
            self.path = Path(path).resolve()
            self._map = _map_file(self.path, (rows, num_vectors, dim * itemsize), fresh=not reuse_file)
            self._q = torch.from_numpy(self._map).view(dtype)  # (rows, k, dim), writes go to the file

    # --- rows -------------------------------------------------------------------------------------
    def _vector(self, i: int, stop: int) -> torch.Tensor:
        """Rows 0 .. stop-1 of start vector ``i`` where they are stored, (stop, P)."""
        return self._q[:stop, i] if self.kind == "disk" else self._q[i, :stop]

    def _fetch(self, stored: torch.Tensor) -> torch.Tensor:
        """A stored slice as a contiguous copy on the device (never a view of the file): one copy,
        also of a strided column slice."""
        out = torch.empty(stored.shape, dtype=self.dtype, device=self.device)
        return out.copy_(stored)

    def write(self, i: int, j: int, vector: torch.Tensor) -> None:
        """Store ``q_j`` of start vector ``i``."""
        if self.kind == "device":
            self._q[i, j] = vector
        elif self.kind == "cpu":
            self._q[i, j].copy_(vector)
        else:
            self._q[j, i].copy_(vector)
            self.checksums[i, j] = zlib.crc32(self._map[j, i])
            self.written[i, j] = True

    def row(self, i: int, j: int) -> torch.Tensor:
        """``q_j`` of start vector ``i`` on the device, (P,)."""
        return self._q[i, j] if self.kind == "device" else self._fetch(self._vector(i, j + 1)[j])

    def block(self, live: list, j: int) -> torch.Tensor:
        """``q_j`` of the start vectors ``live``, (P, len(live)) on the device: one product's input."""
        if self.kind == "device":
            return self._q[live, j].T if len(live) < self.k else self._q[:, j].T
        stored = self._q[j, live] if self.kind == "disk" else self._q[live, j]
        return self._fetch(stored).T

    # --- the two products of reorthogonalisation ----------------------------------------------------
    def _tiles(self, i: int, j: int) -> Iterator[tuple[slice, slice, torch.Tensor]]:
        """``Q_j`` of start vector ``i`` in tiles on the device, ``(rows, columns, tile)``: whole rows
        while one fits in a tile (contiguous copies), else slices of columns of all ``j + 1`` rows."""
        stored, count = self._vector(i, j + 1), j + 1
        if self.dim <= self.tile_elements:
            height = self.tile_elements // self.dim
            for start in range(0, count, height):
                rows = slice(start, min(start + height, count))
                yield rows, slice(0, self.dim), self._counted(self._fetch(stored[rows]))
        else:
            width = max(1, self.tile_elements // count)
            for start in range(0, self.dim, width):
                columns = slice(start, min(start + width, self.dim))
                yield slice(0, count), columns, self._counted(self._fetch(stored[:, columns]))

    def _counted(self, tile: torch.Tensor) -> torch.Tensor:
        self.streamed_bytes += tile.numel() * tile.element_size()
        return tile

    # Both products start from zeros and add each tile's part: 0 + x == x, so with one tile they are
    # the device kind's single product, bit for bit.
    def coefficients(self, i: int, j: int, r: torch.Tensor) -> torch.Tensor:
        """``Q_j r`` (j+1,): the components of ``r`` along ``q_0 .. q_j`` of start vector ``i``."""
        if self.kind == "device":
            return self._q[i, :j + 1] @ r
        out = torch.zeros(j + 1, dtype=self.dtype, device=self.device)
        for rows, columns, tile in self._tiles(i, j):
            out[rows] += tile @ r[columns]
        return out

    def combination(self, i: int, j: int, c: torch.Tensor) -> torch.Tensor:
        """``Q_j^T c`` (P,): the combination of ``q_0 .. q_j`` of start vector ``i`` with weights ``c``."""
        if self.kind == "device":
            return self._q[i, :j + 1].T @ c
        out = torch.zeros(self.dim, dtype=self.dtype, device=self.device)
        for rows, columns, tile in self._tiles(i, j):
            out[columns] += tile.T @ c[rows]
        return out

    # --- checkpoints ---------------------------------------------------------------------------------
    def snapshot(self, step: int) -> dict:
        """The state entries for rows 0 .. step: the rows themselves, or (disk) the file's name and
        the rows' CRCs after flushing it, so that the state never names rows not yet on disk."""
        if self.kind != "disk":
            return {"basis": self._q[:, :step + 1].detach().to("cpu", copy=True)}
        self._map.flush()
        return {"basis_file": str(self.path), "basis_written": self.written[:, :step + 1].clone(),
                "basis_checksums": self.checksums[:, :step + 1].clone()}

    def restore(self, state: dict, name: str) -> None:
        """Load the rows a saved state holds (``name`` names the state in errors)."""
        if "basis" in state:
            saved = state["basis"]
            rows = min(saved.shape[1], self.rows)
            if self.kind == "device":
                self._q[:, :rows] = saved[:, :rows].to(dtype=self.dtype, device=self.device)
            elif self.kind == "cpu":
                self._q[:, :rows].copy_(saved[:, :rows])
            else:
                for i in range(self.k):
                    for j in range(rows):
                        self.write(i, j, saved[i, j].to(self.dtype))
            return
        source = Path(state["basis_file"])
        written, sums = state["basis_written"], state["basis_checksums"]
        rows = min(written.shape[1], self.rows)
        in_place = self.kind == "disk" and source.resolve() == self.path
        saved = self._map if in_place else _open_saved(source, written.shape[1], self.k, self.dim,
                                                       self.dtype, name)
        for i in range(self.k):
            for j in range(rows):
                if not written[i, j]:
                    continue
                if zlib.crc32(saved[j, i]) != int(sums[i, j]):
                    raise SuiteError(f"{source} does not hold the Lanczos basis {name} was saved with "
                                     f"(row {j} of start vector {i} differs; a crash or another run "
                                     "wrote it): delete both and start afresh")
                if in_place:
                    self.written[i, j], self.checksums[i, j] = True, sums[i, j]
                else:
                    self.write(i, j, torch.from_numpy(np.array(saved[j, i])).view(self.dtype))

    # --- results and clean-up ------------------------------------------------------------------------
    def dense(self, width: int) -> torch.Tensor:
        """The basis Q_m, (k, P, width): a view on the device, or a copy in host memory (cpu, disk)."""
        if self.kind == "disk":
            return self._q[:width].permute(1, 2, 0).clone()
        return self._q[:, :width].transpose(1, 2)

    def close(self, keep: bool = False) -> None:
        """Unmap the file and remove it unless ``keep`` (a checkpoint refers to it)."""
        if self._map is None:
            return
        self._q, self._map = None, None
        if not keep:
            self.path.unlink(missing_ok=True)


def _host_zeros(shape: tuple, dtype: torch.dtype, pin: bool) -> torch.Tensor:
    """Zeros in host memory, pinned if asked and possible (pinning hundreds of GB can fail where
    pageable memory does not); no room at all is a one-line error."""
    if pin:
        try:
            return torch.zeros(shape, dtype=dtype, pin_memory=True)
        except RuntimeError:
            pass
    try:
        return torch.zeros(shape, dtype=dtype)
    except (RuntimeError, MemoryError):
        size = int(np.prod(shape)) * torch.empty((), dtype=dtype).element_size()
        raise SuiteError(f"no room in host memory for the Lanczos basis ({size / 2 ** 30:.3g} GiB): use "
                         "basis_device=disk (a memory-mapped file) or fewer steps") from None


def _map_file(path: Path, shape: tuple, fresh: bool) -> np.memmap:
    """Map ``path`` as uint8 ``shape``, its blocks reserved up front (a disk that fills up later
    would kill the run with SIGBUS on a write into the mapping); one-line errors name the file."""
    size = int(np.prod(shape))
    if not fresh and not path.is_file():
        raise SuiteError(f"{path}, the Lanczos basis file of the saved state, is missing: delete the state "
                         "and start afresh")
    opened = False
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | (os.O_TRUNC if fresh else 0), 0o644)
        opened = True
        try:
            if os.fstat(fd).st_size < size:
                if hasattr(os, "posix_fallocate"):
                    os.posix_fallocate(fd, 0, size)
                else:
                    os.ftruncate(fd, size)
        finally:
            os.close(fd)
        return np.memmap(path, dtype=np.uint8, mode="r+", shape=shape)
    except OSError as error:
        if fresh and opened:  # a file without its blocks (full disk) would only mislead
            path.unlink(missing_ok=True)
        raise SuiteError(f"cannot write the Lanczos basis file {path} ({size / 2 ** 30:.3g} GiB): "
                         f"{error.strerror}; point basis_device=disk at a writable folder with room "
                         "or use basis_device=cpu") from None


def _open_saved(path: Path, rows: int, k: int, dim: int, dtype: torch.dtype, name: str) -> np.memmap:
    """The basis file a saved state names, read-only, or a one-line error."""
    itemsize = torch.empty((), dtype=dtype).element_size()
    need = rows * k * dim * itemsize
    if not path.is_file() or path.stat().st_size < need:
        raise SuiteError(f"{path}, the Lanczos basis file of {name}, is missing or shorter than "
                         f"{need} bytes: delete the state and start afresh")
    return np.memmap(path, dtype=np.uint8, mode="r", shape=(rows, k, dim * itemsize))
