"""SUV factors against the reference calculator's cases and real vendor headers."""

from __future__ import annotations

import copy
import json
import math

import pydicom
import pytest
from pydicom.dataset import Dataset

import medfuse.io.suv as suv_module
from medfuse.errors import SUVError
from medfuse.io.suv import header_from_dataset, series_suv_factors, stored_unit, suv_factor, suv_problem

KIND = {"suvbw": "bw", "suvbsa": "bsa", "suvlbm": "lbm", "suvlbmJanma": "lbm_janma"}
PHI_VALUES = ("75", "1.85", "100")
#: The injected dose (Bq) of the tests' headers: the calculator's cases inject 100 Bq, an arithmetic input that
#: DOSE_RANGE_BQ refuses as a dose; 100 MBq keeps their numbers (the factor scales by 1/dose).
DOSE = 100e6


def _expected(shared):
    return json.loads(shared("reference", "pet-suv-expected.json").read_text())


def test_reference_cases_exact(shared, monkeypatch):
    # The calculator's cases inject 100 Bq (arithmetic inputs, not a dose; see DOSE): the plausibility bounds are
    # lifted for them only, the factors are the calculator's.
    monkeypatch.setattr(suv_module, "DOSE_RANGE_BQ", (0.0, math.inf))
    cases = _expected(shared)["cases"]
    assert len(cases) == 4
    n = 0
    for case in cases:
        for key, value in case["expected"].items():
            got = suv_factor(case["header"], kind=KIND[key])
            assert got == pytest.approx(value, rel=1e-6), (case["name"], key)
            assert series_suv_factors([case["header"]] * 3, kind=KIND[key]) == pytest.approx([value] * 3, rel=1e-6)
            n += 1
    assert n == 7


def _base(shared):
    """The calculator's BQML case with a real dose (:data:`DOSE`)."""
    return {**copy.deepcopy(_expected(shared)["cases"][3]["header"]), "RadionuclideTotalDose": DOSE}


def _refusals(shared):
    """One header per entry of errors_expected_for, in order."""
    b = _base(shared)
    no_attn = {**b, "CorrectedImage": ["DECY"]}
    bad_units = {**b, "Units": "PROPCPS"}
    negative = {**b, "DecayCorrection": "START", "RadiopharmaceuticalStartDateTime": "20201023105417"}
    no_weight = {k: v for k, v in b.items() if k != "PatientWeight"}
    cnts = {**_expected(shared)["cases"][1]["header"], "PhilipsSUVScaleFactor": 0,
            "PhilipsActivityConcentrationScaleFactor": 0}
    return [no_attn, bad_units, negative, no_weight, cnts]


@pytest.mark.parametrize("index,words", [
    (0, "CorrectedImage"), (1, "Units"), (2, "negative decay time"), (3, "PatientWeight"), (4, "7053,1000"),
])
def test_refusals(shared, index, words):
    assert len(_expected(shared)["errors_expected_for"]) == 6
    header = _refusals(shared)[index]
    with pytest.raises(SUVError) as e:
        suv_factor(header)
    msg = str(e.value)
    assert words in msg and "Fix:" in msg
    # weight/size/dose values never appear in the message
    assert not any(f" {v} " in f" {msg} " for v in PHI_VALUES)


def test_zero_weight_and_inconsistent_series(shared):
    b = _base(shared)
    with pytest.raises(SUVError, match="PatientWeight"):
        suv_factor({**b, "PatientWeight": 0})
    with pytest.raises(SUVError, match="RadionuclideTotalDose differs"):
        series_suv_factors([b, {**b, "RadionuclideTotalDose": 2 * DOSE}])


def test_start_decay_correction_decays_dose(shared):
    b = {**_base(shared), "DecayCorrection": "START", "RadionuclideHalfLife": 6586.2,
         "RadiopharmaceuticalStartDateTime": "20201023085417"}  # one hour before the scan
    expected = 75 * 1000 / (DOSE * math.exp(-math.log(2) * 3600 / 6586.2))
    assert suv_factor(b) == pytest.approx(expected, rel=1e-9)


@pytest.mark.parametrize("start", ["20201022085417", "20201013085417"], ids=["a day early", "ten days early"])
def test_an_injection_date_many_half_lives_before_the_scan_is_refused(shared, start):
    """A wrong injection date under START gave factors of 1e7 (a day: 13 FDG half-lives) to 1e43, without a word."""
    from medfuse.errors import SUVError

    b = {**_base(shared), "DecayCorrection": "START", "RadionuclideHalfLife": 6586.2,
         "RadiopharmaceuticalStartDateTime": start}
    with pytest.raises(SUVError, match="half-lives .* after the injection") as e:
        suv_factor(b)
    assert "RadiopharmaceuticalStartDateTime" in e.value.fix
    # Five hours (2.7 half-lives), a late FDG scan: still a factor
    late = {**b, "RadiopharmaceuticalStartDateTime": "20201023045417"}
    assert suv_factor(late) == pytest.approx(75 * 1000 / (DOSE * math.exp(-math.log(2) * 5 * 3600 / 6586.2)))


REAL = ["BQML_AC_DT_lessThan_S_DT_SIEMENS", "CPS_AND_BQML_AC_DT_-_S_DT", "GE_MEDICAL_AND_BQML", "PHILIPS_BQML",
        "PHILIPS_CNTS_AND_BQML_SUV", "PHILIPS_CNTS_AND_SUV", "RADIOPHARM_DATETIME_UNDEFINED", "SIEMENS"]


@pytest.mark.parametrize("name", REAL)
def test_real_headers_plausible(shared, name):
    headers = json.loads(shared("data", "pet-suv-headers", f"{name}-instances.json").read_text())
    factors = series_suv_factors(headers)
    assert len(factors) == len(headers)
    for f in factors:
        assert math.isfinite(f) and 1e-5 < f < 1e-2
    # ~5 kBq/mL of FDG in tissue must give an SUV between 0.5 and 20
    assert 0.5 < 5000 * factors[0] < 20
    if headers[0]["Units"] == "CNTS" and headers[0]["PhilipsPETPrivateGroup"].get("SUVScaleFactor"):
        assert factors[0] == pytest.approx(float(headers[0]["PhilipsPETPrivateGroup"]["SUVScaleFactor"]))


def test_series_after_acquisition_uses_earliest_acquisition(shared):
    headers = json.loads(shared("data", "pet-suv-headers", "CPS_AND_BQML_AC_DT_-_S_DT-instances.json").read_text())
    h = headers[0]
    # series 13:49:18 is after acquisition 13:03:48: decay must run to the earliest acquisition time
    earliest = min(x["AcquisitionTime"] for x in headers)
    hh, mm, ss = int(earliest[:2]), int(earliest[2:4]), float(earliest[4:])
    dt = (hh * 3600 + mm * 60 + ss) - (12 * 3600 + 0 * 60 + 37)
    expected = h["PatientWeight"] * 1000 / (h["RadionuclideTotalDose"] * math.exp(-math.log(2) * dt / h["RadionuclideHalfLife"]))
    assert series_suv_factors(headers)[0] == pytest.approx(expected, rel=1e-9)


def test_gml_real_like_gives_one(shared):
    h = {**_base(shared), "Units": "GML"}
    assert suv_factor(h) == 1.0


def test_header_from_dataset_reads_tags_and_private_groups():
    ds = Dataset()
    ds.Units = "CNTS"
    ds.DecayCorrection = "START"
    ds.CorrectedImage = ["ATTN", "DECY"]
    ds.PatientWeight = "70"
    ds.PatientSize = "1.7"
    ds.PatientSex = "F"
    ds.SeriesDate, ds.SeriesTime = "20201217", "101500"
    ds.AcquisitionDate, ds.AcquisitionTime = "20201217", "101501"
    item = Dataset()
    item.RadionuclideHalfLife = "6586.2"
    item.RadionuclideTotalDose = "3.5e8"
    item.RadiopharmaceuticalStartTime = "091500"
    ds.RadiopharmaceuticalInformationSequence = pydicom.Sequence([item])
    block = ds.private_block(0x7053, "Philips PET Private Group", create=True)
    block.add_new(0x00, "DS", "0.000551")
    block.add_new(0x09, "DS", "1.602563")
    h = header_from_dataset(ds)
    assert h["Units"] == "CNTS" and h["CorrectedImage"] == ["ATTN", "DECY"]
    assert h["RadionuclideTotalDose"] == 3.5e8 and h["RadiopharmaceuticalStartTime"] == "091500"
    assert h["PhilipsSUVScaleFactor"] == pytest.approx(0.000551)
    assert h["PhilipsActivityConcentrationScaleFactor"] == pytest.approx(1.602563)
    assert suv_factor(h) == pytest.approx(0.000551)
    del ds.RadiopharmaceuticalInformationSequence
    ds.Units = "BQML"
    with pytest.raises(SUVError, match="RadionuclideTotalDose"):
        suv_factor(header_from_dataset(ds))


def test_suv_problem_names_the_tag(shared):
    b = _base(shared)
    assert suv_problem(b) is None
    msg = suv_problem({k: v for k, v in b.items() if k != "RadionuclideTotalDose"})
    assert "RadionuclideTotalDose" in msg
    assert "PatientSize" in suv_problem({k: v for k, v in b.items() if k != "PatientSize"}, kind="bsa")


def test_time_only_injection_before_midnight_scan_after(shared):
    """Injection 23:30 (time only), scan 00:30 the next day: 1 h of decay, not a refusal."""
    headers = json.loads(shared("data", "pet-suv-headers", "BQML_AC_DT_lessThan_S_DT_SIEMENS-instances.json").read_text())
    assert all("RadiopharmaceuticalStartDateTime" not in h for h in headers)  # a real time-only header
    moved = [{**h, "RadiopharmaceuticalStartTime": "233000.000000", "SeriesDate": "20201218", "SeriesTime": "003000",
              "AcquisitionDate": "20201218", "AcquisitionTime": "003000"} for h in headers]
    h = headers[0]
    expected = h["PatientWeight"] * 1000 / (h["RadionuclideTotalDose"] * math.exp(-math.log(2) * 3600 / h["RadionuclideHalfLife"]))
    assert series_suv_factors(moved) == pytest.approx([expected] * len(moved), rel=1e-9)
    assert suv_factor(moved[0]) == pytest.approx(expected, rel=1e-9)
    # an explicit injection date-time after the scan is still refused
    with pytest.raises(SUVError, match="negative decay time"):
        suv_factor({**moved[0], "RadiopharmaceuticalStartDateTime": "20201218013000"})


def test_time_only_injection_dated_by_the_scan_not_a_recreated_series(shared):
    """Series re-created days later (series time after acquisition): the injection is on the acquisition day."""
    headers = json.loads(shared("data", "pet-suv-headers", "CPS_AND_BQML_AC_DT_-_S_DT-instances.json").read_text())
    expected = series_suv_factors(headers)
    later = [{**h, "SeriesDate": "20201220"} for h in headers]
    assert series_suv_factors(later) == pytest.approx(expected, rel=1e-12)


def test_injection_datetime_in_utc_moved_into_series_timezone(shared):
    """Injection written as 09:00 UTC, series in local time UTC+01:00 at 11:00: 1 h of uptake, not 2 h."""
    b = {**_base(shared), "DecayCorrection": "START", "RadionuclideHalfLife": 6586.2,
         "SeriesTime": "105417", "AcquisitionTime": "105417", "TimezoneOffsetFromUTC": "+0100",
         "RadiopharmaceuticalStartDateTime": "20201023085417+0000"}
    expected = 75 * 1000 / (DOSE * math.exp(-math.log(2) * 3600 / 6586.2))
    assert suv_factor(b) == pytest.approx(expected, rel=1e-9)
    # the same instant written in the local offset, or with no offset at all: the same factor
    assert suv_factor({**b, "RadiopharmaceuticalStartDateTime": "20201023095417+0100"}) == pytest.approx(expected, rel=1e-9)
    assert suv_factor({**b, "RadiopharmaceuticalStartDateTime": "20201023095417"}) == pytest.approx(expected, rel=1e-9)
    ds = Dataset()
    ds.TimezoneOffsetFromUTC = "+0100"
    assert header_from_dataset(ds)["TimezoneOffsetFromUTC"] == "+0100"


# --------------------------------------------------------------------------- review probe r32 (SUV header checks)
def test_gml_with_an_suvtype_medfuse_has_no_kind_for_is_not_suvbw(shared):
    """GML with SUVType IBW (ideal body weight) was labelled SUVbw, and saved back as SUVType BW."""
    b = {**_base(shared), "Units": "GML"}
    assert stored_unit({**b, "SUVType": "IBW"}) == "arbitrary"
    for suv_type, unit in ((None, "SUVbw"), ("BW", "SUVbw"), (" bw ", "SUVbw"), ("LBM", "SUVlbm"), ("BSA", "SUVbsa")):
        assert stored_unit({**b, "SUVType": suv_type}) == unit, suv_type
    assert stored_unit({**b, "Units": "CM2ML", "SUVType": "BSA"}) == "SUVbsa"
    assert stored_unit({**b, "Units": "CM2ML", "SUVType": "BW"}) == "arbitrary"
    msg = suv_problem({**b, "SUVType": "IBW"})
    assert "'IBW'" in msg and "ideal body weight" in msg and "not SUVbw" in msg
    assert suv_factor({**b, "SUVType": "BW"}) == suv_factor({k: v for k, v in b.items() if k != "SUVType"}) == 1.0


@pytest.mark.parametrize("dose", [370.0, 10.0, 99e3, 6e10])
def test_an_implausible_dose_is_refused_naming_the_tag(shared, dose):
    """370 (MBq typed as Bq) gave a factor 1e6 times too large: 189.19 where 370 MBq gives 1.89e-4."""
    b = {**_base(shared), "RadionuclideTotalDose": dose}
    with pytest.raises(SUVError) as e:
        suv_factor(b)
    assert "RadionuclideTotalDose" in e.value.problem and "Bq" in e.value.problem
    assert "RadionuclideTotalDose" in e.value.fix and "suv='none'" in e.value.fix
    assert not any(v in str(e.value) for v in ("75", "1.85"))  # weight and size never shown
    assert "RadionuclideTotalDose" in suv_problem(b)
    with pytest.raises(SUVError, match="RadionuclideTotalDose"):
        series_suv_factors([b, b])
    # The likely slip for the side it is on: a too-high dose was asked "MBq or mCi entered as Bq?".
    assert ("entered as becquerels" in e.value.problem) == (dose < 1e5)


@pytest.mark.parametrize("dose", [1e5, 37e6, 370e6, 800e6, 5e10])
def test_real_doses_give_weight_over_dose(shared, dose):
    """Zr-89 (37 MBq), FDG (370-800 MBq) and the bounds themselves are accepted: ADMIN, so weight(g) / dose."""
    assert suv_factor({**_base(shared), "RadionuclideTotalDose": dose}) == pytest.approx(75 * 1000 / dose, rel=1e-12)


def _time_only(shared, injection):
    b = {k: v for k, v in _base(shared).items() if k != "RadiopharmaceuticalStartDateTime"}
    return {**b, "DecayCorrection": "START", "RadionuclideHalfLife": 6586.2, "SeriesTime": "100000",
            "AcquisitionTime": "100000", "RadiopharmaceuticalStartTime": injection}


@pytest.mark.parametrize("injection", ["100030", "130000", "215959"])
def test_a_time_only_injection_a_little_after_the_scan_start_is_before_the_injection(shared, injection):
    """Injection 30 s after a 10:00 scan start, time only: moved to the day before, it was reported as '13
    half-lives (24.0 h) after the injection'; with a date it said the scan is before the injection."""
    h = _time_only(shared, injection)
    msg = suv_problem(h)
    assert "before the injection" in msg and "half-lives" not in msg
    dated = {**h, "RadiopharmaceuticalStartDateTime": h["SeriesDate"] + injection}
    assert suv_problem(dated) == msg
    # The fix names the tag the header has (it named RadiopharmaceuticalStartDateTime, absent here).
    with pytest.raises(SUVError) as e:
        suv_factor(h)
    assert "RadiopharmaceuticalStartTime" in e.value.fix and "StartDateTime" not in e.value.fix
    with pytest.raises(SUVError) as e:
        suv_factor(dated)
    assert "RadiopharmaceuticalStartDateTime" in e.value.fix


def test_a_time_only_injection_half_a_day_after_the_scan_time_is_the_day_before(shared):
    """22:00 for a 10:00 scan (12 h after its time of day): injected the evening before, 12 h of uptake."""
    h = _time_only(shared, "220000")
    expected = 75 * 1000 / (DOSE * 2.0 ** (-12 * 3600 / 6586.2))
    assert suv_factor(h) == pytest.approx(expected, rel=1e-9)
    assert series_suv_factors([h, h]) == pytest.approx([expected] * 2, rel=1e-9)


def _ge_dataset(creator, element=0x10):
    """A re-created PET series (series 12:00, acquisition 10:00) with a post-injection time 10:30 in group 0009
    under ``creator``, reserved at (0009,00``element``)."""
    ds = Dataset()
    ds.Units, ds.DecayCorrection, ds.CorrectedImage, ds.PatientWeight = "BQML", "START", ["ATTN", "DECY"], "75"
    ds.SeriesDate, ds.SeriesTime, ds.AcquisitionDate, ds.AcquisitionTime = "20201217", "120000", "20201217", "100000"
    item = Dataset()
    item.RadionuclideHalfLife, item.RadionuclideTotalDose = "6586.2", "3.7e8"
    item.RadiopharmaceuticalStartDateTime = "20201217090000"
    ds.RadiopharmaceuticalInformationSequence = pydicom.Sequence([item])
    ds.add_new((0x0009, element), "LO", creator)
    ds.add_new((0x0009, (element << 8) | 0x0D), "DT", "20201217103000")
    return ds


@pytest.mark.parametrize("element", [0x10, 0x11])
def test_ge_post_injection_time_read_only_under_ges_private_creator(element):
    """A Siemens file with a date in (0009,100D) made SUV decay to it as if it were GE's post-injection time."""
    def expected(minutes):  # injection 09:00, scan at 10:00 + minutes
        return 75 * 1000 / (3.7e8 * 2.0 ** (-(60 + minutes) * 60 / 6586.2))

    ge = header_from_dataset(_ge_dataset("GEMS_PETD_01", element))
    assert ge["GEPrivatePostInjectionDateTime"] == "20201217103000"
    assert series_suv_factors([ge]) == pytest.approx([expected(30)], rel=1e-9)
    siemens = header_from_dataset(_ge_dataset("SIEMENS SYNGO", element))
    assert "GEPrivatePostInjectionDateTime" not in siemens
    assert series_suv_factors([siemens]) == pytest.approx([expected(0)], rel=1e-9)  # the earliest acquisition
    ds = _ge_dataset("SIEMENS SYNGO", element)
    del ds[0x0009, element]  # no private creator at all: the value's meaning is unknown
    assert "GEPrivatePostInjectionDateTime" not in header_from_dataset(ds)
