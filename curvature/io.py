"""Atomic file writes: a file is either absent or complete, never half-written.

A write goes to ``.<name>.<random>.tmp`` beside the target and is renamed over it; a kill at the wrong
moment can leave such a temporary behind (and ``.staging-*`` folders of a run's results):
:func:`stale_temporaries` finds them so that the next run into the folder can remove them.
"""

from __future__ import annotations

import errno
import io
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Mapping

import torch

from curvature.errors import SuiteError

TEMP_SUFFIX = ".tmp"
STAGING_PREFIX = ".staging-"
_FULL = {errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)}


class DiskFullError(SuiteError):
    """No space left (or quota exceeded) while writing a file; the partial file has been removed."""


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file in the same folder, fsync, then rename over ``path``.

    On any failure the temporary is removed; a full disk becomes a one-line :class:`DiskFullError`
    naming ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except OSError as error:
        Path(tmp).unlink(missing_ok=True)
        if error.errno in _FULL:
            raise DiskFullError(f"no space left on the device while writing {path} ({len(data)} bytes; "
                                f"{error.strerror}); the partial file was removed: free some space or "
                                "write elsewhere (hydra.run.dir=<folder on another disk>)") from None
        raise
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def torch_save_atomic(path: Path, obj) -> None:
    """``torch.save`` into memory, then :func:`write_bytes_atomic`."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    write_bytes_atomic(path, buffer.getvalue())


def stale_temporaries(folder: Path) -> list[Path]:
    """The leftovers of interrupted atomic writes directly in ``folder``: ``.staging-*`` folders and
    ``.<name>.<random>.tmp`` files. Only safe to remove while no other process writes there."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = [p for p in folder.glob(f"{STAGING_PREFIX}*") if p.is_dir()]
    found += [p for p in folder.glob(f".*{TEMP_SUFFIX}") if p.is_file()]
    return sorted(found)


def remove_stale_temporaries(folder: Path) -> list[str]:
    """Remove :func:`stale_temporaries`; return the names removed."""
    removed = []
    for path in stale_temporaries(folder):
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path.name)
    return removed


# --- safe reads: every .pt file the suite reads (checkpoints, Ritz vectors) goes through here -----
def _refusal(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in a few words."""
    text = str(error)
    if "Weights only load failed" in text:
        found = re.search(r"GLOBAL ([\w.]+)", text)
        asks = f"it asks for {found.group(1)}" if found else "it holds more than tensors and plain values"
        return f"{asks}; only tensors and plain Python values are loaded, so no code runs from a file"
    return f"{type(error).__name__}: not written by torch.save, or truncated"


def load_torch_file(path, what: str, fix: str, map_location="cpu"):
    """``torch.load(path, weights_only=True)``: tensors and plain Python values only, so no code runs
    from the file. A missing, foreign, truncated or code-carrying file is a one-line SuiteError
    ``"<what> <path> is not a <what> this suite can load safely (why); <fix>"``."""
    path = Path(path)
    if not path.is_file():
        raise SuiteError(f"{what} {path} does not exist or is not a file; {fix}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # noqa: BLE001 - whatever torch says, the user's fix is the same
        raise SuiteError(f"{what} {path} is not a {what} this suite can load safely ({_refusal(error)}); "
                         f"{fix}") from None


def _tensors(node, prefix: str = ""):
    """``(dotted name, tensor)`` of every tensor in nested mappings, lists and tuples."""
    items = node.items() if isinstance(node, Mapping) else enumerate(node) \
        if isinstance(node, (list, tuple)) else ()
    for key, value in items:
        if isinstance(value, torch.Tensor):
            yield f"{prefix}{key}", value
        else:
            yield from _tensors(value, f"{prefix}{key}.")


def first_non_finite(node, prefix: str = "") -> tuple[str, str] | None:
    """``(name, "n NaN, m Inf of k entries")`` of the first floating tensor holding NaN or Inf in a
    state dict or optimiser state (nested mappings and lists); None when every tensor is finite."""
    for name, value in _tensors(node, prefix):
        if value.is_floating_point() and not bool(value.isfinite().all()):
            nan, inf = int(value.isnan().sum()), int(value.isinf().sum())
            return name, f"{nan} NaN, {inf} Inf of {value.numel()} entries"
    return None
