"""The Laplacian pyramid's grid (EXPAND where REDUCE sampled), per-axis depth on volumes, and cut options said.

Until 2026-12 the pyramid's EXPAND (``scipy.ndimage.zoom``, ``grid_mode=True``) put coarse pixel k at fine 2k + 0.5
while REDUCE had sampled it at 2k: a single image still reconstructed exactly, but detail layers of different
sources no longer lined up (a ramp had detail 1.0 everywhere; a square fused with a blank image came out lopsided
and 45 grey levels from its mirror image). Volumes were reduced to the depth their shortest axis allowed (2 levels
on 40 slices instead of 4): a stack of identical slices fused differently from its slices, by up to 149.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

import medfuse
from medfuse.errors import MedfuseWarning
from medfuse.fusion import classical as C
from medfuse.fusion.classical import fuse_arrays


def _smooth(shape, seed, scale=255.0):
    """A smooth random image with structure at several scales, on 0..scale."""
    x = sum(gaussian_filter(np.random.default_rng(seed + k).random(shape), s) for k, s in enumerate((1, 3, 8)))
    return scale * (x - x.min()) / (x.max() - x.min())


def test_detail_of_a_linear_ramp_is_zero_away_from_the_border():
    """A linear image is predicted exactly by linear EXPAND on REDUCE's grid: no detail (it was 1.0 per pixel)."""
    n = 64
    yy, xx = np.mgrid[0:n, 0:n].astype(np.float64)
    for ramp in (2.0 * xx, 3.0 * yy - xx):
        detail = C._laplacian_pyramid(ramp, 1)[0]
        assert np.abs(detail[8:-8, 8:-8]).max() < 1e-9
    zz, yy, xx = np.mgrid[0:32, 0:32, 0:32].astype(np.float64)
    detail = C._laplacian_pyramid(xx + 2 * yy - zz, 1)[0]
    assert np.abs(detail[6:-6, 6:-6, 6:-6]).max() < 1e-9


def test_square_on_blank_fuses_the_same_flipped():
    """Flip the inputs, fuse, flip back: the same fusion, and a centred square keeps a symmetric profile. On a
    2^k + 1 grid REDUCE's samples are symmetric under a flip, so exactly; on an even grid (sampling the even
    pixels is not symmetric) within 5 % of the contrast (measured: 3.3 and 1.8 of 200; they were 56 and 42)."""
    for n, tol in ((129, 1e-9), (256, 0.05 * 200), (128, 0.05 * 200)):
        lo, hi = n * 3 // 8, n - n * 3 // 8
        blank = np.zeros((n, n))
        sq = blank.copy()
        sq[lo:hi, lo + 3:hi + 7] = 200.0  # off-centre
        fused = fuse_arrays([sq, blank], method="laplacian")
        for flip in ((slice(None, None, -1), slice(None)), (slice(None), slice(None, None, -1)),
                     (slice(None, None, -1), slice(None, None, -1))):
            again = fuse_arrays([sq[flip], blank], method="laplacian")[flip]
            assert np.abs(again - fused).max() <= tol, (n, flip)
        centred = blank.copy()
        centred[lo:hi, lo:hi] = 200.0
        fused = fuse_arrays([centred, blank], method="laplacian")
        row, col = fused[n // 2, lo:hi], fused[lo:hi, n // 2]  # it was 178 .. 140 .. 148 on 128
        assert np.abs(row - row[::-1]).max() <= tol and np.abs(col - col[::-1]).max() <= tol, n


@pytest.mark.parametrize("shape", [(256, 256), (17, 13), (2, 3), (97, 1), (61, 53, 37), (31, 1, 64), (7, 97, 3),
                                   (96, 80, 40)])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_single_image_reconstructs_exactly_and_keeps_its_dtype(shape, dtype):
    x = _smooth(shape, 1).astype(dtype) if min(shape) > 1 else np.random.default_rng(0).random(shape).astype(dtype)
    for levels in (1, 3, 6):
        pyr = C._laplacian_pyramid(x, levels)
        assert all(p.dtype == dtype for p in pyr)  # float32 stays float32: no float64 copies of a volume
        back = C._collapse(pyr)
        assert back.dtype == dtype and back.shape == x.shape
        np.testing.assert_allclose(back, x, rtol=0, atol=(1e-4 if dtype == np.float32 else 1e-10) * 255)
    if min(shape) >= 2:
        np.testing.assert_allclose(fuse_arrays([x, x], method="laplacian"), x, rtol=0, atol=1e-4 * 255)


def test_each_axis_is_reduced_until_it_would_go_under_8_pixels():
    """A volume of 40 slices gets the 4 levels a 256x256 image gets: its z axis stops at 10, the others go on."""
    pyr = C._laplacian_pyramid(np.zeros((256, 256, 40), np.float32), 4)
    assert [p.shape for p in pyr] == [(256, 256, 40), (128, 128, 20), (64, 64, 10), (32, 32, 10), (16, 16, 10)]
    assert C._max_levels((256, 256, 40)) == C._max_levels((256, 256)) == 5
    assert C._max_levels((256, 40)) == 5 and C._max_levels((12, 12)) == 0


@pytest.mark.parametrize("method", ["laplacian", "gff"])
@pytest.mark.parametrize("depth,axis", [(40, 2), (12, 2), (20, 0)])
def test_a_stack_of_identical_slices_fuses_like_its_slice(method, depth, axis):
    """Per-axis depth (Laplacian) and per-axis box radius (gff): what a 2-D image gets, every slice of a stack of
    it gets, to float rounding (it differed by up to 109-149 grey levels in every slice)."""
    a, b = _smooth((128, 128), 2), _smooth((128, 128), 7)
    a[40:70, 50:90] = 250.0  # an edge that the coarse levels carry
    flat = fuse_arrays([a, b], method=method)
    stack = [np.repeat(np.expand_dims(x, axis), depth, axis=axis) for x in (a, b)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)  # the defaults are cut silently
        vol = fuse_arrays(stack, method=method)
    assert np.abs(vol - np.expand_dims(flat, axis)).max() < 1e-8


def _caught(fn):
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        out = fn()
    return out, [w for w in got if issubclass(w.category, MedfuseWarning)]


def test_levels_above_what_the_image_allows_are_cut_with_one_warning():
    a, b, c = (_smooth((256, 256), s) for s in (1, 2, 3))
    cut, said = _caught(lambda: fuse_arrays([a, b, c], method="laplacian", levels=50))
    assert len(said) == 1  # once per call, not per input
    msg = str(said[0].message)
    assert "levels=50" in msg and "5 used" in msg and "256 pixels" in msg
    assert said[0].filename == __file__  # points at the caller of fuse_arrays
    _, said = _caught(lambda: medfuse.fuse(a, b, method="laplacian", levels=50))
    assert len(said) == 1 and said[0].filename == __file__  # and at medfuse.fuse's caller (was medfuse's own line)
    five, none = _caught(lambda: fuse_arrays([a, b, c], method="laplacian", levels=5))
    assert not none and np.array_equal(cut, five)
    # The default (4) on a small image is cut silently: it was not asked for.
    assert not _caught(lambda: fuse_arrays([a[:40, :40], b[:40, :40]], method="laplacian"))[1]
    tiny, said = _caught(lambda: fuse_arrays([a[:10, :10], b[:10, :10]], method="laplacian", levels=2))
    assert len(said) == 1 and "1 used" in str(said[0].message)


def test_wavelet_levels_and_gff_radii_that_are_cut_say_so():
    vol = [_smooth((64, 64, 20), s) for s in (1, 2)]
    _, said = _caught(lambda: fuse_arrays(vol, method="wavelet", levels=9))
    assert len(said) == 1 and "levels=9" in str(said[0].message) and "20 pixels" in str(said[0].message)
    assert not _caught(lambda: fuse_arrays(vol, method="wavelet"))[1]
    _, said = _caught(lambda: fuse_arrays(vol, method="gff", r1=30, r2=3))
    assert len(said) == 1  # r1 is cut along z (9), r2 fits every axis
    assert "r1=30" in str(said[0].message) and "9 along axis 2" in str(said[0].message)
    assert not _caught(lambda: fuse_arrays(vol, method="gff"))[1]
