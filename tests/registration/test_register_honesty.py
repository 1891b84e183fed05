"""Registration reports that should not be trusted say so: images that share no information, and a metric that
assumes one modality given two."""
import warnings

import numpy as np
import pytest

import medfuse


def _smooth(seed=0, shape=(32, 32, 32)):
    from scipy.ndimage import gaussian_filter

    a = gaussian_filter(np.random.default_rng(seed).random(shape), 2)
    return ((a - a.min()) / (a.max() - a.min())).astype(np.float32)


AFFINE = np.diag([2.0, 2.0, 2.0, 1.0])


def _register(fixed, moving, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return medfuse.register(fixed, moving, **kw).report


def test_noise_as_the_moving_image_is_suspect():
    """Random noise onto an image ended turned 121 degrees, reported as fine (metric -0.0002 -> -0.0008)."""
    fixed = medfuse.Volume(_smooth(), AFFINE, modality="MR")
    noise = medfuse.Volume(np.random.default_rng(5).random((32, 32, 32)).astype(np.float32), AFFINE, modality="MR")
    rep = _register(fixed, noise)
    assert rep.suspect and any("no information" in r for r in rep.suspect_reasons), rep.suspect_reasons
    good = _register(fixed, fixed.with_array(np.roll(fixed.array, 1, axis=0)))
    assert not any("no information" in r for r in good.suspect_reasons)


@pytest.mark.parametrize("modalities, flagged", [(("MR", "PT"), True), (("CT", "MR"), True), (("MR", "MR"), False),
                                                  (("MR", "unknown"), False)])
def test_correlation_across_two_known_modalities_is_suspect(modalities, flagged):
    """MR onto PET with metric='correlation' ended 10 mm off, unflagged, although both modalities were known."""
    a = _smooth()
    fixed = medfuse.Volume(a, AFFINE, modality=modalities[0])
    moving = medfuse.Volume(np.roll(a, 1, axis=0), AFFINE, modality=modalities[1])
    rep = _register(fixed, moving, metric="correlation")
    assert any("assumes one modality" in r for r in rep.suspect_reasons) == flagged, rep.suspect_reasons
