"""A pid file that is also a lock: the process that holds the lock writes its pid there, and
the lock (not the file) says whether it still runs, so a stale file or a reused pid is never
mistaken for a running process. `imagepipe demo` holds one while it keeps the demo pool;
`imagepipe demo --down` stops the holder before it takes the pool down."""

from __future__ import annotations

import fcntl
import os
import signal
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from imagepipe.errors import BadInputError, OperationFailedError
from imagepipe.private import FILE_MODE, private_dir


@contextmanager
def holding(path: Path, busy: Callable[[int | None], str]) -> Iterator[None]:
    """Hold the lock on `path` (owner-only, created with its folder) with this process's pid
    in it. BadInputError(busy(pid)) when another process holds it."""
    private_dir(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, FILE_MODE)
    try:
        if not _try_lock(fd):
            raise BadInputError(busy(_read_pid(fd)))
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        os.close(fd)  # releases the lock; the file stays (a file without a lock is not a holder)


def holder(path: Path) -> int | None:
    """The pid of the process holding the lock on `path`; None when nobody holds it."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        return None if _try_lock(fd) else _read_pid(fd)
    finally:
        os.close(fd)


def stop_holder(path: Path, what: str, *, timeout: float) -> int | None:
    """SIGTERM to the process holding the lock on `path`, then wait until it let go. The pid
    it had, or None when nobody held it. OperationFailedError when it did not stop in time."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        return None
    try:
        if _try_lock(fd):
            return None
        pid = _read_pid(fd)
        for _ in range(20):  # the holder writes its pid right after taking the lock
            if pid is not None:
                break
            time.sleep(0.05)
            pid = _read_pid(fd)
        if pid is None:
            raise OperationFailedError(f"{what} holds {path} but its pid is not in it; stop it")
        os.kill(pid, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        while not _try_lock(fd):
            if time.monotonic() > deadline:
                raise OperationFailedError(
                    f"{what} (pid {pid}) did not stop within {timeout:.0f} s of SIGTERM; "
                    f"stop it (kill {pid}) and try again"
                )
            time.sleep(0.1)
        return pid
    finally:
        os.close(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _read_pid(fd: int) -> int | None:
    text = os.pread(fd, 32, 0).decode(errors="replace").strip()
    return int(text) if text.isdigit() else None
