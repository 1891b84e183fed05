"""A fixed image with thick slices gets the final full-resolution level.

The native level used to run only when the fixed image's *coarsest* voxel side was under 1.9 mm, so a 1x1x4 mm CT
was registered on 2x2x4 mm copies only: the phantom CT onto a moved 24-slice slab of itself ended 1.57 mm (mean)
/ 2.68 mm (max) off, unflagged. With the level at the finest side (the CT itself): 0.14 / 0.24 mm.
"""

from __future__ import annotations

import numpy as np
import pytest

import medfuse
from medfuse.phantom import rigid_matrix


@pytest.fixture(scope="module")
def ct(samples_dir):
    v = medfuse.load(samples_dir / "ct")
    assert v.spacing == pytest.approx((1.0, 1.0, 4.0))  # the case under test: 1 mm in plane, 4 mm slices
    return v


def _tre(transform, fixed, truth):
    """Mean and max |T(p) - M(p)| (mm) over the fixed CT's head voxels (> -200 HU, every 50th)."""
    idx = np.argwhere(fixed.array > -200)[::50]
    pts = (fixed.affine @ np.c_[idx, np.ones(len(idx))].T).T[:, :3]
    want = (truth @ np.c_[pts, np.ones(len(pts))].T).T[:, :3]
    d = np.linalg.norm(transform.transform_points(pts) - want, axis=1)
    return float(d.mean()), float(d.max())


def test_thick_slice_ct_onto_moved_slab_of_itself(ct):
    import SimpleITK as sitk

    threads = sitk.ProcessObject.GetGlobalDefaultNumberOfThreads()
    sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(1)  # bit-reproducible figures
    try:
        G = rigid_matrix((4, -6, 9), (12, -7, 15))  # fixed point -> moving point, the truth
        # A follow-up slab (slices 8..31 of 40), the whole session moved by G: the motion is written into the
        # affine, so the truth is exact and nothing is interpolated.
        shift = np.eye(4)
        shift[2, 3] = 8
        slab = medfuse.Volume(ct.array[:, :, 8:32], G @ ct.affine @ shift, modality="CT", unit="HU")
        r = medfuse.register(ct, slab, kind="rigid", seed=0)
    finally:
        sitk.ProcessObject.SetGlobalDefaultNumberOfThreads(threads)
    mean, worst = _tre(r.transform, ct, G)
    # Before the fix: 1.57 / 2.68 mm (the 2x2x4 mm level was the last). Now 0.14 / 0.24 mm.
    assert mean < 0.5, f"mean TRE {mean:.2f} mm (max {worst:.2f})"
    assert worst < 1.0, f"max TRE {worst:.2f} mm (mean {mean:.2f})"
    assert not r.report.suspect
