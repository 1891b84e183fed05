"""Outputs are no more readable than their inputs (patient data made private stays private when derived)."""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import numpy as np
import pytest

import medfuse
from medfuse.cli import main

SAMPLES = Path(__file__).resolve().parents[2] / "sample_volumes"

pytestmark = pytest.mark.skipif(os.name == "nt", reason="POSIX permissions")


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def _mode(p: Path) -> int:
    return stat.S_IMODE(p.stat().st_mode)


def _inputs(tmp_path: Path, mode: int):
    mr, spect = tmp_path / "mr.nii.gz", tmp_path / "spect.nii.gz"
    shutil.copy(SAMPLES / "mr_t1.nii.gz", mr)
    shutil.copy(SAMPLES / "spect.nii.gz", spect)
    spect.chmod(mode)
    return mr, spect


@pytest.mark.parametrize("mode,expect", [(0o600, 0o600), (0o640, 0o640), (0o644, 0o644)])
def test_a_fused_file_is_no_wider_than_its_most_private_input(tmp_path, umask_022, mode, expect):
    mr, spect = _inputs(tmp_path, mode)
    out = tmp_path / "out" / "fused.nii.gz"
    out.parent.mkdir()
    assert main(["fuse", str(mr), str(spect), "-o", str(out), "--method", "mean", "-q"]) == 0
    assert _mode(out) == expect
    assert _mode(spect) == mode  # the input is untouched


def test_under_umask_000_outputs_get_no_write_access_their_inputs_lack(tmp_path):
    """Only read access was narrowed: a fused image of 0644 inputs was 0666 and a DICOM output folder 0777."""
    old = os.umask(0)
    try:
        mr, spect = _inputs(tmp_path, 0o644)
        mr.chmod(0o644)
        out = tmp_path / "fused.nii.gz"
        assert main(["fuse", str(mr), str(spect), "-o", str(out), "--method", "mean", "-q"]) == 0
        assert _mode(out) == 0o644 and _mode(out.with_name("fused.json")) == 0o644
        dcm = tmp_path / "fused_dicom"
        assert main(["fuse", str(mr), str(spect), "-o", str(dcm), "--method", "mean", "-q"]) == 0
        assert _mode(dcm) == 0o755
        spect.chmod(0o664)  # the group may write one input, not the other: not the output either
        out2 = tmp_path / "fused2.nii.gz"
        assert main(["fuse", str(mr), str(spect), "-o", str(out2), "--method", "mean", "-q"]) == 0
        assert _mode(out2) == 0o644
        mr.chmod(0o666)
        spect.chmod(0o666)  # inputs anyone may write: the umask's own 0666
        out3 = tmp_path / "fused3.nii.gz"
        assert main(["fuse", str(mr), str(spect), "-o", str(out3), "--method", "mean", "-q"]) == 0
        assert _mode(out3) == 0o666
    finally:
        os.umask(old)


def test_dicom_and_header_data_outputs_and_api_saves_follow_the_inputs(tmp_path, umask_022):
    mr, spect = _inputs(tmp_path, 0o600)
    dcm = tmp_path / "fused_dicom"
    assert main(["fuse", str(mr), str(spect), "-o", str(dcm), "--method", "mean", "-q"]) == 0
    assert _mode(dcm) == 0o700  # others cannot enter the series folder
    # ... nor read its slices once they are copied out of it (cp -a, rsync, tar kept 0644)
    assert {_mode(f) for f in dcm.iterdir()} == {0o600}
    vol = medfuse.load(spect)
    for name in ("copy.mhd", "copy.nrrd", "copy.nii"):
        medfuse.save(vol, tmp_path / name)
        assert _mode(tmp_path / name) == 0o600, name
    assert _mode(tmp_path / "copy.raw") == 0o600  # the .mhd's data file too
    # A DICOM series folder input whose files are private (the folder itself open): still private.
    series = tmp_path / "pet"
    shutil.copytree(SAMPLES / "pet", series)
    for f in series.iterdir():
        f.chmod(0o600)
    medfuse.save(medfuse.load(series), tmp_path / "pet.nii.gz")
    assert _mode(tmp_path / "pet.nii.gz") == 0o600
    medfuse.save(medfuse.load(SAMPLES / "mr_t1.nii.gz"), tmp_path / "open.nii.gz")
    assert _mode(tmp_path / "open.nii.gz") == 0o644


def test_the_demo_picture_and_evaluated_pngs_follow_private_inputs(tmp_path, umask_022):
    samples = tmp_path / "s600"
    shutil.copytree(SAMPLES, samples)
    for f in samples.rglob("*"):
        if f.is_file():
            f.chmod(0o600)
    assert main(["demo", "--samples", str(samples), "--out", str(tmp_path / "d"), "--method", "max", "-q",
                 "--no-progress"]) == 0
    assert _mode(tmp_path / "d" / "fused.png") == 0o600 and _mode(tmp_path / "d" / "fused.nii.gz") == 0o600
    from PIL import Image

    rng = np.random.default_rng(0)
    pngs = []
    for name in ("a.png", "b.png"):
        Image.fromarray((rng.random((48, 48)) * 255).astype(np.uint8)).save(tmp_path / name)
        (tmp_path / name).chmod(0o600)
        pngs.append(str(tmp_path / name))
    from medfuse.evaluate import evaluate

    res = evaluate([tuple(pngs)], methods=["mean"], out_dir=tmp_path / "ev", metrics=["EN"])
    assert res.ok
    assert [_mode(p) for p in (tmp_path / "ev").rglob("*.png")] == [0o600]


@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="reads the umask from /proc (Linux)")
def test_the_umask_is_read_without_being_changed(tmp_path, monkeypatch):
    """os.umask(0) then back left the process's umask at 0 for a moment: another thread's new file then was
    world-readable. Where the system says it, it is read, not set."""
    old = os.umask(0o027)
    try:
        def no(*_):
            raise AssertionError("os.umask was called")

        monkeypatch.setattr(os, "umask", no)
        medfuse.save(medfuse.load(SAMPLES / "mr_t1.nii.gz"), tmp_path / "o.nii.gz")
        monkeypatch.undo()
        assert _mode(tmp_path / "o.nii.gz") == 0o640
    finally:
        os.umask(old)


def test_a_dicom_output_folder_keeps_a_group_folders_set_group_id_bit(tmp_path, umask_022):
    """A group project folder (chmod g+s): the series folder lost the bit, so files added to it later took their
    writer's own group."""
    project = tmp_path / "project"
    project.mkdir()
    project.chmod(0o2775)
    out = medfuse.save(medfuse.load(SAMPLES / "spect.nii.gz"), project / "spect_dicom")
    assert os.stat(out).st_mode & stat.S_ISGID and _mode(out) & 0o777 == 0o755


def test_another_users_output_in_a_sticky_folder_is_refused_before_any_work(tmp_path, monkeypatch):
    """--overwrite onto a colleague's output in a shared 1777 folder failed after the registration and fusion, with
    "permission denied ... choose a folder you can write to" (the folder was writable; the file is theirs)."""
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    theirs = shared / "a.nii.gz"
    shutil.copy(SAMPLES / "spect.nii.gz", theirs)
    uid = os.stat(theirs).st_uid
    monkeypatch.setattr(os, "geteuid", lambda: uid + 4242)  # this process as another user than the owner
    with pytest.raises(medfuse.OutputWriteError, match="belongs to another user.*sticky"):
        medfuse.save(medfuse.load(SAMPLES / "spect.nii.gz"), theirs, overwrite=True)
    assert main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(SAMPLES / "spect.nii.gz"), "-o", str(theirs),
                 "--overwrite", "--method", "mean", "-q"]) == 2
