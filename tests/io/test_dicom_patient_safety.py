"""A series mixing patients, SUV of long-lived tracers without an injection date, and the
study a DICOM series is written into without a template."""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest

import medfuse
from medfuse.errors import MedfuseWarning, SUVError, UnreadableFileError
from medfuse.io import suv as suvmod

_DOE = {"PatientName": "DOE^JANE", "PatientID": "PIDAAA111", "PatientBirthDate": "19510203"}
_SMITH = {"PatientName": "SMITH^JOHN", "PatientID": "PIDBBB222", "PatientBirthDate": "19620304"}
_STUDY_A, _STUDY_B = "1.2.999.777.55555", "1.2.999.777.33333"
_FOR_A, _FOR_B = "1.2.999.777.2222", "1.2.999.777.4444"


def _copy_pet(samples_dir: Path, out: Path, edit) -> Path:
    """The sample PET series copied to ``out``, ``edit(index, dataset)`` applied to each file."""
    out.mkdir()
    for i, f in enumerate(sorted((samples_dir / "pet").glob("*.dcm"))):
        ds = pydicom.dcmread(str(f))
        edit(i, ds)
        ds.save_as(str(out / f.name))
    return out


def _subject(ds, patient, study, frame) -> None:
    for kw, value in patient.items():
        setattr(ds, kw, value)
    ds.StudyInstanceUID, ds.FrameOfReferenceUID = study, frame


# ----------------------------------------------------------------------------------------- 1. mixed series
@pytest.mark.parametrize("other,words", [
    ((_SMITH, _STUDY_B, _FOR_B), "different patients"),  # the probe's case: another patient, study and space
    ((_DOE, _STUDY_B, _FOR_A), "2 different studies"),
    ((_DOE, _STUDY_A, _FOR_B), "2 different patient spaces"),
    (({**_DOE, "PatientID": "PIDCCC333"}, _STUDY_A, _FOR_A), "different patients"),
])
def test_a_series_whose_files_disagree_on_patient_study_or_space_is_refused(samples_dir, tmp_path, other, words):
    """Every other slice of the one series from another patient/study/space: loaded as one interleaved volume with no
    word (suv='none'), now refused without any identifier in the message."""
    folder = _copy_pet(samples_dir, tmp_path / "mixed",
                       lambda i, ds: _subject(ds, *(other if i % 2 else (_DOE, _STUDY_A, _FOR_A))))
    with pytest.raises(UnreadableFileError) as e:
        medfuse.load(folder, suv="none")
    msg = str(e.value)
    assert words in msg and "SeriesInstanceUID" in msg and e.value.fix
    for value in (*_DOE.values(), *_SMITH.values(), "PIDCCC333", "DOE", "SMITH", _STUDY_A, _STUDY_B, _FOR_A, _FOR_B):
        assert value not in msg


def test_a_weight_left_empty_on_one_instance_is_named_as_a_gap_not_a_mixed_series(samples_dir, tmp_path):
    """One instance without PatientWeight: the SUV fallback said the weight "differs between instances" and to
    "load the instances of one series only", a fix that did not apply to one series with a header gap."""
    def edit(i, ds):
        _subject(ds, _DOE, _STUDY_A, _FOR_A)
        if i == 4:
            ds.PatientWeight = None

    folder = _copy_pet(samples_dir, tmp_path / "gap", edit)
    n = len(list(folder.glob("*.dcm")))
    with pytest.warns(MedfuseWarning, match=rf"PatientWeight is missing or empty in 1 of the series' {n} "
                                            "instances") as caught:
        vol = medfuse.load(folder)
    # The SUV warning among those recorded (a ResourceWarning another test's leak left to the collector was once
    # caught[0] here).
    said = [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)]
    assert vol.unit == "Bq/mL" and any("complete PatientWeight" in m for m in said), said
    headers = [suvmod.header_from_dataset(pydicom.dcmread(str(f))) for f in sorted(folder.glob("*.dcm"))]
    with pytest.raises(SUVError, match="PatientWeight is missing or empty in 1 of"):
        suvmod.series_suv_factors(headers)
    # Two values of another key beside the gap: a mixed series, named as one (the gap was named first).
    mixed = [dict(h, SeriesTime="101010") if i % 2 else h for i, h in enumerate(headers)]
    with pytest.raises(SUVError, match="SeriesTime differs between instances"):
        suvmod.series_suv_factors(mixed)
    # Sex and height do not enter SUVbw: a slice without the sex no longer drops the series to Bq/mL.
    fine = [dict(h, PatientWeight=headers[0]["PatientWeight"]) for h in headers]
    no_sex = [dict(h, PatientSex=None) if i == 3 else h for i, h in enumerate(fine)]
    assert suvmod.series_suv_factors(no_sex) == suvmod.series_suv_factors(fine)
    with pytest.raises(SUVError, match="PatientSex is missing or empty in 1 of"):
        suvmod.series_suv_factors(no_sex, kind="lbm")


def test_one_patient_spelled_alike_or_with_a_value_left_out_still_loads(samples_dir, tmp_path):
    """No false refusal: letter case and trailing name components, or an identifier emptied on some files."""
    def edit(i, ds):
        _subject(ds, _DOE, _STUDY_A, _FOR_A)
        if i % 3 == 1:
            ds.PatientName = "doe^jane^^^"
        if i % 3 == 2:
            ds.PatientID = ""
            del ds.FrameOfReferenceUID
        if i % 4 == 0:  # a birth date only some files carry (a real GE series had it empty on all)
            ds.PatientBirthDate = ""

    vol = medfuse.load(_copy_pet(samples_dir, tmp_path / "one", edit), suv="none")
    assert vol.shape == medfuse.load(samples_dir / "pet", suv="none").shape


def test_a_name_decoded_on_one_header_only_is_still_one_patient(samples_dir, tmp_path):
    """The stored bytes are compared first: a header whose PatientName was already decoded (another type) must not
    read as another patient."""
    from medfuse.io import dicom

    def edit(i, ds):
        _subject(ds, {**_DOE, "PatientName": "MÜLLER^JÖRG"}, _STUDY_A, _FOR_A)
        ds.SpecificCharacterSet = "ISO_IR 192"

    folder = _copy_pet(samples_dir, tmp_path / "utf8", edit)
    files = [(f, pydicom.dcmread(str(f), stop_before_pixels=True)) for f in sorted(folder.iterdir())]
    assert str(files[0][1].PatientName) == "MÜLLER^JÖRG"  # decoded on this header only
    dicom._refuse_mixed_subjects(files, folder)
    files[1][1].PatientName = "MÜLLER^JÖRGE"
    with pytest.raises(UnreadableFileError, match="different patients"):
        dicom._refuse_mixed_subjects(files, folder)


def test_a_study_uid_made_anew_for_every_file_is_a_warning_not_a_merge(samples_dir, tmp_path):
    """A UID that differs on every file groups nothing (an exporter that makes one per file): the series loads, and
    a warning says so; two groups of files (a merge) are refused above."""
    from pydicom.uid import generate_uid

    folder = _copy_pet(samples_dir, tmp_path / "perfile", lambda i, ds: setattr(ds, "StudyInstanceUID", generate_uid()))
    with pytest.warns(MedfuseWarning, match="StudyInstanceUID differs on every file"):
        vol = medfuse.load(folder, suv="none")
    assert any("differs on every file" in w for w in vol.provenance["warnings"])


# ----------------------------------------------------------------------------------------- 2. SUV, time only
_DAY = 86400.0
# name: half-life in seconds
_NUCLIDES = {"C-11": 1221.5, "Ga-68": 4062.6, "F-18": 6586.2, "Tc-99m": 21624.1, "Cu-64": 45721.1,
             "Zr-89": 282240.0, "I-124": 360806.4}


def _header(half_life: float, *, with_date: bool) -> dict:
    h = {"CorrectedImage": ["ATTN", "DECY"], "Units": "BQML", "RadionuclideHalfLife": half_life,
         "RadionuclideTotalDose": 3.7e7, "DecayCorrection": "START", "PatientWeight": 70,
         "SeriesDate": "20260103", "SeriesTime": "100000", "AcquisitionDate": "20260103", "AcquisitionTime": "100000",
         "RadiopharmaceuticalStartTime": "093000"}
    if with_date:
        h["RadiopharmaceuticalStartDateTime"] = "20260101093000"  # two days before the scan
    return h


@pytest.mark.parametrize("nuclide", list(_NUCLIDES))
def test_time_only_injection_is_refused_when_a_days_error_could_go_unseen(nuclide):
    """Zr-89 injected two days before the scan, its header giving a time only: SUV came out 35 % low with no word.
    A time only is accepted while an injection a day earlier would be more than _MAX_HALF_LIVES half-lives back
    (no scan then: the day is certain); beyond, SUV is refused."""
    half_life = _NUCLIDES[nuclide]
    ambiguous = _DAY / half_life <= suvmod._MAX_HALF_LIVES
    h = _header(half_life, with_date=False)
    if ambiguous:
        with pytest.raises(SUVError) as e:
            suvmod.suv_factor(h)
        assert "RadiopharmaceuticalStartDateTime" in str(e.value) and "suv='none'" in e.value.fix
        assert f"{2.0 ** (_DAY / half_life):.2f}" in e.value.problem  # the size of a day's error
    else:
        # scan day assumed: 30 min of decay
        assert suvmod.suv_factor(h) == pytest.approx(70e3 / (3.7e7 * 2.0 ** (-1800.0 / half_life)), rel=1e-9)
    # With the date the factor is made as before (two days' decay, or refused as over 10 half-lives for short ones).
    dated = _header(half_life, with_date=True)
    if (2 * _DAY + 1800) / half_life <= suvmod._MAX_HALF_LIVES:
        expected = 70e3 / (3.7e7 * math.exp(-math.log(2.0) * (2 * _DAY + 1800) / half_life))
        assert suvmod.suv_factor(dated) == pytest.approx(expected, rel=1e-9)
    assert {"C-11", "Ga-68", "F-18"} == {n for n, t in _NUCLIDES.items() if _DAY / t > suvmod._MAX_HALF_LIVES}


def test_a_zr89_pet_without_injection_date_loads_in_bqml_with_a_warning(samples_dir, tmp_path):
    """The probe's case through the loader: Bq/mL and a warning saying why and how, not an SUV 35 % low."""
    def zr(dated):
        def edit(i, ds):
            r = ds.RadiopharmaceuticalInformationSequence[0]
            r.RadionuclideHalfLife = "282240"
            r.RadiopharmaceuticalStartTime = "100000"
            if dated:
                r.RadiopharmaceuticalStartDateTime = "20251230100000"
            else:
                del r.RadiopharmaceuticalStartDateTime
        return edit

    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vol = medfuse.load(_copy_pet(samples_dir, tmp_path / "zr_time", zr(False)))
    said = [str(x.message) for x in w if issubclass(x.category, MedfuseWarning)]
    assert vol.unit == "Bq/mL" and "suv" not in vol.provenance
    assert any("not SUV" in m and "RadiopharmaceuticalStartDateTime" in m for m in said), said
    raw = medfuse.load(_copy_pet(samples_dir, tmp_path / "zr_raw", zr(False)), suv="none")
    assert np.array_equal(vol.array, raw.array)
    dated = medfuse.load(_copy_pet(samples_dir, tmp_path / "zr_dated", zr(True)))
    assert dated.unit == "SUVbw"


# ----------------------------------------------------------------------------------------- 3. writer's study
def test_without_a_template_a_new_study_is_made_even_when_not_deidentifying(samples_dir, tmp_path):
    """A PET registered onto another patient's CT takes the CT's study in its provenance; saved with
    deidentify=False and no template it was written into that study with an empty patient module."""
    import pydicom as pd

    from medfuse.registration.resample import resample
    from medfuse.registration.transforms import Transform

    ct = medfuse.load(samples_dir / "ct")
    pet = medfuse.load(samples_dir / "pet")
    pet.provenance["study_uid"] = "1.2.826.0.1.3680043.8.498.1"
    moved = resample(pet, ct, transform=Transform.from_matrix(np.eye(4)))
    assert moved.provenance["study_uid"] == ct.provenance["study_uid"]  # the provenance still says the CT's
    folder = medfuse.save(moved, tmp_path / "regdcm", deidentify=False)
    studies = {pd.dcmread(str(f), stop_before_pixels=True).StudyInstanceUID for f in folder.iterdir()}
    assert len(studies) == 1 and not studies & {ct.provenance["study_uid"], pet.provenance["study_uid"]}
    # With the CT as template (it carries the patient), the CT's study is kept, as documented.
    kept = medfuse.save(moved, tmp_path / "tpl", deidentify=False, template=samples_dir / "ct")
    ds = pd.dcmread(str(next(kept.iterdir())), stop_before_pixels=True)
    assert ds.StudyInstanceUID == ct.provenance["study_uid"]


def test_an_injection_date_time_cut_at_the_date_or_hour_is_timed_by_the_start_time(samples_dir, tmp_path):
    """DICOM allows a DT cut at the date (anonymisers do it). Read as midnight, 10:00 became 00:00: SUV 25x too
    high on a real Siemens header, with no word. The start time gives the minutes; without it, no SUV."""
    full = medfuse.load(samples_dir / "pet")

    def cut(dt, time=None):
        def edit(i, ds):
            r = ds.RadiopharmaceuticalInformationSequence[0]
            r.RadiopharmaceuticalStartDateTime = dt
            if time is None:
                del r.RadiopharmaceuticalStartTime
        return edit

    for name, dt in (("date", "20260101"), ("hour", "2026010110"), ("date_utc", "20260101+0000")):
        vol = medfuse.load(_copy_pet(samples_dir, tmp_path / name, cut(dt, "100000")))
        assert vol.unit == "SUVbw"
        np.testing.assert_allclose(vol.array, full.array, rtol=1e-6)
    with pytest.raises(SUVError, match="cut at the hour.*different injection hours"):
        first = suvmod.header_from_dataset(pydicom.dcmread(str(sorted((samples_dir / "pet").glob("*.dcm"))[0])))
        suvmod.suv_factor({**first, "RadiopharmaceuticalStartDateTime": "2026010109"})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        vol = medfuse.load(_copy_pet(samples_dir, tmp_path / "no_time", cut("20260101")))
    said = [str(x.message) for x in w if issubclass(x.category, MedfuseWarning)]
    assert vol.unit == "Bq/mL" and "suv" not in vol.provenance
    assert any("gives the injection's date but not its minutes" in m for m in said), said


def test_a_pet_whose_instances_differ_in_units_is_not_labelled_with_the_first_ones(samples_dir, tmp_path):
    """One CNTS instance among BQML ones: its counts were labelled Bq/mL with the rest."""
    def one_in_counts(i, ds):
        if i == 3:
            ds.Units = "CNTS"

    with pytest.warns(MedfuseWarning, match=r"PET loaded as stored \(unit 'arbitrary'\), not SUV: Units differs"):
        assert medfuse.load(_copy_pet(samples_dir, tmp_path / "auto", one_in_counts)).unit == "arbitrary"
    assert medfuse.load(_copy_pet(samples_dir, tmp_path / "none", one_in_counts), suv="none").unit == "arbitrary"


def test_an_hour_cut_date_time_with_its_own_utc_offset_is_compared_in_the_series_offset():
    """07+0000 is 08 local in a +0100 series: it was refused as "different injection hours" from a start time at
    08:30, and a date moved across midnight by an offset would have dated the injection a day off."""
    header = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
              "RadionuclideHalfLife": "6586.2", "RadionuclideTotalDose": "370000000", "PatientWeight": "70",
              "SeriesDate": "20260101", "SeriesTime": "100000", "AcquisitionDate": "20260101",
              "AcquisitionTime": "100000", "RadiopharmaceuticalStartTime": "083000",
              "TimezoneOffsetFromUTC": "+0100"}
    exact = suvmod.suv_factor({**header, "RadiopharmaceuticalStartDateTime": "20260101083000"})
    for cut in ("2026010107+0000", "2026010108", "20260101+0000", "20260101-0900"):
        assert suvmod.suv_factor({**header, "RadiopharmaceuticalStartDateTime": cut}) == pytest.approx(exact), cut
    with pytest.raises(SUVError, match="different injection hours"):
        suvmod.suv_factor({**header, "RadiopharmaceuticalStartDateTime": "2026010108+0000"})  # 09 local


def test_an_hour_cut_date_time_in_a_half_hour_offset_takes_the_start_time_of_that_hour():
    """07+0530 is 01:30-02:29 in a +0000 series: a start time of 02:15 was refused as another hour."""
    header = {"Units": "BQML", "DecayCorrection": "START", "CorrectedImage": ["ATTN", "DECY"],
              "RadionuclideHalfLife": "6586.2", "RadionuclideTotalDose": "370000000", "PatientWeight": "70",
              "SeriesDate": "20260101", "SeriesTime": "030000", "AcquisitionDate": "20260101",
              "AcquisitionTime": "030000", "TimezoneOffsetFromUTC": "+0000"}
    for start in ("014500", "021500"):
        exact = suvmod.suv_factor({**header, "RadiopharmaceuticalStartTime": start,
                                   "RadiopharmaceuticalStartDateTime": f"20260101{start}"})
        cut = suvmod.suv_factor({**header, "RadiopharmaceuticalStartTime": start,
                                 "RadiopharmaceuticalStartDateTime": "2026010107+0530"})
        assert cut == pytest.approx(exact), start
    with pytest.raises(SUVError, match="different injection hours"):
        suvmod.suv_factor({**header, "RadiopharmaceuticalStartTime": "023500",
                           "RadiopharmaceuticalStartDateTime": "2026010107+0530"})
