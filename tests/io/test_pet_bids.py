"""SUVbw of a NIfTI PET from its PET-BIDS JSON sidecar (medfuse.io.pet_bids).

A NIfTI PET in Bq/mL whose sidecar gave the injected activity, body weight, radionuclide and times loaded in Bq/mL,
and ``suv=`` said no header held what SUV needs. The expected factors here are computed by hand from the sidecar's
numbers: weight_g / (dose_Bq * 2 ** (-uptake_s / half_life_s)), the dose decayed to the time the image is
decay-corrected to (not decayed when that is the injection).
"""

from __future__ import annotations

import hashlib
import json
import warnings

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.nifti import load_image, load_image_volumes

F18_S = 6586.2  # the F-18 half-life the sidecar's "F18" stands for (DDEP/NIST: 109.77 min)
AFFINE_RAS = np.array([[-2.0, 0, 0, 40.0], [0, 2.0, 0, -30.0], [0, 0, 3.0, 12.5], [0, 0, 0, 1]])
META = {"Modality": "PT", "Units": "Bq/mL", "TracerName": "FDG", "TracerRadionuclide": "F18",
        "InjectedRadioactivity": 370, "InjectedRadioactivityUnits": "MBq", "BodyWeight": 70.0,
        "TimeZero": "10:00:00", "InjectionStart": 0, "ScanStart": 3600, "ImageDecayCorrected": True,
        "ImageDecayCorrectionTime": 3600, "FrameTimesStart": [3600], "FrameDuration": [600],
        "AttenuationCorrection": "CT-based"}


def _bq(frames: int = 1) -> np.ndarray:
    rng = np.random.default_rng(7)
    shape = (6, 5, 4) + ((frames,) if frames > 1 else ())
    return rng.uniform(0.0, 40000.0, shape).astype(np.float32)


def _pet(tmp_path, sidecar=None, frames: int = 1, **changes):
    """``pet.nii.gz`` (Bq/mL, no medfuse tag) and ``pet.json`` (META with ``changes``; None deletes a key, a str
    ``sidecar`` is written as is)."""
    arr = _bq(frames)
    nii = tmp_path / "sub-01_pet.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE_RAS), nii)
    meta = {k: v for k, v in {**META, **changes}.items() if v is not None}
    side = tmp_path / "sub-01_pet.json"
    side.write_text(sidecar if isinstance(sidecar, str) else json.dumps(meta))
    return nii, side, arr


def _quiet(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        return fn(*args, **kw)


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("inj, scan, corrected_at, uptake_s", [
    (0, 3600, 3600, 3600.0),         # decay-corrected to the scan start: the dose decays over the uptake
    (-4500, 0, 0, 4500.0),           # TimeZero at the scan start (injection before it): the same rule
    (0, 3600, 0, 0.0),               # decay-corrected to the injection: the dose as injected
    (-2700.5, 0, -2700.5, 0.0),
], ids=["start", "start-timezero-at-scan", "admin", "admin-negative"])
def test_suv_factor_matches_a_hand_computation(tmp_path, inj, scan, corrected_at, uptake_s):
    nii, side, arr = _pet(tmp_path, InjectionStart=inj, ScanStart=scan, ImageDecayCorrectionTime=corrected_at,
                          FrameTimesStart=[scan])
    v = _quiet(medfuse.load, nii)
    want = 70.0 * 1000.0 / (370e6 * 2.0 ** (-uptake_s / F18_S))
    assert (v.modality, v.unit) == ("PT", "SUVbw")
    assert v.provenance["suv_factor"] == pytest.approx(want, rel=1e-9)
    np.testing.assert_allclose(v.array, arr.astype(np.float64) * want, rtol=1e-6)
    assert v.provenance["suv"] == "bw" and "BIDS sidecar sub-01_pet.json" in v.provenance["suv_source"]
    assert v.provenance["pet_acquisition"] == {
        "tracer": "FDG", "radionuclide": "F18", "half_life_s": F18_S, "injected_mbq": 370.0,
        "uptake_min": pytest.approx((scan - inj) / 60.0), "decay_correction": "START" if uptake_s else "ADMIN",
        "attenuation_corrected": True, "attenuation_method": "CT-based"}
    # Geometry as without SUV (the voxels alone are scaled).
    plain = _quiet(load_image, nii, suv="none")
    assert plain.unit == "Bq/mL" and "suv_factor" not in plain.provenance
    np.testing.assert_array_equal(plain.array, arr)
    np.testing.assert_array_equal(v.affine, plain.affine)


def test_every_volume_of_a_dynamic_pet_gets_the_one_factor(tmp_path):
    nii, _, arr = _pet(tmp_path, frames=3, FrameTimesStart=[3600, 3900, 4200], FrameDuration=[300, 300, 300])
    vols = _quiet(medfuse.load_volumes, nii)
    want = 70000.0 / (370e6 * 2.0 ** (-3600.0 / F18_S))
    assert [v.unit for v in vols] == ["SUVbw"] * 3
    for i, v in enumerate(vols):
        np.testing.assert_allclose(v.array, arr[..., i].astype(np.float64) * want, rtol=1e-6)
    vols[0].provenance["pet_acquisition"]["tracer"] = "changed"  # each volume its own record
    assert vols[1].provenance["pet_acquisition"]["tracer"] == "FDG"


@pytest.mark.parametrize("nuclide", ["F18", "18F", "[18F]", "F-18", "f18"])
def test_radionuclide_spellings(tmp_path, nuclide):
    nii, _, _ = _pet(tmp_path, TracerRadionuclide=nuclide)
    assert _quiet(medfuse.load, nii).provenance["suv_factor"] == pytest.approx(
        70000.0 / (370e6 * 2.0 ** (-3600.0 / F18_S)), rel=1e-9)


def test_other_radionuclide_uses_its_half_life(tmp_path):
    nii, _, _ = _pet(tmp_path, TracerRadionuclide="C11", TracerName="PiB", InjectedRadioactivity=400000,
                     InjectedRadioactivityUnits="kBq", ScanStart=2400, ImageDecayCorrectionTime=2400)
    v = _quiet(medfuse.load, nii)
    assert v.provenance["suv_factor"] == pytest.approx(70000.0 / (400e6 * 2.0 ** (-2400.0 / 1221.8)), rel=1e-9)
    assert v.provenance["pet_acquisition"]["injected_mbq"] == pytest.approx(400.0)


@pytest.mark.parametrize("field", ["BodyWeight", "InjectedRadioactivity", "InjectedRadioactivityUnits",
                                   "TracerRadionuclide", "ScanStart", "InjectionStart", "ImageDecayCorrectionTime",
                                   "ImageDecayCorrected"])
def test_a_missing_field_gives_no_suv_and_a_warning_naming_it(tmp_path, field):
    nii, _, arr = _pet(tmp_path, **{field: None})
    with pytest.warns(MedfuseWarning, match=rf"not SUV: in its BIDS sidecar sub-01_pet\.json, {field} is missing"):
        v = medfuse.load(nii)
    assert (v.modality, v.unit) == ("PT", "Bq/mL") and "suv_factor" not in v.provenance
    np.testing.assert_array_equal(v.array, arr)
    assert any(field in w for w in v.provenance["warnings"])


@pytest.mark.parametrize("changes, said", [
    ({"BodyWeight": "70 kg"}, "BodyWeight is text, not a JSON number"),
    ({"BodyWeight": True}, "BodyWeight is true/false, not a JSON number"),
    ({"BodyWeight": 70000}, "BodyWeight is outside the plausible"),
    ({"InjectedRadioactivity": [370]}, "InjectedRadioactivity is a list, not a JSON number"),
    ({"InjectedRadioactivityUnits": "Bq"}, "InjectedRadioactivity is 370 Bq, outside the plausible"),
    ({"InjectedRadioactivityUnits": "MBq/kg"}, "InjectedRadioactivityUnits is 'MBq/kg'"),
    ({"ImageDecayCorrected": "yes"}, "ImageDecayCorrected is text, not true or false"),
    ({"ImageDecayCorrected": False}, "ImageDecayCorrected is false"),
    ({"ImageDecayCorrectionTime": 1800}, "ImageDecayCorrectionTime is neither InjectionStart nor ScanStart"),
    ({"InjectionStart": 4000, "ImageDecayCorrectionTime": 3600}, "ScanStart is before InjectionStart"),
    ({"InjectionStart": -20 * 3600.0, "ScanStart": 0, "ImageDecayCorrectionTime": 0},
     "ScanStart is 11 half-lives (20.0 h) after InjectionStart"),
    ({"AttenuationCorrection": "none"}, "AttenuationCorrection says the image is not attenuation-corrected"),
])
def test_a_wrong_field_gives_no_suv_and_says_which(tmp_path, changes, said):
    nii, _, arr = _pet(tmp_path, **changes)
    with pytest.warns(MedfuseWarning, match="PET loaded in Bq/mL, not SUV") as rec:
        v = medfuse.load(nii)
    text = " ".join(str(w.message) for w in rec)
    assert said in text and v.unit == "Bq/mL"
    assert "70 kg" not in text and "70000" not in text  # the weight itself is never shown
    np.testing.assert_array_equal(v.array, arr)


def test_unknown_radionuclide_gives_no_suv(tmp_path):
    nii, _, _ = _pet(tmp_path, TracerRadionuclide="I124")
    with pytest.warns(MedfuseWarning, match=r"TracerRadionuclide 'I124' is not one whose half-life medfuse knows"):
        v = medfuse.load(nii)
    assert v.unit == "Bq/mL"
    assert v.provenance["pet_acquisition"]["radionuclide"] == "I124"
    assert v.provenance["pet_acquisition"]["half_life_s"] is None


@pytest.mark.parametrize("text, said", [
    ('{"Modality": "PT", "Units": "Bq/mL",', "is not valid JSON (line 1, column"),
    ("[1, 2]", "holds a JSON list, not an object"),
])
def test_a_broken_sidecar_is_named_and_the_image_still_loads(tmp_path, text, said):
    nii, side, arr = _pet(tmp_path, sidecar=text)
    before = _sha(side)
    with pytest.warns(MedfuseWarning, match="sub-01_pet.json") as rec:
        v = medfuse.load(nii, modality="PT")
    assert said in " ".join(str(w.message) for w in rec)
    assert v.modality == "PT" and not v.unit.startswith("SUV")
    np.testing.assert_array_equal(v.array, arr)
    assert _sha(side) == before


def test_the_sidecar_is_never_changed(tmp_path):
    nii, side, _ = _pet(tmp_path)
    before = _sha(side), side.stat().st_mtime_ns
    _quiet(medfuse.load, nii)
    _quiet(medfuse.load_volumes, nii)
    _quiet(load_image, nii, suv="none")
    assert (_sha(side), side.stat().st_mtime_ns) == before


def test_suv_options(tmp_path):
    nii, _, arr = _pet(tmp_path)
    assert _quiet(load_image, nii, suv="bw").unit == "SUVbw"
    none = _quiet(load_image_volumes, nii, suv="none")[0]
    assert none.unit == "Bq/mL" and "suv" not in none.provenance
    np.testing.assert_array_equal(none.array, arr)
    with pytest.warns(MedfuseWarning, match="PET loaded in SUVbw .* not SUVlbm as asked"):
        lbm = load_image(nii, suv="lbm")
    assert lbm.unit == "SUVbw" and lbm.provenance["suv"] == "bw"
    with pytest.raises(medfuse.errors.InvalidInputError, match="suv must be one of"):
        load_image(nii, suv="SUV")
    # unit= names the voxels' unit: they are taken as they are, not rescaled.
    named = _quiet(load_image, nii, unit="Bq/mL")
    assert named.unit == "Bq/mL" and "suv_factor" not in named.provenance
    np.testing.assert_array_equal(named.array, arr)


def test_an_image_stored_as_suv_is_not_rescaled(tmp_path):
    nii, _, arr = _pet(tmp_path, Units="GML")  # dcm2niix's Units of a scanner's SUV image
    v = _quiet(medfuse.load, nii)
    assert v.unit == "SUVbw" and "suv_factor" not in v.provenance
    np.testing.assert_array_equal(v.array, arr)
    # medfuse's own tag in the file states the unit: the sidecar is not applied again.
    suvbw = _quiet(medfuse.load, nii.parent / "sub-01_pet.nii.gz")
    out = tmp_path / "out"
    out.mkdir()
    medfuse.save(suvbw, out / "pet.nii.gz")
    (out / "pet.json").write_text(json.dumps({**META, "Units": "Bq/mL"}))
    again = _quiet(medfuse.load, out / "pet.nii.gz")
    assert again.unit == "SUVbw"
    np.testing.assert_allclose(again.array, arr, rtol=1e-6)


def test_a_sidecar_without_suv_fields_loads_in_bq_ml_silently(tmp_path):
    nii, _, arr = _pet(tmp_path, sidecar=json.dumps({"Modality": "PT", "Units": "BQML",
                                                     "ConversionSoftware": "dcm2niix"}))
    v = _quiet(medfuse.load, nii)
    assert (v.modality, v.unit) == ("PT", "Bq/mL")
    assert v.provenance["pet_acquisition"] == dict.fromkeys(
        ("tracer", "radionuclide", "half_life_s", "injected_mbq", "uptake_min", "decay_correction",
         "attenuation_corrected", "attenuation_method"))


def test_a_pet_bids_sidecar_without_modality_is_a_pet(tmp_path):
    nii, _, _ = _pet(tmp_path, Modality=None)  # the BIDS PET section does not require Modality
    v = _quiet(medfuse.load, nii)
    assert (v.modality, v.unit, v.provenance["labels_from"]) == ("PT", "SUVbw", "BIDS sidecar")


def test_no_uptake_time_for_a_scan_before_the_injection_and_no_dates_kept(tmp_path):
    """Decay-corrected to the injection, the times do not enter the factor (as DICOM ADMIN), but a scan started
    before the injection has no uptake time; a tracer name holding a date is not kept (dates identify)."""
    nii, _, _ = _pet(tmp_path, InjectionStart=120, ScanStart=0, ImageDecayCorrectionTime=120,
                     TracerName="FDG 2021-03-04")
    v = _quiet(medfuse.load, nii)
    assert v.provenance["suv_factor"] == pytest.approx(70000.0 / 370e6, rel=1e-9)
    acq = v.provenance["pet_acquisition"]
    assert acq["uptake_min"] is None and acq["tracer"] is None and acq["decay_correction"] == "ADMIN"
