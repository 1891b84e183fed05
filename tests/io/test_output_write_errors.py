"""A write that fails for a reason other than "the output exists" is an OutputWriteError (an OSError
with the cause's errno), never an OutputExistsError (a FileExistsError).

Why: code that catches FileExistsError to pick another name (its documented use) retried forever on a full disk,
a forbidden folder or a name too long, since every write failure was an OutputExistsError.
"""

from __future__ import annotations

import errno
import os
import pickle
import tempfile

import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseError, OutputExistsError, OutputWriteError


def _vol(shape=(6, 5, 4), seed=0):
    rng = np.random.default_rng(seed)
    return medfuse.Volume(rng.random(shape, dtype=np.float32), np.eye(4))


def _is_write_error(e: BaseException, code: int) -> None:
    """The typed write error: a MedfuseError and an OSError with ``code``, never a FileExistsError."""
    assert isinstance(e, OutputWriteError) and isinstance(e, MedfuseError) and isinstance(e, OSError)
    assert not isinstance(e, (OutputExistsError, FileExistsError))
    assert e.errno == code, (e.errno, code)
    assert e.fix and "Fix:" in str(e) and not str(e).startswith("[Errno")


# ----------------------------------------------------------------------------- the failures, one by one
@pytest.mark.parametrize("name", ["big.nii.gz", "big.nii", "big.mha", "big.nrrd", "big.nhdr", "big.mhd"])
def test_a_real_full_disk_is_a_write_error_with_enospc(small_disk, name):
    vol = _vol((128, 128, 64))  # 4 MiB of random float32 (incompressible) on a 2 MiB disk
    with pytest.raises(OutputWriteError, match="disk is full") as info:
        medfuse.save(vol, small_disk / name)
    _is_write_error(info.value, errno.ENOSPC)
    assert info.value.path == os.fspath(small_disk / name)
    assert list(small_disk.iterdir()) == []


def test_a_simulated_full_disk_is_a_write_error_with_enospc(tmp_path, monkeypatch):
    import nibabel as nib

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    with pytest.raises(OutputWriteError, match="disk is full") as info:
        medfuse.save(_vol(), tmp_path / "f.nii.gz")
    _is_write_error(info.value, errno.ENOSPC)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("code, words", [(errno.EACCES, "permission denied"), (errno.EPERM, "permission denied"),
                                         (errno.EROFS, "read-only"), (getattr(errno, "EDQUOT", 122), "disk is full")])
@pytest.mark.parametrize("name", ["x.nii.gz", "x.mhd", "series"])
def test_a_refused_write_is_a_write_error_with_its_errno(tmp_path, monkeypatch, code, words, name):
    """Simulated where the file system would answer: root ignores permissions, and a read-only mount needs one."""

    def refused(*a, **k):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(tempfile, "mkstemp", refused)
    monkeypatch.setattr(tempfile, "mkdtemp", refused)
    with pytest.raises(OutputWriteError, match=words) as info:
        medfuse.save(_vol(), tmp_path / name)
    _is_write_error(info.value, code)
    assert os.listdir(tmp_path) == []


def test_a_missing_folder_is_a_write_error_with_enoent(tmp_path):
    with pytest.raises(OutputWriteError, match="folder does not exist") as info:
        medfuse.save(_vol(), tmp_path / "no-such-folder" / "x.nii.gz")
    _is_write_error(info.value, errno.ENOENT)
    assert os.listdir(tmp_path) == []


def test_a_folder_that_is_a_file_is_a_write_error_with_enotdir(tmp_path):
    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputWriteError, match="folder is a file") as info:
        medfuse.save(_vol(), tmp_path / "notes" / "x.nii.gz")
    _is_write_error(info.value, errno.ENOTDIR)
    assert (tmp_path / "notes").read_text() == "x"


def test_a_name_too_long_is_a_write_error_with_enametoolong(tmp_path):
    with pytest.raises(OutputWriteError, match="too long") as info:
        medfuse.save(_vol(), tmp_path / ("x" * 300 + ".nii.gz"))
    _is_write_error(info.value, errno.ENAMETOOLONG)
    assert os.listdir(tmp_path) == []


def test_what_is_in_the_way_stays_an_output_exists_error(tmp_path):
    """The documented FileExistsError cases keep their type: another name may work there."""
    out = medfuse.save(_vol(), tmp_path / "a.nii.gz")
    with pytest.raises(OutputExistsError, match="the output exists") as info:
        medfuse.save(_vol(seed=1), out)
    assert isinstance(info.value, FileExistsError) and not isinstance(info.value, OutputWriteError)
    (tmp_path / "d.nii.gz").mkdir()
    with pytest.raises(OutputExistsError, match="folder is in the way"):
        medfuse.save(_vol(), tmp_path / "d.nii.gz", overwrite=True)
    if not os.path.exists(tmp_path / "A.NII.GZ"):  # a case-sensitive disk: the twin is refused too
        with pytest.raises(OutputExistsError, match="letter case"):
            medfuse.save(_vol(), tmp_path / "A.NII.GZ")


def test_a_caller_picking_another_name_on_file_exists_stops_on_a_full_disk(tmp_path, monkeypatch):
    """The documented use of a FileExistsError: try the next name. On a full disk it went on forever."""
    import nibabel as nib

    medfuse.save(_vol(), tmp_path / "out-0.nii.gz")

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(nib, "save", full)
    tries = 0
    with pytest.raises(OutputWriteError) as info:
        for i in range(50):
            tries += 1
            try:
                medfuse.save(_vol(), tmp_path / f"out-{i}.nii.gz")
                break
            except FileExistsError:
                continue
    assert tries == 2 and info.value.errno == errno.ENOSPC  # out-0 exists; out-1 meets the full disk


def test_the_write_error_keeps_errno_fix_and_path_through_pickle():
    """Batch workers send errors across processes: OSError pickles as type(*args), which lost them."""
    e = OutputWriteError("the disk is full", errno=errno.ENOSPC, fix="free some space", path="/x/out.nii.gz")
    back = pickle.loads(pickle.dumps(e))
    assert type(back) is OutputWriteError and back.errno == errno.ENOSPC
    assert (back.fix, back.path, str(back)) == (e.fix, e.path, str(e))
    assert "OutputWriteError" in medfuse.__all__ and medfuse.OutputWriteError is OutputWriteError
    # OSError-style logging ("{e.strerror}: {e.filename}") reads what the message says; str() stays medfuse's
    assert (e.strerror, e.filename) == (os.strerror(errno.ENOSPC), "/x/out.nii.gz")
    assert (back.strerror, back.filename) == (e.strerror, e.filename) and not str(e).startswith("[Errno")


# ----------------------------------------------------------------------------- where it surfaces
def test_the_cli_says_a_write_error_on_one_line_with_exit_2(tmp_path, capsys):
    from medfuse.cli import EXIT_USAGE, main

    a = medfuse.save(_vol(seed=1), tmp_path / "a.nii.gz")
    b = medfuse.save(_vol(seed=2), tmp_path / "b.nii.gz")
    out = tmp_path / "missing" / "f.nii.gz"
    assert main(["fuse", str(a), str(b), "-o", str(out), "--method", "max", "-q"]) == EXIT_USAGE
    err = capsys.readouterr().err.strip()
    assert err.startswith("medfuse fuse: error: ") and "\n" not in err and "Traceback" not in err
    assert "folder does not exist" in err and "Fix:" in err and not out.parent.exists()


def test_write_manifest_under_a_file_is_a_write_error(tmp_path):
    from medfuse.batch import write_manifest

    ds = tmp_path / "ds"
    (ds / "sub-01").mkdir(parents=True)
    medfuse.save(_vol(seed=1), ds / "sub-01" / "mr_t1.nii.gz")
    medfuse.save(_vol(seed=2), ds / "sub-01" / "pet.nii.gz")
    (tmp_path / "notes").write_text("x")
    with pytest.raises(OutputWriteError, match="cannot create the manifest's folder") as info:
        write_manifest(ds, tmp_path / "notes" / "sub" / "manifest.csv")
    _is_write_error(info.value, errno.ENOTDIR)
    assert (tmp_path / "notes").read_text() == "x"


def test_a_batch_report_on_a_full_disk_is_a_write_error(tmp_path, monkeypatch):
    from medfuse import batch
    from medfuse.batch import Subject, run_batch

    a = medfuse.save(_vol(seed=1), tmp_path / "a.nii.gz")
    b = medfuse.save(_vol(seed=2), tmp_path / "b.nii.gz")
    s = Subject(subject="s1", fixed=os.fspath(a), moving=[os.fspath(b)], output=os.fspath(tmp_path / "o.nii.gz"))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "_write_report", full)
    with pytest.raises(OutputWriteError, match=r"cannot write the batch report \(No space left on device\)") as info:
        run_batch([s], scheduler="synchronous", report=tmp_path / "r.csv")
    _is_write_error(info.value, errno.ENOSPC)
    assert not (tmp_path / "o.nii.gz").exists()


def test_a_subject_whose_output_folder_cannot_be_made_reports_it_in_its_row(tmp_path):
    from medfuse.batch import Subject, run_batch

    a = medfuse.save(_vol(seed=1), tmp_path / "a.nii.gz")
    b = medfuse.save(_vol(seed=2), tmp_path / "b.nii.gz")
    (tmp_path / "out").write_text("notes")
    s = Subject(subject="s1", fixed=os.fspath(a), moving=[os.fspath(b)],
                output=os.fspath(tmp_path / "out" / "s1.nii.gz"))
    (res,) = run_batch([s], scheduler="synchronous", report=tmp_path / "r.csv").results
    assert res.status == "failed" and "internal error" not in res.error
    assert "a file of that name is in the way" in res.error and "Fix:" in res.error


def test_the_output_folder_helper_gives_the_errno(tmp_path, monkeypatch):
    """batch's folder creation: a forbidden folder is EACCES, a file in the way ENOTDIR (was OutputExistsError)."""
    from pathlib import Path

    from medfuse.batch import _make_output_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputWriteError) as info:
        _make_output_folder(tmp_path / "f" / "sub" / "o.nii.gz")
    _is_write_error(info.value, errno.ENOTDIR)

    def denied(self, *a, **k):
        raise PermissionError(errno.EACCES, "Permission denied", os.fspath(self))

    monkeypatch.setattr(Path, "mkdir", denied)
    with pytest.raises(OutputWriteError, match="permission denied") as info:
        _make_output_folder(tmp_path / "locked" / "o.nii.gz")
    _is_write_error(info.value, errno.EACCES)


def test_evaluate_makes_its_folder_or_says_why(tmp_path):
    """Its output folder under a file was a bare NotADirectoryError (an internal error at the command line)."""
    from medfuse.evaluate import _make_folder

    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputWriteError, match="cannot create the output folder") as info:
        _make_folder(tmp_path / "f" / "eval")
    _is_write_error(info.value, errno.ENOTDIR)
