"""The run lock (batch reports, training run folders) between two users of one group folder."""

from __future__ import annotations

import errno
import fcntl
import os
import stat

import pytest

from medfuse import _runlock
from medfuse._runlock import run_lock


class Busy(Exception):
    pass


def test_the_lock_file_is_as_open_as_the_umask_allows(tmp_path):
    old = os.umask(0o002)  # a group project folder's
    try:
        with run_lock(tmp_path / ".r.lock", busy=Busy):
            mode = stat.S_IMODE(os.stat(tmp_path / ".r.lock").st_mode)
    finally:
        os.umask(old)
    assert mode == 0o664  # 0o644 whatever the umask: a group member could not open it


def test_another_users_lock_file_still_locks(tmp_path, monkeypatch):
    """A colleague's lock file this user may only read (as root cannot be simulated otherwise, opening it for
    writing is made to fail as it does for them): the run was not locked at all, and ran beside theirs."""
    lock = tmp_path / ".r.lock"
    lock.write_text("pid 1 on host, started ...")
    theirs = os.open(lock, os.O_RDWR)
    fcntl.flock(theirs, fcntl.LOCK_EX | fcntl.LOCK_NB)
    real_open = os.open

    def as_another_user(path, flags, *args):
        if os.fspath(path) == os.fspath(lock) and flags & (os.O_RDWR | os.O_WRONLY):
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(path))
        return real_open(path, flags, *args)

    monkeypatch.setattr(_runlock.os, "open", as_another_user)
    try:
        with pytest.raises(Busy, match="pid 1 on host"):
            with run_lock(lock, busy=Busy):
                pass
    finally:
        os.close(theirs)
    with run_lock(lock, busy=Busy):  # theirs ended: this run takes the lock, through the read-only file
        with pytest.raises(Busy):
            with run_lock(lock, busy=Busy):
                pass
