"""Fusion metrics within a region of interest (``mask=``): the unmasked values for an all-True mask, the pixel
statistics of the masked pixels, background padding that a mask sees through, slice-wise skipping, bad masks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import binary_erosion, gaussian_filter
from scipy.stats import entropy
from sklearn.metrics import mutual_info_score

from medfuse import Volume
from medfuse import metrics as M
from medfuse.errors import InvalidInputError
from medfuse.harvard import load_gray

PIXEL = ("EN", "SD", "MI", "SCD", "PSNR", "CC")


def _harvard(shared, kind="PET-MRI", other="PET", name="25106.png"):
    """A real pair (MRI and the functional image, grey 0..255) and its max-rule fusion."""
    root = shared("data", "harvard-pairs", kind)
    a = load_gray(root / "MRI" / name)
    b = load_gray(root / other / name)
    return np.maximum(a, b), a, b


def _volume(seed=0, shape=(20, 24, 22)):
    """A smooth 'head' of whole numbers on 0..255 in a zero background, two sources and their mean fusion."""
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.indices(shape)
    c = (np.array(shape) - 1) / 2
    head = ((zz - c[0]) / 9) ** 2 + ((yy - c[1]) / 11) ** 2 + ((xx - c[2]) / 10) ** 2 < 1
    a = np.round(np.clip(gaussian_filter(rng.uniform(0, 255, shape), 1.5) * 2 - 150, 0, 255)) * head
    b = np.round(np.clip(gaussian_filter(rng.uniform(0, 255, shape), 2.0) * 3 - 250, 0, 255)) * head
    return np.round((a + b) / 2), a, b, head


def _close(got, want, rel=1e-12):
    """Equal to float rounding (the masked code sums a gathered copy, in another order); NaN equals NaN."""
    if np.isnan(want):
        return np.isnan(got)
    return got == pytest.approx(want, rel=rel, abs=1e-12)


# ---------------------------------------------------------------------- all-True masks change nothing
@pytest.mark.shared
def test_an_all_true_mask_gives_every_metric_its_unmasked_value_on_a_real_pair(shared):
    f, a, b = _harvard(shared)
    whole = M.score(f, a, b)
    everywhere = np.ones(f.shape, dtype=bool)
    masked = M.score(f, a, b, mask=everywhere)
    assert set(masked) == set(M.METRICS)
    for name in M.METRICS:
        assert _close(masked[name], whole[name]), (name, masked[name], whole[name])
    # The public functions take the mask too (a 0/1 uint8 array is a mask), outside score.
    ones = everywhere.astype(np.uint8)
    assert _close(M.vif(f, a, b, mask=ones), whole["VIF"])
    assert _close(M.ms_ssim(f, a, b, mask=ones), whole["MS-SSIM"])
    assert _close(M.en(f, mask=ones), whole["EN"])


def test_an_all_true_mask_gives_the_unmasked_volume_scores_native_and_slicewise():
    f, a, b, _ = _volume()
    everywhere = np.ones(f.shape, dtype=bool)
    for mode in ("native", "slicewise"):
        whole = M.score(f, a, b, mode=mode)
        masked = M.score(f, a, b, mode=mode, mask=everywhere)
        names = M.NATIVE_3D_METRICS if mode == "native" else M.METRICS
        for name in names:
            assert _close(masked[name], whole[name]), (mode, name, masked[name], whole[name])
        if mode == "slicewise":
            assert masked["n_slices"] == whole["n_slices"]
    steps = dict(step=4, min_fraction=0.05, metrics=("Qabf", "VIF", "SSIM", "MS-SSIM"))
    assert np.allclose(M.sampled_slice_scores(f / 255, a / 255, b / 255, mask=everywhere, **steps),
                       M.sampled_slice_scores(f / 255, a / 255, b / 255, **steps), rtol=1e-12, equal_nan=True)


# ---------------------------------------------------------------------- pixel statistics: the masked pixels alone
def _independent(f, a, b):
    """EN, SD, MI, SCD, PSNR and CC of flat pixel lists, from scipy/scikit-learn and the README's definitions."""
    hist = np.bincount(np.clip(np.round(f), 0, 255).astype(np.uint8), minlength=256)
    return {
        "EN": entropy(hist, base=2),
        "SD": float(np.sqrt(np.mean((f - f.mean()) ** 2))),
        "MI": mutual_info_score(f, a) + mutual_info_score(f, b),
        "SCD": np.corrcoef(a, f - b)[0, 1] + np.corrcoef(b, f - a)[0, 1],
        "PSNR": 10 * np.log10(f.max() ** 2 / ((np.mean((a - f) ** 2) + np.mean((b - f) ** 2)) / 2)),
        "CC": (np.corrcoef(a, f)[0, 1] + np.corrcoef(b, f)[0, 1]) / 2,
    }


@pytest.mark.shared
def test_pixel_statistics_in_a_mask_are_those_of_the_masked_pixels(shared):
    f, a, b = _harvard(shared, "CT-MRI", "CT", "2013.png")
    yy, xx = np.mgrid[:256, :256]
    disc = (yy - 120) ** 2 + (xx - 140) ** 2 < 70 ** 2  # part brain, part background
    got = M.score(f, a, b, metrics=PIXEL, mask=disc)
    want = _independent(f[disc], a[disc], b[disc])
    whole = M.score(f, a, b, metrics=PIXEL)
    for name in PIXEL:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name
        assert abs(got[name] - whole[name]) > 1e-3 * abs(whole[name]), name  # the region is not the image


def test_native_pixel_statistics_in_a_3d_mask_are_those_of_the_masked_voxels():
    f, a, b, head = _volume(seed=1)
    got = M.score(f, a, b, mode="native", metrics=PIXEL, mask=head)
    want = _independent(f[head], a[head], b[head])
    for name in PIXEL:
        assert got[name] == pytest.approx(want[name], rel=1e-9), name


# ---------------------------------------------------------------------- a zero border, seen through a mask
@pytest.mark.shared
def test_a_mask_on_the_original_region_ignores_a_zero_border(shared):
    """Padding a real max-rule pair with 32 pixels of zeros changes the unmasked scores (measured: EN -30 %,
    SD -14 %, PSNR +16 %, SSIM +13 %, MS-SSIM +9.3 %); the mask of the original region gives the unpadded values
    back. Exactly for the pixel statistics, SF (its differences lie inside) and Qabf and FMI (their Sobel filters
    pad with zeros, as the border now does); SSIM exactly with the region less scikit-image's 3-pixel border.
    AG, VIF, SSIM, SSIM_r2 and MS-SSIM average windows centred inside that now straddle the region's edge and
    see the zeros (the unpadded image has none: one-sided differences, 'valid' filtering, a cropped border).
    Measured: AG +0.008 %, VIF +0.80 %, SSIM +0.93 %, SSIM_r2 +1.4 %, and MS-SSIM +5.4 %, whose coarsest
    scales are 16-32 pixels across, where most windows straddle the edge. Allowed: 2 %, and 8 % for MS-SSIM."""
    f, a, b = _harvard(shared)
    pad = 32  # a multiple of 16: VIF's and MS-SSIM's decimations keep the same sampling grid inside the region
    fp, ap, bp = (np.pad(x, pad) for x in (f, a, b))
    region = np.pad(np.ones(f.shape, dtype=bool), pad)
    whole = M.score(f, a, b)
    padded = M.score(fp, ap, bp)
    masked = M.score(fp, ap, bp, mask=region)
    assert padded["EN"] < whole["EN"] - 0.5 and padded["SSIM"] > whole["SSIM"] + 0.1  # the border matters
    for name in (*PIXEL, "SF", "Qabf", "FMI"):
        assert masked[name] == pytest.approx(whole[name], rel=1e-12), name
    inner = binary_erosion(region, np.ones((7, 7)))  # the centres of the 7x7 windows inside the region
    for name in ("SSIM", "SSIM_r2"):
        assert M.score(fp, ap, bp, metrics=[name], mask=inner)[name] == pytest.approx(whole[name], rel=1e-12)
    for name in ("AG", "VIF", "SSIM", "SSIM_r2", "MS-SSIM"):
        assert masked[name] == pytest.approx(whole[name], rel=0.08 if name == "MS-SSIM" else 0.02), name
        # ... and the mask gets closer than the padded image does.
        assert abs(masked[name] - whole[name]) < abs(padded[name] - whole[name]), name


@pytest.mark.shared
def test_masked_scores_do_not_see_pixels_beyond_every_windows_reach(shared):
    """A region's scores depend on the region and the neighbours its windows reach, never on pixels farther
    away: MS-SSIM's coarsest window reaches 5 x 16 + 16 = 96 pixels; the change here is 128 or more away and
    brighter than anything inside (so a maximum taken over the whole image, by PSNR or FMI, would show).
    Unchanged to float rounding."""
    f, a, b = _harvard(shared, "CT-MRI", "CT", "2013.png")
    pad = 160
    fp, ap, bp = (np.pad(x, pad) for x in (np.minimum(f, 200), a, b))
    region = np.pad(np.ones(f.shape, dtype=bool), pad)
    far = np.ones(fp.shape, dtype=bool)
    far[pad - 128:-(pad - 128), pad - 128:-(pad - 128)] = False
    changed = fp.copy()
    changed[far] = np.random.default_rng(0).integers(0, 256, int(far.sum()))
    before = M.score(fp, ap, bp, mask=region)
    after = M.score(changed, ap, bp, mask=region)
    # scipy's uniform filter (SSIM) runs sums along rows, so float rounding reaches far; SSIM_r2's near-zero
    # constants magnify it in flat windows (measured 2.4e-11 relative).
    for name in M.METRICS:
        assert after[name] == pytest.approx(before[name], rel=1e-9), name
    assert M.score(changed, ap, bp)["PSNR"] != M.score(fp, ap, bp)["PSNR"]  # the change is there to see


# ---------------------------------------------------------------------- slice-wise: each slice its own mask
def test_slicewise_uses_each_slices_mask_and_skips_slices_where_it_is_empty():
    f, a, b, _ = _volume(seed=2)
    band = np.zeros(f.shape, dtype=bool)
    band[6:14] = True  # slices 6..13 across axis 0, whole
    got = M.score(f, a, b, mode="slicewise", axes=0, mask=band)
    crop = M.score(f[6:14], a[6:14], b[6:14], mode="slicewise", axes=0)
    assert got["n_slices"] == {0: 8} == crop["n_slices"]
    for name in M.METRICS:
        assert _close(got[name], crop[name]), name
    # Even with min_content=0 (every slice counts), a slice outside the mask is skipped.
    assert M.score(f, a, b, mode="slicewise", axes=0, mask=band, min_content=0.0)["n_slices"] == {0: 8}
    # A band 5 slices thick: across axis 1 each slice's region is 5 rows, no whole 7x7 block: skipped too.
    thin = np.zeros(f.shape, dtype=bool)
    thin[6:11] = True
    assert M.score(f, a, b, mode="slicewise", axes=(0, 1), mask=thin, metrics=["SD"])["n_slices"] == {0: 5, 1: 0}
    # Across the other axes every slice crosses the band; its slice of the mask restricts it.
    other = M.score(f, a, b, mode="slicewise", axes=1, mask=band, metrics=["SD"])
    sds = [np.std(f[6:14, j, :]) for j in range(f.shape[1])
           if (((a[:, j] > 0) | (b[:, j] > 0)) & band[:, j]).mean() >= 0.01]
    assert other["n_slices"] == {1: len(sds)} and other["SD"] == pytest.approx(np.mean(sds), rel=1e-12)


def test_sampled_slice_scores_score_each_sampled_slice_within_its_mask():
    f, a, b, head = _volume(seed=5)
    half = head.copy()
    half[:, :, 11:] = False
    got = M.sampled_slice_scores(f / 255, a / 255, b / 255, step=5, min_fraction=0.05, metrics=("SSIM", "Qabf"),
                                 mask=half)
    rows, small = [], 0
    for ax in range(3):
        for i in range(0, f.shape[ax], 5):
            sl = (slice(None),) * ax + (i,)
            if ((a[sl] > 0) & half[sl]).mean() > 0.05:
                try:
                    rows.append([M.score(f[sl], a[sl], b[sl], metrics=[n], mask=half[sl])[n] for n in ("SSIM", "Qabf")])
                except InvalidInputError as e:  # skipped there too: the slice's region holds no whole 7x7 block
                    assert "no whole 7x7 block" in str(e)
                    small += 1
    assert len(rows) > 5 and small and np.allclose(got, np.mean(rows, axis=0), rtol=1e-12)
    assert not np.allclose(got, M.sampled_slice_scores(f / 255, a / 255, b / 255, step=5, min_fraction=0.05,
                                                       metrics=("SSIM", "Qabf")))


def test_a_mask_outside_the_content_leaves_no_slice_to_score():
    f, a, b, head = _volume(seed=3)
    corner = np.zeros(f.shape, dtype=bool)
    corner[:2, :2, :2] = True  # background only
    with pytest.raises(InvalidInputError, match="no slice carries content.*inside the mask"):
        M.score(f, a, b, mode="slicewise", mask=corner)


# ---------------------------------------------------------------------- bad masks
def test_bad_masks_are_refused_with_what_is_wrong_and_the_fix():
    f, a, b, head = _volume(seed=4)
    f2, a2, b2 = f[10], a[10], b[10]
    cases = [
        (dict(mask=np.ones((5, 5), bool)), "mask has shape \\(5, 5\\).*resample"),
        (dict(mask=head[10].T), "another order"),
        (dict(mask=head[10][None]), "length-1 axes"),
        (dict(mask=head[10] * 0.5), "other than 0 and 1 \\(e.g. 0.5\\).*threshold"),
        (dict(mask=np.full(f2.shape, np.nan)), "other than 0 and 1"),
        (dict(mask=np.zeros(f2.shape)), "selects no pixel"),
        (dict(mask=np.full(f2.shape, "x")), "boolean"),
        (dict(mask=Volume(head.astype(np.uint8), np.eye(4))), "Volume.*mask.array"),
    ]
    for kwargs, match in cases:
        with pytest.raises(InvalidInputError, match=match):
            M.score(f2, a2, b2, **kwargs)
    with pytest.raises(InvalidInputError, match="3-D mask.*broadcast_to"):
        M.score(f, a, b, mode="native", mask=head[10])
    # A region without one whole 7x7 block: refused for the window metrics it names, fine for pixel statistics.
    small = np.zeros(f2.shape, dtype=bool)
    small[8:14, 8:14] = True  # 6x6
    with pytest.raises(InvalidInputError, match="too small for SF, Qabf.*no whole 7x7 block"):
        M.score(f2, a2, b2, metrics=["EN", "SF", "Qabf"], mask=small)
    with pytest.raises(InvalidInputError, match="too small for VIF"):
        M.vif(f2, a2, b2, mask=small)
    assert np.isfinite(M.score(f2, a2, b2, metrics=PIXEL, mask=small)["SD"])
    cube = np.zeros(f.shape, dtype=bool)
    cube[5:11, 5:15, 5:15] = True  # 6 voxels thick: no 7x7x7 block
    with pytest.raises(InvalidInputError, match="7x7x7"):
        M.score(f, a, b, mode="native", metrics=["SSIM"], mask=cube)
