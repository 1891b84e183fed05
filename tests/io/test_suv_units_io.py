"""SUV units and formulas on reading and writing DICOM, NM units, quantisation warnings."""

from __future__ import annotations

import copy
import json
import math
import re
import warnings

import numpy as np
import nibabel as nib
import pydicom
import pytest
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning, SUVError
from medfuse.io.suv import suv_factor, suv_problem
from medfuse.volume import Volume


#: James's lean body mass a·W − b·(W/H)² (W kg, H cm) by sex, as the reference calculator has it.
_JAMES = {"M": (1.10, 120.0), "F": (1.07, 148.0)}


def _reference_header(shared):
    """The reference calculator's BQML case (weight, size and sex given), with a real dose: its 100 Bq is an
    arithmetic input that medfuse refuses as a dose (DOSE_RANGE_BQ)."""
    cases = json.loads(shared("reference", "pet-suv-expected.json").read_text())["cases"]
    return {**copy.deepcopy(next(c["header"] for c in cases if c["header"].get("PatientSex"))),
            "RadionuclideTotalDose": 3.7e8}


def _vertex_kg(sex: str, size_m: float) -> float:
    """Weight where James's lean body mass a·W − b·(W/H)² peaks (dLBM/dW = 0)."""
    a, b = _JAMES[sex]
    return a * (size_m * 100) ** 2 / (2 * b)


def _pet_copy(samples_dir, dest, dose=None, **tags):
    """Eight slices of the sample PET series, with header values changed (``dose``: RadionuclideTotalDose)."""
    dest.mkdir()
    for f in sorted((samples_dir / "pet").glob("*.dcm"))[28:36]:
        ds = pydicom.dcmread(str(f))
        for k, v in tags.items():
            setattr(ds, k, v)
        if dose is not None:
            ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = dose
        ds.save_as(str(dest / f.name))
    return dest


def _stored_values(folder):
    """Every voxel's stored value × RescaleSlope + RescaleIntercept, read by pydicom, sorted."""
    vals = []
    for f in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        vals.append(ds.pixel_array.astype(np.float64).ravel() * float(ds.get("RescaleSlope", 1))
                    + float(ds.get("RescaleIntercept", 0)))
    return np.sort(np.concatenate(vals))


# --------------------------------------------------------------------------- 1: James LBM beyond its vertex
@pytest.mark.parametrize("sex", ["F", "M"])
def test_james_lbm_refused_beyond_its_vertex_and_never_negative(shared, sex):
    h = {**_reference_header(shared), "PatientSex": sex, "PatientSize": 1.5}
    top = _vertex_kg(sex, 1.5)
    assert suv_factor({**h, "PatientWeight": top * 0.99}, kind="lbm") > 0
    a, b = _JAMES[sex]
    zero = a * 150.0 ** 2 / b  # James's LBM is exactly 0 here (it divided by zero)
    for w in (top * 1.01, zero, 200.0):
        header = {**h, "PatientWeight": w}
        with pytest.raises(SUVError) as e:
            suv_factor(header, kind="lbm")
        msg = str(e.value)
        assert "James" in msg and "lbm_janma" in msg and "PatientWeight" in msg
        assert not any(v in msg for v in (f"{w:g}", "1.5", "150"))  # the patient's values are never shown
        assert suv_factor(header, kind="lbm_janma") > 0  # Janmahasatian holds
        assert "lbm_janma" in suv_problem(header, kind="lbm")


def test_stored_james_lbm_of_an_obese_patient_is_not_converted_to_a_negative_suv(shared):
    h = {**_reference_header(shared), "Units": "GML", "SUVType": "LBM", "PatientSex": "F", "PatientSize": 1.5,
         "PatientWeight": 200}
    assert suv_factor(h, kind="lbm") == 1.0  # as stored: no formula needed
    with pytest.raises(SUVError, match="James"):
        suv_factor(h, kind="bw")  # was -4.07


def test_a_scanners_stored_james_lbm_past_the_peak_still_converts(shared):
    """The scanner applied James's formula whatever the BMI, so undoing it is exact: refusing past the peak made
    suv='bw' fall back to the stored SUVlbm (review probe). Only a value of 0 or below is refused."""
    h = {**_reference_header(shared), "Units": "GML", "SUVType": "LBM", "PatientSex": "F", "PatientSize": 1.70,
         "PatientWeight": 110}
    assert 110 > _vertex_kg("F", 1.70)  # past the peak
    a, b = _JAMES["F"]
    james_g = (a * 110 - b * (110 / 170.0) ** 2) * 1000.0
    assert suv_factor(h, kind="bw") == pytest.approx(110000.0 / james_g, rel=1e-12)
    with pytest.raises(SUVError, match="James"):  # computing a new SUVlbm with it is still refused
        suv_factor({**h, "Units": "BQML", "SUVType": None, "RadionuclideTotalDose": 3.7e8,
                    "RadionuclideHalfLife": 6586.2}, kind="lbm")


def test_obese_pet_loaded_with_lbm_falls_back_to_bq_ml_and_says_why(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="F", PatientSize="1.50", PatientWeight="200")
    with pytest.warns(MedfuseWarning, match="lbm_janma") as rec:
        v = medfuse.load(folder, suv="lbm")
    assert v.unit == "Bq/mL"
    assert not any("200" in str(m.message) or "1.50" in str(m.message) for m in rec)
    assert medfuse.load(folder, suv="lbm_janma").array.min() >= 0


# --------------------------------------------------------------------------- 2: the LBM formula survives saving
@pytest.mark.parametrize("kind", ["lbm_janma", "lbm"])
def test_lbm_formula_survives_a_dicom_round_trip(samples_dir, tmp_path, kind):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="M", PatientSize="1.75", PatientWeight="110")
    bw = medfuse.load(folder, suv="bw")
    lbm = medfuse.load(folder, suv=kind)
    out = medfuse.save(lbm, tmp_path / "out", template=folder)
    back = medfuse.load(out)
    assert back.unit == "SUVlbm" and back.provenance["suv"] == kind
    as_bw = medfuse.load(out, suv="bw")
    rel = float(np.abs(as_bw.array - bw.array).max() / bw.array.max())
    assert rel < 1e-4, rel  # Janmahasatian read back as James was 2.8 % off (more at a high BMI)
    other = "lbm" if kind == "lbm_janma" else "lbm_janma"
    direct = medfuse.load(folder, suv=other).array
    assert np.allclose(medfuse.load(out, suv=other).array, direct, atol=float(direct.max()) * 1e-4)


@pytest.mark.parametrize("via", ["nii.gz", "mha", "nrrd", "nibabel", "sitk"])
def test_lbm_formula_survives_other_formats_on_the_way_to_dicom(samples_dir, tmp_path, via):
    """DICOM -> NIfTI/MHA/NRRD (or nibabel/SimpleITK) -> DICOM: the NIfTI dropped the formula, the series was
    written as plain LBM and read back as James's: SUVbw 3 % off."""
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="M", PatientSize="1.75", PatientWeight="110")
    bw = medfuse.load(folder, suv="bw")
    janma = medfuse.load(folder, suv="lbm_janma")
    if via == "nibabel":
        mid = Volume.from_nibabel(janma.to_nibabel())
    elif via == "sitk":
        mid = Volume.from_sitk(janma.to_sitk())
    else:
        mid = medfuse.load(medfuse.save(janma, tmp_path / f"mid.{via}"))
    assert mid.unit == "SUVlbm" and mid.provenance["suv"] == "lbm_janma"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # the formula is known: no warning
        out = medfuse.save(mid, tmp_path / "out", template=folder)
    as_bw = medfuse.load(out, suv="bw")
    rel = float(np.abs(as_bw.array - bw.array).max() / bw.array.max())
    assert rel < 1e-4, rel


def test_a_stored_suvlbm_loaded_as_stored_keeps_its_formula(samples_dir, tmp_path):
    """load(suv="none") of a series medfuse wrote in Janmahasatian SUVlbm recorded no formula: saved again, it
    was plain LBM, read back as James's (SUVbw 4 % off)."""
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="M", PatientSize="1.75", PatientWeight="110")
    bw = medfuse.load(folder, suv="bw")
    first = medfuse.save(medfuse.load(folder, suv="lbm_janma"), tmp_path / "first", template=folder)
    as_stored = medfuse.load(first, suv="none")
    assert as_stored.unit == "SUVlbm" and as_stored.provenance["suv"] == "lbm_janma"
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        second = medfuse.save(as_stored, tmp_path / "second", template=folder)
    rel = float(np.abs(medfuse.load(second, suv="bw").array - bw.array).max() / bw.array.max())
    assert rel < 1e-4, rel


def test_a_stored_suvlbm_that_cannot_be_converted_is_said_to_be_kept_as_stored(samples_dir, tmp_path):
    """A de-identified SUVlbm series (no PatientSex) fused by fuse_files, which asks SUVbw: the values are kept as
    stored, and the warning said "PET loaded in SUVlbm, not SUV: PatientSex ... needed for SUVlbm. Fix: ... or
    use SUVbw", as if the series were no SUV and SUVbw were what the user should pick."""
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="M", PatientSize="1.75")
    lbm = medfuse.load(folder, suv="lbm")
    written = medfuse.save(lbm, tmp_path / "lbm")
    for f in written.iterdir():  # as an export that dropped it (a de-identifying PACS) leaves it
        ds = pydicom.dcmread(f)
        ds.PatientSex = ""
        ds.save_as(f)
    with pytest.warns(MedfuseWarning) as caught:
        got = medfuse.load(written, suv="bw")
    text = " ".join(str(w.message) for w in caught if issubclass(w.category, MedfuseWarning))
    assert "PET loaded in SUVlbm, as stored, not converted to SUVbw: PatientSex is missing" in text
    assert "needed to convert SUVlbm to SUVbw" in text and "use SUVbw" not in text and "not SUV" not in text
    assert got.unit == "SUVlbm"
    np.testing.assert_allclose(got.array, lbm.array, rtol=1e-3, atol=1e-3 * float(lbm.array.max()))


def test_an_overridden_unit_drops_the_stored_formula_and_an_unknown_formula_is_warned_of(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="M", PatientSize="1.75", PatientWeight="110")
    path = medfuse.save(medfuse.load(folder, suv="lbm_janma"), tmp_path / "mid.nii.gz")
    assert "suv" not in medfuse.load(path, unit="arbitrary").provenance
    assert "suv" not in Volume.from_nibabel(nib.load(path), unit="arbitrary").provenance
    # An SUVlbm from another tool: nobody knows the formula, and the writer says what readers will assume.
    other = Volume(medfuse.load(path).array, medfuse.load(path).affine, modality="PT", unit="SUVlbm")
    with pytest.warns(MedfuseWarning, match="James") as rec:
        medfuse.save(other, tmp_path / "out", template=folder)
    assert any("provenance['suv'] = 'lbm_janma'" in str(m.message) for m in rec)


# --------------------------------------------------------------------------- 3: SUVbsa is CM2ML
def test_suvbsa_is_written_as_cm2ml_and_read_back_as_suvbsa(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="F", PatientSize="1.65", PatientWeight="60")
    bsa = medfuse.load(folder, suv="bsa")
    out = medfuse.save(bsa, tmp_path / "out", template=folder)
    ds = pydicom.dcmread(str(next(out.iterdir())), stop_before_pixels=True)
    assert (ds.Units, ds.SUVType) == ("CM2ML", "BSA")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        back = medfuse.load(out)
    assert back.unit == "SUVbsa" and back.provenance["suv"] == "bsa"
    bw = medfuse.load(folder, suv="bw").array
    assert np.allclose(medfuse.load(out, suv="bw").array, bw, atol=float(bw.max()) * 1e-4)


def test_scanner_cm2ml_series_loads_as_suvbsa_and_a_contradicting_suvtype_is_refused(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", Units="CM2ML", SUVType="BSA", PatientSex="F",
                       PatientSize="1.65", PatientWeight="60")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        v = medfuse.load(folder)
    raw = medfuse.load(folder, suv="none")
    assert v.unit == raw.unit == "SUVbsa" and np.array_equal(v.array, raw.array)
    bad = _pet_copy(samples_dir, tmp_path / "bad", Units="CM2ML", SUVType="BW", PatientWeight="60")
    with pytest.warns(MedfuseWarning, match="SUVType"):
        assert medfuse.load(bad).unit == "arbitrary"


# --------------------------------------------------------------------------- 3b: review probe r32
def test_gml_ibw_series_loads_as_arbitrary_and_is_not_saved_as_suvbw(samples_dir, tmp_path):
    """Units GML, SUVType IBW loaded as SUVbw and was saved back as SUVType BW: ideal-body-weight SUV turned into
    body-weight SUV for good."""
    folder = _pet_copy(samples_dir, tmp_path / "pet", Units="GML", SUVType="IBW")
    with pytest.warns(MedfuseWarning, match="IBW") as rec:
        v = medfuse.load(folder)
    msg = next(str(m.message) for m in rec if "IBW" in str(m.message))
    assert "not SUVbw" in msg and "ideal body weight" in msg
    assert v.unit == "arbitrary" and v.provenance.get("suv") is None
    assert np.allclose(np.sort(v.array.ravel()), _stored_values(folder), rtol=1e-6)  # values as stored
    assert medfuse.load(folder, suv="none").unit == "arbitrary"
    out = medfuse.save(v, tmp_path / "out", template=folder)
    ds = pydicom.dcmread(str(next(out.iterdir())), stop_before_pixels=True)
    assert ds.get("Units") != "GML" and ds.get("SUVType") != "BW"
    with pytest.warns(MedfuseWarning):
        assert medfuse.load(out).unit == "arbitrary"
    # SUVType BW, or none, is still SUVbw, without a word
    for name, tags in (("bw", {"SUVType": "BW"}), ("none", {})):
        ok = _pet_copy(samples_dir, tmp_path / name, Units="GML", **tags)
        with warnings.catch_warnings():
            warnings.simplefilter("error", MedfuseWarning)
            got = medfuse.load(ok)
        assert got.unit == "SUVbw" and np.allclose(np.sort(got.array.ravel()), _stored_values(ok), rtol=1e-6)


def test_dose_in_mbq_loads_in_bq_ml_with_a_warning_naming_the_tag(samples_dir, tmp_path):
    """RadionuclideTotalDose 250 (MBq typed as Bq) gave SUV values 1e6 times too large, without a word."""
    folder = _pet_copy(samples_dir, tmp_path / "pet", dose="250")
    with pytest.warns(MedfuseWarning, match="RadionuclideTotalDose") as rec:
        v = medfuse.load(folder)
    msg = next(str(m.message) for m in rec if "RadionuclideTotalDose" in str(m.message))
    assert "MBq" in msg and "Bq/mL" in msg
    assert v.unit == "Bq/mL" and np.allclose(np.sort(v.array.ravel()), _stored_values(folder), rtol=1e-6)
    # the same series with the dose in Bq is SUVbw: Bq/mL × weight(g) / dose decayed to the scan start
    real = medfuse.load(_pet_copy(samples_dir, tmp_path / "real", dose="250000000"))
    assert real.unit == "SUVbw" and float(real.array.max()) < 100


# --------------------------------------------------------------------------- 4: quantitative NM
def _nm_file(path, units=None, slope=None):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.20"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(str(path), {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.ImageType = "NM", ["ORIGINAL", "PRIMARY", "RECON TOMO", "EMISSION"]
    ds.SeriesInstanceUID, ds.StudyInstanceUID, ds.FrameOfReferenceUID = generate_uid(), generate_uid(), generate_uid()
    ds.Rows, ds.Columns, ds.NumberOfFrames, ds.SamplesPerPixel = 8, 10, 6, 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelSpacing, ds.SpacingBetweenSlices, ds.SliceThickness = [4.0, 4.0], 4.0, 4.0
    ds.FrameIncrementPointer, ds.SliceVector, ds.NumberOfSlices = 0x00540080, list(range(1, 7)), 6
    det = Dataset()
    det.ImagePositionPatient, det.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.DetectorInformationSequence = Sequence([det])
    if units:
        ds.Units = units
    if slope is not None:
        ds.RescaleSlope, ds.RescaleIntercept = slope, "0"
    stored = np.arange(480, dtype=np.uint16).reshape(6, 8, 10)
    ds.PixelData = stored.tobytes()
    ds.save_as(str(path), enforce_file_format=True)
    return stored


@pytest.mark.parametrize("units, slope, unit", [("BQML", "0.5", "Bq/mL"), (None, None, "counts"),
                                                ("CNTS", None, "counts")])
def test_nm_units_bqml_is_bq_per_ml(tmp_path, units, slope, unit):
    stored = _nm_file(tmp_path / "nm.dcm", units, slope)
    v = medfuse.load(tmp_path / "nm.dcm")
    assert v.unit == unit
    assert np.allclose(v.array, stored.transpose(2, 1, 0) * float(slope or 1))


def test_quantitative_nm_keeps_bq_per_ml_through_a_dicom_round_trip(tmp_path):
    _nm_file(tmp_path / "nm.dcm", "BQML", "0.5")
    v = medfuse.load(tmp_path / "nm.dcm")
    back = medfuse.load(medfuse.save(v, tmp_path / "out"))
    assert (back.modality, back.unit) == ("NM", "Bq/mL")
    assert np.allclose(back.array, v.array, atol=float(v.array.max()) * 1e-4)


# --------------------------------------------------------------------------- 5: non-finite Philips factors
def test_infinite_philips_factor_is_not_used(shared):
    cases = json.loads(shared("reference", "pet-suv-expected.json").read_text())["cases"]
    cnts = copy.deepcopy(next(c["header"] for c in cases if "PhilipsSUVScaleFactor" in c["header"]))
    cnts["RadionuclideTotalDose"] = 3.7e8  # a real dose: the calculator's 100 Bq is refused as one
    with pytest.raises(SUVError, match="7053,1000"):
        suv_factor({**cnts, "PhilipsSUVScaleFactor": math.inf, "PhilipsActivityConcentrationScaleFactor": math.inf})
    # an infinite SUV factor beside a valid activity-concentration factor: the latter is used, finite
    only_acf = {k: v for k, v in cnts.items() if k != "PhilipsSUVScaleFactor"}
    assert suv_factor({**cnts, "PhilipsSUVScaleFactor": math.inf}) == pytest.approx(suv_factor(only_acf))
    assert math.isfinite(suv_factor(only_acf))


# --------------------------------------------------------------------------- 6: quantised whole numbers
def test_whole_numbers_beyond_16_bits_warn_with_the_largest_error(tmp_path):
    arr = np.linspace(-1024, 100000, 16 * 16 * 4).reshape(16, 16, 4).astype(np.int32)
    with pytest.warns(MedfuseWarning, match="no longer exact") as rec:
        out = medfuse.save(Volume(arr, np.eye(4), modality="CT", unit="HU"), tmp_path / "ct")
    msg = next(str(m.message) for m in rec if "no longer exact" in str(m.message))
    stated = float(re.search(r"off by up to ([0-9.e+-]+)", msg).group(1))
    got = float(np.abs(medfuse.load(out).array.astype(np.float64) - arr).max())
    assert 0 < got <= stated * 1.001 + 1e-6 and "NIfTI" in msg
    with warnings.catch_warnings():  # 16-bit whole numbers stay exact, without a word
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.save(Volume((arr // 8).astype(np.int16), np.eye(4), modality="CT", unit="HU"), tmp_path / "ct16")


def test_huge_values_save_without_a_numpy_overflow_warning(tmp_path):
    arr = np.full((4, 4, 3), 1e300)
    arr[0, 0, 0] = -1e300
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        medfuse.save(Volume(arr, np.eye(4), modality="MR", unit="arbitrary"), tmp_path / "big")


# --------------------------------------------------------------------------- 7: slice spacing the reader groups
def test_slice_spacing_below_the_readers_position_tolerance_is_refused_before_writing(tmp_path):
    from medfuse.io.dicom import _POS_TOL

    for k, spacing in enumerate((_POS_TOL / 2, _POS_TOL)):  # exactly the tolerance too: it read back as 4-D
        vol = Volume(np.zeros((4, 4, 3)), np.diag([1.0, 1.0, spacing, 1.0]), modality="MR", unit="arbitrary")
        with pytest.raises(InvalidInputError, match="NIfTI"):
            medfuse.save(vol, tmp_path / f"thin{k}")
        assert not (tmp_path / f"thin{k}").exists()
    ok = Volume(np.arange(48.0).reshape(4, 4, 3), np.diag([1.0, 1.0, _POS_TOL * 5, 1.0]), modality="MR",
                unit="arbitrary")
    back = medfuse.load(medfuse.save(ok, tmp_path / "ok"))
    assert back.shape == ok.shape


def test_a_series_whose_files_disagree_on_modality_is_refused(samples_dir, tmp_path):
    """One SeriesInstanceUID over PT and CT slices (a bad merge) loaded silently as the first file's modality."""
    from medfuse.errors import UnreadableFileError

    folder = _pet_copy(samples_dir, tmp_path / "mixed")
    last = sorted(folder.glob("*.dcm"))[-1]
    ds = pydicom.dcmread(str(last))
    ds.Modality = "CT"
    ds.save_as(str(last))
    with pytest.raises(UnreadableFileError, match="disagree on their modality"):
        medfuse.load(folder)
    assert medfuse.load(_pet_copy(samples_dir, tmp_path / "same")).modality == "PT"


def test_the_suv_factor_applied_is_recorded_and_shown_by_info(samples_dir, tmp_path, capsys):
    """`medfuse info` named the SUV rule but not the multiplier, so a user could not check it against the scanner
    console's. The number recorded is the one applied: stored Bq/mL times it gives the SUVs loaded."""
    from medfuse.cli import main
    from medfuse.io.suv import header_from_dataset

    pet = medfuse.load(samples_dir / "pet")
    files = sorted((samples_dir / "pet").iterdir())
    ds = pydicom.dcmread(files[0])
    want = suv_factor(header_from_dataset(ds), kind="bw")
    assert pet.provenance["suv_factor"] == pytest.approx(want, rel=1e-12)
    stored = medfuse.load(samples_dir / "pet", suv="none")
    assert stored.unit == "Bq/mL" and "suv_factor" not in stored.provenance
    np.testing.assert_allclose(pet.array, stored.array * want, rtol=1e-5, atol=1e-6)
    assert main(["info", str(samples_dir / "pet"), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["suv_factor"] == pytest.approx(want, rel=1e-12)
    assert main(["info", str(samples_dir / "pet")]) == 0
    assert f"SUV factor   {want:.7g} = body weight" in capsys.readouterr().out
    # Philips CNTS series carry a factor per slice ((7053,1009), counts to Bq/mL): the record is then the range.
    for i, f in enumerate(files):
        d = pydicom.dcmread(f)
        d.Units = "CNTS"
        d.add_new((0x7053, 0x0010), "LO", "Philips PET Private Group")
        d.add_new((0x7053, 0x1009), "DS", f"{1.0 + 0.01 * i:.2f}")
        d.save_as(tmp_path / f.name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cnts = medfuse.load(tmp_path)
    lo, hi = cnts.provenance["suv_factor"]
    assert lo == pytest.approx(want) and hi == pytest.approx(want * (1.0 + 0.01 * (len(files) - 1)))


def test_the_command_line_reads_a_pet_in_the_suv_kind_asked(samples_dir, tmp_path, capsys):
    """--suv on info, register, fuse and batch: SUL (SUVlbm, as PERCIST reads it) had no command-line route."""
    from medfuse.cli import main

    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientSex="F", PatientSize="1.62")
    want = medfuse.load(folder, suv="lbm")
    assert main(["info", str(folder), "--suv", "lbm", "--json"]) == 0
    facts = json.loads(capsys.readouterr().out)
    assert facts["unit"] == "SUVlbm" and facts["suv_factor"] == pytest.approx(want.provenance["suv_factor"])
    assert main(["info", str(folder), "--suv", "none", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["unit"] == "Bq/mL"
    out = tmp_path / "on_itself.nii.gz"
    assert main(["register", str(folder), str(folder), "-o", str(out), "--suv", "lbm", "-q",
                 "--initialise", "none"]) == 0
    got = medfuse.load(out)
    assert float(np.abs(got.array - want.array).max()) < 0.02 * float(want.array.max())
    rec = json.loads(out.with_name("on_itself.json").read_text())
    assert rec["inputs"][1]["suv"] == "lbm" and rec["inputs"][1]["unit"] == "SUVlbm"
    fused = tmp_path / "fused.nii.gz"
    assert main(["fuse", str(folder), str(folder), "-o", str(fused), "--method", "max", "--suv", "bsa", "-q"]) == 0
    sidecar = json.loads(fused.with_name("fused.json").read_text())
    assert {i["unit"] for i in sidecar["inputs"]} == {"SUVbsa"}
    assert sidecar["parameters"]["load"]["suv"] == "bsa"
    manifest = tmp_path / "m.csv"
    manifest.write_text(f"subject,fixed,moving,output\ns1,{folder},{folder},{tmp_path / 'b.nii.gz'}\n")
    assert main(["batch", str(manifest), "--method", "max", "--suv", "lbm_janma", "--scheduler", "synchronous",
                 "-q"]) == 0
    batch_rec = json.loads((tmp_path / "b.json").read_text())
    assert {i["suv"] for i in batch_rec["inputs"]} == {"lbm_janma"}
    assert main(["fuse", str(folder), str(folder), "-o", str(fused), "--suv", "sul"]) == 2
    assert "invalid choice 'sul'" in capsys.readouterr().err


def test_a_mouse_pet_is_read_in_suv_and_its_micrometre_grid_is_printed_to_its_voxels(samples_dir, tmp_path, capsys):
    """Preclinical PET: a 25 g mouse was refused (the weight floor was 0.25 kg, the lightest newborn) and its PET
    loaded in Bq/mL; `medfuse info` printed a 5 micrometre grid's extent as "0 x 0 x 0 mm"."""
    from medfuse.cli import main

    folder = _pet_copy(samples_dir, tmp_path / "mouse", PatientWeight="0.025")
    human = medfuse.load(_pet_copy(samples_dir, tmp_path / "human", PatientWeight="70"))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        mouse = medfuse.load(folder)
    assert mouse.unit == "SUVbw"
    np.testing.assert_allclose(mouse.array * (70 / 0.025), human.array, rtol=1e-5, atol=1e-6)
    tiny = medfuse.save(medfuse.Volume(np.zeros((64, 64, 8), np.float32), np.diag([0.005, 0.005, 0.02, 1.0])),
                        tmp_path / "tiny.nii.gz")
    assert main(["info", str(tiny)]) == 0
    out = capsys.readouterr().out
    assert "extent 0.32 x 0.32 x 0.16 mm" in out and "(0.0000, 0.0000, 0.0000)" in out
