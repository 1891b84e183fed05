"""Batch report, lock and CLI signal handling seen together (fast, no fusion run)."""

import csv
import errno
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from medfuse import batch
from medfuse.batch import Subject, run_batch
from medfuse.errors import InvalidInputError, MedfuseError


def _subjects(tmp_path):
    return [Subject(subject=f"s{i}", fixed=str(tmp_path / f"s{i}_mr.nii.gz"), moving=[str(tmp_path / f"s{i}_pet")],
                    output=str(tmp_path / "out" / f"s{i}_fused.nii.gz")) for i in (1, 2)]


def _earlier_report(path):
    """A report an earlier run left: s1 done, s3 (not in this run) failed."""
    rows = [dict.fromkeys(batch._COLUMNS, "") for _ in range(2)]
    rows[0].update(subject="s1", status="done", output="out/s1_fused.nii.gz", method_used="mean")
    rows[1].update(subject="s3", status="failed", error="x")
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=batch._COLUMNS, lineterminator="\n")
        w.writeheader()
        w.writerows(rows)
    return path.read_bytes()


@pytest.mark.parametrize("scheduler, workers", [("locla", 2), ("local", 0)])
def test_a_run_refused_for_its_scheduler_leaves_the_report_as_it_was(tmp_path, scheduler, workers):
    """A typo in --scheduler (or --workers 0) is refused before the report is touched: it used to be rewritten
    first with this run's subjects 'pending' (the earlier 'done' row lost) for a run that never started."""
    report = tmp_path / "r.csv"
    before = _earlier_report(report)
    with pytest.raises(InvalidInputError):
        run_batch(_subjects(tmp_path), scheduler=scheduler, workers=workers, report=report, progress=False)
    assert report.read_bytes() == before
    fresh = tmp_path / "fresh.csv"
    with pytest.raises(InvalidInputError):
        run_batch(_subjects(tmp_path), scheduler=scheduler, workers=workers, report=fresh, progress=False)
    assert not fresh.exists()
    assert not (tmp_path / ".r.csv.lock").exists() and not (tmp_path / ".fresh.csv.lock").exists()


def test_a_run_that_stops_on_an_error_leaves_no_row_pending(tmp_path, monkeypatch):
    """The scheduler unreachable (or any error that ends the run): the report keeps no 'pending' row that no run
    will ever finish; the subjects' earlier rows come back, the others say why they did not run."""
    report = tmp_path / "r.csv"
    _earlier_report(report)

    def unreachable(*a, **k):
        raise MedfuseError("cannot reach the Dask scheduler at tcp://h:8786 (OSError)", fix="start it")

    monkeypatch.setattr(batch, "_run_on_dask", unreachable)
    with pytest.raises(MedfuseError, match="cannot reach"):
        run_batch(_subjects(tmp_path), scheduler="tcp://h:8786", report=report, progress=False)
    rows = {r["subject"]: r for r in csv.DictReader(report.read_text(encoding="utf-8").splitlines())}
    assert sorted(rows) == ["s1", "s2", "s3"]
    assert "pending" not in {r["status"] for r in rows.values()}
    assert rows["s1"]["status"] == "done" and rows["s1"]["method_used"] == "mean"  # as the earlier run left it
    assert rows["s2"]["status"] == "cancelled" and "MedfuseError" in rows["s2"]["error"]
    assert rows["s3"]["status"] == "failed"


def test_a_list_of_subjects_is_checked_like_a_manifest(tmp_path):
    """The same subject twice in a list made the report show one subject's row for both; outputs differing only
    in case are one file on Windows and macOS. Both are refused before any work, as in a manifest."""
    a, b = _subjects(tmp_path)
    twice = Subject(subject="s1", fixed=b.fixed, moving=b.moving, output=b.output)
    with pytest.raises(InvalidInputError, match="appears twice in the list"):
        run_batch([a, twice], scheduler="synchronous", report=tmp_path / "r.csv", progress=False)
    upper = Subject(subject="s2", fixed=b.fixed, moving=b.moving, output=a.output.replace("s1_fused", "S1_FUSED"))
    with pytest.raises(InvalidInputError, match="letter case"):
        run_batch([a, upper], scheduler="synchronous", report=tmp_path / "r.csv", progress=False)
    assert not (tmp_path / "r.csv").exists()


def test_the_report_lock_file_is_removed_on_windows_too(tmp_path, monkeypatch):
    """Windows cannot delete a file that is open: the lock file stayed beside every report for good
    (`.study-report.csv.lock`, not hidden there). It is removed once closed."""
    fcntl = pytest.importorskip("fcntl")
    import types

    def locking(fd, mode, nbytes):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise PermissionError(errno.EACCES, "Permission denied") from None

    monkeypatch.setitem(sys.modules, "fcntl", None)
    monkeypatch.setitem(sys.modules, "msvcrt", types.SimpleNamespace(LK_NBLCK=2, locking=locking))
    open_fds = {}
    real_open, real_close, real_unlink = os.open, os.close, os.unlink

    def tracked_open(p, *a, **k):
        fd = real_open(p, *a, **k)
        open_fds[fd] = Path(p).name
        return fd

    def tracked_close(fd):
        open_fds.pop(fd, None)
        return real_close(fd)

    def windows_unlink(p, *a, **k):  # DeleteFile on a file open without FILE_SHARE_DELETE
        if Path(p).name in open_fds.values():
            raise PermissionError(errno.EACCES, "The process cannot access the file", str(p))
        return real_unlink(p, *a, **k)

    monkeypatch.setattr(os, "open", tracked_open)
    monkeypatch.setattr(os, "close", tracked_close)
    monkeypatch.setattr(os, "unlink", windows_unlink)
    report = tmp_path / "study-report.csv"
    with batch._report_lock(report):
        assert (tmp_path / ".study-report.csv.lock").exists()
    assert not (tmp_path / ".study-report.csv.lock").exists()


_FAKE_COMMAND = textwrap.dedent("""
    import os, signal, sys, time, types
    def run(args):
        os.kill(os.getpid(), signal.SIGTERM)  # what SLURM sends at the time limit
        time.sleep(20)
        print("not stopped")
        return 0
    fake = types.ModuleType("fake")
    fake.add_arguments = lambda p: p
    fake.run = run
    sys.modules[sys.argv[1]] = fake
    from medfuse.cli import main
    sys.exit(main([sys.argv[2]]))
""")


@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signals")
@pytest.mark.parametrize("command, module", [("train", "medfuse.fusion.train"), ("evaluate", "medfuse.evaluate")])
def test_sigterm_cancels_train_and_evaluate_like_ctrl_c(command, module):
    """The help and docs promise exit 130 for SIGTERM; `medfuse train`/`evaluate` died with -15 and no word."""
    proc = subprocess.run([sys.executable, "-c", _FAKE_COMMAND, module, command], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 130, (proc.returncode, proc.stderr[-500:])
    assert f"medfuse {command}: cancelled" in proc.stderr
    assert "not stopped" not in proc.stdout


@pytest.mark.parametrize("sep", [";", ","])
def test_a_manifest_row_with_more_cells_than_its_header_is_refused(tmp_path, sep):
    """An unquoted `pet;spect.nii.gz` in a ';'-separated manifest split into two cells and the SPECT was dropped
    without a word (the subject fused without it). The row is refused with its line; quoted, it reads as two
    moving images; a trailing empty cell is fine."""
    from medfuse.batch import read_manifest

    m = tmp_path / "study.csv"
    m.write_text(f"subject{sep}fixed{sep}output{sep}moving\ns01{sep}mr.nii.gz{sep}o.nii.gz{sep}pet{sep}spect.nii.gz\n",
                 encoding="utf-8")
    with pytest.raises(InvalidInputError, match="line 2 has more cells than the header"):
        read_manifest(m)
    quoted = '"pet;spect.nii.gz"'
    m.write_text(f"subject{sep}fixed{sep}output{sep}moving\ns01{sep}mr.nii.gz{sep}o.nii.gz{sep}{quoted}{sep}\n",
                 encoding="utf-8")
    assert [Path(x).name for x in read_manifest(m)[0].moving] == ["pet", "spect.nii.gz"]


def test_dataset_folders_differing_only_in_case_are_refused(tmp_path):
    """Subject folders sub-01 and SUB-01 (distinct on Linux) give outputs sub-01_fused and SUB-01_fused, one file
    on Windows and macOS: the second subject's output silently replaced the first's."""
    from medfuse.batch import run_batch, write_phantom_subjects

    write_phantom_subjects(tmp_path, 2, first_seed=1, method="max", register=None, downsample=4)
    (tmp_path / "sub-02").rename(tmp_path / "SUB-01")
    (tmp_path / "manifest.csv").unlink()
    with pytest.raises(InvalidInputError, match="differ only in letter case"):
        run_batch(tmp_path, scheduler="synchronous", register=None, method="max")
    assert not (tmp_path / "derivatives" / "medfuse" / "sub-01_fused.nii.gz").exists()
