"""The fallback compares and returns like with like, per-level iteration budgets, a report that
describes a placement kept as it is, and start de-duplication on tiny images.

Misalignments are written into the moving volume's affine (a voxel at world p moves to M p), so the truth
(fixed point p -> moving point M p) is exact.
"""
import warnings

import numpy as np
import pytest

import medfuse
from medfuse.registration import Transform, register
from medfuse.registration.register import _split_initial
from medfuse.volume import Volume, affine_from_geometry

SAMPLES = __import__("pathlib").Path(__file__).resolve().parents[2] / "sample_volumes"


def _rot(a, b, c):
    a, b, c = np.radians([a, b, c])
    rx = np.array([[1, 0, 0], [0, np.cos(a), -np.sin(a)], [0, np.sin(a), np.cos(a)]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rz = np.array([[np.cos(c), -np.sin(c), 0], [np.sin(c), np.cos(c), 0], [0, 0, 1]])
    return rz @ ry @ rx


def _mat(centre, angles, shift, scale=(1.0, 1.0, 1.0)):
    m = np.eye(4)
    m[:3, :3] = _rot(*angles) @ np.diag(scale)
    m[:3, 3] = np.asarray(centre) - m[:3, :3] @ np.asarray(centre) + np.asarray(shift)
    return m


def _moved(v, m):
    return Volume(v.array, m @ v.affine, modality=v.modality, unit=v.unit)


def _tre(matrix, fixed, truth):
    a = fixed.array
    p = fixed.index_to_world(np.argwhere(a > 0.2 * a.max())[::7].astype(float))
    ph = np.c_[p, np.ones(len(p))]
    return float(np.linalg.norm((ph @ matrix.T)[:, :3] - (ph @ truth.T)[:, :3], axis=1).mean())


@pytest.fixture(scope="module")
def t1():
    from tests.conftest import shared_path

    v = medfuse.load(shared_path("data", "spm12-templates", "T1.nii"))
    return Volume(v.array.astype(np.float32), v.affine, modality="MR", unit="arbitrary")


def _blob(shape=(40, 40, 40), spacing=2.0):
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), -1).astype(float)
    c = np.asarray(shape) / 2
    r = np.linalg.norm((ijk - c) / [12, 9, 7], axis=-1)
    r2 = np.linalg.norm((ijk - c - [6, -4, 3]) / [4, 3, 5], axis=-1)
    arr = (np.exp(-r ** 2) * 100 + (r < 0.6) * 50 + (r2 < 1) * 40).astype(np.float32)
    aff = np.diag([spacing] * 3 + [1.0])
    return Volume(arr, aff, modality="MR")


def test_rigid_run_with_a_scaling_initial_transform_keeps_the_better_optimised_result(t1):
    # The fallback paired the initial transform's rigid part (what a rigid run can return) with the metric of the
    # whole initial transform (its stretch included), and returned that unoptimised rigid part: 6.4 mm off where
    # the optimised result it threw away was 4.6 mm off.
    c = t1.center
    truth = _mat(c, (20, -15, 25), (8, -6, 5), scale=(1.08, 0.95, 1.05))
    near = _mat(c, (22, -13, 23), (6, -4, 6), scale=(1.06, 0.96, 1.04))
    moving = _moved(t1, truth)
    r = register(t1, moving, kind="rigid", initial_transform=near, seed=0)
    rigid_part, _ = _split_initial(near, c)
    assert _tre(r.transform.matrix, t1, truth) < _tre(rigid_part, t1, truth) - 0.5, r.report.initialisation
    # The report describes what was returned: its metric is the returned transform's.
    rep = r.report
    assert rep.metric_after < rep.metric_before
    if "kept" in rep.initialisation:
        np.testing.assert_allclose(r.transform.matrix, rigid_part, atol=1e-6)
    # Worse than the (scaling) initial transform is flagged, and the reason says a rigid run cannot keep the scale.
    assert any("kind='affine'" in s for s in rep.suspect_reasons), rep.suspect_reasons


def test_affine_run_that_keeps_the_initial_transform_returns_all_of_it(t1):
    # An optimiser that leaps 15 mm a step ends worse than the (exact) initial transform: the initial transform is
    # then returned as it is, its scaling included (it was the rigid part alone), and the report says so.
    c = t1.center
    truth = _mat(c, (10, -5, 8), (6, -4, 3), scale=(1.06, 0.96, 1.04))
    moving = _moved(t1, truth)
    r = register(t1, moving, kind="affine", initial_transform=truth, initialise="geometry", seed=0,
                 learning_rate_mm=15.0, iterations=(1, 1), multistart_iterations=1, final_iterations=1)
    rep = r.report
    assert rep.initialisation.startswith("initial (kept the initial transform as it is"), rep.initialisation
    np.testing.assert_allclose(r.transform.matrix, truth, atol=1e-6)
    assert rep.metric_after == pytest.approx(rep.metric_initial, rel=1e-9)
    assert rep.converged and rep.iterations_per_level == [] and rep.stop_reason.startswith("no optimisation")
    assert not rep.suspect, rep.suspect_reasons


def test_each_level_runs_at_most_its_own_iteration_budget():
    a = _blob()
    moving = _moved(a, _mat(a.center, (6, -4, 5), (4, -3, 2)))
    # (multistart polish, 4 mm, 2 mm): a level with a small budget was run to the largest one.
    r = register(a, moving, seed=0, initialise="none", iterations=(3, 100), final_mm=None)
    assert r.report.iterations_per_level[1] <= 3, r.report.iterations_per_level
    r = register(a, moving, seed=0, initialise="none", iterations=(100, 2), final_mm=None)
    rep = r.report
    assert rep.iterations_per_level[-1] <= 2, rep.iterations_per_level
    # converged and the suspect reason follow the level that ran last, and agree with the stop reason.
    assert rep.converged == ("Maximum number of iterations" not in rep.stop_reason), rep.stop_reason
    assert not rep.converged and "(2)" in rep.stop_reason
    assert any("iteration limit" in s for s in rep.suspect_reasons)
    # The B-spline stage too (LBFGSB ignores a stop request: each level runs on its own).
    r = register(a, moving, seed=0, kind="deformable", bspline_levels_mm=(4.0, 2.0), bspline_iterations=(2, 6))
    b = r.report.iterations_per_level[-2:]
    assert b[0] <= 2 and b[1] <= 6 and b[1] > 2, r.report.iterations_per_level
    # Its stop reason said LBFGSB's "User requested", which reads like a cancel, for the budget it ran to.
    assert "User requested" not in r.report.stop_reason
    assert ("fixed budget of 6 iterations" in r.report.stop_reason) == (b[1] == 6), (b, r.report.stop_reason)


def test_a_placement_kept_as_it_is_is_what_the_report_describes():
    # The sample CT on the MR of its own frame with 5 iterations a level: the optimised result scores worse than
    # the scanners' placement, which is returned. The report described the discarded optimisation (its iteration
    # limit, as a suspect reason too).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mr = medfuse.load(SAMPLES / "mr_t1.nii.gz")
        ct = medfuse.load(SAMPLES / "ct")
        r = register(ct, mr, kind="rigid", seed=0, iterations=(5, 5))
    rep = r.report
    assert rep.initialisation.startswith("world (kept the scanners' placement as it is"), rep.initialisation
    np.testing.assert_allclose(r.transform.matrix, np.eye(4), atol=1e-9)
    assert rep.iterations_per_level == [] and rep.converged
    assert rep.stop_reason.startswith("no optimisation") and "discarded" in rep.stop_reason
    assert not any("iteration limit" in s for s in rep.suspect_reasons), rep.suspect_reasons


def test_tiny_image_keeps_its_distinct_starts(t1):
    # A 6 mm image (1 mm voxels): the geometry and moments starts, 0.3 mm from the world start, were merged into it
    # by a fixed 0.5 mm tolerance, and the world start's multi-start alone ended turned 64 degrees (truth 7.1).
    from scipy.ndimage import zoom

    n = 6
    arr = zoom(t1.array[10:80, 15:95, 10:80], np.array([n] * 3) / np.array([70, 80, 70]), order=1)
    aff = affine_from_geometry([1.0] * 3, -np.array([n] * 3) / 2, np.eye(3))
    fixed = Volume(arr.astype(np.float32), aff, modality="MR")
    truth = _mat(fixed.center, (5, -4, 3), 0.3 * np.array([1, -1, 0.5]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        r = register(fixed, _moved(Volume(arr.astype(np.float32).copy(), aff, modality="MR"), truth), seed=0)
    want = np.degrees(np.arccos((np.trace(truth[:3, :3]) - 1) / 2))
    assert abs(r.report.rotation_deg - want) < 3 or r.report.suspect, (r.report.rotation_deg, want)
    assert abs(r.report.rotation_deg - want) < 3, r.report.to_dict()
    assert isinstance(r.transform, Transform)
