"""A dynamic PET started seconds before the injection (a first-pass Rb-82 / N-13 / O-15 protocol) is said to be that,
not a header error; it stays in Bq/mL. A static series, or a dynamic one starting long before the injection, keeps the
header message.

A dynamic Rb-82 series started 10 s before the infusion (list-mode start 09:59:50, RadiopharmaceuticalStartTime
10:00:00) loaded in Bq/mL with "the scan time is before the injection time ... check SeriesTime/AcquisitionTime and
RadiopharmaceuticalStartTime in the header", blaming a header that was right.
"""

from __future__ import annotations

import math
import warnings

import pydicom
import pytest

from medfuse.io.suv import header_from_dataset, series_suv_factors, suv_problem

RB82_HALF_LIFE_S = 75.45
WEIGHT_KG, DOSE_BQ = 80.0, 1.11e9


def _rb82(series_time: str, series_type="DYNAMIC", injection="100000"):
    """A BQML / START Rb-82 header whose scan starts at ``series_time`` (the injection at 10:00:00)."""
    h = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
         "PatientWeight": WEIGHT_KG, "RadionuclideTotalDose": DOSE_BQ, "RadionuclideHalfLife": RB82_HALF_LIFE_S,
         "SeriesDate": "20250101", "SeriesTime": series_time, "AcquisitionDate": "20250101",
         "AcquisitionTime": series_time, "RadiopharmaceuticalStartTime": injection}
    return {**h, "SeriesType": series_type} if series_type else h


def test_a_dynamic_series_started_10_s_before_the_injection_is_a_first_pass_protocol():
    why = suv_problem([_rb82("095950")] * 3)
    assert why is not None and "negative decay time" not in why, why
    assert "starts 10 s before the injection (RadiopharmaceuticalStartTime)" in why, why
    assert "first-pass" in why and "SUV is not defined before the injection" in why and "Bq/mL" in why, why


@pytest.mark.parametrize("header", [_rb82("095950", series_type=None), _rb82("095950", series_type="STATIC"),
                                    _rb82("095950", series_type="GATED"), _rb82("095500")])
def test_a_static_series_or_a_start_minutes_before_the_injection_still_names_the_header(header):
    """No SeriesType, STATIC or GATED 10 s before; DYNAMIC 5 min before (beyond the 2 min of a first pass)."""
    why = suv_problem(header)
    assert why == "the scan time is before the injection time (negative decay time)", why


def test_a_dynamic_series_started_after_the_injection_gets_its_suv():
    """The limit changes nothing after the injection: the dose decayed over the 30 s of uptake."""
    factor = series_suv_factors([_rb82("100030")])[0]
    decayed = DOSE_BQ * math.exp(-math.log(2) * 30 / RB82_HALF_LIFE_S)
    assert factor == pytest.approx(WEIGHT_KG * 1000 / decayed, rel=1e-12)


def test_series_type_is_read_from_the_header():
    ds = pydicom.Dataset()
    ds.SeriesType = ["DYNAMIC", "IMAGE"]
    assert header_from_dataset(ds)["SeriesType"] == "DYNAMIC"
    ds.SeriesType = "static"
    assert header_from_dataset(ds)["SeriesType"] == "STATIC"
    assert "SeriesType" not in header_from_dataset(pydicom.Dataset())


def test_loading_such_a_dicom_series_warns_the_first_pass_reason_and_keeps_bq_ml(tmp_path):
    import medfuse
    from tests.test_privacy import phi_series

    pet = phi_series(tmp_path / "dyn", modality="PT", extra={
        "SeriesType": ["DYNAMIC", "IMAGE"], "SeriesTime": "095950", "AcquisitionTime": "095950"})
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        v = medfuse.load(pet)
    text = " ".join(str(w.message) for w in seen)
    assert v.unit == "Bq/mL"
    assert "PET loaded in Bq/mL, not SUV: this dynamic series (SeriesType DYNAMIC) starts 10 s before" in text, text
    assert "negative decay time" not in text, text
