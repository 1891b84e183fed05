"""DICOM loading: missing slices told from variable spacing, studies in series listings, and PET units when SUV
cannot be what was asked for."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

from medfuse.errors import GeometryError, InvalidInputError, MedfuseWarning, MultipleSeriesError
from medfuse.io.dicom import load_dicom, scan
from medfuse.io.suv import counts_to_bq_ml, series_suv_factors
from tests.io.test_dicom import _series


def _mm(positions_mm):
    """``_series`` places slice z at 2.5 * z mm."""
    return [p / 2.5 for p in positions_mm]


# ---------------------------------------------------------------------------- gaps vs variable spacing
@pytest.mark.parametrize("positions", [
    [0, 1, 2, 3, 7, 11, 12, 13, 14],  # 1 mm runs with a 4 mm run between them: 6 slices lost
    [0, 1, 2, 3, 8, 13, 15, 17, 19],  # 1 mm, 2 steps of 5 mm, 2 mm: too short a wide run in the middle
])
def test_a_wide_run_between_finer_runs_is_missing_slices_not_variable_spacing(tmp_path, positions):
    """Runs of 1 mm, 4 mm, 1 mm loaded as "variable spacing" with 6 of 15 slices made up (and a warning saying
    "in runs with no gap"); such a series lost slices and is refused, as it was before."""
    _series(tmp_path / "s", z=_mm(positions))
    with pytest.raises(GeometryError, match=r"gap of [45].00 mm .*slices are missing") as e:
        load_dicom(tmp_path / "s")
    assert e.value.fix and "re-export the complete series" in e.value.fix


def test_coarse_runs_at_both_ends_still_load_as_variable_spacing(tmp_path):
    """5 mm, 1 mm through the middle, 5 mm: the wider runs at the ends, a complete series on the 1 mm grid with
    every measured slice as measured."""
    positions = [0, 5, 10, 15, 16, 17, 18, 19, 20, 25, 30]
    _, data = _series(tmp_path / "s", z=_mm(positions))
    with pytest.warns(MedfuseWarning, match="uneven slice spacing") as rec:
        vol = load_dicom(tmp_path / "s")
    msg = next(str(w.message) for w in rec if "uneven" in str(w.message))
    assert ("slices 1-4 5.00 mm apart, slices 4-9 1.00 mm apart, slices 9-11 5.00 mm apart, in runs with no gap"
            in msg), msg
    assert "most of them interpolated, not measured: 20 of 31" in msg and "missing" not in msg, msg
    assert vol.shape == (10, 8, 31)
    np.testing.assert_allclose(vol.spacing, (0.5, 0.5, 1.0))
    np.testing.assert_allclose(vol.affine[:3, 3], [10.0, 20.0, 0.0], atol=1e-9)
    for k, p in enumerate(positions):
        np.testing.assert_array_equal(vol.array[:, :, p], data[k].T.astype(float) - 1024)
    # 2 mm past a 5 mm slice: linear between it and the next
    np.testing.assert_allclose(vol.array[:, :, 2], 0.6 * (data[0].T - 1024.0) + 0.4 * (data[1].T - 1024.0),
                               rtol=1e-6)


# ---------------------------------------------------------------------------- PET units without the SUV asked for
def _copy_pet(samples_dir: Path, out: Path, edit) -> Path:
    """The sample PET series (BQML, PatientWeight 70, no PatientSize) copied to ``out``, ``edit(ds)`` applied."""
    out.mkdir()
    for f in sorted((samples_dir / "pet").glob("*.dcm")):
        ds = pydicom.dcmread(str(f))
        edit(ds)
        ds.save_as(str(out / f.name))
    return out


@pytest.mark.parametrize("kind", ["lbm", "lbm_janma", "bsa"])
def test_suv_needing_height_falls_back_to_suvbw_not_to_the_stored_unit(samples_dir, kind):
    """No PatientSize: SUVlbm/SUVbsa asked for loaded the PET in its stored unit (counts, for Philips raw data),
    to be compared with a baseline in SUVlbm. Body-weight SUV is possible, and loaded, with a warning naming it."""
    bw = load_dicom(samples_dir / "pet", suv="bw")
    with pytest.warns(MedfuseWarning, match=r"PET loaded in SUVbw \(body-weight SUV\), not SUV(lbm|bsa) as asked: "
                                            r"PatientSize is missing") as rec:
        vol = load_dicom(samples_dir / "pet", suv=kind)
    assert (vol.unit, vol.provenance["suv"]) == ("SUVbw", "bw")
    np.testing.assert_array_equal(vol.array, bw.array)
    assert vol.provenance["suv_factor"] == bw.provenance["suv_factor"]
    assert any("compare it only with PETs in SUVbw" in str(w.message) for w in rec)


def test_suvlbm_with_height_is_still_suvlbm(samples_dir, tmp_path):
    def tall(ds):
        ds.PatientSize, ds.PatientSex = "1.80", "M"

    vol = load_dicom(_copy_pet(samples_dir, tmp_path / "p", tall), suv="lbm")
    bw = load_dicom(tmp_path / "p", suv="bw")
    assert vol.unit == "SUVlbm"
    # James: LBM = 1.10 W - 120 (W/H)^2 for a man, W = 70 kg, H = 180 cm
    lbm = 1.10 * 70 - 120 * (70 / 180) ** 2
    assert vol.provenance["suv_factor"] == pytest.approx(bw.provenance["suv_factor"] * lbm / 70, rel=1e-9)


def _philips_counts(acf: float, *, dose: bool = True):
    """Made Philips raw data: Units CNTS with the activity concentration scale factor (7053,1009) and no SUV scale
    factor (7053,1000); stored values kept, so that counts x factor is the sample's Bq/mL x factor."""
    def edit(ds):
        ds.Units = "CNTS"
        ds.private_block(0x7053, "Philips PET Private Group", create=True).add_new(0x09, "DS", f"{acf:.6f}")
        if not dose:
            del ds.RadiopharmaceuticalInformationSequence[0].RadionuclideTotalDose
    return edit


def _real_philips_acf(shared) -> float:
    """The activity concentration factor of a real Philips CNTS series (its SUV scale factor is also given)."""
    h = json.loads(shared("data", "pet-suv-headers", "PHILIPS_CNTS_AND_BQML_SUV-instances.json").read_text())[0]
    return float(h["PhilipsPETPrivateGroup"]["ActivityConcentrationScaleFactor"])


@pytest.mark.parametrize("name, rel", [("PHILIPS_CNTS_AND_BQML_SUV", 1e-3), ("PHILIPS_BQML", 2e-4)])
def test_philips_activity_concentration_factor_makes_bq_per_ml(shared, name, rel):
    """Real Philips headers give both factors: counts x (7053,1009) taken as Bq/mL, decayed and divided by the dose
    per gram, is the scanner's own SUV scale factor (7053,1000), to its printed digits (3 and 7 here)."""
    for h in json.loads(shared("data", "pet-suv-headers", f"{name}-instances.json").read_text()):
        acf = float(h["PhilipsPETPrivateGroup"]["ActivityConcentrationScaleFactor"])
        counts = {**h, "Units": "CNTS", "PhilipsPETPrivateGroup": {"ActivityConcentrationScaleFactor": str(acf)}}
        assert counts_to_bq_ml(counts) == pytest.approx(acf, rel=1e-12)
        bq = {k: v for k, v in h.items() if k != "PhilipsPETPrivateGroup"} | {"Units": "BQML"}
        assert counts_to_bq_ml(bq) is None
        assert acf * series_suv_factors([bq])[0] == pytest.approx(
            float(h["PhilipsPETPrivateGroup"]["SUVScaleFactor"]), rel=rel)


def test_philips_counts_load_in_bq_per_ml_with_suv_none(samples_dir, tmp_path, shared):
    """Philips raw data loaded "as stored" in counts, while every other PET without SUV loads in Bq/mL."""
    acf = _real_philips_acf(shared)
    bq = load_dicom(samples_dir / "pet", suv="none")
    vol = load_dicom(_copy_pet(samples_dir, tmp_path / "p", _philips_counts(acf)), suv="none")
    assert vol.unit == "Bq/mL" and "suv" not in vol.provenance
    assert any("Bq/mL (Philips counts x the activity concentration scale factor (7053,1009))" in t
               for t in vol.provenance["warnings"]), vol.provenance["warnings"]
    np.testing.assert_allclose(vol.array, bq.array * acf, rtol=1e-6, atol=1e-6 * float(np.abs(bq.array).max()))
    np.testing.assert_array_equal(vol.affine, bq.affine)
    # SUVbw of the same counts: the Bq/mL values over the decayed dose per gram, as for any BQML series
    suv = load_dicom(tmp_path / "p", suv="bw")
    ref = load_dicom(samples_dir / "pet", suv="bw")
    assert suv.provenance["suv_factor"] == pytest.approx(acf * ref.provenance["suv_factor"], rel=1e-9)


def test_philips_counts_that_cannot_give_suv_load_in_bq_per_ml_saying_so(samples_dir, tmp_path, shared):
    acf = _real_philips_acf(shared)
    bq = load_dicom(samples_dir / "pet", suv="none")
    folder = _copy_pet(samples_dir, tmp_path / "p", _philips_counts(acf, dose=False))
    for kind in ("auto", "lbm"):
        with pytest.warns(MedfuseWarning, match=r"PET loaded in Bq/mL \(Philips counts x the activity concentration "
                                                r"scale factor \(7053,1009\)\), not SUV: .*RadionuclideTotalDose"):
            vol = load_dicom(folder, suv=kind)
        assert vol.unit == "Bq/mL"
        np.testing.assert_allclose(vol.array, bq.array * acf, rtol=1e-6, atol=1e-6 * float(np.abs(bq.array).max()))
    # Without the factor, counts they stay (no scale to Bq/mL is known)
    folder = _copy_pet(samples_dir, tmp_path / "q", lambda ds: setattr(ds, "Units", "CNTS"))
    with pytest.warns(MedfuseWarning, match="PET loaded in counts, not SUV"):
        assert load_dicom(folder, suv="auto").unit == "counts"
    assert load_dicom(folder, suv="none").unit == "counts"


# ---------------------------------------------------------------------------- studies in listings
def _study_folder(root: Path, *, a_date: str, b_date: str):
    """Study A (series 2 and 3) and study B (series 1) in one folder; returns {(study, number): uid}."""
    uids = {}
    for study, number, date in (("A", 2, a_date), ("A", 3, a_date), ("B", 1, b_date)):
        uids[study, number], _ = _series(
            root / f"{study}{number}", n=3 + number, extra={
                "StudyInstanceUID": f"1.2.826.0.1.{ord(study)}", "SeriesNumber": number, "AcquisitionDate": date,
                "AcquisitionTime": f"1{number}0000"})
    return uids


@pytest.mark.parametrize("a_date, b_date, order", [
    ("20260101", "20260301", [("A", 2), ("A", 3), ("B", 1)]),  # baseline A, follow-up B
    ("20260301", "20260101", [("B", 1), ("A", 2), ("A", 3)]),
])
def test_series_are_listed_study_by_study_earliest_study_first(tmp_path, a_date, b_date, order):
    """Listed by SeriesNumber alone: B1, A2, A3 whatever the dates, a follow-up's series between the baseline's."""
    uids = _study_folder(tmp_path, a_date=a_date, b_date=b_date)
    listed = scan(tmp_path)
    assert [s.series_uid for s in listed] == [uids[k] for k in order]
    assert [s.series_number for s in listed] == [str(n) for _, n in order]
    # a number as listed picks by that order (with a word where it is another series' SeriesNumber)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        for pos, (study, number) in enumerate(order, start=1):
            assert load_dicom(tmp_path, series_uid=str(pos)).shape[2] == 3 + number


def test_a_study_without_acquisition_times_is_listed_after_those_with_them(tmp_path):
    uids = _study_folder(tmp_path, a_date="", b_date="20260101")
    assert [s.series_uid for s in scan(tmp_path)] == [uids["B", 1], uids["A", 2], uids["A", 3]]


def test_study_uids_stay_out_of_the_listing_messages(tmp_path):
    _study_folder(tmp_path, a_date="20260101", b_date="20260301")
    with pytest.raises(MultipleSeriesError) as e:
        load_dicom(tmp_path)
    text = str(e.value) + str(e.value.fix)
    assert "1.2.826.0.1" not in text and "SeriesNumber 2" in text.split("SeriesNumber 3")[0]


# ---------------------------------------------------------------------------- list positions and SeriesNumbers
def test_a_list_position_that_is_another_series_number_is_warned_about(tmp_path):
    """``--series 3`` is list position 3 even when another series has SeriesNumber 3: said, not silent."""
    uids = {}
    for number in (3, 7, 1082955):
        uids[number], _ = _series(tmp_path / f"s{number}", n=4, extra={"SeriesNumber": number})
    with pytest.warns(MedfuseWarning, match=r"series 3 is taken as list position 3 \(SeriesNumber 1082955\); the "
                                            r"series with SeriesNumber 3 is list position 1: choose that position"):
        vol = load_dicom(tmp_path, series_uid="3")
    assert vol.provenance["series_uid"] == uids[1082955]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # position 1 is SeriesNumber 3's own; 2 is no one's number
        assert load_dicom(tmp_path, series_uid="1").provenance["series_uid"] == uids[3]
        assert load_dicom(tmp_path, series_uid="2").provenance["series_uid"] == uids[7]


def test_several_pet_series_are_told_apart_by_attenuation_correction(samples_dir, tmp_path):
    """An AC and a NAC reconstruction share ImageType, size and file count: the listing said nothing else."""
    def nac(ds):
        ds.CorrectedImage = ["DECY", "NORM"]
        ds.SeriesInstanceUID, ds.SeriesNumber = "1.2.826.0.1.99", 1082956

    _copy_pet(samples_dir, tmp_path / "ac", lambda ds: None)
    _copy_pet(samples_dir, tmp_path / "nac", nac)
    for choice in (None, "PT"):
        with pytest.raises((MultipleSeriesError, InvalidInputError)) as e:
            load_dicom(tmp_path, series_uid=choice)
        text = str(e.value)
        assert "SeriesNumber 1082955, attenuation-corrected" in text, text
        assert "SeriesNumber 1082956, not attenuation-corrected" in text, text
