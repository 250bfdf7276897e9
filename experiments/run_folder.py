"""Claiming a run folder: one run at a time writes into it.

A run claims its folder by creating ``.run.lock`` with ``O_CREAT | O_EXCL`` (atomic on local file
systems), holding the owner's pid, host and start time; the lock is removed when the run ends, also on
an error. A second run into the same folder stops at once, naming the folder and the owner's pid. A
lock left by a process that no longer exists (same host, pid not alive: a ``kill -9``, a power cut) is
taken over with a note. Under ``distributed=true`` only rank 0 claims the folder; with a Hydra multirun
every job has its own folder and its own lock.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import socket
import time
import uuid
from pathlib import Path

from curvature.errors import SuiteError

LOCK_NAME = ".run.lock"
_HELD: set[str] = set()  # tokens of the locks this process holds


class FolderBusyError(SuiteError):
    """Another live run holds the folder."""


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _read(path: Path) -> dict | None:
    for _ in range(20):  # the owner may be between creating and filling the file
        try:
            owner = json.loads(path.read_text())
            if isinstance(owner, dict) and "pid" in owner:
                return owner
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            pass
        time.sleep(0.05)
    return {}


def busy_message(folder: Path, owner: dict) -> str:
    where = "" if owner.get("host") == socket.gethostname() else f" on host {owner.get('host')}"
    return (f"run folder {folder} is in use by another run (pid {owner.get('pid', '?')}{where}, since "
            f"{owner.get('started_at', '?')}; see {LOCK_NAME}): wait for it, or write elsewhere "
            "(hydra.run.dir=<another folder>)" + ("; delete the lock if that run is over" if where else ""))


def live_owner(folder: Path) -> dict | None:
    """The owner of ``folder``'s lock when it is a live run (or one on another host), else None."""
    path = Path(folder) / LOCK_NAME
    if not path.is_file():
        return None
    owner = _read(path)
    return owner if owner and not RunLock._stale(owner) else None


class RunLock:
    """``.run.lock`` in a run folder; :meth:`claim` it, :meth:`release` it (idempotent)."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self.token = uuid.uuid4().hex
        self.held = False
        self.took_over: dict | None = None  # the stale owner, when its lock was taken over

    def claim(self) -> "RunLock":
        owner = {"pid": os.getpid(), "host": socket.gethostname(), "token": self.token,
                 "started_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")}
        for _ in range(5):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                self._handle_existing()
                continue
            with os.fdopen(fd, "w") as handle:
                json.dump(owner, handle)
                handle.flush()
                os.fsync(handle.fileno())
            self.held = True
            _HELD.add(self.token)
            return self
        raise FolderBusyError(f"run folder {self.folder} is being claimed by other runs at this moment; "
                              f"try again, or write elsewhere (hydra.run.dir=<another folder>)")

    def _handle_existing(self) -> None:
        owner = _read(self.path)
        if owner is None:  # removed meanwhile: try again
            return
        if not self._stale(owner):
            raise FolderBusyError(busy_message(self.folder, owner))
        # Move the stale lock aside (atomic: of two runs taking it over, one wins), and check that what
        # was moved is still the stale lock, not a live run's that replaced it meanwhile.
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        moved = _read(aside) or {}
        if moved.get("token") != owner.get("token") or moved.get("pid") != owner.get("pid"):
            try:  # put the live lock back where it was
                os.link(aside, self.path)
            except FileExistsError:
                pass
        else:
            self.took_over = owner
        aside.unlink(missing_ok=True)

    @staticmethod
    def _stale(owner: dict) -> bool:
        if owner == {}:  # unreadable for a second: a crash while it was being written
            return True
        if owner.get("host") != socket.gethostname():
            return False  # cannot tell whether a process on another machine is alive
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return True
        if pid == os.getpid():
            return owner.get("token") not in _HELD
        return not _alive(pid)

    def stale_note(self) -> str | None:
        if not self.took_over:
            return None
        o = self.took_over
        return (f"took over the lock of an earlier run in this folder (pid {o.get('pid', '?')}, started "
                f"{o.get('started_at', '?')}) whose process no longer exists")

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        _HELD.discard(self.token)
        owner = _read(self.path)
        if owner and owner.get("token") == self.token:
            self.path.unlink(missing_ok=True)
