"""Fusion metrics on the inputs researchers pass: other scales, array types, masks, unsqueezed shapes."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medfuse import metrics as M
from medfuse.errors import InvalidInputError

# docs/fusion.md, "Scale": how each metric responds to one factor k on every image (k = 1/255 below).
SCALE_FREE = ("MI", "SCD", "CC", "PSNR", "FMI")
PROPORTIONAL = ("SD", "SF", "AG")
RANGE_DEPENDENT = ("EN", "VIF", "Qabf", "SSIM", "MS-SSIM", "SSIM_r2")


def _harvard(shared, name="2013.png"):
    from medfuse.harvard import load_gray

    a = load_gray(shared("data", "harvard-pairs", "CT-MRI", "MRI", name))
    b = load_gray(shared("data", "harvard-pairs", "CT-MRI", "CT", name))
    return np.maximum(a, b), a, b


def _quiet_score(*args, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return M.score(*args, **kw)


@pytest.mark.shared
def test_which_metrics_depend_on_the_intensity_scale_is_what_the_doc_says(shared):
    """The same max-rule fusion on 0..255 and on 0..1: the doc's three groups, every metric in one of them.
    Qabf is in the range-dependent group because of the reference's equal-gradient convention (0.556 -> 0.457)."""
    assert sorted(SCALE_FREE + PROPORTIONAL + RANGE_DEPENDENT) == sorted(M.METRICS)
    f, a, b = _harvard(shared)
    k = 1 / 255.0
    s255, s1 = _quiet_score(f, a, b), _quiet_score(f * k, a * k, b * k)
    for name in SCALE_FREE:
        assert s1[name] == pytest.approx(s255[name], rel=1e-9), name
    for name in PROPORTIONAL:
        assert s1[name] == pytest.approx(k * s255[name], rel=1e-9), name
    for name in RANGE_DEPENDENT:
        assert abs(s1[name] / s255[name] - 1) > 0.05, (name, s1[name], s255[name])
    assert s1["Qabf"] < 0.85 * s255["Qabf"]
    # With F off the copied pixels (the mean rule) Qabf is nearly scale-free.
    m = np.round((a + b) / 2)
    assert _quiet_score(m * k, a * k, b * k, metrics=["Qabf"])["Qabf"] == pytest.approx(M.qabf(m, a, b), rel=1e-3)


@pytest.mark.shared
def test_layouts_dtypes_and_tensors_that_numpy_reads_score_the_same(shared):
    torch = pytest.importorskip("torch")

    f, a, b = _harvard(shared)
    want = M.score(f, a, b)
    wide = lambda x: np.repeat(x, 2, axis=1)[:, ::2]  # noqa: E731 - a strided view
    for conv in (np.asfortranarray, wide, lambda x: x.astype(">f8"), lambda x: x.astype(np.int16), np.ndarray.tolist,
                 torch.from_numpy, lambda x: torch.from_numpy(x).float()):
        assert M.score(conv(f), conv(a), conv(b)) == want
    from monai.data import MetaTensor

    assert M.score(*(MetaTensor(torch.from_numpy(x)) for x in (f, a, b))) == want


def test_a_tensor_numpy_cannot_read_is_told_how_to_convert_it():
    """A tensor that needs grad (a network output) was refused with "pass a NumPy array"."""
    torch = pytest.importorskip("torch")

    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    f = torch.from_numpy((a + b) / 2).requires_grad_()
    for bad in (f, torch.from_numpy(a).bfloat16()):
        with pytest.raises(InvalidInputError, match=r"detach\(\)\.cpu\(\)\.float\(\)\.numpy\(\)"):
            M.score(bad, a, b)
    with pytest.raises(InvalidInputError, match="NumPy array"):
        M.score(object(), a, b)


def test_a_volume_is_told_to_pass_its_voxels():
    """A medfuse Volume (what fuse returns) was refused with "must be numeric, got dtype object"."""
    from medfuse import Volume

    rng = np.random.default_rng(6)
    a, b = (rng.integers(0, 256, (16, 16, 16)).astype(float) for _ in range(2))
    vol = Volume(np.maximum(a, b), np.eye(4))
    with pytest.raises(InvalidInputError, match=r"Volume, not an array.*x\.array"):
        M.score(vol, a, b, mode="native")
    assert M.score(vol.array, a, b, mode="native", metrics=["CC"])["CC"] > 0


def test_a_masked_array_is_refused_not_scored_without_its_mask():
    """np.asarray drops the mask: a region of interest given as a masked array was scored as the whole image
    (pixels under the mask included), silently."""
    rng = np.random.default_rng(1)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    roi = np.zeros(a.shape, bool)
    roi[8:24, 8:24] = True
    masked = np.ma.masked_array(np.maximum(a, b), mask=~roi)
    for call in (lambda: M.score(masked, a, b), lambda: M.score(np.maximum(a, b), a, np.ma.masked_array(b, b > 200)),
                 lambda: M.en(masked), lambda: M.sf(masked)):
        with pytest.raises(InvalidInputError, match="masked array") as ei:
            call()
        assert "bounding box" in str(ei.value)
    # Nothing masked (as some readers return): nothing is lost, so it is scored.
    assert M.score(np.ma.masked_array(np.maximum(a, b)), a, b) == M.score(np.maximum(a, b), a, b)


def test_unsqueezed_images_are_told_to_squeeze_not_to_convert_rgb():
    """A (1, 1, H, W) network output, a (1, H, W) or (H, W, 1) image were told to convert RGB to grey or that
    they were too small (a "1xHxW" image); every one is an image with axes of length 1."""
    rng = np.random.default_rng(2)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    f = np.maximum(a, b)
    for shape in ((1, 1, 32, 32), (1, 32, 32), (32, 32, 1)):
        r = lambda x: x.reshape(shape)  # noqa: E731
        for call in (lambda: M.score(r(f), r(a), r(b)), lambda: M.ssim(r(f), r(a), r(b)),
                     lambda: M.qabf(r(f), r(a), r(b)), lambda: M.sf(r(f))):
            with pytest.raises(InvalidInputError, match="length 1") as ei:
                call()
            assert "np.squeeze" in str(ei.value) and "RGB" not in str(ei.value), shape
    v = [np.stack([x] * 8)[None] for x in (f, a, b)]  # (1, 8, 32, 32) in a volume mode
    with pytest.raises(InvalidInputError, match=r"np.squeeze\(x\) gives \(8, 32, 32\)"):
        M.score(*v, mode="native")
    with pytest.raises(InvalidInputError, match="mode='2d'"):
        M.score(*(x[..., None] for x in (f, a, b)), mode="native")
    # Whole-image metrics never looked at the shape: they still score it.
    assert M.mi(f[None], a[None], b[None]) == M.mi(f, a, b)


def test_sampled_slice_scores_refuse_volumes_off_the_0_1_scale():
    """Its slices are scored as 255 * x with F clipped to 0..1: 0..255 volumes gave a binary F against sources up
    to 65025 and Qabf/VIF numbers without a word."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(3)
    a, b = (ndi.gaussian_filter(rng.random((24, 24, 24)), 2.0) for _ in range(2))
    a, b = ((x - x.min()) / np.ptp(x) for x in (a, b))
    f = np.maximum(a, b)
    ok = M.sampled_slice_scores(f, a, b, step=8)
    assert np.isfinite(ok).all()
    for args, what in (((f * 255, a * 255, b * 255), "the fused volume"), ((f, a, b * 255), "source 2"),
                       ((f, a - 1, b), "source 1")):
        with pytest.raises(InvalidInputError, match=f"0..1 scale, but {what}") as ei:
            M.sampled_slice_scores(*args, step=8)
        assert "255" in str(ei.value)
    # A network's small overshoot is clipped, as documented, not refused.
    assert np.allclose(M.sampled_slice_scores(np.clip(f * 1.02, 0, 1.02), a, b, step=8),
                       M.sampled_slice_scores(np.clip(f * 1.02, 0, 1), a, b, step=8))


def test_degenerate_images_get_the_values_the_docstrings_state():
    rng = np.random.default_rng(4)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    z = np.zeros_like(a)
    s = _quiet_score(z, z, z)
    assert np.isnan(s["VIF"]) and s["FMI"] == 1.0 and np.isnan(s["Qabf"]) and s["PSNR"] == np.inf
    assert s["CC"] == 0.0 and s["SCD"] == 0.0 and s["EN"] == 0.0
    assert M.psnr(z, a, b) == -np.inf
    # A blank source adds nothing to Qabf: Qabf is then B's alone.
    for f in (np.maximum(a, b), np.round((a + b) / 2)):
        assert M.qabf(f, z, b) == pytest.approx(M.qabf(f, b, b))


def test_vif_with_a_blank_source_is_nan_not_a_free_perfect_term():
    """The reference's 0/0 convention gave a constant source a VIF term of 1 whatever F was. Slice-wise, every
    slice where one source had no content (a PET field of view that stops, a zero-padded resample) then scored
    1 or more: a mean-rule volume whose second source stops at slice 20 of 32 scored 0.82 instead of 0.27."""
    from scipy import ndimage as ndi

    rng = np.random.default_rng(7)
    a, b = (ndi.gaussian_filter(rng.random((40, 40, 32)), 1.5) for _ in range(2))
    a, b = (np.round(255 * (x - x.min()) / np.ptp(x)) for x in (a, b))
    assert np.isnan(M.vif(np.maximum(a[..., 0], b[..., 0]), np.full((40, 40), 30.0), b[..., 0]))
    b[..., 20:] = 0.0
    f = np.round((a + b) / 2)
    got = M.score(f, a, b, mode="slicewise", axes=2, metrics=["VIF", "SSIM"])
    assert got["n_slices"] == {2: 32}  # every slice has content (in A): the other metrics still see them all
    want = np.mean([M.vif(f[..., k], a[..., k], b[..., k]) for k in range(20)])
    assert got["VIF"] == pytest.approx(want, rel=1e-12)


@pytest.mark.shared
def test_ms_ssim_matches_monai_on_five_scales(shared):
    """Wang's five weights sum to 1.0001; medfuse divided them by their sum even when all five scales fit, so
    its MS-SSIM was v ** (1 / 1.0001) of the reference's (5.4e-5 high for this max-rule pair). MONAI's
    MultiScaleSSIMMetric (same windows, 'valid' filtering, 2x2 average pooling) builds its Gaussian in float32,
    which leaves 3.8e-6 (with a float64 kernel the two agree to 1e-8)."""
    torch = pytest.importorskip("torch")
    from monai.metrics import MultiScaleSSIMMetric

    f, a, b = _harvard(shared)
    ms = MultiScaleSSIMMetric(spatial_dims=2, data_range=255.0)
    t = lambda x: torch.from_numpy(x)[None, None]  # noqa: E731
    for fused in (f, np.round((a + b) / 2)):
        want = sum(float(ms(t(fused), t(s))) for s in (a, b))
        assert M.ms_ssim(fused, a, b) == pytest.approx(want, abs=1e-5)


def test_a_low_contrast_fusion_on_the_right_scale_is_not_told_to_rescale():
    """The scale check compared ranges: a collapsed fusion (100..103, on 0..255 like its sources) was told the
    images were on very different scales. Peak magnitudes tell the two cases apart."""
    from medfuse.errors import MedfuseWarning

    rng = np.random.default_rng(5)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    flat = 100.0 + 3 * (np.indices(a.shape).sum(0) % 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        s = M.score(flat, a, b, metrics=["SSIM", "Qabf"])
    assert s["Qabf"] < 0.5 * M.qabf(np.maximum(a, b), a, b)  # scored, and poor
    with pytest.warns(MedfuseWarning, match="very different intensity scales"):
        M.score((a + b) / 510, a, b, metrics=["SSIM"])  # a 0..1 F against 0..255 sources still warns


def test_score_takes_sf_and_ag_alone_on_images_of_2_pixels_a_side():
    """docs/fusion.md says SF and AG alone need 2 pixels a side, as their own functions take; score asked 7."""
    rng = np.random.default_rng(0)
    f, a, b = (rng.random((3, 3)) * 255 for _ in range(3))
    got = M.score(f, a, b, metrics=["SF", "AG"])
    assert got == {"SF": M.sf(f), "AG": M.ag(f)}
    with pytest.raises(InvalidInputError, match="at least 7 pixels"):
        M.score(f, a, b, metrics=["SF", "SSIM"])
