"""PET SUV for infants and children: PatientSize's unit, a plausible body-mass index, lean body mass capped at the
body weight, and ``body=`` (weight, height, sex given in place of the header's).

Expected factors are computed here from the published formulas, written out again (not medfuse's code): the
injected dose is not decayed (DecayCorrection ADMIN), so a factor is the normaliser (g, or cm² for BSA) / dose (Bq).
"""

from __future__ import annotations

import copy
import json
import math
import warnings

import pydicom
import pytest

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning, SUVError
from medfuse.io.suv import series_suv_factors, suv_factor, suv_problem

DOSE = 12e6  # Bq: a neonate's FDG dose (ADMIN: not decayed)
HEADER = {"Units": "BQML", "DecayCorrection": "ADMIN", "CorrectedImage": ["ATTN", "DECY"],
          "RadionuclideTotalDose": DOSE, "RadionuclideHalfLife": 6586.2, "SeriesDate": "20260101",
          "SeriesTime": "110000", "RadiopharmaceuticalStartDateTime": "20260101100000"}
KINDS = ("bw", "lbm", "lbm_janma", "bsa")
BODY_KINDS = ("lbm", "lbm_janma", "bsa")  # the kinds that need a height


def _h(weight, size=None, sex="M", **extra):
    h = {**HEADER, "PatientWeight": weight, "PatientSex": sex, **extra}
    if size is not None:
        h["PatientSize"] = size
    return h


def _dubois_cm2(w_kg, h_m):
    return 0.007184 * w_kg ** 0.425 * (h_m * 100) ** 0.725 * 1e4


def _james_kg(w_kg, h_m, sex):
    a, b = {"M": (1.10, 120.0), "F": (1.07, 148.0)}[sex]
    return a * w_kg - b * (w_kg / (h_m * 100)) ** 2


def _janma_kg(w_kg, h_m, sex):
    bmi = w_kg / h_m ** 2
    return 9270 * w_kg / ((6680 + 216 * bmi) if sex == "M" else (8780 + 244 * bmi))


def _strict(fn, *args, **kwargs):
    """``fn(...)`` with every warning an error: adult and plausible headers say nothing."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        return fn(*args, **kwargs)


# --------------------------------------------------------------------------- hand-computed factors
def test_neonate_factors_by_hand():
    # A term boy, 3.2 kg and 0.52 m (BMI 11.8): Du Bois 0.2066 m², James 3.0656 kg; a girl's Janmahasatian 2.5424 kg
    boy, girl = _h(3.2, 0.52, "M"), _h(3.2, 0.52, "F")
    assert _strict(suv_factor, boy, kind="bw") == pytest.approx(3200.0 / DOSE, rel=1e-12)
    assert _strict(suv_factor, boy, kind="bsa") == pytest.approx(2066.13 / DOSE, rel=1e-5)
    assert _strict(suv_factor, boy, kind="bsa") == pytest.approx(_dubois_cm2(3.2, 0.52) / DOSE, rel=1e-12)
    assert _strict(suv_factor, boy, kind="lbm") == pytest.approx(3065.56 / DOSE, rel=1e-5)
    assert _strict(suv_factor, girl, kind="lbm") == pytest.approx(_james_kg(3.2, 0.52, "F") * 1000 / DOSE, rel=1e-12)
    assert _strict(suv_factor, girl, kind="lbm_janma") == pytest.approx(2542.4 / DOSE, rel=1e-4)
    # A toddler (12.5 kg, 0.86 m): no formula exceeds the weight, nothing is said
    t = _h(12.5, 0.86, "F")
    assert _strict(suv_factor, t, kind="lbm_janma") == pytest.approx(_janma_kg(12.5, 0.86, "F") * 1000 / DOSE)
    assert _strict(suv_factor, t, kind="lbm") == pytest.approx(_james_kg(12.5, 0.86, "F") * 1000 / DOSE)


# --------------------------------------------------------------------------- PatientSize's unit
@pytest.mark.parametrize("size", [520, 5.2, 2.9, 0.052, 1000.0], ids=["mm", "metres typo", "2.9 m", "5.2 cm", "1000"])
def test_an_implausible_height_is_refused_naming_patientsize(size):
    h = _h(3.2, size)
    for kind in BODY_KINDS:
        with pytest.raises(SUVError) as e:
            suv_factor(h, kind=kind)
        msg = str(e.value)
        assert msg.startswith("PatientSize is outside the plausible 0.2-2.75 m") and "metres" in e.value.fix
        assert "James" not in msg and "suv='lbm_janma'" not in msg  # no advice for a height in error
        assert f"{size:g}" not in msg.replace("0.2-2.75", "").replace("20-275", "").replace("0.52", "")
    # SUVbw does not use the height: unchanged, and silent
    assert _strict(suv_factor, h, kind="bw") == pytest.approx(3200.0 / DOSE, rel=1e-12)


def test_a_height_in_centimetres_is_read_as_such_with_a_warning():
    cm, m = _h(3.2, 52), _h(3.2, 0.52)
    for kind in ("lbm", "bsa"):
        with pytest.warns(MedfuseWarning, match="read as centimetres"):
            got = suv_factor(cm, kind=kind)
        assert got == pytest.approx(_strict(suv_factor, m, kind=kind), rel=1e-12)
    # notes= collects it instead of warning, once for the series
    notes = []
    factors = _strict(series_suv_factors, [cm] * 3, kind="bsa", notes=notes)
    assert factors == pytest.approx([_dubois_cm2(3.2, 0.52) / DOSE] * 3, rel=1e-12)
    assert len(notes) == 1 and "PatientSize" in notes[0] and "52" not in notes[0].replace("52 cm is 0.52", "")
    # An adult's 175 (cm) too
    with pytest.warns(MedfuseWarning, match="centimetres"):
        assert suv_factor(_h(70, 175), kind="bsa") == pytest.approx(_dubois_cm2(70, 1.75) / DOSE, rel=1e-12)


# --------------------------------------------------------------------------- body-mass index
def test_grams_entered_as_kilograms_are_caught_by_the_bmi_when_the_height_is_known():
    prem = _h(600, 0.30, "F")  # a 600 g premature girl's weight in grams: BMI 6667
    for kind in KINDS:  # SUVbw too: it would be 1000 times too large
        with pytest.raises(SUVError) as e:
            suv_factor(prem, kind=kind)
        msg = str(e.value)
        assert msg.startswith("PatientWeight and PatientSize give a body-mass index") and "grams" in msg
        assert "James" not in msg and "suv='lbm_janma'" not in msg and "600" not in msg
    assert "grams" in suv_problem(prem, kind="bw")
    # Without a height SUVbw cannot tell 600 kg from 600 g (documented): taken as 600 kg
    assert _strict(suv_factor, _h(600, None, "F"), kind="bw") == pytest.approx(600e3 / DOSE, rel=1e-12)
    # The same infant in kilograms is fine: 0.6 kg at 0.30 m is a BMI of 6.7
    assert _strict(suv_factor, _h(0.6, 0.30, "F"), kind="bsa") == pytest.approx(_dubois_cm2(0.6, 0.30) / DOSE)


def test_a_height_the_weight_cannot_belong_to_is_refused_for_the_kinds_that_use_it():
    h = _h(3.2, 2.7)  # 2.7 m is a height, but not a 3.2 kg baby's: BMI 0.44
    for kind in BODY_KINDS:
        with pytest.raises(SUVError, match="body-mass index .*below any patient's"):
            suv_factor(h, kind=kind)
    assert _strict(suv_factor, h, kind="bw") == pytest.approx(3200.0 / DOSE)  # the weight is not in doubt
    # A premature infant's low BMI (0.9 kg, 0.36 m: 6.9) is accepted
    assert _strict(suv_factor, _h(0.9, 0.36, "F"), kind="lbm") == pytest.approx(
        _james_kg(0.9, 0.36, "F") * 1000 / DOSE, rel=1e-12)


# --------------------------------------------------------------------------- lean body mass capped at the weight
@pytest.mark.parametrize("kind,w,size,formula", [
    ("lbm_janma", 3.2, 0.52, _janma_kg),  # BMI 11.8 < 12.0: 3.212 kg > 3.2 kg
    ("lbm", 0.9, 0.36, _james_kg),        # BMI 6.9 < 8.3: 0.915 kg > 0.9 kg
])
def test_lean_body_mass_above_the_weight_is_capped_with_a_warning(kind, w, size, formula):
    h = _h(w, size, "M")
    assert formula(w, size, "M") > w  # the formula's own value exceeds the weight
    with pytest.warns(MedfuseWarning, match="capped at the body weight") as rec:
        got = suv_factor(h, kind=kind)
    assert got == pytest.approx(w * 1000 / DOSE, rel=1e-12) == suv_factor(h, kind="bw")
    msg = str(rec[0].message)
    assert "adults" in msg and f"{w:g}" not in msg and f"{size:g}" not in msg


def test_a_stored_capped_lbm_converts_back_exactly():
    # medfuse's own SUVlbm (GML, LBM, Janmahasatian recorded) of a neonate: undone with the same cap
    h = _h(3.2, 0.52, "M", Units="GML", SUVType="LBM", LBMFormula="janmahasatian")
    notes = []
    assert suv_factor(h, kind="bw", notes=notes) == pytest.approx(1.0, rel=1e-12)
    assert any("capped" in n for n in notes)


# --------------------------------------------------------------------------- adults unchanged
REAL = ["BQML_AC_DT_lessThan_S_DT_SIEMENS", "CPS_AND_BQML_AC_DT_-_S_DT", "GE_MEDICAL_AND_BQML", "PHILIPS_BQML",
        "PHILIPS_CNTS_AND_BQML_SUV", "PHILIPS_CNTS_AND_SUV", "RADIOPHARM_DATETIME_UNDEFINED", "SIEMENS"]


def test_reference_adult_is_unchanged_and_silent(shared, monkeypatch):
    import medfuse.io.suv as suv_module

    monkeypatch.setattr(suv_module, "DOSE_RANGE_BQ", (0.0, math.inf))  # the calculator's 100 Bq (test_suv.py)
    cases = json.loads(shared("reference", "pet-suv-expected.json").read_text())["cases"]
    case = next(c for c in cases if c["header"].get("PatientSize"))
    for key, kind in (("suvbw", "bw"), ("suvbsa", "bsa"), ("suvlbm", "lbm"), ("suvlbmJanma", "lbm_janma")):
        assert _strict(suv_factor, copy.deepcopy(case["header"]), kind=kind) == pytest.approx(
            case["expected"][key], rel=1e-6)


@pytest.mark.parametrize("name", REAL)
def test_real_adult_headers_give_the_formulas_and_say_nothing(shared, name):
    headers = json.loads(shared("data", "pet-suv-headers", f"{name}-instances.json").read_text())
    bw = _strict(series_suv_factors, headers, kind="bw")
    h0 = headers[0]
    if h0.get("PatientSize") is None:  # six of the eight have no height: the refusal is as before
        assert suv_problem(headers, kind="bsa").startswith("PatientSize is missing")
        return
    w, size, sex = float(h0["PatientWeight"]), float(h0["PatientSize"]), h0["PatientSex"]
    expected = {"bsa": _dubois_cm2(w, size), "lbm": _james_kg(w, size, sex) * 1000,
                "lbm_janma": _janma_kg(w, size, sex) * 1000}
    for kind, normaliser in expected.items():
        got = _strict(series_suv_factors, headers, kind=kind)
        assert got == pytest.approx([b * normaliser / (w * 1000) for b in bw], rel=1e-12), kind


# --------------------------------------------------------------------------- loading a DICOM PET
def _pet_copy(samples_dir, dest, **tags):
    """Four slices of the sample PET (PatientWeight 70, no PatientSize), with header values changed (None: removed)."""
    dest.mkdir()
    for f in sorted((samples_dir / "pet").glob("*.dcm"))[30:34]:
        ds = pydicom.dcmread(str(f))
        for k, v in tags.items():
            if v is None:
                delattr(ds, k)
            else:
                setattr(ds, k, v)
        ds.save_as(str(dest / f.name))
    return dest


def test_loading_a_neonate_with_a_height_in_millimetres_falls_back_to_suvbw(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientWeight="3.2", PatientSize="520", PatientSex="M")
    with pytest.warns(MedfuseWarning, match="SUVbw .*not SUVbsa as asked: PatientSize is outside") as rec:
        v = medfuse.load(folder, suv="bsa")
    assert v.unit == "SUVbw" and not any("520" in str(m.message) for m in rec)


def test_loading_a_weight_in_grams_with_a_height_gives_bq_ml_and_says_grams(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet", PatientWeight="600", PatientSize="0.30", PatientSex="F")
    with pytest.warns(MedfuseWarning, match="grams") as rec:
        v = medfuse.load(folder)  # suv='auto': SUVbw
    assert v.unit == "Bq/mL" and not any("600" in str(m.message) for m in rec)


def test_body_given_in_place_of_the_header(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet")  # 70 kg, no height, no sex given to SUV
    bw = _strict(medfuse.load, folder, suv="bw")
    body = {"height_m": 1.75, "sex": "M"}
    v = _strict(medfuse.load, folder, suv="bsa", body=body)
    assert v.unit == "SUVbsa"
    assert v.provenance["suv_factor"] == pytest.approx(bw.provenance["suv_factor"] * _dubois_cm2(70, 1.75) / 70000,
                                                       rel=1e-9)
    source = v.provenance["suv_source"]
    assert "body= gave height_m, sex in place of the header's PatientSize, PatientSex" in source
    assert "1.75" not in source and "1.75" not in " ".join(v.provenance["warnings"])
    # The weight too (a neonate's, 3.2 kg), and the cap applies to it as to a header's
    with pytest.warns(MedfuseWarning, match="capped"):
        v = medfuse.load(folder, suv="lbm_janma", body={"weight_kg": 3.2, "height_m": 0.52, "sex": "M"})
    assert v.provenance["suv_factor"] == pytest.approx(bw.provenance["suv_factor"] * 3.2 / 70, rel=1e-9)
    assert medfuse.load_volumes(folder, suv="bsa", body=body)[0].unit == "SUVbsa"


@pytest.mark.parametrize("body,words", [
    (3.2, "must be a dict"), ({}, "no key"), ({"weight": 3.2}, "unknown key"), ({"weight_kg": True}, "finite number"),
    ({"weight_kg": 3200}, "grams"), ({"height_m": 52}, "centimetres"), ({"sex": "X"}, "'M' or 'F'"),
])
def test_a_wrong_body_is_refused_before_reading(tmp_path, body, words):
    with pytest.raises(InvalidInputError, match=words) as e:
        medfuse.load(tmp_path / "no-such-folder", body=body)
    assert "body=" in e.value.fix


def test_body_on_a_non_pet_is_said_unused(samples_dir):
    with pytest.warns(MedfuseWarning, match="body= was not used"):
        medfuse.load(samples_dir / "mr_t1.nii.gz", body={"weight_kg": 70})
