"""medfuse.fuse input rules (review 31): CT not in HU, colour vs slices, bool masks, gff bounds, weights, batch_size."""
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError, MedfuseWarning
from medfuse.fusion.classical import fuse_arrays
from medfuse.fusion.normalise import auto_method, normalise


def _raw_ct():
    """A CT of raw stored values (1024 background, a 2400 cube): no value below -100, so not HU."""
    c = np.full((32, 32, 32), 1024, np.uint16)
    c[8:24, 8:24, 8:24] = 2400
    return c


# ---------------------------------------------------------------------- 1. CT not in HU
def test_ct_not_in_hu_gets_percentiles_and_keeps_its_contrast():
    """The CT window on raw values 1024..2400 clipped every voxel to 1: the fused image was all white."""
    rng = np.random.default_rng(0)
    ct = medfuse.Volume(_raw_ct(), np.eye(4), modality="CT", unit="arbitrary")
    mr = medfuse.Volume(rng.random((32, 32, 32)).astype(np.float32), np.eye(4), modality="MR")
    out = medfuse.fuse(mr, ct, method="max")
    rec = out.provenance["normalisation"][1]
    assert rec["method"] == "percentile" and rec["unit"] == "arbitrary"
    assert "not in HU" in rec["auto"]
    assert rec["clipped_fraction"] < 0.5
    # The cube is bright and the background is not: the CT's contrast survives.
    inside = out.array[10:22, 10:22, 10:22]
    assert inside.min() > 0.99
    assert np.median(out.array[:6, :6, :6]) < 0.9


def test_rescaled_ct_relabelled_arbitrary_is_no_longer_flat_grey():
    """The "does not look like HU" warning advises unit='arbitrary'; with it the window still gave 0.398..0.4025."""
    rng = np.random.default_rng(1)
    hu = rng.normal(40, 300, size=(16, 16, 8)).clip(-1000, 2000)
    ct = medfuse.Volume(hu, np.eye(4), modality="CT", unit="HU")
    fixed = ct.with_array((hu - hu.min()) / np.ptp(hu) * 0.9 + 0.05, unit="arbitrary")
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # the advice works: no second warning
        y, rec = normalise(fixed)
    assert rec["method"] == "percentile"
    assert float(y.array.max() - y.array.min()) > 0.9


def test_auto_method_reads_the_unit_for_ct():
    assert auto_method("CT", "HU") == auto_method("CT") == auto_method("MR", "HU") == "window"
    assert auto_method("CT", "arbitrary") == auto_method("ct", "counts") == "percentile"
    _, rec = normalise(np.linspace(-1000, 1000, 50), modality="CT", unit="HU")
    assert rec["method"] == "window" and rec["auto"] == "unit HU"
    _, rec = normalise(np.linspace(0, 1, 50), method="minmax")
    assert "auto" not in rec  # only "auto" records a reason


def test_spec_naming_another_modality_drops_the_volumes_unit():
    rng = np.random.default_rng(2)
    mr = medfuse.Volume(rng.random((16, 16, 8)) * 300, np.eye(4), modality="MR", unit="arbitrary")
    out = medfuse.fuse(mr, mr, method="mean", normalise=[{"modality": "CT"}, {}])
    assert [r["method"] for r in out.provenance["normalisation"]] == ["window", "percentile"]
    ct = medfuse.Volume(_raw_ct().astype(np.float32), np.eye(4), modality="CT", unit="arbitrary")
    same = medfuse.fuse(ct, ct, method="mean", normalise=[{"modality": "CT"}, {}])
    assert same.provenance["normalisation"][0]["method"] == "percentile"  # its own modality: its unit stays


# ---------------------------------------------------------------------- 2. colour or slices
def test_three_float_slices_beside_an_image_are_not_read_as_colour():
    rng = np.random.default_rng(3)
    img = rng.random((64, 64))
    vol = rng.random((64, 64, 3)) * 8  # 3 PET slices in SUV
    with pytest.raises(InvalidInputError, match=r"ambiguous.*volume\[:, :, k\].*uint8"):
        medfuse.fuse(img, vol, method="mean")
    with pytest.raises(InvalidInputError, match="mix 2-D and 3-D"):
        medfuse.fuse(img, vol - 4.0, method="mean")  # negative values: slices, not colour
    with pytest.raises(InvalidInputError, match="mix 2-D and 3-D"):
        medfuse.fuse(img, np.concatenate([vol, vol[..., :1]], axis=-1) - 4.0, method="mean")
    # Colour images as documented still fuse: uint8 and float on 0..1.
    rgb8 = np.round(vol / 8 * 255).astype(np.uint8)
    assert medfuse.fuse(img, rgb8, method="mean").shape == (64, 64, 3)
    assert medfuse.fuse(img, vol / 8, method="mean").shape == (64, 64, 3)


# ---------------------------------------------------------------------- 4. bool masks
def test_bool_mask_counts_at_full_scale_of_the_others():
    rng = np.random.default_rng(4)
    img = (rng.random((48, 48)) * 200).astype(np.uint8)
    mask = np.zeros((48, 48), bool)
    mask[10:30, 10:30] = True
    out = medfuse.fuse(img, mask, method="max")
    np.testing.assert_array_equal(out[mask], 255.0)
    np.testing.assert_array_equal(out[~mask], img[~mask])
    first = medfuse.fuse(mask, img, method="max")  # a mask first does not set the output's scale
    np.testing.assert_array_equal(first, out)
    out01 = medfuse.fuse(img / 255.0, mask, method="max")
    np.testing.assert_allclose(out01[mask], 1.0)
    np.testing.assert_allclose(out01[~mask], img[~mask] / 255.0)
    wide = img.astype(np.float64) * 3  # min/max scaled: True is its top
    np.testing.assert_allclose(medfuse.fuse(wide, mask, method="max")[mask], wide.max())
    np.testing.assert_allclose(medfuse.fuse(img, np.ones_like(mask), method="max"), 255.0)  # all True


# ---------------------------------------------------------------------- 3. gff bounds
@pytest.mark.parametrize("name, huge, other", [("base_radius", 10 ** 18, 10 ** 9), ("sigma", 1e300, 1e9)])
def test_gff_huge_base_radius_or_sigma_is_cut_with_a_warning(name, huge, other):
    """No bound: base_radius=10**9 gave scipy's raw MemoryError (10**18 killed the process), sigma=1e300 a raw
    ValueError, sigma=1e9 NumPy's MemoryError."""
    rng = np.random.default_rng(5)
    a, b = rng.random((64, 48)), rng.random((64, 48))
    with pytest.warns(MedfuseWarning, match=f"gff: {name}=.*64 along axis 0, 48 along axis 1"):
        out = fuse_arrays([a, b], method="gff", **{name: huge})
    with pytest.warns(MedfuseWarning, match=f"gff: {name}="):
        again = fuse_arrays([a, b], method="gff", **{name: other})
    np.testing.assert_array_equal(out, again)  # both cut to the axis lengths
    assert np.all(np.isfinite(out))
    assert out.min() >= min(a.min(), b.min()) and out.max() <= max(a.max(), b.max())


def test_gff_defaults_and_in_bound_values_are_unchanged_and_silent():
    rng = np.random.default_rng(6)
    a, b = rng.random((20, 20)), rng.random((20, 20))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        default = fuse_arrays([a, b], method="gff")
        explicit = fuse_arrays([a, b], method="gff", base_radius=15, sigma=5.0)  # above 20 // 2, below the bound
        fuse_arrays([a, b], method="gff", base_radius=20, sigma=20.0)
    np.testing.assert_array_equal(default, explicit)


# ---------------------------------------------------------------------- 5. weights
def test_mean_weights_whose_sum_overflows_are_equal_weights():
    rng = np.random.default_rng(7)
    a, b = rng.random((16, 16)), rng.random((16, 16))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no raw NumPy overflow warning either
        out = medfuse.fuse(a, b, method="mean", weights=[1e308, 1e308])
        lop = fuse_arrays([a, b], method="mean", weights=[1e308, 1e307])
    np.testing.assert_allclose(out, (a + b) / 2, rtol=1e-12)
    np.testing.assert_allclose(lop, (10 * a + b) / 11, rtol=1e-12)


# ---------------------------------------------------------------------- 6. batch_size
@pytest.mark.parametrize("bad", [-3, 0, 2.5, True])
def test_network_batch_size_is_checked_for_2d_images_too(bad):
    a = np.random.default_rng(8).random((32, 32))
    with pytest.raises(InvalidInputError, match="batch_size must be a whole number"):
        medfuse.fuse(a, a, batch_size=bad)  # refused before torch is needed


def test_a_ct_volume_whose_unit_was_never_stated_is_read_as_load_reads_it():
    """Volume(hu, affine, modality="CT") without a unit is HU when it holds air below -100 (as medfuse.load reads
    such a file), decided when it is made: fuse, the pipeline and resampling (its -1024 fill) then agree. A unit
    stated, "arbitrary" too, is kept."""
    from medfuse.pipeline import Pipeline

    rng = np.random.default_rng(2)
    hu = rng.normal(40, 300, size=(16, 16, 8)).clip(-1000, 2000)
    mr = medfuse.Volume(rng.random(hu.shape).astype(np.float32), np.eye(4), modality="MR")
    bare = medfuse.Volume(hu, np.eye(4), modality="CT")
    assert bare.unit == "HU"
    assert medfuse.Volume(hu + 1100, np.eye(4), modality="CT").unit == "arbitrary"  # no air: not taken as HU
    said = medfuse.Volume(hu, np.eye(4), modality="CT", unit="arbitrary")
    assert said.unit == "arbitrary"
    assert medfuse.fuse(mr, bare, method="mean").provenance["normalisation"][1]["method"] == "window"
    assert medfuse.fuse(mr, said, method="mean").provenance["normalisation"][1]["method"] == "percentile"
    piped = Pipeline(register=None, method="mean").run([bare, mr])
    assert piped.provenance["normalisation"][0]["method"] == "window"  # the pipeline reads it as fuse does


@pytest.mark.parametrize("own, alias, unit", [("PT", "PET", "SUVbw"), ("MR", "MRI", "arbitrary")])
def test_a_spec_naming_the_volumes_own_modality_by_an_alias_keeps_its_unit(own, alias, unit):
    rng = np.random.default_rng(3)
    v = medfuse.Volume((rng.random((12, 12, 12)) * 10).astype(np.float32), np.eye(4), modality=own, unit=unit)
    other = medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality="MR")
    by_alias = medfuse.fuse(v, other, method="mean", normalise=[{"modality": alias}, None])
    by_code = medfuse.fuse(v, other, method="mean", normalise=[{"modality": own}, None])
    assert by_alias.provenance["normalisation"][0]["method"] == by_code.provenance["normalisation"][0]["method"]
    np.testing.assert_array_equal(by_alias.array, by_code.array)
