"""Python API contracts a research engineer's pipeline relies on: refused voxel types, copies, arithmetic,
inputs fuse cannot take, and what denormalise returns."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError


def test_timedelta_voxels_are_refused_when_the_volume_is_made():
    with pytest.raises(InvalidInputError, match="numeric"):
        medfuse.Volume(np.ones((8, 8, 8), "timedelta64[s]"), np.eye(4), modality="MR")


def test_a_shallow_copy_shares_voxels_but_not_the_history():
    v = medfuse.Volume(np.zeros((4, 4, 4)), np.eye(4), provenance={"history": []})
    w = copy.copy(v)
    w.add_history("smoothed", sigma=2)
    assert v.provenance["history"] == [] and w.provenance["history"][-1]["step"] == "smoothed"
    assert np.shares_memory(v.array, w.array)  # shallow: the voxels are shared
    w.affine[0, 3] = 5.0
    assert v.affine[0, 3] == 0.0


@pytest.mark.parametrize("op", [lambda v: v + 1, lambda v: 2 * v, lambda v: v / 2, lambda v: -v, lambda v: v > 1,
                                lambda v: v ** 2, lambda v: v == 0, lambda v: v != 0.5, lambda v: v == np.zeros(3)])
def test_arithmetic_on_a_volume_says_how_to_keep_the_geometry(op):
    v = medfuse.Volume(np.ones((4, 4, 4)), np.eye(4), modality="CT", unit="HU")
    with pytest.raises(TypeError, match="with_array"):
        op(v)
    # NumPy still reads a Volume as its voxels (documented): plain arrays out.
    assert isinstance(np.add(v, 1), np.ndarray) and float(np.mean(v)) == 1.0
    # Equality stays identity for anything else (mask = vol == 0 was silently False).
    w = v.copy()
    assert v == v and v != w and not (v == None) and v in [w, v] and {v: 1}[v] == 1  # noqa: E711


def test_fuse_names_paths_and_library_images_with_the_conversion_to_use(tmp_path):
    import nibabel as nib
    import SimpleITK as sitk

    cases = [(str(tmp_path / "a.nii.gz"), "fuse_files"), (sitk.Image(8, 8, 8, sitk.sitkFloat32), "from_sitk"),
             (nib.Nifti1Image(np.zeros((8, 8, 8), np.float32), np.eye(4)), "from_nibabel")]
    for x, fix in cases:
        with pytest.raises(InvalidInputError, match=fix):
            medfuse.fuse(x, x, method="mean")


def test_denormalise_returns_the_type_it_was_given_and_never_the_callers_array():
    from medfuse.fusion.normalise import denormalise, normalise

    ct = medfuse.Volume(np.linspace(-1000, 1000, 64).reshape(4, 4, 4), np.diag([2.0, 2.0, 3.0, 1.0]),
                        modality="CT", unit="HU")
    scaled, rec = normalise(ct, method="minmax")
    back = denormalise(scaled, rec)
    assert isinstance(back, medfuse.Volume) and back.unit == "HU" and back.same_grid(ct)
    assert np.allclose(back.array, ct.array)
    s, r = normalise(np.random.default_rng(0).random((5, 5)), method="none")
    out = denormalise(s, r)
    assert not np.shares_memory(out, s) and np.array_equal(out, s)
