"""Fusion metrics: the published golden values, sanity properties, 3-D modes and bad input."""

from __future__ import annotations

import contextlib
import json

import numpy as np
import pytest

from medfuse import metrics as M
from medfuse.errors import InvalidInputError
from medfuse.harvard import load_gray

GOLDEN_NAMES = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "CC", "PSNR", "SSIM")


def _golden(shared):
    entries = json.loads(shared("reference", "fusion-metrics-golden.json").read_text())
    assert len(entries) == 12
    return entries


@pytest.mark.shared
def test_golden_values_to_the_files_printed_precision(shared):
    """The golden file prints 6 decimals, so a faithful implementation is within half a unit of the 6th
    (5e-7) of every value; 1e-6 leaves float noise room. Measured worst: 4.9e-7 (EN), relative 8.6e-7 (Qabf).
    (A relative 1e-4 would let SD be off by 0.009 and PSNR by 0.0016 and still pass.)"""
    worst = {}
    for e in _golden(shared):
        a = load_gray(shared("data", e["A"]))
        b = load_gray(shared("data", e["B"]))
        f = np.round((a + b) / 2) if e["rule"] == "mean" else np.maximum(a, b)
        got = M.score(f, a, b, metrics=GOLDEN_NAMES)
        assert set(e["metrics"]) == set(GOLDEN_NAMES)
        for name, want in e["metrics"].items():
            err = abs(got[name] - want)
            worst[name] = max(worst.get(name, 0.0), err)
            assert err <= 1e-6, f"{e['A']} {e['rule']} {name}: got {got[name]}, golden {want}"
    assert set(worst) == set(GOLDEN_NAMES)


@pytest.mark.shared
def test_golden_pairs_cover_every_modality(shared):
    kinds = {e["B"].split("/")[1] for e in _golden(shared)}
    assert kinds == {"CT-MRI", "PET-MRI", "SPECT-MRI"}


def _pair(seed=0, n=64):
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:n, 0:n]
    a = np.clip(120 + 80 * np.sin(xx / 5.0) + rng.normal(0, 10, (n, n)), 0, 255).round()
    b = np.clip(100 + 90 * np.cos(yy / 7.0) + rng.normal(0, 10, (n, n)), 0, 255).round()
    return a, b


def test_fused_equal_to_a_scores_perfect_ssim_and_cc_against_a():
    a, b = _pair()
    assert M.ssim(a, a, a) == pytest.approx(2.0)
    assert M.cc(a, a, a) == pytest.approx(1.0)
    assert M.ms_ssim(a, a, a) == pytest.approx(2.0)
    s = M.score(a, a, b)
    # The A terms are perfect, the B ones are not.
    assert s["SSIM"] == pytest.approx(1.0 + M.ssim(a, b, b) / 2)
    assert s["CC"] == pytest.approx((1.0 + M.cc(a, b, b)) / 2)
    assert s["PSNR"] > M.psnr(np.round((a + b) / 4), a, b)


def test_constant_fused_image_has_zero_entropy_and_no_detail():
    a, b = _pair()
    s = M.score(np.full_like(a, 77.0), a, b)
    assert s["EN"] == 0.0
    assert s["SD"] == 0.0 and s["SF"] == 0.0 and s["AG"] == 0.0
    assert s["MI"] == 0.0
    assert s["VIF"] == 0.0
    # Zero-padded Sobel (the reference's) sees an edge at the border only.
    assert s["Qabf"] < 0.2 * M.qabf(np.maximum(a, b), a, b)
    assert M.qabf(np.zeros_like(a), a, b) < 1e-3


def test_score_returns_every_metric_as_floats():
    a, b = _pair()
    s = M.score(np.maximum(a, b), a, b)
    assert list(s) == list(M.METRICS)
    assert all(isinstance(v, float) and np.isfinite(v) for v in s.values())
    assert 0.0 <= s["FMI"] <= 1.0
    assert 0.0 < s["MS-SSIM"] <= 2.0


def test_better_fusion_scores_better_on_discriminating_metrics():
    a, b = _pair(1)
    good = np.maximum(a, b)
    bad = np.round(np.clip(good + np.random.default_rng(5).normal(0, 40, a.shape), 0, 255))
    sg, sb = M.score(good, a, b), M.score(bad, a, b)
    for name in ("VIF", "Qabf", "SSIM", "PSNR", "CC", "FMI"):
        assert sg[name] > sb[name], name


def test_three_sources():
    a, b = _pair(2)
    c = np.round((a + b) / 2)
    s = M.score(np.maximum(a, b), a, b, c)
    assert set(s) == set(M.METRICS)
    assert s["MI"] > M.mi(np.maximum(a, b), a, b)  # one more source adds information
    assert 0 < s["CC"] <= 1


def test_selected_metrics_and_names_case_insensitive():
    a, b = _pair()
    assert list(M.score(a, a, b, metrics=["ssim", "qabf"])) == ["SSIM", "Qabf"]
    with pytest.raises(InvalidInputError, match="unknown metric"):
        M.score(a, a, b, metrics=["NOPE"])


def test_slicewise_on_stacked_slices_equals_2d():
    a, b = _pair(3, n=32)
    f = np.maximum(a, b)
    names = ["EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "PSNR", "CC", "FMI", "MS-SSIM"]
    ref = M.score(f, a, b, metrics=names)
    stack = lambda x: np.stack([x] * 9, axis=2)  # noqa: E731
    got = M.score(stack(f), stack(a), stack(b), mode="slicewise", metrics=names)
    assert got["mode"] == "slicewise"
    assert got["n_slices"][2] == 9
    for n in names:
        assert got["per_axis"][2][n] == pytest.approx(ref[n], rel=1e-9), n
    only_k = M.score(stack(f), stack(a), stack(b), mode="slicewise", metrics=names, axes=(2,))
    for n in names:
        assert only_k[n] == pytest.approx(ref[n], rel=1e-9), n


def test_slicewise_averages_only_slices_with_content():
    a, b = _pair(4, n=32)
    f = np.maximum(a, b)
    va, vb, vf = (np.zeros((32, 32, 12)) for _ in range(3))
    va[..., 3:7], vb[..., 3:7], vf[..., 3:7] = a[..., None], b[..., None], f[..., None]
    got = M.score(vf, va, vb, mode="slicewise", metrics=["SSIM", "EN"], axes=(2,))
    assert got["n_slices"] == {2: 4}
    assert got["SSIM"] == pytest.approx(M.ssim(f, a, b))


def test_native_3d_mode_recorded_and_matches_global_definitions():
    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (16, 16, 16)).astype(float)
    b = rng.integers(0, 256, (16, 16, 16)).astype(float)
    f = np.round((a + b) / 2)
    got = M.score(f, a, b, mode="native")
    assert got["mode"] == "native"
    assert set(got) - {"mode"} == set(M.NATIVE_3D_METRICS)
    assert got["SD"] == pytest.approx(np.std(f))
    assert got["EN"] == pytest.approx(M.en(f))
    assert 0 < got["SSIM"] < 2
    with pytest.raises(InvalidInputError, match="not defined for this mode"):
        M.score(f, a, b, mode="native", metrics=["Qabf"])


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda a, b: (a, a, b[:-1]), "shape"),
        (lambda a, b: (np.where(a > 200, np.nan, a), a, b), "NaN"),
        (lambda a, b: (np.ones((1, 1)), np.ones((1, 1)), np.ones((1, 1))), "too small"),
        (lambda a, b: (a, a), "at least two source"),
        (lambda a, b: (np.stack([a] * 3, -1), a, b), "shape"),
        (lambda a, b: (np.stack([a] * 3, -1),) * 3, "RGB"),
        (lambda a, b: (a.astype(str), a, b), "numeric"),
    ],
)
def test_bad_input_gets_a_clear_error(make, match):
    a, b = _pair()
    with pytest.raises(InvalidInputError, match=match) as ei:
        M.score(*make(a, b))
    assert "Fix:" in str(ei.value)


def test_unknown_mode_and_too_thin_slicewise_axis():
    a, b = _pair(n=16)
    with pytest.raises(InvalidInputError, match="unknown mode"):
        M.score(a, a, b, mode="4d")
    thin = np.stack([a] * 3, axis=2)
    with pytest.raises(InvalidInputError, match="too small"):
        M.score(thin, thin, thin, mode="slicewise")


def test_scale_mismatch_warns_instead_of_silent_garbage():
    """F in 0..1 scored against sources in raw scanner units must not pass silently."""
    from medfuse.errors import MedfuseWarning

    rng = np.random.default_rng(0)
    a = rng.random((32, 32)) * 700.0
    b = rng.random((32, 32)) * 700.0
    with pytest.warns(MedfuseWarning, match="intensity scales"):
        M.score((a + b) / 1400.0, a, b, metrics=["PSNR"])
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        k = 255.0 / 700.0  # one scale, and the 0..255 one the definitions assume: no warning
        M.score((a + b) / 2 * k, a * k, b * k, metrics=["PSNR"])


def _smooth_volumes(n=40):
    from scipy import ndimage as ndi

    rng = np.random.default_rng(0)
    return [ndi.gaussian_filter(rng.random((n, n, n)), 2.0) for _ in range(2)], rng


def test_anisotropy_flags_slice_to_slice_jumps_along_their_axis():
    """The mean of two isotropic volumes keeps their anisotropy (about 1 per axis); an offset that jumps from
    slice to slice along axis 0 (what slice-by-slice fusion or stripes add) raises axis 0 and lowers the others."""
    (a, b), rng = _smooth_volumes()
    ref = M.anisotropy((a + b) / 2, (a, b))
    assert ref.shape == (3,) and np.abs(ref - 1).max() < 0.2
    striped = (a + b) / 2 + 0.01 * rng.standard_normal((a.shape[0], 1, 1))
    got = M.anisotropy(striped, (a, b))
    assert got[0] - ref[0] > 0.3 and (got[1:] < ref[1:]).all(), (got, ref)
    with pytest.raises(InvalidInputError, match="3-D"):
        M.anisotropy(a[0], (a[0], b[0]))


def test_sampled_slice_scores_average_every_step_th_slice_on_all_three_axes():
    """Every ``step``-th slice of each axis, scored at 8 bits (fused rounded), slices without enough of the first
    source skipped: the same numbers as the 2-D metrics on those slices, by hand."""
    (a, b), _ = _smooth_volumes(24)
    a[:, :, 12:] = 0.0  # axis-2 slices 12.. carry no first source and must be skipped
    f = np.maximum(a, b)
    by_hand = []
    for ax in range(3):
        for i in range(0, 24, 8):
            fs, as_, bs = (np.take(v, i, axis=ax) for v in (f, a, b))
            if (as_ > 0).mean() > 0.2:
                by_hand.append([M.qabf(np.round(fs * 255), as_ * 255, bs * 255),
                                M.ssim(np.round(fs * 255), as_ * 255, bs * 255)])
    assert len(by_hand) == 3 + 3 + 2
    got = M.sampled_slice_scores(f, a, b, step=8, metrics=("Qabf", "SSIM"))
    assert np.allclose(got, np.mean(by_hand, axis=0))
    with pytest.raises(InvalidInputError, match="no slice"):
        M.sampled_slice_scores(f, np.zeros_like(a), b)


def test_ssim_r2_is_cddfuses_convention_and_lower_than_ssim():
    """``SSIM_r2``: scikit-image's SSIM with ``data_range=2`` (what CDDFuse's published SSIM used)."""
    from skimage.metrics import structural_similarity

    a, b = _pair(4)
    f = np.round((a + b) / 2)
    want = sum(structural_similarity(f, s, data_range=2) for s in (a, b))
    assert M.ssim_r2(f, a, b) == pytest.approx(want, abs=1e-12)
    s = M.score(f, a, b, metrics=["ssim", "ssim_r2"])
    assert s["SSIM_r2"] == pytest.approx(want, abs=1e-12) and s["SSIM_r2"] < s["SSIM"]
    vol = lambda x: np.stack([x] * 8, axis=2)  # noqa: E731
    assert "SSIM_r2" in M.score(vol(f), vol(a), vol(b), mode="native")


# ---------------------------------------------------------------------- review fixes (2026-12-04)
@contextlib.contextmanager
def _no_runtime_warnings():
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        yield


def test_vif_is_nan_below_its_17_pixel_window_not_a_perfect_score():
    """Under 17 pixels a side no VIF window fits: the reference's featureless convention gave 1 per source,
    so a 12x12 constant fused image scored VIF 2.0 (perfect) -- and so did every slice of a thin volume."""
    a, b = _pair(n=64)
    small = (slice(0, 12), slice(0, 12))
    assert np.isnan(M.vif(np.full((12, 12), 77.0), a[small], b[small]))
    assert np.isnan(M.vif(np.maximum(a, b)[small], a[small], b[small]))
    assert np.isnan(M.score(np.maximum(a, b)[:8], a[:8], b[:8])["VIF"])  # a thin strip: 8x64
    big = (slice(0, 17), slice(0, 17))
    assert np.isfinite(M.vif(np.maximum(a, b)[big], a[big], b[big]))
    assert M.vif(np.full((17, 17), 77.0), a[big], b[big]) == 0.0


def test_images_off_the_0_255_scale_warn_once_per_score():
    """The definitions assume 0..255 (EN's 256 bins, SSIM's data_range=255): 0..1 floats gave EN 0.9 and SSIM
    1.99 for a poor fusion, 16-bit images EN 0, without a word. 8-bit integers and 0..255 floats agree, silently."""
    import warnings

    from medfuse.errors import MedfuseWarning

    a, b = _pair()
    f = np.maximum(a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        want = M.score(f, a, b)
        got8 = M.score(f.astype(np.uint8), a.astype(np.uint8), b.astype(np.uint8))
    assert got8 == want
    for k, match in ((1 / 255.0, "0-1 scale"), (257.0, "outside the 0-255 scale")):
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            M.score(f * k, a * k, b * k, metrics=[m for m in M.METRICS if m != "MI"])  # MI warns on its own
        scale = [x for x in w if issubclass(x.category, MedfuseWarning)]
        assert len(scale) == 1 and match in str(scale[0].message), [str(x.message) for x in w]
        assert scale[0].filename == __file__  # points at the caller, not inside medfuse
        with pytest.warns(MedfuseWarning, match=match):
            M.en(f * k)
    u16 = (f * 257).astype(np.uint16)
    with pytest.warns(MedfuseWarning, match="16-bit: divide by 257"):
        M.ssim(u16, (a * 257).astype(np.uint16), (b * 257).astype(np.uint16))


def test_sf_and_ag_refuse_what_they_cannot_score_with_a_typed_error():
    """AG on an RGB image or a row died in NumPy (``too many values to unpack``), SF on RGB mixed the channels in,
    SF on one row was NaN with RuntimeWarnings."""
    a, _ = _pair()
    for fn in (M.sf, M.ag):
        with pytest.raises(InvalidInputError, match="RGB") as ei:
            fn(np.dstack([a] * 3))
        assert "Fix:" in str(ei.value)
        for bad in (a[0], a[:1], a[:1, :1]):
            with _no_runtime_warnings(), pytest.raises(InvalidInputError):
                fn(bad)
    assert M.sf(a[:2, :2]) >= 0 and M.ag(a[:2, :2]) >= 0


def test_empty_arrays_are_refused_not_nan():
    with _no_runtime_warnings():
        for fn in (M.en, M.sd):
            with pytest.raises(InvalidInputError, match="empty"):
                fn(np.zeros((0, 5)))
        with pytest.raises(InvalidInputError, match="empty"):
            M.psnr(np.zeros((0, 4)), np.zeros((0, 4)), np.zeros((0, 4)))


def test_an_empty_metric_list_is_refused_not_an_empty_result():
    a, b = _pair()
    with pytest.raises(InvalidInputError, match="no metric was named"):
        M.score(a, a, b, metrics=[])
    with pytest.raises(InvalidInputError, match="no metric was named"):
        M.sampled_slice_scores(np.ones((8, 8, 8)), np.ones((8, 8, 8)), np.ones((8, 8, 8)), metrics=())


def test_slicewise_without_any_content_is_refused_not_all_nan():
    z = np.zeros((16, 16, 16))
    with pytest.raises(InvalidInputError, match="no slice carries content"):
        M.score(z, z, z, mode="slicewise", metrics=["SSIM"])


def test_slicewise_axes_take_one_int_and_count_each_plane_once():
    rng = np.random.default_rng(0)
    v = [rng.integers(0, 256, (16, 16, 16)).astype(float) for _ in range(3)]
    one = M.score(*v, mode="slicewise", metrics=["CC"], axes=2)  # was TypeError: 'int' object is not iterable
    assert one["axes"] == [2] and one["CC"] == pytest.approx(one["per_axis"][2]["CC"])
    dup = M.score(*v, mode="slicewise", metrics=["CC"], axes=(0, 0, 1))
    assert dup["axes"] == [0, 1]
    assert dup["CC"] == pytest.approx((dup["per_axis"][0]["CC"] + dup["per_axis"][1]["CC"]) / 2)
    with pytest.raises(InvalidInputError, match="axes"):
        M.score(*v, mode="slicewise", axes="xy")
    with pytest.raises(InvalidInputError, match="mode='2d'"):
        M.score(v[0][0], v[1][0], v[2][0], mode="slicewise")


def test_volume_checks_on_degenerate_input():
    """A constant fused volume: anisotropy NaN without RuntimeWarnings; step=0 a typed error, not range()'s;
    sampled_slice_scores averages VIF over the slices where it is defined (NaN on slices under 17 pixels)."""
    (a, b), _ = _smooth_volumes(24)
    with _no_runtime_warnings():
        assert np.isnan(M.anisotropy(np.zeros_like(a), (a, b))).all()
    with pytest.raises(InvalidInputError, match="step"):
        M.sampled_slice_scores(a, a, b, step=0)
    with pytest.raises(InvalidInputError, match="compare with the sources"):
        M.sampled_slice_scores(a, a, b, metrics=("EN",))
    thin = [x[:, :, :12] for x in (np.maximum(a, b), a, b)]  # axis-0 and -1 slices are 24x12: no VIF there
    vif = M.sampled_slice_scores(*thin, step=8, metrics=("VIF",))
    assert np.isfinite(vif).all()


def test_rgb_given_to_a_metric_that_takes_volumes_says_rgb():
    a, b = _pair()
    rgb = np.dstack([a] * 3)
    with pytest.raises(InvalidInputError, match="rgb_to_gray"):
        M.ssim(rgb, np.dstack([b] * 3), rgb)


def test_mi_on_continuous_values_warns():
    """MI counts distinct values: 0.01 of noise on F took MI from 3.9 to 10.5 without a word."""
    import warnings

    from medfuse.errors import MedfuseWarning

    a, b = _pair()
    f = np.round((a + b) / 2)
    noisy = f + np.random.default_rng(0).random(f.shape) * 0.01
    with pytest.warns(MedfuseWarning):
        assert M.mi(noisy, a, b) > 2 * M.mi(f, a, b)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.mi(f / 255 * 255, a / 255 * 255, b)  # float noise of a rescale is not continuous
    for call in (lambda x: M.mi(x, a, b), lambda x: M.score(x, a, b, metrics=["MI", "SSIM"])):
        with pytest.warns(MedfuseWarning, match="not whole numbers"):
            call(noisy)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            call(f)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        M.score(noisy, a, b, metrics=["SSIM", "CC"])  # no MI asked for: nothing to warn about


def test_an_rgb_fused_image_against_grey_sources_is_told_to_convert_not_to_resample():
    a, b = _pair()
    for args in ((np.dstack([a] * 3), a, b), (a, np.dstack([a] * 3), b)):
        with pytest.raises(InvalidInputError, match="rgb_to_gray") as ei:
            M.score(*args)
        assert "resample" not in str(ei.value)
    with pytest.raises(InvalidInputError, match="resample"):
        M.score(a, a[:-1], b[:-1])
