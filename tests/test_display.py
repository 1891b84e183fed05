"""Tests of the GUI-free display defaults (window presets, per-modality settings, percentile limits) and of the
orthogonal slices (patient orientation, slice point, square-mm pixels) for several voxel orders."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from medfuse import Volume, display
from medfuse.errors import InvalidInputError
from medfuse.volume import affine_from_geometry


@pytest.mark.parametrize("name,limits", [
    ("brain", (0, 80)), ("subdural", (-25, 175)), ("soft_tissue", (-160, 240)),
    ("lung", (-1350, 150)), ("bone", (-700, 1300)),
])
def test_ct_presets_to_limits(name, limits):
    assert display.window_to_limits(*display.CT_WINDOWS[name]) == limits
    assert display.limits_to_window(*limits) == display.CT_WINDOWS[name]


def test_window_rejects_bad_input():
    with pytest.raises(InvalidInputError):
        display.window_to_limits(0, 40)
    with pytest.raises(InvalidInputError):
        display.window_to_limits(float("nan"), 40)
    with pytest.raises(InvalidInputError):
        display.limits_to_window(5, 5)


def test_percentile_limits():
    a = np.zeros((10, 10, 10), dtype=np.float32)
    a[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    lo, hi = display.percentile_limits(a, low=0, high=100)
    assert (lo, hi) == (1.0, 100.0)  # zeros (background) ignored
    lo0, _ = display.percentile_limits(a, low=0, high=100, ignore_zeros=False)
    assert lo0 == 0.0
    a[0, 0, 0] = np.nan
    assert display.percentile_limits(a, low=0, high=100) == (1.0, 100.0)
    assert display.percentile_limits(np.full((3, 3, 3), 7.0)) == (7.0, 8.0)  # constant image stays usable
    with pytest.raises(InvalidInputError):
        display.percentile_limits(np.full((2, 2, 2), np.nan), ignore_zeros=False)
    with pytest.raises(InvalidInputError):
        display.percentile_limits(a, low=50, high=10)


def test_display_settings_per_modality():
    aff = np.eye(4)
    arr = np.arange(64, dtype=np.float32).reshape(4, 4, 4)
    ct = display.display_settings(Volume(arr, aff, modality="CT", unit="HU"))
    assert ct.colormap == "gray" and ct.contrast_limits == (0.0, 80.0)
    bone = display.display_settings(Volume(arr, aff, modality="CT", unit="HU"), window="bone")
    assert bone.contrast_limits == (-700.0, 1300.0)
    pet = display.display_settings(Volume(arr, aff, modality="PT", unit="SUVbw"), overlay=True)
    assert pet.colormap == "inferno" and pet.contrast_limits == (0.0, 6.0) and pet.blending == "additive"
    # SUVbsa (cm²/mL) is about a quarter of SUVbw: its window is scaled as the fusion's (10 -> 2.5), not 0..6.
    bsa = display.display_settings(Volume(arr, aff, modality="PT", unit="SUVbsa"))
    assert bsa.contrast_limits == pytest.approx((0.0, 1.5))
    spect = display.display_settings(Volume(arr, aff, modality="NM", unit="counts"))
    assert spect.colormap == "hot" and spect.contrast_limits[1] <= 63
    mr = display.display_settings(Volume(arr, aff, modality="MR"))
    assert mr.colormap == "gray" and mr.blending == "translucent"
    assert set(mr.as_kwargs()) == {"colormap", "contrast_limits", "blending", "opacity"}
    with pytest.raises(InvalidInputError):
        display.display_settings(Volume(arr, aff, modality="CT", unit="HU"), window="abdomen")


def test_checkerboard_mask_alternates_tiles():
    from medfuse.display import checkerboard_mask

    mask = checkerboard_mask((2, 8, 8), tile=4)
    assert mask.shape == (2, 8, 8)
    assert mask[0, 0, 0] and not mask[0, 0, 4] and not mask[0, 4, 0] and mask[1, 4, 4]
    assert mask.mean() == 0.5


def test_curtain_mask_splits_at_position():
    from medfuse.display import curtain_mask

    mask = curtain_mask((3, 4, 10), position=0.3)
    assert mask[..., :3].all() and not mask[..., 3:].any()
    with pytest.raises(Exception, match="curtain"):
        curtain_mask((4, 4), position=1.5)


@pytest.mark.parametrize("modality,unit", [("CT", "HU"), ("CT", "arbitrary"), ("unknown", "arbitrary"), (None, None),
                                           ("MR", "HU")])
def test_ct_window_allowed(modality, unit):
    display.check_ct_window(modality, unit)


@pytest.mark.parametrize("modality,unit", [("PT", "SUVbw"), ("PT", "Bq/mL"), ("NM", "counts"), ("MR", "arbitrary"),
                                           ("unknown", "SUVbw"), (None, "counts")])
def test_ct_window_refused_outside_hu(modality, unit):
    with pytest.raises(InvalidInputError, match="HU"):
        display.check_ct_window(modality, unit)


@pytest.mark.parametrize("width,step,decimals", [(80, 1.0, 1), (1500, 100.0, 0), (0.73, 0.01, 3), (50000, 1000.0, 0),
                                                 (0.0, 1.0, 1), (float("nan"), 1.0, 1)])
def test_window_precision_keeps_three_digits(width, step, decimals):
    assert display.window_precision(width) == (pytest.approx(step), decimals)
    if np.isfinite(width) and width > 0:
        assert round(width, decimals) == pytest.approx(width, rel=0.01)  # the box shows the window it sets


def test_slider_range_covers_data_and_window():
    a = np.array([[-1000.0, 40.0], [np.nan, 2500.0]])
    assert display.slider_range(a, (0, 80)) == (-1000.0, 2500.0)
    assert display.slider_range(np.full((2, 2), 7, np.int16), (0, 80)) == (0.0, 80.0)  # the window stays inside
    assert display.slider_range(np.full((2, 2), np.nan), (0, 6)) == (0.0, 6.0)


def test_slider_range_reaches_a_single_hot_voxel_of_a_large_image():
    """A strided sample missed a resampled PET lesion's peak: the slider stopped at 13.57 SUV below 14.02."""
    a = np.zeros((160, 128, 128), np.float32)
    a[81, 63, 47] = 14.02
    a[80, 63, 47] = 13.57
    assert display.slider_range(a, (0, 6), max_samples=2_000_000) == (0.0, pytest.approx(14.02))


@pytest.mark.parametrize("value", [7.0, 0.0, -3.0, 1e20, -1e20, 3e38])
def test_percentile_limits_of_constant_images_increase(value):
    # napari refuses contrast limits with high == low; 1e20 + 1 == 1e20 in floating point.
    lo, hi = display.percentile_limits(np.full((3, 3, 3), value))
    assert lo == value and hi > lo and np.isfinite(hi)


# ----------------------------------------------------------------------------- orthogonal slices
#: The slice point and three markers 25 mm to the patient's left, anterior and superior of it (LPS mm).
_CENTRE = np.array([13.3, -22.1, 31.7])
_MARKERS = {"centre": (0.0, 0.0, 0.0), "left": (25.0, 0.0, 0.0), "anterior": (0.0, -25.0, 0.0),
            "superior": (0.0, 0.0, 25.0)}
_TILT = Rotation.from_euler("xyz", [12, -8, 20], degrees=True).as_matrix()

#: Voxel orders: name -> (direction, spacing). All hold the same anatomy.
_ORDERS = {
    "LPS": (np.eye(3), (2.0, 2.0, 2.0)),
    "RAS-stored": (np.diag([-1.0, -1.0, 1.0]), (2.0, 2.0, 2.0)),  # as nibabel's default NIfTI voxel order
    "sagittal-permuted": (np.array([[0.0, 0.0, -1.0], [1.0, 0.0, 0.0], [0.0, -1.0, 0.0]]), (2.0, 2.0, 2.0)),
    "oblique": (_TILT, (2.0, 2.0, 2.0)),
    "CT-1x1x4": (np.eye(3), (1.0, 1.0, 4.0)),
}


def _phantom(order: str, marker: str) -> Volume:
    """A Gaussian blob (sigma 4 mm, peak 100) at ``_CENTRE + _MARKERS[marker]`` in a 100 mm box of the given
    voxel order. Smooth, so that its centroid survives sampling on 4 mm slices."""
    direction, spacing = _ORDERS[order]
    shape = tuple(int(round(100 / s)) for s in spacing)
    half = (np.asarray(shape) - 1) / 2.0
    origin = _CENTRE + np.array([4.0, -3.0, 2.0]) - direction @ (half * spacing)  # box centre near, not on, the point
    vol = Volume(np.zeros(shape, np.float32), affine_from_geometry(spacing, origin, direction))
    ijk = np.stack(np.meshgrid(*[np.arange(n) for n in shape], indexing="ij"), axis=-1)
    dist = np.linalg.norm(vol.index_to_world(ijk) - (_CENTRE + _MARKERS[marker]), axis=-1)
    return vol.with_array((100 * np.exp(-0.5 * (dist / 4.0) ** 2)).astype(np.float32))


def _centroid(image: np.ndarray):
    """``(row, column)`` of the image's mass centre, or None for an (almost) empty plane."""
    w = np.nan_to_num(image)
    if w.sum() < 100:
        return None
    rows, cols = np.indices(w.shape)
    return np.array([(rows * w).sum(), (cols * w).sum()]) / w.sum()


#: Where each marker must land relative to the centre, in (rows, columns) per 25 mm, or None when the plane
#: misses it. Radiological: axial anterior up and patient left on the right; coronal superior up, left on the
#: right; sagittal superior up, anterior on the left.
_EXPECTED = {
    "axial": {"left": (0, 1), "anterior": (-1, 0), "superior": None},
    "coronal": {"left": (0, 1), "anterior": None, "superior": (-1, 0)},
    "sagittal": {"left": None, "anterior": (0, -1), "superior": (-1, 0)},
}


@pytest.mark.parametrize("order", list(_ORDERS))
def test_orthogonal_slices_put_markers_where_the_patient_has_them(order):
    """For every voxel order the rendered arrays show each marker on the right side, at 25 mm from the slice
    point (square millimetre pixels: a 1x1x4 mm CT is not squashed), and the planes pass through the point."""
    step = 1.0
    seen = {m: display.orthogonal_slices(_phantom(order, m), _CENTRE, mm_per_pixel=step) for m in _MARKERS}
    for plane, expected in _EXPECTED.items():
        centre = _centroid(seen["centre"][plane].image)
        assert centre is not None, f"{plane}: the plane misses the point"
        assert np.allclose(centre, seen["centre"][plane].world_to_pixel(_CENTRE), atol=0.5)
        assert np.nanmax(seen["centre"][plane].image) > 85  # through the point: 4 mm off it would give < 61
        for marker, offset in expected.items():
            found = _centroid(seen[marker][plane].image)
            if offset is None:
                assert found is None, f"{plane} shows the {marker} marker, which is off its plane"
            else:
                assert found is not None, f"{plane} misses the {marker} marker"
                assert np.allclose(found - centre, np.asarray(offset) * 25.0 / step, atol=0.75), (plane, marker)


def test_orthogonal_slices_labels_and_default_point():
    vol = _phantom("RAS-stored", "left")
    panels = display.orthogonal_slices(vol)  # default: through the brightest voxel, inside the marker
    assert set(panels) == {"axial", "coronal", "sagittal"}
    assert panels["axial"].labels == {"left": "R", "right": "L", "top": "A", "bottom": "P"}
    assert panels["coronal"].labels == {"left": "R", "right": "L", "top": "S", "bottom": "I"}
    assert panels["sagittal"].labels == {"left": "A", "right": "P", "top": "S", "bottom": "I"}
    centre = _centroid(panels["axial"].image)
    assert np.allclose(centre, panels["axial"].world_to_pixel(_CENTRE + _MARKERS["left"]), atol=1.5)


def test_orthogonal_slices_refuse_bad_requests():
    vol = _phantom("LPS", "centre")
    with pytest.raises(InvalidInputError, match="outside the volume"):
        display.orthogonal_slices(vol, _CENTRE + [0, 0, 200])
    with pytest.raises(InvalidInputError, match="interpolation"):
        display.orthogonal_slices(vol, _CENTRE, interpolation="cubic")
    with pytest.raises(InvalidInputError, match="mm_per_pixel"):
        display.orthogonal_slices(vol, _CENTRE, mm_per_pixel=0)
    with pytest.raises(InvalidInputError, match="complex"):
        display.orthogonal_slices(vol.with_array(vol.array.astype(np.complex64)), _CENTRE)


def test_orthogonal_snapshot_lays_out_the_three_panels():
    vol = _phantom("CT-1x1x4", "left")
    panels = display.orthogonal_slices(vol, _CENTRE, mm_per_pixel=1.0)
    snap = display.orthogonal_snapshot(vol, _CENTRE, mm_per_pixel=1.0, limits=(0, 100), labels=False, gap=5)
    widths = [p.image.shape[1] for p in panels.values()]
    assert snap.dtype == np.uint8 and snap.shape == (max(p.image.shape[0] for p in panels.values()),
                                                     sum(widths) + 10)
    axial = snap[:panels["axial"].image.shape[0], :widths[0]]
    row, col = (int(round(x)) for x in panels["axial"].world_to_pixel(_CENTRE + _MARKERS["left"]))
    assert axial[row, col] > 200 and axial[row, widths[0] - 1 - col] == 0  # the marker on the right, mirrored dark
    labelled = display.orthogonal_snapshot(vol, _CENTRE, mm_per_pixel=1.0, limits=(0, 100), gap=5)
    changed = np.argwhere(labelled[:, :widths[0]] != snap[:, :widths[0]])
    assert changed.size and changed[:, 1].min() < 12 and changed[:, 1].max() > widths[0] - 12  # R and L letters


@pytest.mark.parametrize("flip", [(1, 1, 1), (-1, -1, 1), (1, -1, -1)], ids=["LPS", "RAS", "LAI"])
def test_nearest_panels_are_the_voxel_slices_in_radiological_order(flip):
    """Through a voxel centre at the in-plane spacing, 'nearest' gives back the voxels themselves: for an LPS
    volume the axial panel is arr[:, :, k].T (rows A->P, columns R->L) and the coronal one arr[:, j, ::-1].T
    (rows S->I); other voxel orders are flipped into the same picture."""
    arr = np.random.default_rng(5).normal(size=(6, 7, 5)).astype(np.float32)
    aff = affine_from_geometry((1.5, 1.5, 1.5), (4.0, -6.0, 8.0), np.diag(np.asarray(flip, dtype=float)))
    vol = Volume(arr, aff)
    ijk = (2, 3, 1)
    panels = display.orthogonal_slices(vol, vol.index_to_world(ijk), mm_per_pixel=1.5, interpolation="nearest")
    lps = arr[:: flip[0], :: flip[1], :: flip[2]]  # the same voxels stored in LPS order
    i, j, k = (n if f > 0 else s - 1 - n for n, f, s in zip(ijk, flip, arr.shape))
    assert np.array_equal(panels["axial"].image, lps[:, :, k].T)
    assert np.array_equal(panels["coronal"].image, lps[:, j, ::-1].T)
    assert np.array_equal(panels["sagittal"].image, lps[i, :, ::-1].T)


def _small() -> Volume:
    return Volume(np.random.default_rng(0).random((20, 20, 20)).astype(np.float32), np.eye(4), modality="MR")


@pytest.mark.parametrize("call, says", [
    # "no" is a true value in Python: it meant yes.
    (lambda v: display.percentile_limits(v.array, ignore_zeros="no"), "ignore_zeros must be True or False"),
    (lambda v: display.display_settings(v, overlay="no"), "overlay must be True or False"),
    (lambda v: display.orthogonal_snapshot(v, labels="no"), "labels must be True or False"),
    # A str compared with floats (bare TypeError), True taken as 1, a fractional tile taken as it was.
    (lambda v: display.curtain_mask((4, 4), position="0.5"), "curtain position must be a fraction from 0 to 1"),
    (lambda v: display.curtain_mask((4, 4), position=True), "curtain position must be a fraction"),
    (lambda v: display.checkerboard_mask((4, 4), tile=2.5), "checkerboard tile must be a whole number"),
    # Reversed limits came back as a reversed slider; two far limits as a window of width inf.
    (lambda v: display.slider_range(v.array, (1, 0)), "high >= low"),
    (lambda v: display.limits_to_window(-1.7e308, 1.7e308), "too far apart"),
    # SimpleITK's "failed to allocate memory" for a 200,000-pixel-wide panel.
    (lambda v: display.orthogonal_slices(v, mm_per_pixel=1e-4), "200,000 pixels a side"),
])
def test_display_options_of_the_wrong_kind_are_typed_errors(call, says):
    with pytest.raises(InvalidInputError, match=says) as ei:
        call(_small())
    assert ei.value.fix


def test_display_edges_that_stay_allowed():
    v = _small()
    assert display.slider_range(np.full((4, 4), 3.0), (3.0, 3.0)) == (3.0, 3.0)  # a constant layer's limits meet
    assert display.window_precision(0) == (1.0, 1)  # what the panel asks for such a layer
    # 399: pixel centres strictly inside the 20 mm (401 put the last row and column on the far faces, all NaN).
    fine = display.orthogonal_slices(v, mm_per_pixel=0.05)["axial"].image
    assert fine.shape == (399, 399) and not np.isnan(fine).any()
    assert display.display_settings(v, overlay=np.True_).blending == "additive"


def test_a_mask_or_label_map_is_not_drawn_as_black_as_its_background():
    """Zeros are left out, so the low percentile sat on the first label: a 0/1 mask opened in napari all black
    (limits [1, 2]), and label 1 of a 0/1/2/4 map looked like the background."""
    mask = np.zeros((60, 60, 20), np.uint8)
    mask[20:40, 20:40, 5:15] = 1
    assert display.percentile_limits(mask) == (0.0, 1.0)
    mask[20:30] *= 2
    mask[25:28] *= 2
    assert display.percentile_limits(mask) == (0.0, 4.0)
    rare = np.zeros((100, 100, 10), np.uint16)  # a first label too rare for the low percentile to reach
    rare[:50] = 3
    rare[50:99] = 2
    rare[99, 0, 0] = 1
    rare[99, 1, 0] = 40  # and a last one too rare for the high percentile
    assert display.percentile_limits(rare) == (0.0, 40.0)
    assert display.percentile_limits(rare.astype(np.float32)) == (0.0, 40.0)  # a mask saved as float32 NIfTI
    assert display.percentile_limits(mask.astype(np.float32) / 4 * 3)[0] > 0  # not whole numbers: an image
    # Images are not label maps: a float one, an 8-bit one clipped at a floor, an MR in int16.
    image = np.zeros((10, 10, 10), np.float32)
    image[2:8, 2:8, 2:8] = np.linspace(1, 100, 216).reshape(6, 6, 6)
    assert display.percentile_limits(image)[0] == pytest.approx(np.percentile(np.linspace(1, 100, 216), 1))
    rng = np.random.default_rng(0)
    clipped = np.clip(rng.normal(60, 30, (64, 64, 8)), 20, 255).astype(np.uint8)
    clipped[:, :, :2] = 0
    assert display.percentile_limits(clipped)[0] == 20.0
