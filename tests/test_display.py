"""Tests of the GUI-free display defaults (window presets, per-modality settings, percentile limits)."""

from __future__ import annotations

import numpy as np
import pytest

from medfuse import Volume, display
from medfuse.errors import InvalidInputError


@pytest.mark.parametrize("name,limits", [
    ("brain", (0, 80)), ("subdural", (-25, 175)), ("soft_tissue", (-160, 240)),
    ("lung", (-1350, 150)), ("bone", (-700, 1300)),
])
def test_ct_presets_to_limits(name, limits):
    assert display.window_to_limits(*display.CT_WINDOWS[name]) == limits
    assert display.limits_to_window(*limits) == display.CT_WINDOWS[name]


def test_window_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        display.window_to_limits(0, 40)
    with pytest.raises(InvalidInputError):
        display.window_to_limits(float("nan"), 40)
    with pytest.raises(InvalidInputError):
        display.limits_to_window(5, 5)


def test_percentile_limits():
    a = np.zeros((10, 10, 10), dtype=np.float32)
    a[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    lo, hi = display.percentile_limits(a, low=0, high=100)
    assert (lo, hi) == (1.0, 100.0)  # zeros (background) ignored
    lo0, _ = display.percentile_limits(a, low=0, high=100, ignore_zeros=False)
    assert lo0 == 0.0
    a[0, 0, 0] = np.nan
    assert display.percentile_limits(a, low=0, high=100) == (1.0, 100.0)
    assert display.percentile_limits(np.full((3, 3, 3), 7.0)) == (7.0, 8.0)  # constant image stays usable
    with pytest.raises(InvalidInputError):
        display.percentile_limits(np.full((2, 2, 2), np.nan), ignore_zeros=False)
    with pytest.raises(InvalidInputError):
        display.percentile_limits(a, low=50, high=10)


def test_display_settings_per_modality():
    aff = np.eye(4)
    arr = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    ct = display.display_settings(Volume(arr, aff, modality="CT", unit="HU"))
    assert ct.colormap == "gray" and ct.contrast_limits == (0.0, 80.0)
    bone = display.display_settings(Volume(arr, aff, modality="CT", unit="HU"), window="bone")
    assert bone.contrast_limits == (-700.0, 1300.0)
    pet = display.display_settings(Volume(arr, aff, modality="PT", unit="SUVbw"), overlay=True)
    assert pet.colormap == "inferno" and pet.contrast_limits == (0.0, 6.0) and pet.blending == "additive"
    spect = display.display_settings(Volume(arr, aff, modality="NM", unit="counts"))
    assert spect.colormap == "hot" and spect.contrast_limits[1] <= 63
    mr = display.display_settings(Volume(arr, aff, modality="MR"))
    assert mr.colormap == "gray" and mr.blending == "translucent"
    assert set(mr.as_kwargs()) == {"colormap", "contrast_limits", "blending", "opacity"}
    with pytest.raises(InvalidInputError):
        display.display_settings(Volume(arr, aff, modality="CT", unit="HU"), window="abdomen")


def test_checkerboard_mask_alternates_tiles():
    from medfuse.display import checkerboard_mask

    mask = checkerboard_mask((2, 8, 8), tile=4)
    assert mask.shape == (2, 8, 8)
    assert mask[0, 0, 0] and not mask[0, 0, 4] and not mask[0, 4, 0] and mask[1, 4, 4]
    assert mask.mean() == 0.5


def test_curtain_mask_splits_at_position():
    from medfuse.display import curtain_mask

    mask = curtain_mask((3, 4, 10), position=0.3)
    assert mask[..., :3].all() and not mask[..., 3:].any()
    with pytest.raises(Exception, match="curtain"):
        curtain_mask((4, 4), position=1.5)


@pytest.mark.parametrize("modality,unit", [("CT", "HU"), ("CT", "arbitrary"), ("unknown", "arbitrary"), (None, None),
                                           ("MR", "HU")])
def test_ct_window_allowed(modality, unit):
    display.check_ct_window(modality, unit)


@pytest.mark.parametrize("modality,unit", [("PT", "SUVbw"), ("PT", "Bq/mL"), ("NM", "counts"), ("MR", "arbitrary"),
                                           ("unknown", "SUVbw"), (None, "counts")])
def test_ct_window_refused_outside_hu(modality, unit):
    with pytest.raises(InvalidInputError, match="HU"):
        display.check_ct_window(modality, unit)


@pytest.mark.parametrize("width,step,decimals", [(80, 1.0, 1), (1500, 100.0, 0), (0.73, 0.01, 3), (50000, 1000.0, 0),
                                                 (0.0, 1.0, 1), (float("nan"), 1.0, 1)])
def test_window_precision_keeps_three_digits(width, step, decimals):
    assert display.window_precision(width) == (pytest.approx(step), decimals)
    if np.isfinite(width) and width > 0:
        assert round(width, decimals) == pytest.approx(width, rel=0.01)  # the box shows the window it sets


def test_slider_range_covers_data_and_window():
    a = np.array([[-1000.0, 40.0], [np.nan, 2500.0]])
    assert display.slider_range(a, (0, 80)) == (-1000.0, 2500.0)
    assert display.slider_range(np.full((2, 2), 7, np.int16), (0, 80)) == (0.0, 80.0)  # the window stays inside
    assert display.slider_range(np.full((2, 2), np.nan), (0, 6)) == (0.0, 6.0)


@pytest.mark.parametrize("value", [7.0, 0.0, -3.0, 1e20, -1e20, 3e38])
def test_percentile_limits_of_constant_images_increase(value):
    # napari refuses contrast limits with high == low; 1e20 + 1 == 1e20 in floating point.
    lo, hi = display.percentile_limits(np.full((3, 3, 3), value))
    assert lo == value and hi > lo and np.isfinite(hi)
