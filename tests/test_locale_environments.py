"""Locales and file names that are not plain UTF-8: a C/POSIX locale without UTF-8 mode, a latin-1 locale, file
names holding bytes that are not UTF-8, and a report saved again by Excel in Windows-1252.

Each case was an internal error (exit 3) or a wrong refusal, found by running the command line under that locale.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest

from medfuse.batch import _on_disk, _read_report
from medfuse.io._atomic import atomic_write_text, case_key

ROOT = Path(__file__).resolve().parents[1]
SAMPLES = ROOT / "sample_volumes"
# Python's own switches for this locale: no coercion to C.UTF-8 and no UTF-8 mode (both are on by default).
C_LOCALE = {"LC_ALL": "C", "LANG": "C", "PYTHONUTF8": "0", "PYTHONCOERCECLOCALE": "0"}


def _medfuse(args, *, env_extra, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHONIOENCODING", "PYTHONUTF8", "LC_", "LANG"))}
    env.update(env_extra)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-m", "medfuse", *args], capture_output=True, env=env, cwd=cwd,
                          timeout=300)


def _nifti(path: Path, seed: int) -> Path:
    rng = np.random.default_rng(seed)
    data = (rng.random((12, 12, 8)) * 100).astype(np.float32)
    nib.save(nib.Nifti1Image(data, np.diag([2.0, 2.0, 3.0, 1.0])), os.fspath(path))
    return path


def test_text_written_to_a_name_that_is_not_utf8_keeps_its_bytes(tmp_path):
    name = os.fsdecode(b"report_\xff.csv")  # Python holds the byte as a surrogate
    target = Path(os.fsdecode(os.fsencode(tmp_path))) / name
    atomic_write_text(target, f"subject,output\ns1,{name}\n")
    assert (os.fsencode(tmp_path) + b"/report_\xff.csv") in [os.path.join(os.fsencode(tmp_path), n)
                                                            for n in os.listdir(os.fsencode(tmp_path))]
    assert target.read_bytes() == b"subject,output\ns1,report_\xff.csv\n"


def test_a_manifest_path_names_the_files_utf8_spelt_in_any_locale():
    assert _on_disk("Sujet_\u00e9/mr.nii.gz") == os.fsdecode("Sujet_\u00e9/mr.nii.gz".encode("utf-8"))
    assert _on_disk("plain/mr.nii.gz") == "plain/mr.nii.gz"


def test_names_that_differ_by_a_sharp_s_are_two_files_and_by_letter_case_one():
    assert case_key("Stra\u00dfe.nii.gz") != case_key("Strasse.nii.gz")  # NTFS and APFS keep them apart
    assert case_key("Scan.NII.gz") == case_key("scan.nii.gz")
    assert case_key("\u0130stanbul") != case_key("istanbul")  # no letter becomes two ("İ".lower() is two)


def test_a_report_saved_again_by_excel_in_windows_1252_is_read(tmp_path):
    report = tmp_path / "m-report.csv"
    report.write_bytes("subject;status;seconds\r\nSujet_\u00e9;done;1.5\r\n".encode("cp1252"))
    rows = _read_report(report)
    assert [r["subject"] for r in rows] == ["Sujet_\u00e9"] and rows[0]["status"] == "done"


def test_info_lists_the_size_of_a_file_whose_name_is_not_utf8(tmp_path):
    folder = os.fsencode(tmp_path)
    shutil.copy(SAMPLES / "spect.nii.gz", os.fsdecode(folder + b"/spect_\xff.nii.gz"))
    shutil.copy(SAMPLES / "spect.nii.gz", tmp_path / "SPECT.NII.GZ")
    got = _medfuse(["info", "."], env_extra={"LC_ALL": "C.UTF-8"}, cwd=tmp_path)
    assert got.returncode == 0 and got.stdout.count(b"44x52x44") == 2, got.stdout + got.stderr
    assert b"spect_\xff.nii.gz" in got.stdout  # the name as ls shows it: its own bytes


@pytest.mark.skipif(sys.platform == "win32", reason="POSIX locales")
def test_the_command_line_runs_under_a_c_locale_without_utf8_mode(tmp_path):
    """LC_ALL=C with PYTHONUTF8=0: standard output is ASCII (errors 'surrogateescape'), and file names reach
    Python as surrogates. A non-ASCII series description in `info`, and a UTF-8 manifest naming 'Sujet_é',
    were internal errors (exit 3)."""
    pet = tmp_path / "pet"
    pet.mkdir()
    for f in sorted((SAMPLES / "pet").glob("*.dcm"))[28:36]:
        ds = pydicom.dcmread(f)
        ds.SpecificCharacterSet = "ISO_IR 192"
        ds.SeriesDescription = "PET \u5168\u8eab"  # "whole body"
        ds.save_as(pet / f.name)
    got = _medfuse(["info", "pet"], env_extra=C_LOCALE, cwd=tmp_path)
    assert got.returncode == 0, got.stderr.decode(errors="replace")
    assert b"series       PET \\u5168\\u8eab" in got.stdout
    subject = tmp_path / "Sujet_\u00e9"
    subject.mkdir()
    _nifti(subject / "mr.nii.gz", 0)
    _nifti(subject / "pet.nii.gz", 1)
    manifest = tmp_path / "m.csv"
    manifest.write_text("subject,fixed,moving,output\nSujet_\u00e9,Sujet_\u00e9/mr.nii.gz,Sujet_\u00e9/pet.nii.gz,"
                        "out/Sujet_\u00e9_fused.nii.gz\n", encoding="utf-8")
    got = _medfuse(["batch", "m.csv", "--method", "max", "--scheduler", "synchronous", "--no-progress"],
                   env_extra=C_LOCALE, cwd=tmp_path)
    assert got.returncode == 0, got.stdout.decode(errors="replace") + got.stderr.decode(errors="replace")
    assert (tmp_path / "out" / "Sujet_\u00e9_fused.nii.gz").is_file()
    assert b"1 subjects: 1 done" in got.stdout
    record = json.loads((tmp_path / "out" / "Sujet_\u00e9_fused.json").read_text(encoding="utf-8"))
    assert record["method_used"] == "max"


def test_a_dataset_with_a_subject_folder_that_is_not_utf8_runs_every_subject(tmp_path):
    """One subject folder named with a byte that is not UTF-8 stopped the whole batch before any work (exit 3,
    from writing the report)."""
    from medfuse.batch import run_batch

    root = os.fsencode(tmp_path / "ds")
    for name in (b"sub-ok", b"sub-\xff"):
        folder = Path(os.fsdecode(root + b"/" + name))
        folder.mkdir(parents=True)
        _nifti(folder / "mr.nii.gz", 0)
        _nifti(folder / "pet.nii.gz", 1)
        (folder / "mr.json").write_text('{"Modality": "MR"}')
        (folder / "pet.json").write_text('{"Modality": "PT"}')
    summary = run_batch(os.fsdecode(root), scheduler="synchronous", method="max")
    assert sorted(r.status for r in summary.results) == ["done", "done"], summary.table()


def test_a_report_naming_a_file_that_is_not_utf8_reads_back_as_written(tmp_path):
    """Its bytes made the UTF-8 decoding fail, the report was read as Windows-1252, every UTF-8 row was mangled
    ('sub-é' as 'sub-Ã©'), matched no subject, and came back as another row on every rerun."""
    report = tmp_path / "batch-report.csv"
    report.write_bytes("subject,status,seconds\nsub-\u00e9,done,1.0\n".encode("utf-8") + b"sub-\xff,done,2.0\n")
    rows = _read_report(report)
    assert [r["subject"] for r in rows] == ["sub-\u00e9", os.fsdecode(b"sub-\xff")]


def test_write_manifest_refuses_a_folder_name_that_is_not_utf8(tmp_path):
    """It wrote the name's bytes into the manifest, which read_manifest then refused as "not UTF-8 text"."""
    from medfuse.batch import write_manifest
    from medfuse.errors import InvalidInputError

    root = os.fsencode(tmp_path / "ds")
    folder = Path(os.fsdecode(root + b"/sub-\xff"))
    folder.mkdir(parents=True)
    _nifti(folder / "mr.nii.gz", 0)
    _nifti(folder / "pet.nii.gz", 1)
    with pytest.raises(InvalidInputError, match=r"sub-\\xff.*not UTF-8 text.*medfuse batch DATASET"):
        write_manifest(os.fsdecode(root))
