"""Colour handling for pseudo-colour PET/SPECT images (2-D).

The Harvard atlas ships PET and SPECT as pseudo-colour RGB. The practice of the
fusion literature is to convert them to YCbCr (ITU-R BT.601, full range, as in
JPEG and OpenCV), fuse the luma ``Y`` with the grey MRI, and put the chroma
``Cb``/``Cr`` back. :func:`fuse_rgb` does that.

For 3-D volumes the fused output is a scalar volume; a colour map is a display
choice (the napari plugin's), so nothing here applies to volumes.
"""

from __future__ import annotations

from typing import Callable, Optional

import numpy as np

from ..errors import InvalidInputError

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


def rgb_to_gray(rgb) -> np.ndarray:
    """Grey level of an RGB image in 0–255, as OpenCV's BGR→GRAY on float input, rounded (float64).

    This is the conversion the published metric tables use for colour images.
    """
    a = _check_rgb(rgb)
    # float32 arithmetic like OpenCV's float path, so that .5 ties round the same way.
    f = a.astype(np.float32)
    y = f[..., 0] * np.float32(_KR) + f[..., 1] * np.float32(_KG) + f[..., 2] * np.float32(_KB)
    return np.round(y).astype(np.float64)


def rgb_to_ycbcr(rgb, *, peak: float = 255.0) -> np.ndarray:
    """RGB -> full-range BT.601 YCbCr (float64, ``(H, W, 3)``); chroma centred on ``peak * 128/255``."""
    a = _check_rgb(rgb)
    r, g, b = a[..., 0], a[..., 1], a[..., 2]
    off = peak * 128.0 / 255.0
    y = _KR * r + _KG * g + _KB * b
    cb = (b - y) / (2.0 * (1.0 - _KB)) + off
    cr = (r - y) / (2.0 * (1.0 - _KR)) + off
    return np.stack([y, cb, cr], axis=-1)


def ycbcr_to_rgb(ycc, *, peak: float = 255.0) -> np.ndarray:
    """Inverse of :func:`rgb_to_ycbcr` (float64, not clipped)."""
    a = _check_rgb(ycc, "the YCbCr image")
    off = peak * 128.0 / 255.0
    y, cb, cr = a[..., 0], a[..., 1] - off, a[..., 2] - off
    r = y + 2.0 * (1.0 - _KR) * cr
    b = y + 2.0 * (1.0 - _KB) * cb
    g = (y - _KR * r - _KB * b) / _KG
    return np.stack([r, g, b], axis=-1)


def fuse_rgb(gray, rgb, *, method: str = "mean", fuse_fn: Optional[Callable] = None, peak: float = 255.0, **options) -> np.ndarray:
    """Fuse a grey image (MRI) with a pseudo-colour one (PET/SPECT) through YCbCr.

    Args:
        gray: ``(H, W)`` grey image on the same scale as ``rgb`` (0..``peak``).
        rgb: ``(H, W, 3)`` colour image.
        method: classical rule for the luma (see :mod:`medfuse.fusion.classical`),
            used when ``fuse_fn`` is not given.
        fuse_fn: optional ``fuse_fn([gray, y]) -> fused_y`` (e.g. a network), arrays
            on the 0..``peak`` scale.
        peak: the intensity of white (255 for 8-bit images, 1.0 for 0..1 images).
        **options: passed to the classical rule.

    Returns:
        The fused RGB image, clipped to 0..``peak``; of ``rgb``'s integer dtype when it has one
        (``uint8`` stays ``uint8``), float64 otherwise.
    """
    g = np.asarray(gray)
    if g.ndim != 2:
        raise InvalidInputError(f"the grey image must be 2-D, got shape {g.shape}", fix="pass an (H, W) image")
    ycc = rgb_to_ycbcr(rgb, peak=peak)
    if ycc.shape[:2] != g.shape:
        raise InvalidInputError(
            f"the grey image is {g.shape} but the colour image is {ycc.shape[:2]}",
            fix="resample the images onto one grid first",
        )
    if fuse_fn is None:
        from .classical import fuse_arrays

        y = fuse_arrays([g.astype(np.float64), ycc[..., 0]], method=method, **options)
    else:
        y = np.asarray(fuse_fn([g.astype(np.float64), ycc[..., 0]]), dtype=np.float64)
    ycc[..., 0] = y
    out = np.clip(ycbcr_to_rgb(ycc, peak=peak), 0.0, peak)
    if np.issubdtype(np.asarray(rgb).dtype, np.integer):
        return np.round(out).astype(np.asarray(rgb).dtype)
    return out
