"""DICOM reader: real dcm2niix-referenced data in ../shared and synthetic series written with pydicom."""

from __future__ import annotations

import json
import random
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import pytest
from nibabel import orientations as nio
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

from medfuse.errors import (GeometryError, InvalidInputError, MedfuseWarning, MultipleSeriesError, UnreadableFileError,
                            UnsupportedDataError)
from medfuse.io.dicom import load_dicom, load_dicom_volumes, scan

FAKE_NAME = "Zzyzx^Quentavious"
FAKE_ID = "PID-8675309"


# ---------------------------------------------------------------------------- helpers
def _aligned(vol, ref):
    """Our volume's voxels and RAS affine, flipped/permuted to the reference's axis order."""
    ras = vol.affine_ras
    t = nio.ornt_transform(nio.io_orientation(ras), nio.io_orientation(ref.affine))
    return nio.apply_orientation(vol.array, t), ras @ nio.inv_ornt_aff(t, vol.array.shape)


def _check_against_ref(vols, ref_path, *, scale=1.0, rtol=0.0):
    ref = nib.load(str(ref_path))
    r = np.asanyarray(ref.dataobj).astype(float) * scale
    nvol = 1 if r.ndim == 3 else r.shape[3]
    assert len(vols) == nvol
    for vi, v in enumerate(vols):
        rr = r if r.ndim == 3 else r[..., vi]
        a, aff = _aligned(v, ref)
        assert a.shape == rr.shape
        np.testing.assert_allclose(aff, ref.affine, atol=1e-3)
        if rtol:
            assert np.abs(a - rr).max() <= rtol * np.abs(rr).max()
        else:
            np.testing.assert_array_equal(a.astype(float), rr)


def _sidecar(ref_nii: Path) -> dict:
    return json.loads(ref_nii.with_suffix(".json").read_text())


def _write_slice(path, *, arr, pos, iop=(1, 0, 0, 0, 1, 0), series_uid, modality="CT", number=1,
                 spacing=(0.5, 0.5), slope=1.0, intercept=-1024.0, description="synthetic", extra=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = FAKE_NAME, FAKE_ID, "19010101"
    ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID = modality, series_uid, "1.2.3.4"
    ds.SeriesDescription, ds.InstanceNumber = description, number
    ds.ImagePositionPatient = [float(x) for x in pos]
    ds.ImageOrientationPatient = [float(x) for x in iop]
    ds.PixelSpacing = [float(spacing[0]), float(spacing[1])]
    ds.SliceThickness = 1.0
    ds.RescaleSlope, ds.RescaleIntercept = slope, intercept
    ds.Rows, ds.Columns = arr.shape
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = arr.astype(np.uint16).tobytes()
    for k, v in (extra or {}).items():
        setattr(ds, k, v)
    ds.save_as(str(path), enforce_file_format=True)


def _series(folder: Path, *, n=6, z=None, shuffle=True, uid=None, rows=8, cols=10, iop=(1, 0, 0, 0, 1, 0),
            xshift=0.0, **kw):
    folder.mkdir(parents=True, exist_ok=True)
    uid = uid or generate_uid()
    z = list(range(n)) if z is None else z
    data = np.arange(rows * cols * len(z)).reshape(len(z), rows, cols) % 2000 + 1000
    names = [f"f{i:03d}.dcm" for i in range(len(z))]
    if shuffle:
        random.Random(1).shuffle(names)
    for i, zz in enumerate(z):
        _write_slice(folder / names[i], arr=data[i], pos=(10.0 + xshift * zz, 20.0, 2.5 * zz), iop=iop,
                     series_uid=uid, number=i + 1, **kw)
    return uid, data


def _no_phi(text: str):
    assert FAKE_NAME not in text and "Zzyzx" not in text and FAKE_ID not in text and "19010101" not in text


# ---------------------------------------------------------------------------- real data
@pytest.mark.parametrize("n", range(1, 10))
def test_transfer_syntaxes_match_dcm2niix(shared, n):
    base = shared("data", "dicom", "qa-transfer-syntaxes")
    f = base / "In" / f"{n}.dcm"
    vol = load_dicom(f)
    assert vol.provenance["transfer_syntax"] == str(pydicom.dcmread(f, stop_before_pixels=True).file_meta.TransferSyntaxUID)
    _check_against_ref([vol], base / "Ref" / f"{n}.nii")
    # Big-endian files (3.dcm) come out in native byte order, so ITK can resample and save them.
    assert vol.array.dtype.isnative
    from medfuse.registration.resample import resample

    assert resample(vol, vol).same_grid(vol)


def test_transfer_syntaxes_cover_compressed_and_uncompressed(shared):
    """The 9 files use 7 transfer syntax UIDs (5/6 and 7/8 share JPEG Lossless and JPEG-LS UIDs)."""
    base = shared("data", "dicom", "qa-transfer-syntaxes", "In")
    uids = {str(pydicom.dcmread(p, stop_before_pixels=True).file_meta.TransferSyntaxUID) for p in base.glob("*.dcm")}
    assert {"1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", "1.2.840.10008.1.2.5",
            "1.2.840.10008.1.2.4.70", "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.90"} <= uids


@pytest.mark.parametrize("n", [4, 5, 6, 7])
def test_ge_4d_split_into_10_volumes(shared, n):
    base = shared("data", "dicom", "qa-ge-siemens-epi")
    folder = base / "In" / "20180918GE" / f"mr_000{n}"
    ref = base / "Ref" / f"DCM2NIIX_regression_test_{n}.nii"
    ds = pydicom.dcmread(next(p for p in sorted(folder.iterdir()) if p.suffix == ".dcm"), stop_before_pixels=True)
    assert _sidecar(ref)["SeriesNumber"] == int(ds.SeriesNumber)
    vols = load_dicom_volumes(folder)
    assert len(vols) == 10 and all(v.shape[2] == 15 for v in vols)
    assert [v.provenance["volume_index"] for v in vols] == list(range(10))
    _check_against_ref(vols, ref)
    with pytest.raises(MultipleSeriesError, match="10 volumes"):
        load_dicom(folder)
    assert load_dicom(folder, volume_index=3).provenance["volume_index"] == 3


@pytest.mark.parametrize("n,pe", [(3, "AP"), (4, "PA"), (5, "RL"), (6, "LR")])
def test_siemens_mosaic(shared, n, pe):
    base = shared("data", "dicom", "qa-ge-siemens-epi")
    vols = load_dicom_volumes(base / "In" / "20180918Si" / f"mr_000{n}")
    _check_against_ref(vols, base / "Ref" / f"EPI_PE={pe}_{n}.nii")


def test_philips_private_scaling(shared):
    """dcm2niix's float scaling FP = (SV*RS + RI) / (RS*SS): Ref stores SV with scl_slope = 1/SS."""
    base = shared("data", "dicom", "qa-philips-scaling")
    ref = base / "Ref" / "EPI_asc_CLEAR_201.nii"
    side = _sidecar(ref)
    assert side["UsePhilipsFloatNotDisplayScaling"] == 1 and side["PhilipsRescaleIntercept"] == 0
    vols = load_dicom_volumes(base / "In" / "Magdeburg_2014" / "fmri")
    assert vols[0].provenance["manufacturer"].upper().startswith("PHILIPS")
    assert nib.load(str(ref)).dataobj.slope == pytest.approx(1.0 / side["PhilipsScaleSlope"], rel=1e-5)
    _check_against_ref(vols, ref, rtol=1e-6)
    # display scaling (RS only) would be ~180x smaller: make sure it was not used
    assert vols[0].array.max() > 100 * 2 ** 12


def test_enhanced_siemens_xa10(shared):
    base = shared("data", "dicom", "qa-enhanced-multiframe")
    vols = load_dicom_volumes(base / "In" / "Siemens" / "XA10")
    _check_against_ref(vols, base / "Ref" / "Siemens_REST1_w_SMS_PF7-8_6.nii")


def test_enhanced_philips_two_images(shared):
    base = shared("data", "dicom", "qa-enhanced-multiframe")
    vols = load_dicom_volumes(base / "In" / "Philips" / "IM_0027_fMAP.dcm")
    assert len(vols) == 2
    _check_against_ref([vols[0]], base / "Ref" / "Philips_WIP_B0_NS_801_e1.nii", rtol=1e-4)
    _check_against_ref([vols[1]], base / "Ref" / "Philips_WIP_B0_NS_801_e2_fieldmaphz.nii", rtol=1e-4)


def test_scan_real_folder(shared):
    base = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918GE")
    infos = scan(base)
    assert len(infos) == 4
    assert all(i.shape == (64, 64, 15) and i.n_volumes == 10 and i.modality == "MR" for i in infos)
    with pytest.raises(MultipleSeriesError) as e:
        load_dicom(base)
    # Named without their UIDs (messages reach logs and batch reports); the error and scan() give them, in order.
    assert e.value.choices == [i.series_uid for i in infos]
    assert not any(i.series_uid in str(e.value) for i in infos) and "1: MR" in str(e.value)


# ---------------------------------------------------------------------------- synthetic
def test_many_series_message_lists_the_first_twelve(tmp_path):
    """A PACS export (or the working folder, picked by mistake) can hold hundreds of series: the message names the
    first twelve and says how many more; .choices still has every UID, and a number past twelve still loads."""
    uids = [_series(tmp_path / f"s{k:02d}", n=1, description=f"d{k}")[0] for k in range(15)]
    with pytest.raises(MultipleSeriesError) as e:
        load_dicom(tmp_path)
    msg = str(e.value)
    assert "holds 15 series" in msg and "12: CT" in msg and "13: CT" not in msg and "and 3 more" in msg
    assert e.value.choices == [i.series_uid for i in scan(tmp_path)] and len(set(e.value.choices)) == 15
    assert load_dicom(tmp_path, series_uid="14").provenance["series_uid"] == e.value.choices[13]
    assert set(uids) == set(e.value.choices)


def test_shuffled_names_sort_by_position_ct_hu(tmp_path):
    uid, data = _series(tmp_path / "s", n=6)
    vol = load_dicom(tmp_path / "s")
    assert vol.modality == "CT" and vol.unit == "HU"
    assert vol.shape == (10, 8, 6)
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)).astype(int) - 1024)
    np.testing.assert_allclose(vol.affine, [[0.5, 0, 0, 10], [0, 0.5, 0, 20], [0, 0, 2.5, 0], [0, 0, 0, 1]])
    assert vol.provenance["series_uid"] == uid and vol.provenance["reader"] == "medfuse.dicom"


def test_sagittal_series_sorted_along_normal(tmp_path):
    """Sagittal IOP: normal = row x col = -x; files list positions in a shuffled order."""
    uid, iop = generate_uid(), (0, 1, 0, 0, 0, -1)
    data = np.arange(4 * 8 * 10).reshape(4, 8, 10)
    order = [2, 0, 3, 1]
    for n, k in enumerate(order):
        _write_slice(tmp_path / f"{n}.dcm", arr=data[k], pos=(-3.0 * k, 5.0, 7.0), iop=iop, series_uid=uid,
                     number=n + 1)
    vol = load_dicom(tmp_path)
    np.testing.assert_allclose(vol.affine[:3, :3], [[0, 0, -3], [0.5, 0, 0], [0, -0.5, 0]], atol=1e-9)
    np.testing.assert_allclose(vol.affine[:3, 3], [0, 5, 7])
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)).astype(int) - 1024)


def test_two_series_error_lists_both(tmp_path):
    u1, _ = _series(tmp_path / "a", n=3, description="alpha")
    u2, _ = _series(tmp_path / "b", n=3, description="beta", modality="MR")
    with pytest.raises(MultipleSeriesError) as e:
        load_dicom(tmp_path)
    msg = str(e.value)
    assert "3 files in a" in msg and "3 files in b" in msg and "10x8" in msg
    assert "alpha" not in msg and "beta" not in msg  # free text: it may name the patient
    assert u1 not in msg and u2 not in msg and set(e.value.choices) == {u1, u2}
    _no_phi(msg)
    with pytest.raises(InvalidInputError, match="not one of the 2 series") as e:
        load_dicom(tmp_path, series_uid=u1 + "9")
    assert u1 not in str(e.value)
    assert load_dicom(tmp_path, series_uid=u2).modality == "MR"
    infos = {i.series_uid: i for i in scan(tmp_path)}
    assert infos[u1].shape == (10, 8, 3) and infos[u1].n_files == 3 and infos[u2].modality == "MR"


def test_missing_slice_warns_and_keeps_geometry(tmp_path):
    _series(tmp_path / "s", z=[0, 1, 2, 4, 5])
    with pytest.warns(MedfuseWarning, match="uneven slice spacing") as rec:
        vol = load_dicom(tmp_path / "s")
    assert vol.shape[2] == 6
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.5])
    np.testing.assert_allclose(vol.affine[:3, 3], [10, 20, 0])
    assert vol.provenance["resampled"] is True
    for w in rec:
        _no_phi(str(w.message))


def test_two_slice_spacings_are_not_called_missing_slices(tmp_path):
    """8 slices 5 mm apart then 7 slices 4 mm apart have no gap: the warning said "missing slices?" and called
    the steps gaps, while 7 of the 16 new slices are interpolated."""
    _series(tmp_path / "s", z=[0, 2, 4, 6, 8, 10, 12, 14, 15.6, 17.2, 18.8, 20.4, 22.0, 23.6, 25.2])  # x 2.5 mm
    with pytest.warns(MedfuseWarning, match=r"uneven slice spacing: slices 4.00 to 5.00 mm apart \(more than one "
                                            r"spacing.*some of them interpolated, not measured: 7 of 16") as rec:
        load_dicom(tmp_path / "s")
    assert not any("missing" in str(w.message) for w in rec)


@pytest.mark.parametrize("cut", ["in the file meta", "before Rows"])
def test_damaged_slice_file_is_never_replaced_by_an_interpolated_slice(tmp_path, cut):
    # pydicom returns what it read before a truncated file ended, without an error: the slice was skipped as "no
    # image", and the gap it left was filled by interpolation with only the generic "missing slice?" warning, so
    # a made-up slice stood in for a real one that failed to read.
    uid, data = _series(tmp_path / "s", n=6, shuffle=False)
    f = tmp_path / "s" / "f003.dcm"
    raw = f.read_bytes()
    f.write_bytes(raw[:200] if cut == "in the file meta" else raw[:raw.index(b"\x28\x00\x10\x00")])
    assert "Rows" not in pydicom.dcmread(f, stop_before_pixels=True)  # read "fine", as far as pydicom goes
    with pytest.raises(UnreadableFileError, match="cut short"):
        load_dicom(f)
    with pytest.raises(UnreadableFileError, match="1 DICOM file.*could not be read.*f003.dcm") as e:
        load_dicom(tmp_path / "s")
    assert e.value.fix and "remove the damaged files" in e.value.fix
    # Removed by the user, the gap is interpolated as before, with the usual warning.
    f.unlink()
    with pytest.warns(MedfuseWarning, match="uneven slice spacing"):
        assert load_dicom(tmp_path / "s").shape[2] == 6
    # A damaged file that leaves no gap (a copy of a slice, say) is left out with a warning of its own.
    _series(tmp_path / "t", n=4, shuffle=False, uid=uid)
    (tmp_path / "t" / "junk.dcm").write_bytes((tmp_path / "t" / "f000.dcm").read_bytes()[:200])
    with pytest.warns(MedfuseWarning, match="1 DICOM file.*could not be read.*no missing slice"):
        vol = load_dicom(tmp_path / "t")
    np.testing.assert_array_equal(vol.array, np.transpose(data[:4], (2, 1, 0)).astype(int) - 1024)
    assert any("could not be read" in w for w in vol.provenance["warnings"])


def test_large_gap_refused(tmp_path):
    _series(tmp_path / "s", z=[0, 1, 2, 9])
    with pytest.raises(GeometryError, match="missing"):
        load_dicom(tmp_path / "s")


def test_gantry_tilt_detected_and_corrected(tmp_path):
    _series(tmp_path / "s", n=5, xshift=0.5)  # 0.5 mm in x per 2.5 mm in z -> 11.3 degrees
    with pytest.warns(MedfuseWarning, match="gantry tilt"):
        vol = load_dicom(tmp_path / "s")
    assert vol.provenance["tilt_corrected"] is True
    assert vol.provenance["gantry_tilt_deg"] == pytest.approx(np.degrees(np.arctan(0.5 / 2.5)), abs=0.01)
    np.testing.assert_allclose(vol.affine[:3, 2], [0, 0, 2.5])


def test_gantry_tilt_correction_puts_voxels_in_place(tmp_path):
    """A bright column fixed in the world (x = 13 mm) must land on one i index in every corrected slice."""
    uid = generate_uid()
    for k in range(5):
        arr = np.zeros((8, 12), np.uint16)
        arr[:, 6 - k] = 2000  # slice k starts at x = 10 + 0.5 k, pixel 0.5 mm -> world x = 13 mm
        _write_slice(tmp_path / f"{k}.dcm", arr=arr, pos=(10.0 + 0.5 * k, 20.0, 2.5 * k), series_uid=uid,
                     number=k + 1)
    with pytest.warns(MedfuseWarning, match="gantry tilt"):
        vol = load_dicom(tmp_path)
    assert (np.argmax(vol.array[:, 4, :], axis=0) == 6).all()
    i, _, _, _ = np.linalg.solve(vol.affine, [13.0, 22.0, 5.0, 1.0])
    assert i == pytest.approx(6.0)
    # The edge no slice covers is air (the series' lowest value: -1024 HU here), not 0 HU (water).
    assert (vol.array[:4, :, 4] == -1024).all() and not (vol.array == 0).any()


@pytest.mark.parametrize("modality", ["RTSTRUCT", "SEG", "SR"])
def test_non_image_object_unsupported(tmp_path, modality):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.481.3"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(tmp_path / "rt.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientName, ds.SeriesInstanceUID = modality, FAKE_NAME, generate_uid()
    ds.save_as(str(tmp_path / "rt.dcm"), enforce_file_format=True)
    with pytest.raises(UnsupportedDataError) as e:
        load_dicom(tmp_path / "rt.dcm")
    _no_phi(str(e.value))
    with pytest.raises(UnsupportedDataError):
        load_dicom(tmp_path)


def test_truncated_and_empty_files(tmp_path):
    _series(tmp_path / "s", n=2, rows=64, cols=64)
    src = sorted((tmp_path / "s").iterdir())[0]
    data = src.read_bytes()
    trunc = tmp_path / "t" / "trunc.dcm"
    trunc.parent.mkdir()
    trunc.write_bytes(data[: len(data) - 3000])
    with pytest.raises(UnreadableFileError) as e:
        load_dicom(trunc)
    assert "trunc.dcm" in str(e.value)
    _no_phi(str(e.value))
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    with pytest.raises(UnreadableFileError, match="empty"):
        load_dicom(empty)


def test_folder_of_non_medical_files(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "img.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 50)
    with pytest.raises(UnreadableFileError) as e:
        load_dicom(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_non_dicom_files_in_folder_ignored(tmp_path):
    _series(tmp_path, n=3)
    (tmp_path / "README.txt").write_text("not dicom")
    assert load_dicom(tmp_path).shape == (10, 8, 3)


def test_no_patient_data_anywhere(tmp_path):
    _series(tmp_path / "s", z=[0, 1, 3, 4])
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        vol = load_dicom(tmp_path / "s")
    _no_phi(repr(vol) + str(vol.provenance) + "".join(str(w.message) for w in rec))
    _no_phi(repr(scan(tmp_path)))


def test_pet_without_suv_tags_loads_in_bqml(tmp_path):
    _series(tmp_path / "p", n=3, modality="PT", intercept=0.0, slope=2.0)
    with pytest.warns(MedfuseWarning, match="Bq/mL"):
        vol = load_dicom(tmp_path / "p")
    assert vol.unit == "Bq/mL" and vol.modality == "PT"
    vol2 = load_dicom(tmp_path / "p", suv="none")
    assert vol2.unit == "Bq/mL"
    np.testing.assert_allclose(vol.array, vol2.array)


def test_pet_suv_bw_applied_per_instance(tmp_path):
    """Decay-corrected (START) BQML PET: SUVbw = Bq/mL * weight_g / (dose * 2^(-dt/T))."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RadionuclideHalfLife, item.RadionuclideTotalDose = "6586.2", "370000000"
    item.RadiopharmaceuticalStartTime = "090000"
    extra = dict(Units="BQML", DecayCorrection="START", PatientWeight="70", SeriesDate="20200101",
                 SeriesTime="100000", AcquisitionDate="20200101", AcquisitionTime="100000",
                 CorrectedImage=["ATTN", "DECY"], RadiopharmaceuticalInformationSequence=[item], PatientSex="F")
    _, data = _series(tmp_path / "p", n=3, modality="PT", intercept=0.0, slope=0.5, extra=extra)
    vol = load_dicom(tmp_path / "p")
    assert vol.unit == "SUVbw" and vol.provenance["suv"] == "bw"
    dose = 370e6 * 2 ** (-3600 / 6586.2)
    expected = np.transpose(data, (2, 1, 0)) * 0.5 * 70000 / dose
    np.testing.assert_allclose(vol.array, expected, rtol=1e-5)
    assert load_dicom(tmp_path / "p", suv="none").unit == "Bq/mL"


def test_nm_multiframe_counts(tmp_path):
    from pydicom.dataset import Dataset

    det = Dataset()
    det.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]  # coronal: normal = +y (posterior)
    det.ImagePositionPatient = [-30.0, -40.0, 50.0]
    frames = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 3).astype(np.uint16)
    _write_slice(tmp_path / "nm.dcm", arr=frames[0], pos=(0, 0, 0), series_uid=generate_uid(), modality="NM",
                 slope=1.0, intercept=0.0, spacing=(4.0, 4.0),
                 extra=dict(NumberOfFrames=4, SpacingBetweenSlices=4.5, DetectorInformationSequence=[det]))
    ds = pydicom.dcmread(tmp_path / "nm.dcm")
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.PixelData = frames.tobytes()
    ds.save_as(tmp_path / "nm.dcm")
    vol = load_dicom(tmp_path / "nm.dcm")
    assert vol.modality == "NM" and vol.unit == "counts" and vol.shape == (5, 6, 4)
    np.testing.assert_array_equal(vol.array, np.transpose(frames, (2, 1, 0)))
    np.testing.assert_allclose(vol.affine, [[4, 0, 0, -30], [0, 0, 4.5, -40], [0, -4, 0, 50], [0, 0, 0, 1]])


def test_single_non_medical_file_says_so(tmp_path):
    """A text file is not called a 'truncated DICOM': the message names the formats medfuse reads."""
    import medfuse

    f = tmp_path / "notes.txt"
    f.write_text("not an image")
    with pytest.raises(UnreadableFileError, match="not a medical image") as e:
        medfuse.load(f)
    assert ".nii" in e.value.fix


# ---------------------------------------------------------------------------- review fixes
def _copy_tree(src: Path, dst: Path):
    # into tmp_path only (the shared data is never copied into the repository), as writable copies
    dst.mkdir(parents=True)
    for f in src.iterdir():
        (dst / f.name).write_bytes(f.read_bytes())


def test_duplicated_instances_are_not_a_4d_series(shared, tmp_path):
    """A mosaic series stored twice (export + copy) is still its 2 volumes, equal to dcm2niix's."""
    base = shared("data", "dicom", "qa-ge-siemens-epi")
    _copy_tree(base / "In" / "20180918Si" / "mr_0003", tmp_path / "study" / "a")
    _copy_tree(base / "In" / "20180918Si" / "mr_0003", tmp_path / "study" / "backup")
    with pytest.warns(MedfuseWarning, match="2 duplicate files") as rec:
        vols = load_dicom_volumes(tmp_path / "study")
    _check_against_ref(vols, base / "Ref" / "EPI_PE=AP_3.nii")
    assert "2 duplicate files (the same instance stored twice) were ignored" in vols[0].provenance["warnings"]
    for w in rec:
        _no_phi(str(w.message))
    assert scan(tmp_path / "study")[0].n_volumes == 2


def test_one_duplicated_slice_file_ignored(tmp_path):
    import shutil

    _, data = _series(tmp_path / "s", n=4, shuffle=False)
    shutil.copy(tmp_path / "s" / "f001.dcm", tmp_path / "s" / "f001 (copy).dcm")
    with pytest.warns(MedfuseWarning, match="1 duplicate file"):
        vol = load_dicom(tmp_path / "s")
    np.testing.assert_array_equal(vol.array, np.transpose(data, (2, 1, 0)).astype(int) - 1024)


def test_mixed_image_sizes_refused(tmp_path):
    uid = generate_uid()
    for k in range(3):
        _write_slice(tmp_path / f"{k}.dcm", arr=np.ones((8, 10) if k < 2 else (16, 20)), pos=(0, 0, 2.5 * k),
                     series_uid=uid, number=k + 1)
    with pytest.raises(GeometryError, match="mixes image sizes .*8x10, 16x20") as e:
        load_dicom(tmp_path)
    assert e.value.fix


def test_mixed_pixel_spacing_refused(tmp_path):
    uid = generate_uid()
    for k in range(3):
        _write_slice(tmp_path / f"{k}.dcm", arr=np.ones((8, 10)), pos=(0, 0, 2.5 * k), series_uid=uid, number=k + 1,
                     spacing=(0.9, 0.9) if k == 0 else (0.5, 0.5))
    with pytest.raises(GeometryError, match="mixes pixel spacings"):
        load_dicom(tmp_path)


def test_4d_positions_jittering_across_rounding_boundary(tmp_path):
    """Positions 1.005 mm +- 2 micrometres are one slice position, not two."""
    uid, n = generate_uid(), 0
    for vol in range(2):
        for k in range(3):
            z = 1.005 + 2.5 * k + (2e-6 if vol else -2e-6)
            _write_slice(tmp_path / f"{n}.dcm", arr=np.full((8, 10), vol), pos=(0, 0, z), series_uid=uid,
                         number=n + 1, extra=dict(TemporalPositionIdentifier=vol + 1))
            n += 1
    vols = load_dicom_volumes(tmp_path)
    assert len(vols) == 2 and all(v.shape == (10, 8, 3) for v in vols)
    assert [int(v.array.max()) for v in vols] == [-1024, -1023]
    np.testing.assert_allclose(vols[0].affine[:3, 2], [0, 0, 2.5], atol=1e-5)


def test_4d_volumes_ordered_across_midnight(tmp_path):
    """Without TemporalPositionIdentifier, the volume acquired at 00:00:10 comes after the one at 23:59:50."""
    uid, n = generate_uid(), 0
    for vol, (d, t) in enumerate([("20240101", "235950"), ("20240102", "000010")]):
        for k in range(3):
            n += 1
            _write_slice(tmp_path / f"{n}.dcm", arr=np.full((8, 10), vol), pos=(0, 0, 2.5 * k), series_uid=uid,
                         number=n, extra=dict(AcquisitionDate=d, AcquisitionTime=t))
    vols = load_dicom_volumes(tmp_path)
    assert [int(v.array.max()) + 1024 for v in vols] == [0, 1]


def test_bits_above_bits_stored_are_cleared(tmp_path):
    """12-bit CT in 16-bit words with stray high bits (old overlays): values as pydicom reads them, not wrapped."""
    uid = generate_uid()
    raw = np.full((3, 8, 10), 1000, np.uint16)
    raw[:, 1, 2] = 0xF000 | 100
    for k in range(3):
        _write_slice(tmp_path / f"{k}.dcm", arr=raw[k], pos=(0, 0, 2.5 * k), series_uid=uid, number=k + 1,
                     extra=dict(BitsStored=12, HighBit=11))
    assert pydicom.dcmread(tmp_path / "0.dcm").pixel_array[1, 2] == 100
    vol = load_dicom(tmp_path)
    assert vol.array[2, 1, 0] == 100 - 1024
    assert vol.array.min() == 100 - 1024 and vol.array.max() == 1000 - 1024


def _without_preamble(src: Path, dst: Path, *, keep_meta: bool):
    """Rewrite src as dst without the 128-byte preamble and 'DICM' (and, optionally, without file meta)."""
    from pydicom.filebase import DicomBytesIO
    from pydicom.filewriter import write_dataset, write_file_meta_info

    ds = pydicom.dcmread(src)
    fp = DicomBytesIO()
    if keep_meta:
        write_file_meta_info(fp, ds.file_meta, enforce_standard=False)
    ts = ds.file_meta.TransferSyntaxUID
    fp.is_little_endian, fp.is_implicit_VR = ts.is_little_endian, ts.is_implicit_VR
    write_dataset(fp, ds)
    dst.write_bytes(fp.getvalue())
    assert dst.read_bytes()[128:132] != b"DICM"


@pytest.mark.parametrize("n,keep_meta", [(1, False), (2, True), (2, False)])
def test_dicom_without_preamble_matches_dcm2niix(shared, tmp_path, n, keep_meta):
    """Files lacking the preamble/DICM prefix (old PACS exports) are read, with dcm2niix's voxels and geometry."""
    base = shared("data", "dicom", "qa-transfer-syntaxes")
    f = tmp_path / "nopreamble.dcm"
    _without_preamble(base / "In" / f"{n}.dcm", f, keep_meta=keep_meta)
    _check_against_ref([load_dicom(f)], base / "Ref" / f"{n}.nii")
    _check_against_ref(load_dicom_volumes(tmp_path), base / "Ref" / f"{n}.nii")


def test_text_file_is_not_forced_as_dicom(tmp_path):
    f = tmp_path / "x.dcm"
    f.write_bytes(b"\x08\x00\x05\x00" + b"garbage that is not a data set" * 3)
    with pytest.raises(UnreadableFileError):
        load_dicom(f)


def test_missing_decoder_names_the_plugin(shared):
    """JPEG 2000 without pylibjpeg-openjpeg (hidden in a subprocess): the error names what to install."""
    import subprocess
    import sys

    f = shared("data", "dicom", "qa-transfer-syntaxes", "In", "9.dcm")
    code = ("import sys\n"
            "for m in ('libjpeg', 'openjpeg', 'pylibjpeg', 'rle', 'jpeg_ls', 'gdcm', 'PIL'): sys.modules[m] = None\n"
            "from medfuse.io.dicom import load_dicom\n"
            "from medfuse.errors import UnreadableFileError\n"
            f"try:\n    load_dicom({str(f)!r})\nexcept UnreadableFileError as e:\n    print('ERR', e.one_line())\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120).stdout
    assert "ERR" in out and "no decoder for JPEG 2000" in out
    assert "pip install pylibjpeg pylibjpeg-openjpeg" in out and "truncated" not in out


def _nm(path: Path, *, itype, fip, extra, geometry=True, frames=None):
    from pydicom.dataset import Dataset

    frames = (np.arange(4 * 6 * 5).reshape(4, 6, 5) * 3).astype(np.uint16) if frames is None else frames
    _write_slice(path, arr=frames[0], pos=(0, 0, 0), series_uid=generate_uid(), modality="NM", slope=1.0,
                 intercept=0.0, spacing=(4.0, 4.0), extra=dict(NumberOfFrames=len(frames), **extra))
    ds = pydicom.dcmread(path)
    del ds.ImagePositionPatient, ds.ImageOrientationPatient
    ds.ImageType = ["ORIGINAL", "PRIMARY", itype, "EMISSION"]
    ds.FrameIncrementPointer = fip
    det = Dataset()
    if geometry:
        det.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 0.0, -1.0]
        det.ImagePositionPatient = [-30.0, -40.0, 50.0]
    ds.DetectorInformationSequence = [det]
    ds.PixelData = frames.tobytes()
    ds.save_as(path)
    return frames


@pytest.mark.parametrize("itype,fip,extra,words", [
    ("DYNAMIC", [0x00540070, 0x00540100], dict(TimeSlotVector=[1] * 4, TimeSliceVector=[1, 2, 3, 4]), "dynamic"),
    ("TOMO", [0x00540020, 0x00540050], dict(DetectorVector=[1, 1, 2, 2], RotationVector=[1] * 4), "projection"),
    ("STATIC", [0x00540010, 0x00540020], dict(EnergyWindowVector=[1] * 4, DetectorVector=[1, 2, 1, 2]), "static"),
])
def test_nm_planar_and_projection_frames_refused(tmp_path, itype, fip, extra, words):
    """Planar/dynamic/projection NM frames are not slices: refused, never stacked into a fake volume."""
    _nm(tmp_path / "nm.dcm", itype=itype, fip=fip, extra=extra)
    with pytest.raises(UnsupportedDataError, match=words) as e:
        load_dicom(tmp_path / "nm.dcm")
    assert "RECON TOMO" in e.value.fix
    _series(tmp_path / "ct", n=3)  # a study folder with the planar NM beside a CT: still listed by scan
    infos = sorted(scan(tmp_path), key=lambda i: i.modality)
    assert [(i.modality, i.n_volumes) for i in infos] == [("CT", 1), ("NM", 0)]


def test_nm_recon_without_geometry_refused(tmp_path):
    _nm(tmp_path / "nm.dcm", itype="RECON TOMO", fip=[0x00540080], geometry=False,
        extra=dict(SliceVector=[1, 2, 3, 4], SpacingBetweenSlices=4.5))
    with pytest.raises(GeometryError, match="ImageOrientationPatient and ImagePositionPatient"):
        load_dicom(tmp_path / "nm.dcm")


def test_nm_recon_slice_vector_and_gated_time_slots(tmp_path):
    """Frames are placed by SliceVector; a gated reconstruction (TimeSlotVector) gives one volume per slot."""
    frames = _nm(tmp_path / "a" / "nm.dcm" if (tmp_path / "a").mkdir() is None else None, itype="RECON TOMO",
                 fip=[0x00540080], extra=dict(SliceVector=[3, 1, 4, 2], SpacingBetweenSlices=4.5))
    vol = load_dicom(tmp_path / "a" / "nm.dcm")
    np.testing.assert_array_equal(vol.array, np.transpose(frames[[1, 3, 0, 2]], (2, 1, 0)))
    np.testing.assert_allclose(vol.affine, [[4, 0, 0, -30], [0, 0, 4.5, -40], [0, -4, 0, 50], [0, 0, 0, 1]])
    (tmp_path / "g").mkdir()
    g = (np.arange(6 * 6 * 5).reshape(6, 6, 5)).astype(np.uint16)
    _nm(tmp_path / "g" / "nm.dcm", itype="RECON GATED TOMO", fip=[0x00540070, 0x00540080], frames=g,
        extra=dict(TimeSlotVector=[1, 1, 1, 2, 2, 2], SliceVector=[1, 2, 3, 1, 2, 3], SpacingBetweenSlices=4.5))
    vols = load_dicom_volumes(tmp_path / "g" / "nm.dcm")
    assert len(vols) == 2
    np.testing.assert_array_equal(vols[1].array, np.transpose(g[3:], (2, 1, 0)))


def test_missing_pixel_spacing_refused_not_guessed(tmp_path):
    _series(tmp_path, n=3, spacing=(0.4, 0.4))
    for f in tmp_path.iterdir():
        ds = pydicom.dcmread(f)
        del ds.PixelSpacing
        ds.save_as(f)
    with pytest.raises(GeometryError, match="no PixelSpacing") as e:
        load_dicom(tmp_path)
    _no_phi(str(e.value))


def test_mosaic_without_private_tags_refused(shared, tmp_path):
    """An anonymised mosaic (private tags removed) is refused, not loaded as one 216x216 slice."""
    src = shared("data", "dicom", "qa-ge-siemens-epi", "In", "20180918Si", "mr_0003")
    for f in sorted(src.glob("*.dcm")):
        ds = pydicom.dcmread(f)
        ds.remove_private_tags()
        ds.save_as(tmp_path / f.name)
    with pytest.raises(UnsupportedDataError, match=r"NumberOfImagesInMosaic \(0019,100A\)") as e:
        load_dicom_volumes(tmp_path)
    assert "anonymiser" in e.value.fix


def test_series_mixing_pixel_representation_is_not_wrapped(tmp_path):
    """Slices stored signed (PixelRepresentation 1) and unsigned (0) in one series: 40000 stays 40000."""
    uid = generate_uid()
    vals = [np.full((8, 10), -5, np.int16), np.full((8, 10), 40000, np.uint16), np.full((8, 10), 7, np.int16)]
    for k, a in enumerate(vals):
        _write_slice(tmp_path / f"{k}.dcm", arr=a.view(np.uint16) if a.dtype == np.int16 else a, pos=(0, 0, 2.5 * k),
                     series_uid=uid, number=k + 1, modality="NM", slope=1.0, intercept=0.0,
                     extra=dict(PixelRepresentation=1 if a.dtype == np.int16 else 0))
    vol = load_dicom(tmp_path)
    assert list(vol.array[0, 0, :]) == [-5, 40000, 7]
    for k, (s, i) in enumerate([(1.0, -1024.0), (1.0, -1024.0), (1.0, -1024.0)]):  # CT with an intercept too
        ds = pydicom.dcmread(tmp_path / f"{k}.dcm")
        ds.RescaleIntercept = i
        ds.save_as(tmp_path / f"{k}.dcm")
    assert list(load_dicom(tmp_path).array[0, 0, :]) == [-5 - 1024, 40000 - 1024, 7 - 1024]


@pytest.mark.parametrize("hot,signed", [(40000, 0), (-40000, 1)])
def test_writer_uses_one_pixel_representation_per_series(tmp_path, hot, signed):
    """Counts with one slice beyond int16: every file gets the same PixelRepresentation, and medfuse and
    SimpleITK read the written series back with the values and geometry written."""
    import SimpleITK as sitk

    from medfuse.io.dicom_writer import write_dicom_series
    from medfuse.volume import Volume

    arr = np.full((6, 5, 4), 100, np.int32)
    arr[2, 2, 3] = hot
    aff = np.array([[0, 0, -4.5, -30], [4, 0, 0, -40], [0, -4, 0, 50], [0, 0, 0, 1.0]])  # right-handed, oblique-free
    v = Volume(arr, aff, modality="NM", unit="counts")
    write_dicom_series(v, tmp_path / "out")
    files = sorted((tmp_path / "out").iterdir())
    assert {int(pydicom.dcmread(f, stop_before_pixels=True).PixelRepresentation) for f in files} == {signed}
    back = load_dicom(tmp_path / "out")
    assert back.same_grid(v)
    if hot > 0:  # fits uint16: stored exactly
        np.testing.assert_array_equal(back.array, arr)
    else:  # fits neither 16-bit type: quantised within the documented bound
        assert np.abs(back.array - arr).max() <= 40000 / 65534
    r = sitk.ImageSeriesReader()
    r.SetFileNames(r.GetGDCMSeriesFileNames(str(tmp_path / "out")))
    img = Volume.from_sitk(r.Execute())
    assert img.same_grid(v)
    assert abs(float(img.array[2, 2, 3]) - hot) <= 40000 / 65534


def test_study_and_frame_of_reference_are_recorded_not_shown(tmp_path, shared):
    """The reader recorded the series UID only: which study a volume belongs to, and whether two volumes share a
    patient space (FrameOfReferenceUID), were lost. Both are now in provenance (classic and enhanced), and in
    no message or repr."""
    for_uid = generate_uid()
    _series(tmp_path / "ct", n=4, z=[0, 1, 2, 4], extra={"FrameOfReferenceUID": for_uid})  # a gap: a warning
    with pytest.warns(MedfuseWarning) as caught:
        vol = load_dicom(tmp_path / "ct")
    assert (vol.provenance["study_uid"], vol.provenance["frame_of_reference_uid"]) == ("1.2.3.4", for_uid)
    shown = " ".join([repr(vol), *vol.provenance["warnings"], *(str(w.message) for w in caught)])
    assert for_uid not in shown and "1.2.3.4" not in shown
    enhanced = shared("data", "dicom", "qa-enhanced-multiframe", "In", "Philips", "IM_0027_fMAP.dcm")
    ds = pydicom.dcmread(enhanced, stop_before_pixels=True)
    for v in load_dicom_volumes(enhanced):
        assert v.provenance["study_uid"] == ds.StudyInstanceUID
        assert v.provenance["frame_of_reference_uid"] == ds.FrameOfReferenceUID


def test_value_checks_switch_is_restored_only_when_the_last_reader_in_any_thread_ends():
    """pydicom's validation mode is process-wide. Two overlapping reads in two threads: the first to finish
    must not switch the checks back on under the other (their warnings quote header values), and the last
    one out must give the user's own setting back (a per-call save/restore left it off for good)."""
    import threading

    from medfuse.io.dicom import without_value_checks

    settings = pydicom.config.settings
    user = settings.reading_validation_mode
    a_in, b_in, a_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with without_value_checks():
            a_in.set()
            b_in.wait(5)
        a_out.set()

    def second():
        a_in.wait(5)
        with without_value_checks():
            b_in.set()
            a_out.wait(5)
            seen["while the other ended"] = settings.reading_validation_mode

    threads = [threading.Thread(target=f) for f in (first, second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["while the other ended"] == pydicom.config.IGNORE
    assert settings.reading_validation_mode == user



def test_load_takes_a_series_number_or_modality_as_the_listing_gives_them(tmp_path):
    """`--series CT PT` is passed to load itself: the folder's headers are read once, not once to resolve the
    choice and again to load. A number or modality that names nothing is refused with the listing."""
    study = tmp_path / "study"
    u1, _ = _series(study / "a", n=3)
    u2, _ = _series(study / "b", n=4, modality="MR")
    assert [s.series_uid for s in scan(study)] == [u1, u2]
    assert load_dicom(study, series_uid="2").provenance["series_uid"] == u2
    assert load_dicom(study, series_uid="mr").shape[2] == 4
    assert load_dicom(study, series_uid="CT").provenance["series_uid"] == u1
    for bad, words in (("3", "series 3 asked for"), ("PT", "no PT series"), ("nonsense", "not one of the 2 series")):
        with pytest.raises(InvalidInputError, match=words) as e:
            load_dicom(study, series_uid=bad)
        assert "1: CT 10x8" in str(e.value) and u1 not in str(e.value)
    import medfuse

    nii = medfuse.save(load_dicom(study, series_uid="1"), tmp_path / "ct.nii.gz")
    with pytest.raises(InvalidInputError, match="this file holds one image"):
        medfuse.load(nii, series_uid="CT")


def test_pet_lean_body_mass_kinds_are_recorded_apart(tmp_path):
    """Both lean-body-mass formulas give unit SUVlbm; the record says which one ran (it said James for both)."""
    from pydicom.dataset import Dataset

    item = Dataset()
    item.RadionuclideHalfLife, item.RadionuclideTotalDose = "6586.2", "370000000"
    item.RadiopharmaceuticalStartTime = "090000"
    extra = dict(Units="BQML", DecayCorrection="START", PatientWeight="70", PatientSize="1.75",
                 SeriesDate="20200101", SeriesTime="100000", AcquisitionDate="20200101", AcquisitionTime="100000",
                 CorrectedImage=["ATTN", "DECY"], RadiopharmaceuticalInformationSequence=[item], PatientSex="F")
    _series(tmp_path / "p", n=3, modality="PT", intercept=0.0, slope=0.5, extra=extra)
    james, janma = load_dicom(tmp_path / "p", suv="lbm"), load_dicom(tmp_path / "p", suv="lbm_janma")
    assert james.unit == janma.unit == "SUVlbm"
    assert (james.provenance["suv"], janma.provenance["suv"]) == ("lbm", "lbm_janma")
    assert "James" in james.provenance["suv_source"] and "Janmahasatian" in janma.provenance["suv_source"]
    assert not np.allclose(james.array, janma.array)  # two formulas, two factors
