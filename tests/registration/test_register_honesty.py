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


def test_a_label_map_registered_gets_advice_register_can_follow(tmp_path, capsys):
    """The warning said "pass interpolation='nearest'", which register() and `medfuse register` refuse."""
    from medfuse.cli import main

    fixed = medfuse.Volume(_smooth(), AFFINE, modality="MR")
    labels = medfuse.Volume((_smooth(1) * 3).round().astype(np.uint8) * 2, AFFINE)  # labels 0, 2, 4, 6
    with pytest.warns(medfuse.MedfuseWarning, match="moving image looks like a label map") as seen:
        result = medfuse.register(fixed, labels)
    text = " ".join(str(w.message) for w in seen if "label map" in str(w.message))
    assert any("label map" in w for w in result.resampled.provenance["warnings"])  # the sidecar keeps it too
    assert "transform=result.transform, interpolation='nearest'" in text and "pass interpolation=" not in text
    medfuse.save(fixed, tmp_path / "f.nii.gz")
    medfuse.save(labels, tmp_path / "l.nii.gz")
    assert main(["register", str(tmp_path / "f.nii.gz"), str(tmp_path / "l.nii.gz"), "-o",
                 str(tmp_path / "out.nii.gz")]) == 0
    err = capsys.readouterr().err
    assert "label map" in err and "--transform T.tfm" in err and "result.transform" not in err


def test_voxels_beyond_float32_are_refused_before_registering():
    """1e39 became inf in registration's float32 images: the initialiser never returned, and Ctrl-C could not stop
    it. nan_to_num's advice for inf now sets posinf/neginf (its default gives 1.8e308, the same trap)."""
    fixed = medfuse.Volume(_smooth().astype(np.float64), AFFINE, modality="MR")
    big = fixed.array.copy()
    big[5, 6, 7] = 1e39
    with pytest.raises(medfuse.InvalidInputError, match="beyond float32's range") as e:
        medfuse.register(fixed, fixed.with_array(big))
    assert "numpy.clip" in e.value.fix
    inf = fixed.array.copy()
    inf[5, 6, 7] = np.inf
    with pytest.raises(medfuse.InvalidInputError, match="NaN or infinite") as e:
        medfuse.register(fixed, fixed.with_array(inf))
    assert "posinf=0.0, neginf=0.0" in e.value.fix


def test_fields_of_view_that_barely_overlap_as_placed_are_suspect_once_brought_together():
    """A moving image placed 60 of 64 mm to the side (one sliver of overlap) passed the disjoint check, was
    centre-aligned by initialise='auto' and reported as fine: the case the disjoint refusal exists for."""
    fixed = medfuse.Volume(_smooth(), AFFINE, modality="MR")
    aside = AFFINE.copy()
    aside[0, 3] += 60.0
    rep = _register(fixed, medfuse.Volume(fixed.array.copy(), aside, modality="MR"))
    assert rep.suspect and any("overlapped by only 6%" in r for r in rep.suspect_reasons), rep.suspect_reasons
    # Placed where they belong: not flagged; told to expect it (initialise='geometry'): not flagged either.
    assert not any("overlapped by only" in r for r in _register(fixed, fixed).suspect_reasons)
    moved = medfuse.Volume(fixed.array.copy(), aside, modality="MR")
    assert not any("overlapped by only" in r for r in _register(fixed, moved, initialise="geometry").suspect_reasons)
