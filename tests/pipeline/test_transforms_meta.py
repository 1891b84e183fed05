"""What the MONAI transforms and the pipeline keep of an image that arrives loaded already: the CT unit rule of
``medfuse.load(modality="CT")``, MONAI's meta keys and transform history."""

from __future__ import annotations

import os

import numpy as np
import pytest

pytest.importorskip("monai")
pytest.importorskip("torch")

import medfuse  # noqa: E402
from medfuse.transforms import LoadVolume, LoadVolumed, RegisterToReference  # noqa: E402


def _ct_without_unit(tmp_path):
    """A CT-like NIfTI (air -1000, water 0, bone 1000) whose header says nothing of its modality or unit."""
    arr = np.full((24, 24, 12), -1000.0, np.float32)
    arr[4:20, 4:20, 2:10] = 40.0
    arr[8:12, 8:12, 4:8] = 1000.0
    import nibabel as nib

    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.diag([-2.0, -2.0, 3.0, 1.0])), path)  # a plain header, no medfuse labels
    return path


def test_ct_override_labels_a_loaded_image_as_it_labels_the_file(tmp_path):
    """modality='CT' made the file HU (values below -100) but left the same image, loaded already, 'arbitrary':
    its outside was filled with water, not air, after resampling, and the fused image differed."""
    path = _ct_without_unit(tmp_path)
    loaded = medfuse.load(path)
    assert loaded.unit == "arbitrary"
    from_file = medfuse.load(path, modality="CT")
    assert (from_file.modality, from_file.unit) == ("CT", "HU")
    assert LoadVolume(modality="CT")(loaded).unit == "HU"
    assert LoadVolume(modality="CT")(loaded.to_metatensor()).unit == "HU"
    assert LoadVolumed(keys=["ct"], modality={"ct": "CT"})({"ct": loaded})["ct"].unit == "HU"
    mr = medfuse.Volume(np.random.default_rng(0).random((20, 20, 10)).astype(np.float32),
                        np.diag([2.5, 2.5, 3.5, 1.0]), modality="MR")
    by_path = medfuse.fuse_files(mr, path, None, method="mean", modalities=[None, "CT"])
    by_volume = medfuse.fuse_files(mr, loaded, None, method="mean", modalities=[None, "CT"])
    np.testing.assert_array_equal(by_path.fused.array, by_volume.fused.array)
    assert loaded.unit == "arbitrary" and loaded.modality == "unknown"  # the caller's Volume is not relabelled


def test_ct_override_of_a_scaled_image_stays_arbitrary_and_says_so(tmp_path):
    vol = medfuse.Volume(np.linspace(0, 1, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8), np.eye(4))
    with pytest.warns(medfuse.MedfuseWarning, match="not taken as HU"):
        assert LoadVolume(modality="CT")(vol).unit == "arbitrary"


def _loaded_pair(tmp_path):
    from monai.transforms import Compose, EnsureChannelFirstd, LoadImaged, Orientationd

    path = _ct_without_unit(tmp_path)
    pre = Compose([LoadImaged(keys=["a", "b"], image_only=True), EnsureChannelFirstd(keys=["a", "b"]),
                   Orientationd(keys=["a", "b"], axcodes="RAS")])
    return pre, pre({"a": str(path), "b": str(path)})


def test_registration_on_the_same_grid_keeps_meta_and_history_so_invertd_works(tmp_path):
    """RegisterToReference(kind=None) on an image already on the reference grid dropped MONAI's transform history,
    the NIfTI header keys and original_affine: Invertd then failed on it."""
    from monai.transforms import Compose, Invertd

    from medfuse.transforms import RegisterToReferenced

    pre, d = _loaded_pair(tmp_path)
    before = dict(d["b"].meta)
    step = RegisterToReferenced(keys=["b"], reference_key="a", kind=None)
    out = step(dict(d))
    assert len(out["b"].applied_operations) == len(d["a"].applied_operations) == 1
    assert set(before) <= set(out["b"].meta)
    np.testing.assert_array_equal(np.asarray(out["b"].meta["original_affine"]), np.asarray(before["original_affine"]))
    inverted = Invertd(keys=["b"], transform=Compose([*pre.transforms, step]), orig_keys=["b"])(out)
    assert inverted["b"].shape == d["b"].shape


def test_resampled_metatensor_keeps_the_header_keys_and_original_affine(tmp_path):
    pre, d = _loaded_pair(tmp_path)
    moving = d["b"].clone()
    moving.affine[0, 3] += 3.0  # off the reference grid: resampled onto it
    out = RegisterToReference(kind=None)(moving, d["a"])
    assert np.allclose(np.asarray(out.affine), np.asarray(d["a"].affine))
    for key in ("original_affine", "pixdim", "dim", "filename_or_obj"):
        np.testing.assert_array_equal(np.asarray(out.meta[key]), np.asarray(moving.meta[key]))
    assert len(out.applied_operations) == 0  # its history would invert onto the moving image's grid


def test_load_volume_as_tensor_passes_a_metatensor_through_with_its_history(tmp_path):
    _, d = _loaded_pair(tmp_path)
    out = LoadVolume(as_tensor=True)(d["a"])
    assert len(out.applied_operations) == 1 and "pixdim" in out.meta
    assert out.meta["modality"] == "unknown"


def test_a_fused_metatensor_remembers_every_input_so_save_never_writes_over_one(tmp_path):
    """The fused MetaTensor named only its first input (filename_or_obj): back as a Volume, it could be saved over
    the second input with overwrite=True."""
    from monai.transforms import LoadImage

    from medfuse.errors import OutputExistsError
    from medfuse.transforms import FuseModalities

    a, b = tmp_path / "a.nii.gz", tmp_path / "b.nii.gz"
    rng = np.random.default_rng(1)
    for p in (a, b):
        medfuse.save(medfuse.Volume(rng.random((12, 12, 8)).astype(np.float32), np.eye(4)), p)
    load = LoadImage(image_only=True, ensure_channel_first=True)
    out = FuseModalities(method="mean")([load(str(a)), load(str(b))])
    back = medfuse.Volume.from_metatensor(out)
    assert {os.path.realpath(s) for s in back.provenance["sources"]} == {os.path.realpath(a), os.path.realpath(b)}
    before = b.read_bytes()
    with pytest.raises(OutputExistsError):
        medfuse.save(back, b, overwrite=True)
    assert b.read_bytes() == before


def test_a_resampled_metatensor_keeps_monais_loading_grid_pair(tmp_path):
    """original_affine came from the moving image but spatial_shape from the result: MONAI's
    SaveImage(resample=True) wrote the reference's shape at the moving image's spacing (a 720 mm field of view).
    Both now describe the moving image as loaded, as after MONAI's own Spacing."""
    import nibabel as nib
    from monai.transforms import LoadImage

    _, d = _loaded_pair(tmp_path)
    small = tmp_path / "small.nii.gz"  # another shape and spacing than the reference
    nib.save(nib.Nifti1Image(np.ones((10, 9, 7), np.float32), np.diag([-4.5, -4.5, 4.5, 1.0])), small)
    moving = LoadImage(image_only=True, ensure_channel_first=True)(str(small))
    out = RegisterToReference(kind=None)(moving, d["a"])
    assert tuple(out.shape) == tuple(d["a"].shape)
    assert [int(x) for x in out.meta["spatial_shape"]] == [10, 9, 7]
    np.testing.assert_array_equal(np.asarray(out.meta["original_affine"]), np.asarray(moving.meta["original_affine"]))


def test_load_volume_as_tensor_of_a_3d_metatensor_is_channel_first_for_monai(tmp_path):
    """It inherited the 3-D tensor's original_channel_dim ('no channel'): EnsureChannelFirst then made it 5-D."""
    from monai.transforms import EnsureChannelFirst, LoadImage

    path = _ct_without_unit(tmp_path)
    mt = LoadImage(image_only=True)(str(path))
    assert mt.ndim == 3
    assert tuple(EnsureChannelFirst()(LoadVolume(as_tensor=True)(mt)).shape) == (1, *mt.shape)


def test_a_unit_the_file_states_is_kept_for_a_loaded_image_too(tmp_path):
    """medfuse's own files state their unit ('arbitrary' included): load(path, modality='CT') keeps it, and the
    same image loaded first kept it no longer (it became HU)."""
    arr = np.linspace(-500, 500, 8 * 8 * 8, dtype=np.float32).reshape(8, 8, 8)
    path = tmp_path / "stated.nii.gz"
    medfuse.save(medfuse.Volume(arr, np.eye(4)), path)
    assert medfuse.load(path, modality="CT").unit == "arbitrary"
    assert LoadVolume(modality="CT")(medfuse.load(path)).unit == "arbitrary"
    assert LoadVolume(modality="CT")(medfuse.Volume(arr, np.eye(4))).unit == "HU"  # nothing stated: the rule


def test_a_change_of_what_the_transforms_return_changes_a_persistent_cache_key(monkeypatch):
    """Items cached by an older medfuse (no medfuse_sources) batched with new ones made MONAI's collate drop the key
    from all of them. With hash_transform=pickle_hashing (docs/classifier.md) the key now follows OUTPUT_VERSION."""
    from monai.data.utils import pickle_hashing

    import medfuse.transforms as mt

    def key():  # the transforms, not a Compose: each Compose draws its own random state unless seeded
        return pickle_hashing([mt.LoadVolumed(keys=["a", "b"]), mt.RegisterToReferenced(
            keys=["b"], reference_key="a", kind=None), mt.FuseModalitiesd(keys=["a", "b"], method="mean"),
            mt.LoadVolume(), mt.FuseModalities(method="mean")])

    before = key()
    assert key() == before  # stable for one version
    monkeypatch.setattr(mt, "OUTPUT_VERSION", mt.OUTPUT_VERSION + 1)
    assert key() != before
    for t in (mt.LoadVolumed(keys=["a"]), mt.RegisterToReference(), mt.FuseModalities(method="mean")):
        assert t.output_version == mt.OUTPUT_VERSION


def test_a_sidecar_naming_only_the_modality_leaves_the_unit_to_the_rule_both_ways(tmp_path):
    """A BIDS sidecar with a Modality but no unit: load(path, modality='CT') applied the HU rule, the same image
    loaded first did not (any labels_from was taken for a stated unit)."""
    import json

    import nibabel as nib

    arr = np.linspace(-1000, 1000, 10 * 10 * 6, dtype=np.float32).reshape(10, 10, 6)
    path = tmp_path / "ct_bids.nii.gz"
    nib.save(nib.Nifti1Image(arr, np.eye(4)), path)
    (tmp_path / "ct_bids.json").write_text(json.dumps({"Modality": "MR"}))
    assert LoadVolume(modality="CT")(str(path)).unit == "HU"
    assert LoadVolume(modality="CT")(medfuse.load(path)).unit == "HU"


def test_load_volume_as_tensor_keeps_the_layout_of_a_metatensor_it_passes_through(tmp_path):
    """docs/pipeline.md: the transforms return a MetaTensor in the layout it came in. A 3-D tensor came back
    (1, I, J, K) from LoadVolume alone; RegisterToReference kept it 3-D."""
    from monai.transforms import LoadImage

    mt = LoadImage(image_only=True)(str(_ct_without_unit(tmp_path)))
    out = LoadVolume(as_tensor=True)(mt)
    assert tuple(out.shape) == tuple(mt.shape)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(mt))
    np.testing.assert_allclose(np.asarray(out.affine), np.asarray(mt.affine))
    channel_first = LoadVolume(as_tensor=True)(mt[None])
    assert tuple(channel_first.shape) == (1, *mt.shape)
