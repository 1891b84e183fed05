"""A deformable result's B-spline covers the whole fixed image: built on the 2 mm working copy (BinShrink drops
the last voxel of an odd size), it ended before the last slice of a 1 mm image, which got no warp at all."""

import numpy as np
import pytest

import medfuse

SimpleITK = pytest.importorskip("SimpleITK")


def _bspline(transform):
    t = transform.sitk
    if t.GetName() == "CompositeTransform":
        t = SimpleITK.CompositeTransform(t)
        t = next(t.GetNthTransform(i) for i in range(t.GetNumberOfTransforms())
                 if t.GetNthTransform(i).GetName() == "BSplineTransform")
    return SimpleITK.BSplineTransform(t)


def test_the_warp_spans_every_fixed_voxel_of_an_odd_sized_1mm_image():
    g = np.mgrid[:41, :45, :37].astype(np.float32)
    blob = 100 * np.exp(-((g[0] - 20) ** 2 + (g[1] - 22) ** 2 + (g[2] - 18) ** 2) / 150)
    fixed = medfuse.Volume(blob + 10, np.eye(4), modality="MR")
    moving = medfuse.Volume(np.roll(blob, 1, axis=2) + 10, np.eye(4), modality="MR")
    r = medfuse.register(fixed, moving, kind="deformable", bspline_min_gain_per_mm=0)
    bs = _bspline(r.transform)
    lo = np.asarray(bs.GetTransformDomainOrigin())
    hi = lo + np.asarray(bs.GetTransformDomainDirection()).reshape(3, 3) @ np.asarray(
        bs.GetTransformDomainPhysicalDimensions())
    last = fixed.index_to_world(np.asarray(fixed.shape) - 1.0)
    first = fixed.index_to_world([0.0, 0.0, 0.0])
    assert np.all(lo <= first) and np.all(last <= hi), (lo, hi, first, last)
    # ... and as wide as SimpleITK makes it for the fixed image itself.
    own = SimpleITK.BSplineTransformInitializer(fixed.to_sitk(), [1, 1, 1])
    np.testing.assert_allclose(bs.GetTransformDomainOrigin(), own.GetTransformDomainOrigin(), atol=1e-4)
    np.testing.assert_allclose(bs.GetTransformDomainPhysicalDimensions(), own.GetTransformDomainPhysicalDimensions(),
                               atol=1e-4)
