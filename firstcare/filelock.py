"""One process per file: an exclusive ``flock`` on ``<path>.lock`` that names its holder.

Used by the SQLite store and the audit trail, whose files must have one writer. The kernel drops
the lock when the process dies (SIGKILL included), so a crash never leaves a stale lock behind.
The holder writes ``pid N on HOST`` into the lock file, so a refusal can say who holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os


class FileInUse(Exception):
    """Another process holds the lock: ``holder`` says who, ``lock_path`` where."""

    def __init__(self, lock_path: str, holder: str) -> None:
        super().__init__(f"{lock_path} is held by {holder}")
        self.lock_path = lock_path
        self.holder = holder


def lock_exclusive(path: str) -> int:
    """Take the lock beside ``path`` (creating its folder); returns the open descriptor, which
    holds the lock until closed. Raises :class:`FileInUse` when another process holds it."""
    lock_path = os.path.abspath(path) + ".lock"
    os.makedirs(os.path.dirname(lock_path), exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
            raise FileInUse(lock_path, holder) from exc
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}\n".encode(), 0)
    return fd
