"""One run at a time on an output: an OS file lock held for the length of a run (batch reports, training runs).

The lock is an OS lock (``fcntl.flock``; ``msvcrt`` byte-range locks on Windows), released when the process ends in
any way (a ``kill -9`` included), so a killed run's rerun is never blocked. Where the file system has no locks the
run goes ahead unlocked rather than not at all.
"""

from __future__ import annotations

import errno
import os
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

__all__ = ["run_lock"]


@contextmanager
def run_lock(lock: Path, *, busy: Callable[[str], Exception]) -> Iterator[None]:
    """Hold an exclusive lock on the file ``lock`` (made if needed, removed at the end) for the ``with`` body.

    Args:
        lock: the lock file's path (its folder is made if missing, and removed again at the end if it is then
            empty: a run refused at its first check leaves no folder behind).
        busy: called with a line about the holder ("pid 123 on host, started ...") when another process holds
            the lock; the exception it returns is raised.

    Raises:
        Exception: ``busy``'s, when another process holds the lock.
    """
    made = []
    folder = lock.parent
    while not os.path.lexists(folder) and folder != folder.parent:
        made.append(folder)  # deepest first
        folder = folder.parent
    try:
        lock.parent.mkdir(parents=True, exist_ok=True)
    except OSError:
        yield  # nothing can be written there either: the run's own first write says so
        return
    try:
        with _held(lock, busy):
            yield
    finally:
        for folder in made:
            try:
                folder.rmdir()  # only if empty: the run put nothing there
            except OSError:
                break


@contextmanager
def _held(lock: Path, busy: Callable[[str], Exception]) -> Iterator[None]:
    """:func:`run_lock` in its existing folder."""
    while True:
        try:
            # 0o666 less the umask: with 0o644 a group member could not open a colleague's lock file, and ran the
            # same manifest beside it unlocked (every subject redone, the report overwritten).
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            fd = -1
            if e.errno in (errno.EACCES, errno.EPERM) and os.path.lexists(lock):
                try:  # another user's lock file: a lock needs no write permission (flock on a read-only file)
                    fd = os.open(lock, os.O_RDONLY)
                except OSError:
                    fd = -1
            if fd < 0:
                yield  # no lock where the outputs go (read-only): the run's own first write says so
                return
        if _try_lock(fd):
            try:  # the file was replaced while we waited for it (its holder ended and removed it): lock the new one
                same = os.path.samestat(os.fstat(fd), os.stat(lock))
            except OSError:
                same = False
            if same:
                break
        else:
            try:
                holder = os.read(fd, 200).decode("utf-8", "replace").strip()
            except OSError:
                holder = ""
            os.close(fd)
            raise busy(holder or "running")
        os.close(fd)
    try:
        import socket

        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, started "
                     f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())}".encode())
    except OSError:
        pass
    try:
        yield
    finally:
        removed = False
        try:
            os.unlink(lock)  # while still locked: a run waiting for it then finds a new file (see above)
            removed = True
        except OSError:
            pass
        os.close(fd)  # releases the lock
        if not removed and _windows_locks():
            # Windows refuses to delete a file that is open (the lock file stayed beside the report for good, and
            # is not hidden there). Closed now, it goes unless another run has it open, which Windows refuses too.
            try:
                os.unlink(lock)
            except OSError:
                pass


def _windows_locks() -> bool:
    """True where locks are ``msvcrt`` byte-range locks (Windows: no ``fcntl``)."""
    try:
        import fcntl  # noqa: F401
    except ImportError:
        return True
    return False


def _try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on an open file; False when another process holds it."""
    try:
        import fcntl
    except ImportError:  # Windows
        import msvcrt

        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError as e:
            # Held by another process: EACCES (or EDEADLOCK). Anything else (EINVAL: a share without byte-range
            # locks) is a file system without locks, as below: run unlocked rather than refuse every run.
            return e.errno not in (errno.EACCES, getattr(errno, "EDEADLOCK", errno.EDEADLK))
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a file system without locks: run unlocked rather than not at all
        return True
    return True
