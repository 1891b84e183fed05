"""The compare masks on a medfuse Volume's own axes, and orthogonal panels through a point halfway between voxels.

A Volume's array is indexed (i, j, k), its axial slices ``vol.array[:, :, k]``; the masks' default (the last two
axes) serves napari's (z, y, x) plane and must stay as it was for the plugin.
"""

from __future__ import annotations

import numpy as np
import pytest

from medfuse import Volume, display
from medfuse.errors import InvalidInputError
from medfuse.volume import affine_from_geometry


def _squares(n_rows: int, n_cols: int, tile: int) -> np.ndarray:
    """The reference 2-D checkerboard: True where (row // tile + col // tile) is even."""
    r, c = np.meshgrid(np.arange(n_rows), np.arange(n_cols), indexing="ij")
    return (r // tile + c // tile) % 2 == 0


def test_checkerboard_default_is_unchanged_on_the_last_two_axes():
    m = display.checkerboard_mask((3, 20, 12), tile=5)
    for z in range(3):
        assert np.array_equal(m[z], _squares(20, 12, 5))


@pytest.mark.parametrize("plane", ["axial", "coronal", "sagittal"])
def test_checkerboard_on_a_volume_plane_gives_squares_on_each_slice(plane):
    shape, tile = (40, 48, 36), 8
    axes = display.VOLUME_PLANE_AXES[plane]
    m = display.checkerboard_mask(shape, tile=tile, axes=axes)
    across = ({0, 1, 2} - set(axes)).pop()
    for k in (0, 17, shape[across] - 1):
        piece = np.take(m, k, axis=across)
        assert np.array_equal(piece, _squares(shape[axes[0]], shape[axes[1]], tile)), (plane, k)
    # Reversed axes: the transposed board (rows along the second axis given), negative axes as NumPy counts them.
    assert np.array_equal(display.checkerboard_mask(shape, tile=tile, axes=(axes[1] - 3, axes[0])), m)


def test_checkerboard_with_axes_fixes_the_stripes_on_an_axial_slice():
    shape = (64, 80, 48)
    default = display.checkerboard_mask(shape, tile=16)[:, :, 20]
    assert len({tuple(r) for r in default}) == 1  # the finding: the same row everywhere, stripes
    axial = display.checkerboard_mask(shape, tile=16, axes=(0, 1))[:, :, 20]
    assert np.array_equal(axial, _squares(64, 80, 16))


def test_curtain_along_a_volume_axis():
    shape = (10, 6, 4)
    default = display.curtain_mask(shape, position=0.3)
    assert np.array_equal(default[2, 3], np.arange(4) < 1)  # round(0.3 * 4) = 1: unchanged default
    m = display.curtain_mask(shape, position=0.3, axis=0)
    for k in range(4):
        axial = m[:, :, k]
        assert axial[:3].all() and not axial[3:].any()  # the curtain crosses each axial slice at row 3
    assert np.array_equal(display.curtain_mask(shape, position=0.5, axis=-2),
                          display.curtain_mask(shape, position=0.5, axis=1))


@pytest.mark.parametrize("call,message", [
    (lambda: display.checkerboard_mask((8, 8, 8), axes=(1, 1)), "two different axes"),
    (lambda: display.checkerboard_mask((8, 8, 8), axes=(0, 3)), "must be an axis of the 3-axis shape"),
    (lambda: display.checkerboard_mask((8, 8), axes=0), "axes must be two axes, got an int"),
    (lambda: display.checkerboard_mask((8, 8, 8), axes=(0, 1.0)), "must be an axis"),
    (lambda: display.curtain_mask((8, 8), axis=2), "curtain axis must be an axis of the 2-axis shape"),
    (lambda: display.curtain_mask((8, 8), axis=True), "curtain axis must be an axis"),
])
def test_bad_axes_are_typed_errors(call, message):
    with pytest.raises(InvalidInputError, match=message):
        call()


@pytest.mark.parametrize("direction", [np.eye(3), np.diag([-1.0, 1.0, -1.0]), np.eye(3)[:, [1, 0, 2]]])
def test_panels_through_a_point_between_voxels_have_no_nan_edge(direction):
    """A point halfway between voxels put pixel centres on the volume's outer faces: the far ones fell outside
    SimpleITK's image, a NaN row and column (a white line in matplotlib)."""
    shape = (20, 24, 16)
    i, j, k = np.meshgrid(*(np.arange(n, dtype=np.float32) for n in shape), indexing="ij")
    vol = Volume(i + 100 * j + 10000 * k, affine_from_geometry((1.0, 1.0, 1.0), (3.0, -7.0, 11.0), direction))
    point = vol.index_to_world([9.5, 11.5, 7.5])  # halfway between voxels along every axis
    for name, p in display.orthogonal_slices(vol, point).items():
        assert not np.isnan(p.image).any(), name
        row, col = p.world_to_pixel(point)
        assert row == pytest.approx(round(row)) and col == pytest.approx(round(col))  # the point on a pixel
        # Linear interpolation of a linear image is exact: the value at the point is its index's.
        assert p.image[int(round(row)), int(round(col))] == pytest.approx(9.5 + 100 * 11.5 + 10000 * 7.5, rel=1e-6)
    # Pixel centres on the voxel faces strictly inside: n - 1 of them along an axis of n voxels.
    lo, hi = vol.bounds(edges=True)
    x, y, z = (int(round(e)) - 1 for e in np.asarray(hi) - np.asarray(lo))
    assert {n: p.image.shape for n, p in display.orthogonal_slices(vol, point).items()} == {
        "axial": (y, x), "coronal": (z, x), "sagittal": (z, y)}


def test_panels_through_a_voxel_centre_keep_their_size():
    vol = Volume(np.ones((20, 24, 16), np.float32), np.eye(4))
    panels = display.orthogonal_slices(vol, vol.index_to_world([9, 11, 7]))
    assert {n: p.image.shape for n, p in panels.items()} == {"axial": (24, 20), "coronal": (16, 20),
                                                             "sagittal": (16, 24)}
    assert not any(np.isnan(p.image).any() for p in panels.values())


def test_the_examples_in_the_display_docstrings_run():
    import doctest

    result = doctest.testmod(display, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted >= 3 and result.failed == 0
