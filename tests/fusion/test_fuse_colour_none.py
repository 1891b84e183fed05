"""medfuse.fuse: a grey image given with normalise="none" beside a colour one is on the colour image's scale."""
import numpy as np
import pytest

import medfuse


def _colour_pair(seed=0):
    rng = np.random.default_rng(seed)
    rgb = rng.integers(0, 256, (32, 32, 3)).astype(np.uint8)
    grey = np.round(rgb @ np.array([0.299, 0.587, 0.114])).astype(np.uint8)  # the colour image's own luma
    return grey, rgb


@pytest.mark.parametrize("normalise", ["none", ["none", None]])
def test_grey_image_with_normalise_none_is_on_the_colour_images_scale(normalise):
    """'none' took the 8-bit grey values as 0..1, multiplied them by 255 and clipped: the MRI came out white
    (mean luma 158 for 63 in)."""
    grey, rgb = _colour_pair()
    out = medfuse.fuse(grey, rgb, method="mean", normalise=normalise)
    # The grey image is the colour image's luma, so the mean of the two lumas is that luma again.
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, medfuse.fuse(grey, rgb, method="mean", normalise="auto"))
    luma = out.astype(float) @ np.array([0.299, 0.587, 0.114])
    assert abs(luma.mean() - grey.mean()) < 1.0


def test_grey_image_on_0_to_1_with_normalise_none_stays_on_0_to_1():
    """The documented case of 'none' (images already on 0..1) beside an 8-bit colour image: a first fix for the
    8-bit grey case divided it by 255 too, and the fusion came out black."""
    rng = np.random.default_rng(0)
    grey = rng.random((64, 64))
    rgb = np.zeros((64, 64, 3), np.uint8)
    rgb[20:40, 20:40, 0] = 200
    out = medfuse.fuse(grey, rgb, method="mean", normalise="none")
    # Where the colour image is black, the mean is half the grey image, on the colour's 0..255.
    np.testing.assert_allclose(out[:15, :15, 0], grey[:15, :15] * 255 / 2, atol=1.0)
