"""DICOM messages and the patient-identifier search.

- A study whose only series lies in a hidden folder said "no readable DICOM image files" without a word about
  the hidden folder left out.
- The several-series listing gave a Siemens mosaic's raw size (the whole mosaic) where scan() and medfuse info
  give the unpacked volume.
- patient_identifiers read the first 64 files of a folder only: a patient whose files sorted after them was not
  blanked from messages.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian, generate_uid

import medfuse
from medfuse import provenance
from medfuse.errors import InvalidInputError, MultipleSeriesError, UnreadableFileError
from medfuse.io.dicom import load_dicom, scan

NAME, PID = "Quux^Wilhelmina", "MRN424242"


def _slice(path: Path, *, k: int, uid: str, name: str = NAME, pid: str = PID, ts=ExplicitVRLittleEndian,
           private=None) -> None:
    """One 8x10 CT slice of series ``uid`` at z = 2.5*k."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ts
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = name, pid, "19010101"
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = "CT", uid, "1.2.3.4"
    ds.InstanceNumber = k + 1
    ds.ImagePositionPatient = [0.0, 0.0, 2.5 * k]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.Rows, ds.Columns = 8, 10
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(80, dtype=np.uint16) + k).tobytes()
    if private is not None:
        ds.private_block(0x0009, "QUUX TEST", create=True).add_new(0x01, "OB", private)
    ds.save_as(str(path), enforce_file_format=True)


def _series(folder: Path, n: int = 3, **kw) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    for k in range(n):
        _slice(folder / f"IM{k:04d}.dcm", k=k, uid=uid, **kw)
    return uid


# ---------------------------------------------------------------------------- 1. hidden folders
def test_a_series_only_in_a_hidden_folder_says_it_was_skipped_without_naming_it(tmp_path):
    study = tmp_path / "study"
    hidden = study / ".Quux_Wilhelmina_MRN424242"  # a folder named after the patient: never quoted
    _series(hidden)
    (study / ".Spotlight-V100").mkdir()  # macOS bookkeeping on a USB stick: not a series, not counted
    (study / ".Spotlight-V100" / "store.db").write_bytes(b"\0" * 300)
    _series(study / ".medfuse-tmp-0123456789ab-89abcdef-123-abcdefgh")  # an unfinished write: not counted
    for call in (lambda: load_dicom(study), lambda: scan(study), lambda: medfuse.load(study)):
        with pytest.raises(UnreadableFileError) as e:
            call()
        msg = str(e.value)
        assert "no readable DICOM image files" in msg
        assert "1 hidden folder (name starting with '.') holding DICOM files was skipped" in msg
        assert "hidden folder's own path" in e.value.fix
        assert "Quux" not in msg and "MRN424242" not in msg and "Spotlight" not in msg and "medfuse-tmp" not in msg
    # The advice works: the hidden folder's own path loads.
    assert load_dicom(hidden).shape == (10, 8, 3)


def test_two_hidden_series_are_counted_and_nested_ones_once(tmp_path):
    _series(tmp_path / ".a")
    _series(tmp_path / "visible" / ".b" / "deeper")
    _series(tmp_path / ".a" / ".inner")  # inside a hidden folder already counted
    with pytest.raises(UnreadableFileError, match="2 hidden folders .* holding DICOM files were skipped"):
        load_dicom(tmp_path)


def test_hidden_folders_without_dicom_keep_the_plain_message(tmp_path):
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(UnreadableFileError) as e:
        load_dicom(tmp_path)
    assert "hidden folder" not in str(e.value) and "check the folder" in e.value.fix


# ---------------------------------------------------------------------------- 2. mosaic in a listing
def _mosaic_and_classic(shared, tmp_path) -> Path:
    base = shared("data", "dicom", "qa-ge-siemens-epi", "In")
    shutil.copytree(base / "20180918Si" / "mr_0003", tmp_path / "si")  # Siemens mosaics
    shutil.copytree(base / "20180918GE" / "mr_0005", tmp_path / "ge")  # GE classic single-frame
    return tmp_path


def test_several_series_listing_gives_a_mosaic_the_size_scan_gives(shared, tmp_path):
    folder = _mosaic_and_classic(shared, tmp_path)
    infos = scan(folder)
    mosaic = next(i for i in infos if Path(i.folder).name == "si")
    raw = pydicom.dcmread(next(Path(mosaic.folder).glob("*.dcm")), stop_before_pixels=True)
    assert (raw.Columns, raw.Rows) != mosaic.shape[:2]  # it is a mosaic: the stored image holds the tiles
    with pytest.raises(MultipleSeriesError) as e:
        load_dicom(folder)
    msg = str(e.value)
    for n, i in enumerate(infos, start=1):
        assert f"{n}: {i.modality} {'x'.join(map(str, i.shape))}" in msg
        assert f"{i.n_files} files in {Path(i.folder).name}" in msg
    assert f"{raw.Columns}x{raw.Rows}" not in msg
    assert "2 volumes" in msg and "10 volumes" in msg
    # The same listing where a number out of range is refused; a number in range still loads.
    with pytest.raises(InvalidInputError) as e:
        load_dicom(folder, series_uid="3")
    assert f"{'x'.join(map(str, mosaic.shape))}" in str(e.value) and f"{raw.Columns}x{raw.Rows}" not in str(e.value)
    n = [Path(i.folder).name for i in infos].index("si") + 1
    assert load_dicom(folder, series_uid=str(n), volume_index=0).shape == mosaic.shape


# ---------------------------------------------------------------------------- 3. patient identifiers
def test_a_patient_after_the_first_64_files_of_a_folder_is_found(tmp_path):
    _series(tmp_path, n=70)
    _slice(tmp_path / "ZZ0001.dcm", k=0, uid=generate_uid(), name="Roe^Richard", pid="MRN998877")
    found = provenance.patient_identifiers([tmp_path])
    assert "MRN424242" in found and "MRN998877" in found and "Roe_Richard" in found


def test_a_huge_folder_is_sampled_within_the_bound_and_every_series_folder_is_read(tmp_path, monkeypatch):
    """Over the bound, each sub-folder's first and last file are read (a series folder is one patient's), then
    files evenly spaced; never more files than the bound."""
    monkeypatch.setattr(provenance, "_MAX_FILES", 12)
    monkeypatch.setattr(provenance, "_FIRST_FILES", 4)
    pids = [f"MRN10000{k}" for k in range(4)]
    for k, pid in enumerate(pids):
        _series(tmp_path / "study" / f"s{k}", n=6, pid=pid, name=f"Person{k}^Test")
    reads = []
    real = provenance._read_ids
    monkeypatch.setattr(provenance, "_read_ids", lambda p: reads.append(p) or real(p))
    found = provenance.patient_identifiers([tmp_path / "study"])
    assert all(pid in found for pid in pids)
    assert len(reads) == 12 == len(set(reads))
    # A flat folder: a patient with a run of files among many others' is met by the even spacing.
    flat = tmp_path / "flat"
    flat.mkdir()
    uid = generate_uid()
    for k in range(40):
        other = 20 <= k < 26
        _slice(flat / f"IM{k:04d}.dcm", k=k, uid=uid, pid="MRN555555" if other else PID)
    reads.clear()
    assert "MRN555555" in provenance.patient_identifiers([flat]) and len(reads) == 12
    # A short run near the start, between the evenly spaced reads: found, as the first files always are.
    early = tmp_path / "early"
    early.mkdir()
    for k in range(40):
        _slice(early / f"IM{k:04d}.dcm", k=k, uid=uid, pid="MRN666666" if k in (2, 3) else PID)
    reads.clear()
    assert "MRN666666" in provenance.patient_identifiers([early]) and len(reads) == 12


def test_identifiers_past_the_first_bytes_and_in_deflated_files_are_found(tmp_path):
    """Only the first bytes of a file are parsed when the patient module ends in them; a long group 0008 and a
    deflated file are read from the file itself."""
    long_0008 = tmp_path / "long.dcm"
    _slice(long_0008, k=0, uid=generate_uid(), pid="MRN777001",
           private=b"\0" * (3 * provenance._HEAD_BYTES))  # in group 0009, before the patient module
    deflated = tmp_path / "deflated.dcm"
    _slice(deflated, k=1, uid=generate_uid(), pid="MRN777002", ts=DeflatedExplicitVRLittleEndian)
    assert "MRN777001" in provenance.patient_identifiers([long_0008])
    assert "MRN777002" in provenance.patient_identifiers([deflated])
    found = provenance.patient_identifiers([tmp_path])
    assert "MRN777001" in found and "MRN777002" in found


def test_reading_ids_stops_at_the_patient_module(tmp_path):
    """A file is read up to the end of group 0010: what follows (geometry, pixels) is never parsed."""
    f = tmp_path / "a.dcm"
    _slice(f, k=0, uid=generate_uid())
    ds = provenance._read_ids(f)
    assert str(ds.PatientID) == PID and "PixelData" not in ds and "SeriesInstanceUID" not in ds



def test_listing_a_series_never_swaps_the_process_warning_state(tmp_path, monkeypatch, recwarn):
    """scan() and the several-series listing quieted their duplicate/localizer notes with catch_warnings, which
    swaps process-wide state: on a batch worker's threads another subject's warnings were dropped meanwhile.
    The notes are kept unsaid another way; the listing still warns nothing about them."""
    import warnings

    folder = tmp_path / "s"
    _series(folder)
    shutil.copy(folder / "IM0000.dcm", folder / "IM0000-copy.dcm")  # a duplicate: a note, not a warning here

    def swapped(*a, **k):
        raise AssertionError("catch_warnings used while listing")

    monkeypatch.setattr(warnings, "catch_warnings", swapped)
    (info,) = scan(folder)
    monkeypatch.undo()
    assert info.n_files == 3 and not [w for w in recwarn if "duplicate" in str(w.message)]


def test_files_that_cannot_be_dicom_are_not_parsed_and_preamble_less_ones_still_are(tmp_path, monkeypatch):
    """A .raw of zeros beside a .mhd was parsed as thousands of empty DICOM elements (0.35 s for a BraTS .raw,
    now for up to 5000 files a folder); a DICOM file written without preamble and file meta must still be read."""
    from pydicom.dataset import Dataset
    from pydicom.filereader import read_partial

    bare = Dataset()
    bare.SOPClassUID, bare.Modality = "1.2.840.10008.5.1.4.1.1.2", "CT"  # group 0008 first
    bare.PatientName, bare.PatientID = "Bare^Bertha", "MRN990011"
    bare.save_as(str(tmp_path / "bare"), implicit_vr=True, little_endian=True)  # no preamble, no "DICM"
    assert (tmp_path / "bare").read_bytes()[:2] == b"\x08\x00"
    (tmp_path / "volume.raw").write_bytes(bytes(64 * 1024))
    (tmp_path / "notes.txt").write_text("Quux Wilhelmina's follow-up")  # text: no header to find
    parsed = []
    monkeypatch.setattr("pydicom.filereader.read_partial",
                        lambda fh, *a, **k: parsed.append(fh) or read_partial(fh, *a, **k))
    found = provenance.patient_identifiers([tmp_path])
    assert "MRN990011" in found and "Bare Bertha" in found
    assert len(parsed) == 1  # only the DICOM file was handed to pydicom
