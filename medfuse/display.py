"""Display defaults shared by the CLI's snapshots and the napari widget (GUI-free, NumPy only).

* CT window presets as ``(width, level)`` in HU and :func:`window_to_limits`;
* per-modality defaults (colormap name, contrast limits, blending) via :func:`display_settings`;
* :func:`percentile_limits` for images without a physical scale (MR, SPECT counts).

Colormap names are napari/matplotlib names (``gray``, ``inferno``, ``hot``...), so both faces can use them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import numpy as np

from .errors import InvalidInputError
from .volume import Volume, normalise_modality

__all__ = [
    "CT_WINDOWS", "SUV_LIMITS", "DisplaySettings", "window_to_limits", "limits_to_window",
    "check_ct_window", "window_precision", "slider_range", "percentile_limits", "display_settings",
    "checkerboard_mask", "curtain_mask",
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


def window_to_limits(width: float, level: float) -> Tuple[float, float]:
    """Turn a (width, level) window into ``(low, high)`` contrast limits: level ∓ width / 2.

    Example:
        >>> window_to_limits(80, 40)
        (0.0, 80.0)
    """
    w, lv = float(width), float(level)
    if not (np.isfinite(w) and np.isfinite(lv)) or w <= 0:
        raise InvalidInputError(f"a window needs a finite positive width and a finite level, got ({width}, {level})",
                                fix="pass e.g. width=80, level=40 (the brain window)")
    return (lv - w / 2.0, lv + w / 2.0)


def limits_to_window(low: float, high: float) -> Tuple[float, float]:
    """Inverse of :func:`window_to_limits`: ``(width, level)``."""
    if not high > low:
        raise InvalidInputError(f"contrast limits must have high > low, got ({low}, {high})", fix="swap or widen them")
    return (float(high) - float(low), (float(high) + float(low)) / 2.0)


def check_ct_window(modality: Optional[str], unit: Optional[str]) -> None:
    """Raise unless a CT window preset (in HU) makes sense for an image of this modality and unit.

    Allowed: any image in HU, and CT or unlabelled images whose unit is unknown (a CT NIfTI carries no unit).
    Refused: PET/SPECT/MR and images in another physical unit (SUV, Bq/mL, counts), where an HU window such as
    bone (-700..1300) would hide the whole image.
    """
    if unit == "HU":
        return
    try:
        mod = normalise_modality(modality) if modality else "unknown"
    except InvalidInputError:  # a label from another tool: judge by the unit alone
        mod = "unknown"
    if mod in ("CT", "unknown") and unit in (None, "", "arbitrary"):
        return
    raise InvalidInputError(f"CT window presets are in HU; this image is {mod} in {unit or 'unknown units'}",
                            fix="set the width and level by hand, or pick a CT image as the base")


def window_precision(width: float) -> Tuple[float, int]:
    """``(step, decimals)`` for editing a window of this width: about 3 significant digits.

    Example: a CT window (80 HU) gives ``(1.0, 1)``; an MR scaled 0..1 (width 0.7) gives ``(0.01, 3)``.
    """
    w = abs(float(width))
    if not np.isfinite(w) or w == 0:
        return (1.0, 1)
    mag = int(np.floor(np.log10(w)))
    return (float(10.0 ** (mag - 1)), max(0, 2 - mag))


def slider_range(array: Any, limits: Tuple[float, float], *, max_samples: int = 2_000_000) -> Tuple[float, float]:
    """The range a contrast slider should offer: the image's finite values and the current ``limits`` together.

    Why: napari makes the slider range of a layer equal to the contrast limits it was opened with, so a CT opened
    in the brain window (0..80 HU) could not be dragged to bone or lung. Larger arrays are subsampled with a fixed
    stride (the extremes of a slider need not be exact).
    """
    if isinstance(array, Volume):
        array = array.array
    lo, hi = float(limits[0]), float(limits[1])
    flat = np.asarray(array).ravel()
    if flat.size > max_samples:
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
        low, high: percentiles (0..100).
        ignore_zeros: leave out exact zeros (the background of MR, PET and SPECT) when anything else remains.
        max_samples: subsample larger arrays with a fixed stride (deterministic, fast on big volumes).

    Returns:
        ``(low, high)`` with ``high > low`` (widened by 1 for a constant image, by 1 ppm for one beyond 10^6).
    """
    if isinstance(array, Volume):
        array = array.array
    a = np.asarray(array)
    if not 0 <= low < high <= 100:
        raise InvalidInputError(f"percentiles must satisfy 0 <= low < high <= 100, got ({low}, {high})",
                                fix="e.g. low=1, high=99.5")
    flat = a.ravel()
    if flat.size > max_samples:
        flat = flat[:: int(np.ceil(flat.size / max_samples))]
    flat = flat[np.isfinite(flat)] if np.issubdtype(flat.dtype, np.floating) else flat
    if ignore_zeros:
        nz = flat[flat != 0]
        flat = nz if nz.size else flat
    if flat.size == 0:
        raise InvalidInputError("the image has no finite voxels", fix="check the data (all NaN/inf?)")
    lo, hi = (float(v) for v in np.percentile(flat.astype(np.float64), [low, high]))
    if hi <= lo:  # constant image: widen by 1, or by a relative step where 1 is below float resolution (1e20)
        hi = lo + max(1.0, abs(lo) * 1e-6)
    return (lo, hi)


def display_settings(volume: Volume, *, overlay: bool = False, window: Optional[str] = None) -> DisplaySettings:
    """Default display for a volume by modality and unit.

    * CT in HU: ``gray`` with the ``window`` preset (default ``brain``); CT without HU: percentiles.
    * PET in SUV: ``inferno`` with 0..6 SUV (SUV_LIMITS); in Bq/mL or counts: percentiles.
    * NM/SPECT: ``hot`` with percentiles.
    * MR and unknown: ``gray`` with percentiles.

    Args:
        volume: the volume.
        overlay: True for a functional layer shown over an anatomical base: ``additive`` blending, opacity 0.6.
        window: CT preset name from :data:`CT_WINDOWS`.
    """
    if not isinstance(volume, Volume):
        raise InvalidInputError("display_settings needs a medfuse Volume", fix="wrap the array: medfuse.Volume(array, affine)")
    modality = normalise_modality(volume.modality)
    if window is not None and window not in CT_WINDOWS:
        raise InvalidInputError(f"unknown CT window {window!r}", fix=f"use one of {', '.join(CT_WINDOWS)}")
    blend = {"blending": "additive", "opacity": 0.6} if overlay else {"blending": "translucent", "opacity": 1.0}
    if modality == "CT" and volume.unit == "HU":
        return DisplaySettings("gray", window_to_limits(*CT_WINDOWS[window or "brain"]), **blend)
    if modality == "PT":
        if volume.unit.startswith("SUV"):
            return DisplaySettings("inferno", SUV_LIMITS, **blend)
        return DisplaySettings("inferno", percentile_limits(volume.array, low=0.0, high=99.9), **blend)
    if modality == "NM":
        return DisplaySettings("hot", percentile_limits(volume.array, low=0.0, high=99.9), **blend)
    return DisplaySettings("gray", percentile_limits(volume.array), **blend)


def checkerboard_mask(shape: Tuple[int, ...], *, tile: int = 16) -> np.ndarray:
    """Boolean mask of alternating ``tile``-voxel squares over the last two axes (compare mode)."""
    if tile < 1:
        raise InvalidInputError("checkerboard tile must be >= 1", fix="pass tile=1 or more")
    rows = (np.arange(shape[-2]) // tile)[:, None]
    cols = (np.arange(shape[-1]) // tile)[None, :]
    return np.broadcast_to((rows + cols) % 2 == 0, tuple(shape)).copy()


def curtain_mask(shape: Tuple[int, ...], *, position: float = 0.5) -> np.ndarray:
    """Boolean mask that is True left of ``position`` (0-1 along the last axis), for swipe/curtain mode."""
    if not 0.0 <= position <= 1.0:
        raise InvalidInputError(f"curtain position {position} is outside 0-1", fix="pass a fraction between 0 and 1")
    cols = np.arange(shape[-1]) < round(position * shape[-1])
    return np.broadcast_to(cols, tuple(shape)).copy()
