"""Scale warnings for any image, sampled MI on rounded sources, thin volumes,
per-metric slice counts, values too large for the metrics."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medfuse import metrics as M
from medfuse.errors import InvalidInputError, MedfuseWarning
from medfuse.harvard import list_pairs, load_pair

HARVARD = ("data", "harvard-pairs")


def _scale_warnings(*images, metrics=("VIF",)):
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        out = M.score(*images, metrics=list(metrics))
    return out, [str(w.message) for w in seen if issubclass(w.category, MedfuseWarning) and "scale" in str(w.message)
                 and "whole numbers" not in str(w.message)]


def _grey_pair(shared, key):
    from medfuse.fusion.color import is_rgb, rgb_to_gray

    pair = [p for p in list_pairs(shared(*HARVARD)) if p.key == key][0]
    return [rgb_to_gray(s) if is_rgb(s) else np.asarray(s, dtype=np.float64) for s in load_pair(pair)]


@pytest.mark.shared
def test_a_source_on_another_scale_warns_and_names_it(shared):
    """score(F, A, B / 255) gave VIF 169 (right: about 1.09) without a scale warning: only F was compared
    with the sources' largest peak. Every image is now compared with the brightest."""
    a, b = _grey_pair(shared, "CT-MRI/2013")
    f = np.round((a + b) / 2)
    right, quiet = _scale_warnings(f, a, b)
    assert not quiet and right["VIF"] < 2
    for args, which in (((f, a, b / 255), "source 2"), ((f, a / 255, b), "source 1"),
                        ((f, a, b / 255 * 8), "source 2"),  # 0..1, and SUV-like 0..8
                        ((f, a, np.round(b / b.max() * 20)), "source 2"),  # a PET in SUV 0..20, rounded
                        ((f, a, np.round(b / b.max() * 30)), "source 2")):  # (16 let both through: VIF 1.98)
        wrong, said = _scale_warnings(*args)
        assert wrong["VIF"] != pytest.approx(right["VIF"], rel=0.05)  # the numbers are indeed off
        assert len(said) == 1 and said[0].startswith(which) and "0-255" in said[0], said


@pytest.mark.shared
def test_real_dark_and_bright_sources_on_one_scale_do_not_warn(shared):
    """The other side: Harvard's darkest sources (SPECT peaking at 79 and 88 against MRI at 255) are on the
    0-255 scale and must not be told to rescale, whatever the fused image."""
    for key in ("SPECT-MRI/35020", "SPECT-MRI/3043"):
        a, b = _grey_pair(shared, key)
        assert b.max() < 100 < a.max()
        for f in (np.maximum(a, b), np.round((a + b) / 2), np.minimum(a, b)):
            _, said = _scale_warnings(f, a, b, metrics=("CC", "VIF"))
            assert not said, (key, said)


def test_sampled_slice_mi_rounds_the_sources_as_it_rounds_f():
    """MI was computed on 255 * source unrounded (its warning suppressed): 1e-4 of noise on the sources took
    it from 5.5 to 7.9 nats. The sources are now rounded like F, so the noise changes nothing."""
    rng = np.random.default_rng(3)
    a8, b8 = (rng.integers(0, 256, (24, 24, 24)).astype(float) for _ in range(2))
    f = np.round((a8 + b8) / 2) / 255
    a, b = a8 / 255, b8 / 255
    noisy = [x + rng.normal(0, 1e-4, x.shape) for x in (a, b)]
    clean = M.sampled_slice_scores(f, a, b, metrics=("MI",))[0]
    assert M.sampled_slice_scores(f, *noisy, metrics=("MI",))[0] == pytest.approx(clean, abs=1e-9)
    # And it is the MI of the 8-bit slices themselves.
    per = [M.mi(np.round(np.moveaxis(f, ax, 0)[i] * 255), np.moveaxis(a8, ax, 0)[i], np.moveaxis(b8, ax, 0)[i])
           for ax in range(3) for i in range(0, 24, 8)]
    assert clean == pytest.approx(np.mean(per), abs=1e-9)


def _thin(shape=(64, 64, 5), seed=1):
    rng = np.random.default_rng(seed)
    a, b = (rng.integers(0, 256, shape).astype(float) for _ in range(2))
    return np.maximum(a, b), a, b


def test_thin_volumes_are_scored_on_the_planes_that_fit():
    """64x64x5 was refused ("every side needs at least 7 pixels") slice-wise across axis 2 (64x64 slices) and
    natively for the pixel statistics, which take any shape."""
    f, a, b = _thin()
    s = M.score(f, a, b, mode="slicewise", axes=2, metrics=["Qabf", "MI"])
    assert s["n_slices"] == {2: 5}
    assert s["Qabf"] == pytest.approx(np.mean([M.qabf(f[:, :, k], a[:, :, k], b[:, :, k]) for k in range(5)]))
    n = M.score(f, a, b, mode="native", metrics=["MI", "CC"])
    assert n["MI"] == pytest.approx(M.mi(f, a, b)) and n["CC"] == pytest.approx(M.cc(f, a, b))
    small = M.score(f[:5, :5, 0], a[:5, :5, 0], b[:5, :5, 0], metrics=["EN", "MI"])  # 2-D pixel statistics
    assert small["MI"] == pytest.approx(M.mi(f[:5, :5, 0], a[:5, :5, 0], b[:5, :5, 0]))


def test_thin_volumes_refused_for_window_metrics_say_which_axes_fit():
    f, a, b = _thin()
    with pytest.raises(InvalidInputError, match=r"slices across axis 0 .* 64x5 pixels") as e:
        M.score(f, a, b, mode="slicewise", metrics=["SSIM"])  # default axes (0, 1, 2)
    assert "axes=(2,)" in e.value.fix
    with pytest.raises(InvalidInputError, match="too small") as e:
        M.score(f, a, b, mode="native", metrics=["SSIM"])  # 3-D SSIM's 7x7x7 window
    assert "slicewise" in e.value.fix


def test_slicewise_counts_the_slices_each_metric_is_over():
    """B blank from slice 10: VIF (NaN there) was averaged over 10 slices and SSIM over 20, but only
    n_slices {2: 20} was reported."""
    rng = np.random.default_rng(1)
    a = rng.integers(1, 256, (32, 32, 20)).astype(float)
    b = rng.integers(1, 256, (32, 32, 20)).astype(float)
    b[:, :, 10:] = 0
    f = np.maximum(a, b)
    s = M.score(f, a, b, mode="slicewise", axes=2, metrics=["VIF", "SSIM"])
    vifs = [M.vif(f[:, :, k], a[:, :, k], b[:, :, k]) for k in range(20)]
    assert s["n_slices"] == {2: 20}
    assert s["n_slices_used"] == {"VIF": int(np.sum(~np.isnan(vifs))), "SSIM": 20}
    assert s["n_slices_used"]["VIF"] == 10
    assert s["n_slices_used_per_axis"] == {2: s["n_slices_used"]}
    assert s["VIF"] == pytest.approx(np.nanmean(vifs))


@pytest.mark.parametrize("factor", [1e60, 1e160])
def test_values_beyond_any_image_scale_are_a_typed_error(factor):
    """PSNR raised a raw OverflowError near 1e160; SSIM gave NaN and CC/SCD 0.0 near 1e100."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    f = np.maximum(a, b)
    for name in ("PSNR", "CC", "SCD", "SSIM"):
        with pytest.raises(InvalidInputError, match="beyond any image scale"):
            M.score(f * factor, a * factor, b * factor, metrics=[name])


@pytest.mark.parametrize("factor", [1e-60, 1e-200])
def test_values_below_any_image_scale_are_a_typed_error(factor):
    """Squares underflow: SD, SF and AG were 0.0 for a textured image and PSNR inf ("F equals every source")."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    f = np.maximum(a, b)
    for call in (lambda: M.sd(f * factor), lambda: M.sf(f * factor), lambda: M.ag(f * factor),
                 lambda: M.score(f * factor, a * factor, b * factor, metrics=["PSNR"])):
        with pytest.raises(InvalidInputError, match="below any image scale"):
            call()
    assert M.sd(np.zeros((32, 32))) == 0.0  # all zero is a (blank) image, not a scale problem


def test_large_but_representable_values_keep_their_scale_free_metrics():
    """Below the limit the scale-free metrics are still right (CC and SCD were 0.0 near 1e100)."""
    rng = np.random.default_rng(0)
    a, b = (rng.integers(0, 256, (32, 32)).astype(float) for _ in range(2))
    f = np.maximum(a, b)
    c = 3e47
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        base = M.score(f, a, b, metrics=["CC", "SCD", "PSNR"])
        big = M.score(f * c, a * c, b * c, metrics=["CC", "SCD", "PSNR", "SSIM"])
    for k in ("CC", "SCD", "PSNR"):
        assert big[k] == pytest.approx(base[k], rel=1e-9)
    assert np.isfinite(big["SSIM"])


@pytest.mark.shared
def test_a_0_1_image_with_a_little_overshoot_is_told_to_go_to_0_255(shared):
    """0..1 x 1.02 (an interpolated output) passed as if on 0-255 (EN 3.11 -> 0.86, SSIM 1.51 -> 1.99); the MI
    warning then said to round it, which makes a 0..1 image binary."""
    a, b = _grey_pair(shared, "CT-MRI/2013")
    f = np.maximum(a, b)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        M.score(f / 255 * 1.02, a / 255 * 1.02, b / 255 * 1.02, metrics=["EN", "MI"])
    said = [str(w.message) for w in seen if issubclass(w.category, MedfuseWarning)]
    assert any("they look like the 0-1 scale" in m for m in said), said
    assert any("np.round(F * 255) for a 0..1 image" in m for m in said), said
