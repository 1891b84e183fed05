"""Command-line review: outputs a failed register leaves, values argparse echoed, info's raw warnings, evaluate's
silently ignored options and empty tables, unbounded thread counts. Tests run as root, which may write anywhere:
unwritable folders and failing writes are simulated."""

from __future__ import annotations

import csv
import errno
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from medfuse.cli import EXIT_FAILURES, EXIT_USAGE, main

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"
SECRET = "/data/DOE^JOHN/x"


def _pair(folder: Path):
    import nibabel as nib

    rng = np.random.default_rng(0)
    base = np.zeros((16, 16, 16), np.float32)
    base[4:12, 4:12, 4:12] = 1.0
    paths = [folder / "a.nii.gz", folder / "b.nii.gz"]
    for p, scale in zip(paths, (600.0, 80.0)):
        nib.save(nib.Nifti1Image(base * scale + rng.random(base.shape).astype(np.float32) * 20, np.eye(4)), str(p))
    return paths


def _one_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err and "Fix:" in err, err
    return err


# ----------------------------------------------------------------------------- 1: register's three outputs
def test_register_refuses_an_unwritable_transform_folder_before_writing_anything(tmp_path, monkeypatch, capsys):
    """Before: the image was written, then the transform failed with "nothing was written", and a re-run
    failed with "the output exists"."""
    a, b = _pair(tmp_path)
    (tmp_path / "o").mkdir()
    ro = tmp_path / "ro"
    ro.mkdir()
    real = tempfile.mkstemp

    def mkstemp(*args, dir=None, **kw):  # root writes anywhere: refuse the transform's folder as EACCES would
        if dir is not None and Path(dir).resolve() == ro.resolve():
            raise PermissionError(errno.EACCES, "Permission denied", os.fspath(dir))
        return real(*args, dir=dir, **kw)

    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    rc = main(["register", str(a), str(b), "-o", str(tmp_path / "o" / "r.nii.gz"), "--transform",
               str(ro / "x.tfm"), "-q"])
    assert rc == EXIT_USAGE
    assert "permission denied" in _one_line(capsys)
    assert sorted(os.listdir(tmp_path / "o")) == [] and sorted(os.listdir(ro)) == []


def test_register_takes_back_its_outputs_when_a_later_write_fails(tmp_path, monkeypatch, capsys):
    """The sidecar's write fails after the image and the transform are written: neither is left behind."""
    from medfuse import provenance
    import errno

    from medfuse.errors import OutputWriteError

    a, b = _pair(tmp_path)
    (tmp_path / "o").mkdir()

    def full_disk(output, *a, **k):
        raise OutputWriteError(errno=errno.ENOSPC, problem="the disk is full (or over quota, or the file too large); nothing was written",
                                fix="free some space, or choose another disk", path=provenance.sidecar_path(output))

    monkeypatch.setattr(provenance, "write_sidecar", full_disk)
    out = tmp_path / "o" / "r.nii.gz"
    assert main(["register", str(a), str(b), "-o", str(out), "--transform", str(tmp_path / "o" / "t.tfm"),
                 "-q"]) == EXIT_USAGE
    err = _one_line(capsys)
    assert "disk is full" in err and "removed" in err and "r.nii.gz" in err and "t.tfm" in err
    assert os.listdir(tmp_path / "o") == []
    monkeypatch.undo()
    # The message was true: the same command now runs (no "the output exists").
    assert main(["register", str(a), str(b), "-o", str(out), "--transform", str(tmp_path / "o" / "t.tfm"),
                 "-q"]) == 0
    assert sorted(os.listdir(tmp_path / "o")) == ["r.json", "r.nii.gz", "t.tfm"]


def test_register_refuses_a_transform_path_under_a_file_before_writing_anything(tmp_path, capsys):
    a, b = _pair(tmp_path)
    (tmp_path / "o").mkdir()
    (tmp_path / "afile").write_text("x")
    for tfm in (tmp_path / "afile" / "x.tfm", tmp_path / "afile" / "sub" / "x.tfm"):
        assert main(["register", str(a), str(b), "-o", str(tmp_path / "o" / "r.nii.gz"), "--transform",
                     str(tfm)]) == EXIT_USAGE
        _one_line(capsys)
        assert os.listdir(tmp_path / "o") == []


# ----------------------------------------------------------------------------- 2: no path-like value echoed
@pytest.mark.parametrize("argv", [
    ["fuse", "A", "B", "-o", "O", "--method", SECRET],
    ["fuse", "A", "B", "-o", "O", "--register", SECRET],
    ["fuse", "A", "B", "-o", "O", "--modalities", "MR", SECRET],
    ["fuse", "A", "B", "-o", "O", "--threads", SECRET],
    ["register", "A", "B", "-o", "O", "--initialise", SECRET],
    ["evaluate", "--pair", "A", "B", "--out", "O", "--mode", SECRET],
    ["evaluate", "--pair", "A", "B", "--out", "O", "--methods", "max", "--metrics", SECRET],
    ["demo", "--out", "O", "--method", SECRET],
    ["register", "A", "B", SECRET, "-o", "O"],  # info takes several paths: a third input is refused here
], ids=lambda a: "-".join(x for x in a if x.startswith("--") or x in ("fuse", "register", "evaluate", "demo", "info")))
def test_a_bad_value_that_looks_like_a_path_is_not_echoed(tmp_path, capsys, argv):
    a, b = _pair(tmp_path)
    argv = [str(a) if x == "A" else str(b) if x == "B" else str(tmp_path / "o") if x == "O" else x for x in argv]
    assert main(argv) == EXIT_USAGE
    err = _one_line(capsys)
    assert "DOE" not in err and "not shown" in err and "usage:" not in err
    assert not (tmp_path / "o").exists()


def test_a_typo_is_still_shown_with_a_suggestion_on_one_line(tmp_path, capsys):
    a, b = _pair(tmp_path)
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "f.nii.gz"), "--method", "lapalcian"]) == EXIT_USAGE
    err = _one_line(capsys)
    assert "'lapalcian'" in err and "did you mean 'laplacian'?" in err and "laplacian, wavelet" in err
    assert main(["fuse", str(a), str(b), "-o", str(tmp_path / "f.nii.gz"), "--modalities", "MR", "pett"]) == EXIT_USAGE
    assert "'pett'" in _one_line(capsys)


# ----------------------------------------------------------------------------- 3: info's warnings
def _cli(*argv, cwd):
    return subprocess.run([sys.executable, "-m", "medfuse.cli", *map(str, argv)], cwd=cwd, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})


def test_info_says_reader_warnings_as_medfuse_does_not_as_python_does(tmp_path):
    pet = tmp_path / "pet"
    shutil.copytree(SAMPLES / "pet", pet)
    files = sorted(pet.iterdir())
    files[len(files) // 2].unlink()  # a missing slice
    for target in (pet, sorted(pet.iterdir())[0]):  # the folder; one file of the series
        for quiet in ([], ["-q"]):
            r = _cli("info", target, *quiet, cwd=tmp_path)
            assert r.returncode == 0, r.stderr
            assert "MedfuseWarning" not in r.stderr and "return func" not in r.stderr and ".py:" not in r.stderr
            assert all(line.startswith("medfuse: warning: ") for line in r.stderr.splitlines()), r.stderr
            assert "  warning " in r.stdout  # said once, among what info shows


# ----------------------------------------------------------------------------- 4: batch --write-manifest
def test_write_manifest_onto_a_file_does_not_advise_overwrite_it_cannot_do(tmp_path, capsys):
    """medfuse.batch.write_manifest never replaces a file; its fix said "add --overwrite", which then failed too."""
    subject = tmp_path / "ds" / "s01"
    subject.mkdir(parents=True)
    a, b = _pair(subject)
    a.rename(subject / "mr.nii.gz")  # named as discovery finds them
    b.rename(subject / "pet.nii.gz")
    wm = tmp_path / "wm.csv"
    wm.write_text("mine\n")
    for extra in ([], ["--overwrite"]):
        assert main(["batch", str(tmp_path / "ds"), "--register", "none", "--write-manifest", str(wm), *extra]) == 2
        err = _one_line(capsys)
        assert "exists" in err and "overwrite" not in err.split("Fix:")[1]
        assert wm.read_text() == "mine\n"


# ----------------------------------------------------------------------------- 5-7: evaluate
@pytest.mark.parametrize("option", [["--limit", "-3"], ["--val-fraction", "0.3"], ["--split", "val"],
                                    ["--pair-types", "CT-MRI"]])
def test_evaluate_refuses_folder_only_options_with_pair(tmp_path, capsys, option):
    a, b = _pair(tmp_path)
    rc = main(["evaluate", "--pair", str(a), str(b), "--out", str(tmp_path / "e"), "--methods", "max", "--no-save",
               "--no-progress", *option])
    assert rc == EXIT_USAGE
    assert option[0] in _one_line(capsys)
    assert not (tmp_path / "e").exists()


def test_evaluate_scores_a_method_named_twice_once(tmp_path, capsys):
    a, b = _pair(tmp_path)
    assert main(["evaluate", "--pair", str(a), str(b), "--out", str(tmp_path / "e"), "--methods", "max,,MAX",
                 "--no-save", "--no-progress", "-q", "--metrics", "EN"]) == 0
    rows = [r for r in csv.DictReader((tmp_path / "e" / "metrics.csv").open()) if r["kind"] == "image"]
    assert [r["method"] for r in rows] == ["max"]


def test_evaluate_checks_the_device_before_writing(tmp_path, capsys):
    a, b = _pair(tmp_path)
    assert main(["evaluate", "--pair", str(a), str(b), "--out", str(tmp_path / "e"), "--methods", "max",
                 "--no-save", "--no-progress", "--device", "/data/DOE^JOHN"]) == EXIT_USAGE
    err = _one_line(capsys)
    assert "unknown device" in err and "DOE" not in err
    assert not (tmp_path / "e").exists()


def test_evaluate_writes_no_tables_when_nothing_was_scored(tmp_path, capsys):
    """Before: empty tables were written (exit 1), and they blocked the re-run ("the evaluation tables exist")."""
    a, b = _pair(tmp_path)
    out = tmp_path / "e"
    argv = ["evaluate", "--out", str(out), "--methods", "max", "--no-progress", "--metrics", "EN"]
    (tmp_path / "broken.nii.gz").write_bytes(b"not a nifti")  # damaged, not missing (that is refused up front)
    assert main(argv[:1] + ["--pair", str(a), str(tmp_path / "broken.nii.gz")] + argv[1:]) == EXIT_FAILURES
    err = capsys.readouterr().err
    assert "no image was scored" in err and "broken.nii.gz" in err
    assert not out.exists()
    assert main(argv[:1] + ["--pair", str(a), str(b)] + argv[1:]) == 0  # the re-run is not blocked
    assert (out / "metrics.csv").exists() and (out / "max" / "a_b.nii.gz").exists()


# ----------------------------------------------------------------------------- 8: thread counts
@pytest.mark.parametrize("argv", [
    ["fuse", "A", "B", "-o", "O", "--register", "rigid", "--method", "max", "--threads", "99999999999999999999"],
    ["fuse", "A", "B", "-o", "O", "--method", "max", "--threads", "0"],
    ["batch", "M", "--threads-per-worker", "99999999999999999999"],
    ["batch", "M", "--workers", "99999999999999999999"],
], ids=["threads", "threads0", "threads-per-worker", "workers"])
def test_thread_and_worker_counts_are_bounded_at_the_command_line(tmp_path, capsys, argv):
    a, b = _pair(tmp_path)
    (tmp_path / "m.csv").write_text(f"subject,fixed,moving,output\ns1,{a},{b},{tmp_path / 'o.nii.gz'}\n")
    subs = {"A": str(a), "B": str(b), "O": str(tmp_path / "f.nii.gz"), "M": str(tmp_path / "m.csv")}
    assert main([subs.get(x, x) for x in argv]) == EXIT_USAGE
    err = _one_line(capsys)
    # Refused by the parser (before: by the API after the inputs were read, or by ITK as an "internal error").
    assert err.split(": error: ")[1].startswith("argument --") and "from 1 to 1024" in err
    assert not (tmp_path / "f.nii.gz").exists() and not (tmp_path / "o.nii.gz").exists()


def test_an_error_about_a_dicom_folder_named_after_the_patient_does_not_show_the_name(tmp_path, capsys):
    """Batch reports and sidecars blanked such paths; the terminal quoted them (``pat/DOE^JOHN/pet: series 7``)."""
    import pydicom

    folder = tmp_path / "pat" / "DOE^JOHN" / "pet"
    folder.mkdir(parents=True)
    for f in sorted((SAMPLES / "pet").iterdir()):
        ds = pydicom.dcmread(f)
        ds.PatientName = "DOE^JOHN"
        ds.save_as(folder / f.name)
    rc = main(["fuse", str(SAMPLES / "mr_t1.nii.gz"), str(folder), "-o", str(tmp_path / "o.nii.gz"),
               "--method", "max", "--series", "-", "7"])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and "series 7" in err
    assert "DOE" not in err and "JOHN" not in err and "[removed]" in err


@pytest.mark.parametrize("argv, says", [
    (["batch", "{a}", "--scheduler", "synchronous"], "this is an image file, not a manifest"),
    (["demo", "--samples", "{a}", "--out", "{tmp}/d"], "--samples takes a folder, and this is a file"),
    (["register", "{a}", "{a}", "-o", "{tmp}/r.nii.gz", "--initial-transform", "{tmp}/empty"],
     "this is a folder, not a transform file"),
    (["evaluate", "--out", "{tmp}/e"], "nothing to evaluate"),
])
def test_a_path_of_the_wrong_kind_is_named_as_such(tmp_path, capsys, argv, says):
    """These said "UnicodeDecodeError: save it as UTF-8 text", "no such folder/transform file" of a path that exists,
    and "(not both)" when neither was given."""
    a = SAMPLES / "mr_t1.nii.gz"
    (tmp_path / "empty").mkdir()
    rc = main([x.format(a=a, tmp=tmp_path) for x in argv])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and says in err, err
    assert not (tmp_path / "d").exists() and not (tmp_path / "r.nii.gz").exists() and not (tmp_path / "e").exists()


@pytest.mark.parametrize("n", [1, 4])
def test_evaluate_pair_of_the_wrong_size_is_said_in_command_line_words(tmp_path, capsys, n):
    rc = main(["evaluate", "--pair", *[str(SAMPLES / "mr_t1.nii.gz")] * n, "--out", str(tmp_path / "e")])
    err = capsys.readouterr().err
    assert rc == EXIT_USAGE and f"--pair 1 names {n} image(s)" in err and "source=" not in err
    assert not (tmp_path / "e").exists()


# ----------------------------------------------------------------------------- closed and full standard streams
def test_closed_or_full_standard_streams_are_no_internal_error(tmp_path):
    """``>&-`` made sys.stdout None: a traceback after the outputs were written (exit 1), or an internal error
    before any work when stderr was closed (the progress bar); ``> /dev/full`` was reported as a full disk."""
    a, b = _pair(tmp_path)
    cmd = [sys.executable, "-m", "medfuse.cli"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for n, close in enumerate(("1", "2")):
        out = tmp_path / f"closed{close}.nii.gz"
        # The shell closes the stream, as a user's `>&-` does.
        line = " ".join([*map(shlex.quote, cmd), "fuse", shlex.quote(str(a)), shlex.quote(str(b)), "-o",
                         shlex.quote(str(out)), "--method", "mean", f"{close}>&-"])
        r = subprocess.run(["bash", "-c", line], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
        assert r.returncode == 0, (close, r.stdout, r.stderr)
        assert out.is_file() and out.with_name(out.name.replace(".nii.gz", ".json")).is_file()
        assert "Traceback" not in r.stderr + r.stdout and "internal error" not in r.stderr + r.stdout
    if not os.path.exists("/dev/full"):
        return
    with open("/dev/full", "w") as full:
        r = subprocess.run([*cmd, "info", str(a)], cwd=tmp_path, stdout=full, stderr=subprocess.PIPE, text=True,
                           timeout=300, env=env)
    assert r.returncode == 2 and "standard output could not be written" in r.stderr, r.stderr
    assert "disk is full" not in r.stderr and "Traceback" not in r.stderr


def test_a_deleted_current_folder_is_named_as_the_cause(tmp_path):
    """A relative output from a folder deleted under the shell said "no such file or folder. Fix: check the path",
    naming no path."""
    a, b = _pair(tmp_path)
    py = " ".join(map(shlex.quote, [sys.executable, "-m", "medfuse.cli", "fuse", str(a), str(b), "-o", "rel.nii.gz",
                                    "--method", "mean"]))
    r = subprocess.run(["bash", "-c", f"mkdir gone && cd gone && rmdir ../gone && {py}"], cwd=tmp_path,
                       capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 2 and "the current folder no longer exists" in r.stderr, r.stderr
