"""Constant images: no metric gives NaN or inf without saying so, and means leave such values out, counted.

Before, VIF with a constant source, Qabf without edges and PSNR of a fused image equal to every source came back
as NaN/inf with no word, and a slice-wise PSNR mean became +inf from one such slice.
"""

import math
import warnings

import numpy as np
import pytest

from medfuse import metrics as M
from medfuse.errors import MedfuseWarning
from medfuse.metrics import UndefinedMetricWarning

RNG = np.random.default_rng(7)
A = np.round(RNG.uniform(0, 255, (64, 64)))
B = np.round(RNG.uniform(0, 255, (64, 64)))


def _score(f, *srcs, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        s = M.score(f, *srcs, **kw)
    return s, [w for w in caught if issubclass(w.category, MedfuseWarning)]


def _nonfinite(s):
    return {k for k in M.METRICS if k in s and not math.isfinite(s[k])}


@pytest.mark.parametrize("level", [0.0, 100.0])
def test_constant_source_vif_is_nan_and_said_once(level):
    blank = np.full_like(A, level)
    s, caught = _score(np.round((A + blank) / 2), A, blank)
    assert _nonfinite(s) == {"VIF"}  # every other metric is a number
    assert len(caught) == 1 and issubclass(caught[0].category, UndefinedMetricWarning)
    assert "VIF" in str(caught[0].message) and "source 2 is constant" in str(caught[0].message)


def test_vif_alone_warns_for_a_constant_source_and_a_small_image():
    with pytest.warns(UndefinedMetricWarning, match="source 1 is constant"):
        assert math.isnan(M.vif(A, np.zeros_like(A), B))
    with pytest.warns(UndefinedMetricWarning, match="under 17 pixels"):
        assert math.isnan(M.vif(A[:12, :12], A[:12, :12], B[:12, :12]))


def test_constant_fused_image_scores_numbers_without_a_warning():
    s, caught = _score(np.full_like(A, 128.0), A, B)
    assert not _nonfinite(s) and not caught
    assert s["VIF"] == 0.0  # nothing of either source kept: the limit is well defined


def test_all_zero_images_name_every_undefined_metric_in_one_warning():
    z = np.zeros_like(A)
    s, caught = _score(z, z, z)
    assert _nonfinite(s) == {"VIF", "Qabf", "PSNR"}
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert all(k in msg for k in ("VIF", "Qabf", "PSNR")) and "no source has an edge" in msg


def test_psnr_limits_are_said():
    with pytest.warns(UndefinedMetricWarning, match="equals every source"):
        assert M.psnr(A, A, A) == math.inf
    with pytest.warns(UndefinedMetricWarning, match="all zero"):
        assert M.psnr(np.zeros_like(A), A, B) == -math.inf


def test_slicewise_means_leave_out_inf_and_nan_slices_and_count_them():
    # Slices 0..9: B equals A, so F (the mean) equals both and PSNR is +inf there; slices 10..19: B blank,
    # so VIF is NaN there. Each mean is over the other ten slices, and one warning says how many were left out.
    a = np.round(RNG.uniform(1, 255, (40, 40, 20)))
    b = np.round(RNG.uniform(1, 255, (40, 40, 20)))
    b[:, :, :10] = a[:, :, :10]
    b[:, :, 10:] = 0
    f = np.round((a + b) / 2)
    s, caught = _score(f, a, b, mode="slicewise", axes=2, metrics=["PSNR", "VIF", "SSIM"])
    assert math.isfinite(s["PSNR"]) and math.isfinite(s["VIF"])
    assert s["n_slices_used"] == {"PSNR": 10, "VIF": 10, "SSIM": 20}
    want = np.mean([M.psnr(f[:, :, k], a[:, :, k], b[:, :, k]) for k in range(10, 20)])
    assert s["PSNR"] == pytest.approx(want)
    assert len(caught) == 1
    msg = str(caught[0].message)
    assert "PSNR on 10 of 20 slices" in msg and "VIF on 10 of 20 slices" in msg


def test_sampled_slice_scores_warn_once():
    a = RNG.uniform(0, 1, (32, 32, 32))
    b = np.zeros_like(a)
    b[:, :, :16] = RNG.uniform(0, 1, (32, 32, 16))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        v = M.sampled_slice_scores((a + b) / 2, a, b, step=4, metrics=["VIF", "Qabf"])
    ours = [w for w in caught if issubclass(w.category, UndefinedMetricWarning)]
    assert np.all(np.isfinite(v)) and len(ours) == 1 and "VIF on" in str(ours[0].message)


def test_masked_metrics_on_a_flat_region_say_why():
    # Source 2 is constant wherever VIF's windows centred in the region reach, at every scale.
    b = B.copy()
    b[:60, :60] = 50.0
    m = np.zeros(A.shape, bool)
    m[16:24, 16:24] = True
    with pytest.warns(UndefinedMetricWarning, match="constant inside the mask"):
        assert math.isnan(M.vif(np.round((A + b) / 2), A, b, mask=m))
