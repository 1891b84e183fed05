"""save()'s guards: overwrite never replaces a scanner's series, unknown endings, templates, non-finite volumes,
names that differ only in letter case, a folder where the provenance sidecar goes."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medfuse
from medfuse import provenance as prov
from medfuse.cli import main
from medfuse.errors import InvalidInputError, OutputExistsError, UnreadableFileError
from medfuse.io.writers import check_save_target, save
from medfuse.volume import Volume


@pytest.fixture
def ct():
    rng = np.random.default_rng(0)
    return Volume(rng.integers(-1024, 3000, (12, 10, 4)).astype(np.int16), np.eye(4), modality="CT", unit="HU")


def _hashes(folder: Path) -> dict:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _as_scanner(folder: Path, files=None) -> None:
    """Re-tag a series as a scanner's own (what a PACS export or the scanner console writes)."""
    for f in files or sorted(folder.iterdir()):
        ds = pydicom.dcmread(f)
        ds.Manufacturer, ds.ManufacturerModelName, ds.SoftwareVersions = "SIEMENS", "Biograph", "VG80"
        ds.save_as(f)


# ----------------------------------------------------------------------------- 1. a scanner's series is kept
def test_overwrite_never_replaces_a_scanners_dicom_series(tmp_path, ct):
    scanner = save(ct, tmp_path / "scanner_pet")
    _as_scanner(scanner)
    before = _hashes(scanner)
    with pytest.raises(OutputExistsError, match="not a DICOM series medfuse wrote") as e:
        save(ct.with_array(ct.array + 1), scanner, overwrite=True)
    assert "move that data away" in e.value.fix
    with pytest.raises(OutputExistsError, match="not a DICOM series medfuse wrote"):
        check_save_target(scanner, overwrite=True)  # refused before minutes of work, too
    assert _hashes(scanner) == before and sorted(os.listdir(tmp_path)) == ["scanner_pet"]


def test_overwrite_refuses_a_series_with_one_foreign_file(tmp_path, ct):
    mixed = save(ct, tmp_path / "mixed")
    _as_scanner(mixed, [sorted(mixed.iterdir())[0]])
    before = _hashes(mixed)
    with pytest.raises(OutputExistsError, match="medfuse wrote"):
        save(ct, mixed, overwrite=True)
    assert _hashes(mixed) == before


def test_overwrite_still_replaces_medfuses_own_series_and_an_empty_folder(tmp_path, ct):
    own = save(ct, tmp_path / "own")
    old = pydicom.dcmread(next(own.iterdir()))
    for f in own.iterdir():  # as older medfuse versions marked it: Manufacturer "medfuse", no model
        ds = pydicom.dcmread(f)
        ds.Manufacturer, ds.ManufacturerModelName = "medfuse", ""
        ds.save_as(f)
    save(ct.with_array(ct.array + 1), own, overwrite=True)
    new = pydicom.dcmread(sorted(own.iterdir())[0])
    assert new.SeriesInstanceUID != old.SeriesInstanceUID and len(os.listdir(own)) == ct.shape[2]
    (tmp_path / "empty").mkdir()
    assert len(os.listdir(save(ct, tmp_path / "empty", overwrite=True))) == ct.shape[2]


@pytest.mark.parametrize("hidden", [".notes", ".IM99999.dcm"])
def test_overwrite_keeps_a_hidden_file_of_the_users(tmp_path, ct, hidden):
    """Every hidden file went with the folder it was in: a user's notes, a scanner slice named with a dot."""
    own = save(ct, tmp_path / "own")
    if hidden.endswith(".dcm"):
        scanner = save(ct, tmp_path / "scanner")
        _as_scanner(scanner)
        (own / hidden).write_bytes(sorted(scanner.iterdir())[0].read_bytes())
    else:
        (own / hidden).write_text("my notes")
    before = _hashes(own)
    with pytest.raises(OutputExistsError, match="never deletes these"):
        save(ct.with_array(ct.array + 1), own, overwrite=True)
    assert _hashes(own) == before
    # A desktop's own files (Finder's .DS_Store and ._ AppleDouble files) go with the folder as before.
    (own / hidden).unlink()
    (own / ".DS_Store").write_bytes(b"Bud1")
    (own / "._IM00001.dcm").write_bytes(b"\x00\x05\x16\x07")
    save(ct.with_array(ct.array + 1), own, overwrite=True)
    assert len(os.listdir(own)) == ct.shape[2]

def test_cli_fuse_overwrite_keeps_a_scanners_series(tmp_path, ct, capsys):
    a, b = save(ct, tmp_path / "a.nii.gz"), save(ct.with_array(ct.array // 2), tmp_path / "b.nii.gz")
    scanner = save(ct, tmp_path / "scanner_pet")
    _as_scanner(scanner)
    before = _hashes(scanner)
    rc = main(["fuse", str(a), str(b), "-o", str(scanner), "--method", "max", "--overwrite"])
    assert rc != 0 and "medfuse wrote" in capsys.readouterr().err
    assert _hashes(scanner) == before


# ----------------------------------------------------------------------------- 2. unknown endings
@pytest.mark.parametrize("name", ["a.dcm", "a.gz", "a.nii.bz2", "a.nii.gz.", "pet.ac"])
def test_an_unknown_ending_is_refused_not_written_as_a_dicom_folder(tmp_path, ct, name):
    with pytest.raises(InvalidInputError, match="not a 3-D image format") as e:
        save(ct, tmp_path / name)
    assert ".nii.gz" in str(e.value) and ".nrrd" in str(e.value)
    with pytest.raises(InvalidInputError, match="not a 3-D image format"):
        check_save_target(tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_an_existing_file_with_an_unknown_ending_is_kept(tmp_path, ct):
    notes = tmp_path / "notes.dcm"
    notes.write_text("a user's file")
    with pytest.raises(OutputExistsError, match="file is in the way"):
        save(ct, notes, overwrite=True)
    assert notes.read_text() == "a user's file" and os.listdir(tmp_path) == ["notes.dcm"]


def test_dicom_folder_names_still_work(tmp_path, ct):
    for name in ("pet", "ct", "dicom_out"):
        assert len(os.listdir(save(ct, tmp_path / name))) == ct.shape[2]
    (tmp_path / "series.v1").mkdir()  # an existing folder whose name has a dot
    assert len(os.listdir(save(ct, tmp_path / "series.v1", overwrite=True))) == ct.shape[2]
    assert len(os.listdir(save(ct, tmp_path / "study.v2", format="dicom"))) == ct.shape[2]


# ----------------------------------------------------------------------------- 3. template
def test_a_template_for_a_non_dicom_output_is_refused(tmp_path, ct):
    with pytest.raises(InvalidInputError, match="template is used only for a DICOM series"):
        save(ct, tmp_path / "x.nii.gz", template=tmp_path / "nonexist")
    assert os.listdir(tmp_path) == []
    with pytest.raises(UnreadableFileError):  # a DICOM output still reads (and checks) its template
        save(ct, tmp_path / "series", template=tmp_path / "nonexist")


# ----------------------------------------------------------------------------- 4. no finite voxel
@pytest.mark.parametrize("fill", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("name", ["v.nii.gz", "v.mha", "v.nrrd", "series"])
def test_a_volume_without_a_finite_voxel_is_refused(tmp_path, name, fill):
    vol = Volume(np.full((6, 5, 4), fill, np.float32), np.eye(4), modality="PT", unit="SUVbw")
    with pytest.raises(InvalidInputError, match="every voxel is NaN or infinite") as e:
        save(vol, tmp_path / name)
    assert "nan_to_num" in e.value.fix and os.listdir(tmp_path) == []


def test_a_partly_nan_volume_still_saves(tmp_path):
    arr = np.ones((6, 5, 4), np.float32)
    arr[0] = np.nan
    out = save(Volume(arr, np.eye(4), modality="PT", unit="SUVbw"), tmp_path / "v.nii.gz")
    back = medfuse.load(out).array
    assert np.isnan(back[0]).all() and np.all(back[1:] == 1)


# ----------------------------------------------------------------------------- 5. letter case
def test_a_name_differing_only_in_case_counts_as_the_existing_file(tmp_path, ct):
    src = save(ct, tmp_path / "mr.nii.gz")
    mr = medfuse.load(src)
    before = _hashes(tmp_path)
    with pytest.raises(OutputExistsError, match="source"):
        save(mr, tmp_path / "MR.NII.GZ")
    with pytest.raises(OutputExistsError, match="source"):
        save(mr, tmp_path / "Mr.nii.gz", overwrite=True)
    other = save(ct, tmp_path / "fused.nii.gz")
    for overwrite in (False, True):
        with pytest.raises(OutputExistsError, match="exists as fused.nii.gz"):
            save(ct, tmp_path / "FUSED.nii.gz", overwrite=overwrite)
    with pytest.raises(OutputExistsError, match="letter case"):
        check_save_target(tmp_path / "Fused.nii.gz")
    assert _hashes(tmp_path) == {**before, other.name: _hashes(tmp_path)[other.name]}
    assert sorted(os.listdir(tmp_path)) == ["fused.nii.gz", "mr.nii.gz"]
    save(ct, other, overwrite=True)  # the exact name still replaces it


# ----------------------------------------------------------------------------- 6. a folder at the sidecar path
@pytest.mark.parametrize("overwrite", [False, True])
def test_a_folder_at_the_sidecar_path_is_named_as_such_from_the_start(tmp_path, overwrite):
    (tmp_path / "f5.json").mkdir()
    with pytest.raises(OutputExistsError, match="folder is in the way") as e:
        prov.check_sidecar(tmp_path / "f5.nii.gz", overwrite=overwrite)
    assert "overwrite" not in e.value.fix and "move the folder away" in e.value.fix
    assert (tmp_path / "f5.json").is_dir()
