"""Output and input paths spelled in ways that name another file than meant: the same name with its accents stored
in another Unicode form (NFC/NFD), a Windows-style path on Linux or macOS, an unexpanded ``~``, symbolic links that
loop or point nowhere, and a folder so deep that the temporary file beside the output did not fit."""

from __future__ import annotations

import errno
import json
import os
import time
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, OutputExistsError, OutputWriteError, UnreadableFileError
from medfuse.io import _atomic as atomic
from medfuse.io._atomic import atomic_write_bytes, check_output, missing_hint

posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file names and links")

NFC = unicodedata.normalize("NFC", "Donn\u00e9es.nii.gz")
NFD = unicodedata.normalize("NFD", NFC)


def _image(path: Path) -> Path:
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.float32).reshape(4, 4, 4), np.eye(4)), os.fspath(path))
    return path


def _keeps_forms_apart(folder: Path) -> None:
    """Skip where the file system makes the two forms one name (macOS, some shares): nothing to tell apart."""
    (folder / NFD).write_bytes(b"")
    together = (folder / NFC).exists()
    (folder / NFD).unlink()
    if together:
        pytest.skip("this file system treats NFC and NFD names as one")


def test_an_output_named_as_an_existing_file_in_another_unicode_form_is_refused(tmp_path):
    _keeps_forms_apart(tmp_path)
    (tmp_path / NFD).write_bytes(b"earlier")
    for overwrite in (False, True):  # a look-alike twin would be written even with overwrite
        with pytest.raises(OutputExistsError, match="how accents are stored") as ei:
            check_output(tmp_path / NFC, overwrite=overwrite, kind="file")
        assert ei.value.path == os.fspath(tmp_path / NFC)
    assert sorted(os.listdir(tmp_path)) == [NFD]


def test_an_output_named_as_an_input_in_another_unicode_form_is_refused_as_the_input(tmp_path):
    _keeps_forms_apart(tmp_path)
    src = _image(tmp_path / NFD)
    with pytest.raises(OutputExistsError, match="own source.*how accents are stored"):
        check_output(tmp_path / NFC, inputs=[src], overwrite=True, kind="file")


def test_the_letter_case_message_is_unchanged(tmp_path):
    (tmp_path / "mr.nii.gz").write_bytes(b"")
    with pytest.raises(OutputExistsError, match=r"exists as mr\.nii\.gz \(names that differ only in letter case"):
        check_output(tmp_path / "MR.NII.GZ", kind="file")


def test_load_names_the_file_whose_accents_are_stored_differently(tmp_path):
    _keeps_forms_apart(tmp_path)
    folder = tmp_path / unicodedata.normalize("NFD", "Pati\u00ebnt")
    folder.mkdir()
    _image(folder / "t1.nii.gz")
    given = tmp_path / unicodedata.normalize("NFC", "Pati\u00ebnt") / "t1.nii.gz"
    with pytest.raises(UnreadableFileError, match="no such file or folder; .*accents stored differently") as ei:
        medfuse.load(given)
    assert os.fspath(folder / "t1.nii.gz") in str(ei.value)  # the name to use, as it is on the disk
    assert medfuse.load(folder / "t1.nii.gz").shape == (4, 4, 4)


def test_an_output_folder_in_another_unicode_form_is_named(tmp_path):
    _keeps_forms_apart(tmp_path)
    (tmp_path / unicodedata.normalize("NFD", "Pati\u00ebnt")).mkdir()
    with pytest.raises(OutputWriteError, match="folder does not exist; .*accents stored differently") as ei:
        check_output(tmp_path / unicodedata.normalize("NFC", "Pati\u00ebnt") / "o.nii.gz", kind="file")
    assert ei.value.errno == errno.ENOENT


@posix_only
@pytest.mark.parametrize("name", ["C:\\out\\f.nii.gz", "sub\\f.nii.gz", "c:f.nii.gz", "C:/out/f.nii.gz"])
def test_a_windows_style_output_path_is_refused(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    with pytest.raises(InvalidInputError, match="looks like a Windows path.*separated by /"):
        atomic_write_bytes(name, b"x")
    assert sorted(os.listdir(tmp_path)) == ["sub"] and not os.listdir(tmp_path / "sub")


@posix_only
def test_a_missing_windows_style_or_home_path_says_why(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert "Windows path" in missing_hint("sub\\t1.nii.gz") and "Windows path" in missing_hint("\\\\server\\x")
    assert "'~'" in missing_hint("~/t1.nii.gz")
    assert missing_hint("plain.nii.gz") == ""
    with pytest.raises(UnreadableFileError, match="Windows path"):
        medfuse.load("D:\\scans\\t1.nii.gz")
    # medfuse.load expands "~" itself, as nibabel.load does (the hint is for what does not: save's outputs)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    (tmp_path / "home").mkdir()
    medfuse.save(medfuse.Volume(np.zeros((4, 4, 4), np.float32), np.eye(4)), tmp_path / "home" / "t1.nii.gz")
    assert medfuse.load("~/t1.nii.gz").shape == (4, 4, 4)
    with pytest.raises(UnreadableFileError, match="no such file"):
        medfuse.load("~/no-such-medfuse-file.nii.gz")


@posix_only
def test_links_at_the_output_path_are_described_and_never_written_through(tmp_path):
    (tmp_path / "loopA").symlink_to("loopB")
    (tmp_path / "loopB").symlink_to("loopA")
    dangling = tmp_path / "dangling.nii.gz"
    dangling.symlink_to("missing_target.nii.gz")
    with pytest.raises(OutputExistsError, match="symbolic link that loops"):
        check_output(tmp_path / "loopA", overwrite=True, kind="folder")
    with pytest.raises(OutputWriteError, match="output's folder is a symbolic link that loops") as ei:
        check_output(tmp_path / "loopA" / "x.nii.gz", kind="file")
    assert ei.value.errno == errno.ELOOP
    (tmp_path / "nowhere").symlink_to("missing_folder")
    with pytest.raises(OutputWriteError, match="folder is a symbolic link to 'missing_folder', which does not exist"):
        check_output(tmp_path / "nowhere" / "x.nii.gz", kind="file")
    with pytest.raises(OutputExistsError, match="symbolic link to 'missing_target.nii.gz'.*replaces the link itself"):
        check_output(dangling, kind="file")
    atomic_write_bytes(dangling, b"new", overwrite=True)
    assert not dangling.is_symlink() and dangling.read_bytes() == b"new"
    assert not (tmp_path / "missing_target.nii.gz").exists()  # the link's target was not created


def _folder_of_length(root: Path, length: int) -> Path:
    """A folder under ``root`` whose absolute path is ``length`` bytes long."""
    here = os.path.abspath(root)
    while len(here) < length:
        here = os.path.join(here, "d" * min(200, length - len(here) - 1))
    os.makedirs(here)
    assert len(here) == length
    return Path(here)


def _path_max(folder: Path) -> int:
    try:
        return os.pathconf(folder, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):
        pytest.skip("the system does not say its longest path")


@posix_only
def test_a_deep_folder_takes_the_output_with_a_shorter_temporary_name(tmp_path):
    limit = _path_max(tmp_path)
    long_name = len(atomic._temp_prefix(tmp_path / "out.nii.gz")) + 8 + len(".nii.gz")
    short_name = len(atomic._TMP_PREFIX) + 12 + 1 + 8 + len(".nii.gz")
    # The usual temporary's path is over the limit, the shorter one's (and the output's) within it.
    folder = _folder_of_length(tmp_path, limit - 1 - long_name + 5)
    assert len(os.fspath(folder)) + 1 + short_name < limit - 1
    out = atomic_write_bytes(folder / "out.nii.gz", b"fused", overwrite=False)
    assert out.read_bytes() == b"fused" and os.listdir(folder) == ["out.nii.gz"]


@posix_only
def test_a_folder_too_deep_for_any_temporary_says_that_the_temporary_did_not_fit(tmp_path):
    limit = _path_max(tmp_path)
    folder = _folder_of_length(tmp_path, limit - 1 - 25)  # "o.nii.gz" fits, no temporary name does
    with pytest.raises(OutputWriteError, match="too long for the temporary file.*output's own path would fit") as ei:
        atomic_write_bytes(folder / "o.nii.gz", b"x")
    assert ei.value.errno == errno.ENAMETOOLONG and os.listdir(folder) == []


def test_a_shorter_temporary_left_by_a_killed_write_is_removed_after_a_day_only(tmp_path):
    target = tmp_path / "out.nii.gz"
    key = atomic._target_key(target)
    old, new = (tmp_path / f".medfuse-tmp-{key}-abcd1234.nii.gz", tmp_path / f".medfuse-tmp-{key}-wxyz5678.nii.gz")
    for p in (old, new):
        p.write_bytes(b"partial")
    day_ago = time.time() - atomic._FOREIGN_STALE_S - 60
    os.utime(old, (day_ago, day_ago))
    atomic_write_bytes(target, b"fused")
    assert not old.exists() and new.exists()  # a writer of the fresh one may still be at work


def test_fuse_files_takes_home_relative_inputs_as_load_does(tmp_path, monkeypatch):
    """``fuse_files("~/d/mr.nii.gz", ...)`` loaded the image (load expands ``~``), then hashing it for the sidecar
    failed with "no such file": the path is expanded once, where the pipeline takes its inputs."""
    monkeypatch.setenv("HOME", str(tmp_path))
    a = np.zeros((8, 8, 8), np.float32)
    a[2:6, 2:6, 2:6] = 1
    medfuse.save(medfuse.Volume(a, np.eye(4)), tmp_path / "mr.nii.gz")
    medfuse.save(medfuse.Volume(a[::-1].copy(), np.eye(4)), tmp_path / "pet.nii.gz")
    res = medfuse.fuse_files("~/mr.nii.gz", "~/pet.nii.gz", tmp_path / "f.nii.gz", method="mean")
    record = json.loads((tmp_path / "f.json").read_text())
    assert [Path(i["path"]) for i in record["inputs"]] == [tmp_path / "mr.nii.gz", tmp_path / "pet.nii.gz"]
    assert res.fused.shape == (8, 8, 8)
