"""An unregistered moving image that misses the fixed grid is refused; one that barely meets it is warned about.

Found by a CLI probe: ``medfuse fuse a.nii.gz far.nii.gz --method max`` (the moving image 5 km away) wrote "the
fused image", which was the fixed image alone, with no word; ``register`` refuses the same pair.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from medfuse import Volume
from medfuse.errors import GeometryError, MedfuseWarning
from medfuse.pipeline import Pipeline


def _vol(shape=(24, 24, 24), origin=(0.0, 0.0, 0.0), spacing=2.0, seed=0) -> Volume:
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = origin
    return Volume(np.random.default_rng(seed).random(shape).astype(np.float32), aff, modality="MR")


def test_a_moving_image_outside_the_fixed_field_of_view_is_refused():
    with pytest.raises(GeometryError, match="input 2 lies wholly outside") as ei:
        Pipeline(method="max").run([_vol(), _vol(origin=(5000.0, 0, 0), seed=1)])
    assert "register" in ei.value.fix


def test_a_moving_image_that_covers_a_sliver_is_warned_about_in_the_sidecar_too():
    thin = _vol(shape=(24, 24, 1), seed=1)  # one 2 mm slice of a 48 mm box: 4 %
    with pytest.warns(MedfuseWarning, match=r"input 2 covers only 4% of the fixed image's field of view"):
        res = Pipeline(method="max").run([_vol(), thin])
    assert any("covers only 4%" in w for w in res.provenance["warnings"])
    # What to do, said (the warning named nothing; a swapped FIXED/MOVING looked like a finished fusion).
    assert any("FIXED first" in w and "--register rigid" in w for w in res.provenance["warnings"])


def test_a_coverage_under_one_percent_is_not_shown_as_zero():
    """A corner of a few voxels read "covers only 0%", though nothing that covers 0 % gets this far."""
    corner = _vol(shape=(4, 4, 4), origin=(-6.0, -6.0, -6.0), seed=1)  # 2 mm of 8 mm in each axis: 1/13824
    with pytest.warns(MedfuseWarning, match=r"input 2 covers only 0\.0072% of the fixed image's field of view"):
        Pipeline(method="max").run([_vol(), corner])


def test_overlapping_images_on_other_grids_are_fused_without_a_word():
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        res = Pipeline(method="max").run([_vol(), _vol(origin=(10.0, -6.0, 3.0), spacing=2.5, seed=1)])
    assert res.fused.shape == (24, 24, 24)
    assert not any("covers only" in w for w in res.provenance.get("warnings", []))


def test_a_registered_moving_image_is_not_judged_by_its_scanner_coordinates():
    """After registration the transform places it; the world boxes say nothing then."""
    from medfuse.pipeline import PipelineState, ResampleStep
    from medfuse.registration import Transform

    far = _vol(origin=(5000.0, 0, 0), seed=1)
    state = PipelineState(inputs=[], output=None, overwrite=False, progress=None, cancel=None)
    state.volumes = [_vol(), far]
    state.transforms = [Transform.from_matrix(np.array([[1, 0, 0, 5000.0], [0, 1, 0, 0], [0, 0, 1, 0],
                                                        [0, 0, 0, 1]]))]
    out = ResampleStep()(state)
    np.testing.assert_allclose(out.volumes[1].array, far.array, atol=1e-5)


def test_coverage_follows_a_linear_transform_and_refuses_wrong_types():
    from medfuse.errors import InvalidInputError
    from medfuse.registration import Transform, coverage

    fixed, far = _vol(), _vol(origin=(5000.0, 0, 0), seed=1)
    assert coverage(far, fixed) == 0.0
    assert coverage(_vol(origin=(24.0, 0, 0)), fixed) == pytest.approx(0.5)  # half of the 48 mm box along x
    back = Transform.from_matrix(np.array([[1, 0, 0, 5000.0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1]]))
    assert coverage(far, fixed, transform=back) == pytest.approx(1.0)
    with pytest.raises(InvalidInputError):
        coverage(far.array, fixed)


def test_the_monai_transforms_that_resample_refuse_and_warn_as_the_pipeline_does():
    """RegisterToReferenced(kind=None) and FuseModalitiesd(resample=True) resampled an image 1 m away to background
    alone, and the classifier's "fused" item was the reference only, with no word; fuse_files refused the pair."""
    pytest.importorskip("monai")
    from medfuse.transforms import FuseModalities, FuseModalitiesd, RegisterToReference, RegisterToReferenced

    ref, far, near = _vol(), _vol(origin=(1000.0, 0, 0), seed=1), _vol(origin=(43.0, 0, 0), seed=2)
    refusals = (
        (lambda m: RegisterToReferenced(keys=["t2"], reference_key="t1", kind=None)({"t1": ref, "t2": m}),
         "'t2' lies wholly outside the field of view of 't1'"),
        (lambda m: FuseModalitiesd(keys=["t1", "t2"], method="max", resample=True, as_tensor=False)(
            {"t1": ref, "t2": m}), "'t2' lies wholly outside the field of view of 't1'"),
        (lambda m: RegisterToReference(kind=None)(m, ref),
         "the moving image lies wholly outside the field of view of the reference"),
        (lambda m: FuseModalities(method="max", resample=True, as_tensor=False)([ref, m]),
         "image 2 lies wholly outside the field of view of image 1"),
    )
    for call, words in refusals:
        with pytest.raises(GeometryError, match=words) as ei:
            call(far)
        assert "initialise='geometry'" in ei.value.fix
        with pytest.warns(MedfuseWarning, match=r"covers only 10% of the field of view"):
            call(near)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a pair on one grid, or overlapping well, says nothing
        FuseModalitiesd(keys=["t1", "t2"], method="max", resample=True, as_tensor=False)(
            {"t1": ref, "t2": _vol(origin=(4.0, 0, 0), seed=3)})
