"""A name part that is one of medfuse's own words (``Pet`` of ``Cardio^Pet``, ``Max`` of ``Heart^Max``) is blanked in
paths and file names only, not where it stands as a word in what medfuse prints.

Blanked everywhere, ``medfuse info pet/gated_rb82`` printed ``[removed] loaded in Bq/mL ... re-export the [removed]
series`` and ``medfuse measure`` printed ``[removed] 100 counts`` for the max statistic. Whole names, one-part names,
other name parts, IDs and birth dates stay blanked everywhere.
"""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("pydicom")

import medfuse  # noqa: E402
from medfuse.provenance import patient_identifiers, scrub  # noqa: E402


@pytest.fixture
def cardio_pet(tmp_path, patient_header):
    return patient_identifiers([patient_header(tmp_path / "h.dcm", "Cardio^Pet", "PID777", "19600101")])


@pytest.fixture
def heart_max(tmp_path, patient_header):
    return patient_identifiers([patient_header(tmp_path / "h.dcm", "Heart^Max", "PID12345")])


def test_a_name_part_that_is_a_modality_stays_in_prose(cardio_pet):
    for text in ("PET loaded in Bq/mL, not SUV: RadionuclideHalfLife is missing. Fix: re-export the PET series",
                 "moving PET (pet) onto CT", "a blurred PET/SPECT can favour a shrunken result", "the pet."):
        assert scrub(text, cardio_pet) == text


def test_a_name_part_that_is_a_modality_is_blanked_in_paths_and_file_names(cardio_pet):
    assert scrub("pet/gated_rb82", cardio_pet) == "[removed]/gated_rb82"
    assert scrub("Fix: medfuse.load('pet/gated_rb82', volume_index=0)", cardio_pet) == \
        "Fix: medfuse.load('[removed]/gated_rb82', volume_index=0)"
    assert scrub("wrote /data/Pet_rest/out.nii.gz", cardio_pet) == "wrote /data/[removed]_rest/out.nii.gz"
    assert scrub(r"read C:\scans\PET", cardio_pet) == r"read C:\scans\[removed]"
    assert scrub("saved pet.nii.gz.", cardio_pet) == "saved [removed].nii.gz."
    # The same rule where the text is not ASCII (folded and searched another way).
    assert scrub("Résumé: the PET series, in pet/ré.dcm", cardio_pet) == \
        "Résumé: the PET series, in [removed]/ré.dcm"


def test_the_whole_name_other_parts_ids_and_dates_are_blanked_everywhere(cardio_pet):
    for text in ("Cardio^Pet", "Cardio Pet", "PET_CARDIO", "cardio-pet", "CardioPet", "Cardio", "PID777",
                 "1960-01-01"):
        assert scrub(f"patient {text} scanned", cardio_pet) == "patient [removed] scanned", text
    # Given as plain strings (not from patient_identifiers), every value is blanked everywhere as before.
    assert scrub("the PET series", [str(i) for i in cardio_pet]) == "the [removed] series"


def test_a_one_part_name_or_an_id_equal_to_the_word_is_blanked_in_prose(tmp_path, patient_header):
    one = patient_identifiers([patient_header(tmp_path / "a.dcm", "Pet", "PID777")])
    assert scrub("the PET series", one) == "the [removed] series"
    as_id = patient_identifiers([patient_header(tmp_path / "b.dcm", "Heart^Max", "MAX")])
    assert scrub("max 100 counts", as_id) == "[removed] 100 counts"


def test_measure_keeps_the_max_label_and_blanks_it_in_the_mask_file_name(tmp_path, heart_max):
    """`medfuse measure nm/recon_max.dcm --mask mask_max.nii.gz` of Heart^Max printed "[removed] 100 counts"."""
    from tests.test_privacy import _cli, leaks, phi_series

    pet = phi_series(tmp_path / "scan_pt", modality="PT", extra={"PatientName": "Heart^Max", "PatientID": "PID12345"})
    v = medfuse.load(pet)
    m = np.zeros(v.shape, np.uint8)
    m[3:8, 4:9, 2:6] = 1
    mask = medfuse.save(v.with_array(m, modality="unknown", unit="arbitrary"), tmp_path / "mask_max.nii.gz")
    rc, text = _cli(["measure", pet, "--mask", mask])
    assert rc == 0, text
    assert leaks(text, ("Heart", "PID12345")) == [], text
    top = float(v.array[m > 0].max())
    assert any(ln.startswith(f"  max {top:.6g} {v.unit}") for ln in text.splitlines()), text
    assert "mask_[removed].nii.gz" in text and "mask_max" not in text, text


def test_info_blanks_the_word_in_the_path_and_keeps_it_in_the_suv_warning(tmp_path):
    """`medfuse info pet/gated_rb82` of Cardio^Pet: the path blanked, "re-export the PET series" kept."""
    import pydicom

    from tests.test_privacy import _cli, leaks, phi_series

    item = pydicom.Dataset()  # no RadionuclideHalfLife: the PET loads in Bq/mL with a warning naming the modality
    item.RadiopharmaceuticalStartTime, item.RadionuclideTotalDose = "100000", "250000000"
    pet = phi_series(tmp_path / "pet" / "gated_rb82", modality="PT",
                     extra={"PatientName": "Cardio^Pet", "RadiopharmaceuticalInformationSequence": [item]})
    rc, text = _cli(["info", pet])
    assert rc == 0, text
    assert leaks(text, ("Cardio",)) == [], text
    assert "[removed]/gated_rb82" in text and "/pet/" not in text, text
    assert "PET loaded in Bq/mL, not SUV" in text and "re-export the PET series" in text, text


def test_a_name_part_is_blanked_where_a_path_without_a_suffix_or_with_a_space_holds_it(heart_max, cardio_pet):
    """A review found the part shown in ``Max/PET`` (taken as prose like ``PET/CT``), in a DICOM file name with no
    suffix (``Max_0001``) and after a space in a folder path (``/data/Study Max``)."""
    assert scrub("Max/PET", heart_max) == "[removed]/PET"
    assert scrub("'Max/CT'", heart_max) == "'[removed]/CT'"
    assert scrub("Pet/Max", heart_max + cardio_pet) == "[removed]/[removed]"
    assert scrub("file Max_0001 is unreadable", heart_max) == "file [removed]_0001 is unreadable"
    assert scrub("recon-max2 holds no image", heart_max) == "recon-[removed]2 holds no image"
    assert scrub("/data/Study Max", heart_max) == "/data/Study [removed]"
    # ... while the statistic after a file path, or after punctuation closing a folder path, stays a word
    assert scrub("mask /data/m.nii.gz max 100", heart_max) == "mask /data/m.nii.gz max 100"
    assert scrub("in /data/Study, max 3", heart_max) == "in /data/Study, max 3"
    assert scrub("PET/CT and PET/SPECT", cardio_pet) == "PET/CT and PET/SPECT"
