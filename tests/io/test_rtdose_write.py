"""A volume in Gy is written to DICOM as an RT Dose object, which keeps the unit.

Before: it went out as an OT (Secondary Capture) series with a warning that its unit 'Gy' was lost and a hint to
make it a CT or PET. Now it is one multi-frame RT Dose (RT Dose Storage): ImagePositionPatient of the first frame,
GridFrameOffsetVector, DoseUnits GY, uint32 pixels times DoseGridScaling; medfuse reads it back on the same grid
(to 1e-4 mm), in Gy, within DoseGridScaling / 2 of the voxels written. The doses are a known linear function of
the world position, so that values and geometry are checked together.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pydicom
from pydicom import config

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.dicom_writer import write_dicom_series
from medfuse.volume import Volume
from tests.io.test_dicom_rtdose import OBLIQUE, _load, _world, dose_gy, write_dose

RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"


def _oblique_affine(left_handed: bool = False) -> np.ndarray:
    c, s = np.cos(np.radians(25.0)), np.sin(np.radians(25.0))
    rot = np.array([[c, -s, 0.0], [s * 0.8, c * 0.8, -0.6], [s * 0.6, c * 0.6, 0.8]])  # orthonormal columns
    aff = np.eye(4)
    aff[:3, :3] = rot @ np.diag([2.5, 3.0, -2.0 if left_handed else 2.0])
    aff[:3, 3] = [-101.234567, 48.75, -30.125]
    return aff


def _dose_volume(affine: np.ndarray, shape=(9, 7, 6)) -> Volume:
    vol = Volume(np.zeros(shape, np.float32), affine, modality="unknown", unit="Gy")
    return vol.with_array(dose_gy(_world(vol)).astype(np.float32))  # 5 .. 8 Gy: all above 0


def _written(folder: Path):
    files = sorted(folder.iterdir())
    assert [f.name for f in files] == ["RD00001.dcm"]  # one multi-frame object
    return pydicom.dcmread(files[0])


def _write(vol: Volume, folder: Path, **kw) -> list:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        write_dicom_series(vol, folder, **kw)
    return [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)]


def test_gy_volume_is_written_as_an_rt_dose_and_reads_back_on_its_grid_in_gy(tmp_path):
    vol = _dose_volume(_oblique_affine())
    assert float(vol.array.min()) > 0
    assert _write(vol, tmp_path / "dose") == []  # no word of a lost unit any more
    ds = _written(tmp_path / "dose")
    assert (ds.SOPClassUID, ds.file_meta.MediaStorageSOPClassUID, ds.Modality) == (RT_DOSE_STORAGE,
                                                                                  RT_DOSE_STORAGE, "RTDOSE")
    assert (ds.DoseUnits, ds.DoseType, ds.DoseSummationType) == ("GY", "PHYSICAL", "PLAN")
    assert (ds.NumberOfFrames, ds.Rows, ds.Columns) == (6, 7, 9)
    assert (ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation) == (32, 32, 31, 0)
    assert ds.FrameIncrementPointer == 0x3004000C
    np.testing.assert_allclose([float(v) for v in ds.GridFrameOffsetVector], 2.0 * np.arange(6), atol=1e-9)
    np.testing.assert_allclose([float(v) for v in ds.ImagePositionPatient], vol.affine[:3, 3], atol=1e-6)
    scaling = float(ds.DoseGridScaling)
    assert int(ds.pixel_array.max()) <= (1 << 32) - 1 and scaling * ((1 << 32) - 1) >= float(vol.array.max())

    back, notes = _load(tmp_path / "dose")
    assert notes == []
    assert (back.unit, back.modality, back.shape) == ("Gy", "unknown", vol.shape)
    np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=1e-4)
    err = np.abs(back.array.astype(np.float64) - vol.array.astype(np.float64))
    # float32 voxels on either side add their own rounding (9 Gy x 2^-24, about 5e-7 Gy) to the quantisation.
    assert float(err.max()) <= scaling / 2 + 1e-6


def test_left_handed_grid_reads_back_at_the_same_world_positions(tmp_path):
    vol = _dose_volume(_oblique_affine(left_handed=True))
    _write(vol, tmp_path / "dose")
    ds = _written(tmp_path / "dose")
    offsets = [float(v) for v in ds.GridFrameOffsetVector]
    assert offsets == sorted(offsets) and offsets[0] == 0.0  # relative and increasing: from the last slice
    back, _ = _load(tmp_path / "dose")
    # The reader stacks frames along row x column: the same voxels at the same places, k in the other order.
    np.testing.assert_allclose(_world(back), _world(vol)[:, :, ::-1], rtol=0, atol=1e-4)
    np.testing.assert_allclose(back.array, vol.array[:, :, ::-1], rtol=0, atol=float(ds.DoseGridScaling) / 2 + 1e-6)


def test_a_loaded_rt_dose_keeps_its_summation_type_and_plan_through_a_write(tmp_path):
    src = tmp_path / "in" / "RD.dcm"
    src.parent.mkdir()
    write_dose(src, ipp=[-20.0, 30.0, 40.0], iop=OBLIQUE, spacing=[2.5, 3.0], offsets=[0.0, 2.0, 4.0, 6.0])
    ds = pydicom.dcmread(src)
    ds.DoseSummationType = "FRACTION"
    plan = pydicom.Dataset()
    plan.ReferencedSOPClassUID, plan.ReferencedSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.481.5", "1.2.3.4.5.6"
    ds.ReferencedRTPlanSequence = pydicom.Sequence([plan])
    ds.save_as(src, enforce_file_format=True)
    vol, _ = _load(src.parent)
    before = src.read_bytes()
    _write(vol, tmp_path / "out")
    assert src.read_bytes() == before  # the input is never touched
    out = _written(tmp_path / "out")
    assert out.DoseSummationType == "FRACTION"
    ref = out.ReferencedRTPlanSequence[0]
    # De-identified: the plan's UID is replaced by its pseudonym, as every UID copied into the output is.
    assert ref.ReferencedSOPClassUID == plan.ReferencedSOPClassUID
    assert ref.ReferencedSOPInstanceUID != "1.2.3.4.5.6"
    assert "Doe" not in str(out.get("PatientName", "")) and "MRN" not in str(out.get("PatientID", ""))
    back, _ = _load(tmp_path / "out")
    np.testing.assert_allclose(back.affine, vol.affine, rtol=0, atol=1e-4)
    np.testing.assert_allclose(back.array, dose_gy(_world(vol)), rtol=0, atol=float(out.DoseGridScaling) / 2 + 2e-5)


def test_written_rt_dose_reads_without_pydicom_validation_errors(tmp_path):
    _write(_dose_volume(_oblique_affine()), tmp_path / "dose")
    path = next((tmp_path / "dose").iterdir())
    mode = config.settings.reading_validation_mode
    config.settings.reading_validation_mode = config.RAISE
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            ds = pydicom.dcmread(path)
            for elem in ds.iterall():  # values are validated as they are decoded
                _ = elem.value
            ds.pixel_array
    finally:
        config.settings.reading_validation_mode = mode


def test_negative_doses_are_stored_as_zero_with_a_warning(tmp_path):
    vol = _dose_volume(_oblique_affine())
    arr = vol.array.copy()
    arr[0, 0, 0] = -0.25  # a B-spline's overshoot beside a steep dose edge
    notes = _write(vol.with_array(arr), tmp_path / "dose")
    assert len(notes) == 1 and "-0.25 Gy" in notes[0] and "stored as 0 Gy" in notes[0]
    back, _ = _load(tmp_path / "dose")
    assert back.array[0, 0, 0] == 0.0


def test_save_by_name_writes_an_rt_dose(tmp_path):
    medfuse.save(_dose_volume(_oblique_affine()), tmp_path / "dose_out")
    assert _written(tmp_path / "dose_out").Modality == "RTDOSE"
