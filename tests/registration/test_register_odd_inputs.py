"""register() and resample() on odd inputs: values lost in float32, absurd or extremely anisotropic spacings, and a
moving image that misses the reference grid. Each gets a typed error or a warning, not a deep traceback or a silent
all-background result."""

import warnings

import numpy as np
import pytest

import medfuse
from medfuse import Volume
from medfuse.errors import GeometryError, MedfuseWarning, RegistrationError


def _blob() -> np.ndarray:
    rng = np.random.default_rng(0)
    z, y, x = np.mgrid[:24, :24, :24]
    b = (((z - 12) ** 2 / 36 + (y - 11) ** 2 / 49 + (x - 13) ** 2 / 25) < 1) * 100.0 + rng.normal(0, 1, (24,) * 3)
    b[8:12, 6:10, 10:14] += 50
    return b


AFF = np.diag([2.0, 2.0, 2.0, 1.0])


@pytest.mark.parametrize("scale, offset", [(1e-200, 0.0), (1e-3, 1e8)])
def test_register_refuses_moving_constant_in_float32(scale, offset):
    b = _blob()
    with pytest.raises(RegistrationError, match="constant at float32 precision") as e:
        medfuse.register(Volume(b, AFF), Volume(b * scale + offset, AFF))
    assert "rescale" in e.value.fix


@pytest.mark.parametrize("spacing", [(1e-160, 1.0, 1.0), (1e-160,) * 3, (1e7, 2.0, 2.0)])
def test_register_refuses_absurd_spacing(spacing):
    b = _blob()
    with pytest.raises(GeometryError, match="voxel spacing") as e:
        medfuse.register(Volume(b, AFF), Volume(b, np.diag([*spacing, 1.0])))
    assert e.value.fix


def test_register_accepts_microscopy_spacing():
    b = _blob()
    s = 1e-3
    shifted = np.diag([s, s, s, 1.0])
    shifted[:3, 3] = [s, 0, -s]  # one voxel off
    res = medfuse.register(Volume(b, np.diag([s, s, s, 1.0])), Volume(b, shifted))
    assert np.allclose(res.transform.matrix[:3, 3] / s, [1, 0, -1], atol=0.3)


def test_register_thin_axis_runs_and_is_flagged():
    # 0.24 mm along one axis: its working copies were all zero, and the start search ended in an IndexError.
    b = _blob()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MedfuseWarning)
        res = medfuse.register(Volume(b, AFF), Volume(b, np.diag([1000.0, 0.01, 1.0, 1.0])))
    assert res.report.suspect


def test_register_no_measurable_start_is_typed():
    # A 24 nm slab beside a 48 mm image: no start leaves samples inside it.
    b = _blob()
    with pytest.raises(RegistrationError, match="any starting position"):
        medfuse.register(Volume(b, AFF), Volume(b, np.diag([1e-6, 2.0, 2.0, 1.0])))


def _moved(dx: float, array=None) -> Volume:
    a = AFF.copy()
    a[0, 3] = dx
    return Volume(_blob().astype(np.float32) if array is None else array, a)


@pytest.mark.parametrize("dx", [500.0, 47.6])  # disjoint; boxes meet in a 0.4 mm sliver holding no voxel centre
@pytest.mark.parametrize("interpolation", ["linear", "nearest"])
def test_resample_warns_when_no_voxel_lands_on_the_grid(dx, interpolation):
    ref = Volume(_blob(), AFF)
    with pytest.warns(MedfuseWarning, match="holds none of the volume's voxels"):
        out = medfuse.resample(_moved(dx), ref, interpolation=interpolation)
    assert not out.array.any()
    assert any("holds none" in w for w in out.provenance["warnings"])


def test_fusing_such_a_result_does_not_say_it_again():
    """The fusion's field-of-view mask resampled the volume's grid once more, which warned again at fuse()."""
    ref = Volume(_blob(), AFF)
    with pytest.warns(MedfuseWarning, match="holds none"):
        out = medfuse.resample(_moved(500.0), ref)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        medfuse.fuse(ref, out, method="max")
    assert not [w for w in seen if "holds none" in str(w.message)], [str(w.message) for w in seen]


def test_resample_warns_for_a_mask_through_a_transform():
    from medfuse.registration.transforms import Transform

    ref = Volume(_blob(), AFF)
    m = np.eye(4)
    m[0, 3] = 500.0
    with pytest.warns(MedfuseWarning, match="through the transform"):
        medfuse.resample(Volume(_blob() > 50, AFF), ref, transform=Transform.from_matrix(m))


@pytest.mark.parametrize("array", [None, np.zeros((24, 24, 24), np.float32)])
def test_resample_overlapping_does_not_warn(array):
    # An image that is itself all background, on the grid, is not "outside" it.
    ref = Volume(_blob(), AFF)
    with warnings.catch_warnings():
        warnings.simplefilter("error", MedfuseWarning)
        medfuse.resample(_moved(3.0, array), ref)
