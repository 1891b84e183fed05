"""common_grid / resample_to_common_grid with a chosen spacing and orientation (a 1 mm isotropic RAS dataset grid).

Geometry is checked independently of medfuse's own index arithmetic: nibabel reads the output's RAS affine
(``aff2axcodes``, ``voxel_sizes``, ``apply_affine``), and the reference's edges are computed from its affine here.
"""

from __future__ import annotations

import itertools

import nibabel as nib
import numpy as np
import pytest

from medfuse.errors import InvalidInputError
from medfuse.registration import common_grid, resample_to_common_grid
from medfuse.volume import LPS_TO_RAS, Volume

# The SPM12 templates' grid: 91 x 109 x 91 voxels of 2 mm, LAS (i toward Left), its first voxel at LPS
# (-90, 126, -72).
LAS_2MM = np.array([[2.0, 0.0, 0.0, -90.0], [0.0, -2.0, 0.0, 126.0], [0.0, 0.0, 2.0, -72.0], [0, 0, 0, 1]])


def _edges_ras(shape, affine_lps) -> np.ndarray:
    """The 8 outer corners (voxel edges, not centres) of a grid, in RAS mm, by nibabel's arithmetic."""
    idx = np.array(list(itertools.product(*[(-0.5, n - 0.5) for n in shape])))
    return nib.affines.apply_affine(LPS_TO_RAS @ affine_lps, idx)


def _box(points):
    return points.min(axis=0), points.max(axis=0)


def _rotation(rx_deg, rz_deg):
    ax, az = np.radians(rx_deg), np.radians(rz_deg)
    rx = np.array([[1, 0, 0], [0, np.cos(ax), -np.sin(ax)], [0, np.sin(ax), np.cos(ax)]])
    rz = np.array([[np.cos(az), -np.sin(az), 0], [np.sin(az), np.cos(az), 0], [0, 0, 1]])
    return rz @ rx


@pytest.mark.parametrize("code", ["RAS", "LPS", "LAS", "RPI", "PIR", "SRA"])
@pytest.mark.parametrize("spacing", [1, 1.5, (1.0, 2.0, 3.0)])
def test_grid_has_the_spacing_direction_and_field_of_view_asked(code, spacing):
    ref = Volume(np.zeros((91, 109, 91), np.float32), LAS_2MM)
    grid = common_grid([ref], spacing=spacing, orientation=code)
    ras = grid.affine_ras
    assert "".join(nib.aff2axcodes(ras)) == code
    want = np.broadcast_to(np.asarray(spacing, dtype=float), (3,))
    np.testing.assert_allclose(nib.affines.voxel_sizes(ras), want, atol=1e-12)
    # Axis-aligned: every column of the direction is a world axis (no obliquity sneaked in).
    d = ras[:3, :3] / want
    np.testing.assert_allclose(np.abs(d).sum(axis=0), 1.0, atol=1e-12)
    np.testing.assert_allclose(np.abs(d).max(axis=0), 1.0, atol=1e-12)
    # Same outer edges as the reference, the far ones within half an output voxel (the voxel count is rounded).
    (lo0, hi0), (lo1, hi1) = _box(_edges_ras(ref.shape, ref.affine)), _box(_edges_ras(grid.shape, grid.affine))
    half = np.abs(d) @ want / 2  # the output's half voxel along each world axis
    assert np.all(np.abs(lo1 - lo0) <= half + 1e-9) and np.all(np.abs(hi1 - hi0) <= half + 1e-9)


def test_spm12_template_on_a_1mm_ras_grid(shared):
    """The real T1 template (2 mm LAS) onto 1 mm RAS: the exact 182 x 218 x 182 grid of the same box, and the
    image's mass centre (an anatomical landmark, asymmetric in y and z) stays where it was."""
    from medfuse.io import load

    t1 = load(shared("data", "spm12-templates", "T1.nii"))
    assert t1.orientation == "LAS" and t1.spacing == (2.0, 2.0, 2.0)  # what the test is about
    (out,) = resample_to_common_grid([t1], spacing=1, orientation="RAS")
    assert out.shape == (182, 218, 182)
    assert nib.aff2axcodes(out.affine_ras) == ("R", "A", "S")
    np.testing.assert_allclose(_box(_edges_ras(out.shape, out.affine)), _box(_edges_ras(t1.shape, t1.affine)),
                               atol=1e-9)

    def centre_ras(v):
        w = np.clip(np.nan_to_num(np.asarray(v.array, dtype=float)), 0, None)
        ijk = np.stack(np.meshgrid(*[np.arange(n) for n in v.shape], indexing="ij"), axis=-1)
        c = (ijk * w[..., None]).reshape(-1, 3).sum(axis=0) / w.sum()
        return nib.affines.apply_affine(v.affine_ras, c)

    np.testing.assert_allclose(centre_ras(out), centre_ras(t1), atol=0.3)


def test_a_bright_blob_stays_at_its_world_position():
    # A Gaussian blob at a known RAS point, off the grid's centre so that a flipped axis would move it.
    ref = Volume(np.zeros((40, 48, 36), np.float32), LAS_2MM)
    point_ras = np.array([20.0, -60.0, -20.0])  # on a voxel centre of the 2 mm grid
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in ref.shape], indexing="ij"), axis=-1)
    world = nib.affines.apply_affine(ref.affine_ras, ijk)
    blob = np.exp(-np.sum((world - point_ras) ** 2, axis=-1) / (2 * 3.0 ** 2)).astype(np.float32)
    assert blob.max() == pytest.approx(1.0)  # the point lies on the grid, inside its field of view
    vol = ref.with_array(blob)
    (out,) = resample_to_common_grid([vol], spacing=1, orientation="RAS")
    assert out.orientation == "RAS" and out.spacing == (1.0, 1.0, 1.0)
    w = np.asarray(out.array, dtype=float)
    oi = np.stack(np.meshgrid(*[np.arange(n) for n in out.shape], indexing="ij"), axis=-1).reshape(-1, 3)
    centre = nib.affines.apply_affine(out.affine_ras, (oi * w.reshape(-1, 1)).sum(axis=0) / w.sum())
    np.testing.assert_allclose(centre, point_ras, atol=0.1)
    peak = nib.affines.apply_affine(out.affine_ras, np.unravel_index(int(np.argmax(w)), out.shape))
    assert np.all(np.abs(peak - point_ras) <= 0.5 + 1e-9)  # the brightest output voxel touches the point


def test_oblique_reference_is_fully_covered_by_an_axis_aligned_grid():
    aff = np.eye(4)
    aff[:3, :3] = _rotation(20.0, 30.0) * np.array([2.0, 2.0, 3.0])
    aff[:3, 3] = (-30.0, 15.0, 40.0)
    ref = Volume(np.ones((30, 40, 20), np.float32), aff)
    assert ref.is_oblique
    grid = common_grid([ref], spacing=1.5, orientation="RAS")
    assert not grid.is_oblique and grid.orientation == "RAS" and grid.spacing == (1.5, 1.5, 1.5)
    # The box around the reference's 8 corners, not the reference's own extent, and no more than a voxel beyond.
    (lo0, hi0), (lo1, hi1) = _box(_edges_ras(ref.shape, ref.affine)), _box(_edges_ras(grid.shape, grid.affine))
    assert np.all(lo1 <= lo0 + 1e-9) and np.all(hi1 >= hi0 - 1e-9)
    assert np.all((hi1 - hi0) + (lo0 - lo1) < 1.5)
    np.testing.assert_allclose(hi1 - hi0, lo0 - lo1, atol=1e-9)  # the spare part shared by both ends
    # Every voxel of the reference lands on the grid: its volume comes through (a cut corner would lose some).
    (out,) = resample_to_common_grid([ref], spacing=1.5, orientation="RAS", interpolation="nearest")
    covered = float(np.count_nonzero(out.array)) * 1.5 ** 3
    assert covered == pytest.approx(30 * 40 * 20 * 2.0 * 2.0 * 3.0, rel=0.02)
    # Without an orientation, the oblique direction is kept, as before.
    assert np.allclose(common_grid([ref], spacing=1.5).direction, ref.direction)


def test_defaults_are_unchanged_and_spacing_alone_keeps_the_direction():
    a = Volume(np.zeros((20, 24, 16), np.float32), LAS_2MM)
    fine = Volume(np.zeros((10, 10, 10), np.float32), np.diag([1.25, 1.25, 1.25, 1.0]))
    base = common_grid([a, fine])
    assert base.spacing == (1.25, 1.25, 1.25) and base.orientation == "LAS"
    for same in (common_grid([a, fine], spacing=None, orientation=None), common_grid([a, fine], spacing=1.25)):
        assert same.shape == base.shape and np.array_equal(same.affine, base.affine)
    own = common_grid([a, fine], orientation="LAS")  # the reference's own code: the same grid
    assert own.shape == base.shape and np.allclose(own.affine, base.affine, atol=1e-9)
    aniso = common_grid([a, fine], spacing=(1.0, 2.0, 4.0))
    assert aniso.spacing == (1.0, 2.0, 4.0) and aniso.orientation == "LAS" and aniso.shape == (40, 24, 8)


@pytest.mark.parametrize("fn", [common_grid, resample_to_common_grid], ids=lambda f: f.__name__)
@pytest.mark.parametrize("kwargs, says", [
    ({"orientation": "RAX"}, r"'X' is not an axis letter.*e\.g\. 'RAS'"),
    ({"orientation": "RRS"}, r"L/R axis twice and no A/P.*one of L/R, one of A/P and one of S/I"),
    ({"orientation": "RA"}, r"2 letters.*e\.g\. 'RAS'"),
    ({"orientation": 3}, r"orientation must be a 3-letter code.*e\.g\. 'RAS'"),
    ({"spacing": 0}, r"spacing must be a finite voxel size in mm above 0, got 0.*spacing=1\.0"),
    ({"spacing": -1}, r"above 0, got -1.*spacing=1\.0"),
    ({"spacing": float("nan")}, r"finite voxel size.*got nan.*spacing=1\.0"),
    ({"spacing": [1, 2]}, r"one number \(isotropic\) or 3 numbers.*got 2 numbers.*spacing=\(1\.0, 1\.0, 2\.0\)"),
    ({"spacing": "1"}, r"got a str.*spacing=1\.0"),
    ({"spacing": 1e-4}, r"voxels, more than.*spacing=1 for 1 mm"),
])
def test_bad_spacing_or_orientation_is_a_typed_error_saying_how_to_fix_it(fn, kwargs, says):
    vol = Volume(np.zeros((8, 8, 8), np.float32), LAS_2MM)
    with pytest.raises(InvalidInputError, match=says):
        fn([vol], **kwargs)
