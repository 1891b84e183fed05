"""medfuse.fuse gives the same fusion whatever units float images come in, and takes float32 rounding above 1
as 0..1."""
import warnings

import numpy as np
import pytest

import medfuse


def _pair(shape=(64, 64), seed=0):
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(2):
        x = gaussian_filter(rng.random(shape), 3)
        out.append((x - x.min()) / (x.max() - x.min()))
    return out


@pytest.mark.parametrize("factor", [3.0, 20.0, 0.01, 1e-6])
@pytest.mark.parametrize("method", ["network", "laplacian"])
def test_float_images_in_a_small_band_fuse_as_their_0_to_1_versions(factor, method):
    """Two images in 0..3 were taken as 0..255 (and two in 0..0.01 as 0..1): the network saw them at 1 % of its
    scale, and its output differed by up to 0.51 from the same images in 0..1 (Harvard CT-MRI: Qabf 0.66 -> 0.54)."""
    a, b = _pair()
    want = medfuse.fuse(a, b, method=method)
    got = medfuse.fuse(a * factor, b * factor, method=method) / factor
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_8_bit_data_in_floats_still_fuses_as_its_integers():
    a, b = (np.round(x * 200).astype(np.uint8) for x in _pair(seed=1))
    np.testing.assert_allclose(medfuse.fuse(a.astype(np.float64), b.astype(np.float64)), medfuse.fuse(a, b),
                               atol=1e-6)


def test_volume_a_rounding_above_1_is_still_taken_as_normalised():
    """A volume normalised to 0..1 that peaks at 1.0000000591 (a rounding, as the SPM12 PET template's peak) was
    percentile-scaled instead of kept (11 % of voxels moved by more than 0.02). Since 2026-12-06 only a medfuse
    normalisation record makes a volume count as normalised (values in 0..1 alone do not)."""
    a, b = _pair((24, 24, 24), seed=2)  # float64, as a scaled NIfTI loads
    b[0, 0, 0] = 1.0000000591
    done = {"normalisation": {"method": "range", "low": 0.0, "high": 1.0}}
    vols = [medfuse.Volume(x, np.eye(4), modality="unknown", unit="arbitrary", provenance=dict(done))
            for x in (a, b)]
    clipped = vols[1].with_array(np.clip(b, 0, 1))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        one, two = medfuse.fuse(*vols, method="mean"), medfuse.fuse(vols[0], clipped, method="mean")
    assert [r["method"] for r in one.provenance["normalisation"]] == ["range", "range"]
    np.testing.assert_allclose(one.array, two.array, atol=1e-6)


def test_volume_in_a_small_part_of_0_to_1_is_not_taken_as_normalised(shared):
    """Every NIfTI loads as unit "arbitrary": the SPM12 PET scaled by 0.02 (0..0.02) was kept at its own level and
    vanished from the fusion (max rule: the T1 within 0.00024), while the same voxels as arrays were min-max
    scaled. A volume normalised by medfuse keeps its values, whatever its peak."""
    d = shared("data", "spm12-templates")
    t1, pet = medfuse.load(d / "T1.nii"), medfuse.load(d / "PET.nii")
    small = pet.with_array((pet.array * 0.02).astype(np.float32))
    assert small.unit == "arbitrary" and float(small.array.max()) < 0.021
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        f = medfuse.fuse(t1, small, method="max")
        g = medfuse.fuse(t1, pet, method="max", normalise=[{"method": "percentile"}, {"method": "percentile"}])
    # Neither is taken as normalised (no medfuse record): both get percentiles, which no constant factor changes.
    assert [r["method"] for r in f.provenance["normalisation"]] == ["percentile", "percentile"]
    np.testing.assert_allclose(f.array, g.array, atol=1e-5)
    hot = pet.array >= np.percentile(pet.array, 99)
    t1n = medfuse.fuse(t1, t1, method="max").array  # the T1 alone, normalised as in the fusion
    assert float(f.array[hot].mean()) > float(t1n[hot].mean()) + 0.1

    # Normalised by medfuse (a record in provenance): kept as it is, even at a low peak.
    low, _ = medfuse.fusion.normalise.normalise(small, method="range", low=0.0, high=1.0)
    assert float(low.array.max()) < 0.021
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        kept = medfuse.fuse(t1, low, method="mean")
    assert kept.provenance["normalisation"][1]["method"] == "range"



def test_volumes_fuse_as_the_pipeline_fuses_the_same_files(shared):
    """``medfuse.fuse(t1, pet)`` took the SPM12 T1 (unit "arbitrary", peak 0.74 in 0..1) as normalised upstream
    and kept it as it was, while ``fuse_files`` (``medfuse fuse``) gave it its percentiles: up to 0.26 apart
    (network 0.29). The result also jumped when a peak crossed 0.25 or 1. Only a medfuse normalisation record
    now counts, so both give one fusion, and a peak's small change gives a small change."""
    d = shared("data", "spm12-templates")
    t1 = medfuse.load(d / "T1.nii", modality="MR")
    pet = medfuse.load(d / "PET.nii", modality="PT")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        api = medfuse.fuse(t1, pet, method="max")
        pipe = medfuse.fuse_files(t1, pet, None, method="max").fused
        np.testing.assert_allclose(api.array, pipe.array, atol=1e-6)
        peak = float(t1.array.max())
        below, above = (medfuse.fuse(t1.with_array((t1.array * (f / peak)).astype(np.float32)), pet, method="max")
                        for f in (0.999, 1.001))
    np.testing.assert_allclose(below.array, above.array, atol=1e-4)


def test_an_integer_0_1_mask_beside_an_8_bit_image_is_warned_about():
    """Integer images share 0..255, so a uint8 0/1 mask (as MONAI stores labels) was 1/255 of the scale: max
    fusion changed 1 pixel of 400 under it, the same mask as bool 400, with no word."""
    from medfuse.errors import MedfuseWarning

    rng = np.random.default_rng(0)
    image = (rng.random((64, 64)) * 200).astype(np.uint8)
    mask = np.zeros((64, 64), np.uint8)
    mask[20:40, 20:40] = 1
    with pytest.warns(MedfuseWarning, match=r"input 2 holds only 0 and 1 \(a mask\?\) beside images on 0\.\.255"):
        medfuse.fuse(image, mask, method="max")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # as bool it is on the full scale, and two masks share 0..1: no word
        fused = medfuse.fuse(image, mask.astype(bool), method="max")
        medfuse.fuse(mask, mask, method="max")
    assert np.count_nonzero(fused != image) == 400
