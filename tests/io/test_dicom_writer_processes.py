"""DICOM SeriesNumber across processes: batch workers writing series in the same second get distinct numbers."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pydicom

import medfuse.io.dicom_writer as dw
from medfuse.io.writers import save
from medfuse.volume import Volume

#: A child process: the clock stopped at 03:04:05 (both write "in the same second", whatever the machine's
#: load), waits for the go file so that the two write at once, writes one small CT series.
_CHILD = textwrap.dedent("""
    import datetime as dt, sys, time, types
    from pathlib import Path
    import numpy as np
    import medfuse.io.dicom_writer as dw
    from medfuse.io.writers import save
    from medfuse.volume import Volume

    class Stopped(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return cls(2026, 1, 2, 3, 4, 5)

    dw._dt = types.SimpleNamespace(datetime=Stopped)
    vol = Volume(np.arange(24, dtype=np.int16).reshape(3, 4, 2), np.eye(4), modality="CT", unit="HU")
    go = Path(sys.argv[2])
    while not go.exists():
        time.sleep(0.01)
    save(vol, sys.argv[1])
""")


def _series(folder: Path):
    ds = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    return int(ds.SeriesNumber), str(ds.SeriesInstanceUID)


def test_two_processes_writing_in_the_same_second_get_distinct_series_numbers(tmp_path):
    """Before: both got 1030405 (1HHMMSS, distinct per process only), so a PACS listed two series under one
    number (their SeriesInstanceUIDs differed). Now each process claims its number machine-wide."""
    env = {**os.environ, "TMPDIR": os.fspath(tmp_path / "tmp")}  # the claims folder of this test alone
    (tmp_path / "tmp").mkdir()
    go = tmp_path / "go"
    kids = [subprocess.Popen([sys.executable, "-c", _CHILD, os.fspath(tmp_path / f"s{i}"), os.fspath(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for i in range(2)]
    go.touch()
    for k in kids:
        _, err = k.communicate(timeout=120)
        assert k.returncode == 0, err[-2000:]
    (n0, uid0), (n1, uid1) = _series(tmp_path / "s0"), _series(tmp_path / "s1")
    assert uid0 != uid1
    assert n0 != n1
    # Still the clock's number (1HHMMSS at 03:04:05), one of them raised by one: meaningful and in IS range.
    assert sorted([n0, n1]) == [1_030_405, 1_030_406]
    claimed = sorted(int(p.name) for p in (tmp_path / "tmp").glob("medfuse-series-numbers*/20260102/*"))
    assert claimed == [1_030_405, 1_030_406]


def test_unusable_claims_folder_falls_back_to_per_process_numbers(tmp_path, monkeypatch):
    """A claims path that is a file (or unwritable) must not fail the write: numbers stay distinct in-process."""
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("x")
    monkeypatch.setattr(dw, "_claims_root", lambda: blocker)
    monkeypatch.setattr(dw, "_last_series_number", 0)
    vol = Volume(np.zeros((3, 4, 2), np.int16), np.eye(4), modality="CT", unit="HU")
    numbers = [_series(save(vol, tmp_path / f"s{i}"))[0] for i in range(2)]
    assert numbers[1] == numbers[0] + 1 and blocker.read_text() == "x"


def test_old_days_claims_are_removed(tmp_path, monkeypatch):
    """Claims are per day (1HHMMSS repeats daily); folders of days more than two days old are pruned once."""
    root = tmp_path / "claims"
    old, recent = root / "20000101", root / "20000102"
    for d in (old, recent):
        d.mkdir(parents=True)
        (d / "1000000").touch()
    os.utime(old, (0, 0))
    monkeypatch.setattr(dw, "_claims_root", lambda: root)
    monkeypatch.setattr(dw, "_pruned_claims", False)
    vol = Volume(np.zeros((3, 4, 2), np.int16), np.eye(4), modality="CT", unit="HU")
    save(vol, tmp_path / "s")
    assert not old.exists() and recent.exists()
    assert len(list(root.iterdir())) == 2  # recent and today's
