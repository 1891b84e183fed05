"""Measurements on a Volume: the value at a point, and statistics within a mask.

What napari's cursor readout shows, for scripts and the command line (``medfuse measure``):

* :func:`value_at`: the voxel value at a world point (LPS mm, :class:`~medfuse.volume.Volume`'s convention;
  ``space="ras"`` for RAS mm as 3D Slicer shows them, ``space="voxel"`` for indices ``(i, j, k)``), by nearest
  neighbour (the voxel whose cell holds the point, as napari's readout reads it) or trilinear interpolation.
* :func:`mask_statistics`: count, volume, mean, SD, min, max and the peak (the hottest 1 mL sphere centred in
  the region, PERCIST's SUVpeak) of the voxels a mask selects, in the image's unit (HU, SUVbw, ...).
* :func:`region_statistics`: the same figures for several labels of one label map, each with the ratio of its
  mean to a reference label's (an amyloid or FDG PET's SUVR: cortex over cerebellum or pons).

World and voxel positions are converted by :meth:`Volume.world_to_index` and :meth:`Volume.index_to_world`
alone: the geometry (spacing, origin, direction, a flipped or oblique axis) is never re-derived here.
"""

from __future__ import annotations

import math
import warnings
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np

from ._checks import choice, describe, whole
from .errors import InvalidInputError, MedfuseWarning
from .volume import Volume

__all__ = ["OutsideFieldError", "value_at", "voxel_index", "mask_statistics", "region_statistics", "PEAK_ML",
           "SPACES", "INTERPOLATIONS"]

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


def _mask_selects(values: np.ndarray, label: Optional[int], threshold: Optional[float]) -> np.ndarray:
    """The voxels a mask's values select: non-zero, equal to ``label``, or at least ``threshold``."""
    if threshold is not None:
        return values >= threshold
    return values != 0 if label is None else values == label


def _check_mask_values(mask: Volume, label: Optional[int], threshold: Optional[float]) -> None:
    """Refuse a mask whose values are not whole numbers when neither a label nor a threshold says what it selects.

    Why: a probability map (a smoothed or a network's mask, 0..1) counted every voxel above 0, its faint tails
    and rounding residues too: a 27 mL sphere measured 5,378 mL, its maximum in another lesion.
    """
    if label is not None and threshold is not None:
        raise InvalidInputError("give label or threshold, not both",
                                fix="label= picks one value of a label map; threshold= selects a probability "
                                    "map's voxels at or above it")
    if threshold is not None or mask.dtype.kind not in "fc":
        return
    arr = np.asarray(mask.array)
    finite = arr[np.isfinite(arr)]
    odd = finite[finite != np.round(finite)]
    if odd.size:
        raise InvalidInputError(
            f"the mask holds values that are not whole numbers (e.g. {_listed(np.unique(odd), 3)}): it looks like "
            "a probability map, and every voxel above 0 would count",
            fix="say which voxels it selects: threshold=0.5 (medfuse measure --threshold 0.5), or threshold it "
                "yourself (mask.with_array(mask.array >= 0.5))")


def _outside_fraction(mask: Volume, volume: Volume, chosen: np.ndarray, transform: Any) -> Optional[float]:
    """The fraction of the mask's selected voxels (on its own grid) whose centres lie outside the image's field;
    None where it cannot be told (a deformable transform, which has no exact inverse here)."""
    if transform is not None and not transform.is_linear:
        return None
    # mask index -> image index, one matrix (the transform maps the image's points to the mask's)
    to_image = np.linalg.inv(np.asarray(volume.affine, dtype=float))
    if transform is not None:
        to_image = to_image @ np.linalg.inv(transform.matrix)
    m = to_image @ np.asarray(mask.affine, dtype=float)
    shape = np.asarray(volume.shape)

    def outside(idx: np.ndarray) -> np.ndarray:
        ijk = idx @ m[:3, :3].T + m[:3, 3]
        return np.any((ijk < -0.5 - 1e-6) | (ijk > shape - 0.5 + 1e-6), axis=1)

    corners = np.array([[a, b, c] for a in (0, mask.shape[0] - 1) for b in (0, mask.shape[1] - 1)
                        for c in (0, mask.shape[2] - 1)], dtype=float)
    if not outside(corners).any():  # the whole mask grid lies over the image (the usual case): no voxel to test
        return 0.0
    total = int(chosen.sum())
    if total == 0:
        return 0.0
    n_out = 0
    for k0 in range(0, chosen.shape[0], 16):  # a few slices at a time: a whole-body mask has tens of millions
        idx = np.argwhere(chosen[k0:k0 + 16]).astype(float)
        idx[:, 0] += k0
        n_out += int(outside(idx).sum())
    return n_out / total


def _sphere(volume: Volume) -> np.ndarray:
    """The 1 mL sphere as a boolean kernel of voxel offsets (centre in the middle): the offsets whose world
    distance, through the affine (oblique and anisotropic grids too), is within its radius."""
    radius = (3.0 * PEAK_ML * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm: 6.2
    lin = np.asarray(volume.affine, dtype=float)[:3, :3]
    reach = np.ceil(radius / np.asarray(volume.spacing)).astype(int)
    offsets = np.stack(np.meshgrid(*(np.arange(-r, r + 1) for r in reach), indexing="ij"), axis=-1)
    return np.linalg.norm(offsets @ lin.T, axis=-1) <= radius


def _sphere_mean(volume: Volume, kernel: np.ndarray, at: np.ndarray) -> float:
    """Mean of the finite voxels of the sphere ``kernel`` centred on voxel ``at`` (cut at the image's edges)."""
    reach = np.asarray(kernel.shape) // 2
    lo, hi = at - reach, at + reach + 1
    cut_lo, cut_hi = np.maximum(lo, 0), np.minimum(hi, np.asarray(volume.shape))
    k = kernel[tuple(slice(a - b, c - b) for a, b, c in zip(cut_lo, lo, cut_hi))]
    values = np.asarray(volume.array[tuple(slice(a, c) for a, c in zip(cut_lo, cut_hi))], dtype=np.float64)[k]
    return float(values[np.isfinite(values)].mean())


def _convolved(arrays: Sequence[np.ndarray], kernel: np.ndarray) -> List[np.ndarray]:
    """Each of ``arrays`` (one shape) convolved with an odd-sized, point-symmetric ``kernel``, cropped to their
    shape (zeros beyond their edges), by FFT; the kernel's transform is made once. Why not scipy.signal:
    importing it took 5 s on a busy machine, more than the measurement."""
    from scipy import fft

    shape = arrays[0].shape
    full = [n + k - 1 for n, k in zip(shape, kernel.shape)]
    size = [fft.next_fast_len(n, real=True) for n in full]
    k_hat = fft.rfftn(kernel, size)
    crop = tuple(slice(k // 2, k // 2 + n) for n, k in zip(shape, kernel.shape))
    return [fft.irfftn(fft.rfftn(a, size) * k_hat, size)[crop] for a in arrays]


def _bounds(selected: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """The index box ``[lo, hi)`` of a non-empty boolean array's True voxels (projections: argwhere took 0.1 s a
    region on a brain's label map)."""
    lo, hi = [], []
    for axis in range(3):
        on = np.flatnonzero(selected.any(axis=tuple(a for a in range(3) if a != axis)))
        lo.append(on[0])
        hi.append(on[-1] + 1)
    return np.asarray(lo), np.asarray(hi)


def _box(lo: Any, hi: Any) -> Tuple[slice, ...]:
    """The index box ``[lo, hi)`` as slices."""
    return tuple(slice(int(a), int(b)) for a, b in zip(lo, hi))


def _peak_search(volume: Volume, regions: Sequence[Tuple[np.ndarray, np.ndarray]]) -> List[Tuple[float, np.ndarray,
                                                                                                  float]]:
    """The hottest 1 mL sphere centred on a voxel of each region: (its mean, its centre's index, its volume in mL).

    ``regions``: each ``(lo, crop)``, the region's selected voxels cut to their box, ``lo`` the box's first
    index. Every selected voxel that could win is tried (PERCIST's SUVpeak, which places the sphere where its
    mean is highest): sums and voxel counts of the sphere around every voxel come from one FFT convolution per
    slab of the regions' common box (:func:`_convolved`), shared by all regions (5 labels of a 240 x 240 x 155
    map: 1.5-2.1 s of CPU, 2.2-2.8 s searched one by one). Why a search: centred on the first maximum, a uniform 37 mm hot sphere (every voxel
    tied) put the sphere on its edge and read 38 % low. The winners' means are then recomputed exactly.
    """
    from scipy.ndimage import maximum_filter

    kernel = _sphere(volume)
    reach = np.asarray(kernel.shape) // 2
    shape = np.asarray(volume.shape)
    values = np.asarray(volume.array)
    # Why the pruning: the search over a whole-body mask took minutes. A sphere's mean is at most its largest
    # value, so only voxels with a value at least the mean of the sphere around the region's first maximum
    # within reach can beat that sphere: the hot spots' neighbourhoods are what is left.
    ulo = np.maximum(np.min([lo for lo, _ in regions], axis=0) - reach, 0)
    uhi = np.minimum(np.max([lo + np.asarray(c.shape) for lo, c in regions], axis=0) + reach, shape)
    block = values[_box(ulo, uhi)]
    block = np.where(np.isfinite(block), block, -np.inf)
    near_max = maximum_filter(block, size=tuple(2 * reach + 1), mode="constant", cval=-np.inf)
    del block
    kept = []
    for lo, crop in regions:
        own = values[_box(lo, lo + np.asarray(crop.shape))]
        first = np.unravel_index(int(np.argmax(np.where(crop & np.isfinite(own), own, -np.inf))), crop.shape)
        floor = _sphere_mean(volume, kernel, lo + np.asarray(first))
        keep = crop & (near_max[_box(lo - ulo, lo - ulo + np.asarray(crop.shape))]
                       >= floor - 1e-9 * abs(floor))  # slack: the FFT's rounding
        keep[first] = True
        klo, khi = _bounds(keep)
        kept.append((lo + klo, lo + khi, keep[_box(klo, khi)]))
    del near_max
    lo = np.min([k[0] for k in kept], axis=0)
    hi = np.max([k[1] for k in kept], axis=0)
    kf = kernel.astype(np.float64)
    best = [-np.inf] * len(kept)
    best_at: List[Optional[np.ndarray]] = [None] * len(kept)
    # Slabs along the first axis keep the float64 copies to ~16 M voxels whatever the regions' extent.
    plane = int(np.prod(hi[1:] - lo[1:] + 2 * reach[1:]))
    step = max(1, 16_000_000 // max(plane, 1) - 2 * int(reach[0]))
    for z0 in range(int(lo[0]), int(hi[0]), step):
        z1 = min(z0 + step, int(hi[0]))
        inside = [n for n, (rlo, rhi, _) in enumerate(kept) if rlo[0] < z1 and rhi[0] > z0]
        if not inside:
            continue
        blo = np.maximum([z0, *lo[1:]] - reach, 0)
        bhi = np.minimum([z1, *hi[1:]] + reach, shape)
        block = np.asarray(volume.array[_box(blo, bhi)], dtype=np.float64)
        finite = np.isfinite(block)
        sums, counts = _convolved([np.where(finite, block, 0.0), finite.astype(np.float64)], kf)
        counts = np.rint(counts)
        for n in inside:
            rlo, rhi, keep = kept[n]
            a = np.array([max(z0, rlo[0]), *rlo[1:]])  # the region's part of this slab
            b = np.array([min(z1, rhi[0]), *rhi[1:]])
            c = counts[_box(a - blo, b - blo)]
            chosen = keep[_box(a - rlo, b - rlo)] & (c > 0)
            if not chosen.any():
                continue
            means = np.where(chosen, sums[_box(a - blo, b - blo)] / np.maximum(c, 1.0), -np.inf)
            k = int(np.argmax(means))
            if means.flat[k] > best[n]:
                best[n], best_at[n] = means.flat[k], np.array(np.unravel_index(k, means.shape)) + a
    ml = float(kernel.sum() * abs(np.linalg.det(np.asarray(volume.affine, dtype=float)[:3, :3])) / 1000.0)
    # A region whose every sphere holds only NaN: the caller has refused that already.
    return [(_sphere_mean(volume, kernel, at if at is not None else rlo), at if at is not None else rlo, ml)
            for at, (rlo, _, _) in zip(best_at, kept)]


def _listed(values: np.ndarray, most: int = 12) -> str:
    """The first ``most`` values, then how many more."""
    shown = ", ".join(f"{v:g}" for v in values[:most])
    return shown + (f" and {len(values) - most} more" if len(values) > most else "")


def mask_statistics(volume: Volume, mask: Volume, *, label: Optional[int] = None, threshold: Optional[float] = None,
                    transform: Any = None) -> Dict[str, Any]:
    """Statistics of the image's voxels that a mask selects, in the image's unit.

    A mask on another grid is resampled onto the image's by nearest neighbour (:func:`medfuse.resample`): a
    voxel of the image counts when the mask voxel its centre falls in is selected. Without ``transform`` the two
    are placed as the scanners placed them, right for one session (a PET/CT); a mask drawn on another session's
    image (a baseline lesion measured on the follow-up) needs the transform between the two images, else the
    figures are of the wrong voxels (a lesion's SUVmax read 9.85 for a true 14.55). ``mask_resampled`` says that
    the mask was resampled. Where more than 1 % of the mask's selected voxels lie outside the image's field (a
    lesion at the edge of the scanned range), a :class:`~medfuse.errors.MedfuseWarning` says so: the figures are
    of the part inside.

    Args:
        volume: the image measured.
        mask: the region: its non-zero voxels, with ``label`` those equal to it (a label map), with ``threshold``
            those at or above it (a probability map). A mask of values that are not whole numbers needs
            ``threshold``.
        label: (keyword-only) the label to measure in a label map; None (default) takes every non-zero voxel.
        threshold: (keyword-only) select the mask's voxels whose value is at least this (e.g. 0.5); not with
            ``label``.
        transform: (keyword-only) a :class:`~medfuse.Transform` mapping ``volume``'s points to the mask's (what
            ``medfuse.register(volume, image_the_mask_was_drawn_on)`` returns as ``.transform``); None: the
            scanners' placement. Registered the other way, the image measured as the moving one (labels on a
            T1, the PET in its own space: ``reg = medfuse.register(t1, pet)``), pass
            ``transform=reg.transform.inverse()``: ``reg.transform`` itself maps the T1's points to the PET's,
            and gives figures of the wrong voxels (a region's mean 867.4 for a true 1057.3). Several labels and
            a reference region's ratio (SUVR): :func:`region_statistics`.

    Returns:
        A dict: ``count`` (voxels selected), ``volume_ml``, ``mask_ml`` (the selected volume on the mask's own
        grid, before resampling), ``outside_fraction`` (the part of it outside the image's field; None after a
        deformable transform), ``mean``, ``sd`` (population standard deviation, as ``numpy.std``), ``min``,
        ``max``, ``max_voxels`` (how many selected voxels hold the maximum), ``max_at_lps_mm`` (the first of
        them), ``peak`` (the highest mean of the voxels whose centres lie within a 1 mL sphere, radius 6.2 mm,
        centred on any selected voxel: PERCIST's SUVpeak search; the sphere may reach beyond the mask, not
        beyond the image), ``peak_at_lps_mm`` (that sphere's centre), ``peak_ml`` (the volume of the voxels the
        sphere holds on this grid: 0.93 mL on 2 x 2 x 3.27 mm voxels), ``unit``, ``nonfinite`` (selected voxels
        holding NaN or infinity, left out of the figures), ``mask_resampled``, ``label`` and ``threshold``.

    Raises:
        InvalidInputError: ``volume`` or ``mask`` is not a real-valued Volume, ``label`` is not a whole number,
            ``threshold`` not a finite number, both given, a mask of fractional values without ``threshold``,
            or the mask selects no voxel of the image (none of its selected voxels lies over the image, or
            every voxel it selects is NaN).
    """
    volume = _check_volume(volume, "volume")
    mask = _check_volume(mask, "mask")
    label = whole(label, "label", example="label=1 (several labels: medfuse.measure.region_statistics(volume, mask, "
                                          "labels=[1, 2]))", none_ok=True)
    if threshold is not None and (isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.number))
                                  or not math.isfinite(float(threshold))):
        raise InvalidInputError(f"threshold must be a finite number, got {describe(threshold)}",
                                fix="e.g. threshold=0.5 for a probability map")
    _check_mask_values(mask, label, threshold)
    transform = _as_transform(transform)
    on_grid, resampled = _mask_on_grid(mask, volume, transform)
    figures, region = _region_figures(volume, mask, on_grid, resampled, label, threshold, transform)
    _add_peaks(volume, [figures], [region])
    return figures


def _as_transform(transform: Any) -> Any:
    """``transform`` as a medfuse Transform (a SimpleITK one wrapped, as resample() takes one), or None."""
    if transform is None:
        return None
    from .registration.transforms import Transform

    return transform if isinstance(transform, Transform) else Transform(transform)


def _region_figures(volume: Volume, mask: Volume, on_grid: np.ndarray, resampled: bool, label: Optional[int],
                    threshold: Optional[float], transform: Any) -> Tuple[Dict[str, Any], Tuple[np.ndarray, np.ndarray]]:
    """:func:`mask_statistics`' figures of one region of the mask already on the image's grid (``on_grid``), the
    peak's left None; and the region for :func:`_peak_search` (its box's first index, its voxels cut to the box).

    Raises:
        InvalidInputError: the region selects no finite voxel of the image.
    """
    selected = _mask_selects(on_grid, label, threshold)
    values = np.asarray(volume.array[selected], dtype=np.float64)
    finite = np.isfinite(values)
    which = ("non-zero" if label is None else f"label {label}") if threshold is None else f"at or above {threshold:g}"
    if not finite.any():
        why = "holds only NaN or infinity there" if values.size else "has no such voxel over the image"
        raise InvalidInputError(f"the mask selects no voxel to measure: its {which} region {why}",
                                fix="check that the mask belongs to this image (same patient and placement) and "
                                    "the label"
                                    + (": its labels are " + _listed(np.unique(on_grid))
                                       if label is not None else ""))
    own = _mask_selects(np.asarray(mask.array), label, threshold)
    mask_ml = float(own.sum() * abs(np.linalg.det(np.asarray(mask.affine, dtype=float)[:3, :3])) / 1000.0)
    outside = _outside_fraction(mask, volume, own, transform)
    if outside is not None and outside > 0.01:
        of_label = f" of label {label}" if label is not None else ""
        warnings.warn(f"{100 * outside:.1f} % of the mask's region{of_label} ({mask_ml:.4g} mL on its own grid) lies "
                      "outside the image's field of view: the figures are of the part inside (a lesion at the edge "
                      "of the scanned range, or a mask placed wrongly)", MedfuseWarning, stacklevel=3)
    good = values[finite]
    flat = np.flatnonzero(selected.ravel())[finite]
    top = float(good.max())
    at = np.array(np.unravel_index(flat[int(np.argmax(good))], volume.shape))
    lo, hi = _bounds(selected)
    figures = {
        "count": int(selected.sum()),
        "volume_ml": float(selected.sum() * np.prod(volume.spacing) / 1000.0),
        "mask_ml": mask_ml,
        "outside_fraction": outside,
        "mean": float(good.mean()),
        "sd": float(good.std()),
        "min": float(good.min()),
        "max": top,
        "max_voxels": int((good == top).sum()),
        "max_at_lps_mm": [float(c) for c in volume.index_to_world(at)],
        "peak": None,  # filled by _add_peaks: one search for all regions
        "peak_at_lps_mm": None,
        "peak_ml": None,
        "unit": volume.unit,
        "nonfinite": int(values.size - good.size),
        "mask_resampled": resampled,
        "label": label,
        "threshold": None if threshold is None else float(threshold),
    }
    return figures, (lo, selected[_box(lo, hi)])


def _add_peaks(volume: Volume, figures: Sequence[Dict[str, Any]],
               regions: Sequence[Tuple[np.ndarray, np.ndarray]]) -> None:
    """Fill each region's ``peak``, ``peak_at_lps_mm`` and ``peak_ml`` from one shared :func:`_peak_search`."""
    for fig, (peak, at, ml) in zip(figures, _peak_search(volume, regions)):
        fig.update(peak=peak, peak_at_lps_mm=[float(c) for c in volume.index_to_world(at)], peak_ml=ml)


def _labels_given(labels: Any) -> List[int]:
    """``labels`` (one whole number or a sequence of them) as a list without repeats, in the order given."""
    if isinstance(labels, (int, np.integer)) and not isinstance(labels, (bool, np.bool_)):
        labels = [labels]
    if isinstance(labels, (str, bytes)) or not isinstance(labels, (list, tuple, range, np.ndarray)) \
            or np.ndim(labels) != 1 or len(labels) == 0:
        raise InvalidInputError(f"labels must be a list of whole numbers, got {describe(labels)}",
                                fix="pass e.g. labels=[1, 2], or labels=None for every label of the mask")
    return list(dict.fromkeys(whole(x, "each label", example="labels=[1, 2]") for x in labels))


def region_statistics(volume: Volume, mask: Volume, *, labels: Any = None, reference: Optional[int] = None,
                      transform: Any = None) -> Dict[int, Dict[str, Any]]:
    """:func:`mask_statistics` for several labels of one label map, each with the ratio of its mean to a
    reference label's: an amyloid or FDG PET's SUVR (a cortical region's mean over the cerebellum's or pons').

    The mask is put on the image's grid once (nearest neighbour, through ``transform`` as
    :func:`mask_statistics` takes it), and one peak search serves every label. Labels on a T1 (an atlas or a
    FreeSurfer segmentation) measured on the PET in its own space need the transform from the PET's points to
    the T1's: with ``reg = medfuse.register(t1, pet)`` (PET moving, as PET-to-MR registration runs), that is
    ``transform=reg.transform.inverse()``; ``reg.transform`` maps the other way and gives figures of the wrong
    voxels.

    Args:
        volume: the image measured (a PET, in SUV or Bq/mL: the ratio has no unit either way).
        mask: the label map: whole numbers, 0 for background.
        labels: (keyword-only) the labels to measure, a list of whole numbers; None (default) every non-zero
            label the mask holds that selects a voxel of the image (those wholly outside its field of view are
            left out, with a :class:`~medfuse.errors.MedfuseWarning` listing them).
        reference: (keyword-only) the label whose mean the others' are divided by (e.g. the cerebellum's); its
            own figures are in the result too. None: no ratio.
        transform: (keyword-only) a :class:`~medfuse.Transform` mapping ``volume``'s points to the mask's, as
            :func:`mask_statistics` takes it; None: the scanners' placement.

    Returns:
        A dict from each label (the ones asked, then ``reference`` if not among them) to its figures as
        :func:`mask_statistics` gives them (``threshold`` None), plus ``ratio_to_reference``: its mean divided
        by the reference's (1.0 for the reference itself; None without ``reference``).

    Raises:
        InvalidInputError: ``volume`` or ``mask`` is not a real-valued Volume, a label or ``reference`` is not a
            whole number, the mask holds values that are not whole numbers or no label at all, a label selects no
            voxel of the image (none over it, or only NaN), or the reference's mean is 0 (no ratio to it).
    """
    volume = _check_volume(volume, "volume")
    mask = _check_volume(mask, "mask")
    reference = whole(reference, "reference", example="reference=3 (the cerebellum's label)", none_ok=True)
    _check_mask_values(mask, None, None)  # a label map: a probability map has no labels
    if labels is None:
        present = np.unique(np.asarray(mask.array))
        asked = [int(v) for v in present[np.isfinite(present) & (present != 0)]]
        if not asked:
            raise InvalidInputError("the mask holds no label: every voxel is 0",
                                    fix="check that MASK is the label map (e.g. a segmentation), not an empty mask")
    else:
        asked = _labels_given(labels)
    order = asked + ([reference] if reference is not None and reference not in asked else [])
    transform = _as_transform(transform)
    on_grid, resampled = _mask_on_grid(mask, volume, transform)
    figures, regions, outside = {}, [], []
    for lab in order:
        try:
            figures[lab], region = _region_figures(volume, mask, on_grid, resampled, lab, None, transform)
        except InvalidInputError:
            if labels is not None or lab == reference:  # asked for by name: refused, as mask_statistics does
                raise
            # An atlas over the whole head on a PET of limited axial range: a label wholly outside its field is
            # left out, said, rather than refusing every label.
            outside.append(lab)
            continue
        regions.append(region)
    if outside:
        warnings.warn(f"{len(outside)} of the mask's {len(asked)} labels select no voxel of the image (wholly "
                      "outside its field of view, or over NaN only), and are left out: "
                      f"{_listed(np.array(outside))}", MedfuseWarning, stacklevel=2)
        if not figures:
            raise InvalidInputError("none of the mask's labels selects a voxel of the image",
                                    fix="check that the mask belongs to this image (same patient and placement), "
                                        "and the transform")
    _add_peaks(volume, list(figures.values()), regions)
    ref_mean = figures[reference]["mean"] if reference is not None else None
    if ref_mean is not None and (ref_mean == 0 or not math.isfinite(ref_mean)):
        raise InvalidInputError(f"the reference label {reference}'s mean is {ref_mean:g}: no ratio can be taken to it",
                                fix="choose a reference region with uptake (e.g. the cerebellum's or pons' label), "
                                    "and check that the image is the PET and the mask its label map")
    for fig in figures.values():
        fig["ratio_to_reference"] = None if ref_mean is None else fig["mean"] / ref_mean
    return figures
