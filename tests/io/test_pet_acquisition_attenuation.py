"""Attenuation correction in provenance["pet_acquisition"] (``attenuation_corrected``, ``attenuation_method``):
from a DICOM series' coded CorrectedImage (0028,0051) and AttenuationCorrectionMethod (0054,1101), or a PET-BIDS
sidecar's AttenuationCorrection; and a non-attenuation-corrected (NAC) DICOM PET, which gives no SUV, said so."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.dicom import _attenuation_facts
from medfuse.io.pet_bids import pet_acquisition
from medfuse.timepoints import comparability

from tests.io.test_pet_acquisition import REAL, _real
from tests.io.test_pet_bids import META, _pet

#: The sample PET's slices used (6 of its 64, for speed).
_SLICES = slice(28, 34)


def _datasets(modality="PT", **tags):
    """One header per instance, each a pydicom Dataset with ``tags`` (a list value: one per instance)."""
    n = max([len(v) for v in tags.values() if isinstance(v, list) and v and isinstance(v[0], list)] or [2])
    out = []
    for i in range(n):
        ds = Dataset()
        ds.Modality = modality
        for key, value in tags.items():
            if value is not None:
                setattr(ds, key, value[i] if isinstance(value, list) and value and isinstance(value[0], list)
                        else value)
        out.append((f"{i}.dcm", ds))
    return out


@pytest.mark.parametrize("name", REAL)
def test_real_vendor_corrected_image_says_attenuation_corrected(shared, name):
    """The eight real GE, Philips and Siemens series state ATTN among their corrections (NORM, DTIM, SCAT, DECY,
    RAN...), and no AttenuationCorrectionMethod: corrected, method unknown."""
    hs = _real(shared, name)
    assert all("ATTN" in h["CorrectedImage"] and "AttenuationCorrectionMethod" not in h for h in hs)
    files = _datasets(CorrectedImage=[h["CorrectedImage"] for h in hs])
    assert _attenuation_facts("PT", files) == {"attenuation_corrected": True, "attenuation_method": None}
    # The same corrections without ATTN: a NAC reconstruction of the same scan.
    nac = _datasets(CorrectedImage=[[f for f in h["CorrectedImage"] if f != "ATTN"] for h in hs])
    assert _attenuation_facts("PT", nac)["attenuation_corrected"] is False


@pytest.mark.parametrize("tags, corrected, method", [
    ({"CorrectedImage": ["DECY", "ATTN"], "AttenuationCorrectionMethod": "measured,AC CT"}, True, "measured,AC CT"),
    ({"CorrectedImage": "attn"}, True, None),  # one value, lower case
    ({"CorrectedImage": ["DECY", "SCAT"]}, False, None),
    ({"CorrectedImage": None}, None, None),  # absent: unknown, not NAC
    ({"CorrectedImage": ""}, None, None),  # type 2, empty: unknown
    ({"CorrectedImage": [["ATTN", "DECY"], ["DECY"]]}, None, None),  # the instances disagree
    ({"CorrectedImage": ["ATTN"], "AttenuationCorrectionMethod": [["CTAC"], ["MRAC"]]}, True, None),
    ({"CorrectedImage": ["ATTN"], "AttenuationCorrectionMethod": "CTAC 20201217"}, True, None),  # a date: never kept
    ({"CorrectedImage": ["ATTN"], "AttenuationCorrectionMethod": ""}, True, None),
])
def test_dicom_attenuation_facts(tags, corrected, method):
    assert _attenuation_facts("PT", _datasets(**tags)) == {"attenuation_corrected": corrected,
                                                           "attenuation_method": method}


def test_an_nm_series_without_attn_is_unknown_not_nac():
    """SPECT exports often leave their attenuation correction out of CorrectedImage (type 3 in the NM module)."""
    assert _attenuation_facts("NM", _datasets(CorrectedImage=["UNIF", "COR"]))["attenuation_corrected"] is None
    assert _attenuation_facts("NM", _datasets(CorrectedImage=["ATTN", "SCAT"]))["attenuation_corrected"] is True


def _series(samples_dir, dest, **tags):
    """6 slices of the sample PET (SUVbw-ready: ATTN\\DECY, BQML, weight, dose) with ``tags`` set in each."""
    dest.mkdir()
    for f in sorted((samples_dir / "pet").glob("*.dcm"))[_SLICES]:
        ds = pydicom.dcmread(str(f))
        for key, value in tags.items():
            setattr(ds, key, value)
        ds.save_as(str(dest / f.name))
    return dest


def _silent(fn, *args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        return fn(*args, **kw)


def test_a_nac_dicom_pet_gives_no_suv_and_says_why(samples_dir, tmp_path):
    """Asked for SUV (auto or bw), a NAC PET stays in Bq/mL, its values exactly as stored, with a warning that
    says why and how to keep Bq/mL without one (suv='none')."""
    ac = _series(samples_dir, tmp_path / "ac", AttenuationCorrectionMethod="measured,AC CT")
    nac = _series(samples_dir, tmp_path / "nac", CorrectedImage=["DECY", "SCAT"])
    stored = _silent(medfuse.load, nac, suv="none")  # suv='none': no SUV asked for, nothing to warn about
    assert stored.unit == "Bq/mL" and "suv_factor" not in stored.provenance
    for suv in ("auto", "bw"):
        with pytest.warns(MedfuseWarning) as rec:
            vol = medfuse.load(nac, suv=suv)
        said = [str(w.message) for w in rec if "attenuation-corrected" in str(w.message)]
        assert len(said) == 1, [str(w.message) for w in rec]
        assert "PET loaded in Bq/mL, not SUV: the series is not attenuation-corrected (its CorrectedImage lacks " \
               "ATTN), so its values are not quantitative" in said[0]
        assert "suv='none' to keep Bq/mL" in said[0]
        assert said[0].split(": ", 1)[1] in vol.provenance["warnings"]
        assert vol.unit == "Bq/mL" and "suv_factor" not in vol.provenance
        np.testing.assert_array_equal(vol.array, stored.array)
        assert vol.provenance["pet_acquisition"]["attenuation_corrected"] is False
    corrected = _silent(medfuse.load, ac)
    assert corrected.unit == "SUVbw" and corrected.provenance["suv_factor"] > 0
    facts = corrected.provenance["pet_acquisition"]
    assert (facts["attenuation_corrected"], facts["attenuation_method"]) == (True, "measured,AC CT")
    # The two as time points: the AC/NAC note (and the units'), whichever is the baseline.
    for first, second in ((corrected, vol), (vol, corrected)):
        reasons = comparability(first, second)
        assert [r.split(":")[0] for r in reasons] == ["one image is attenuation-corrected and the other is not",
                                                      "one image is in SUV and the other is not"]


# ------------------------------------------------------------------------------------------ PET-BIDS
@pytest.mark.parametrize("value, corrected, method", [
    ("CT-based", True, "CT-based"),  # the BIDS specification's examples
    ("[137Cs]transmission scan-based", True, "[137Cs]transmission scan-based"),
    (" MR-based (Dixon) ", True, "MR-based (Dixon)"),
    ("none", False, None), ("No", False, None), ("n/a", False, None), ("NAC", False, None),
    ("No AC", False, None), ("non-attenuation-corrected", False, None), ("Not attenuation corrected", False, None),
    ("without attenuation correction.", False, None),
    ("CT-based, no scatter correction", None, "CT-based, no scatter correction"),  # a negation: not guessed
    ("", None, None), ("CT 2021-03-04", None, None),  # empty; a date is never kept
    (["CT-based"], None, None), (True, True, None), (False, False, None),
])
def test_pet_bids_attenuation_correction(value, corrected, method):
    facts = pet_acquisition({**META, "AttenuationCorrection": value})
    assert (facts["attenuation_corrected"], facts["attenuation_method"]) == (corrected, method)
    assert pet_acquisition({k: v for k, v in META.items() if k != "AttenuationCorrection"})[
        "attenuation_corrected"] is None


def test_a_nac_pet_bids_pet_gives_no_suv(tmp_path):
    (tmp_path / "ac").mkdir()
    (tmp_path / "nac").mkdir()
    ac = _silent(medfuse.load, _pet(tmp_path / "ac")[0])
    assert ac.unit == "SUVbw" and ac.provenance["pet_acquisition"]["attenuation_method"] == "CT-based"
    nii, side, arr = _pet(tmp_path / "nac", AttenuationCorrection="No attenuation correction")
    before = side.read_bytes()
    with pytest.warns(MedfuseWarning, match="AttenuationCorrection says the image is not attenuation-corrected, so "
                                            "its values are not quantitative"):
        nac = medfuse.load(nii)
    assert nac.unit == "Bq/mL" and side.read_bytes() == before
    np.testing.assert_array_equal(nac.array, arr)
    assert nac.provenance["pet_acquisition"]["attenuation_corrected"] is False
    assert comparability(ac, nac)[0].startswith("one image is attenuation-corrected and the other is not")
    assert json.loads(before)["AttenuationCorrection"] == "No attenuation correction"
