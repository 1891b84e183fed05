"""A Volume as NumPy and notebook code meets it: ``np.asarray(vol)``, ``np.mean(vol)``, ``repr(vol)``.

The reference for the array protocol is NumPy itself: a Volume must behave under ``np.asarray``/``np.array``
exactly as its own voxel array does (values, dtype, shared memory, and which calls raise).
"""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from medfuse import Volume
from medfuse.errors import InvalidInputError


def _vol(dtype=np.float32) -> Volume:
    arr = np.random.default_rng(3).normal(100.0, 20.0, (6, 7, 8)).astype(dtype)
    aff = np.diag([0.9, 0.9, 2.5, 1.0])
    aff[:3, 3] = (-10.0, 20.0, 30.0)
    return Volume(arr, aff, modality="CT", unit="HU")


def _convert(fn, x, **kw):
    """``fn(x, **kw)``, or the exception class it raises."""
    try:
        return fn(x, **kw)
    except ValueError as e:
        return type(e)


@pytest.mark.parametrize("fn, dtype, copy", list(itertools.product(
    (np.asarray, np.array), (None, np.float32, np.float64), (None, True, False))))
def test_numpy_converts_a_volume_as_it_converts_its_voxels(fn, dtype, copy):
    """Without ``__array__`` NumPy made a 0-d object array of a Volume (``np.asarray(vol).shape == ()``)."""
    vol = _vol()
    got = _convert(fn, vol, dtype=dtype, copy=copy)
    want = _convert(fn, vol.array, dtype=dtype, copy=copy)
    if isinstance(want, type):  # NumPy refuses copy=False when a copy is needed: so must the Volume
        assert isinstance(got, type) and issubclass(got, ValueError)
        return
    assert isinstance(got, np.ndarray) and type(got) is np.ndarray
    assert got.shape == vol.shape and got.dtype == want.dtype
    np.testing.assert_array_equal(got, want)
    assert np.shares_memory(got, vol.array) == np.shares_memory(want, vol.array)


def test_copy_false_with_another_dtype_says_how_to_fix_it():
    with pytest.raises(InvalidInputError, match=r"copy=False.*Fix: pass copy=None"):
        np.asarray(_vol(), dtype=np.float64, copy=False)


def test_an_edit_through_asarray_is_an_edit_of_the_volume():
    """``np.asarray`` does not copy (as for any array); ``np.array`` does."""
    vol = _vol()
    np.asarray(vol)[0, 0, 0] = -1.0
    np.array(vol)[1, 1, 1] = -2.0
    assert vol.array[0, 0, 0] == -1.0 and vol.array[1, 1, 1] != -2.0


def test_numpy_and_scipy_functions_see_the_voxels():
    """What a notebook does with a Volume: ``np.mean(vol)``, a percentile, SciPy's ndimage (which calls asarray)."""
    from scipy import ndimage

    vol = _vol(np.float64)
    assert np.mean(vol) == np.mean(vol.array)
    assert np.percentile(vol, 99) == np.percentile(vol.array, 99)
    np.testing.assert_array_equal(ndimage.gaussian_filter(vol, 1.0), ndimage.gaussian_filter(vol.array, 1.0))
    assert ndimage.center_of_mass(vol) == ndimage.center_of_mass(vol.array)
    assert (vol.ndim, vol.size) == (vol.array.ndim, vol.array.size)
    np.testing.assert_array_equal(np.stack([vol, vol]), np.stack([vol.array, vol.array]))


def test_a_volume_slab_plots_as_its_slice():
    """matplotlib's imshow takes a one-voxel slab (I, J, 1) as the 2-D slice ``vol.array[:, :, k]``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vol = _vol()
    fig, ax = plt.subplots()
    try:
        im = ax.imshow(vol[:, :, 4:5])
        np.testing.assert_array_equal(np.asarray(im.get_array()), vol.array[:, :, 4])
    finally:
        plt.close(fig)


def test_repr_shows_geometry_and_labels_but_no_identifiers():
    """A notebook prints the repr: geometry, modality, unit, dtype; never a provenance value (names in paths)."""
    vol = Volume(np.zeros((4, 5, 6), np.int16), np.diag([0.5, 0.5, 3.0, 1.0]), modality="PT", unit="SUVbw",
                 provenance={"source": "/data/DOE_JOHN/pet.nii.gz", "series_description": "PET DOE JOHN",
                             "series_uid": "1.2.840.99999.1.2.3"})
    text = repr(vol)
    for part in ("shape=(4, 5, 6)", "spacing=0.5x0.5x3 mm", "LPS", "modality=PT", "unit=SUVbw", "dtype=int16"):
        assert part in text
    for ident in ("DOE", "JOHN", "1.2.840", "/data"):
        assert ident not in text


def test_options_after_the_data_are_keyword_only():
    """``Volume(a, m, "HU")`` took "HU" as the modality (and failed on it as an unknown one)."""
    arr, aff = np.zeros((2, 2, 2)), np.eye(4)
    with pytest.raises(TypeError):
        Volume(arr, aff, "CT")  # type: ignore[misc]
    v = Volume(arr, aff, modality="CT", unit="HU")
    assert (v.modality, v.unit) == ("CT", "HU")
    for derived in (v.copy(), v[0:1], v.reorient("RAS"), v.with_array(arr + 1)):
        assert (derived.modality, derived.unit) == ("CT", "HU")


@pytest.mark.parametrize("method", ["same_grid", "grid_difference", "max_voxel_distance"])
@pytest.mark.parametrize("other", [np.zeros((6, 7, 8)), "ct.nii.gz", None, 3])
def test_grid_comparisons_name_what_they_need(method, other):
    """``vol.same_grid(array)`` failed with AttributeError: 'numpy.ndarray' object has no attribute 'shape'..."""
    with pytest.raises(InvalidInputError, match=rf"{method} compares two Volumes.*Fix: pass a medfuse\.Volume"):
        getattr(_vol(), method)(other)


def test_index_and_world_points_agree_with_nibabel_and_refuse_other_shapes():
    from nibabel.affines import apply_affine

    vol = _vol()
    ijk = np.array([[0, 0, 0], [5, 6, 7], [1.5, 2.25, 3.0]])
    np.testing.assert_allclose(vol.index_to_world(ijk), apply_affine(vol.affine, ijk), atol=1e-12)
    np.testing.assert_allclose(vol.world_to_index(apply_affine(vol.affine, ijk)), ijk, atol=1e-9)
    np.testing.assert_allclose(vol.index_to_world([1, 2, 3]), apply_affine(vol.affine, [1, 2, 3]), atol=1e-12)
    for bad in (np.zeros((3, 2)), 5, None, "1,2,3"):  # (3, 2): two points as columns
        for fn in (vol.index_to_world, vol.world_to_index):
            with pytest.raises(InvalidInputError, match="Fix: pass"):
                fn(bad)


def test_a_tensor_that_needs_grad_becomes_voxels():
    """``Volume(t, affine)`` with a tensor that requires grad failed in NumPy ("Can't call numpy()...")."""
    torch = pytest.importorskip("torch")
    t = torch.arange(24, dtype=torch.float32).reshape(2, 3, 4).requires_grad_()
    v = Volume(t, np.eye(4))
    np.testing.assert_array_equal(v.array, t.detach().numpy())
    w = v.with_array(t * 2)
    np.testing.assert_array_equal(w.array, 2 * t.detach().numpy())


def test_from_metatensor_refuses_a_volume_rather_than_flip_it():
    """With ``__array__``, ``Volume.from_metatensor(vol)`` read the voxels and took the LPS affine for RAS: the
    result's x and y were flipped, silently. The reference: the Volume's own affine."""
    vol = _vol()
    with pytest.raises(InvalidInputError, match="from_metatensor takes a MONAI MetaTensor, got a Volume"):
        Volume.from_metatensor(vol)
    pytest.importorskip("monai")
    back = Volume.from_metatensor(vol.to_metatensor())
    np.testing.assert_allclose(back.affine, vol.affine, atol=1e-12)


@pytest.mark.parametrize("atol", ["a", None, -1.0, float("nan")])
def test_a_tolerance_that_is_not_a_distance_is_refused(atol):
    """``same_grid(other, atol="a")`` failed deep inside with "'<=' not supported between float and str"."""
    vol = _vol()
    for method in (vol.same_grid, vol.grid_difference):
        with pytest.raises(InvalidInputError, match="atol must be a distance in mm"):
            method(vol, atol=atol)
