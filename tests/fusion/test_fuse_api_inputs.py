"""What ``medfuse.fuse`` accepts besides NumPy arrays: torch tensors, MONAI MetaTensors, masked arrays.

Found by using the API as a researcher does: a tensor that needs grad raised torch's own RuntimeError, a bfloat16
tensor NumPy's TypeError; a MetaTensor was fused as a bare array, its affine silently dropped; a masked array
had its masked-out pixels fused as image.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("safetensors")

import medfuse  # noqa: E402
from medfuse.errors import InvalidInputError  # noqa: E402
from medfuse.fusion import fuse  # noqa: E402
from medfuse.volume import Volume  # noqa: E402


@pytest.fixture
def ct_mri(shared):
    """A real Harvard CT-MRI pair as float32 in 0..1."""
    from PIL import Image

    root = shared("data", "harvard-pairs", "CT-MRI")
    return [np.asarray(Image.open(root / m / "16004.png").convert("L"), dtype=np.float32) / 255.0
            for m in ("CT", "MRI")]


def test_a_tensor_that_needs_grad_is_fused_like_its_array(ct_mri):
    a, b = ct_mri
    ta = torch.from_numpy(a.copy()).requires_grad_()
    tb = torch.from_numpy(b.copy())
    out = fuse(ta, tb)
    assert isinstance(out, np.ndarray) and out.dtype == np.float32
    np.testing.assert_array_equal(out, fuse(a, b))
    assert ta.requires_grad and torch.equal(ta.detach(), torch.from_numpy(a))  # the input is left as it was


def test_a_bfloat16_tensor_is_read_through_float32(ct_mri):
    a, b = ct_mri
    ta, tb = torch.from_numpy(a).bfloat16(), torch.from_numpy(b).bfloat16()
    out = fuse(ta, tb, method="mean")
    np.testing.assert_array_equal(out, fuse(ta.float().numpy(), tb.float().numpy(), method="mean"))


def test_a_metatensor_is_refused_with_the_volume_route_which_keeps_its_geometry(samples_dir):
    pytest.importorskip("monai")
    t1, t2 = (medfuse.load(samples_dir / f"mr_{c}.nii.gz") for c in ("t1", "t2"))
    crop = (slice(60, 92), slice(70, 102), slice(60, 92))
    vols = [Volume(v.array[crop], t1.affine, modality="MR") for v in (t1, t2)]
    metas = [v.to_metatensor()[0] for v in vols]  # (I, J, K), the affine in its meta
    with pytest.raises(InvalidInputError, match="MetaTensor.*affine would be lost.*Volume.from_metatensor"):
        fuse(*metas)
    out = fuse(*(Volume.from_metatensor(m, modality="MR") for m in metas))
    np.testing.assert_allclose(out.affine, t1.affine, atol=1e-9)
    np.testing.assert_array_equal(out.array, fuse(*vols).array)


def test_a_masked_array_with_masked_pixels_is_refused(ct_mri):
    a, b = ct_mri
    masked = np.ma.masked_array(a, mask=a < 0.05)
    with pytest.raises(InvalidInputError, match=r"input 1 is a masked array.*filled\(0\)"):
        fuse(masked, b, method="mean")
    # Nothing masked: nothing to lose, fused as its data.
    np.testing.assert_array_equal(fuse(np.ma.masked_array(a, mask=False), b, method="mean"),
                                  fuse(a, b, method="mean"))


def test_a_slice_beside_a_volume_is_not_sent_to_resampling(samples_dir):
    """A 2-D image beside a 3-D volume was told to resample onto one grid, which cannot mend it."""
    t1, t2 = (medfuse.load(samples_dir / f"mr_{c}.nii.gz").array for c in ("t1", "t2"))
    with pytest.raises(InvalidInputError, match=r"mix 2-D and 3-D arrays.*volume\[:, :, k\]"):
        fuse(t1[:, :, 80], t2)
    with pytest.raises(InvalidInputError, match="mix 3-D and 2-D"):
        fuse(t1, t2[:, :, 80], method="mean")
    assert fuse(t1[:, :, 80], t2[:, :, 80]).shape == t1.shape[:2]  # the fix the message gives works


def test_a_ct_rescaled_but_still_labelled_hu_is_warned_about():
    """A CT scaled to 0..1 keeps unit "HU" through ``with_array``; the CT window then mapped it to a flat
    0.400..0.4025 and the fusion showed the other input alone, without a word."""
    import warnings

    from medfuse.errors import MedfuseWarning
    from medfuse.fusion.normalise import normalise

    rng = np.random.default_rng(0)
    hu = rng.normal(40, 300, size=(16, 16, 8)).clip(-1000, 2000)
    ct = medfuse.Volume(hu.astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), modality="CT", unit="HU")
    mr = medfuse.Volume(rng.random((16, 16, 8)).astype(np.float32), np.diag([2.0, 2.0, 2.0, 1.0]), modality="MR")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.fuse(ct, mr, method="mean")  # real HU: no warning
    scaled = ct.with_array((hu - hu.min()) / np.ptp(hu))
    assert scaled.unit == "HU"
    with pytest.warns(MedfuseWarning, match="does not look like HU"):
        medfuse.fuse(scaled, mr, method="mean")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.fuse(scaled.with_array(scaled.array, unit="arbitrary"), mr, method="mean")  # the fix
        normalise(scaled.array, method="window", modality="CT", unit="HU")  # asked for by name: no second-guessing


def test_one_input_or_a_list_is_a_typed_error_with_the_call_to_make():
    """fuse(vol) and fuse([a, b]) raised Python's TypeError "missing 1 required positional argument: 'b'"."""
    a = np.zeros((16, 16), np.float32)
    with pytest.raises(InvalidInputError, match=r"fuse\(\*images\)"):
        medfuse.fuse([a, a], method="mean")
    with pytest.raises(InvalidInputError, match=r"got one.*fuse\(a, b\)"):
        medfuse.fuse(a, method="mean")


def test_volumes_given_where_arrays_go_keep_what_they_know():
    """NumPy reads a Volume as its voxels, so a CT Volume given to normalise() got the percentile rule instead of
    its HU window, and fuse_arrays([vol, vol]) returned a bare array with the grid dropped unsaid."""
    from medfuse.fusion.classical import fuse_arrays
    from medfuse.fusion.normalise import normalise
    from medfuse.volume import Volume, affine_from_geometry

    rng = np.random.default_rng(4)
    hu = (rng.random((12, 10, 8)) * 3000 - 1000).astype(np.int16)
    ct = Volume(hu, affine_from_geometry((0.7, 0.7, 2.0), (5.0, -3.0, 40.0), np.eye(3)), modality="CT", unit="HU")
    scaled, rec = normalise(ct)
    want, want_rec = normalise(hu, modality="CT", unit="HU")
    assert rec["method"] == want_rec["method"] == "window"
    assert isinstance(scaled, Volume) and scaled.same_grid(ct) and scaled.unit == "arbitrary"
    np.testing.assert_array_equal(scaled.array, want)
    assert scaled.provenance["normalisation"] == rec
    assert normalise(ct, method="minmax")[1]["method"] == "minmax"  # an explicit choice still wins

    with pytest.raises(InvalidInputError, match="medfuse.fuse"):
        fuse_arrays([ct, ct], method="mean")
    from medfuse.fusion import infer

    with pytest.raises(InvalidInputError, match="medfuse.fuse"):
        infer.fuse_arrays([scaled, scaled])


@pytest.mark.parametrize("method", ["network", "mean", "laplacian"])
@pytest.mark.parametrize("axis", [0, 2])
def test_a_one_slice_array_fuses_as_the_2d_image_it_is_in_its_own_shape(method, axis):
    """(H, W, 1) arrays were refused ("every side needs at least 2 pixels", and the network's "fuse thin volumes
    slice by slice") although a one-slice Volume of the same voxels fuses."""
    rng = np.random.default_rng(3)
    a, b = rng.random((40, 50)), rng.random((40, 50))
    got = medfuse.fuse(np.expand_dims(a, axis), np.expand_dims(b, axis), method=method)
    assert got.shape == np.expand_dims(a, axis).shape
    np.testing.assert_array_equal(np.squeeze(got, axis), medfuse.fuse(a, b, method=method))


def test_weights_follow_the_callers_order_when_the_colour_image_comes_first():
    """The luma was always fused as [grey, colour]: weights=[1, 0] picked the MRI with the PET given first."""
    rng = np.random.default_rng(0)
    grey = rng.random((32, 32))
    rgb = rng.random((32, 32, 3))
    from medfuse.fusion.color import rgb_to_ycbcr

    luma = rgb_to_ycbcr(rgb, peak=1.0)[..., 0]
    first = rgb_to_ycbcr(fuse(rgb, grey, method="mean", weights=[1, 0]), peak=1.0)[..., 0]
    second = rgb_to_ycbcr(fuse(grey, rgb, method="mean", weights=[0, 1]), peak=1.0)[..., 0]
    np.testing.assert_allclose(first, luma, atol=1e-6)
    np.testing.assert_allclose(second, luma, atol=1e-6)


def test_fuse_rgb_refuses_a_grey_image_on_another_scale():
    from medfuse.errors import MedfuseWarning
    from medfuse.fusion.color import fuse_rgb

    rng = np.random.default_rng(0)
    grey8 = (rng.random((16, 16)) * 255).round()
    rgb01 = rng.random((16, 16, 3))
    with pytest.raises(InvalidInputError, match="above the colour image's white"):
        fuse_rgb(grey8, rgb01, method="max")
    with pytest.warns(MedfuseWarning, match="nearly black"):
        fuse_rgb(grey8 / 255, (rgb01 * 255).astype(np.uint8), method="max")
    assert fuse_rgb(grey8, (rgb01 * 255).astype(np.uint8), method="max").dtype == np.uint8


def test_numpy_typed_options_are_recorded_as_numbers():
    vols = [Volume(np.random.default_rng(k).random((8, 8, 8)).astype(np.float32), np.eye(4)) for k in range(2)]
    out = fuse(*vols, method="laplacian", levels=np.int64(2), weights=np.array([0.3, 0.7]))
    options = out.provenance["history"][-1]["options"]
    assert options["levels"] == 2 and isinstance(options["levels"], int)
    assert options["weights"] == [0.3, 0.7]
