"""RT Dose grids (RTDOSE) load as Volumes in Gy.

A radiotherapy physicist fusing a dose distribution onto the planning CT or an MR found RTDOSE refused as "holds no
image". The dose grid is a multi-frame image: ImagePositionPatient gives the first frame, GridFrameOffsetVector
(3004,000C) the others along the slice normal (relative offsets from 0, or for axial grids absolute z values: PS3.3
C.8.8.3.2), and dose = stored value x DoseGridScaling. Each test writes a dose with pydicom whose values are a known
linear function of the world position (LPS, mm), so that values and geometry are checked together against it.
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medfuse
from medfuse.errors import GeometryError, MedfuseError, MedfuseWarning, UnreadableFileError, UnsupportedDataError
from medfuse.io.dicom import load_dicom, scan

SAMPLE_CT = Path(__file__).resolve().parents[2] / "sample_volumes" / "ct"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
NAME, PID = "Doe^Radiata", "MRN771177"

#: Oblique orientation: rows along (cos 30, sin 30, 0), columns towards the feet; normal = row x column.
COS, SIN = np.cos(np.radians(30.0)), np.sin(np.radians(30.0))
OBLIQUE = [COS, SIN, 0.0, 0.0, 0.0, -1.0]
OBLIQUE_NORMAL = np.array([-SIN, COS, 0.0])
AXIAL = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


def dose_gy(p: np.ndarray) -> np.ndarray:
    """The analytic dose (Gy) at LPS points ``p`` (..., 3): linear, so that linear interpolation reproduces it."""
    return 20.0 + 0.1 * p[..., 0] - 0.05 * p[..., 1] + 0.02 * p[..., 2]


def _base(modality: str, sop_class: str, **uids) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = sop_class, meta.MediaStorageSOPInstanceUID
    ds.Modality = modality
    ds.PatientName, ds.PatientID = NAME, PID
    ds.StudyInstanceUID = uids.get("study") or generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.FrameOfReferenceUID = uids.get("frame") or generate_uid()
    ds.SeriesNumber = uids.get("number", 900)
    return ds


def write_dose(path: Path, *, ipp, iop, spacing, offsets, rows: int = 6, cols: int = 5, scaling: float = 2e-5,
               units: str = "GY", written_offsets=None, study=None, frame=None, drop=()) -> np.ndarray:
    """An RTDOSE at ``path`` holding :func:`dose_gy` at each voxel centre, stored as uint32 dose / ``scaling``.

    ``offsets`` are the frames' distances from ``ipp`` along row x column; ``written_offsets`` what goes into
    GridFrameOffsetVector when it differs (absolute form, or a damaged header). Returns the stored values
    (frames, rows, columns)."""
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(r, c)
    jj, ii = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    frames = []
    for off in offsets:
        p = (np.array(ipp, float) + ii[..., None] * spacing[1] * r + jj[..., None] * spacing[0] * c
             + off * normal)
        frames.append(np.round(dose_gy(p) / scaling))
    stored = np.array(frames).astype(np.uint32)
    ds = _base("RTDOSE", RT_DOSE_STORAGE, study=study, frame=frame)
    ds.ImagePositionPatient = [float(v) for v in ipp]
    ds.ImageOrientationPatient = [float(v) for v in iop]
    ds.PixelSpacing = [float(v) for v in spacing]
    ds.GridFrameOffsetVector = [float(v) for v in (offsets if written_offsets is None else written_offsets)]
    ds.FrameIncrementPointer = 0x3004000C
    ds.NumberOfFrames = len(offsets)
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 32
    ds.HighBit, ds.PixelRepresentation = 31, 0
    ds.DoseGridScaling = f"{scaling:.6g}"
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = units, "PHYSICAL", "PLAN"
    ds.PixelData = stored.astype("<u4").tobytes()
    for kw in drop:
        delattr(ds, kw)
    ds.save_as(path, enforce_file_format=True)
    return stored


def _affine(ipp, iop, spacing, first: float, step: float) -> np.ndarray:
    """The LPS affine of a grid whose first frame lies ``first`` mm along the normal from ``ipp``."""
    r, c = np.array(iop[:3], float), np.array(iop[3:], float)
    normal = np.cross(r, c)
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 2] = r * spacing[1], c * spacing[0], normal * step
    aff[:3, 3] = np.array(ipp, float) + first * normal
    return aff


def _world(vol) -> np.ndarray:
    """LPS position of every voxel centre of ``vol`` (..., 3)."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in vol.shape], indexing="ij"), axis=-1).astype(float)
    return idx @ vol.affine[:3, :3].T + vol.affine[:3, 3]


def _load(path, **kw):
    """(volume, MedfuseWarning texts)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        vol = load_dicom(path, **kw)
    return vol, [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)]


# ---------------------------------------------------------------------------- values and geometry
def test_oblique_dose_grid_loads_in_gy_at_its_world_positions(tmp_path):
    ipp, spacing, offsets = [12.0, -30.0, 45.0], [2.5, 2.0], [0.0, 3.0, 6.0, 9.0]
    stored = write_dose(tmp_path / "dose.dcm", ipp=ipp, iop=OBLIQUE, spacing=spacing, offsets=offsets)
    vol, said = _load(tmp_path / "dose.dcm")
    assert said == []
    assert vol.unit == "Gy" and vol.modality == "unknown"
    assert vol.shape == (5, 6, 4)  # columns, rows, frames
    np.testing.assert_allclose(vol.affine, _affine(ipp, OBLIQUE, spacing, 0.0, 3.0), rtol=0, atol=1e-12)
    np.testing.assert_allclose(vol.affine[:3, 2], 3.0 * OBLIQUE_NORMAL, atol=1e-12)
    # dose = stored x DoseGridScaling, exactly as stored (float64), and within half a step of the analytic dose
    np.testing.assert_array_equal(vol.array, stored.transpose(2, 1, 0) * 2e-5)
    assert np.max(np.abs(vol.array - dose_gy(_world(vol)))) <= 1e-5 + 1e-12
    assert vol.provenance["reader"] == "medfuse.dicom"


def test_decreasing_offsets_are_sorted_along_the_normal(tmp_path):
    """Offsets 0, -3, -6, -9 (a planning system that steps towards the feet): the grid starts at the last frame."""
    ipp, spacing = [12.0, -30.0, 45.0], [2.5, 2.0]
    write_dose(tmp_path / "dose.dcm", ipp=ipp, iop=OBLIQUE, spacing=spacing, offsets=[0.0, -3.0, -6.0, -9.0])
    vol, _ = _load(tmp_path / "dose.dcm")
    np.testing.assert_allclose(vol.affine, _affine(ipp, OBLIQUE, spacing, -9.0, 3.0), rtol=0, atol=1e-12)
    assert np.max(np.abs(vol.array - dose_gy(_world(vol)))) <= 1e-5 + 1e-12


def test_absolute_and_relative_offsets_give_the_same_grid(tmp_path):
    """PS3.3 C.8.8.3.2: an axial grid may list the frames' z (the first one ImagePositionPatient's) instead of
    their distances from the first frame."""
    ipp, spacing, rel = [-40.25, -50.5, -60.0], [2.5, 3.0], [0.0, 2.5, 5.0, 7.5, 10.0]
    write_dose(tmp_path / "rel.dcm", ipp=ipp, iop=AXIAL, spacing=spacing, offsets=rel)
    write_dose(tmp_path / "abs.dcm", ipp=ipp, iop=AXIAL, spacing=spacing, offsets=rel,
               written_offsets=[-60.0 + o for o in rel])
    a, _ = _load(tmp_path / "rel.dcm")
    b, said = _load(tmp_path / "abs.dcm")
    assert said == []
    np.testing.assert_allclose(b.affine, np.array([[3.0, 0, 0, -40.25], [0, 2.5, 0, -50.5], [0, 0, 2.5, -60.0],
                                                   [0, 0, 0, 1]]), rtol=0, atol=1e-12)
    np.testing.assert_array_equal(a.affine, b.affine)
    np.testing.assert_array_equal(a.array, b.array)
    assert np.max(np.abs(b.array - dose_gy(_world(b)))) <= 1e-5 + 1e-12


def test_uneven_offsets_keep_the_finest_frames_as_stored(tmp_path):
    """5 mm frames, a 2 mm run starting 2.5 mm after them, 5 mm again: loaded on the 2 mm run's grid (with the
    uneven-spacing warning), its frames as stored and the others interpolated linearly (exact for a linear dose
    up to the storage step)."""
    offsets = [0.0, 5.0, 10.0, 12.5, 14.5, 16.5, 18.5, 23.5, 28.5]
    ipp, spacing = [-40.25, -50.5, -60.0], [2.5, 3.0]
    stored = write_dose(tmp_path / "dose.dcm", ipp=ipp, iop=AXIAL, spacing=spacing, offsets=offsets)
    vol, said = _load(tmp_path / "dose.dcm")
    assert any("uneven slice spacing" in t and "in runs with no gap" in t for t in said), said
    # from 0.5 mm (12.5 - 6 x 2) to 28.5 mm in 2 mm steps
    assert vol.shape[2] == 15
    np.testing.assert_allclose(vol.affine, _affine(ipp, AXIAL, spacing, 0.5, 2.0), rtol=0, atol=1e-9)
    for m, frame in enumerate(range(3, 7)):  # the 2 mm frames at 12.5..18.5 mm: grid slices 6..9
        np.testing.assert_array_equal(vol.array[:, :, 6 + m], stored[frame].T * 2e-5)
    assert np.max(np.abs(vol.array - dose_gy(_world(vol)))) <= 2e-5


def test_a_missing_frame_is_refused_as_missing_slices(tmp_path):
    write_dose(tmp_path / "dose.dcm", ipp=[0.0, 0.0, 0.0], iop=AXIAL, spacing=[2.0, 2.0],
               offsets=[0.0, 2.0, 4.0, 6.0, 14.0])
    with pytest.raises(GeometryError, match="slices are missing") as e:
        load_dicom(tmp_path / "dose.dcm")
    assert e.value.fix


def test_relative_dose_of_pydicoms_test_file_loads_as_arbitrary_with_a_warning(tmp_path):
    """pydicom's own RTDOSE test file (DoseUnits RELATIVE, DoseGridScaling 1e-6, 15 frames 5 mm apart)."""
    src = Path(pydicom.data.get_testdata_file("rtdose.dcm"))
    shutil.copy(src, tmp_path / "rtdose.dcm")
    ds = pydicom.dcmread(src)
    vol, said = _load(tmp_path / "rtdose.dcm")
    assert vol.unit == "arbitrary"
    assert any("DoseUnits is RELATIVE, not GY" in t for t in said), said
    ipp = [float(v) for v in ds.ImagePositionPatient]
    np.testing.assert_allclose(vol.affine, np.array([[10.0, 0, 0, ipp[0]], [0, 10.0, 0, ipp[1]],
                                                     [0, 0, 5.0, ipp[2]], [0, 0, 0, 1]]), rtol=0, atol=1e-9)
    np.testing.assert_allclose(vol.array, ds.pixel_array.transpose(2, 1, 0) * 1e-6, rtol=1e-12)


# ---------------------------------------------------------------------------- with a CT
def _ct_and_dose(folder: Path) -> np.ndarray:
    """The sample CT (40 axial slices, 4 mm) and an axial dose in its frame of reference in one folder."""
    if not SAMPLE_CT.is_dir():
        pytest.skip("no sample_volumes/ct beside the package")
    shutil.copytree(SAMPLE_CT, folder)
    ct = pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)
    return write_dose(folder / "RD.dose.dcm", ipp=[-40.25, -50.5, -60.0], iop=AXIAL, spacing=[2.5, 3.0],
                      offsets=[3.0 * k for k in range(30)], rows=20, cols=25, study=ct.StudyInstanceUID,
                      frame=ct.FrameOfReferenceUID, written_offsets=[-60.0 + 3.0 * k for k in range(30)])


def test_folder_with_a_ct_and_a_dose_loads_the_ct_and_lists_both(tmp_path):
    _ct_and_dose(tmp_path / "plan")
    listed = scan(tmp_path / "plan")
    assert sorted((s.modality, s.shape, s.n_volumes, s.n_files) for s in listed) == [
        ("CT", (160, 192, 40), 1, 40), ("RTDOSE", (25, 20, 30), 1, 1)]
    ct, said = _load(tmp_path / "plan")  # no choice: the one image series, as before doses were read
    assert ct.modality == "CT" and ct.unit == "HU" and ct.shape == (160, 192, 40)
    assert any("also holds 1 RT dose grid (RTDOSE), not loaded" in t and "series_uid='RTDOSE'" in t
               for t in said), said
    assert all(NAME not in t and PID not in t for t in said)
    assert medfuse.load(tmp_path / "plan", series_uid="CT").modality == "CT"
    dose = medfuse.load(tmp_path / "plan", series_uid="RTDOSE")
    assert dose.unit == "Gy" and dose.shape == (25, 20, 30)
    number = next(i for i, s in enumerate(listed, start=1) if s.modality == "RTDOSE")
    np.testing.assert_array_equal(load_dicom(tmp_path / "plan", series_uid=str(number)).array, dose.array)


def test_dose_resampled_onto_the_ct_gives_the_dose_at_each_ct_voxel(tmp_path):
    """The dose shares the CT's frame of reference: resampled onto the CT grid (no registration), every CT voxel
    inside the dose grid holds the analytic dose at its own world position."""
    _ct_and_dose(tmp_path / "plan")
    ct = medfuse.load(tmp_path / "plan", series_uid="CT")
    dose = medfuse.load(tmp_path / "plan", series_uid="RTDOSE")
    assert dose.provenance["frame_of_reference_uid"] == ct.provenance["frame_of_reference_uid"]
    on_ct = medfuse.resample(dose, ct)
    assert on_ct.unit == "Gy" and on_ct.shape == ct.shape
    p = _world(ct)
    idx = (p - dose.affine[:3, 3]) @ np.linalg.inv(dose.affine[:3, :3]).T  # continuous dose voxel index
    inside = np.all((idx >= -1e-6) & (idx <= np.array(dose.shape) - 1 + 1e-6), axis=-1)
    assert inside.sum() > 10000
    np.testing.assert_allclose(on_ct.array[inside], dose_gy(p[inside]), atol=2e-4)
    # no dose a voxel or more outside the grid (ITK samples up to half a voxel beyond the outer voxel centres)
    far = np.any((idx < -1) | (idx > np.array(dose.shape)), axis=-1)
    assert far.sum() > 100000 and np.all(on_ct.array[far] == 0)


# ---------------------------------------------------------------------------- refused
@pytest.mark.parametrize("damage, error, words", [
    ({"drop": ("GridFrameOffsetVector",)}, GeometryError, "but no GridFrameOffsetVector"),
    ({"written_offsets": [0.0, 3.0, 6.0]}, GeometryError, "lists 3 offsets for the dose grid's 4 frames"),
    ({"written_offsets": [0.0, 3.0, 3.0, 9.0]}, GeometryError, "does not vary monotonically"),
    ({"written_offsets": [7.0, 10.0, 13.0, 16.0]}, GeometryError, "starts at 7 mm"),
    ({"drop": ("DoseGridScaling",)}, UnreadableFileError, "DoseGridScaling (3004,000E) of the RT dose is missing"),
])
def test_a_damaged_dose_header_is_refused_with_a_fix(tmp_path, damage, error, words):
    write_dose(tmp_path / "dose.dcm", ipp=[12.0, -30.0, 45.0], iop=OBLIQUE, spacing=[2.5, 2.0],
               offsets=[0.0, 3.0, 6.0, 9.0], **damage)
    with pytest.raises(error) as e:
        load_dicom(tmp_path / "dose.dcm")
    assert isinstance(e.value, MedfuseError) and words in str(e.value), str(e.value)
    assert "export the dose again" in e.value.fix
    # listed all the same (as a series that does not form a volume), so that the folder can still be chosen from
    assert [(s.modality, s.shape[2]) for s in scan(tmp_path)] == [("RTDOSE", 0)]


def test_absolute_offsets_of_an_oblique_grid_are_refused(tmp_path):
    """Absolute offsets are defined for axial grids only: on an oblique one, 45 mm first is ambiguous."""
    write_dose(tmp_path / "dose.dcm", ipp=[12.0, -30.0, 45.0], iop=OBLIQUE, spacing=[2.5, 2.0],
               offsets=[0.0, 3.0], written_offsets=[45.0, 48.0])
    with pytest.raises(GeometryError, match="only for an axial grid"):
        load_dicom(tmp_path / "dose.dcm")


def test_rt_structure_set_and_dvh_only_dose_stay_refused(tmp_path):
    ss = _base("RTSTRUCT", RT_STRUCT_STORAGE)
    ss.save_as(tmp_path / "rs.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedDataError, match=r"RTSTRUCT: an RT structure set \(contours\)") as e:
        load_dicom(tmp_path / "rs.dcm")
    assert e.value.fix
    dvh = _base("RTDOSE", RT_DOSE_STORAGE)
    dvh.DoseUnits, dvh.DoseSummationType = "GY", "PLAN"
    dvh.save_as(tmp_path / "dvh.dcm", enforce_file_format=True)
    with pytest.raises(UnsupportedDataError, match="without a dose grid"):
        load_dicom(tmp_path / "dvh.dcm")
    with pytest.raises(UnsupportedDataError, match="no image series"):
        scan(tmp_path)
