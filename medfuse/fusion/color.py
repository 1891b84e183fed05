"""Colour handling for pseudo-colour PET/SPECT images (2-D).

The Harvard atlas ships PET and SPECT as pseudo-colour RGB. The practice of the
fusion literature is to convert them to YCbCr (ITU-R BT.601, full range, as in
JPEG and OpenCV), fuse the luma ``Y`` with the grey MRI, and put the chroma
``Cb``/``Cr`` back. :func:`fuse_rgb` does that.

For 3-D volumes the fused output is a scalar volume; a colour map is a display
choice (the napari plugin's), so nothing here applies to volumes.
"""

from __future__ import annotations

import warnings
from typing import Callable, Optional

import numpy as np

from ..errors import InvalidInputError, MedfuseWarning

__all__ = ["rgb_to_gray", "rgb_to_ycbcr", "ycbcr_to_rgb", "fuse_rgb", "is_rgb"]

# BT.601 luma weights (also OpenCV's BGR->GRAY and JPEG's Y).
_KR, _KG, _KB = 0.299, 0.587, 0.114


def is_rgb(array) -> bool:
    """True for an ``(H, W, 3)`` array (a colour image rather than a grey one)."""
    a = np.asarray(array)
    return a.ndim == 3 and a.shape[2] == 3


def _check_rgb(rgb, name: str = "the colour image") -> np.ndarray:
    a = np.asarray(rgb)
    if not is_rgb(a):
        raise InvalidInputError(f"{name} must have shape (H, W, 3), got {a.shape}", fix="pass an RGB image (drop any alpha channel)")
    if not np.issubdtype(a.dtype, np.number):
        raise InvalidInputError(f"{name} must be numeric, got dtype {a.dtype}", fix="pass a numeric array")
    a = a.astype(np.float64)
    if not np.all(np.isfinite(a)):
        raise InvalidInputError(f"{name} contains NaN or infinite values", fix="replace them before fusing")
    return a


def _peak(peak, rgb: np.ndarray, name: str = "the colour image") -> float:
    """``peak`` checked against the colour image (``rgb``, numeric, of its own dtype), or inferred
    from it when None, as :func:`medfuse.fuse` infers it (255 for integer data up to 255, 65535 for uint16 data
    above 255, 1 for floats in 0..1, 255 for floats up to 255).

    Why: ``peak`` was never checked nor inferred: a uint16 image with the default 255 was clipped to 255
    everywhere, a uint8 one with ``peak=1`` came out 0/1, a negative or zero peak all white or all black.

    Raises:
        InvalidInputError: ``peak`` not a positive finite number, below the image's largest value, or above the
            largest value of its integer dtype; with no ``peak``: an empty image, a float image above 255, an int8
            one, or one of another integer dtype than uint16 above 255 (its white is unknown).
    """
    dtype = rgb.dtype
    top = float(rgb.max()) if rgb.size else 0.0
    if peak is None:
        if not rgb.size:
            raise InvalidInputError(f"{name} is empty", fix="pass an image with at least one pixel")
        from . import _colour_peak

        return _colour_peak(rgb, name, or_peak=True)
    if isinstance(peak, (bool, np.bool_)) or not isinstance(peak, (int, float, np.integer, np.floating)) \
            or not np.isfinite(peak) or peak <= 0:
        raise InvalidInputError(f"peak must be a positive finite number (the intensity of white), got {peak!r}",
                                fix="pass e.g. peak=255 for 8-bit images or peak=1.0 for 0..1 images, or leave it "
                                    "out to have it inferred from the image")
    peak = float(peak)
    if np.issubdtype(dtype, np.integer):
        if top > peak:
            raise InvalidInputError(f"{name}'s values reach {top:.6g}, above peak={peak:.6g}: they would be clipped",
                                    fix="leave peak out to have it inferred from the image's dtype, or pass the "
                                        "intensity of white")
        if peak > np.iinfo(dtype).max:
            raise InvalidInputError(f"peak={peak:.6g} is above what {name}'s dtype {dtype} holds "
                                    f"({np.iinfo(dtype).max})", fix="leave peak out to have it inferred")
    elif top > peak * (1.0 + 1e-6):
        raise InvalidInputError(f"{name}'s values reach {top:.6g}, above peak={peak:.6g}: they would be clipped",
                                fix="pass the intensity of white (1.0 for 0..1 images, 255 for 0..255) or leave "
                                    "peak out to have it inferred")
    return peak


#: The peaks a YCbCr image's own values tell apart (:func:`_ycbcr_peak`): what rgb_to_ycbcr infers by default.
_YCBCR_PEAKS = (1.0, 255.0, 65535.0)


def _ycbcr_peak(peak, ycc: np.ndarray) -> float:
    """``peak`` of a YCbCr image (checked), or the one :func:`rgb_to_ycbcr` inferred for it (1, 255 or 65535).

    The largest value of a full-range YCbCr image of peak P lies between about 0.32 P (a mid green: Y, Cb and
    Cr all lower than for other colours) and 1.002 P; these ranges do not overlap for the three peaks.

    Raises:
        InvalidInputError: ``peak`` not a positive finite number; none given and the values fit none of the three.
    """
    if peak is not None:
        return _peak(peak, ycc[..., :0], "the YCbCr image")  # its values are not checked against it
    top = float(ycc.max()) if ycc.size else 0.0
    for candidate in _YCBCR_PEAKS:
        if top <= candidate * 1.01:
            return candidate
    raise InvalidInputError(f"the YCbCr image's values reach {top:.6g}: its peak cannot be told",
                            fix="pass the peak rgb_to_ycbcr used, e.g. peak=255")


def rgb_to_gray(rgb) -> np.ndarray:
    """Grey level of an RGB image in 0–255, as OpenCV's BGR→GRAY on float input, rounded (float64).

    This is the conversion the published metric tables use for colour images.
    """
    a = _check_rgb(rgb)
    # float32 arithmetic like OpenCV's float path, so that .5 ties round the same way.
    f = a.astype(np.float32)
    y = f[..., 0] * np.float32(_KR) + f[..., 1] * np.float32(_KG) + f[..., 2] * np.float32(_KB)
    return np.round(y).astype(np.float64)


def rgb_to_ycbcr(rgb, *, peak: Optional[float] = None) -> np.ndarray:
    """RGB -> full-range BT.601 YCbCr (float64, ``(H, W, 3)``); chroma centred on ``peak * 128/255``.

    Args:
        rgb: ``(H, W, 3)`` colour image.
        peak: the intensity of white; ``None`` (default): inferred as :func:`medfuse.fuse` does (255 for integer
            data up to 255, 65535 for uint16 data above 255, 1.0 for floats in 0..1, 255 for floats up to 255),
            always one that :func:`ycbcr_to_rgb` tells back from the values (other integers above 255: 65535).

    Raises:
        InvalidInputError: not an ``(H, W, 3)`` numeric finite image, or a ``peak`` that is not a positive finite
            number, below the image's largest value, or above its integer dtype's top; with no ``peak``, an
            integer image above 65535.
    """
    a = _check_rgb(rgb)
    if peak is None and a.size and np.issubdtype(np.asarray(rgb).dtype, np.integer):
        # A conversion, not a fusion: any integer image round-trips on a peak ycbcr_to_rgb tells from the values,
        # so int8 (whose 255 fuse refuses) and 12-bit int16 need none.
        top = float(a.max())
        peak = next((p for p in _YCBCR_PEAKS[1:] if top <= p), None)
        if peak is None:
            raise InvalidInputError(f"the colour image's values reach {top:.6g}: its peak cannot be inferred",
                                    fix="pass peak= (the intensity of white) here and to ycbcr_to_rgb")
    else:
        peak = _peak(peak, np.asarray(rgb))
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    off = peak * 128.0 / 255.0
    y = _KR * r + _KG * g + _KB * b
    cb = (b - y) / (2.0 * (1.0 - _KB)) + off
    cr = (r - y) / (2.0 * (1.0 - _KR)) + off
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycc, *, peak: Optional[float] = None) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr` (float64, not clipped).

    Args:
        ycc: ``(H, W, 3)`` YCbCr image.
        peak: the peak :func:`rgb_to_ycbcr` used; ``None`` (default): told from the values (1, 255 or 65535, the
            peaks it infers).

    Raises:
        InvalidInputError: not an ``(H, W, 3)`` numeric finite image, a ``peak`` that is not a positive finite
            number, or none given and the values fit none of the three.
    """
    a = _check_rgb(ycc, "the YCbCr image")
    peak = _ycbcr_peak(peak, a)
    off = peak * 128.0 / 255.0
    y, cb, cr = a[..., 0], a[..., 1] - off, a[..., 2] - off
    r = y + 2.0 * (1.0 - _KR) * cr
    b = y + 2.0 * (1.0 - _KB) * cb
    g = (y - _KR * r - _KB * b) / _KG
    return np.stack([r, g, b], axis=-1)


def _check_grey_scale(g: np.ndarray, peak: float) -> None:
    """The grey image must share the colour image's scale (0..``peak``).

    Why: an 8-bit MRI beside a 0..1 PET came out white everywhere, and a 0..1 MRI beside an 8-bit PET
    vanished (its luma 1/255 of the PET's), with no word.
    """
    if g.dtype == bool or not np.issubdtype(g.dtype, np.number) or np.issubdtype(g.dtype, np.complexfloating):
        raise InvalidInputError(f"the grey image must hold real numbers, got {g.dtype}",
                                fix="pass it as a float or integer array on the colour image's scale")
    if not g.size:
        return
    top = float(np.nanmax(g)) if np.issubdtype(g.dtype, np.floating) else float(g.max())
    if not np.isfinite(g).all():
        raise InvalidInputError("the grey image holds NaN or infinite values",
                                fix="replace them first (e.g. np.nan_to_num), or use medfuse.fuse")
    if top > peak * (1 + 1e-6):
        raise InvalidInputError(f"the grey image's values reach {top:.6g}, above the colour image's white "
                                f"({peak:.6g}): fuse_rgb takes both on one scale",
                                fix=f"scale the grey image to 0..{peak:.6g} first, or use medfuse.fuse(grey, rgb), "
                                    "which scales each image itself")
    if peak > 1.0 and np.issubdtype(g.dtype, np.floating) and 0.0 < top <= 1.0:
        warnings.warn(f"the grey image lies in 0..{top:.3g} beside a colour image on 0..{peak:.6g}: read on the "
                      "colour image's scale it is nearly black; scale it to the colour image's range, or use "
                      "medfuse.fuse(grey, rgb), which scales each image itself", MedfuseWarning, stacklevel=3)


def fuse_rgb(gray, rgb, *, method: str = "mean", fuse_fn: Optional[Callable] = None, peak: Optional[float] = None,
             **options) -> np.ndarray:
    """Fuse a grey image (MRI) with a pseudo-colour one (PET/SPECT) through YCbCr.

    Args:
        gray: ``(H, W)`` grey image on the same scale as ``rgb`` (0..``peak``).
        rgb: ``(H, W, 3)`` colour image.
        method: classical rule for the luma (see :mod:`medfuse.fusion.classical`),
            used when ``fuse_fn`` is not given.
        fuse_fn: optional ``fuse_fn([gray, y]) -> fused_y`` (e.g. a network), arrays
            on the 0..``peak`` scale.
        peak: the intensity of white (255 for 8-bit images, 1.0 for 0..1 images); ``None`` (default): inferred
            from ``rgb`` as :func:`medfuse.fuse` does (255 for integer data up to 255, 65535 for uint16 data above
            255, 1.0 for floats in 0..1, 255 for floats up to 255; int8, and other integer dtypes above 255, need
            it).
        **options: passed to the classical rule.

    Returns:
        The fused RGB image, clipped to 0..``peak``; of ``rgb``'s integer dtype when it has one
        (``uint8`` stays ``uint8``), float64 otherwise.

    Raises:
        InvalidInputError: a grey image that is not 2-D, not on the colour image's grid, not real finite numbers
            or above ``peak`` (a float one in 0..1 beside a colour image on 0..255 is warned of); a colour image
            that is not ``(H, W, 3)`` numeric and finite (a float one above 255 needs ``peak``), or a ``peak`` that is
            not a positive finite number, below the colour image's largest value or above its integer dtype's top.
    """
    g = np.asarray(gray)
    if g.ndim != 2:
        raise InvalidInputError(f"the grey image must be 2-D, got shape {g.shape}", fix="pass an (H, W) image")
    _check_rgb(rgb)
    peak = _peak(peak, np.asarray(rgb))
    ycc = rgb_to_ycbcr(rgb, peak=peak)
    if ycc.shape[:2] != g.shape:
        raise InvalidInputError(
            f"the grey image is {g.shape} but the colour image is {ycc.shape[:2]}",
            fix="resample the images onto one grid first",
        )
    _check_grey_scale(g, peak)
    return _fuse_luma(g, rgb, ycc, peak, method=method, fuse_fn=fuse_fn, options=options)


def _fuse_luma(g: np.ndarray, rgb, ycc: np.ndarray, peak: float, *, method: str, fuse_fn: Optional[Callable],
               options: dict) -> np.ndarray:
    """:func:`fuse_rgb` after its checks: ``g`` (0..``peak``) fused with the luma of ``ycc`` (``rgb`` in YCbCr).
    :func:`medfuse.fuse` calls it directly with a grey image it has scaled itself."""
    if fuse_fn is None:
        from .classical import fuse_arrays

        y = fuse_arrays([g.astype(np.float64), ycc[..., 0]], method=method, **options)
    else:
        y = np.asarray(fuse_fn([g.astype(np.float64), ycc[..., 0]]), dtype=np.float64)
    ycc[..., 0] = y
    out = np.clip(ycbcr_to_rgb(ycc, peak=peak), 0.0, peak)
    dtype = np.asarray(rgb).dtype
    if np.issubdtype(dtype, np.integer):
        return np.round(out).astype(dtype.newbyteorder("="))  # big-endian in, native out
    return out
