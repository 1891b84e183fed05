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


# ----------------------------------------------------------------------------- MONAI MetaTensors
def test_from_metatensor_keeps_the_space_monai_read_from_the_header(shared):
    """MONAI's LoadImage (nibabel) puts sform_code/qform_code in the meta; an MNI template keeps "mni"."""
    pytest.importorskip("monai")
    from monai.transforms import LoadImage

    mt = LoadImage(image_only=True, ensure_channel_first=True)(str(shared("data", "spm12-templates", "T1.nii")))
    assert int(mt.meta["sform_code"]) == 4 and "nifti_space" not in mt.meta
    assert Volume.from_metatensor(mt).provenance["nifti_space"] == "mni"
    brats = LoadImage(image_only=True)(str(shared("data", "brats-gli-00001", "t1c.nii.gz")))
    assert Volume.from_metatensor(brats).provenance["nifti_space"] == "scanner"
    # sform code 0: the qform's code decides (nibabel's get_best_affine order); an explicit provenance wins
    mt.meta["sform_code"], mt.meta["qform_code"] = np.asarray(0, np.int16), np.asarray(2, np.int16)
    assert Volume.from_metatensor(mt).provenance["nifti_space"] == "aligned"
    assert Volume.from_metatensor(mt, provenance={"nifti_space": "mni"}).provenance["nifti_space"] == "mni"
    mt.meta["qform_code"] = np.asarray(0, np.int16)
    assert "nifti_space" not in Volume.from_metatensor(mt).provenance


def test_monai_and_medfuse_agree_on_world_coordinates(shared):
    """The same file read by MONAI (RAS) and medfuse (LPS) puts each voxel at one world point, also after
    MONAI's Orientation and Spacing; the flipped-voxel-order, big-endian SPECT template included."""
    pytest.importorskip("monai")
    from monai.transforms import LoadImage, Orientation, Spacing

    import medfuse

    for name in ("T1.nii", "SPECT.nii"):
        path = str(shared("data", "spm12-templates", name))
        mt = LoadImage(image_only=True, ensure_channel_first=True)(path)
        v = medfuse.load(path)
        ijk = np.array([3.0, 7.0, 11.0])
        ras = (np.asarray(mt.affine) @ np.r_[ijk, 1.0])[:3]
        assert np.allclose(ras * [-1, -1, 1], v.index_to_world(ijk))
        back = Volume.from_metatensor(mt)
        assert back.same_grid(v) and np.allclose(back.array, v.array, atol=1e-6)
        for axcodes in ("LPS", "PLI"):
            w = Volume.from_metatensor(Orientation(axcodes=axcodes)(mt))
            assert w.orientation == axcodes
            src = np.rint(v.world_to_index(w.index_to_world([5, 6, 7]))).astype(int)
            assert w.array[5, 6, 7] == pytest.approx(float(v.array[tuple(src)]), abs=1e-6)
        w = Volume.from_metatensor(Spacing(pixdim=(4.0, 4.0, 4.0))(mt))
        assert w.spacing == (4.0, 4.0, 4.0) and np.allclose(w.origin, v.origin)
        assert w.provenance["nifti_space"] == "mni"


def test_to_metatensor_meta_works_with_monai(tmp_path, shared):
    pytest.importorskip("monai")
    import nibabel as nib
    from monai.transforms import EnsureChannelFirst, SaveImage

    import medfuse

    t1 = medfuse.load(shared("data", "spm12-templates", "T1.nii"), modality="MR")
    mt = t1.to_metatensor()
    # written as MONAI's nibabel reader writes them, and read back
    assert int(mt.meta["sform_code"]) == 4 and int(mt.meta["qform_code"]) == 4
    mt.meta.pop("nifti_space")
    assert Volume.from_metatensor(mt).provenance["nifti_space"] == "mni"
    # no channel, said as MONAI's own readers say it (SaveImage then knows the image is 3-D)
    from monai.data.utils import is_no_channel
    assert is_no_channel(mt.meta["original_channel_dim"])
    # SaveImage names the output after the source and keeps the geometry (its code is always 1)
    SaveImage(output_dir=tmp_path, separate_folder=False, output_postfix="out", print_log=False)(mt)
    written = tmp_path / "T1_out.nii.gz"
    assert written.is_file() and medfuse.load(written).same_grid(t1)
    assert int(nib.load(str(written)).header["sform_code"]) == 1
    # a volume without a recorded space writes no codes, and none comes back
    plain = Volume(np.zeros((3, 4, 5), np.float32), np.eye(4)).to_metatensor()
    assert "sform_code" not in plain.meta and "nifti_space" not in Volume.from_metatensor(plain).provenance


def test_from_metatensor_lps_space_and_low_precision():
    pytest.importorskip("monai")
    import torch
    from monai.data import MetaTensor
    from monai.utils import SpaceKeys

    aff = _oblique()  # ITKReader/PydicomReader(affine_lps_to_ras=False) give an LPS affine and say so
    lps = MetaTensor(torch.ones(1, 3, 4, 5), affine=torch.as_tensor(aff), meta={"space": SpaceKeys.LPS})
    assert np.allclose(Volume.from_metatensor(lps).affine, aff)
    half = Volume(np.ones((3, 4, 5), np.float32), aff).to_metatensor().to(torch.bfloat16)  # AMP outputs
    back = Volume.from_metatensor(half)
    assert back.dtype == np.float32 and np.allclose(back.affine, aff, atol=1e-6)


@pytest.mark.parametrize("case,words", [
    ("tensor", "no affine"), ("ndarray", "no affine"), ("batch", "batch of 2"), ("batch1", "decollate_batch"),
    ("channels", "one channel"), ("channel_last", "channel-last"),
])
def test_from_metatensor_refuses_what_is_not_one_image(case, words):
    pytest.importorskip("monai")
    import torch
    from monai.data import list_data_collate

    one = Volume(np.ones((3, 4, 5), np.float32), np.eye(4)).to_metatensor()
    x = {
        "tensor": torch.zeros(1, 3, 4, 5), "ndarray": np.zeros((3, 4, 5)),
        "batch": list_data_collate([{"i": one}, {"i": one.clone()}])["i"],
        "batch1": list_data_collate([{"i": one}])["i"],
        "channels": torch.cat([one, one]), "channel_last": one[0][..., None],
    }[case]
    with pytest.raises(InvalidInputError, match=words):
        Volume.from_metatensor(x)


def test_metatensor_conversions_copy_the_voxels():
    """``t[t < 0] = 0`` or ``t.clamp_()`` on the tensor must not change the Volume it came from (nor back)."""
    pytest.importorskip("monai")
    v = Volume(np.arange(60, dtype=np.float32).reshape(3, 4, 5) - 30, np.eye(4), modality="CT", unit="HU")
    before = v.array.copy()
    t = v.to_metatensor()
    t[t < 0] = 0
    assert np.array_equal(v.array, before)
    w = Volume.from_metatensor(t)
    t.clamp_(max=1)
    assert float(w.array.max()) == 29.0


def test_provenance_is_not_shared_with_the_caller_or_another_volume():
    """The provenance dict was copied one level deep: the ``history`` list stayed shared, so add_history on a
    Volume built from another's provenance (with_array, the constructor, from_sitk...) edited both."""
    import numpy as np

    from medfuse.volume import Volume

    given = {"source": "x.nii.gz", "history": [{"step": "loaded"}]}
    v = Volume(np.zeros((2, 2, 2)), np.eye(4), provenance=given)
    v.add_history("scaled", factor=2)
    assert given["history"] == [{"step": "loaded"}]
    w = v.with_array(v.array * 2, provenance=v.provenance)
    w.add_history("doubled")
    assert [h["step"] for h in v.provenance["history"]] == ["loaded", "scaled"]
    assert [h["step"] for h in w.provenance["history"]] == ["loaded", "scaled", "doubled"]
