"""``medfuse.measure.region_statistics``: several labels of one label map and the ratio to a reference label.

Found by a neuroimaging user (amyloid/FDG PET with a T1 label map, SUVR = target mean over the cerebellum's or
pons' mean): ``mask_statistics(label=[1, 2])`` was refused and there was no ratio, and labels on the T1 measured on
the PET in its own space through the registration's transform (T1 fixed, PET moving) read the wrong voxels.

References: numpy on the same voxels (the SPM12 PET template on the T1 template's grid, labels drawn on the T1),
a PET moved by a known rigid motion (no resampling: the same array placed elsewhere, so the true figures are the
template's own), and uniform regions whose means and peaks are their values.
"""

from __future__ import annotations

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError
from medfuse.measure import mask_statistics, region_statistics
from medfuse.registration.transforms import Transform
from medfuse.volume import Volume
from tests.conftest import shared_path

#: A rigid motion (8 degrees about z, a shift in mm): where the PET lies in its own space, in LPS.
_A = np.deg2rad(8.0)
MOTION = np.array([[np.cos(_A), -np.sin(_A), 0.0, 6.0], [np.sin(_A), np.cos(_A), 0.0, -9.0], [0.0, 0.0, 1.0, 4.0],
                   [0.0, 0.0, 0.0, 1.0]])


def _brain_labels(t1: Volume) -> np.ndarray:
    """Left and right upper brain (1, 2) and a lower posterior region standing for the cerebellum (3)."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in t1.shape), indexing="ij")
    brain = t1.array > 0.35
    lab = np.zeros(t1.shape, np.uint8)
    lab[brain & (i < 45) & (k >= 35)] = 1
    lab[brain & (i >= 46) & (k >= 35)] = 2
    lab[brain & (k < 25) & (j < 40)] = 3
    return lab


@pytest.fixture(scope="module")
def spm():
    """The SPM12 T1 and PET templates (one grid) and a label map drawn on the T1."""
    folder = shared_path("data", "spm12-templates")
    t1, pet = medfuse.load(folder / "T1.nii"), medfuse.load(folder / "PET.nii")
    assert pet.same_grid(t1)
    pet = pet.with_array(pet.array, modality="PT")
    return t1, pet, t1.with_array(_brain_labels(t1), modality="unknown", unit="arbitrary")


def test_each_label_has_mask_statistics_figures_and_the_ratio_to_the_reference(spm):
    _, pet, labels = spm
    got = region_statistics(pet, labels, labels=[1, 2], reference=3)
    assert list(got) == [1, 2, 3]  # the ones asked, then the reference
    ref = pet.array[labels.array == 3].mean()
    for lab, figs in got.items():
        alone = mask_statistics(pet, labels, label=lab)
        assert {k: v for k, v in figs.items() if k != "ratio_to_reference"} == alone
        truth = pet.array[labels.array == lab]
        assert figs["count"] == truth.size
        assert figs["mean"] == pytest.approx(truth.mean(), rel=1e-12)
        assert figs["ratio_to_reference"] == pytest.approx(truth.mean() / ref, rel=1e-12)
    assert got[3]["ratio_to_reference"] == 1.0


def test_without_labels_every_label_present_is_measured_and_no_ratio_without_reference(spm):
    _, pet, labels = spm
    got = region_statistics(pet, labels)
    assert list(got) == [1, 2, 3]
    assert all(f["ratio_to_reference"] is None for f in got.values())
    # Repeats are measured once; the reference among the labels is not added twice.
    assert list(region_statistics(pet, labels, labels=[2, 3, 2], reference=3)) == [2, 3]


def test_labels_on_the_t1_measured_on_the_pet_in_its_own_space_need_the_inverse_transform(spm):
    """register(T1, PET).transform maps the T1's points to the PET's (MOTION); the PET's figures need the
    inverse, as the docstring says. The PET here is the template's array placed by MOTION, so the truth is the
    template's own figures."""
    _, pet, labels = spm
    own = Volume(pet.array, MOTION @ np.asarray(pet.affine), modality="PT", unit=pet.unit)
    t1_to_pet = Transform.from_matrix(MOTION)
    right = region_statistics(own, labels, labels=[1, 2], reference=3, transform=t1_to_pet.inverse())
    ref = pet.array[labels.array == 3].mean()
    for lab in (1, 2):
        truth = pet.array[labels.array == lab]
        assert right[lab]["count"] == truth.size
        assert right[lab]["mean"] == pytest.approx(truth.mean(), rel=1e-9)
        assert right[lab]["ratio_to_reference"] == pytest.approx(truth.mean() / ref, rel=1e-9)
    with pytest.warns(medfuse.MedfuseWarning):  # the wrong way moves the reference partly out of the field
        wrong = region_statistics(own, labels, labels=[1, 2], reference=3, transform=t1_to_pet)
    assert abs(wrong[1]["ratio_to_reference"] - right[1]["ratio_to_reference"]) > 0.2


def test_uniform_regions_give_their_values_and_exact_ratios():
    """Three boxes of 4, 2 and 1 (larger than the 1 mL sphere): means, peaks and ratios are the values."""
    lab = np.zeros((40, 40, 40), np.int16)
    arr = np.zeros(lab.shape, np.float32)
    for n, (value, sl) in enumerate([(4.0, np.s_[2:14]), (2.0, np.s_[14:26]), (1.0, np.s_[26:38])], start=1):
        lab[sl, 5:35, 5:35] = n
        arr[sl, :, :] = value  # the sphere reaching beyond a label stays in its value within the box's slabs
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    got = region_statistics(Volume(arr, affine, modality="PT", unit="SUVbw"), Volume(lab, affine), reference=3)
    assert [got[n]["ratio_to_reference"] for n in (1, 2, 3)] == [4.0, 2.0, 1.0]
    assert [got[n]["mean"] for n in (1, 2, 3)] == [4.0, 2.0, 1.0]
    assert got[1]["peak"] == 4.0 and got[1]["count"] == 12 * 30 * 30


def test_an_atlas_reaching_beyond_the_image_leaves_out_the_labels_wholly_outside():
    """A whole-head atlas on a PET of limited axial range: labels=None measured none at all (the review found it)
    when one label lay wholly beyond the PET; now that label is left out, said, and the others are measured."""
    affine = np.diag([2.0, 2.0, 2.0, 1.0])
    pet = Volume(np.full((20, 20, 20), 3.0, np.float32), affine, modality="PT", unit="SUVbw")
    pet.array[:, :, :10] = 1.5
    lab = np.zeros((20, 20, 30), np.int16)  # 10 slices beyond the PET's last
    lab[4:16, 4:16, 2:8], lab[4:16, 4:16, 22:28], lab[4:16, 4:16, 12:18] = 1, 2, 3
    with pytest.warns(medfuse.errors.MedfuseWarning, match="1 of the mask's 3 labels select no voxel.*left out: 2"):
        got = region_statistics(pet, Volume(lab, affine), reference=3)
    assert sorted(got) == [1, 3] and got[1]["ratio_to_reference"] == 0.5
    with pytest.raises(InvalidInputError, match="label 2 region has no such voxel"):  # asked for: still refused
        region_statistics(pet, Volume(lab, affine), labels=[1, 2], reference=3)


def test_bad_labels_and_references_are_typed_errors(spm):
    _, pet, labels = spm
    for bad in ("1", [1.5], [], [[1, 2]], True):
        with pytest.raises(InvalidInputError) as info:
            region_statistics(pet, labels, labels=bad)
        assert info.value.fix
    with pytest.raises(InvalidInputError, match="label 7 region has no such voxel"):
        region_statistics(pet, labels, labels=[1, 7])
    with pytest.raises(InvalidInputError, match="reference must be a whole number"):
        region_statistics(pet, labels, reference=2.5)
    zero = pet.with_array(np.where(labels.array == 3, 0.0, pet.array))
    with pytest.raises(InvalidInputError, match="reference label 3's mean is 0"):
        region_statistics(zero, labels, labels=[1], reference=3)
    with pytest.raises(InvalidInputError, match="probability map"):
        region_statistics(pet, labels.with_array(labels.array * 0.5))
    with pytest.raises(InvalidInputError, match="no label"):
        region_statistics(pet, labels.with_array(np.zeros(labels.shape, np.uint8)))


def test_mask_statistics_with_a_list_of_labels_points_to_region_statistics(spm):
    _, pet, labels = spm
    with pytest.raises(InvalidInputError) as info:
        mask_statistics(pet, labels, label=[1, 2])
    assert "region_statistics" in info.value.fix
