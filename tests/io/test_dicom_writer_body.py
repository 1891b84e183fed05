"""A PET loaded with ``body=`` (weight, height, sex in place of the header's) and saved as DICOM carries the body its
SUV was made with, not its header's: the written series had the header's 70 kg (and no height) beside voxels made
with the override, so SUV computed again from the written header (a PACS's, a conversion to another SUV kind) was
another SUV.

The sample PET (``sample_volumes/pet``: PatientWeight 70, no PatientSize, PatientSex O), four of its slices.
"""

from __future__ import annotations

import warnings

import numpy as np
import pydicom
import pytest

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.io.writers import save
from medfuse.volume import Volume
from tests.io.test_suv_children import _pet_copy

BODY = {"weight_kg": 82.5, "height_m": 1.8, "sex": "F"}


def _header(folder) -> pydicom.Dataset:
    return pydicom.dcmread(sorted(folder.iterdir())[0], stop_before_pixels=True)


def _body_of(ds) -> tuple:
    return float(ds.PatientWeight), float(ds.PatientSize) if "PatientSize" in ds else None, ds.PatientSex


@pytest.mark.parametrize("deidentify", [True, False])
def test_a_pet_loaded_with_body_is_written_with_that_body(samples_dir, tmp_path, deidentify):
    folder = _pet_copy(samples_dir, tmp_path / "pet")
    assert _body_of(_header(folder)) == (70.0, None, "O")
    pet = medfuse.load(folder, suv="bsa", body=BODY)
    out = save(pet, tmp_path / "out", template=folder, deidentify=deidentify)
    assert _body_of(_header(out)) == (82.5, 1.8, "F")
    back = medfuse.load(out)  # stored SUVbsa (CM2ML), read as is
    assert back.unit == "SUVbsa"
    np.testing.assert_allclose(back.array, pet.array, rtol=0, atol=float(pet.array.max()) / 65534)
    # SUVbw from the written SUVbsa goes through the written weight and height: the override's SUVbw, not 70 kg's
    expected = medfuse.load(folder, suv="bw", body=BODY)
    as_bw = medfuse.load(out, suv="bw")
    assert as_bw.unit == "SUVbw"
    np.testing.assert_allclose(as_bw.array, expected.array, rtol=0, atol=float(expected.array.max()) / 30000)


def test_without_body_the_templates_body_is_kept(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet")
    pet = medfuse.load(folder, suv="bw")
    assert not any(h.get("step") == "suv" for h in pet.provenance.get("history", []))
    out = save(pet, tmp_path / "out", template=folder)
    assert _body_of(_header(out)) == (70.0, None, "O")


def test_a_resampled_pet_keeps_the_body_and_a_fused_image_the_templates(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet")
    pet = medfuse.load(folder, suv="bw", body={"weight_kg": 82.5})
    # Half a voxel along i: a new grid, so the values are interpolated; the provenance (and history) goes along
    grid = pet.affine.copy()
    grid[:3, 3] += grid[:3, 0] / 2
    moved = medfuse.resample(pet, Volume(np.zeros(pet.shape, np.float32), grid, modality="PT", unit="SUVbw"))
    out = save(moved, tmp_path / "moved", template=folder)
    assert _body_of(_header(out)) == (82.5, None, "O")
    # With SUV from the written header (Units GML: the voxels as they are) the values are the resampled ones
    np.testing.assert_allclose(medfuse.load(out).array, moved.array, rtol=0, atol=float(moved.array.max()) / 65534)

    plain = medfuse.load(folder, suv="bw")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)  # two inputs of one series: not the point
        fused = medfuse.fuse(pet, plain, method="mean")
        # Two PETs loaded with different weights: no one weight belongs to the result, the template's stays
        other = medfuse.fuse(pet, medfuse.load(folder, suv="bw", body={"weight_kg": 60.0}), method="mean")
    # A fused image is no PET (no SUV is computed from its header): the template's body stays, as without body=.
    assert fused.modality != "PT"
    assert _body_of(_header(save(fused, tmp_path / "fused", template=folder))) == (70.0, None, "O")
    assert _body_of(_header(save(other, tmp_path / "other", template=folder))) == (70.0, None, "O")


def test_a_hand_edited_body_record_does_not_break_the_write(samples_dir, tmp_path):
    folder = _pet_copy(samples_dir, tmp_path / "pet")
    pet = medfuse.load(folder, suv="bw")
    pet.add_history("suv", kind="bw", body={"PatientWeight": "heavy", "PatientSize": [1.8], "PatientSex": "X"})
    out = save(pet, tmp_path / "out", template=folder)
    assert _body_of(_header(out)) == (70.0, None, "O")
