"""One live run per run folder: an exclusive flock on `<run.output_dir>/.lock`, held for the whole run by the
process that writes the folder (rank 0 under torchrun). The kernel releases it when the process dies, however it
dies, so a crashed or killed run never leaves a stale lock; a second run in the same folder is refused at once
instead of overwriting the first one's checkpoints, metrics and student.pt."""

from __future__ import annotations

import fcntl
import os
import socket
from pathlib import Path

from fastfit.errors import ConfigError

LOCK_NAME = ".lock"

# Lock descriptors this process holds. Forked children (DataLoader workers) close their copies, so the lock is
# released when the run's own process dies even while a worker of it lingers for a moment.
_HELD: set[int] = set()


def _close_in_child() -> None:
    for fd in list(_HELD):
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_in_child)


class RunFolderLock:
    """Holds the exclusive lock on a run folder from acquire() to release() (or the process's end)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> RunFolderLock:
        """Take the lock, recording this process's pid and host in the file; a ConfigError when a live run holds it."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as err:
            raise ConfigError(
                f"run.output_dir {self.folder} cannot hold a run ({err.strerror or err}); give a writable folder"
            ) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
            os.close(fd)
            raise ConfigError(
                f"run folder {self.folder} is in use by another live run ({holder or 'pid not recorded'}); wait for "
                "it to end or stop it, or give this run another run.output_dir"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        self._fd = fd
        _HELD.add(fd)
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        _HELD.discard(self._fd)
        os.close(self._fd)  # closing the only descriptor drops the flock
        self._fd = None
