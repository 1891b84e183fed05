"""The tracer, injected activity and uptake time of a PET (provenance["pet_acquisition"]): values against the
headers themselves, None for what is absent, damaged or disagreed on, and never a date or a time of day."""

from __future__ import annotations

import copy
import json
import re
import warnings
from datetime import datetime, timedelta

import pydicom
import pytest
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

import medfuse
from medfuse.errors import InvalidInputError
from medfuse.io.suv import ACQUISITION_KEYS, acquisition_facts, header_from_dataset

SCHEMA = {"tracer": str, "radionuclide": str, "half_life_s": float, "injected_mbq": float, "uptake_min": float,
          "decay_correction": str}
#: provenance["pet_acquisition"] of a loaded series: acquisition_facts' keys, then the DICOM reader's attenuation
#: correction (medfuse.io.dicom._attenuation_facts).
PROVENANCE_SCHEMA = {**SCHEMA, "attenuation_corrected": bool, "attenuation_method": str}
#: Any date or time of day as text: 8 digits (DA), a DT/TM's 6 digits, 2020-12-17, 17.12.2020, 10:45.
_DATE_OR_TIME = re.compile(r"\d{6}|\d{4}[-/.]\d{1,2}[-/.]\d{1,2}|\d{1,2}[-/.]\d{1,2}[-/.]\d{2,4}|\d{1,2}:\d{2}")
REAL = ("BQML_AC_DT_lessThan_S_DT_SIEMENS", "CPS_AND_BQML_AC_DT_-_S_DT", "GE_MEDICAL_AND_BQML", "PHILIPS_BQML",
        "PHILIPS_CNTS_AND_BQML_SUV", "PHILIPS_CNTS_AND_SUV", "RADIOPHARM_DATETIME_UNDEFINED", "SIEMENS")


def _check_schema(facts):
    """Exactly the schema's keys (acquisition_facts', or a loaded volume's with its attenuation correction), each
    None or of its type, and no date or time of day in any value."""
    assert list(SCHEMA) == list(ACQUISITION_KEYS)
    schema = PROVENANCE_SCHEMA if len(facts) > len(SCHEMA) else SCHEMA
    assert list(facts) == list(schema)
    for key, value in facts.items():
        assert value is None or type(value) is schema[key], (key, value)  # numbers are floats, never a datetime
        if isinstance(value, str):
            assert not _DATE_OR_TIME.search(value), (key, value)


def _dt(text):
    """A DICOM DA+TM or DT (with its fraction of a second, without an offset) as a datetime."""
    main, _, frac = str(text).strip().partition(".")
    frac = frac.strip()
    return datetime.strptime(main[:14], "%Y%m%d%H%M%S") + timedelta(seconds=float("0." + frac) if frac else 0.0)


def _expected_uptake(headers):
    """Minutes from the injection to the scan start, from the header times alone: the series time unless an
    acquisition started before it (then the earliest acquisition); the injection's date-time, or its time on the
    scan's day."""
    h0 = headers[0]
    series = _dt(h0["SeriesDate"] + h0["SeriesTime"])
    earliest = min(_dt(h["AcquisitionDate"] + h["AcquisitionTime"]) for h in headers)
    scan = series if series <= earliest else earliest
    if h0.get("RadiopharmaceuticalStartDateTime"):
        inj = _dt(h0["RadiopharmaceuticalStartDateTime"])
    else:
        inj = _dt(scan.strftime("%Y%m%d") + h0["RadiopharmaceuticalStartTime"])
    return (scan - inj).total_seconds() / 60.0


def _real(shared, name):
    return json.loads(shared("data", "pet-suv-headers", f"{name}-instances.json").read_text())


@pytest.mark.parametrize("name", REAL)
def test_real_vendor_headers(shared, name):
    hs = _real(shared, name)
    facts = acquisition_facts(hs)
    _check_schema(facts)
    h0 = hs[0]
    assert facts["half_life_s"] == pytest.approx(float(h0["RadionuclideHalfLife"]), rel=1e-12)
    assert facts["injected_mbq"] == pytest.approx(float(h0["RadionuclideTotalDose"]) / 1e6, rel=1e-12)
    assert facts["decay_correction"] == h0["DecayCorrection"].strip() == "START"
    assert facts["uptake_min"] == pytest.approx(_expected_uptake(hs), abs=1e-6)
    assert 30 < facts["uptake_min"] < 180  # FDG: imaged about an hour (to two) after the injection
    # These exports name no tracer and no radionuclide.
    assert facts["tracer"] is None and facts["radionuclide"] is None


def test_real_uptake_figures(shared):
    """Two cases worked by hand: the Siemens series time 10:48:29 after the injection at 08:30:45; the CPS series
    whose series time (13:49:18) is after its acquisition (13:03:48.234), injected at 12:00:37."""
    assert acquisition_facts(_real(shared, "SIEMENS"))["uptake_min"] == pytest.approx(137 + 44 / 60, abs=1e-9)
    cps = acquisition_facts(_real(shared, "CPS_AND_BQML_AC_DT_-_S_DT"))["uptake_min"]
    assert cps == pytest.approx(63 + 11.234 / 60, abs=1e-9)


def test_sample_pet_provenance(samples_dir):
    files = sorted((samples_dir / "pet").glob("*.dcm"))
    ds = pydicom.dcmread(str(files[0]), stop_before_pixels=True)
    item = ds.RadiopharmaceuticalInformationSequence[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        vol = medfuse.load(samples_dir / "pet")
    facts = vol.provenance["pet_acquisition"]
    _check_schema(facts)
    scan = _dt(ds.SeriesDate + ds.SeriesTime)
    assert scan <= _dt(ds.AcquisitionDate + ds.AcquisitionTime)
    assert facts == {"tracer": str(item.Radiopharmaceutical),
                     "radionuclide": None,  # its RadionuclideCodeSequence is empty
                     "half_life_s": pytest.approx(float(item.RadionuclideHalfLife)),
                     "injected_mbq": pytest.approx(float(item.RadionuclideTotalDose) / 1e6),
                     "uptake_min": pytest.approx((scan - _dt(item.RadiopharmaceuticalStartDateTime)).total_seconds()
                                                 / 60),
                     "decay_correction": str(ds.DecayCorrection),
                     "attenuation_corrected": "ATTN" in ds.CorrectedImage,  # it holds ATTN and DECY
                     "attenuation_method": None}  # no AttenuationCorrectionMethod
    assert facts["attenuation_corrected"] is True and "AttenuationCorrectionMethod" not in ds
    assert facts["tracer"] == "Fluorodeoxyglucose" and facts["injected_mbq"] == pytest.approx(250.0)
    # A copy of the Volume keeps it; a CT has none.
    assert vol.copy().provenance["pet_acquisition"] == facts
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert "pet_acquisition" not in medfuse.load(samples_dir / "ct").provenance


def _series_copy(samples_dir, dest, edit=None, n=6):
    """``n`` slices of the sample PET; ``edit(index, dataset)`` changes each before it is written."""
    dest.mkdir()
    for i, f in enumerate(sorted((samples_dir / "pet").glob("*.dcm"))[28:28 + n]):
        ds = pydicom.dcmread(str(f))
        if edit is not None:
            edit(i, ds)
        ds.save_as(str(dest / f.name))
    return dest


def _load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medfuse.load(folder)


def test_code_sequences_name_tracer_and_radionuclide(samples_dir, tmp_path):
    def edit(_, ds):
        item = ds.RadiopharmaceuticalInformationSequence[0]
        del item.Radiopharmaceutical
        code = Dataset()
        code.CodeValue, code.CodingSchemeDesignator, code.CodeMeaning = "C-B1031", "SRT", "Fluorodeoxyglucose F^18^"
        nuclide = Dataset()
        nuclide.CodeValue, nuclide.CodingSchemeDesignator, nuclide.CodeMeaning = "C-111A1", "SRT", "^18^Fluorine"
        item.RadiopharmaceuticalCodeSequence = Sequence([code])
        item.RadionuclideCodeSequence = Sequence([nuclide])

    facts = _load(_series_copy(samples_dir, tmp_path / "coded", edit)).provenance["pet_acquisition"]
    _check_schema(facts)
    assert facts["tracer"] == "Fluorodeoxyglucose F^18^"
    assert facts["radionuclide"] == "^18^Fluorine"  # as stated, superscript marks kept


def test_disagreeing_instances_give_none(samples_dir, tmp_path):
    def edit(i, ds):
        if i == 3:  # one slice says another dose and another tracer
            ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose = "300000000"
            ds.RadiopharmaceuticalInformationSequence[0].Radiopharmaceutical = "Fluciclovine"

    vol = _load(_series_copy(samples_dir, tmp_path / "mixed", edit))
    facts = vol.provenance["pet_acquisition"]
    _check_schema(facts)
    assert facts["injected_mbq"] is None and facts["tracer"] is None
    assert vol.unit == "Bq/mL"  # no SUV either: the dose differs between instances
    # What they agree on is kept.
    assert facts["half_life_s"] == pytest.approx(6586.2) and facts["decay_correction"] == "START"
    assert facts["uptake_min"] == pytest.approx(60.0)


def test_disagreeing_injection_times_give_no_uptake(shared):
    hs = copy.deepcopy(_real(shared, "GE_MEDICAL_AND_BQML"))
    hs[1]["RadiopharmaceuticalStartDateTime"] = "20201217090000.00"
    facts = acquisition_facts(hs)
    assert facts["uptake_min"] is None
    assert facts["injected_mbq"] == pytest.approx(152.02272)
    hs = copy.deepcopy(_real(shared, "PHILIPS_BQML"))
    hs[2]["RadionuclideTotalDose"] = 1.26e9
    assert acquisition_facts(hs)["injected_mbq"] is None


@pytest.mark.parametrize("key,value,gone", [
    ("RadionuclideTotalDose", "abc", "injected_mbq"),
    ("RadionuclideTotalDose", float("nan"), "injected_mbq"),
    ("RadionuclideTotalDose", -3.7e8, "injected_mbq"),
    ("RadionuclideTotalDose", True, "injected_mbq"),
    ("RadionuclideHalfLife", "6586,2", "half_life_s"),
    ("RadionuclideHalfLife", 0, "half_life_s"),
    ("RadiopharmaceuticalStartDateTime", "2020121708XX45", "uptake_min"),
    ("RadiopharmaceuticalStartDateTime", "20201217113000", "uptake_min"),  # after the scan: no uptake time
    ("RadiopharmaceuticalStartDateTime", "20201210083045", "uptake_min"),  # a week early: a wrong date
    ("SeriesDate", "2020-1x-17", "uptake_min"),
    ("DecayCorrection", 7, "decay_correction"),
    ("Radiopharmaceutical", "FDG 17.12.2020", "tracer"),  # a date in free text is never kept
])
def test_damaged_values_give_none(shared, key, value, gone):
    hs = copy.deepcopy(_real(shared, "SIEMENS"))
    for h in hs:
        h[key] = value
    facts = acquisition_facts(hs)
    _check_schema(facts)
    assert facts[gone] is None
    good = acquisition_facts(_real(shared, "SIEMENS"))
    assert {k: v for k, v in facts.items() if k != gone and k != "uptake_min"} == \
        {k: v for k, v in good.items() if k != gone and k != "uptake_min"}


def test_absent_values_give_none():
    assert acquisition_facts([{}]) == dict.fromkeys(SCHEMA)
    assert acquisition_facts([]) == dict.fromkeys(SCHEMA)
    with pytest.raises(InvalidInputError):
        acquisition_facts({"Units": "BQML"})  # one dict where a list is wanted


def test_damaged_dicom_dose_loads(samples_dir, tmp_path):
    """A RadionuclideTotalDose that is no number in the file (patched in its bytes, as pydicom would not write it):
    None, and the series still loads (in Bq/mL, the SUV needing the dose)."""
    folder = tmp_path / "bad"
    folder.mkdir()
    for f in sorted((samples_dir / "pet").glob("*.dcm"))[28:34]:
        raw = f.read_bytes()
        assert raw.count(b"250000000.0 ") == 1  # the sample's dose, as its DS is written
        (folder / f.name).write_bytes(raw.replace(b"250000000.0 ", b"2.5e8MBq    "))
    vol = _load(folder)
    facts = vol.provenance["pet_acquisition"]
    _check_schema(facts)
    assert facts["injected_mbq"] is None and facts["tracer"] == "Fluorodeoxyglucose"
    assert facts["uptake_min"] == pytest.approx(60.0) and vol.unit == "Bq/mL"


def test_header_from_dataset_keeps_names(samples_dir):
    ds = pydicom.dcmread(str(sorted((samples_dir / "pet").glob("*.dcm"))[0]), stop_before_pixels=True)
    h = header_from_dataset(ds)
    assert h["Radiopharmaceutical"] == "Fluorodeoxyglucose"
    assert "RadionuclideCodeMeaning" not in h  # an empty code sequence names nothing


def test_spect_with_radiopharmaceutical(samples_dir, tmp_path):
    """An NM series whose header names its radiopharmaceutical carries the facts too."""
    def edit(_, ds):
        ds.Modality = "NM"
        item = ds.RadiopharmaceuticalInformationSequence[0]
        item.Radiopharmaceutical = "Tc-99m HMPAO"
        item.RadionuclideHalfLife = "21624.12"
        item.RadionuclideTotalDose = "740000000"

    vol = _load(_series_copy(samples_dir, tmp_path / "nm", edit))
    assert vol.modality == "NM"
    facts = vol.provenance["pet_acquisition"]
    _check_schema(facts)
    assert facts["tracer"] == "Tc-99m HMPAO" and facts["injected_mbq"] == pytest.approx(740.0)
    assert facts["half_life_s"] == pytest.approx(21624.12)
