"""medfuse.fuse: a grey image given with normalise="none" beside a colour one, and the frame of reference a fused
Volume carries."""
import warnings

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


def _vol(frame, modality="MR", seed=0):
    rng = np.random.default_rng(seed)
    return medfuse.Volume(rng.random((12, 12, 12)).astype(np.float32), np.eye(4), modality=modality,
                          provenance={"frame_of_reference_uid": frame})


def test_fused_volume_keeps_its_reference_frame_so_a_foreign_image_is_still_warned_about():
    a, b, other = _vol("1.2.3"), _vol("1.2.3", seed=1), _vol("9.9.9", "PT", seed=2)
    fused = medfuse.fuse(a, b, method="mean")
    assert fused.provenance["frame_of_reference_uid"] == "1.2.3"
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        medfuse.resample(other, fused)
    assert any("frame" in str(w.message) for w in seen), [str(w.message) for w in seen]


def test_a_volume_without_a_frame_gives_a_fused_volume_without_one():
    a, b = _vol(None), _vol(None, seed=1)
    assert "frame_of_reference_uid" not in medfuse.fuse(a, b, method="mean").provenance
