"""Paths on the command line that named another file than meant: an NFC name for an NFD input, Windows-style paths,
a ``~`` the shell left (quoted, or after ``=``), file names that start with ``-``, links that loop or point nowhere,
and names that are not UTF-8 in messages."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import unicodedata
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medfuse.cli import EXIT_OK, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"
posix_only = pytest.mark.skipif(os.name == "nt", reason="POSIX file names and links")


def _image(path: Path, seed: int = 0) -> Path:
    data = np.random.default_rng(seed).random((6, 6, 4)).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), os.fspath(path))
    return path


@pytest.fixture
def work(tmp_path, monkeypatch):
    """A working folder holding two inputs, a.nii.gz and b.nii.gz, as the current folder."""
    folder = tmp_path / "work"
    folder.mkdir()
    _image(folder / "a.nii.gz", 0)
    _image(folder / "b.nii.gz", 1)
    monkeypatch.chdir(folder)
    return folder


def _fuse(*args: str) -> int:
    return main(["fuse", "a.nii.gz", "b.nii.gz", "--method", "max", "-q", *args])


def test_an_output_that_looks_like_an_nfd_input_is_refused(work, capsys):
    nfd = unicodedata.normalize("NFD", "Donn\u00e9es.nii.gz")
    shutil.copy(work / "a.nii.gz", work / nfd)
    if (work / unicodedata.normalize("NFC", nfd)).exists():
        pytest.skip("this file system treats NFC and NFD names as one")
    before = sorted(os.listdir(work))
    assert main(["fuse", nfd, "b.nii.gz", "--method", "max", "-q", "-o",
                 unicodedata.normalize("NFC", nfd), "--overwrite"]) == EXIT_USAGE
    assert "own source" in capsys.readouterr().err
    assert sorted(os.listdir(work)) == before
    assert main(["info", unicodedata.normalize("NFC", nfd)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "accents stored differently" in err and nfd in err


@posix_only
@pytest.mark.parametrize("out", ["C:\\out\\f.nii.gz", "sub\\f.nii.gz"])
def test_a_windows_style_output_is_refused(work, capsys, out):
    (work / "sub").mkdir()
    before = sorted(os.listdir(work))
    assert _fuse("-o", out) == EXIT_USAGE
    assert "looks like a Windows path" in capsys.readouterr().err
    assert sorted(os.listdir(work)) == before and not os.listdir(work / "sub")


@posix_only
def test_a_quoted_home_folder_is_expanded(work, tmp_path, monkeypatch):
    home = tmp_path / "home"
    (home / "x").mkdir(parents=True)
    shutil.copy(work / "a.nii.gz", home / "t1.nii.gz")
    monkeypatch.setenv("HOME", os.fspath(home))
    assert main(["fuse", "~/t1.nii.gz", "b.nii.gz", "--method", "max", "-q", "--output=~/x/f.nii.gz"]) == EXIT_OK
    assert (home / "x" / "f.nii.gz").is_file() and not (work / "~").exists()
    fused = nib.load(os.fspath(home / "x" / "f.nii.gz"))  # the fusion of the file ~/t1.nii.gz names
    assert fused.shape == (6, 6, 4) and np.allclose(fused.affine, np.diag([2.0, 2.0, 3.0, 1.0]))


def test_a_file_name_starting_with_a_dash_gets_a_hint(work, capsys):
    shutil.copy(work / "a.nii.gz", work / "-t1.nii.gz")
    assert main(["info", "-t1.nii.gz"]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert "the following arguments are required" in err and "./-NAME" in err
    assert _fuse("-o", "-dash.nii.gz") == EXIT_USAGE
    assert "./-NAME" in capsys.readouterr().err
    assert main(["info", "--", "-t1.nii.gz"]) == EXIT_OK  # what the hint says works
    assert main(["info", "--method", "max", "a.nii.gz"]) == EXIT_USAGE  # no file named -…: no hint
    assert "./-NAME" not in capsys.readouterr().err


def test_the_info_suggestion_for_a_folder_named_with_a_dash_runs(work, capsys):
    folder = work / "-export"
    folder.mkdir()
    for f in sorted((SAMPLES / "ct").glob("*.dcm"))[:3]:
        shutil.copy(f, folder / f.name)
    _image(folder / "extra.nii.gz")
    assert main(["info", "./-export"]) == EXIT_OK
    out = capsys.readouterr().out
    assert "medfuse info ./-export --series N" in out, out
    assert main(["info", "./-export", "--series", "1"]) == EXIT_OK  # the suggestion, as printed, runs


@posix_only
def test_links_at_the_output_are_described(work, capsys):
    os.symlink("loopB", "loopA")
    os.symlink("loopA", "loopB")
    os.symlink("missing_target.nii.gz", "dangling.nii.gz")
    assert _fuse("-o", "loopA") == EXIT_USAGE
    assert "symbolic link that loops" in capsys.readouterr().err
    assert _fuse("-o", "loopA/x.nii.gz") == EXIT_USAGE
    assert "output's folder is a symbolic link that loops" in capsys.readouterr().err
    assert _fuse("-o", "dangling.nii.gz") == EXIT_USAGE
    err = capsys.readouterr().err
    assert "symbolic link to 'missing_target.nii.gz', which does not exist" in err and "--overwrite" in err
    assert _fuse("-o", "dangling.nii.gz", "--overwrite") == EXIT_OK
    assert not (work / "dangling.nii.gz").is_symlink() and not (work / "missing_target.nii.gz").exists()


@posix_only
def test_a_name_that_is_not_utf8_is_shown_as_its_byte_in_errors(tmp_path):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "PYTHONUTF8"))}
    env["PYTHONPATH"] = os.pathsep.join([os.fspath(ROOT), env.get("PYTHONPATH", "")])
    got = subprocess.run([sys.executable, "-m", "medfuse", "info", b"missing_\xe9.nii.gz"], capture_output=True,
                         env=env, cwd=tmp_path, timeout=120)
    assert got.returncode == EXIT_USAGE
    assert b"missing_\\xe9.nii.gz: no such file or folder" in got.stderr, got.stderr
