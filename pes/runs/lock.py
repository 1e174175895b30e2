"""One run per run directory at a time: a lock file holding the owner's process id and host.

``RUN_DIR/.pes-lock`` is created by the process that runs (or resumes) the run and removed when
it ends. While it lives, the owner also holds an exclusive ``flock`` on it, which the kernel
drops the moment the owner dies (even by SIGKILL), so a lock left behind by a dead process is
told apart from a live one without trusting process ids that may have been reused:

* the flock is held by someone: the directory is in use; :class:`RunLocked` (a ConfigError,
  exit 2) names the holder, e.g. ``pid 4242 on host gpu-3 since 2026-12-03 09:51:02``;
* the flock is free and the file names a process on this host: the holder died; the lock is
  taken over with a warning (:class:`StaleLockWarning`);
* the flock is free but the file names another host (a shared filesystem, where flock may not
  reach across machines): refused, asking the user to delete the file if that run is gone.
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from pes.runs.errors import ConfigError, RunWarning

LOCK_FILE = ".pes-lock"


class RunLocked(ConfigError):
    """The run directory is in use by another live process. ``holder``: its lock record."""

    def __init__(self, message: str, holder: dict[str, Any], field: str = "out"):
        super().__init__(message, field=field)
        self.holder = holder


class StaleLockWarning(RunWarning):
    """A lock left by a process that died was taken over."""


def _read(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 4096)
    try:
        data = json.loads(raw.decode())
        return data if isinstance(data, dict) else {}
    except (UnicodeDecodeError, json.JSONDecodeError):
        return {}


def describe(holder: dict[str, Any]) -> str:
    """'pid 4242 on host gpu-3 since 2026-12-03 09:51:02 (pes run ...)' from a lock record."""
    text = f"pid {holder.get('pid', '?')} on host {holder.get('host', '?')}"
    if isinstance(holder.get("started"), int | float):
        text += " since " + time.strftime("%Y-%m-%d %H:%M:%S",
                                          time.localtime(holder["started"]))
    return text


def _alive(pid: Any) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def holder(directory: str | os.PathLike) -> dict[str, Any] | None:
    """The lock record of the live process holding ``directory``, or None (no lock file, or
    one left by a dead process). Changes nothing."""
    path = Path(directory) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            return _read(fd) or {"pid": "?", "host": "?"}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def refusal(directory: str | os.PathLike, record: dict[str, Any]) -> str:
    """The one line refusing a run in ``directory``, held by ``record``."""
    return (f"{directory} is in use by another pes run ({describe(record)}; lock file "
            f"{Path(directory) / LOCK_FILE}): wait for it to finish or stop it, or choose "
            "another --out")


class RunLock:
    """Hold ``directory/.pes-lock`` for the life of a run (a context manager).

    ``field``: the setting a refusal names ('out' for a new run, 'resume' for --resume).
    Creates ``directory`` if needed. Raises :class:`RunLocked` when a live process holds it.
    """

    def __init__(self, directory: str | os.PathLike, field: str = "out"):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.field = field
        self._fd: int | None = None
        self.took_over: dict[str, Any] | None = None

    def acquire(self) -> RunLock:
        self.directory.mkdir(parents=True, exist_ok=True)
        for _ in range(20):  # retried only when the file was replaced under us
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                holder = _read(fd)
                os.close(fd)
                if e.errno not in (errno.EAGAIN, errno.EACCES, errno.EWOULDBLOCK):
                    raise
                raise RunLocked(self._refusal(holder), holder, self.field) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if not same:  # the owner removed it between our open and flock: try again
                os.close(fd)
                continue
            self._claim(fd)
            return self
        raise RuntimeError(f"could not take the lock {self.path}: it keeps being replaced")

    def _refusal(self, record: dict[str, Any]) -> str:
        return refusal(self.directory, record)

    def _claim(self, fd: int) -> None:
        old = _read(fd)
        here = socket.gethostname()
        if old and old.get("host") not in (None, here):
            os.close(fd)
            raise RunLocked(
                f"{self.directory} is locked by {describe(old)}, another host, which this "
                f"machine cannot check; if that run is no longer going, delete {self.path}",
                old, self.field)
        if old and old.get("pid") != os.getpid():
            state = "no longer running" if not _alive(old.get("pid")) else \
                "its process id now belongs to another program"
            self.took_over = old
            warnings.warn(f"took over the stale lock of {describe(old)} in {self.path} ({state})",
                          StaleLockWarning, stacklevel=3)
        record = {"pid": os.getpid(), "host": here, "started": round(time.time(), 3),
                  "command": " ".join(sys.argv)[:500]}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        self._fd = fd

    def release(self) -> None:
        """Remove the lock file (while still holding the flock), then drop the flock."""
        if self._fd is None:
            return
        try:
            if os.fstat(self._fd).st_ino == os.stat(self.path).st_ino:
                self.path.unlink()
        except FileNotFoundError:
            pass
        finally:
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()
