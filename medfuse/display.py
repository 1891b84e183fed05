"""Display defaults shared by the CLI's snapshots and the napari widget (GUI-free: NumPy at import; SimpleITK
and Pillow only inside the slice functions).

* CT window presets as ``(width, level)`` in HU and :func:`window_to_limits`;
* per-modality defaults (colormap name, contrast limits, blending) via :func:`display_settings`;
* :func:`percentile_limits` for images without a physical scale (MR, SPECT counts);
* :func:`orthogonal_slices` and :func:`orthogonal_snapshot`: axial, coronal and sagittal planes through a world
  point, resampled onto square-millimetre pixels in a fixed patient orientation (the demo's PNG).

Orientation of the planes (radiological convention, whatever the volume's voxel order, flips or obliquity):

* axial: anterior up, patient left on the image's right (seen from the feet);
* coronal: superior up, patient left on the image's right (seen from the front);
* sagittal: superior up, anterior on the image's left (seen from the patient's left).

To show a slice in matplotlib, take it from :func:`orthogonal_slices`, not from the array: ``vol.array[:, :, k]``
is indexed ``(i, j)``, so ``plt.imshow`` draws ``i`` (the patient's right-to-left for an LPS volume) down the
screen and the head comes out rotated by 90 degrees and mirrored, with pixels stretched on anisotropic voxels. The
panels are in the orientation above, on square millimetre pixels, with their side letters in ``labels``
(docs/fusion.md, "Showing slices", has a runnable example).

Colormap names are napari/matplotlib names (``gray``, ``inferno``, ``hot``...), so both faces can use them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Sequence, Tuple

import numpy as np

from ._checks import choice, describe, flag, number, whole
from .errors import InvalidInputError
from .volume import Volume, normalise_modality

__all__ = [
    "CT_WINDOWS", "SUV_LIMITS", "DOSE_COLORMAP", "DisplaySettings", "window_to_limits", "limits_to_window",
    "check_ct_window", "window_precision", "slider_range", "percentile_limits", "display_settings",
    "checkerboard_mask", "curtain_mask", "VOLUME_PLANE_AXES", "PLANES", "SlicePanel", "orthogonal_slices",
    "orthogonal_snapshot",
]

#: CT window presets, ``name -> (width, level)`` in HU.
CT_WINDOWS: Dict[str, Tuple[float, float]] = {
    "brain": (80.0, 40.0),
    "subdural": (200.0, 75.0),
    "soft_tissue": (400.0, 40.0),
    "lung": (1500.0, -600.0),
    "bone": (2000.0, 300.0),
}

#: Default PET display range in SUV (a common reading range for FDG).
SUV_LIMITS: Tuple[float, float] = (0.0, 6.0)

#: Colour map of an RT dose (unit Gy) wash. Why magma: perceptually ordered and readable under colour-vision
#: deficiency (the viridis family; the usual rainbow/jet and turbo are neither: their bright bands read as dose
#: steps that are not there), its lowest colour is black (to 4/255), so 0 Gy adds nothing to the CT under
#: additive blending (plasma's and viridis' blue would tint it all), and it is not the PET's inferno, so a dose
#: beside a PET is told from it.
DOSE_COLORMAP = "magma"


@dataclass(frozen=True)
class DisplaySettings:
    """How to show one volume as a layer.

    Attributes:
        colormap: napari/matplotlib colormap name.
        contrast_limits: ``(low, high)`` in the volume's unit.
        blending: napari blending mode (``translucent`` for the base image, ``additive`` for overlays).
        opacity: layer opacity when used as an overlay.
    """

    colormap: str
    contrast_limits: Tuple[float, float]
    blending: str = "translucent"
    opacity: float = 1.0

    def as_kwargs(self) -> Dict[str, Any]:
        """Keyword arguments for ``napari.Viewer.add_image``."""
        return {"colormap": self.colormap, "contrast_limits": list(self.contrast_limits),
                "blending": self.blending, "opacity": self.opacity}


def _pair(limits: Any, name: str) -> Tuple[float, float]:
    """``(low, high)`` as two floats, or a typed error (``limits=5`` failed with "cannot unpack")."""
    if not isinstance(limits, (list, tuple, np.ndarray)) or len(limits) != 2 or np.ndim(limits[0]) != 0:
        raise InvalidInputError(f"{name} must be two numbers (low, high), got {limits!r}",
                                fix=f"pass e.g. {name}=(0.0, 80.0)")
    example = f"{name}=(0.0, 80.0)"
    return (number(limits[0], f"the low end of {name}", example=example),
            number(limits[1], f"the high end of {name}", example=example))


def _image_voxels(array: Any, what: str) -> np.ndarray:
    """The voxels of ``array`` (an array or a Volume) as a numeric NumPy array of at least one dimension."""
    try:
        a = np.asarray(array)
    except (TypeError, ValueError, RuntimeError) as e:  # RuntimeError: a torch tensor that needs grad
        raise InvalidInputError(f"{what} needs an image, got a {type(array).__name__} NumPy cannot read",
                                fix="pass a NumPy array or a medfuse.Volume (x.detach().cpu().numpy() for a "
                                    "tensor)") from e
    if a.ndim == 0 or not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        got = f"a single value ({type(array).__name__})" if a.ndim == 0 else f"an array of dtype {a.dtype}"
        raise InvalidInputError(f"{what} needs a numeric image, got {got}",
                                fix="pass the voxels (a numeric NumPy array) or a medfuse.Volume; a path must be "
                                    "loaded first: medfuse.load(path)")
    return a


def _grid_shape(shape: Any, what: str, *, min_axes: int) -> Tuple[int, ...]:
    """``shape`` as a tuple of at least ``min_axes`` positive whole numbers."""
    try:
        out = tuple(int(n) for n in shape)
        ok = len(out) >= min_axes and all(n >= 1 and n == m for n, m in zip(out, shape))
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise InvalidInputError(f"{what} takes a shape of {min_axes} or more positive whole numbers, got {shape!r}",
                                fix="pass the image's shape, e.g. image.shape (not the image itself)")
    return out


def window_to_limits(width: float, level: float) -> Tuple[float, float]:
    """Turn a (width, level) window into ``(low, high)`` contrast limits: level ∓ width / 2.

    Args:
        width: the window width (> 0), in the image's unit (HU for CT).
        level: the window's centre, in the same unit.

    Returns:
        ``(low, high)`` as floats.

    Raises:
        InvalidInputError: a value that is not a finite number, or a width of 0 or less.

    Example:
        >>> window_to_limits(80, 40)
        (0.0, 80.0)
    """
    w, lv = number(width, "the window width", example="width=80"), number(level, "the window level", example="level=40")
    if not (np.isfinite(w) and np.isfinite(lv)) or w <= 0:
        raise InvalidInputError(f"a window needs a finite positive width and a finite level, got ({width}, {level})",
                                fix="pass e.g. width=80, level=40 (the brain window)")
    return (lv - w / 2.0, lv + w / 2.0)


def limits_to_window(low: float, high: float) -> Tuple[float, float]:
    """Inverse of :func:`window_to_limits`: ``(width, level)``.

    Args:
        low: the lower contrast limit.
        high: the upper contrast limit (above ``low``).

    Returns:
        ``(width, level)`` as floats.

    Raises:
        InvalidInputError: a value that is not a number, ``high <= low``, or limits whose distance is beyond
            float range.
    """
    low, high = number(low, "the low limit", example="low=0"), number(high, "the high limit", example="high=80")
    if not high > low:
        raise InvalidInputError(f"contrast limits must have high > low, got ({low}, {high})", fix="swap or widen them")
    if not np.isfinite(float(high) - float(low)):  # each finite, their distance beyond float64 (a width of inf)
        raise InvalidInputError(f"contrast limits ({low:g}, {high:g}) are too far apart for a window width",
                                fix="use limits within about 1e307 of each other")
    return (float(high) - float(low), (float(high) + float(low)) / 2.0)


def check_ct_window(modality: Optional[str], unit: Optional[str]) -> None:
    """Raise unless a CT window preset (in HU) makes sense for an image of this modality and unit.

    Allowed: any image in HU, and CT or unlabelled images whose unit is unknown (a CT NIfTI carries no unit).
    Refused: PET/SPECT/MR and images in another physical unit (SUV, Bq/mL, counts), where an HU window such as
    bone (-700..1300) would hide the whole image.

    Args:
        modality: the image's modality (any name :func:`medfuse.volume.normalise_modality` takes), or None.
        unit: the image's unit (one of :data:`medfuse.volume.UNITS`), or None.

    Raises:
        InvalidInputError: ``modality`` or ``unit`` is neither a str nor None, or the image is not one an HU
            window fits.
    """
    for name, value in (("modality", modality), ("unit", unit)):
        if value is not None and not isinstance(value, str):  # an array failed in `==` with NumPy's "ambiguous"
            raise InvalidInputError(f"check_ct_window takes the modality and unit as strings (or None); {name} is "
                                    f"{describe(value)}",
                                    fix="pass the image's labels, e.g. check_ct_window(vol.modality, vol.unit)")
    if unit == "HU":
        return
    try:
        mod = normalise_modality(modality) if modality else "unknown"
    except InvalidInputError:  # a label from another tool: judge by the unit alone
        mod = "unknown"
    if mod in ("CT", "unknown") and unit in (None, "", "arbitrary"):
        return
    said = "arbitrary units" if unit == "arbitrary" else (unit or "unknown units")
    raise InvalidInputError(f"CT window presets are in HU; this image is {mod} in {said}",
                            fix="set the width and level by hand, or pick a CT image as the base")


def window_precision(width: float) -> Tuple[float, int]:
    """``(step, decimals)`` for editing a window of this width: about 3 significant digits.

    Example: a CT window (80 HU) gives ``(1.0, 1)``; an MR scaled 0..1 (width 0.7) gives ``(0.01, 3)``.

    Args:
        width: the window width (its sign is ignored; 0 or not finite gives ``(1.0, 1)``: the napari panel asks
            for a constant layer's, whose limits meet).

    Returns:
        ``(step, decimals)``: the spin box step and the number of decimals to show.

    Raises:
        InvalidInputError: ``width`` is not a number.
    """
    w = abs(number(width, "the window width", example="width=80", finite=False))
    if not np.isfinite(w) or w == 0:
        return (1.0, 1)
    mag = int(np.floor(np.log10(w)))
    return (float(10.0 ** (mag - 1)), max(0, 2 - mag))


def slider_range(array: Any, limits: Tuple[float, float], *, max_samples: int = 2_000_000) -> Tuple[float, float]:
    """The range a contrast slider should offer: the image's finite values and the current ``limits`` together.

    Why: napari makes the slider range of a layer equal to the contrast limits it was opened with, so a CT opened
    in the brain window (0..80 HU) could not be dragged to bone or lung. The extremes are exact (a PET lesion's
    peak is what a reader windows to); only an image holding infinities is subsampled, for its finite values.

    Args:
        array: the image (a NumPy array, or a :class:`Volume`).
        limits: the current ``(low, high)`` contrast limits.
        max_samples: (keyword-only) subsample larger arrays holding infinities with a fixed stride.

    Returns:
        ``(low, high)``: the smaller of ``limits[0]`` and the image's finite minimum, the larger of ``limits[1]``
        and its finite maximum.

    Raises:
        InvalidInputError: the image is not numeric (a path: load it first), a single value, ``limits`` are not two
            numbers with ``high >= low``, or ``max_samples`` is not a whole number of 1 or more.
    """
    flat = _image_voxels(array, "slider_range").ravel()
    lo, hi = _pair(limits, "limits")
    if hi < lo:  # reversed limits would come back as a reversed slider (equal ones: a constant layer's)
        raise InvalidInputError(f"contrast limits must have high >= low, got ({lo:g}, {hi:g})", fix="swap them")
    max_samples = whole(max_samples, "max_samples", minimum=1, example="max_samples=2_000_000")
    if flat.size and np.issubdtype(flat.dtype, np.number) and not np.issubdtype(flat.dtype, np.complexfloating):
        # The exact extremes (one pass, no copy): a strided sample missed a PET lesion's peak, so the slider
        # stopped at 13.57 SUV below a 14.02 maximum, the one voxel a reader windows to.
        with np.errstate(invalid="ignore"):
            low, high = float(np.fmin.reduce(flat)), float(np.fmax.reduce(flat))  # NaN skipped
        if np.isfinite(low) and np.isfinite(high):
            return (min(lo, low), max(hi, high))
    if flat.size > max_samples:  # infinities (or complex values): the finite ones of a sample
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    if np.issubdtype(flat.dtype, np.floating) or np.issubdtype(flat.dtype, np.complexfloating):
        flat = flat[np.isfinite(flat)]
    if flat.size and np.issubdtype(flat.dtype, np.number):
        lo, hi = min(lo, float(flat.min())), max(hi, float(flat.max()))
    return (lo, hi)


def percentile_limits(array: Any, *, low: float = 1.0, high: float = 99.5, ignore_zeros: bool = True,
                      max_samples: int = 2_000_000) -> Tuple[float, float]:
    """Robust contrast limits from percentiles of the finite voxels.

    Args:
        array: any array (or a :class:`Volume`).
        low, high: percentiles (0..100; default 1 and 99.5).
        ignore_zeros: leave out exact zeros (the background of MR, PET and SPECT) when anything else remains.
        max_samples: subsample larger arrays with a fixed stride (deterministic, fast on big volumes).

    Returns:
        ``(low, high)`` with ``high > low`` (widened by 1 for a constant image, by 1 ppm for one beyond 10^6).

    Raises:
        InvalidInputError: the image is not numeric (a path: load it first), a single value, or has no finite
            voxel; percentiles that are not numbers with ``0 <= low < high <= 100``; ``max_samples`` not a whole
            number of 1 or more; ``ignore_zeros`` not True or False.
    """
    a = _image_voxels(array, "percentile_limits")
    low, high = number(low, "low", example="low=1"), number(high, "high", example="high=99.5")
    max_samples = whole(max_samples, "max_samples", minimum=1, example="max_samples=2_000_000")
    ignore_zeros = flag(ignore_zeros, "ignore_zeros")
    if not 0 <= low < high <= 100:
        raise InvalidInputError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})",
                                fix="e.g. low=1, high=99.5")
    flat = a.ravel()
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    zeros_left_out = False
    if ignore_zeros:
        nz = flat[flat != 0]
        zeros_left_out = 0 < nz.size < flat.size
        flat = nz if nz.size else flat
    if flat.size == 0:
        raise InvalidInputError("the image has no finite voxels", fix="check the data (all NaN/inf?)")
    lo, hi = (float(v) for v in np.percentile(flat.astype(np.float64), [low, high]))
    if zeros_left_out and _is_label_map(flat):
        # A mask or label map: its low percentile was its first label, drawn as black as the background (a 0/1
        # mask opened all black, limits [1, 2]); and a rare last label fell above the high one. 0 to the largest.
        lo, hi = 0.0, float(flat.max())
    if hi <= lo:  # constant image: widen by 1, or by a relative step where 1 is below float resolution (1e20)
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return (lo, hi)


#: An integer image with at most this many distinct non-zero values (and none negative) is shown as a label map.
_MAX_LABELS = 64


def _is_label_map(nonzero: np.ndarray) -> bool:
    """Whether the non-zero voxels ``nonzero`` look like a mask or label map: booleans, or non-negative whole
    numbers (integers, or floats as NIfTI masks are often stored) of at most :data:`_MAX_LABELS` distinct values
    (an 8-bit photo or an MR in int16 has far more)."""
    if nonzero.dtype == bool:
        return True
    integer = np.issubdtype(nonzero.dtype, np.integer)
    if nonzero.size == 0 or not (integer or np.issubdtype(nonzero.dtype, np.floating)):
        return False
    if len(np.unique(nonzero[:: max(1, nonzero.size // 4096)])) > _MAX_LABELS:  # an image, told from a sample
        return False
    if float(nonzero.min()) < 0:
        return False
    if not integer:  # a float mask (0/1 stored as float32) opened all black as an integer one did
        return bool(np.array_equal(nonzero, np.round(nonzero))) and len(np.unique(nonzero)) <= _MAX_LABELS
    if int(nonzero.max()) >= 1 << 16:  # a bincount that large costs more than np.unique
        return len(np.unique(nonzero)) <= _MAX_LABELS
    return int(np.count_nonzero(np.bincount(nonzero, minlength=1))) <= _MAX_LABELS


def display_settings(volume: Volume, *, overlay: bool = False, window: Optional[str] = None) -> DisplaySettings:
    """Default display for a volume by modality and unit.

    * CT in HU: ``gray`` with the ``window`` preset (default ``brain``); CT without HU: percentiles.
    * PET in SUV: ``inferno`` with 0..6 SUV (SUV_LIMITS; SUVbsa, about a quarter of SUVbw, 0..1.5); in Bq/mL or
      counts: percentiles.
    * NM/SPECT: ``hot`` with percentiles.
    * RT dose (unit Gy, whatever the modality): :data:`DOSE_COLORMAP` (``magma``) from 0 Gy to the largest dose,
      the range fusion normalises a dose to (a percentile would clip the hot spot).
    * MR and unknown: ``gray`` with percentiles.

    Args:
        volume: the volume.
        overlay: True for a functional layer shown over an anatomical base: ``additive`` blending, opacity 0.6.
        window: CT preset name from :data:`CT_WINDOWS`; used for a CT in HU only (other volumes ignore it).

    Returns:
        The :class:`DisplaySettings` (``as_kwargs()`` for ``napari.Viewer.add_image``).

    Raises:
        InvalidInputError: ``volume`` is not a Volume, an unknown ``window``, or ``overlay`` not True or False.
    """
    if not isinstance(volume, Volume):
        raise InvalidInputError("display_settings needs a medfuse Volume", fix="wrap the array: medfuse.Volume(array, affine)")
    modality = normalise_modality(volume.modality)
    overlay = flag(overlay, "overlay")
    # choice(): a list or an array failed in `in` with "unhashable type".
    choice(window, "CT window", (None, *CT_WINDOWS), fix=f"use one of {', '.join(CT_WINDOWS)} (or None: brain)")
    blend = {"blending": "additive", "opacity": 0.6} if overlay else {"blending": "translucent", "opacity": 1.0}
    if volume.unit == "Gy":
        a = volume.array
        top = float(np.max(a, initial=0.0, where=np.isfinite(a)))  # NaN/inf (never a dose) left out
        return DisplaySettings(DOSE_COLORMAP, (0.0, top if top > 0 else 1.0), **blend)
    if modality == "CT" and volume.unit == "HU":
        return DisplaySettings("gray", window_to_limits(*CT_WINDOWS[window or "brain"]), **blend)
    if modality == "PT":
        if volume.unit.startswith("SUV"):
            if volume.unit == "SUVbsa":  # about a quarter of SUVbw (cm²/mL): scaled as fusion scales its window
                from .fusion.normalise import DEFAULT_SUV_MAX, SUVBSA_MAX

                return DisplaySettings("inferno", (SUV_LIMITS[0], SUV_LIMITS[1] * SUVBSA_MAX / DEFAULT_SUV_MAX),
                                       **blend)
            return DisplaySettings("inferno", SUV_LIMITS, **blend)
        return DisplaySettings("inferno", percentile_limits(volume.array, low=0.0, high=99.9), **blend)
    if modality == "NM":
        return DisplaySettings("hot", percentile_limits(volume.array, low=0.0, high=99.9), **blend)
    return DisplaySettings("gray", percentile_limits(volume.array), **blend)


#: Which axes of a medfuse Volume's array ``(i, j, k)`` hold each plane of a volume stored in the usual axial
#: order (LPS or RAS-like, ``vol.orientation`` such as ``"LPS"``): ``vol.array[:, :, k]`` is an axial slice.
VOLUME_PLANE_AXES: Dict[str, Tuple[int, int]] = {"axial": (0, 1), "coronal": (0, 2), "sagittal": (1, 2)}


def _axis(value: Any, ndim: int, name: str, example: str) -> int:
    """``value`` as an axis of an ``ndim``-axis array (negative counts from the end), or a typed error."""
    return whole(value, name, minimum=-ndim, maximum=ndim - 1, what=f"an axis of the {ndim}-axis shape",
                 example=example) % ndim


def checkerboard_mask(shape: Tuple[int, ...], *, tile: int = 16, axes: Tuple[int, int] = (-2, -1)) -> np.ndarray:
    """Boolean mask of alternating ``tile``-voxel squares over two axes (compare mode), the same on every slice.

    The default, the last two axes, is the plane napari shows of a ``(z, y, x)`` array (what the plugin uses). A
    medfuse :class:`~medfuse.Volume`'s array is indexed ``(i, j, k)``: for a volume in the usual axial order its
    axial slices are ``vol.array[:, :, k]``, so pass ``axes=(0, 1)`` (coronal ``(0, 2)``, sagittal ``(1, 2)``;
    :data:`VOLUME_PLANE_AXES`). With the default, ``vol.array[:, :, k]`` would show stripes, not squares.

    Args:
        shape: the image's shape (two or more axes).
        tile: (keyword-only) the side of a square in voxels (1 or more).
        axes: (keyword-only) the two axes the squares lie in (negative counts from the end).

    Returns:
        A boolean array of ``shape``, True on the squares of the first image.

    Raises:
        InvalidInputError: a shape that is not two or more positive whole numbers, ``tile`` not a whole number
            of 1 or more, or ``axes`` not two different axes of the shape.

    Example:
        >>> m = checkerboard_mask((4, 4, 3), tile=2, axes=(0, 1))   # squares on every vol.array[:, :, k]
        >>> m[:, :, 0].astype(int).tolist()
        [[1, 1, 0, 0], [1, 1, 0, 0], [0, 0, 1, 1], [0, 0, 1, 1]]
    """
    shape = _grid_shape(shape, "checkerboard_mask", min_axes=2)
    tile = whole(tile, "the checkerboard tile", minimum=1, example="tile=16 (voxels)")
    pair = tuple(axes) if isinstance(axes, (tuple, list)) and len(axes) == 2 else None
    if pair is None:
        raise InvalidInputError(f"axes must be two axes, got {describe(axes)}",
                                fix="pass e.g. axes=(0, 1) (a Volume's axial slices) or leave it out (the last two)")
    row_axis, col_axis = (_axis(a, len(shape), "a checkerboard axis", "axes=(0, 1)") for a in pair)
    if row_axis == col_axis:
        raise InvalidInputError(f"axes must be two different axes, got {tuple(pair)}",
                                fix="pass e.g. axes=(0, 1) (a Volume's axial slices)")
    index = [1] * len(shape)
    rows, cols = np.arange(shape[row_axis]) // tile, np.arange(shape[col_axis]) // tile
    index[row_axis] = shape[row_axis]
    squares = rows.reshape(index)
    index[row_axis], index[col_axis] = 1, shape[col_axis]
    return np.broadcast_to((squares + cols.reshape(index)) % 2 == 0, tuple(shape)).copy()


def curtain_mask(shape: Tuple[int, ...], *, position: float = 0.5, axis: int = -1) -> np.ndarray:
    """Boolean mask that is True before ``position`` (a fraction 0-1 along ``axis``), for swipe/curtain mode.

    The default axis, the last, is the horizontal one of the plane napari shows of a ``(z, y, x)`` array. A
    medfuse :class:`~medfuse.Volume`'s array is indexed ``(i, j, k)``: for a curtain across its axial slices
    ``vol.array[:, :, k]`` pass ``axis=0`` or ``axis=1`` (:data:`VOLUME_PLANE_AXES`); with the default, each
    axial slice would be all True or all False.

    Args:
        shape: the image's shape (one or more axes).
        position: (keyword-only) where the curtain is, as a fraction (0..1) of ``axis``.
        axis: (keyword-only) the axis the curtain moves along (negative counts from the end).

    Returns:
        A boolean array of ``shape``, True before the curtain.

    Raises:
        InvalidInputError: a shape that is not positive whole numbers, a position outside 0..1, or ``axis`` not
            an axis of the shape.
    """
    position = number(position, "the curtain position", low=0, high=1, what="a fraction",
                      example="position=0.5 (halfway along the axis)")
    shape = _grid_shape(shape, "curtain_mask", min_axes=1)
    axis = _axis(axis, len(shape), "the curtain axis", "axis=0")
    index = [1] * len(shape)
    index[axis] = shape[axis]
    before = np.arange(shape[axis]) < round(position * shape[axis])
    return np.broadcast_to(before.reshape(index), tuple(shape)).copy()


# ----------------------------------------------------------------------------- orthogonal slices
#: Each plane as LPS unit vectors: (direction of increasing column, of increasing row, the plane's normal),
#: and the patient sides at its (left, right, top, bottom) edges. See the module docstring for the convention.
PLANES: Dict[str, Tuple[Tuple[int, int, int], Tuple[int, int, int], Tuple[int, int, int], str]] = {
    "axial": ((1, 0, 0), (0, 1, 0), (0, 0, 1), "RLAP"),        # columns R->L, rows A->P
    "coronal": ((1, 0, 0), (0, 0, -1), (0, 1, 0), "RLSI"),     # columns R->L, rows S->I
    "sagittal": ((0, 1, 0), (0, 0, -1), (1, 0, 0), "APSI"),    # columns A->P, rows S->I
}

#: Largest side of a panel in pixels (a fine grid over a large field of view is shown coarser).
_MAX_PANEL_PIXELS = 2048


@dataclass(frozen=True)
class SlicePanel:
    """One plane through a volume, resampled onto square pixels in a fixed patient orientation.

    Attributes:
        name: ``axial``, ``coronal`` or ``sagittal``.
        image: 2-D float32 array ``(rows, columns)``; NaN where the plane lies outside the volume.
        origin: LPS mm position of pixel ``(0, 0)``'s centre.
        column_direction, row_direction: LPS unit vectors along increasing column and row.
        mm_per_pixel: pixel size in mm (the same along rows and columns).
        labels: patient side at the image's ``left``, ``right``, ``top`` and ``bottom`` edges (``R``, ``A``...).
    """

    name: str
    image: np.ndarray
    origin: np.ndarray
    column_direction: np.ndarray
    row_direction: np.ndarray
    mm_per_pixel: float
    labels: Dict[str, str]

    def world_to_pixel(self, point: Sequence[float]) -> Tuple[float, float]:
        """``(row, column)`` (fractional) of an LPS mm point projected onto the plane."""
        d = np.asarray(point, dtype=float) - self.origin
        return (float(d @ self.row_direction) / self.mm_per_pixel, float(d @ self.column_direction) / self.mm_per_pixel)


def _plane_axis(centre: float, lo: float, hi: float, sign: int, step: float) -> Tuple[float, int]:
    """Start (the first pixel centre) and pixel count along one in-plane world axis.

    Pixel centres lie on ``centre + n * step`` so that the requested point falls on a pixel centre, and cover
    the volume's extent ``(lo, hi)`` walked from the ``sign`` side: strictly inside it. Why: a pixel centred on
    an outer voxel edge (a point halfway between voxels, 1 mm pixels) lies outside SimpleITK's image on one
    side, and came out as a NaN row or column along the panel's edge (a white line in matplotlib).
    """
    def inside(distance: float) -> int:  # pixel centres strictly within ``distance`` (slack: 1e-6 of a pixel)
        return max(0, int(math.ceil(distance / step - 1e-6)) - 1)

    before = inside(sign * (centre - (lo if sign > 0 else hi)))  # from the start edge to the centre
    after = inside(sign * ((hi if sign > 0 else lo) - centre))
    return centre - sign * before * step, before + after + 1


def _default_step(volume: Volume) -> float:
    """Finest spacing of the volume, coarsened so that no panel exceeds :data:`_MAX_PANEL_PIXELS`."""
    lo, hi = volume.bounds(edges=True)
    return max(min(volume.spacing), float(np.max(hi - lo)) / _MAX_PANEL_PIXELS)


def _centre(volume: Volume, center_world: Optional[Sequence[float]]) -> np.ndarray:
    """The LPS point the planes go through: the given one (checked), or the brightest voxel's centre."""
    if center_world is None:
        arr = volume.array
        try:
            flat = int(np.nanargmax(arr)) if arr.dtype.kind == "f" else int(np.argmax(arr))
        except ValueError as e:  # every voxel NaN
            raise InvalidInputError("the volume has no voxel value to show (all NaN)",
                                    fix="check the data, or pass center_world") from e
        return volume.index_to_world(np.asarray(np.unravel_index(flat, arr.shape), dtype=float))
    try:
        c = np.asarray(center_world, dtype=float).reshape(-1)
    except (TypeError, ValueError):
        c = np.full(1, np.nan)  # not numbers: refused below
    if c.shape != (3,) or not np.all(np.isfinite(c)):
        raise InvalidInputError(f"the slice point must be 3 finite LPS mm coordinates, got {center_world!r}",
                                fix="pass (x, y, z) in LPS mm, e.g. volume.center")
    lo, hi = volume.bounds(edges=True)
    if np.any(c < lo - 1e-6) or np.any(c > hi + 1e-6):
        raise InvalidInputError(
            f"the point {tuple(round(float(x), 1) for x in c)} (LPS mm) lies outside the volume, which spans "
            f"{tuple(round(float(x), 1) for x in lo)} to {tuple(round(float(x), 1) for x in hi)}",
            fix="pass a point inside the volume (LPS mm; a RAS point from NIfTI tools has x and y negated)")
    return c


#: The longest panel side :func:`orthogonal_slices` makes (a 16384² float32 panel is 1 GiB).
_MAX_PANEL_SIDE = 16384


def orthogonal_slices(volume: Volume, center_world: Optional[Sequence[float]] = None, *,
                      mm_per_pixel: Optional[float] = None, interpolation: str = "linear") -> Dict[str, SlicePanel]:
    """Axial, coronal and sagittal planes through an LPS point, as arrays in the module's fixed orientation.

    The planes are resampled (SimpleITK) from the volume's own grid, so they pass exactly through the point and
    keep patient orientation for any voxel order, flipped, permuted or oblique axes, and their pixels are
    square in millimetres (a 1x1x4 mm CT is not squashed).

    Args:
        volume: the volume to show.
        center_world: LPS mm point the three planes pass through (it falls on a pixel centre of each);
            default: the centre of the brightest voxel.
        mm_per_pixel: pixel size; default the volume's finest spacing (coarser for very large fields of view).
        interpolation: ``linear`` or ``nearest``.

    Returns:
        ``{"axial": SlicePanel, "coronal": ..., "sagittal": ...}``, each covering the volume's extent (pixel
        centres strictly inside it).

    Raises:
        InvalidInputError: a point outside the volume, a bad pixel size (one making panels over 16384 pixels a
            side among them) or interpolation, complex voxels.

    Example (matplotlib; each panel is ready for ``imshow`` as it is, no transpose or flip)::

        panels = orthogonal_slices(vol, point)
        fig, axs = plt.subplots(1, 3)
        for ax, (name, p) in zip(axs, panels.items()):
            ax.imshow(p.image, cmap="gray")          # NaN (outside the volume) is left blank
            ax.set_title(name)
            ax.set_xlabel(f"{p.labels['left']} <-> {p.labels['right']}")
            row, col = p.world_to_pixel(point)        # mark the point
            ax.plot(col, row, "r+")
    """
    import SimpleITK as sitk

    kinds = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor}
    choice(interpolation, "interpolation", tuple(kinds), fix="use 'linear' or 'nearest'")  # a list: "unhashable"
    if not isinstance(volume, Volume):
        raise InvalidInputError("orthogonal_slices needs a medfuse Volume",
                                fix="wrap the array: medfuse.Volume(array, affine)")
    if np.iscomplexobj(volume.array):
        raise InvalidInputError(f"complex voxels ({volume.dtype}) cannot be shown",
                                fix="show the magnitude: volume.with_array(numpy.abs(volume.array))")
    step = _default_step(volume) if mm_per_pixel is None else number(mm_per_pixel, "mm_per_pixel", low=0,
                                                                     open_low=True, example="mm_per_pixel=0.5")
    centre = _centre(volume, center_world)
    lo, hi = volume.bounds(edges=True)
    side = float(np.max(np.asarray(hi) - np.asarray(lo))) / step
    if side > _MAX_PANEL_SIDE:  # SimpleITK's "failed to allocate memory", or minutes of swapping, otherwise
        raise InvalidInputError(f"mm_per_pixel={step:g} would make panels {side:,.0f} pixels a side",
                                fix=f"pass mm_per_pixel={float(np.max(np.asarray(hi) - np.asarray(lo))) / 2048:.3g} "
                                    "or more (2048 pixels a side), or leave it out")
    source = sitk.Cast(volume.to_sitk(), sitk.sitkFloat32)
    return {name: _panel(source, name, centre, lo, hi, step, kinds[interpolation]) for name in PLANES}


def _panel(source, name: str, centre: np.ndarray, lo: np.ndarray, hi: np.ndarray, step: float,
           interpolator: int) -> SlicePanel:
    """Resample one plane of :data:`PLANES` from a SimpleITK image (a one-pixel-thick 3-D grid)."""
    import SimpleITK as sitk

    cols, rows, normal = (np.asarray(v, dtype=float) for v in PLANES[name][:3])
    sides = PLANES[name][3]
    origin = centre.copy()
    sizes = []
    for direction in (cols, rows):
        axis = int(np.argmax(np.abs(direction)))
        start, n = _plane_axis(centre[axis], lo[axis], hi[axis], int(direction[axis]), step)
        origin[axis] = start
        sizes.append(n)
    grid = sitk.Image(sizes[0], sizes[1], 1, sitk.sitkFloat32)
    grid.SetSpacing((step, step, step))
    grid.SetOrigin(tuple(float(x) for x in origin))
    grid.SetDirection(tuple(float(x) for x in np.column_stack([cols, rows, normal]).ravel()))
    plane = sitk.Resample(source, grid, sitk.Transform(), interpolator, float("nan"), sitk.sitkFloat32)
    image = sitk.GetArrayFromImage(plane)[0]  # [k, j, i] -> (rows, columns)
    labels = dict(zip(("left", "right", "top", "bottom"), sides))
    return SlicePanel(name, image, origin, cols, rows, step, labels)


def orthogonal_snapshot(volume: Volume, center_world: Optional[Sequence[float]] = None, *,
                        mm_per_pixel: Optional[float] = None, limits: Optional[Tuple[float, float]] = None,
                        gap: int = 8, labels: bool = True) -> np.ndarray:
    """The three :func:`orthogonal_slices` side by side as one 8-bit grey image (what the demo's PNG shows).

    Args:
        volume, center_world, mm_per_pixel: as for :func:`orthogonal_slices`.
        limits: ``(low, high)`` grey window in the volume's unit; default :func:`percentile_limits` 0.5..99.5.
        gap: black pixels between panels.
        labels: write the patient side letters (R/L, A/P, S/I) at each panel's edges.

    Returns:
        ``uint8`` array ``(height, width)``: axial, coronal, sagittal from left to right, vertically centred.
        Outside the volume is black. Save it with ``PIL.Image.fromarray(a).save("x.png")``.

    Raises:
        InvalidInputError: as :func:`orthogonal_slices`, ``limits`` that are not two numbers with
            ``high > low``, a ``gap`` that is not a whole number of 0 or more, or ``labels`` not True or False.
    """
    gap = whole(gap, "gap", minimum=0, example="gap=8")
    labels = flag(labels, "labels")
    panels = orthogonal_slices(volume, center_world, mm_per_pixel=mm_per_pixel)
    lo, hi = _pair(limits, "limits") if limits is not None else percentile_limits(volume.array, low=0.5, high=99.5)
    if not hi > lo:
        raise InvalidInputError(f"grey limits must have high > low, got ({lo}, {hi})", fix="swap or widen them")
    grey = [_to_uint8(p.image, lo, hi) for p in panels.values()]
    if labels:
        grey = [_draw_labels(g, p.labels) for g, p in zip(grey, panels.values())]
    height = max(g.shape[0] for g in grey)
    canvas = np.zeros((height, sum(g.shape[1] for g in grey) + gap * (len(grey) - 1)), np.uint8)
    x = 0
    for g in grey:
        top = (height - g.shape[0]) // 2
        canvas[top:top + g.shape[0], x:x + g.shape[1]] = g
        x += g.shape[1] + gap
    return canvas


def _to_uint8(image: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Window a float plane to 0..255 (NaN, outside the volume, to 0)."""
    scaled = np.clip((np.nan_to_num(image, nan=lo) - lo) / (hi - lo), 0.0, 1.0)
    return np.rint(scaled * 255.0).astype(np.uint8)


def _draw_labels(grey: np.ndarray, labels: Dict[str, str]) -> np.ndarray:
    """Write the side letters at the middle of each edge (white, PIL's built-in font)."""
    from PIL import Image, ImageDraw

    img = Image.fromarray(grey)
    draw = ImageDraw.Draw(img)
    h, w = grey.shape
    for side, letter in labels.items():
        # Placed from the letter's measured box: bitmap fonts (older Pillow) take no anchor argument.
        x0, y0, x1, y1 = draw.textbbox((0, 0), letter)
        tw, th = x1 - x0, y1 - y0
        x = {"left": 2, "right": w - 2 - tw}.get(side, (w - tw) // 2)
        y = {"top": 2, "bottom": h - 2 - th}.get(side, (h - th) // 2)
        draw.text((x - x0, y - y0), letter, fill=255)
    return np.asarray(img)
