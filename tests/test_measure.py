"""medfuse.measure: the value at a point and statistics within a mask, against analytic values and NumPy.

The reference values are computed here from the affine matrix itself (``affine @ [i, j, k, 1]``) and the voxels,
not through the functions under test, on grids with a rotated and flipped direction, so that a mix-up of LPS
and RAS, of index order or of rounding shows.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import medfuse
from medfuse.errors import InvalidInputError
from medfuse.measure import OutsideFieldError, mask_statistics, value_at, voxel_index
from medfuse.volume import Volume, affine_from_geometry


def _oblique(shape=(10, 12, 14), spacing=(2.0, 3.0, 4.0), dtype=np.float32, seed=0) -> Volume:
    """Random voxels on a grid turned 0.3 rad about z with its j axis flipped."""
    c, s = math.cos(0.3), math.sin(0.3)
    direction = np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]]) @ np.diag([1.0, -1.0, 1.0])
    arr = np.random.default_rng(seed).random(shape).astype(dtype)
    return Volume(arr, affine_from_geometry(spacing, (10.0, -20.0, 30.0), direction), modality="PT", unit="SUVbw")


def _world(v: Volume, ijk) -> np.ndarray:
    """LPS mm of an index, from the affine matrix alone."""
    return (v.affine @ np.r_[np.asarray(ijk, dtype=float), 1.0])[:3]


def test_nearest_value_at_world_points_is_the_voxel_whose_cell_holds_them():
    v = _oblique()
    rng = np.random.default_rng(1)
    for _ in range(50):
        ijk = rng.integers(0, v.shape)
        jitter = rng.uniform(-0.45, 0.45, 3)  # anywhere in the voxel's cell
        point = _world(v, ijk + jitter)
        assert value_at(v, point) == v.array[tuple(ijk)]
        assert voxel_index(v, point) == tuple(int(i) for i in ijk)
        # The same point in RAS (x and y negated), and as a fractional index.
        assert value_at(v, point * [-1, -1, 1], space="ras") == v.array[tuple(ijk)]
        assert value_at(v, ijk + jitter, space="voxel") == v.array[tuple(ijk)]


def test_a_point_on_a_cell_edge_goes_to_the_higher_index_not_to_the_even_one():
    v = _oblique()
    # 2.5 and 3.5: NumPy's round() gives 2 and 4 (halves to even); the cell edge rule gives 3 and 4.
    assert voxel_index(v, (2.5, 3.5, 0.0), space="voxel") == (3, 4, 0)


def test_linear_interpolation_of_a_linear_field_is_exact():
    """Trilinear interpolation reproduces a function linear in the indices exactly: the analytic value."""
    shape = (9, 11, 13)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=float) for n in shape), indexing="ij")
    v = _oblique(shape=shape, dtype=np.float64).with_array(3.0 * i - 2.0 * j + 0.5 * k + 7.0)
    for ijk in [(2.3, 4.7, 5.2), (0.0, 0.0, 0.0), (7.9, 0.1, 11.5), (8.0, 10.0, 12.0)]:
        expected = 3.0 * ijk[0] - 2.0 * ijk[1] + 0.5 * ijk[2] + 7.0
        assert value_at(v, _world(v, ijk), interpolation="linear") == pytest.approx(expected, abs=1e-9)
        assert value_at(v, ijk, space="voxel", interpolation="linear") == pytest.approx(expected, abs=1e-9)
    # In the outer half voxel the border voxels' values are carried out to the edge.
    assert value_at(v, (-0.4, 0.0, 0.0), space="voxel", interpolation="linear") == pytest.approx(7.0)


def test_value_at_the_phantom_lesion_centre_is_the_lesion_core_label():
    """The phantom's known anatomy: its lesion centre (MR space, LPS mm) lies in the lesion core."""
    from medfuse.phantom import LABELS, make_phantom

    ph = make_phantom()
    assert value_at(ph.labels, ph.lesion_center) == LABELS["lesion_core"]
    assert value_at(ph.labels, ph.lesion_center * [-1, -1, 1], space="ras") == LABELS["lesion_core"]


def test_a_point_outside_says_the_field_extent():
    v = _oblique()
    lo, hi = v.bounds(edges=True)
    with pytest.raises(OutsideFieldError) as info:
        value_at(v, hi + 50.0)
    text = str(info.value)
    assert "outside the image" in text and "mm LPS" in text and info.value.fix
    assert f"x {lo[0]:.1f}..{hi[0]:.1f}" in text and f"z {lo[2]:.1f}..{hi[2]:.1f}" in text
    assert isinstance(info.value, InvalidInputError)  # caught as every bad input is
    with pytest.raises(OutsideFieldError, match=r"i 0\.\.9, j 0\.\.11, k 0\.\.13"):
        value_at(v, (10, 0, 0), space="voxel")
    # Just inside the outer edge of the last voxel: accepted, and read from that voxel.
    assert value_at(v, (9.49, 0, 0), space="voxel") == v.array[9, 0, 0]
    with pytest.raises(OutsideFieldError, match="mm RAS"):
        value_at(v, (1e4, 0, 0), space="ras")


@pytest.mark.parametrize("call, message", [
    (lambda v: value_at(v.array, (0, 0, 0)), "volume must be a medfuse Volume"),
    (lambda v: value_at(v, (0, 0)), "3 coordinates"),
    (lambda v: value_at(v, [(0, 0, 0), (1, 1, 1)], space="voxel"), "one position"),
    (lambda v: value_at(v, (np.nan, 0, 0)), "finite"),
    (lambda v: value_at(v, (0, 0, 0), space="ijk"), "unknown space"),
    (lambda v: value_at(v, (0, 0, 0), interpolation="cubic"), "unknown interpolation"),
    (lambda v: value_at(v.with_array(v.array.astype(np.complex64)), (0, 0, 0)), "complex"),
    (lambda v: mask_statistics(v, v.array), "mask must be a medfuse Volume"),
    (lambda v: mask_statistics(v, v, label=1.5), "label must be a whole number"),
    (lambda v: mask_statistics(v, v.with_array(np.zeros(v.shape, np.uint8))), "selects no voxel"),
])
def test_bad_input_is_a_typed_error_with_a_fix(call, message):
    with pytest.raises(InvalidInputError, match=message) as info:
        call(_oblique())
    assert info.value.fix


def _peak_by_brute_force(v: Volume, at) -> float:
    """Mean of every voxel whose centre is within the 1 mL sphere's radius of voxel ``at``, over the whole grid."""
    radius = (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
    idx = np.stack(np.meshgrid(*(np.arange(n) for n in v.shape), indexing="ij"), -1).reshape(-1, 3)
    world = idx @ v.affine[:3, :3].T + v.affine[:3, 3]
    near = np.linalg.norm(world - _world(v, at), axis=1) <= radius
    return float(v.array.reshape(-1)[near].astype(np.float64).mean())


def test_mask_statistics_equal_numpy_on_the_same_voxels():
    v = _oblique(shape=(16, 18, 20), spacing=(1.5, 2.0, 2.5))
    m = np.zeros(v.shape, np.uint8)
    m[3:11, 4:12, 5:15] = 1
    m[6, 6, 6] = 0
    sel = v.array[m > 0].astype(np.float64)
    st = mask_statistics(v, v.with_array(m))
    assert st["count"] == sel.size
    assert st["volume_ml"] == pytest.approx(sel.size * 1.5 * 2.0 * 2.5 / 1000.0)
    assert st["mean"] == pytest.approx(sel.mean()) and st["sd"] == pytest.approx(sel.std())
    assert st["min"] == sel.min() and st["max"] == sel.max()
    at = np.unravel_index(np.argmax(np.where(m > 0, v.array, -np.inf)), v.shape)
    np.testing.assert_allclose(st["max_at_lps_mm"], _world(v, at), atol=1e-9)
    # the peak: the hottest sphere centred on any selected voxel, each sphere's mean computed the slow way
    means = {tuple(ijk): _peak_by_brute_force(v, ijk) for ijk in np.argwhere(m > 0)}
    best = max(means, key=means.get)
    assert st["peak"] == pytest.approx(means[best], rel=1e-12)
    np.testing.assert_allclose(st["peak_at_lps_mm"], _world(v, best), atol=1e-9)
    assert st["peak"] >= _peak_by_brute_force(v, at)  # at least the sphere around the maximum
    assert st["unit"] == "SUVbw" and st["mask_resampled"] is False and st["nonfinite"] == 0
    assert st["mask_ml"] == pytest.approx(st["volume_ml"]) and st["outside_fraction"] == 0.0


def test_a_label_and_nan_voxels():
    v = _oblique()
    arr = v.array.copy()
    arr[1, 1, 1] = np.nan
    v = v.with_array(arr)
    labels = np.zeros(v.shape, np.int16)
    labels[0:4, 0:4, 0:4] = 2
    labels[5:9, 5:9, 5:9] = 3
    st = mask_statistics(v, v.with_array(labels), label=2)
    sel = arr[labels == 2].astype(np.float64)
    assert st["count"] == 64 and st["nonfinite"] == 1 and st["label"] == 2
    assert st["mean"] == pytest.approx(np.nanmean(sel)) and st["max"] == np.nanmax(sel)
    with pytest.raises(InvalidInputError, match="label 7.*labels are 0, 2, 3"):
        mask_statistics(v, v.with_array(labels), label=7)


def test_a_mask_on_another_grid_is_put_on_the_image_grid_by_nearest_neighbour():
    """Image on a 1 mm grid, mask on a 2 mm grid offset by half a millimetre: each image voxel centre x = i lies
    at mask index (i - 0.5) / 2, never on a tie, so the expected mask is known voxel by voxel."""
    img = Volume(np.random.default_rng(3).random((12, 12, 12)), np.eye(4), modality="CT", unit="HU")
    coarse = np.zeros((6, 6, 6), np.uint8)
    coarse[1:3, 2:4, 1:5] = 1
    mask = Volume(coarse, np.diag([2.0, 2.0, 2.0, 1.0]) + np.c_[np.zeros((4, 3)), [0.5, 0.5, 0.5, 0]])
    i = np.arange(12)
    near = np.clip(np.floor((i - 0.5) / 2 + 0.5).astype(int), 0, 5)
    inside = ((i - 0.5) / 2 >= -0.5) & ((i - 0.5) / 2 <= 5.5)
    expected = coarse[np.ix_(near, near, near)] * inside[:, None, None] * inside[None, :, None] * inside[None, None, :]
    st = mask_statistics(img, mask)
    sel = img.array[expected > 0]
    assert st["mask_resampled"] is True and st["count"] == sel.size
    assert st["mean"] == pytest.approx(sel.mean()) and st["volume_ml"] == pytest.approx(sel.size / 1000.0)


def test_the_top_level_names():
    assert medfuse.value_at is value_at and medfuse.mask_statistics is mask_statistics
    assert medfuse.measure.voxel_index is voxel_index


def test_linear_interpolation_on_a_grid_one_voxel_thick():
    """A single slice (an axis of length 1): the block around the point is cut to what the axis has."""
    arr = np.arange(12.0).reshape(3, 4, 1)
    v = Volume(arr, np.diag([2.0, 2.0, 5.0, 1.0]))
    assert value_at(v, (1.5, 2.25, 0.3), space="voxel", interpolation="linear") == pytest.approx(
        (1.5 * 4 + 2.25) * 1.0)
    assert value_at(v, (2.0, 3.0, 0.0), space="voxel", interpolation="linear") == 11.0


def _sphere_phantom(value=6.27679, spacing=(2.0, 2.0, 3.27)):
    """A uniform hot sphere (37 mm across, as the NEMA phantom's largest) in a warm background, and its mask."""
    shape = (48, 48, 24)
    v = Volume(np.full(shape, 1.569198, np.float32), affine_from_geometry(spacing, (0.0, 0.0, 0.0), np.eye(3)),
               modality="PT", unit="SUVbw")
    centre = (np.asarray(shape) - 1) / 2 * np.asarray(spacing)
    world = np.stack(np.meshgrid(*(np.arange(n) * d for n, d in zip(shape, spacing)), indexing="ij"), -1)
    inside = np.linalg.norm(world - centre, axis=-1) <= 18.5
    arr = v.array.copy()
    arr[inside] = value
    return v.with_array(arr), v.with_array(inside.astype(np.uint8))


def test_the_peak_of_a_uniform_sphere_is_its_value_not_an_edge_of_it():
    """Every voxel of the sphere ties for the maximum; the first of them lies on its edge, where a sphere centred
    there read 38 % low (a physicist's NEMA-like phantom: 3.89 for 6.28)."""
    v, m = _sphere_phantom()
    st = mask_statistics(v, m)
    assert st["max"] == pytest.approx(6.27679) and st["max_voxels"] == int(m.array.sum())
    assert st["peak"] == pytest.approx(6.27679, rel=1e-6)
    # the sphere's own voxels on this grid (2 x 2 x 3.27 mm): fewer than 1 mL, and said so
    offsets = np.stack(np.meshgrid(*(np.arange(-5, 6) for _ in range(3)), indexing="ij"), -1) * (2.0, 2.0, 3.27)
    n = int((np.linalg.norm(offsets, axis=-1) <= (3000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)).sum())
    assert st["peak_ml"] == pytest.approx(n * 2.0 * 2.0 * 3.27 / 1000.0) and st["peak_ml"] < 1.0


def test_a_probability_mask_needs_a_threshold():
    v, m = _sphere_phantom()
    from scipy.ndimage import gaussian_filter

    prob = gaussian_filter(m.array.astype(np.float32), 1.5)
    with pytest.raises(InvalidInputError, match="not whole numbers.*probability map") as info:
        mask_statistics(v, m.with_array(prob))
    assert "threshold" in info.value.fix
    st = mask_statistics(v, m.with_array(prob), threshold=0.5)
    ref = v.array[prob >= 0.5].astype(np.float64)
    assert st["count"] == ref.size and st["mean"] == pytest.approx(ref.mean()) and st["threshold"] == 0.5
    with pytest.raises(InvalidInputError, match="label or threshold"):
        mask_statistics(v, m, label=1, threshold=0.5)
    with pytest.raises(InvalidInputError, match="threshold must be a finite number"):
        mask_statistics(v, m, threshold=float("nan"))


def test_a_mask_reaching_beyond_the_image_says_how_much_lies_outside():
    """A lesion mask centred on the image's last slice: the measured volume is about half the mask's."""
    v, m = _sphere_phantom()
    shifted = Volume(m.array, m.affine @ np.array([[1, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 11.5], [0, 0, 0, 1.0]]))
    # the mask's selected voxel centres in the image's index space, from the affine matrices alone
    idx = np.argwhere(m.array > 0)
    ijk = (np.linalg.inv(v.affine) @ shifted.affine @ np.c_[idx, np.ones(len(idx))].T)[:3].T
    truth = float(np.any((ijk < -0.5) | (ijk > np.asarray(v.shape) - 0.5), axis=1).mean())
    assert 0.3 < truth < 0.7
    with pytest.warns(medfuse.errors.MedfuseWarning, match=f"{100 * truth:.1f} % of the mask's region"):
        st = mask_statistics(v, shifted)
    assert st["outside_fraction"] == pytest.approx(truth)
    assert st["mask_ml"] == pytest.approx(idx.shape[0] * 2.0 * 2.0 * 3.27 / 1000.0)
    assert st["volume_ml"] < 0.7 * st["mask_ml"]
