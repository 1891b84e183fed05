"""Header values that cannot be right: refused with the tag named (never loaded as NaN, zeros or a mirror image).

Synthetic series written with pydicom in tmp_path, as in test_dicom.py; PET weights through the SUV module.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.tag import Tag
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfuse.errors import GeometryError, MedfuseWarning, SUVError, UnreadableFileError
from medfuse.io.dicom import load_dicom, scan
from medfuse.io.suv import WEIGHT_RANGE_KG, header_from_dataset, suv_factor, suv_problem

FAKE_NAME = "Zzyzx^Quentavious"
FAKE_ID = "PID-8675309"


def _write_slice(path: Path, *, arr, z, uid, number, extra=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID = FAKE_NAME, FAKE_ID
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.InstanceNumber = "CT", uid, "1.2.3.4", number
    ds.ImagePositionPatient = [10.0, 20.0, 2.5 * z]
    ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
    ds.PixelSpacing = [0.5, 0.5]
    ds.SliceThickness = 2.5
    ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    with warnings.catch_warnings():  # pydicom's own complaints about the bad values written on purpose
        warnings.simplefilter("ignore")
        for k, v in (extra or {}).items():
            setattr(ds, k, v)
        ds.save_as(str(path), enforce_file_format=True)


def _series(folder: Path, n=5, *, bad=None, bad_slices=(2,)):
    """n slices 2.5 mm apart (f000.dcm ...); ``bad`` header values go into the slices ``bad_slices``."""
    folder.mkdir(parents=True, exist_ok=True)
    uid = generate_uid()
    data = np.arange(n * 6 * 7).reshape(n, 6, 7) % 500 + 1000
    for k in range(n):
        _write_slice(folder / f"f{k:03d}.dcm", arr=data[k], z=k, uid=uid, number=k + 1,
                     extra=bad if k in bad_slices else None)
    return data


def _no_phi(text: str):
    assert "Zzyzx" not in text and FAKE_ID not in text


# ---------------------------------------------------------------------------- 1. rescale slope/intercept
@pytest.mark.parametrize("tag,value,words", [
    ("RescaleSlope", "NaN", "RescaleSlope is not a finite number"),
    ("RescaleSlope", "inf", "RescaleSlope is not a finite number"),
    ("RescaleSlope", 0.0, "RescaleSlope is 0"),
    ("RescaleIntercept", "NaN", "RescaleIntercept is not a finite number"),
])
def test_rescale_that_cannot_be_right_is_refused_naming_the_tag(tmp_path, tag, value, words):
    # A NaN slope loaded as an all-NaN volume and a zero slope as all zeros, without a word.
    _series(tmp_path / "s", bad={tag: value})
    for path in (tmp_path / "s", tmp_path / "s" / "f002.dcm"):
        with pytest.raises(UnreadableFileError, match=words) as e, warnings.catch_warnings():
            warnings.simplefilter("ignore", MedfuseWarning)  # "loaded alone" for the single file
            load_dicom(path)
        assert e.value.fix and "export the series again" in e.value.fix
        assert e.value.path.endswith("f002.dcm")
        _no_phi(str(e.value))
    # scan still lists the series (load says why)
    assert [info.n_volumes for info in scan(tmp_path / "s")] == [0]


def test_ordinary_rescale_still_loads(tmp_path):
    data = _series(tmp_path / "s", bad={"RescaleSlope": 2.0, "RescaleIntercept": 5.0}, bad_slices=range(5))
    vol = load_dicom(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)) * 2.0 + 5.0)


# ---------------------------------------------------------------------------- 2. plane geometry
@pytest.mark.parametrize("spacing,words", [
    ([-1.0, 1.0], "zero or negative"), ([0.0, 0.0], "zero or negative"), ([1.0, -0.5], "zero or negative"),
    (["NaN", 1.0], "not finite"),
])
def test_pixel_spacing_that_is_not_positive_is_refused(tmp_path, spacing, words):
    # [-1, 1] loaded as a mirrored image; [0, 0] was refused with NIfTI advice (pixdim/sform/qform).
    _series(tmp_path / "s", bad={"PixelSpacing": spacing}, bad_slices=range(5))
    with pytest.raises(GeometryError, match=f"PixelSpacing .*{words}") as e:
        load_dicom(tmp_path / "s")
    assert "pixdim" not in str(e.value) and "export the series again" in e.value.fix
    _no_phi(str(e.value))


@pytest.mark.parametrize("iop,words", [
    ([0.0] * 6, "not a unit vector"),
    ([1.0, 0.0, 0.0, 1.0, 0.0, 0.0], "not perpendicular"),
    ([1.0, "NaN", 0.0, 0.0, 1.0, 0.0], "not finite"),
    ([2.0, 0.0, 0.0, 0.0, 1.0, 0.0], "not a unit vector"),
])
@pytest.mark.parametrize("slices", [range(5), (2,)])
def test_orientation_that_is_not_two_perpendicular_unit_vectors_is_refused(tmp_path, iop, words, slices):
    # NaN gave "the series mixes 1 slice orientations", zeros and parallel vectors a singular affine.
    _series(tmp_path / "s", bad={"ImageOrientationPatient": iop}, bad_slices=slices)
    with pytest.raises(GeometryError, match=f"ImageOrientationPatient .*{words}") as e:
        load_dicom(tmp_path / "s")
    assert "mixes" not in str(e.value) and "export the series again" in e.value.fix
    assert e.value.path.endswith("f000.dcm" if len(slices) == 5 else "f002.dcm")


def test_orientation_rounded_by_the_scanner_still_loads(tmp_path):
    # Real headers write the cosines to a few decimals: their norm is 1 only within rounding, and the spacing
    # is the PixelSpacing, not the PixelSpacing times that norm.
    _series(tmp_path / "s", bad={"ImageOrientationPatient": [0.999999, 0.0, 0.0, 0.0, 1.000001, 0.0]},
            bad_slices=range(5))
    vol = load_dicom(tmp_path / "s")
    np.testing.assert_allclose(np.linalg.norm(vol.affine[:3, :2], axis=0), [0.5, 0.5], atol=1e-9)


# ---------------------------------------------------------------------------- 3. empty files
def test_empty_slice_file_is_named_never_interpolated(tmp_path):
    # The empty file was skipped as not DICOM and its slice interpolated with a warning that did not name it.
    _series(tmp_path / "s")
    (tmp_path / "s" / "f002.dcm").write_bytes(b"")
    with pytest.raises(UnreadableFileError, match=r"could not be read \(damaged, truncated, empty.*f002\.dcm") as e:
        load_dicom(tmp_path / "s")
    assert "remove the damaged files" in e.value.fix


def test_empty_file_beside_a_complete_series_is_named_in_a_warning(tmp_path):
    data = _series(tmp_path / "s")
    (tmp_path / "s" / "f005.dcm").write_bytes(b"")  # an end slice lost in the copy leaves no gap
    with pytest.warns(MedfuseWarning, match=r"1 DICOM file.*could not be read.*f005\.dcm") as rec:
        vol = load_dicom(tmp_path / "s")
    assert not [w for w in rec if "uneven slice spacing" in str(w.message)]
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)).astype(int) - 1024)
    assert any("f005.dcm" in w for w in vol.provenance["warnings"])


# ---------------------------------------------------------------------------- 7. PatientWeight
def _pet_header(weight):
    h = {"Units": "BQML", "DecayCorrection": "ADMIN", "CorrectedImage": ["ATTN", "DECY"],
         "RadionuclideTotalDose": 3.7e8, "RadionuclideHalfLife": 6586.2}
    if weight is not None:
        h["PatientWeight"] = weight
    return h


def test_plausible_weights_give_the_factor():
    for w in (WEIGHT_RANGE_KG[0], 0.025, 3.2, 70, "70", 250.5, WEIGHT_RANGE_KG[1]):  # 0.025: a mouse
        assert suv_factor(_pet_header(w)) == pytest.approx(float(w) * 1000 / 3.7e8)


@pytest.mark.parametrize("weight,words", [
    (None, "is missing"), ("", "is missing"), (0, "is zero"), (-70.0, "is negative"), ("-70", "is negative"),
    (True, "is not a number"), ("Smith^John", "is not a number"), (math.nan, "is not a number"),
    (math.inf, "is infinite"), (7000, "is outside the plausible"), (70000.0, "is outside the plausible"),
    (0.005, "is outside the plausible"),
])
@pytest.mark.parametrize("units", ["BQML", "GML"])
def test_weight_that_cannot_be_right_is_named_accurately(weight, words, units):
    # 7000 kg and True gave a factor; a negative weight and text were reported as "missing or zero".
    h = {**_pet_header(weight), "Units": units, "PatientSize": 1.75, "PatientSex": "M"}
    with pytest.raises(SUVError, match=f"PatientWeight {words}") as e:
        suv_factor(h, kind="bw" if units == "BQML" else "lbm")
    assert "Smith" not in str(e.value) and "7000" not in str(e.value)
    assert e.value.fix and "kg" in e.value.fix


def test_weight_text_in_a_dicom_header_is_not_a_number_not_missing():
    ds = Dataset()
    ds[0x00101030] = RawDataElement(Tag(0x00101030), "DS", 6, b"Smith ", 0, False, True)
    h = {**_pet_header(None), **header_from_dataset(ds)}
    problem = suv_problem(h)
    assert problem.startswith("PatientWeight is not a number") and "Smith" not in problem
    assert header_from_dataset(pydicom.Dataset()) == {}
