"""PET-BIDS ``Units`` spelled with a prefix (kBq/mL, as OpenNeuro PETs state it) or not understood.

A sidecar saying ``"Units": "kBq/mL"`` loaded the PET as ``arbitrary``, without SUV and without a word, so a
regional mean read 1000 times too low beside a Bq/mL PET. The expected SUV factor is computed by hand, as in
``test_pet_bids.py``: weight_g / (dose_Bq * 2 ** (-uptake_s / half_life_s)).
"""

from __future__ import annotations

import json
import warnings

import nibabel as nib
import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning

F18_S = 6586.2
META = {"Modality": "PT", "TracerRadionuclide": "F18", "InjectedRadioactivity": 370,
        "InjectedRadioactivityUnits": "MBq", "BodyWeight": 70.0, "InjectionStart": 0, "ScanStart": 3600,
        "ImageDecayCorrected": True, "ImageDecayCorrectionTime": 3600}
AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])


def _pet(tmp_path, units, *, suv_fields=True):
    arr = np.random.default_rng(3).uniform(0.0, 40.0, (6, 5, 4)).astype(np.float32)
    nii = tmp_path / "sub-01_pet.nii.gz"
    nib.save(nib.Nifti1Image(arr, AFFINE), nii)
    meta = {**(META if suv_fields else {"Modality": "PT"}), "Units": units}
    (tmp_path / "sub-01_pet.json").write_text(json.dumps(meta))
    return nii, arr


@pytest.mark.parametrize("units, per_bqml", [("kBq/mL", 1e3), ("KBQ/ML", 1e3), ("kBq/cc", 1e3), ("MBq/mL", 1e6)])
def test_prefixed_activity_is_read_in_bq_ml_and_gives_the_same_suv(tmp_path, units, per_bqml):
    nii, arr = _pet(tmp_path, units)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        bq = medfuse.load(nii, suv="none")
        suv = medfuse.load(nii)
    assert bq.unit == "Bq/mL"
    np.testing.assert_allclose(bq.array, arr.astype(np.float64) * per_bqml, rtol=1e-6)
    factor = 70.0 * 1000.0 / (370e6 * 2.0 ** (-3600.0 / F18_S))
    assert suv.unit == "SUVbw" and suv.provenance["suv_factor"] == pytest.approx(factor, rel=1e-9)
    np.testing.assert_allclose(suv.array, arr.astype(np.float64) * per_bqml * factor, rtol=1e-6)
    np.testing.assert_array_equal(suv.affine, bq.affine)


def test_g_per_ml_is_suvbw_as_gml_is(tmp_path):
    nii, arr = _pet(tmp_path, "g/mL", suv_fields=False)
    v = medfuse.load(nii)
    assert v.unit == "SUVbw" and "suv_factor" not in v.provenance
    np.testing.assert_array_equal(v.array, arr)


@pytest.mark.parametrize("units", ["Bq/L", "percent", "uCi/mL"])
def test_a_unit_not_understood_is_said(tmp_path, units):
    nii, arr = _pet(tmp_path, units)
    with pytest.warns(MedfuseWarning, match=f"Units '{units}' is not one medfuse reads") as caught:
        v = medfuse.load(nii)
    assert v.unit == "arbitrary"
    np.testing.assert_array_equal(v.array, arr)
    assert "unit='Bq/mL'" in str(caught[-1].message)
    # The caller naming the unit is taken as said, without the warning and without rescaling.
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        named = medfuse.load(nii, unit="Bq/mL")
    np.testing.assert_array_equal(named.array, arr)
