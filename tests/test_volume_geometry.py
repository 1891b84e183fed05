"""Volume geometry checked against SimpleITK, nibabel and MONAI: round trips, index<->world, orientation codes,
grid comparison, construction. Expected values come from the libraries, never from medfuse itself."""

from __future__ import annotations

import re

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from scipy.spatial.transform import Rotation

from medfuse.errors import GeometryError, InvalidInputError
from medfuse.volume import Volume, affine_from_geometry

ROT = Rotation.from_euler("zyx", [25, -10, 40], degrees=True).as_matrix()
PERM = np.array([[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])  # i->P, j->S, k->L (a sagittal acquisition)

#: name -> (direction, spacing, origin, shape)
GEOMETRIES = {
    "oblique": (ROT, (0.7, 1.3, 3.0), (12.5, -40.0, 77.0), (5, 6, 7)),
    "left-handed": (ROT @ np.diag([-1.0, 1.0, 1.0]), (0.7, 1.3, 3.0), (12.5, -40.0, 77.0), (5, 6, 7)),
    "permuted": (PERM, (1.0, 2.0, 3.0), (-5.0, 6.0, -7.0), (4, 5, 6)),
    "anisotropic": (np.eye(3), (0.4, 0.9, 5.0), (0.0, 0.0, 0.0), (6, 5, 4)),
    "large-origin": (ROT, (0.9765625, 0.9765625, 2.5), (1000.0, -1000.0, 1000.0), (5, 6, 7)),
    "one-voxel-thick": (PERM @ ROT, (1.0, 1.0, 1.0), (3.0, 2.0, 1.0), (5, 1, 4)),
}


def _array(dtype: str, shape) -> np.ndarray:
    """Voxels of a dtype case: distinct values (so that a flipped or transposed axis is seen)."""
    values = np.arange(int(np.prod(shape))).reshape(shape) % 97
    if dtype == "transposed":  # a non-contiguous view
        return np.ascontiguousarray(values.transpose(2, 1, 0)).astype(np.float32).transpose(2, 1, 0)
    if dtype == "bool":
        return values % 2 == 0
    return values.astype(np.dtype(dtype))


DTYPES = ["float16", "bool", "uint16", ">i2", ">f8", "int64", "uint64", "transposed"]
#: Documented changes per bridge (no other dtype may change): ITK and NIfTI have no bool and no float16.
EXPECTED_DTYPE = {
    "sitk": {"bool": np.uint8, "float16": np.float32},
    "nibabel": {"bool": np.uint8, "float16": np.float32},
    "metatensor": {"bool": np.uint8},
}


def _volume(geometry: str, dtype: str) -> Volume:
    d, spacing, origin, shape = GEOMETRIES[geometry]
    return Volume(_array(dtype, shape), affine_from_geometry(spacing, origin, d))


def _library_checks(bridge: str, obj, vol: Volume, ijk) -> None:
    """The library's own view of the converted image: voxel value and world point of index ``ijk``."""
    i, j, k = ijk
    if bridge == "sitk":
        assert obj.GetPixel(i, j, k) == vol.array[i, j, k]
        world = np.asarray(obj.TransformIndexToPhysicalPoint((i, j, k)))  # ITK: LPS
    elif bridge == "nibabel":
        assert np.asanyarray(obj.dataobj)[i, j, k] == vol.array[i, j, k]
        world = nib.affines.apply_affine(obj.affine, ijk) * [-1, -1, 1]  # RAS -> LPS
    else:
        assert float(obj[0, i, j, k]) == float(vol.array[i, j, k])
        world = nib.affines.apply_affine(np.asarray(obj.affine), ijk) * [-1, -1, 1]
    assert np.allclose(world, vol.index_to_world(ijk), atol=1e-6)


@pytest.mark.parametrize("bridge", ["sitk", "nibabel", "metatensor"])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_round_trip_is_exact(geometry, dtype, bridge):
    """Volume -> library -> Volume keeps every voxel, the affine to 1e-9 mm and the dtype (bar documented
    changes); the library sees the same voxel at the same world point."""
    if bridge == "metatensor":
        pytest.importorskip("monai")
    vol = _volume(geometry, dtype)
    to, back = {"sitk": (Volume.to_sitk, Volume.from_sitk), "nibabel": (Volume.to_nibabel, Volume.from_nibabel),
                "metatensor": (Volume.to_metatensor, Volume.from_metatensor)}[bridge]
    obj = to(vol)
    _library_checks(bridge, obj, vol, tuple(s - 1 for s in vol.shape))
    _library_checks(bridge, obj, vol, (0, 0, vol.shape[2] - 1))
    out = back(obj)
    assert out.shape == vol.shape and out.orientation == vol.orientation
    assert np.array_equal(out.array, vol.array)
    assert float(np.max(np.abs(out.affine - vol.affine))) <= 1e-9
    key = "bool" if vol.dtype == bool else str(vol.dtype)
    assert out.dtype == np.dtype(EXPECTED_DTYPE[bridge].get(key, vol.dtype.newbyteorder("=")))


def test_long_double_converts_to_float64():
    if np.dtype(np.longdouble).itemsize <= 8:
        pytest.skip("long double is float64 here")
    vol = Volume(np.arange(24, dtype=np.longdouble).reshape(2, 3, 4), np.eye(4))
    assert Volume.from_sitk(vol.to_sitk()).dtype == np.float64
    assert Volume.from_nibabel(vol.to_nibabel()).dtype == np.float64


@pytest.mark.parametrize("bridge", ["sitk", "nibabel", "metatensor"])
def test_conversions_do_not_share_voxels(bridge):
    """An edit of the converted image never changes the Volume, nor the reverse."""
    if bridge == "metatensor":
        pytest.importorskip("monai")
    vol = Volume(np.zeros((3, 4, 5)), np.eye(4))
    obj = {"sitk": vol.to_sitk, "nibabel": vol.to_nibabel, "metatensor": vol.to_metatensor}[bridge]()
    vol.array[1, 2, 3] = 7.0
    if bridge == "sitk":
        assert sitk.GetArrayViewFromImage(obj)[3, 2, 1] == 0.0
        obj[1, 2, 3] = 5.0
    elif bridge == "nibabel":
        assert obj.get_fdata()[1, 2, 3] == 0.0
        obj.get_fdata()[0, 0, 0] = 5.0  # float64 data: get_fdata returns the image's own array
    else:
        assert float(obj[0, 1, 2, 3]) == 0.0
        obj[0, 0, 0, 0] = 5.0
    assert vol.array[0, 0, 0] == 0.0


def test_from_nibabel_copies_an_in_memory_image():
    data = np.zeros((3, 4, 5))
    vol = Volume.from_nibabel(nib.Nifti1Image(data, np.eye(4)))
    data[0, 0, 0] = 9.0
    assert vol.array[0, 0, 0] == 0.0


# ----------------------------------------------------------------------------- index <-> world, bounds
@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_index_to_world_matches_itk(geometry):
    """medfuse's (i, j, k) is ITK's (x, y, z) index; both ways agree with SimpleITK's continuous transforms."""
    vol = _volume(geometry, "uint16")
    img = vol.to_sitk()
    ijk = np.random.default_rng(3).uniform(-1, 6, size=(10, 3))
    expected = np.array([img.TransformContinuousIndexToPhysicalPoint(tuple(p)) for p in ijk])
    assert np.allclose(vol.index_to_world(ijk), expected, atol=1e-9)
    back = np.array([img.TransformPhysicalPointToContinuousIndex(tuple(p)) for p in expected])
    assert np.allclose(vol.world_to_index(expected), back, atol=1e-9)


@pytest.mark.parametrize("geometry", list(GEOMETRIES))
def test_bounds_are_centres_by_default_and_edges_on_request(geometry):
    vol = _volume(geometry, "uint16")
    img = vol.to_sitk()
    n = np.asarray(vol.shape, dtype=float)
    for edges, lo, hi in ((False, np.zeros(3), n - 1), (True, np.full(3, -0.5), n - 0.5)):
        corners = [img.TransformContinuousIndexToPhysicalPoint((a, b, c))
                   for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])]
        got = vol.bounds(edges=edges)
        assert np.allclose(got[0], np.min(corners, axis=0)) and np.allclose(got[1], np.max(corners, axis=0))


# ----------------------------------------------------------------------------- orientation
def _with_direction(d: np.ndarray, dtype=float) -> Volume:
    aff = affine_from_geometry((0.9, 1.1, 2.5), (10.0, 20.0, 30.0), d).astype(dtype)
    return Volume(np.zeros((2, 2, 2)), aff)


def test_orientation_codes_match_itk_and_nibabel():
    """Random rotations, flips and permutations (strongly oblique ones included): the code is ITK's
    DICOMOrientImageFilter's, and nibabel's aff2axcodes of the RAS affine (both name where axes point to)."""
    rng = np.random.default_rng(7)
    for n in range(300):
        d = Rotation.random(random_state=rng).as_matrix()[:, rng.permutation(3)]
        d = d * (-1 if n % 2 else 1, 1, 1)
        vol = _with_direction(d)
        itk = sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(vol.direction.ravel()))
        assert vol.orientation == itk == "".join(nib.aff2axcodes(vol.affine_ras)), d


@pytest.mark.parametrize("d,code", [(np.eye(3), "LPS"), (np.diag([-1.0, -1.0, 1.0]), "RAS"),
                                    (np.diag([1.0, 1.0, -1.0]), "LPI"), (PERM, "PSL")])
def test_orientation_of_axis_aligned_grids(d, code):
    vol = _with_direction(d)
    assert vol.orientation == code
    assert sitk.DICOMOrientImageFilter.GetOrientationFromDirectionCosines(tuple(d.ravel())) == code


def test_is_oblique_tolerance():
    """float32 round-off (~1e-7) and a 1e-6 tilt are not oblique; 1 degree is."""
    tiny = Rotation.from_rotvec([1e-6, 0.0, 0.0]).as_matrix()
    assert not _with_direction(tiny).is_oblique
    assert _with_direction(ROT, np.float32).is_oblique  # a real obliquity survives float32
    assert not _with_direction(PERM @ tiny, np.float32).is_oblique
    assert _with_direction(Rotation.from_euler("x", 1, degrees=True).as_matrix()).is_oblique


# ----------------------------------------------------------------------------- grid comparison
def _grid(affine, shape=(64, 64, 64)) -> Volume:
    return Volume(np.zeros(shape, np.uint8), affine)


def test_same_grid_takes_float32_round_off():
    aff = affine_from_geometry((0.9765625, 0.9765625, 2.5), (1000.0, -1000.0, 1000.0), ROT)
    a = _grid(aff)
    assert a.same_grid(_grid(aff.astype(np.float32).astype(float)))
    assert a.grid_difference(_grid(aff.astype(np.float32).astype(float))) == ""


def test_same_grid_refuses_a_tenth_of_a_voxel():
    aff = affine_from_geometry((0.5, 0.5, 0.5), (0.0, 0.0, 0.0), np.eye(3))
    shifted = aff.copy()
    shifted[:3, 3] += aff[:3, :3] @ [0.1, 0.0, 0.0]
    a = _grid(aff)
    assert not a.same_grid(_grid(shifted))
    assert "origin 0.05 mm away" in a.grid_difference(_grid(shifted))


def test_same_grid_refuses_a_rotation_that_moves_far_voxels():
    """A 0.02 degree rotation changes the affine's entries by < 1e-3 but moves the far corner of a 512 mm grid
    by ~0.25 mm (a quarter voxel): not the same grid, and the message says how far."""
    shape = (512, 512, 2)
    aff = np.eye(4)
    turned = aff.copy()
    turned[:3, :3] = Rotation.from_euler("z", 0.02, degrees=True).as_matrix()
    assert np.allclose(aff, turned, atol=1e-3)  # what an entry-wise comparison would have accepted
    a, b = _grid(aff, shape), _grid(turned, shape)
    expected = np.linalg.norm(turned[:3, :3] @ [511, 511, 1] - [511, 511, 1])
    assert not a.same_grid(b)
    assert a.max_voxel_distance(b) == pytest.approx(expected)
    assert f"rotated by 0.02 degrees, voxel centres up to {expected:.3g} mm apart" in a.grid_difference(b)


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("affine,words", [
    (np.diag([1.0, np.nan, 1.0, 1.0]), "NaN"),
    (np.diag([1.0, 1.0, np.inf, 1.0]), "infinite"),
    (np.eye(3), "4x4"),
    ([["a"] * 4] * 4, "not a numeric matrix"),
    (np.array([[1, 1, 0, 0], [0, 0, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "singular"),
    (np.array([[1, 0.2, 0, 0], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]]), "sheared"),
])
def test_bad_affines_are_refused_in_words(affine, words):
    with pytest.raises(GeometryError, match=words) as info:
        Volume(np.zeros((2, 2, 2)), affine)
    assert info.value.fix


def test_fine_grids_are_not_singular():
    """10 nm voxels (the matrix's determinant is 1e-15) are a valid grid."""
    assert Volume(np.zeros((2, 2, 2)), np.diag([1e-5, 1e-5, 1e-5, 1.0])).spacing == (1e-5, 1e-5, 1e-5)


@pytest.mark.parametrize("length", [1e160, 1e300])
def test_an_axis_beyond_any_geometry_is_named_as_too_long_not_singular(length):
    """The norm of a 1e160 mm axis overflowed to inf and the affine was called singular ("zero length")."""
    with pytest.raises(GeometryError, match=re.escape(f"a voxel axis is {length:.3g} mm long")) as info:
        Volume(np.zeros((2, 2, 2)), np.diag([length, 1.0, 1.0, 1.0]))
    assert "unit" in info.value.fix
    assert Volume(np.zeros((2, 2, 2)), np.diag([1e8, 1.0, 1.0, 1.0])).spacing[0] == 1e8  # 100 km: still taken


@pytest.mark.parametrize("arr,words", [
    (np.zeros((3, 3)), "3-D"), (np.zeros((2, 3, 4, 5)), "load_volumes"),
    (np.empty((2, 2, 2), dtype=object), "astype"), (np.full((2, 2, 2), "x"), "numeric"),
])
def test_bad_arrays_are_refused_in_words(arr, words):
    with pytest.raises(InvalidInputError, match=words):
        Volume(arr, np.eye(4))


def test_array_is_referenced_not_copied(tmp_path):
    """As documented: no copy (a read-only or memory-mapped array stays so), except big-endian data."""
    ro = np.arange(8.0).reshape(2, 2, 2)
    ro.flags.writeable = False
    v = Volume(ro, np.eye(4))
    assert np.shares_memory(v.array, ro) and not v.array.flags.writeable
    assert v.copy().array.flags.writeable and Volume.from_sitk(v.to_sitk()).same_grid(v)
    mm = np.memmap(tmp_path / "x.raw", dtype=np.int16, mode="w+", shape=(2, 3, 4))
    assert np.shares_memory(Volume(mm, np.eye(4)).array, mm)
    big = np.arange(8, dtype=">i4").reshape(2, 2, 2)
    vb = Volume(big, np.eye(4))
    assert vb.dtype.isnative and not np.shares_memory(vb.array, big) and np.array_equal(vb.array, big)
    assert "referenced" in Volume.__doc__ or "by reference" in Volume.__doc__
