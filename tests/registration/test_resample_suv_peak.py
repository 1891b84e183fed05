"""Resampling a PET in SUV or Bq/mL onto a coarser or shifted grid lowers its maximum (SUVmax): said, with the
figures of the arrays themselves, when it falls by more than 2 %; not said when nothing is lost."""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.volume import Volume

_NOTE = re.compile(r"resampling \((\w+) interpolation\) lowered the maximum from ([\d.]+) to ([\d.]+) (\S+) "
                   r"\(([-+][\d.]+) %\)")


@pytest.fixture(scope="module")
def pet_ct(samples_dir):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medfuse.load(samples_dir / "pet"), medfuse.load(samples_dir / "ct")


def _resample(*args, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = medfuse.resample(*args, **kw)
    return out, [str(w.message) for w in caught if issubclass(w.category, MedfuseWarning)
                 and _NOTE.search(str(w.message))]


def test_pet_onto_ct_grid_warns_with_its_figures(pet_ct):
    pet, ct = pet_ct
    assert pet.unit == "SUVbw" and pet.spacing != ct.spacing
    out, said = _resample(pet, ct)
    assert len(said) == 1
    interp, before, after, unit, change = _NOTE.search(said[0]).groups()
    top_in, top_out = float(pet.array.max()), float(out.array.max())
    assert top_out < top_in * 0.98  # linear onto the CT's 1 x 1 x 4 mm grid: the hot spot is blended
    assert (interp, unit) == ("linear", "SUVbw")
    assert float(before) == _shown(top_in) and float(after) == _shown(top_out)
    assert float(change) == round((top_out - top_in) / top_in * 100, 1)
    assert "medfuse measure PET --mask MASK --transform T" in said[0]
    assert said[0] in out.provenance["warnings"]  # the result's sidecar keeps it


def _shown(x):
    """A maximum as the warning prints it: 2 decimals, none from 1000 up (Bq/mL)."""
    return round(x, 2) if abs(x) < 1000 else float(round(x))


def test_bq_ml_pet_warns_too(samples_dir, pet_ct):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        bq = medfuse.load(samples_dir / "pet", suv="none")
    assert bq.unit == "Bq/mL" and bq.modality == "PT"
    out, said = _resample(bq, pet_ct[1])
    assert len(said) == 1 and " Bq/mL (" in said[0]
    before, after = (float(x) for x in _NOTE.search(said[0]).groups()[1:3])
    assert before == _shown(float(bq.array.max())) and after == _shown(float(out.array.max()))
    assert before > 1000  # the Bq/mL figures, not SUV's


def test_no_warning_when_the_maximum_is_kept(pet_ct):
    pet, ct = pet_ct
    # Nearest neighbour only picks voxels.
    out, said = _resample(pet, ct, interpolation="nearest")
    assert not said and float(out.array.max()) == float(pet.array.max())
    # A grid twice as fine whose every other voxel centre is the PET's: its voxels are all sampled exactly.
    fine_affine = pet.affine.copy()
    fine_affine[:3, :3] /= 2.0
    fine = Volume(np.zeros(tuple(2 * s - 1 for s in pet.shape), np.float32), fine_affine)
    out, said = _resample(pet, fine)
    assert not said and float(out.array.max()) == pytest.approx(float(pet.array.max()), rel=1e-6)
    # Another modality, or a PET on no quantitative scale, is not a measurement of uptake.
    for vol in (Volume(pet.array, pet.affine, modality="MR"),
                Volume(pet.array, pet.affine, modality="PT", unit="arbitrary")):
        _, said = _resample(vol, ct)
        assert not said
