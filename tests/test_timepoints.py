"""medfuse.timepoints.comparability: why two PETs' SUVs cannot be compared (PERCIST 1.0 and the units)."""

from __future__ import annotations

import numpy as np
import pytest

import medfuse
from medfuse.timepoints import MAX_UPTAKE_DIFFERENCE_MIN, comparability
from medfuse.volume import Volume

from tests.conftest import SAMPLES

FACTS = {"tracer": "FDG", "radionuclide": "^18^Fluorine", "half_life_s": 6586.2, "injected_mbq": 370.0,
         "uptake_min": 60.0, "decay_correction": "START"}


def pet(unit="SUVbw", modality="PT", manufacturer=None, **facts):
    prov = {"pet_acquisition": {**FACTS, **facts}}
    if manufacturer is not None:
        prov["manufacturer"] = manufacturer
    return Volume(np.ones((3, 3, 3), np.float32), np.eye(4), modality=modality, unit=unit, provenance=prov)


def test_the_volume_keeps_the_acquisition_facts_these_checks_read():
    # Keys a Volume does not know are dropped: without "pet_acquisition" kept, every check below would pass empty.
    assert pet().provenance["pet_acquisition"] == FACTS


def test_two_scans_acquired_alike_are_comparable():
    assert comparability(pet(), pet(uptake_min=60.0 + MAX_UPTAKE_DIFFERENCE_MIN)) == []  # 15 min: allowed
    # Spelt differently, the same tracer and vendor: free text is compared by its letters and digits.
    assert comparability(pet(tracer="FDG", manufacturer="SIEMENS"), pet(tracer="fdg", manufacturer="Siemens")) == []


def test_uptake_times_more_than_15_min_apart_are_a_reason():
    reasons = comparability(pet(uptake_min=58.0), pet(uptake_min=81.0))
    assert len(reasons) == 1
    assert "uptake times differ by 23 min (58 min at baseline, 81 min at follow-up)" in reasons[0]
    assert "15 min PERCIST 1.0" in reasons[0]


def test_one_tracer_spelt_by_dicom_and_by_pet_bids_is_no_reason():
    """The DICOM reader keeps the code meaning ("^18^Fluorine") and a scanner's free text ("Fluorodeoxyglucose");
    a PET-BIDS sidecar gives "F18" and "FDG": one tracer, once reported as two."""
    dicom = pet(tracer="Fluorodeoxyglucose", radionuclide="^18^Fluorine")
    for tracer, nuclide in (("FDG", "F18"), ("18F-FDG", "18F"), ("F-18 FDG", "F-18"), ("[18F]FDG", None),
                            ("FDG -- fluorodeoxyglucose", None), ("Fluorodeoxyglucose F^18^", None),
                            ("2-deoxy-2-fluoro-D-glucose", "Fluorine-18")):
        assert comparability(dicom, pet(tracer=tracer, radionuclide=nuclide)) == [], (tracer, nuclide)
    # different tracers still differ, spelt either way
    for a, b in (("18F-PSMA-1007", "68Ga-PSMA-11"), ("FDG", "FLT"), ("[18F]FDG", "[18F]fluciclovine")):
        assert "different tracers" in comparability(pet(tracer=a, radionuclide=None),
                                                    pet(tracer=b, radionuclide=None))[0], (a, b)
    # the radionuclide by half-life when one of them names none: Ga-68's is not F-18's
    reasons = comparability(pet(tracer=None, radionuclide=None), pet(tracer=None, radionuclide=None,
                                                                      half_life_s=4062.6))
    assert len(reasons) == 1 and "different radionuclides: half-life 6586.2 s at baseline" in reasons[0]


@pytest.mark.parametrize("change, words", [
    ({"tracer": "PSMA-1007"}, "different tracers: FDG at baseline, PSMA-1007 at follow-up"),
    ({"tracer": None, "radionuclide": "^68^Gallium"}, "different radionuclides"),
])
def test_another_tracer_is_a_reason(change, words):
    reasons = comparability(pet(), pet(**change))
    assert len(reasons) == 1 and words in reasons[0]


@pytest.mark.parametrize("units, words", [
    (("SUVbw", "SUVlbm"), "SUVs of different kinds: SUVbw at baseline, SUVlbm at follow-up"),
    (("SUVbw", "Bq/mL"), "one image is in SUV and the other is not: SUVbw at baseline, Bq/mL at follow-up"),
])
def test_another_unit_is_a_reason(units, words):
    reasons = comparability(pet(unit=units[0]), pet(unit=units[1]))
    assert len(reasons) == 1 and words in reasons[0]
    assert "--suv" in reasons[0]


def test_another_manufacturer_is_a_softer_note_and_unknown_facts_are_not_guessed():
    reasons = comparability(pet(manufacturer="SIEMENS"), pet(manufacturer="GE MEDICAL SYSTEMS"))
    assert len(reasons) == 1 and "different manufacturers (SIEMENS at baseline" in reasons[0] and "may" in reasons[0]
    # A fact one of them lacks is not compared: no uptake, tracer or vendor reason.
    assert comparability(pet(manufacturer="SIEMENS", uptake_min=None, tracer=None, radionuclide=None),
                         pet(manufacturer="", uptake_min=95.0, tracer="FLT")) == []


def test_every_reason_at_once_and_inputs_that_are_not_both_pet():
    reasons = comparability(pet(manufacturer="A"), pet(unit="SUVlbm", manufacturer="B", tracer="FLT",
                                                        uptake_min=100.0))
    assert [r.split()[0] for r in reasons] == ["different", "uptake", "SUVs", "scanners"]
    assert comparability(pet(), pet(modality="NM", unit="counts")) == []
    mr = Volume(np.ones((3, 3, 3), np.float32), np.eye(4), modality="MR")
    assert comparability(mr, pet()) == comparability(pet(), mr) == []


def test_the_sample_pet_against_itself():
    vol = medfuse.load(SAMPLES / "pet")
    assert vol.provenance["pet_acquisition"]["uptake_min"] == pytest.approx(60.0)
    assert comparability(vol, vol) == []


def test_an_attenuation_corrected_pet_against_a_nac_one_is_a_reason():
    ac, nac = pet(attenuation_corrected=True, attenuation_method="CTAC"), pet(attenuation_corrected=False)
    for first, second, said in ((ac, nac, "attenuation-corrected at baseline, not attenuation-corrected (NAC) at "
                                          "follow-up"),
                                (nac, ac, "not attenuation-corrected (NAC) at baseline, attenuation-corrected at "
                                          "follow-up")):
        reasons = comparability(first, second)
        assert len(reasons) == 1 and said in reasons[0], reasons  # the AC/NAC note only, not the methods' too
        assert "not quantitative" in reasons[0]
    # Two NAC images, or either side unknown: nothing said.
    assert comparability(nac, pet(attenuation_corrected=False, attenuation_method="none")) == []
    assert comparability(ac, pet(attenuation_corrected=None)) == comparability(pet(), nac) == []


def test_attenuation_correction_methods_that_differ_are_a_softer_note():
    reasons = comparability(pet(attenuation_corrected=True, attenuation_method="CT-based"),
                            pet(attenuation_corrected=True, attenuation_method="[137Cs]transmission scan-based"))
    assert len(reasons) == 1
    assert reasons[0].startswith("attenuation corrected by different methods (CT-based at baseline, "
                                 "[137Cs]transmission scan-based at follow-up)") and "may" in reasons[0]
    # Spelt differently, one method; one method unknown: no note.
    assert comparability(pet(attenuation_corrected=True, attenuation_method="CT-based"),
                         pet(attenuation_corrected=True, attenuation_method="ct based")) == []
    assert comparability(pet(attenuation_corrected=True, attenuation_method="CT-based"),
                         pet(attenuation_corrected=True)) == []
