"""The rigid restarts' stop rules: a kept restart that moves the result by less than half a voxel of its level
ends them, and the report says how many ran and why they ended.

Before: they ran while the metric improved beyond the sampling noise, whatever they moved; the report did not say
how many ran.
"""

import math

import numpy as np
import pytest
from scipy.ndimage import gaussian_filter

from medfuse.phantom import rigid_matrix
from medfuse.registration import register
from medfuse.registration.presets import get_preset
from medfuse.volume import Volume


def _pair():
    """A smooth random 24^3 volume with 4 mm voxels (96 mm: no field-of-view scaling, no native level) and a copy
    turned and shifted a little."""
    x = gaussian_filter(np.random.default_rng(0).random((24, 24, 24)), 1.5).astype(np.float32)
    A = np.diag([4.0, 4.0, 4.0, 1.0])
    f = Volume(x, A, modality="MR")
    M = rigid_matrix((3, -2, 2), (0.8, -0.4, 0.6), center=f.center)
    return f, Volume(x.copy(), M @ A, modality="MR")


def _module():
    import sys

    return sys.modules["medfuse.registration.register"]


def test_corner_distance_is_the_analytic_one():
    """A shift moves every corner by its length; a turn by t about the box's centre moves the corners at the
    half-diagonal r from the axis by 2 r sin(t / 2)."""
    import SimpleITK as sitk

    R = _module()
    img = sitk.Image(10, 20, 30, sitk.sitkFloat32)
    img.SetSpacing((2.0, 1.0, 0.5))
    # The box's edges: 20 x 20 x 15 mm, centre at index ((n - 1) / 2) = (9, 9.5, 7.25) mm.
    centre = (9.0, 9.5, 7.25)
    a = sitk.Euler3DTransform()
    a.SetCenter(centre)
    b = sitk.Euler3DTransform(a)
    b.SetTranslation((0.3, -0.4, 0.0))
    assert R._max_corner_distance(img, a, b) == pytest.approx(0.5)
    t = math.radians(2.0)
    b = sitk.Euler3DTransform(a)
    b.SetRotation(0.0, 0.0, t)  # about z: the corners lie 10 mm, 10 mm from the centre in x, y
    assert R._max_corner_distance(img, a, b) == pytest.approx(2 * math.hypot(10.0, 10.0) * math.sin(t / 2))


def test_report_says_how_many_restarts_ran_and_why_they_ended():
    """The kept restarts are the levels iterations_per_level lists beyond those of a run without restarts."""
    f, m = _pair()
    off = register(f, m, kind="rigid", restarts=0).report
    assert off.restarts_run == 0 and off.restarts_stop == "switched off (restarts=0)", off.to_dict()
    rep = register(f, m, kind="rigid").report
    assert 1 <= rep.restarts_run <= get_preset(None, "MR", "MR")["restarts"], rep.to_dict()
    dropped = "dropped" in rep.restarts_stop
    assert dropped or "settled" in rep.restarts_stop or "all" in rep.restarts_stop, rep.restarts_stop
    kept = rep.restarts_run - dropped
    assert len(rep.iterations_per_level) == len(off.iterations_per_level) + kept, (rep.to_dict(), off.to_dict())
    assert rep.to_dict()["restarts_run"] == rep.restarts_run
    # No restarts for affine runs: None, not 0.
    aff = register(f, m, kind="affine").report
    assert aff.restarts_run is None and aff.restarts_stop is None, aff.to_dict()


@pytest.fixture
def converged():
    """The pair's working images and its rigid result (with no restarts): the optimum, up to sampling noise."""
    import SimpleITK as sitk

    f, m = _pair()
    res = register(f, m, kind="rigid", restarts=0)
    # The fixed -> moving mapping as an Euler transform about the fixed image's centre.
    tx = sitk.Euler3DTransform()
    tx.SetCenter(tuple(float(c) for c in f.center))
    tx.SetMatrix(tuple(float(x) for x in res.transform.matrix[:3, :3].ravel()))
    c = np.asarray(f.center)
    tx.SetTranslation(tuple(float(x) for x in res.transform.matrix[:3, :3] @ c + res.transform.matrix[:3, 3] - c))
    return f.to_sitk(), m.to_sitk(), tx


def _run(level, tx, *, restarts, settled=None, monkeypatch=None):
    """_restarts from ``tx`` with a score that every restart improves: only the distance rule and the limit can
    end them."""
    R = _module()
    if settled is not None:
        monkeypatch.setattr(R, "_RESTART_SETTLED", settled)
    import SimpleITK as sitk

    f_img, m_img = (sitk.Cast(x, sitk.sitkFloat32) for x in level)
    scores = iter(range(0, -100, -1))
    preset = {**get_preset(None, "MR", "MR"), "restarts": restarts}
    start = sitk.Euler3DTransform(tx)
    out = R._restarts((f_img, m_img, None, None), tx, "", [], [], preset=preset, metric="mattes", seed=0,
                      evaluate=lambda t: float(next(scores)), monitor_args=(None, None, 0.0, 1.0, "rigid restart"))
    return out, start, f_img, preset


def test_a_restart_that_moves_the_result_under_half_a_voxel_ends_them(converged):
    """From the optimum a restart only jitters with its new sample set (here well under the 1 mm of half a 2 mm
    voxel): the first one, kept for its (forced) better score, ends them."""
    f_img, m_img, tx = converged
    (stop, per_level, its, run, why), start, img, preset = _run((f_img, m_img), tx, restarts=8)
    R = _module()
    moved = R._max_corner_distance(img, start, tx)
    assert run == 1 and len(per_level) == 1 and "settled" in why, why
    limit = R._RESTART_SETTLED * preset["levels_mm"][-1]
    assert moved < limit and f"{moved:.2f} mm" in why, (moved, why)


def test_without_the_distance_rule_every_restart_runs(converged, monkeypatch):
    """The same restarts with the distance rule off run to the limit: it is the rule that ended them above."""
    f_img, m_img, tx = converged
    (stop, per_level, its, run, why), *_ = _run((f_img, m_img), tx, restarts=3, settled=0.0,
                                                monkeypatch=monkeypatch)
    assert run == 3 and len(per_level) == 3 and why.startswith("all 3 ran"), why
