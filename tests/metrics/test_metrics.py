"""Fusion metrics: the published golden values, sanity properties, 3-D modes and bad input."""

from __future__ import annotations

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
def test_golden_values_within_1e4_relative(shared):
    worst = {}
    for e in _golden(shared):
        a = load_gray(shared("data", e["A"]))
        b = load_gray(shared("data", e["B"]))
        f = np.round((a + b) / 2) if e["rule"] == "mean" else np.maximum(a, b)
        got = M.score(f, a, b, metrics=GOLDEN_NAMES)
        assert set(e["metrics"]) == set(GOLDEN_NAMES)
        for name, want in e["metrics"].items():
            rel = abs(got[name] - want) / abs(want)
            worst[name] = max(worst.get(name, 0.0), rel)
            assert rel <= 1e-4, f"{e['A']} {e['rule']} {name}: got {got[name]}, golden {want}"
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
        M.score((a + b) / 2, a, b, metrics=["PSNR"])  # one scale: no warning


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
