"""A label map or mask given to medfuse.fuse where an image belongs is warned of (it was fused without a word)."""

import warnings

import numpy as np
import pytest

import medfuse
from medfuse.errors import MedfuseWarning


def _image(seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = np.linspace(0, 3, 24)
    return (np.sin(x)[:, None, None] * np.cos(x)[None, :, None] * np.ones(20)[None, None, :] * 500 + 600
            + rng.normal(0, 5, (24, 24, 20))).astype(np.float32)


@pytest.mark.parametrize("dtype", [np.uint8, np.int16, bool])
def test_a_label_map_beside_an_image_is_warned_of_and_recorded(dtype):
    mr = medfuse.Volume(_image(), np.eye(4), modality="MR")
    labels = np.zeros(mr.shape, dtype)
    labels[5:15, 5:15, 5:15] = 1
    if dtype is not bool:
        labels[8:12, 8:12, 8:12] = 4
    with pytest.warns(MedfuseWarning, match="volume 2 looks like a label map or mask") as rec:
        fused = medfuse.fuse(mr, medfuse.Volume(labels, np.eye(4)), method="max")
    assert "intended image" in str(rec[0].message)
    assert any("label map" in w for w in fused.provenance["warnings"])


def test_integer_images_are_not_taken_for_label_maps():
    """An integer MR (a modality is named), and an integer image of unknown modality with hundreds of values."""
    mr = medfuse.Volume(_image().astype(np.int16), np.eye(4), modality="MR")
    plain = medfuse.Volume(_image(1).astype(np.uint16), np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        fused = medfuse.fuse(mr, plain, method="mean")
    assert not fused.provenance.get("warnings")


def test_low_count_images_and_2d_images_with_few_levels_are_not_taken_for_label_maps():
    """Integer counts of a low-count SPECT in a NIfTI (modality unknown, a few dozen values, noisy neighbours),
    and one-slice images with few grey levels, were warned of as label maps."""
    rng = np.random.default_rng(2)
    counts = medfuse.Volume(rng.poisson(np.full((24, 24, 20), 3.0)).astype(np.int16), np.eye(4))
    mr = medfuse.Volume(_image(), np.eye(4), modality="MR")
    flat = medfuse.Volume((rng.random((32, 32, 1)) * 40).astype(np.uint8), np.eye(4))
    flat_mr = medfuse.Volume(rng.random((32, 32, 1)).astype(np.float32), np.eye(4))
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.fuse(mr, counts, method="max")
        medfuse.fuse(flat_mr, flat, method="max")


def test_flat_regions_are_judged_outside_the_commonest_value_not_outside_zero():
    """A CT masked to -1024 outside the body counted its air as flat (0.70 of pairs equal): napari showed it as a
    label map, by nearest neighbour (review)."""
    from medfuse.registration.resample import piecewise_constant

    rng = np.random.default_rng(4)
    ct = np.full((30, 30, 24), -1024, np.int16)
    ct[8:22, 8:22, 6:18] = rng.normal(40, 15, (14, 14, 12)).astype(np.int16)  # soft tissue, noisy
    assert not piecewise_constant(ct)
    labels = np.full((30, 30, 24), 255, np.uint8)  # a background that is not 0
    labels[5:15, 5:20, 4:20], labels[15:25, 10:25, 8:16] = 1, 2
    assert piecewise_constant(labels)
