"""The command line's errors on bad paths: every command gives one line with the problem and a fix, exit 2, no
traceback, and refuses before any work. Tests run as root, which may read and write everything: permission
and read-only refusals are simulated where the system would give them."""

from __future__ import annotations

import errno
import importlib
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest

from medfuse.cli import EXIT_USAGE, main


def _pair(folder: Path):
    import nibabel as nib

    arr = np.random.default_rng(0).random((12, 12, 12)).astype(np.float32)
    paths = [folder / "a.nii.gz", folder / "b.nii.gz"]
    for p in paths:
        nib.save(nib.Nifti1Image(arr, np.eye(4)), str(p))
    return paths


def _no_work(monkeypatch):
    """Registration and the pipeline's loading must not start: the refusal comes first."""
    ran = []

    def work(*a, **k):
        ran.append(1)
        raise AssertionError("work started before the paths were checked")

    for name in ("medfuse.registration", "medfuse.registration.register"):
        monkeypatch.setattr(importlib.import_module(name), "register", work)
    monkeypatch.setattr(importlib.import_module("medfuse.io"), "load", work)
    return ran


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Fix:" in err, err
    return err


def _commands(a: Path, b: Path, out: Path):
    return {"info": ["info", str(b)],
            "register": ["register", str(a), str(b), "-o", str(out)],
            "fuse": ["fuse", str(a), str(b), "-o", str(out), "--method", "max"]}


@pytest.mark.parametrize("cmd", ["info", "register", "fuse"])
def test_an_input_this_user_may_not_read_is_named_as_such(tmp_path, monkeypatch, capsys, cmd):
    """Before: the readers said "not a valid NIfTI file (or truncated)", and advised re-exporting it."""
    a, b = _pair(tmp_path)
    real = os.access
    monkeypatch.setattr(os, "access", lambda p, mode, **k: Path(p) != b and real(p, mode, **k))
    ran = _no_work(monkeypatch)
    assert main(_commands(a, b, tmp_path / "o.nii.gz")[cmd]) == EXIT_USAGE
    err = _one_line(capsys)
    assert f"{b}: permission denied" in err and "chmod" in err and not ran


@pytest.mark.parametrize("cmd", ["register", "fuse"])
def test_an_output_folder_that_cannot_be_written_is_refused_before_any_work(tmp_path, monkeypatch, capsys, cmd):
    a, b = _pair(tmp_path)
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **k):
        if dir is not None and Path(dir) == ro:
            raise OSError(errno.EROFS, "Read-only file system")
        return real(*args, dir=dir, **k)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    ran = _no_work(monkeypatch)
    assert main(_commands(a, b, ro / "o.nii.gz")[cmd]) == EXIT_USAGE
    assert "read-only" in _one_line(capsys) and not ran and list(ro.iterdir()) == []


@pytest.mark.parametrize("cmd", ["register", "fuse"])
def test_an_output_under_a_file_says_so(tmp_path, capsys, cmd):
    a, b = _pair(tmp_path)
    assert main(_commands(a, b, a / "o.nii.gz")[cmd]) == EXIT_USAGE
    assert f"{a}: the output's folder is a file" in _one_line(capsys)


@pytest.mark.parametrize("cmd", ["info", "register", "fuse"])
def test_a_folder_without_images_and_a_missing_output_folder(tmp_path, capsys, cmd):
    a, b = _pair(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("no images here")
    assert main(_commands(a, empty, tmp_path / "o.nii.gz")[cmd]) == EXIT_USAGE
    assert str(empty) in _one_line(capsys)
    if cmd != "info":
        assert main(_commands(a, b, tmp_path / "missing" / "o.nii.gz")[cmd]) == EXIT_USAGE
        assert "folder does not exist" in _one_line(capsys) and not (tmp_path / "missing").exists()


def test_an_untyped_permission_error_is_a_usage_error_not_a_bug(monkeypatch, capsys):
    """e.g. ``medfuse evaluate`` on a folder with a locked sub-folder gave "internal error ... report it", exit 3."""
    import medfuse.cli as cli

    def locked(args):
        raise PermissionError(errno.EACCES, "Permission denied", "data/pair1/CT")

    monkeypatch.setattr(cli, "_cmd_info", locked)
    assert main(["info", "x"]) == EXIT_USAGE
    assert _one_line(capsys) == ("medfuse info: error: data/pair1/CT: permission denied. Fix: check the permissions "
                                 "(ls -l) or choose a path you may use.")


def test_demo_with_a_missing_samples_folder_says_it_is_missing(tmp_path, capsys):
    """Before: "the folder holds no sample volumes (ground_truth.json is missing)" for a folder that is not there."""
    assert main(["demo", "--samples", str(tmp_path / "nope"), "--out", str(tmp_path / "d"), "-q"]) == EXIT_USAGE
    assert f"{tmp_path / 'nope'}: no such folder" in _one_line(capsys) and not (tmp_path / "d").exists()


def test_info_on_a_missing_output_points_to_what_a_killed_overwrite_left(tmp_path, capsys):
    from medfuse.io._atomic import _aside_prefix

    target = tmp_path / "series"
    aside = tmp_path / f"{_aside_prefix(target)}abc"
    (aside / "series").mkdir(parents=True)
    assert main(["info", str(target)]) == EXIT_USAGE
    assert f"previous version in {aside.name}" in _one_line(capsys)


def test_a_required_package_missing_is_a_broken_install_not_an_internal_error(monkeypatch, capsys, samples_dir):
    """Installed with --no-deps, 'medfuse info x.nii.gz' said "internal error: ModuleNotFoundError ... report the
    traceback", pointing at a bug instead of the environment."""
    import builtins
    import sys

    real_import = builtins.__import__

    def no_nibabel(name, *args, **kwargs):
        if name == "nibabel" or name.startswith("nibabel."):
            raise ModuleNotFoundError("No module named 'nibabel'", name="nibabel")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_nibabel)
    for mod in [m for m in list(sys.modules) if m == "nibabel" or m.startswith("nibabel.")]:
        monkeypatch.delitem(sys.modules, mod)
    assert main(["info", str(samples_dir / "mr_t1.nii.gz")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the package 'nibabel' that medfuse needs is not installed" in err and "internal error" not in err


def test_python_m_medfuse_is_the_command():
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "medfuse", "--version"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.startswith("medfuse ")
