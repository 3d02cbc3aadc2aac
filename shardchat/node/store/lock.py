"""One process per data directory: ``store.lock`` is held (flock) while the store is open.

A second node on the same directory would hand out the seqs the first one already used, so
it must fail at open instead. The kernel drops the lock when the process dies, even by
``kill -9``, so a crash never leaves a stale lock behind. Taken by the opening's worker
thread, released by the event loop at close; no thread of its own.
"""

from __future__ import annotations

import os
from pathlib import Path

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX
    fcntl = None  # type: ignore[assignment]

from shardchat.node.store.errors import StoreError

LOCK_NAME = "store.lock"


class DirectoryLock:
    """The exclusive lock of one data directory, held from ``acquire`` to ``release``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.path = directory / LOCK_NAME
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock, or raise StoreError naming the directory another process uses."""
        if fcntl is None:  # pragma: no cover
            return
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise StoreError(f"cannot create {self.path}: {exc}") from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            raise StoreError(
                f"{self.directory} is in use by another process; stop it or give this "
                "node its own data directory.") from exc
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None
