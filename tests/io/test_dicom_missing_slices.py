"""Evenly spaced series that lost slices (every other file, or every third).

- A copy of the sample PET series (64 slices 3 mm apart, SpacingBetweenSlices 3, NumberOfSlices 64) without
  every other file loaded as 32 slices 6 mm apart without a word: the gap check saw only uneven spacing.
- With those files emptied instead (unreadable), the warning about them said "the series has no missing slice
  between its first and last", which was false.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfuse.errors import MedfuseWarning
from medfuse.io.dicom import load_dicom

SAMPLE = Path(__file__).resolve().parents[2] / "sample_volumes" / "pet"
NAME, PID = "Quux^Wilhelmina", "MRN424242"


@pytest.fixture
def pet(tmp_path) -> Path:
    """A copy of the sample PET series (64 files, one slice each, sorted by position)."""
    if not SAMPLE.is_dir():
        pytest.skip("no sample_volumes/pet beside the package")
    dst = tmp_path / "pet"
    shutil.copytree(SAMPLE, dst)
    return dst


def _files(folder: Path):
    return sorted(folder.iterdir())


def _edit(folder: Path, **tags) -> None:
    """Set (or, with None, remove) header tags in every file of ``folder``."""
    for f in _files(folder):
        ds = pydicom.dcmread(f)
        for k, v in tags.items():
            if v is None:
                if k in ds:
                    delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(f)


def _load(folder: Path):
    """(volume, MedfuseWarning texts without the path before them)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_dicom(folder)
    texts = [str(w.message).split(": ", 1)[1] for w in caught if issubclass(w.category, MedfuseWarning)]
    return vol, texts


def _missing(texts):
    return [t for t in texts if t.startswith("slices appear to be missing")]


def _check_sparse_geometry(vol, n: int, dz: float) -> None:
    """``n`` slices ``dz`` mm apart from the first slice's position (the sample's geometry, slices lost)."""
    assert vol.shape == (64, 76, n)
    assert vol.spacing == pytest.approx((3.0, 3.0, dz))
    np.testing.assert_allclose(vol.affine[:3, 3], [-94.5, -112.5, -94.5])
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, dz])


def test_intact_series_loads_without_a_warning(pet):
    vol, texts = _load(pet)
    assert texts == []
    _check_sparse_geometry(vol, 64, 3.0)
    assert vol.provenance["warnings"] == []


def test_every_other_file_deleted_is_said(pet):
    _edit(pet, PatientName=NAME, PatientID=PID)
    for f in _files(pet)[1::2]:
        f.unlink()
    vol, texts = _load(pet)
    (msg,) = _missing(texts)
    for fact in ("its 32 slices are evenly spaced 6.00 mm apart", "SpacingBetweenSlices (0018,0088) says 3.00 mm",
                 "NumberOfSlices (0054,0081) says 64 slices (32 found)", "copy or export the whole series again"):
        assert fact in msg
    assert NAME not in msg and "Quux" not in msg and PID not in msg
    assert msg in vol.provenance["warnings"]
    _check_sparse_geometry(vol, 32, 6.0)  # loaded as found: the geometry is right, at half the resolution


def test_every_other_file_emptied_is_not_called_complete(pet):
    for f in _files(pet)[1::2]:
        f.write_bytes(b"")
    vol, texts = _load(pet)
    assert not any("no missing slice" in t for t in texts + vol.provenance["warnings"])
    (msg,) = _missing(texts)
    assert "6.00 mm apart" in msg and "says 3.00 mm" in msg and "64 slices (32 found)" in msg
    (unread,) = [t for t in texts if "could not be read" in t]
    assert unread.startswith("32 DICOM file(s)") and "IM00002.dcm" in unread
    assert "slices appear to be missing" in unread and "probably in these files" in unread
    assert unread in vol.provenance["warnings"] and msg in vol.provenance["warnings"]
    _check_sparse_geometry(vol, 32, 6.0)


def test_one_file_in_three_kept_is_said(pet):
    for f in _files(pet)[1::3] + _files(pet)[2::3]:  # one in three left: evenly 9 mm apart
        f.unlink()
    vol, texts = _load(pet)
    (msg,) = _missing(texts)
    assert "its 22 slices are evenly spaced 9.00 mm apart" in msg and "64 slices (22 found)" in msg
    _check_sparse_geometry(vol, 22, 9.0)


def test_number_of_slices_alone_is_evidence(pet):
    _edit(pet, SpacingBetweenSlices=None)
    for f in _files(pet)[1::2]:
        f.unlink()
    vol, texts = _load(pet)
    (msg,) = _missing(texts)
    assert "NumberOfSlices (0054,0081) says 64 slices, but 32 were found (evenly spaced 6.00 mm apart)" in msg
    assert "SpacingBetweenSlices" not in msg
    _check_sparse_geometry(vol, 32, 6.0)


def test_a_count_that_says_the_series_is_whole_wins_over_the_spacing_tag(pet):
    # 32 slices 6 mm apart with NumberOfSlices 32: a wrong SpacingBetweenSlices, not lost files.
    for f in _files(pet)[1::2]:
        f.unlink()
    _edit(pet, NumberOfSlices=32)
    vol, texts = _load(pet)
    assert texts == []
    _check_sparse_geometry(vol, 32, 6.0)


def test_a_range_of_slices_is_not_missing_slices(pet):
    # Fewer slices than NumberOfSlices, as far apart as SpacingBetweenSlices says: a partial export, not lost files.
    for f in _files(pet)[:28] + _files(pet)[36:]:
        f.unlink()
    vol, texts = _load(pet)
    assert texts == []
    assert vol.shape == (64, 76, 8) and vol.spacing == pytest.approx((3.0, 3.0, 3.0))


def test_no_spacing_or_count_in_the_headers_says_nothing_it_cannot_know(pet):
    _edit(pet, SpacingBetweenSlices=None, NumberOfSlices=None)
    for f in _files(pet)[1::2]:
        f.write_bytes(b"")
    vol, texts = _load(pet)
    assert _missing(texts) == []
    (unread,) = [t for t in texts if "could not be read" in t]
    assert "the headers give no slice spacing or count to confirm it" in unread
    _check_sparse_geometry(vol, 32, 6.0)


def test_unevenly_lost_slices_are_counted_not_only_the_largest_gap(pet):
    """One file in three deleted: 21 single-slice gaps, interpolated (each is within the 3x limit). The warning
    named only the largest gap, which read as one missing slice."""
    for f in _files(pet)[1::3]:
        f.unlink()
    vol, texts = _load(pet)
    assert vol.shape[2] == 64 and np.isclose(vol.spacing[2], 3.0)
    msg = next(t for t in texts if "uneven slice spacing" in t)
    assert "(missing slices?): 21 gaps, the largest 6.00 mm" in msg, msg
    assert "43 slices resampled linearly onto 64 slices" in msg and "gaps are interpolated" in msg, msg


def test_filling_one_missing_slice_keeps_the_measured_slices_as_measured(pet):
    """Positions are rounded in the headers: the grid's step came from the smallest step alone (4.99996 mm on a
    real GE series), which put every measured slice off the grid, so all of them were interpolated (off by up to
    0.5 on values of 7000 by slice 13). Only the missing slice is new now."""
    full, _ = _load(pet)
    files = _files(pet)
    rng = np.random.default_rng(0)
    for f in files:  # positions as a scanner rounds them: off by up to 5e-5 mm
        ds = pydicom.dcmread(f)
        x, y, z = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(z + float(rng.uniform(-5e-5, 5e-5)), 5)]
        ds.save_as(f)
    files[20].unlink()
    vol, said = _load(pet)
    assert any("uneven slice spacing" in t for t in said), said
    assert vol.shape == full.shape
    assert abs(vol.spacing[2] - full.spacing[2]) < 1e-5
    kept = [k for k in range(full.shape[2]) if k != 20]
    np.testing.assert_array_equal(vol.array[:, :, kept], full.array[:, :, kept])


def test_positions_rounded_to_a_hundredth_of_a_mm_keep_their_step_when_a_slice_is_filled(pet):
    """0.625 mm slices written as 0.62/0.63 mm steps: the step came from the smallest steps alone, and a series that
    lost one slice came back as 102 slices of 0.619 mm ("49 gaps"), every measured slice interpolated."""
    files = _files(pet)
    for k, f in enumerate(files):
        ds = pydicom.dcmread(f)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, round(k * 0.625, 2)]
        ds.SliceThickness = ds.SpacingBetweenSlices = 0.625
        ds.save_as(f)
    full, _ = _load(pet)
    files[30].unlink()
    vol, said = _load(pet)
    assert vol.shape == full.shape and abs(vol.spacing[2] - 0.625) < 1e-3
    assert any("a gap of 1.25 mm after slice 30 of 63" in t or "a gap of 1.26 mm after slice 30 of 63" in t
               for t in said), said
    kept = [k for k in range(full.shape[2]) if k != 30]
    np.testing.assert_array_equal(vol.array[:, :, kept], full.array[:, :, kept])


def test_variable_spacing_keeps_the_finest_run_as_measured_when_it_is_off_the_first_slices_grid(pet):
    """5 mm slices, then 1 mm slices starting 2.5 mm after the last of them (off a 1 mm grid from the first slice
    by 0.5 mm), then 5 mm again: the grid started at the first slice, so every 1 mm slice, the finest and the
    target's, was interpolated half-way between two measured ones. The grid is the 1 mm run's own now."""
    full, _ = _load(pet)
    files = _files(pet)
    z0 = float(pydicom.dcmread(files[0], stop_before_pixels=True).ImagePositionPatient[2])
    offsets = [0.0, 5.0, 10.0, 15.0, 20.0] + [22.5 + m for m in range(9)] + [35.5, 40.5, 45.5]
    for k, f in enumerate(files):
        if k >= len(offsets):
            f.unlink()
            continue
        ds = pydicom.dcmread(f)
        x, y, _ = (float(v) for v in ds.ImagePositionPatient)
        ds.ImagePositionPatient = [x, y, z0 + offsets[k]]
        ds.save_as(f)
    vol, said = _load(pet)
    msg = next(t for t in said if "uneven slice spacing" in t)
    assert "in runs with no gap" in msg and "starts 0.50 mm from the first slice" in msg, msg
    # 46 slices 1 mm apart from 0.5 mm to 45.5 mm past the first slice: the 1 mm run's positions among them
    assert vol.shape == full.shape[:2] + (46,)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 1.0], atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, 3], full.affine[:3, 3] + [0, 0, 0.5], atol=1e-9)
    for m in range(9):  # file 5 + m (slice 5 + m of the sample) is at 22.5 + m mm: grid slice 22 + m
        np.testing.assert_array_equal(vol.array[:, :, 22 + m], full.array[:, :, 5 + m])
    # between measured slices, linear interpolation: 0.5 mm is a tenth of the way from the 1st 5 mm slice to the 2nd
    np.testing.assert_allclose(vol.array[:, :, 0], 0.9 * full.array[:, :, 0] + 0.1 * full.array[:, :, 1],
                               rtol=1e-5, atol=1e-4 * float(np.abs(full.array).max()))
