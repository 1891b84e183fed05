"""End to end on the real scanner DICOM in ../shared: load -> register -> fuse -> write DICOM -> re-read.

What the unit tests of each stage miss: the stages chained on real Siemens/GE/Philips headers, through the API and
the command line, with the written series re-read by medfuse, SimpleITK and pydicom.
"""

from __future__ import annotations

import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medfuse

ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-m", "medfuse.cli"] if not (ROOT / ".venv" / "bin" / "medfuse").exists() else [
    str(ROOT / ".venv" / "bin" / "medfuse")]

# Header fields that identify the patient, site or day (PS3.15 Basic Profile "X"/"Z" ones the writer must clear).
_IDENTIFYING = ("PatientName", "PatientID", "PatientBirthDate", "InstitutionName", "InstitutionAddress",
                "StationName", "DeviceSerialNumber", "ReferringPhysicianName", "PerformingPhysicianName",
                "AccessionNumber", "StudyID", "InstitutionalDepartmentName")


def _dicom(shared, *parts) -> Path:
    return shared("data", "dicom", *parts)


def _identifiers(src: Path) -> dict:
    f = src if src.is_file() else sorted(src.rglob("*.dcm"))[0]
    ds = pydicom.dcmread(f, stop_before_pixels=True)
    return {k: str(ds.get(k, "")).strip() for k in _IDENTIFYING if len(str(ds.get(k, "")).strip()) >= 3}


def _sitk_affine(folder: Path):
    import SimpleITK as sitk

    r = sitk.ImageSeriesReader()
    names = r.GetGDCMSeriesFileNames(str(folder))
    r.SetFileNames(names)
    img = r.Execute()
    a = np.eye(4)
    a[:3, :3] = np.array(img.GetDirection()).reshape(3, 3) * np.array(img.GetSpacing())
    a[:3, 3] = img.GetOrigin()
    return a, sitk.GetArrayFromImage(img).transpose(2, 1, 0), len(names)


def _check_written_series(folder: Path, expected: "medfuse.Volume", source: Path, *, values=True):
    """Re-read a written series three ways; geometry within 1e-3 mm, no identifier of the source in any file."""
    files = sorted(folder.glob("*.dcm"))
    assert len(files) == expected.shape[2]
    with warnings.catch_warnings():
        warnings.simplefilter("error", medfuse.MedfuseWarning)  # a clean series re-reads without warnings
        back = medfuse.load(folder)
    assert back.shape == expected.shape
    np.testing.assert_allclose(back.affine, expected.affine, atol=1e-3)
    if values:
        np.testing.assert_allclose(back.array, expected.array, atol=1e-4 * max(1.0, float(np.abs(expected.array).max())))
    aff, arr, n = _sitk_affine(folder)
    assert n == len(files)
    np.testing.assert_allclose(aff, expected.affine, atol=1e-3)
    np.testing.assert_allclose(arr, back.array, atol=1e-4 * max(1.0, float(np.abs(back.array).max())))
    secrets = _identifiers(source)
    assert "PatientName" in secrets and "PatientID" in secrets  # the real headers do carry them
    src_ds = pydicom.dcmread(source if source.is_file() else sorted(source.rglob("*.dcm"))[0],
                             stop_before_pixels=True)
    for f in files:
        ds = pydicom.dcmread(f)
        raw = f.read_bytes()
        # A short all-digit value (a 5-digit device serial) turns up by chance inside the new random UIDs and the
        # pixel bytes: those are looked for in the header's other values instead.
        text = " ".join(str(e.value) for e in ds.iterall() if e.VR not in ("UI", "OB", "OW", "OF", "SQ"))
        leaked = [k for k, v in secrets.items() if (v in text if v.isdigit() else v.encode() in raw)]
        assert not leaked, f"{f.name} still holds {leaked}"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.StudyInstanceUID != src_ds.StudyInstanceUID  # de-identification replaces UIDs
        assert not any(e.tag.is_private for e in ds)
        assert ds.pixel_array.shape == (expected.shape[1], expected.shape[0])
    return back


# ---------------------------------------------------------------------------- loading
@pytest.mark.parametrize("parts", [("qa-ge-siemens-epi", "In", "20180918GE", "mr_0004"),
                                   ("qa-philips-scaling", "In", "Magdeburg_2014", "fmri")])
def test_whole_series_from_one_slice_equals_the_folder(shared, parts):
    folder = _dicom(shared, *parts)
    one = sorted(folder.glob("*.dcm"))[-1]
    assert medfuse.load(one).shape[2] == 1  # without whole_series: that slice alone
    vols = medfuse.load_volumes(one, whole_series=True)
    full = medfuse.load_volumes(folder)
    assert len(vols) == len(full) > 1
    for a, b in zip(vols, full):
        np.testing.assert_array_equal(a.array, b.array)
        np.testing.assert_allclose(a.affine, b.affine, atol=1e-9)
    assert Path(vols[0].provenance["source"]) == folder


def test_whole_series_from_one_multiframe_file_of_a_multi_file_series(shared):
    folder = _dicom(shared, "qa-enhanced-multiframe", "In", "Siemens", "XA10")
    full = medfuse.load_volumes(folder)
    assert len(full) == 4
    vols = medfuse.load_volumes(folder / "6_2.dcm", whole_series=True)
    assert len(vols) == len(full)
    for a, b in zip(vols, full):
        np.testing.assert_array_equal(a.array, b.array)
    # a multi-frame file that is a series by itself stays whole (Philips: 2 volumes in one file)
    assert len(medfuse.load_volumes(_dicom(shared, "qa-enhanced-multiframe", "In", "Philips", "IM_0027_fMAP.dcm"),
                                    whole_series=True)) == 2


def test_info_on_a_folder_of_several_series_says_how_to_pick_one_without_identifiers(shared):
    folder = _dicom(shared, "qa-ge-siemens-epi", "In", "20180918GE")
    r = subprocess.run(CLI + ["info", str(folder)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert "4 DICOM series" in r.stdout and "--series" in r.stdout
    for name in ("mr_0004", "mr_0005", "mr_0006", "mr_0007"):
        assert name in r.stdout
    for v in _identifiers(folder / "mr_0004").values():
        assert v not in r.stdout + r.stderr


def test_info_on_one_slice_points_to_its_series(shared):
    folder = _dicom(shared, "qa-ge-siemens-epi", "In", "20180918GE", "mr_0004")
    one = sorted(folder.glob("*.dcm"))[0]
    r = subprocess.run(CLI + ["info", str(one)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = r.stdout.lower()
    assert "whole_series" in text or "150" in text or "folder" in text


# ---------------------------------------------------------------------------- registration
@pytest.mark.parametrize("case", ["siemens-mosaic-ap-pa", "philips-volumes", "transfer-syntaxes"])
def test_same_frame_of_reference_registers_near_identity(shared, case):
    if case == "siemens-mosaic-ap-pa":
        si = _dicom(shared, "qa-ge-siemens-epi", "In", "20180918Si")
        f, m = medfuse.load(si / "mr_0003", volume_index=0), medfuse.load(si / "mr_0004", volume_index=0)
        tol_deg, tol_mm = 1.0, 2.0  # opposite phase-encoding directions: EPI distortion differs a little
    elif case == "philips-volumes":
        vs = medfuse.load_volumes(_dicom(shared, "qa-philips-scaling", "In", "Magdeburg_2014", "fmri"))
        f, m = vs[0], vs[-1]
        tol_deg, tol_mm = 0.5, 0.5
    else:
        ts = _dicom(shared, "qa-transfer-syntaxes", "In")
        f, m = medfuse.load(ts / "1.dcm"), medfuse.load(ts / "9.dcm")  # same image, two encodings
        tol_deg, tol_mm = 0.1, 0.1
    rep = medfuse.register(f, m).report
    assert rep.same_frame_of_reference is True
    assert not rep.suspect, rep.suspect_reasons
    assert rep.rotation_deg < tol_deg and rep.translation_mm < tol_mm


def _slab_report(shared, initialise, pair):
    vs = medfuse.load_volumes(_dicom(shared, "qa-enhanced-multiframe", "In", "Siemens", "XA10"))
    rep = medfuse.register(vs[pair[0]], vs[pair[1]], initialise=initialise).report
    assert rep.same_frame_of_reference is True
    return rep


@pytest.mark.parametrize("initialise,pair", [("auto", (0, 3)), ("auto", (0, 1)), ("local", (0, 3)),
                                             ("none", (0, 3))])
def test_thin_slab_volumes_of_one_series_register_near_identity(shared, initialise, pair):
    """A 14 mm slab (Siemens XA10, 64x64x6 at 2.4 mm), two volumes of one series of a phantom: the identity is
    the truth. "auto" searched the 24 orientations on 8 mm copies (2 slices) and turned it 179.5 degrees; in one
    frame of reference it now starts from the scanner's placement. The orientation check, which claimed a 179
    degree turn matched better, is skipped there too (no scanner turns a patient between two series)."""
    rep = _slab_report(shared, initialise, pair)
    assert rep.rotation_deg < 1.0 and rep.translation_mm < 1.0
    assert not rep.suspect, rep.suspect_reasons
    if initialise == "auto":
        assert "one frame of reference" in rep.initialisation


def test_thin_slab_with_an_explicit_local_search_does_not_tilt(shared):
    """An explicit "local" on the slab: its +-30 degree multi-start, scored on 8 mm copies (2 slices), picked a
    ~28 degree tilt that ended worse than the scanner's placement. A result worse than the placement is now
    re-optimised from it as well, the better kept, and the report says so. Since 2026-12-07 a rotated start must
    beat the unturned one by 10 %, so the tilt no longer wins at all and the placement ("world") is the start."""
    rep = _slab_report(shared, "local", (0, 1))
    assert rep.rotation_deg < 1.0 and rep.translation_mm < 1.0
    assert not rep.suspect, rep.suspect_reasons
    assert rep.initialisation == "world" or "re-optimised from the scanners' placement" in rep.initialisation, \
        rep.initialisation


# ---------------------------------------------------------------------------- fuse and write DICOM
def test_cli_register_fuse_and_dicom_output_reread_everywhere(shared, tmp_path):
    ts = _dicom(shared, "qa-transfer-syntaxes", "In")
    fixed, moving = ts / "3.dcm", ts / "9.dcm"  # explicit big endian fixed, JPEG 2000 moving
    reg = subprocess.run(CLI + ["register", str(fixed), str(moving), "-o", str(tmp_path / "r.nii.gz")],
                         capture_output=True, text=True, timeout=120)
    assert reg.returncode == 0, reg.stderr
    import json

    rep = json.loads((tmp_path / "r.json").read_text())["registration"][0]
    assert rep["same_frame_of_reference"] is True and not rep["suspect"]
    assert rep["rotation_deg"] < 0.1 and rep["translation_mm"] < 0.1
    nii = tmp_path / "f.nii.gz"
    out = tmp_path / "fused"
    for o in (nii, out):
        r = subprocess.run(CLI + ["fuse", str(fixed), str(moving), "-o", str(o), "--method", "max", "--register",
                                  "rigid"], capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert "Traceback" not in r.stderr
        for v in _identifiers(fixed).values():
            assert v not in r.stdout + r.stderr
    ref = medfuse.load(nii)
    np.testing.assert_allclose(ref.affine, medfuse.load(fixed).affine, atol=1e-3)
    _check_written_series(out, ref, fixed)


@pytest.mark.parametrize("parts", [("qa-ge-siemens-epi", "In", "20180918GE", "mr_0004"),
                                   ("qa-enhanced-multiframe", "In", "Siemens", "XA10"),
                                   ("qa-enhanced-multiframe", "In", "Philips", "IM_0027_fMAP.dcm")])
def test_api_save_with_template_rereads_on_the_source_grid(shared, tmp_path, parts):
    src = _dicom(shared, *parts)
    vs = medfuse.load_volumes(src)
    fused = medfuse.fuse(vs[0], vs[-1], method="max")
    out = medfuse.save(fused, tmp_path / "fused", template=src)
    back = _check_written_series(Path(out), fused, src)
    assert back.same_grid(vs[0])
    raw = medfuse.save(vs[0], tmp_path / "raw", template=src)
    back = _check_written_series(Path(raw), vs[0], src)
    assert back.modality == "MR"


# ---------------------------------------------------------------------------- PET: real SUV headers as a series
def _pet_series(folder: Path, headers: list) -> np.ndarray:
    """A 3-slice PET series whose per-instance SUV header values are the real ones (pixels synthetic)."""
    from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    folder.mkdir(parents=True)
    series, study, frame = generate_uid(), generate_uid(), generate_uid()
    data = []
    for i, h in enumerate(headers):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.128"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = FileDataset(str(folder / f"{i}.dcm"), {}, file_meta=meta, preamble=b"\0" * 128)
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.PatientName, ds.PatientID, ds.PatientBirthDate = "Zzyzx^Quentavious", "PID-8675309", "19010101"
        ds.Modality, ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = "PT", series, study, frame
        ds.InstanceNumber, ds.SeriesDescription = i + 1, "PET AC"
        ds.ImagePositionPatient, ds.ImageOrientationPatient = [0.0, 0.0, 4.0 * i], [1.0, 0, 0, 0, 1.0, 0]
        ds.PixelSpacing, ds.SliceThickness = [4.0, 4.0], 4.0
        arr = (np.arange(64).reshape(8, 8) * 10 + 100 * i).astype(np.uint16)
        data.append(arr)
        ds.RescaleSlope, ds.RescaleIntercept = 0.5, 0.0
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = 8, 8, 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.PixelData = arr.tobytes()
        item = Dataset()
        for k in ("RadionuclideHalfLife", "RadionuclideTotalDose", "RadiopharmaceuticalStartTime",
                  "RadiopharmaceuticalStartDateTime"):
            if h.get(k) is not None:
                setattr(item, k, str(h[k]).strip())
        ds.RadiopharmaceuticalInformationSequence = [item]
        for k in ("SeriesDate", "SeriesTime", "AcquisitionDate", "AcquisitionTime", "DecayCorrection", "Units",
                  "PatientSex", "CorrectedImage", "ActualFrameDuration", "FrameReferenceTime"):
            if h.get(k) is not None:
                setattr(ds, k, h[k])
        for k in ("PatientWeight", "PatientSize"):
            if h.get(k) is not None:
                setattr(ds, k, str(h[k]))
        private = h.get("PhilipsPETPrivateGroup") or {}
        if private:
            blk = ds.private_block(0x7053, "Philips PET Private Group", create=True)
            if "SUVScaleFactor" in private:
                blk.add_new(0x00, "DS", str(private["SUVScaleFactor"]).strip())
            if "ActivityConcentrationScaleFactor" in private:
                blk.add_new(0x09, "DS", str(private["ActivityConcentrationScaleFactor"]).strip())
        ds.save_as(str(folder / f"{i}.dcm"), enforce_file_format=True)
    return np.stack(data)


@pytest.mark.parametrize("name", ["SIEMENS", "GE_MEDICAL_AND_BQML", "PHILIPS_CNTS_AND_SUV"])
def test_pet_suv_through_load_info_and_dicom_round_trip(shared, tmp_path, name):
    import json

    from medfuse.io.suv import series_suv_factors

    headers = json.loads(shared("data", "pet-suv-headers", f"{name}-instances.json").read_text())
    data = _pet_series(tmp_path / "pet", headers)
    with warnings.catch_warnings():
        warnings.simplefilter("error", medfuse.MedfuseWarning)
        vol = medfuse.load(tmp_path / "pet")
    assert vol.unit == "SUVbw"
    got = [float(vol.array[3, 2, k] / (data[k][2, 3] * 0.5)) for k in range(3)]
    np.testing.assert_allclose(got, series_suv_factors(headers), rtol=1e-5)
    r = subprocess.run(CLI + ["info", str(tmp_path / "pet")], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "SUVbw" in r.stdout and "SUV factor" in r.stdout
    for secret in ("Zzyzx", "PID-8675309", "19010101", headers[0]["SeriesDate"]):
        assert secret not in r.stdout + r.stderr
    out = medfuse.save(vol, tmp_path / "out", template=tmp_path / "pet")
    with warnings.catch_warnings():
        warnings.simplefilter("error", medfuse.MedfuseWarning)
        back = medfuse.load(out)
    assert back.unit == "SUVbw"
    np.testing.assert_allclose(back.array, vol.array, rtol=0, atol=1e-4 * float(vol.array.max()))
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-3)
    for f in Path(out).glob("*.dcm"):
        raw = f.read_bytes()
        assert b"Zzyzx" not in raw and b"PID-8675309" not in raw and b"19010101" not in raw
