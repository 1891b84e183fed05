"""Classic multi-frame files with one position for all frames, and patient-named folders in listings."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning, MultipleSeriesError
from medfuse.io.dicom import load_dicom, load_dicom_volumes, scan

NAME, PID, BIRTH = "Doe^Jane", "PID12345", "19600102"


# ---------------------------------------------------------------------------- classic multi-frame
def _multiframe(path: Path, *, modality="CT", frames=5, iop=(1, 0, 0, 0, 1, 0), spacing_tags=None, extra=None,
                rows=4, cols=3) -> np.ndarray:
    """A classic Multi-frame Grayscale Word SC file (one ImagePositionPatient for all frames); frame k holds
    100 * k plus an in-plane ramp. Returns the frames (frames, rows, columns)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Modality, ds.InstanceNumber = modality, 1
    ds.Rows, ds.Columns, ds.NumberOfFrames = rows, cols, frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.ImagePositionPatient = [1.0, 2.0, 3.0]
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.PixelSpacing = [0.5, 0.75]
    for k, v in ({"SliceThickness": 2.0, "SpacingBetweenSlices": 2.0} if spacing_tags is None else
                 spacing_tags).items():
        setattr(ds, k, v)
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    data = (np.arange(rows * cols).reshape(1, rows, cols) + 100 * np.arange(frames).reshape(-1, 1, 1)).astype(
        np.uint16)
    ds.PixelData = data.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return data


OBLIQUE = (0.0, 1.0, 0.0, 0.6, 0.0, -0.8)


@pytest.mark.parametrize("modality", ["CT", "MR", "PT"])
@pytest.mark.parametrize("iop", [(1, 0, 0, 0, 1, 0), OBLIQUE], ids=["axial", "oblique"])
def test_classic_multiframe_with_slice_spacing_is_one_volume_of_slices(tmp_path, modality, iop):
    """Was: MultipleSeriesError "the series holds 5 volumes (4-D)", one slice each (GDCM and dcm2niix stack
    such frames as slices along the normal)."""
    f = tmp_path / "mf.dcm"
    data = _multiframe(f, modality=modality, iop=iop, spacing_tags={"SpacingBetweenSlices": 2.0,
                                                                    "SliceThickness": 3.0})
    with pytest.warns(MedfuseWarning, match=r"5 frames .* share one ImagePositionPatient .* placed as slices 2 mm "
                                            r"apart along the slice normal .* SpacingBetweenSlices"):
        vol = load_dicom(f)
    assert vol.shape == (3, 4, 5)
    np.testing.assert_allclose(vol.spacing, (0.75, 0.5, 2.0))
    row, col = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(row, col)
    for k in range(5):  # frame k lies k x 2 mm along row x column from the stored position
        np.testing.assert_array_equal(vol.array[:, :, k], data[k].T.astype(vol.array.dtype))
        np.testing.assert_allclose(vol.index_to_world(np.array([0.0, 0.0, float(k)])),
                                   np.array([1.0, 2.0, 3.0]) + 2.0 * k * normal, atol=1e-9)
    assert any("derived positions" in w for w in vol.provenance["warnings"])
    (info,) = scan(tmp_path)
    assert info.shape == (3, 4, 5) and info.n_volumes == 1


def test_classic_multiframe_slice_thickness_used_without_spacing(tmp_path):
    _multiframe(tmp_path / "mf.dcm", spacing_tags={"SliceThickness": 1.5})
    with pytest.warns(MedfuseWarning, match="1.5 mm apart .* from its SliceThickness"):
        vol = load_dicom(tmp_path / "mf.dcm")
    assert vol.shape[2] == 5 and vol.spacing[2] == pytest.approx(1.5)


@pytest.mark.parametrize("kw,why", [
    (dict(spacing_tags={}), "neither SpacingBetweenSlices nor SliceThickness"),
    (dict(modality="OT"), r"modality \(OT\) is not CT, MR or PT"),
    (dict(extra={"FrameIncrementPointer": 0x00181063, "FrameTime": 40.0}), "FrameIncrementPointer names FrameTime"),
], ids=["no-spacing", "other-modality", "cine"])
def test_classic_multiframe_time_points_say_why(tmp_path, kw, why):
    """Frames that are not slices stay time points of one slice each, and the message says why (it said only
    "the series holds 5 volumes (4-D)", as if the file were a 4-D series)."""
    f = tmp_path / "mf.dcm"
    data = _multiframe(f, **kw)
    said = r"5 volumes \(4-D\): the 5 frames of the multi-frame file share one ImagePositionPatient and (it|its) "
    with pytest.raises(MultipleSeriesError, match=said + ".*" + why + r".*time points") as e:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", MedfuseWarning)
            load_dicom(f)
    assert "volume_index=0..4" in e.value.fix
    with pytest.warns(MedfuseWarning, match=why):
        vols = load_dicom_volumes(f)
    assert [v.shape for v in vols] == [(3, 4, 1)] * 5
    for k, v in enumerate(vols):
        np.testing.assert_array_equal(v.array[:, :, 0], data[k].T.astype(v.array.dtype))


def test_classic_multiframe_slice_location_pointer_is_slices(tmp_path):
    _multiframe(tmp_path / "mf.dcm", extra={"FrameIncrementPointer": 0x00182005,
                                             "SliceLocationVector": [3.0, 5.0, 7.0, 9.0, 11.0]})
    with pytest.warns(MedfuseWarning, match="placed as slices"):
        assert load_dicom(tmp_path / "mf.dcm").shape == (3, 4, 5)


# ---------------------------------------------------------------------------- patient-named folders in listings
def _slice(path: Path, *, modality: str, uid: str, k: int, patient=(NAME, PID, BIRTH)):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = patient
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = modality, uid, "1.2.3", k + 1
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * k], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = np.zeros((4, 5), np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


@pytest.fixture
def study(tmp_path) -> Path:
    """A PACS export: one folder per series, named after the patient (and one innocently named)."""
    root = tmp_path / "study"
    for name, modality in (("DOE^JANE_PID12345_ct", "CT"), ("Jane Doe 1960-01-02 pet", "PT"), ("mr_series", "MR")):
        (root / name).mkdir(parents=True)
        uid = generate_uid()
        for k in range(3):
            _slice(root / name / f"IM{k}.dcm", modality=modality, uid=uid, k=k)
    return root


def _no_identifier(text: str) -> None:
    low = text.lower()
    for bad in ("doe", "jane", "pid12345", "12345", "1960"):
        assert bad not in low, (bad, text)


@pytest.mark.parametrize("choice", [None, "XX", "7", "NM"], ids=["none", "unknown-uid", "out-of-range", "no-such"])
def test_series_listing_blanks_patient_named_folders(study, choice):
    """Was: "1: CT 5x4x3, 3 files in DOE^JANE_PID12345_ct; ..." in the error (and in logs and batch reports)."""
    kind = MultipleSeriesError if choice is None else InvalidInputError
    with pytest.raises(kind) as e:
        medfuse.load(study, **({} if choice is None else {"series_uid": choice}))
    text = str(e.value)
    _no_identifier(text)
    # still a useful listing: each series, its folder with the identifiers blanked, the innocent one as it is
    assert "CT 5x4x3, 3 files in [removed]" in text and "PT 5x4x3, 3 files in [removed]" in text
    assert "MR 5x4x3, 3 files in mr_series" in text and text.count("_ct") == 1 and text.count(" pet") == 1


def test_checks_made_after_the_headers_are_read_blank_the_folder_too(study, tmp_path):
    """A 4-D series without volume_index, a volume_index out of range and a series choice that matched nothing
    were raised once the loader's blanking had ended: they quoted a folder named after the patient verbatim."""
    import shutil

    folder, named = tmp_path / "DOE^JANE_PID12345_4d", tmp_path / "DOE^JANE_PID12345_study"
    shutil.copytree(study, named)
    folder.mkdir()
    uid = generate_uid()
    for k in range(6):  # two volumes of three slices: each position twice
        _slice(folder / f"IM{k}.dcm", modality="CT", uid=uid, k=k % 3)
    errors = []
    for call, kind in ((lambda: medfuse.load(folder), MultipleSeriesError),
                       (lambda: medfuse.load(folder, volume_index=7), InvalidInputError),
                       (lambda: load_dicom(folder, volume_index=-3), InvalidInputError),
                       (lambda: medfuse.io.select_series(named, "NM"), InvalidInputError),
                       (lambda: medfuse.io.select_series(named, "9"), InvalidInputError)):
        with pytest.raises(kind) as e:
            call()
        errors.append(e.value)
    assert "the series holds 2 volumes (4-D)" in str(errors[0]) and "out of range" in str(errors[1])
    assert "no NM series in this folder" in str(errors[3]) and "series 9 asked for" in str(errors[4])
    for e in errors:
        _no_identifier(str(e))
        assert "[removed]" in str(e)
    assert str(errors[0].path) == str(folder)  # the attribute stays the caller's path, for programs
    assert medfuse.load(folder, volume_index=1).shape == (5, 4, 3)  # a good choice still loads


def test_series_listing_reads_no_file_again(study, monkeypatch):
    """The identifiers come from the headers already read for the listing, not from a second pass over the files
    (medfuse.provenance.patient_identifiers reads every file up to its patient module)."""
    import medfuse.provenance as prov

    def no_read(*a, **k):
        raise AssertionError("a file was read again for its patient module")

    monkeypatch.setattr(prov, "_read_ids", no_read)
    with pytest.raises(MultipleSeriesError) as e:
        medfuse.load(study)
    _no_identifier(str(e.value))


# ---------------------------------------------------------------------------- volume order of a 4-D series
def _timed_slice(path: Path, *, uid: str, k: int, t: int, number: int, tags: dict):
    """Slice ``k`` of time point ``t`` of an MR 4-D series: every voxel holds 10 * t + 1 (which volume it is)."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.4"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = "MR", uid, "1.2.3", number
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 2.0 * k], [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing, ds.SliceThickness = [1.0, 1.0], 2.0
    ds.Rows, ds.Columns = 4, 5
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    for kw, v in tags.items():
        setattr(ds, kw, v)
    ds.PixelData = np.full((4, 5), 10 * t + 1, np.uint16).tobytes()
    ds.save_as(str(path), enforce_file_format=True)


#: Three time points a minute apart, the last one after midnight (the probe's case).
_STAMPS = ["20201217235800", "20201217235900", "20201218000000"]


@pytest.mark.parametrize("tags,numbers", [
    (lambda s: {"AcquisitionTime": s[8:]}, "increasing"),
    (lambda s: {"AcquisitionDateTime": s}, "decreasing"),
    (lambda s: {"AcquisitionDateTime": s + ".000000+0100", "AcquisitionTime": "120000"}, "decreasing"),
], ids=["time-only-past-midnight", "datetime-only", "datetime-before-time"])
def test_4d_volumes_in_acquisition_order(tmp_path, tags, numbers):
    """Was: time only past midnight gave volumes [2, 0, 1] (00:00 first, against InstanceNumber); the
    AcquisitionDateTime alone was ignored and the volumes followed InstanceNumber ([2, 1, 0] here)."""
    from datetime import datetime

    uid, n_t, n_k = generate_uid(), len(_STAMPS), 2
    for t, stamp in enumerate(_STAMPS):
        for k in range(n_k):
            number = 1 + t * n_k + k if numbers == "increasing" else 1 + (n_t - 1 - t) * n_k + k
            _timed_slice(tmp_path / f"IM{t}{k}.dcm", uid=uid, k=k, t=t, number=number, tags=tags(stamp))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # ordered by time: nothing to say
        vols = load_dicom_volumes(tmp_path)
    got = [int(v.array.max() - 1) // 10 for v in vols]
    expected = sorted(range(n_t), key=lambda t: datetime.strptime(_STAMPS[t], "%Y%m%d%H%M%S"))
    assert got == expected == [0, 1, 2]


def test_4d_times_within_a_day_are_not_read_across_midnight(tmp_path):
    """Times without a date 2 hours apart stay in clock order (only spans over 12 hours are read as wrapping)."""
    uid = generate_uid()
    for t, tm in enumerate(["000500", "020500"]):
        for k in range(2):
            _timed_slice(tmp_path / f"IM{t}{k}.dcm", uid=uid, k=k, t=t, number=1 + (1 - t) * 2 + k,
                         tags={"AcquisitionTime": tm})
    assert [int(v.array.max() - 1) // 10 for v in load_dicom_volumes(tmp_path)] == [0, 1]


def test_enhanced_frame_datetimes_compare_as_times():
    """FrameAcquisitionDateTime with and without fractional seconds: was compared as the digits' number, so
    23:59:59.5 (15 digits) came after 00:00:00 the next day (14 digits)."""
    from pydicom.dataset import Dataset

    from medfuse.io.dicom import _time_key

    def frame(dt):
        fc, fg = Dataset(), Dataset()
        fc.FrameAcquisitionDateTime = dt
        fg.FrameContentSequence = [fc]
        return fg

    ds = Dataset()
    assert _time_key(ds, frame("20201217235959.5")) < _time_key(ds, frame("20201218000000"))


@pytest.mark.parametrize("text, seconds", [("93015", 9 * 3600 + 30 * 60 + 15), ("093015.25", 34215.25),
                                           ("09:30:15", 34215.0), ("930", 9 * 3600 + 30 * 60), ("2401", None),
                                           ("096015", None), ("", None), ("1234567", None)])
def test_acquisition_times_are_read_as_dicom_writes_them_and_as_numbers_drop_their_zero(text, seconds):
    """A time stored as a number ("93015" for 09:30:15) was no time at all, and its volumes fell back to
    InstanceNumber order; impossible times are still none."""
    from medfuse.io.dicom import _tm_seconds

    assert _tm_seconds(text) == seconds


def test_a_series_folder_linked_into_a_study_is_found_once_and_a_link_loop_ends(tmp_path, samples_dir):
    """rglob did not follow linked folders: a study whose PET folder was a symlink had no PET (scan listed none,
    batch said "unpaired: no PET or SPECT found"). Links to the study or above it are not followed."""
    import os

    import medfuse
    from medfuse.batch import discover_subject

    if not hasattr(os, "symlink"):
        pytest.skip("no symlinks here")
    study = tmp_path / "s01"
    study.mkdir()
    (study / "t1.nii.gz").symlink_to(samples_dir / "mr_t1.nii.gz")
    (study / "pet").symlink_to(samples_dir / "pet", target_is_directory=True)
    (study / "pet_again").symlink_to(samples_dir / "pet", target_is_directory=True)  # the same folder twice
    (study / "loop").symlink_to(study, target_is_directory=True)
    # A link above the study is not followed: it would search the whole dataset (here: another subject's CT).
    import shutil

    shutil.copytree(samples_dir / "ct", tmp_path / "other_ct")
    (study / "up").symlink_to(tmp_path, target_is_directory=True)
    found = medfuse.scan(study)
    direct = medfuse.scan(samples_dir / "pet")
    assert len(found) == 1 and found[0].n_files == direct[0].n_files == 64, (found, direct)
    fixed, moving = discover_subject(study)
    assert Path(fixed).name == "t1.nii.gz" and len(moving) == 1 and Path(moving[0]).name in ("pet", "pet_again")
    v = medfuse.load(study / "pet")
    assert v.modality == "PT" and v.same_grid(medfuse.load(samples_dir / "pet"))
