"""The default SUV ranges are adult values: normalise warns (and records it) when one clips much of the uptake.

Before: a neonate's SUVbsa PET (SUVbsa = SUVbw x body surface / weight, about 0.65 cm²/g against an adult's 0.25)
was mapped from the fixed 0..2.5 range with 57 % of its uptake white, and only ``clipped_fraction`` (a share of the
whole grid, air included) in the record said anything. The ranges stay fixed (fused images of different patients
compare); the warning says how much was clipped and how to set the range.
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.fusion.normalise import UPTAKE_CLIP_WARN, UPTAKE_FLOOR, normalise
from medfuse.volume import Volume
from tests.conftest import SAMPLES

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
#: Body surface over weight (cm²/g): an adult (1.9 m², 75 kg) and a neonate (0.21 m², 3.2 kg).
ADULT, NEONATE = 0.25, 0.65


def _suvbw() -> np.ndarray:
    """One anatomy in SUVbw, with exact voxel counts: air 0, a body of 4000 voxels at 1.5 holding a brain at 5
    (1000 voxels) and a bladder at 20 (40)."""
    x = np.zeros((24, 24, 20))
    x[2:22, 2:22, 5:15] = 1.5
    x[6:16, 6:16, 5:15] = 5.0
    x[18:20, 18:20, 5:15] = 20.0
    return x


def _share(x: np.ndarray, high: float) -> float:
    """Share of the voxels above a tenth of ``[0, high]`` that lie above ``high``: computed here, from the values."""
    return np.count_nonzero(x > high) / np.count_nonzero(x > UPTAKE_FLOOR * high)


def _clip_warnings(caught) -> list:
    return [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)
            and "default SUV range" in str(w.message)]


def _normalised(x, **options):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = normalise(x, **options)
    return out, _clip_warnings(caught)


@pytest.mark.parametrize("dtype", [None, np.float32])
def test_a_neonates_suvbsa_warns_with_the_share_of_uptake_clipped(dtype):
    pet = _suvbw() * NEONATE  # SUVbsa: body 0.975, brain 3.25 and bladder 13 above the 2.5 of the default range
    share = _share(pet, 2.5)
    assert share == 1040 / 4000 and share > UPTAKE_CLIP_WARN
    (scaled, rec), said = _normalised(pet, modality="PT", unit="SUVbsa", dtype=dtype)
    assert len(said) == 1
    assert f"clips {100 * share:.1f} % of this PET's uptake" in said[0]
    assert "1040 of the 4000 voxels above 0.25" in said[0] and "adult default" in said[0]
    assert "suv_max=" in said[0] and "--suv-range 0 " in said[0]
    assert rec["uptake_clipped_fraction"] == share and rec["warning"] == said[0]
    assert rec["suv_max"] == 2.5 and rec["high"] == 2.5  # the default range itself is kept
    assert np.count_nonzero(np.asarray(scaled) == 1.0) == 1040


def test_the_same_anatomy_as_an_adults_suvbsa_does_not_warn():
    pet = _suvbw() * ADULT  # only the bladder (40 voxels) above 2.5
    assert _share(pet, 2.5) == 40 / 4000
    (_, rec), said = _normalised(pet, modality="PT", unit="SUVbsa")
    assert said == [] and "warning" not in rec and "uptake_clipped_fraction" not in rec


def test_the_suggested_suv_max_keeps_the_uptake_and_does_not_warn():
    rng = np.random.default_rng(3)
    pet = _suvbw() * NEONATE * rng.uniform(0.8, 1.2, size=(24, 24, 20))  # uptake of varied values
    (_, rec), said = _normalised(pet, modality="PT", unit="SUVbsa")
    suggested = float(re.search(r"suv_max=([0-9.]+)\)", said[0]).group(1))
    assert suggested >= np.percentile(pet[pet > 0.25], 99.5)  # rounded up, so at most 0.5 % of it clipped
    (_, rec2), said2 = _normalised(pet, modality="PT", unit="SUVbsa", suv_max=suggested)
    assert said2 == [] and "warning" not in rec2
    assert np.count_nonzero(pet > suggested) <= 0.005 * np.count_nonzero(pet > 0.25)


def test_a_range_the_caller_chose_is_not_warned_about():
    pet = _suvbw() * NEONATE
    (_, rec), said = _normalised(pet, modality="PT", unit="SUVbsa", suv_max=2.5)
    assert said == [] and "warning" not in rec and rec["clipped_fraction"] > 0


def test_suvbw_above_its_default_range_warns_too():
    pet = _suvbw() * 2.5  # brain 12.5 and bladder 50 above 10: 1040 of the 4000 voxels above 1
    (_, rec), said = _normalised(pet, method="suv")
    assert rec["uptake_clipped_fraction"] == _share(pet, 10.0) and len(said) == 1
    assert "SUVbsa" not in said[0]  # the body-surface explanation is for SUVbsa only


def test_the_fused_volumes_provenance_carries_it():
    pet = Volume((_suvbw() * NEONATE).astype(np.float32), AFFINE, modality="PT", unit="SUVbsa")
    mr = Volume(np.linspace(0, 500, pet.array.size).reshape(pet.shape), AFFINE, modality="MR")
    with pytest.warns(MedfuseWarning, match="default SUV range 0..2.5 clips 26.0 %"):
        fused = medfuse.fuse(mr, pet, method="mean")
    rec = fused.provenance["normalisation"][1]
    assert rec["uptake_clipped_fraction"] == _share(pet.array, 2.5)
    assert "adult default" in rec["warning"]
    assert "warning" not in fused.provenance["normalisation"][0]


def test_the_bundled_adult_pet_does_not_warn():
    pet = medfuse.load(SAMPLES / "pet")
    assert pet.unit == "SUVbw"
    (_, rec), said = _normalised(pet)
    share = _share(np.asarray(pet.array, dtype=np.float64), 10.0)
    assert share < 0.01 * UPTAKE_CLIP_WARN  # 0.03 %: far from the threshold, not near it
    assert said == [] and "warning" not in rec
