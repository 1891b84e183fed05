"""register(): cancel in the B-spline stage, bounded B-spline warps, scale-aware defaults for small/fine images.

Misalignments are written into the moving volume's affine (a voxel at world p moves to M p), so the truth
(fixed point p -> moving point M p) is exact and nothing is interpolated.
"""

import time

import numpy as np
import pytest

from medfuse.errors import CancelledError
from medfuse.phantom import rigid_matrix
from medfuse.progress import CancelToken
from medfuse.registration import register
from medfuse.volume import Volume


@pytest.fixture(scope="module")
def spm():
    from medfuse.io import load
    from tests.conftest import shared_path

    d = shared_path("data", "spm12-templates")
    return {n: load(d / f"{n}.nii", modality="MR") for n in ("T1", "T2")}


def _shifted(v, shift):
    M = np.eye(4)
    M[:3, 3] = shift
    return Volume(v.array, M @ v.affine, modality=v.modality), M


@pytest.mark.slow
def test_cancel_during_the_bspline_stage_stops_it_at_once(spm):
    """LBFGSB ignores StopRegistration: a cancel there used to let both B-spline levels run to the end."""
    moving, _ = _shifted(spm["T1"], (3, -2, 4))
    opts = dict(kind="deformable", initialise="none", bspline_iterations=(6, 6), bspline_samples=6000)

    # The uncancelled stage's duration, on the same pair and settings.
    stamps = []
    register(spm["T1"], moving, progress=lambda f, m: stamps.append((time.perf_counter(), m)), **opts)
    t_stage = [t for t, m in stamps if m.startswith("deformable")]
    stage = stamps[-1][0] - t_stage[0]

    token = CancelToken()
    seen = {"after": []}

    def progress(f, m):
        if "t" in seen:
            seen["after"].append(m)
        elif m.startswith("deformable: level 1/2, iteration 2"):
            seen["t"] = time.perf_counter()
            token.cancel()

    with pytest.raises(CancelledError):
        register(spm["T1"], moving, progress=progress, cancel=token, **opts)
    took = time.perf_counter() - seen["t"]
    assert seen["after"] == [], seen["after"][:5]  # no progress once cancelled
    assert took < 0.25 * stage, (took, stage)


def _bspline_of(transform):
    comp = transform.sitk
    import SimpleITK as sitk

    comp = sitk.CompositeTransform(comp)
    for i in range(comp.GetNumberOfTransforms()):
        t = comp.GetNthTransform(i)
        if "BSpline" in t.GetName():
            return np.asarray(t.GetParameters())
    raise AssertionError("no B-spline in the deformable result")


@pytest.mark.slow
def test_deformable_does_not_invent_a_warp_under_a_pure_shift_of_another_contrast(spm):
    """SPM12 T2 shifted 4/-3/2 mm onto T1: the unconstrained B-spline stage moved head points 4.5 mm on average
    (11.6 mm at most; the linear part: 1.3 / 3.2 mm), unflagged."""
    t1 = spm["T1"]
    moving, M = _shifted(spm["T2"], (4, -3, 2))
    pts = t1.index_to_world(np.argwhere(t1.array > 0.2)[::200])
    want = pts + M[:3, 3]

    def err(t):
        return np.linalg.norm(t.transform_points(pts) - want, axis=1)

    from medfuse.pipeline import _itk_threads

    with _itk_threads(1):  # the same fit every run (ITK's multi-threaded sums vary in the last digits)
        r = register(t1, moving, kind="deformable", seed=1)
    e_lin, e_full = err(r.linear_transform), err(r.transform)
    rep = r.report
    assert e_full.mean() <= e_lin.mean() + 0.3, (e_lin.mean(), e_full.mean(), r.report.to_dict())
    assert e_full.max() <= e_lin.max() + 1.0, (e_lin.max(), e_full.max(), r.report.to_dict())
    # This fit's warp is dropped (2.7 mm on average, up to 6.9 mm, for a few per cent of similarity). The result
    # is then the affine part itself: it was that part composed with an all-zero B-spline grid, which could not
    # be inverted, read as a matrix or saved as .mat.
    assert rep.bspline_kept is False and "B-spline stage dropped" in rep.stop_reason, rep.to_dict()
    assert r.transform.is_linear, r.transform
    np.testing.assert_allclose(r.transform.matrix, r.linear_transform.matrix, atol=1e-9)
    np.testing.assert_allclose(r.transform.inverse().transform_points(r.transform.transform_points(pts)), pts,
                               atol=1e-6)


@pytest.mark.slow
def test_bspline_coefficients_stay_within_bspline_max_displacement_mm(spm):
    t1 = spm["T1"]
    moving, _ = _shifted(spm["T2"], (4, -3, 2))
    r = register(t1, moving, kind="deformable", seed=1, initialise="none", bspline_iterations=(8, 8),
                 bspline_samples=8000, bspline_max_displacement_mm=1.5)
    coef = _bspline_of(r.transform)
    assert np.abs(coef).max() > 0.5  # the warp is kept (under the 2 mm of the gain check) and does something
    assert np.abs(coef).max() <= 1.5 + 1e-6
    assert r.report.bspline_displacement_max_mm <= 1.5 * 3 ** 0.5 * 1.01  # bounded per axis


def test_small_field_of_view_fine_voxels_registers_to_a_fraction_of_a_voxel(spm):
    """SPM12 T1/T2 scaled by 1/8: a 23 x 27 x 23 mm "mouse brain" with 0.25 mm voxels. The human-sized defaults
    (8 mm start search, 6/4/2 mm pyramid) left its corners 1.3-1.7 mm (~6 voxels) off, unflagged."""
    S = np.diag([0.125, 0.125, 0.125, 1.0])
    f = Volume(spm["T1"].array, S @ spm["T1"].affine, modality="MR")
    m0 = Volume(spm["T2"].array, S @ spm["T2"].affine, modality="MR")
    M = rigid_matrix((6, -4, 5), (0.8, -0.6, 0.5), center=f.center)
    m = Volume(m0.array, M @ m0.affine, modality="MR")
    r = register(f, m)
    corners = f.index_to_world(np.array([[i, j, k] for i in (0, f.shape[0] - 1) for j in (0, f.shape[1] - 1)
                                         for k in (0, f.shape[2] - 1)]))
    err = np.linalg.norm(r.transform.transform_points(corners) - (corners @ M[:3, :3].T + M[:3, 3]), axis=1)
    assert err.max() < 0.4, (err, r.report.to_dict())  # < 1.6 voxels at the corners
    # Human-sized images keep the presets exactly.
    from medfuse.registration.presets import get_preset
    from medfuse.registration.register import _fit_to_field_of_view

    p = get_preset(None, "MR", "MR")
    assert _fit_to_field_of_view(p, spm["T1"], spm["T2"], set()) == p


@pytest.mark.parametrize("n, spacing", [(8, 1.0), (16, 0.5), (32, 0.3)])
def test_tiny_images_register_or_say_the_scales_are_too_coarse(n, spacing):
    """These failed with SimpleITK's "m_Scales values must be > epsilon" and a useless fix."""
    from scipy.ndimage import gaussian_filter

    from medfuse.errors import RegistrationError

    x = gaussian_filter(np.random.default_rng(0).random((n, n, n)), 1.5).astype(np.float32)
    A = np.diag([spacing] * 3 + [1.0])
    f = Volume(x, A, modality="MR")
    M = rigid_matrix((4, -3, 2), (0.2 * spacing, -0.1 * spacing, 0.15 * spacing), center=f.center)
    r = register(f, Volume(x.copy(), M @ A, modality="MR"))
    c = f.index_to_world(np.array([[0, 0, 0], [n - 1] * 3, [0, n - 1, 0], [n - 1, 0, n - 1]]))
    err = np.linalg.norm(r.transform.transform_points(c) - (c @ M[:3, :3].T + M[:3, 3]), axis=1)
    assert err.max() < 0.25 * spacing, (err, r.report.to_dict())
    # Human-sized scales forced on them: a typed error that says what to do, not SimpleITK's text.
    with pytest.raises(RegistrationError, match="too coarse for these images") as ei:
        register(f, Volume(x.copy(), A, modality="MR"), levels_mm=(6.0, 4.0, 2.0), multistart_mm=8.0)
    assert "m_Scales" not in str(ei.value) and "levels_mm" in str(ei.value)


def test_resample_keeps_large_integers_and_bspline_stays_in_range():
    """int32 values above 2**24 went through float32 (16777217 -> 16777216); B-spline overshoot gave values
    below the input's minimum (SUV -0.06 beside a hot spot, HU below air)."""
    from medfuse import Volume
    from medfuse.registration import resample

    big = np.full((8, 8, 8), 2**24 + 1, dtype=np.int32)
    big[4:, :, :] = 2**25 + 3
    v = Volume(big, np.eye(4))
    out = resample(v, v, interpolation="linear")
    np.testing.assert_array_equal(out.array, big)

    step = np.zeros((24, 8, 8), dtype=np.float32)
    step[12:] = 10.0  # a sharp edge: cubic B-splines ring beside it
    pet = Volume(step, np.eye(4), modality="PT", unit="SUVbw")
    half = np.eye(4)
    half[0, 3] = 0.5  # sample between voxels, where the overshoot shows
    shifted = Volume(np.zeros((23, 8, 8), dtype=np.float32), half)
    out = resample(pet, shifted, interpolation="bspline")
    assert out.array.min() >= 0.0 and out.array.max() <= 10.0
    assert 0.0 < out.array[11, 4, 4] < 10.0  # the edge itself is still interpolated
