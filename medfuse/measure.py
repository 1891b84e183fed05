"""Measurements on a Volume: the value at a point, and statistics within a mask.

What napari's cursor readout shows, for scripts and the command line (``medfuse measure``):

* :func:`value_at`: the voxel value at a world point (LPS mm, :class:`~medfuse.volume.Volume`'s convention;
  ``space="ras"`` for RAS mm as 3D Slicer shows them, ``space="voxel"`` for indices ``(i, j, k)``), by nearest
  neighbour (the voxel whose cell holds the point, as napari's readout reads it) or trilinear interpolation.
* :func:`mask_statistics`: count, volume, mean, SD, min, max and the peak (mean in a 1 mL sphere around the
  maximum) of the voxels a mask selects, in the image's unit (HU, SUVbw, ...).

World and voxel positions are converted by :meth:`Volume.world_to_index` and :meth:`Volume.index_to_world`
alone: the geometry (spacing, origin, direction, a flipped or oblique axis) is never re-derived here.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Optional, Tuple

import numpy as np

from ._checks import choice, describe, whole
from .errors import InvalidInputError
from .volume import Volume

__all__ = ["OutsideFieldError", "value_at", "voxel_index", "mask_statistics", "PEAK_ML", "SPACES", "INTERPOLATIONS"]

#: How a point is given: LPS mm (the Volume's world), RAS mm (NIfTI, nibabel, 3D Slicer), or voxel indices.
SPACES = ("lps", "ras", "voxel")

#: How a value between voxel centres is read.
INTERPOLATIONS = ("nearest", "linear")

#: The volume of the peak's sphere in mL (PERCIST's SUVpeak: 1 cm^3; radius 6.2 mm).
PEAK_ML = 1.0


class OutsideFieldError(InvalidInputError):
    """A point outside the image's field of view: the message gives the field's extent."""


def _check_volume(volume: Any, name: str) -> Volume:
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"{name} must be a medfuse Volume, got {describe(volume)}",
                                fix="load it with medfuse.load(path) or wrap the array in medfuse.Volume(array, "
                                    "affine)")
    if volume.dtype.kind == "c":
        raise InvalidInputError(f"{name} holds complex voxels, which have no single value to measure",
                                fix=f"measure their magnitude: {name}.with_array(numpy.abs({name}.array))")
    return volume


def _field_text(volume: Volume, space: str) -> str:
    """The field of view in the words of ``space``: the index ranges, or the world box of the voxels' edges."""
    if space == "voxel":
        return "indices " + ", ".join(f"{a} 0..{n - 1}" for a, n in zip("ijk", volume.shape))
    lo, hi = volume.bounds(edges=True)
    if space == "ras":  # the same box with x and y negated: their ends swap
        lo, hi = np.array([-hi[0], -hi[1], lo[2]]), np.array([-lo[0], -lo[1], hi[2]])
    return (", ".join(f"{a} {a_lo:.1f}..{a_hi:.1f}" for a, a_lo, a_hi in zip("xyz", lo, hi))
            + f" mm {space.upper()}" + (" (a box around the oblique grid)" if volume.is_oblique else ""))


def _index(volume: Volume, point: Any, space: str) -> np.ndarray:
    """The fractional voxel index ``(3,)`` of one point given in ``space``, clipped to the voxel centres' range.

    Raises:
        InvalidInputError: not 3 finite numbers. OutsideFieldError: beyond the voxels' outer edges.
    """
    # The form (3 numbers) checked as the Volume checks any point, its message naming indices or LPS positions.
    if space == "voxel":
        volume.index_to_world(point)
        ijk = np.asarray(point, dtype=float)
    else:
        volume.world_to_index(point)
        ijk = volume.world_to_index(np.asarray(point, dtype=float) * ((-1.0, -1.0, 1.0) if space == "ras" else 1.0))
    if ijk.shape != (3,):
        raise InvalidInputError(f"the point must be one position of 3 coordinates, got shape {ijk.shape}",
                                fix="measure several points one at a time, e.g. [value_at(v, p) for p in points]")
    if not np.all(np.isfinite(ijk)):
        raise InvalidInputError("the point's coordinates must be finite numbers", fix="give 3 finite numbers")
    shape = np.asarray(volume.shape)
    # A point on a voxel's outer edge is inside (1e-6 of a voxel: the round trip through the affine).
    if np.any(ijk < -0.5 - 1e-6) or np.any(ijk > shape - 0.5 + 1e-6):
        given = ", ".join(f"{c:g}" for c in np.asarray(point, dtype=float))
        where = f"voxel ({given})" if space == "voxel" else f"the point ({given}) mm {space.upper()}"
        raise OutsideFieldError(f"{where} lies outside the image, whose field covers {_field_text(volume, space)}",
                                fix="give indices within those ranges" if space == "voxel" else
                                "give a point inside that field (medfuse info shows the image's origin and extent)")
    return np.clip(ijk, 0, shape - 1)


def voxel_index(volume: Volume, point: Any, *, space: str = "lps") -> Tuple[int, int, int]:
    """The voxel whose cell holds a point: the one :func:`value_at` reads by nearest neighbour.

    Args:
        volume: the image.
        point: ``(x, y, z)`` in mm in ``space``, or fractional voxel indices with ``space="voxel"``.
        space: (keyword-only) ``"lps"`` (default), ``"ras"`` or ``"voxel"``, as :func:`value_at` takes them.

    Returns:
        ``(i, j, k)``, Python ints (a point on the edge between two voxels goes to the higher index).

    Raises:
        InvalidInputError: ``volume`` is not a real-valued Volume, the point is not 3 finite numbers, or
            ``space`` is unknown.
        OutsideFieldError: the point lies outside the image; the message gives the field's extent.
    """
    volume = _check_volume(volume, "volume")
    ijk = _index(volume, point, choice(space, "space", SPACES))
    # floor(x + 0.5), not round(): NumPy rounds halves to even, and a point on a cell edge must go one way.
    idx = np.minimum(np.floor(ijk + 0.5).astype(int), np.asarray(volume.shape) - 1)
    return tuple(int(i) for i in idx)  # type: ignore[return-value]


def value_at(volume: Volume, point: Any, *, space: str = "lps", interpolation: str = "nearest") -> float:
    """The image's value at one point, in its unit (``volume.unit``).

    Args:
        volume: the image.
        point: ``(x, y, z)`` in mm in ``space``, or ``(i, j, k)`` voxel indices (fractional allowed) with
            ``space="voxel"``.
        space: (keyword-only) ``"lps"`` (default: the Volume's world, as DICOM, ITK and ``medfuse info`` give
            it), ``"ras"`` (NIfTI, nibabel, 3D Slicer: x and y negated) or ``"voxel"``.
        interpolation: (keyword-only) ``"nearest"`` (default): the value of the voxel whose cell holds the
            point, as napari's cursor readout shows it; ``"linear"``: trilinear between the 8 nearest voxel
            centres (in the outer half voxel, the border voxels' values are carried out to the edge).

    Returns:
        The value as a float (NaN where the voxel holds NaN, or linear interpolation meets one).

    Raises:
        InvalidInputError: ``volume`` is not a real-valued Volume, the point is not 3 finite numbers, or
            ``space``/``interpolation`` is unknown.
        OutsideFieldError: the point lies outside the image (beyond its voxels' outer edges); the message
            gives the field's extent in ``space``.
    """
    volume = _check_volume(volume, "volume")
    interpolation = choice(interpolation, "interpolation", INTERPOLATIONS)
    if interpolation == "nearest":
        return float(volume.array[voxel_index(volume, point, space=space)])
    ijk = _index(volume, point, choice(space, "space", SPACES))
    from scipy.ndimage import map_coordinates

    # The 2x2x2 voxels around the point only: a float64 copy of a whole CT per point would take gigabytes.
    lo = np.minimum(np.floor(ijk).astype(int), np.maximum(np.asarray(volume.shape) - 2, 0))
    block = np.asarray(volume.array[lo[0]:lo[0] + 2, lo[1]:lo[1] + 2, lo[2]:lo[2] + 2], dtype=np.float64)
    # order=1 is trilinear; the index clipped to the centres' range keeps the outer half voxel at the border
    # voxels' values.
    return float(map_coordinates(block, (ijk - lo).reshape(3, 1), order=1, mode="nearest")[0])


def _mask_on_grid(mask: Volume, volume: Volume, transform: Any = None) -> "tuple[np.ndarray, bool]":
    """The mask's voxels on ``volume``'s grid (nearest neighbour, through ``transform`` or by the scanners'
    placement) and whether it was resampled."""
    if transform is None and mask.same_grid(volume):
        return np.asarray(mask.array), False
    from .registration import resample

    return np.asarray(resample(mask, volume, transform=transform, interpolation="nearest", default=0).array), True


def _peak(volume: Volume, at: np.ndarray) -> float:
    """Mean of the voxels whose centres lie within the 1 mL sphere centred on voxel ``at`` (the maximum's)."""
    radius = (3.0 * PEAK_ML * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm
    reach = np.ceil(radius / np.asarray(volume.spacing)).astype(int)
    lo = np.maximum(at - reach, 0)
    hi = np.minimum(at + reach, np.asarray(volume.shape) - 1)
    box = np.stack(np.meshgrid(*(np.arange(a, b + 1) for a, b in zip(lo, hi)), indexing="ij"), axis=-1)
    dist = np.linalg.norm(volume.index_to_world(box) - volume.index_to_world(at), axis=-1)
    values = np.asarray(volume.array[lo[0]:hi[0] + 1, lo[1]:hi[1] + 1, lo[2]:hi[2] + 1], dtype=np.float64)
    inside = values[(dist <= radius) & np.isfinite(values)]
    return float(inside.mean())


def _listed(values: np.ndarray, most: int = 12) -> str:
    """The first ``most`` values, then how many more."""
    shown = ", ".join(f"{v:g}" for v in values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


def mask_statistics(volume: Volume, mask: Volume, *, label: Optional[int] = None,
                    transform: Any = None) -> Dict[str, Any]:
    """Statistics of the image's voxels that a mask selects, in the image's unit.

    A mask on another grid is resampled onto the image's by nearest neighbour (:func:`medfuse.resample`): a
    voxel of the image counts when the mask voxel its centre falls in is selected. Without ``transform`` the two
    are placed as the scanners placed them, right for one session (a PET/CT); a mask drawn on another session's
    image (a baseline lesion measured on the follow-up) needs the transform between the two images, else the
    figures are of the wrong voxels (a lesion's SUVmax read 9.85 for a true 14.55). ``mask_resampled`` says that
    the mask was resampled.

    Args:
        volume: the image measured.
        mask: the region: its non-zero voxels, or with ``label`` those equal to it (a label map).
        label: (keyword-only) the label to measure in a label map; None (default) takes every non-zero voxel.
        transform: (keyword-only) a :class:`~medfuse.Transform` mapping ``volume``'s points to the mask's (what
            ``medfuse.register(volume, image_the_mask_was_drawn_on)`` returns as ``.transform``); None: the
            scanners' placement.

    Returns:
        A dict: ``count`` (voxels selected), ``volume_ml``, ``mean``, ``sd`` (population standard deviation,
        as ``numpy.std``), ``min``, ``max``, ``max_at_lps_mm`` (the first maximum's voxel centre), ``peak``
        (mean of the voxels whose centres lie within a 1 mL sphere, radius 6.2 mm, centred on that maximum: a
        simple SUVpeak, not PERCIST's search for the hottest sphere; the sphere may reach beyond the mask),
        ``unit``, ``nonfinite`` (selected voxels holding NaN or infinity, left out of the figures),
        ``mask_resampled`` and ``label``.

    Raises:
        InvalidInputError: ``volume`` or ``mask`` is not a real-valued Volume, ``label`` is not a whole number,
            or the mask selects no voxel of the image (none of its selected voxels lies over the image, or
            every voxel it selects is NaN).
    """
    volume = _check_volume(volume, "volume")
    mask = _check_volume(mask, "mask")
    label = whole(label, "label", example="label=1", none_ok=True)
    on_grid, resampled = _mask_on_grid(mask, volume, transform)
    selected = on_grid != 0 if label is None else on_grid == label
    values = np.asarray(volume.array[selected], dtype=np.float64)
    finite = np.isfinite(values)
    which = "non-zero" if label is None else f"label {label}"
    if not finite.any():
        why = "holds only NaN or infinity there" if values.size else "has no such voxel over the image"
        raise InvalidInputError(f"the mask selects no voxel to measure: its {which} region {why}",
                                fix="check that the mask belongs to this image (same patient and placement) and "
                                    "the label"
                                    + (": its labels are " + _listed(np.unique(on_grid))
                                       if label is not None else ""))
    good = values[finite]
    flat = np.flatnonzero(selected.ravel())[finite]
    at = np.array(np.unravel_index(flat[int(np.argmax(good))], volume.shape))
    return {
        "count": int(selected.sum()),
        "volume_ml": float(selected.sum() * np.prod(volume.spacing) / 1000.0),
        "mean": float(good.mean()),
        "sd": float(good.std()),
        "min": float(good.min()),
        "max": float(good.max()),
        "max_at_lps_mm": [float(c) for c in volume.index_to_world(at)],
        "peak": _peak(volume, at),
        "unit": volume.unit,
        "nonfinite": int(values.size - good.size),
        "mask_resampled": resampled,
        "label": label,
    }
