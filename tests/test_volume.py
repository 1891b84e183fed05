"""medfuse.volume: conversions (SimpleITK, nibabel, MONAI), LPS/RAS, repr, provenance, bad arrays."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medfuse.errors import GeometryError, InvalidInputError
from medfuse.volume import LPS_TO_RAS, Volume


def _oblique(flip=False):
    aff = np.eye(4)
    aff[:3, :3] = Rotation.from_euler("zyx", [25, -10, 40], degrees=True).as_matrix() * [0.7, 1.3, 3.0]
    if flip:
        aff[:3, 0] *= -1  # left-handed grid, as NIfTI LAS files give
    aff[:3, 3] = [12.5, -40.0, 77.0]
    return aff


@pytest.fixture(params=[False, True], ids=["right-handed", "left-handed"])
def vol(request):
    arr = np.random.default_rng(0).normal(size=(5, 6, 7)).astype(np.float32)
    return Volume(arr, _oblique(request.param), modality="PET", unit="SUVbw", provenance={"source": "/x.nii"})


def test_sitk_round_trip(vol):
    img = vol.to_sitk()
    assert img.GetSize() == vol.shape and np.allclose(img.GetSpacing(), vol.spacing)
    # SimpleITK's own index->point agrees with our affine
    assert np.allclose(img.TransformIndexToPhysicalPoint((4, 5, 6)), vol.index_to_world([4, 5, 6]))
    back = Volume.from_sitk(img, modality="PT", unit="SUVbw")
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-9)


def test_nibabel_round_trip_and_ras(vol):
    img = vol.to_nibabel()
    assert np.allclose(img.affine, LPS_TO_RAS @ vol.affine)
    assert int(img.header["sform_code"]) == 1 and int(img.header["qform_code"]) == 1
    assert np.allclose(img.header.get_qform(), vol.affine_ras, atol=1e-5)
    back = Volume.from_nibabel(img)
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-9)
    # a point: LPS (x, y, z) is RAS (-x, -y, z)
    p = vol.index_to_world([1, 2, 3])
    assert np.allclose(img.affine @ [1, 2, 3, 1], [-p[0], -p[1], p[2], 1])


def test_metatensor_round_trip(vol):
    pytest.importorskip("monai")
    mt = vol.to_metatensor()
    assert tuple(mt.shape) == (1,) + vol.shape
    assert np.allclose(np.asarray(mt.affine), vol.affine_ras)
    back = Volume.from_metatensor(mt)
    assert (back.modality, back.unit) == ("PT", "SUVbw")
    assert np.array_equal(back.array, vol.array) and np.allclose(back.affine, vol.affine, atol=1e-9)


def test_lps_ras_is_an_involution():
    assert np.array_equal(LPS_TO_RAS @ LPS_TO_RAS, np.eye(4))
    v = Volume(np.zeros((2, 2, 2)), np.diag([1.0, 1.0, 1.0, 1.0]))
    assert v.orientation == "LPS" and np.allclose(v.affine_ras[:3, :3], np.diag([-1, -1, 1]))


def test_repr_has_no_phi_and_provenance_whitelist():
    v = Volume(np.zeros((2, 3, 4)), np.eye(4), modality="CT", unit="HU",
               provenance={"source": "/data/ct", "PatientName": "Doe^Jane", "patient_id": "MRN1", "series_uid": "1.2.3"})
    assert set(v.provenance) == {"source", "series_uid"}
    text = repr(v) + str(v.provenance)
    assert "Doe" not in text and "MRN1" not in text
    assert "shape=(2, 3, 4)" in repr(v) and "modality=CT" in repr(v)
    assert "Doe" not in str(v.copy().provenance)


@pytest.mark.parametrize("arr,words", [
    (np.zeros((3, 3)), "3-D"),
    (np.zeros((3, 0, 3)), "zero size"),
    (np.array([["a"]] * 2, dtype=object).reshape(1, 2, 1), "numeric"),
])
def test_bad_arrays(arr, words):
    with pytest.raises(InvalidInputError, match=words):
        Volume(arr, np.eye(4))


def test_bad_affines_and_labels():
    with pytest.raises(GeometryError, match="singular"):
        Volume(np.zeros((2, 2, 2)), np.diag([1.0, 0.0, 1.0, 1.0]))
    sheared = np.eye(4)
    sheared[0, 1] = 0.3
    with pytest.raises(GeometryError, match="sheared"):
        Volume(np.zeros((2, 2, 2)), sheared)
    with pytest.raises(InvalidInputError, match="modality"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), modality="XRAY")
    with pytest.raises(InvalidInputError, match="unit"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), unit="mCi")
    with pytest.raises(InvalidInputError, match="'SUVbw'"):
        Volume(np.zeros((2, 2, 2)), np.eye(4), modality="PT", unit="SUV")
    # NaN voxels are accepted by Volume itself (the readers refuse all-NaN files)
    assert Volume(np.full((2, 2, 2), np.nan), np.eye(4)).shape == (2, 2, 2)


def test_with_array_keeps_grid(vol):
    w = vol.with_array(vol.array * 2, unit="Bq/mL")
    assert w.unit == "Bq/mL" and w.modality == "PT" and w.same_grid(vol)
    with pytest.raises(InvalidInputError, match="grid"):
        vol.with_array(np.zeros((1, 1, 1)))


def test_grid_difference_says_what_differs():
    """Same shape and spacing but a flipped axis (the SPM12 SPECT template's case) is named as such."""
    aff = np.diag([2.0, 2.0, 2.0, 1.0])
    aff[:3, 3] = (-90.0, -126.0, -72.0)
    a = Volume(np.zeros((91, 109, 91)), aff)
    assert a.grid_difference(a.copy()) == ""
    flip = aff.copy()
    flip[0, 0] = -2.0
    flip[0, 3] = 90.0  # the same box, stored from the other side
    msg = a.grid_difference(Volume(np.zeros((91, 109, 91)), flip))
    assert "orientation RPS against LPS" in msg and "flipped" in msg and "180 mm away" in msg
    rot = aff.copy()
    rot[:3, :3] = Rotation.from_euler("z", 10, degrees=True).as_matrix() * 2.0
    assert "rotated by 10 degrees" in a.grid_difference(Volume(np.zeros((91, 109, 91)), rot))
    msg = a.grid_difference(Volume(np.zeros((91, 109, 90)), np.diag([2.0, 2.0, 2.5, 1.0])))
    assert "shape (91, 109, 90) against (91, 109, 91)" in msg and "spacing (2.0, 2.0, 2.5) mm" in msg
