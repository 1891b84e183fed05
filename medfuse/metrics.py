"""Fusion-quality metrics, as the image-fusion literature defines them.

Every metric takes the fused image ``F`` and two or more source images (``A``,
``B`` and optionally ``C``) as plain NumPy arrays on the **0–255 scale** of the
published tables (8-bit images as float64). The definitions follow the
evaluation code most fusion papers use (see ``../shared/README.md`` and
``docs/fusion.md``), so that numbers are directly comparable with them:

* ``EN`` entropy (bits) of the 256-bin histogram of ``uint8(round(F))``.
* ``SD`` population standard deviation of ``F``.
* ``SF`` spatial frequency, one-pixel forward differences.
* ``AG`` average gradient, central differences, one-sided at the borders.
* ``MI`` sum over sources of scikit-learn's ``mutual_info_score`` (nats) on the raw values (whole numbers).
* ``SCD`` sum of the correlations of differences.
* ``VIF`` pixel-domain VIF (4 scales, noise variance 2), summed over sources; NaN under 17 pixels a side
  or with a constant source (nothing to preserve; the reference code says 1).
* ``Qabf`` Xydeas–Petrović edge preservation with Sobel gradients.
* ``SSIM`` sum over sources of scikit-image's SSIM (defaults, ``data_range=255``).
* ``PSNR`` ``10 log10(max(F)^2 / mean_i MSE(S_i, F))``.
* ``CC`` mean over sources of Pearson's correlation with ``F``.
* ``FMI`` feature mutual information (Haghighat 2011, global form) on Sobel gradient
  magnitudes, 256 bins: ``(2/n) * sum_i I(F;S_i) / (H(F) + H(S_i))``, in 0..1.
* ``MS-SSIM`` multi-scale SSIM (Wang 2003: 11x11 Gaussian, sigma 1.5, 5 scales with the published
  weights, fewer and renormalised on small images; as MONAI's), summed over sources like ``SSIM``.
* ``SSIM_r2`` ``SSIM`` with ``data_range=2``: the convention behind CDDFuse's published
  SSIM (scikit-image 0.19 took ``data_range=2`` for float input). Lower than ``SSIM`` on
  the same images; use it only to compare with those tables.

**Every metric scores a better fusion higher** (none is an error to minimise); EN, SD, SF and AG, which look at
``F`` alone, rise with noise too, so read them beside the others. :data:`TITLES` names each in a few words.

A value that is not a finite number (VIF with a constant source, Qabf without edges, PSNR's +-inf, ...) is
returned as it is with an :class:`UndefinedMetricWarning` saying which and why (once per :func:`score` call);
slice-wise means leave such slices out and count them.

With three sources the sums and means run over all three; ``SCD`` correlates
each source ``S_i`` with ``F - sum_{j != i} S_j``. A correlation with a constant
image (undefined, NaN in the reference code) counts as 0.

Inputs off that scale (0..1 floats, 16-bit, HU), or any image (F or a source) whose peak is under 1/16 of the
brightest image's (a 0..1 or SUV source beside 0..255 ones), get a ``MedfuseWarning`` (once per :func:`score`
call): the numbers would not compare with any table. Values beyond 1e50 are refused (squares overflow), as is
an image whose values are all below 1e-50 and not all zero (squares underflow).
MI, SCD, CC, PSNR and FMI do not change when every image is scaled by one factor; SD, SF and AG scale
with it; EN, VIF, SSIM, MS-SSIM, SSIM_r2 and Qabf depend on the range (docs/fusion.md, "Scale").

Any array NumPy reads is accepted (any real dtype or memory layout, CPU torch tensors, MetaTensors).
Masked arrays with masked pixels are refused (NumPy would drop their mask; pass ``mask=`` instead), as are
length-1 axes (``np.squeeze`` them).

**Region of interest.** Every metric and :func:`score` take a keyword-only ``mask``: a boolean array of the
images' shape (0/1 numbers are taken too), True inside the region. Most of a brain volume is background
(zeros in every input), which lifts SSIM (zeros against zeros score 1) and dilutes EN and SD; a mask scores
the brain alone. What "inside the mask" means:

* pixel statistics (``EN``, ``SD``, ``MI``, ``SCD``, ``PSNR``, ``CC``): computed on the pixels inside it
  only, as if ``F[mask]`` and ``S_i[mask]`` were the images (PSNR's peak is ``max(F[mask])``);
* window metrics, computed on the whole image as without a mask (differences, filters and windows need
  neighbours, which may lie outside), then restricted: ``AG``, ``SSIM``, ``SSIM_r2`` average their
  per-pixel maps over the mask (SSIM keeps scikit-image's 3-pixel border out); ``SF`` averages the squared
  differences whose two pixels are both inside; ``Qabf`` and ``VIF``, ratios of sums, sum over the pixels
  (VIF: the windows) centred inside, VIF's coarser scales sampling the mask at the filtered pixels' centres;
  ``FMI`` takes its gradient histograms over the mask; ``MS-SSIM`` averages each scale's map over the windows
  centred inside, the mask downsampled with the image (a coarse pixel is inside when half or more of its
  2x2 block is), and is NaN when no window centre is left inside at some scale.

An all-True mask gives the unmasked values (to float rounding). Refused: another shape, values other than
0/1, a mask that selects nothing, a Volume (pass ``mask.array`` on the images' grid), and, for window
metrics in 2-D and native 3-D, a region without one whole 7x7 (7x7x7) block. Slice-wise, each slice uses
its own slice of the mask; a slice whose mask is empty, or holds no whole 7x7 block, carries no content and
is skipped.

:func:`score` returns all of them in a dict. 3-D volumes are scored either
natively (the metrics whose definition does not depend on dimension, plus 3-D
SSIM) or slice-wise over the three planes, averaged over slices that carry
content; the choice is recorded under ``"mode"``.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import warnings
from typing import Any, Dict, Iterable, Literal, Optional, Sequence, Tuple, overload

import numpy as np

from ._checks import number, unknown_choice, whole
from .errors import InvalidInputError, MedfuseWarning

__all__ = [
    "UndefinedMetricWarning",
    "METRICS", "TITLES", "NATIVE_3D_METRICS", "PIXEL_METRICS", "WINDOW_METRICS", "score", "anisotropy",
    "sampled_slice_scores",
    "en", "sd", "sf", "ag", "mi", "scd", "vif", "qabf", "ssim", "psnr", "cc", "fmi", "ms_ssim", "ssim_r2",
]

#: Metric names, in the order of published tables (then the additions).
METRICS: Tuple[str, ...] = ("EN", "SD", "SF", "AG", "MI", "SCD", "VIF", "Qabf", "SSIM", "PSNR", "CC", "FMI", "MS-SSIM",
                            "SSIM_r2")

#: Each metric in a few words, for a table's legend (the definitions: this module's docstring, docs/fusion.md).
#: Every one scores a better fusion higher.
TITLES: Dict[str, str] = {
    "EN": "entropy (bits)", "SD": "standard deviation (contrast)", "SF": "spatial frequency (detail)",
    "AG": "average gradient (sharpness)", "MI": "mutual information with the sources (nats)",
    "SCD": "sum of the correlations of differences", "VIF": "visual information fidelity",
    "Qabf": "edge preservation (Xydeas-Petrovic)", "SSIM": "structural similarity, summed over the sources",
    "PSNR": "peak signal-to-noise ratio (dB)", "CC": "correlation coefficient with the sources",
    "FMI": "feature mutual information", "MS-SSIM": "multi-scale SSIM, summed over the sources",
    "SSIM_r2": "SSIM with data_range=2 (CDDFuse's convention)",
}

#: Metrics that ``mode="native"`` computes on a whole 3-D volume.
NATIVE_3D_METRICS: Tuple[str, ...] = ("EN", "SD", "MI", "SSIM", "SCD", "PSNR", "CC", "SSIM_r2")

_MIN_SIDE = 7  # scikit-image's default SSIM window; smaller images cannot be scored
_MAX_MAGNITUDE = 1e50  # larger values overflow the metrics' products (SSIM: NaN from ~1e77)
_MIN_MAGNITUDE = 1e-50  # a non-zero image whose values are all smaller underflows them (squares: from ~1e-154)
_SCALE_FACTOR = 6  # peaks further apart than this: images on different scales (see _warn_on_scale)
_VIF_MIN_SIDE = 17  # VIF's finest Gaussian window: below it VIF is undefined (NaN)

# Set while score() or sampled_slice_scores() run the metrics on inputs whose scale they have already checked:
# the scale warnings then come once per call, not once per metric and slice.
_SCALE_CHECKED: contextvars.ContextVar = contextvars.ContextVar("medfuse_metrics_scale_checked", default=False)


# Set while score() runs the metrics with a mask it has already checked (and cut to each slice): each metric then
# takes the boolean array as it is, without checking its values and its size again.
_MASK_CHECKED: contextvars.ContextVar = contextvars.ContextVar("medfuse_metrics_mask_checked", default=False)

#: Metrics computed on the masked pixels alone (their values, histograms and correlations need no neighbours).
PIXEL_METRICS: Tuple[str, ...] = ("EN", "SD", "MI", "SCD", "PSNR", "CC")
#: Metrics whose differences, filters or windows need neighbours: computed on the whole image, then their
#: per-pixel (per-window) maps are averaged, or their sums taken, over the mask.
WINDOW_METRICS: Tuple[str, ...] = ("SF", "AG", "VIF", "Qabf", "SSIM", "FMI", "MS-SSIM", "SSIM_r2")


class UndefinedMetricWarning(MedfuseWarning):
    """A metric has no finite value on these images: VIF with a constant source, Qabf without edges, PSNR of a
    fused image equal to every source, and the like.

    The value is still returned (NaN, or PSNR's +inf/-inf limit), so that a table can show it, but it has no
    place in a mean: :func:`score` (slice-wise), :func:`sampled_slice_scores` and ``medfuse evaluate`` leave
    it out of their means and count what each mean is over. Why a warning: a NaN in a table silently turned
    ``np.mean`` of a column into NaN. One warning per :func:`score` call (not one per slice).
    """


# Set while score(), sampled_slice_scores() or evaluate run the metrics: the undefined values are collected
# here as (metric, why) and reported once by the caller, instead of one warning per metric and slice.
_UNDEFINED: contextvars.ContextVar = contextvars.ContextVar("medfuse_metrics_undefined", default=None)


def _undefined(metric: str, value: float, why: str) -> float:
    """Return ``value`` (NaN or +-inf), saying why it is not a finite number (see UndefinedMetricWarning)."""
    seen = _UNDEFINED.get()
    if seen is not None:
        seen.append((metric, why))
    else:
        warnings.warn(UndefinedMetricWarning(f"{metric} is {_value_word(value)} on these images: {why}"),
                      stacklevel=3)
    return value


def _value_word(value: float) -> str:
    return "NaN (undefined)" if math.isnan(value) else ("+inf" if value > 0 else "-inf")


@contextlib.contextmanager
def _collect_undefined():
    """Collect the undefined values of the metrics run inside (a list of (metric, why)) instead of warning."""
    seen: list = []
    token = _UNDEFINED.set(seen)
    try:
        yield seen
    finally:
        _UNDEFINED.reset(token)


def _report_undefined(seen: Sequence[Tuple[str, str]], *, of: Optional[int] = None, stacklevel: int = 2) -> None:
    """One warning for the undefined values collected in a call; ``of``: the slices scored (slice-wise)."""
    if not seen:
        return
    outer = _UNDEFINED.get()
    per: Dict[str, list] = {}
    for metric, why in seen:
        per.setdefault(metric, []).append(why)
    parts = []
    for metric, whys in per.items():
        reasons = "; ".join(dict.fromkeys(whys))
        where = f" on {len(whys)} of {of} slices" if of is not None else ""
        parts.append(f"{metric}{where} ({reasons})")
    left_out = ("left out of the slice means (n_slices_used counts what each is over)" if of is not None
                else "not a number a mean can take: leave it out and count what the mean is over (medfuse "
                     "evaluate does)")
    if outer is not None:  # an enclosing collector (evaluate) reports them with its own counts
        outer.extend(seen if of is None else [(m, f"on {len(w)} of {of} slices") for m, w in per.items()])
        return
    warnings.warn(UndefinedMetricWarning("no finite value for " + "; ".join(parts) + ": " + left_out),
                  stacklevel=stacklevel + 1)


@contextlib.contextmanager
def _scale_checked():
    token = _SCALE_CHECKED.set(True)
    try:
        yield
    finally:
        _SCALE_CHECKED.reset(token)


@contextlib.contextmanager
def _mask_checked():
    token = _MASK_CHECKED.set(True)
    try:
        yield
    finally:
        _MASK_CHECKED.reset(token)


# ---------------------------------------------------------------------- checks
def _as_float(x, name: str) -> np.ndarray:
    if isinstance(x, np.ma.MaskedArray) and np.ma.getmaskarray(x).any():
        # np.asarray drops the mask: the masked-out pixels would be scored as if they were image.
        raise InvalidInputError(
            f"{name} is a masked array, whose mask NumPy would drop (the masked-out pixels would be scored as image)",
            fix="pass the region as mask=~np.ma.getmaskarray(x) with the data np.ma.getdata(x) (score(..., mask=)), "
            "or crop every image to the region's bounding box")
    from .volume import Volume

    if isinstance(x, Volume):
        # Before np.asarray, which gives a Volume's voxels: the metrics have no grid to check the sources against
        # and expect 0..255 (a fused Volume is 0..1).
        raise InvalidInputError(f"{name} is a {type(x).__name__}, not an array",
                                fix="pass its voxels, x.array, scaled to 0..255, with the sources on its grid")
    try:
        a = np.asarray(x)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        fix = ("convert it first: x.detach().cpu().float().numpy() (a tensor that needs grad, on a GPU or in "
               "bfloat16 has no NumPy view)" if hasattr(x, "detach") else "pass a NumPy array")
        raise InvalidInputError(f"{name} is not an array NumPy can read ({type(x).__name__})", fix=fix) from e
    if not (np.issubdtype(a.dtype, np.number) or a.dtype == bool):
        raise InvalidInputError(f"{name} must be numeric, got dtype {a.dtype}", fix="pass a numeric NumPy array")
    if np.iscomplexobj(a):
        raise InvalidInputError(f"{name} is complex", fix="pass a real-valued image (e.g. its magnitude)")
    if a.size == 0:
        raise InvalidInputError(f"{name} is empty (shape {a.shape})", fix="pass the image itself, not an empty array")
    if a.ndim == 0:  # why: en(5) gave 0.0 bits and sd(5) 0.0, scores of no image
        raise InvalidInputError(f"{name} is a single number ({a.item()!r}), not an image",
                                fix="pass the image's array (e.g. fused.array[:, :, k] for a slice of a Volume)")
    a = a.astype(np.float64, copy=False)
    if not np.all(np.isfinite(a)):
        raise InvalidInputError(
            f"{name} contains NaN or infinite values", fix="replace them (for example with np.nan_to_num) before scoring"
        )
    big = float(np.max(np.abs(a)))
    if big > _MAX_MAGNITUDE:
        # Squares and windowed sums overflow past here: PSNR raised a raw OverflowError near 1e160, SSIM gave NaN
        # and CC 0.0 near 1e100. No image scale comes near it.
        raise InvalidInputError(
            f"{name} holds values up to {big:.3g}, beyond any image scale (the metrics' squares would overflow)",
            fix="rescale every image to 0..255 first (min-max scale, or window scanner units)")
    if 0.0 < big < _MIN_MAGNITUDE:
        # Squares underflow to 0 below ~1e-154: SD, SF and AG came out 0 for a textured image and PSNR said
        # "F equals every source".
        raise InvalidInputError(
            f"{name} holds values no larger than {big:.3g}, below any image scale (the metrics' squares would "
            "underflow to 0)", fix="rescale every image to 0..255 first (min-max scale); a blank image whose "
                                   "leftovers are this small: pass zeros (numpy.zeros_like)")
    return a


def _check(fused, sources: Sequence, *, ndim: Optional[int] = 2, min_side: int = _MIN_SIDE):
    """Validate and convert ``F`` and the sources; return float64 arrays."""
    if len(sources) < 2:
        raise InvalidInputError(
            f"fusion metrics need at least two source images, got {len(sources)}",
            fix="pass the fused image followed by every source image: score(F, A, B)",
        )
    f = _as_float(fused, "the fused image")
    srcs = [_as_float(s, f"source {i + 1}") for i, s in enumerate(sources)]
    for i, s in enumerate(srcs):
        if s.shape != f.shape:
            big, small = (s.shape, f.shape) if s.ndim > f.ndim else (f.shape, s.shape)
            rgb = len(big) == 3 and len(small) == 2 and big[:2] == small and big[2] in (3, 4)
            raise InvalidInputError(
                f"source {i + 1} has shape {s.shape} but the fused image has shape {f.shape}",
                fix=("one of them is RGB: convert colour images to grey first (medfuse.fusion.color.rgb_to_gray), "
                     "as published tables do" if rgb else
                     "resample the images onto one grid first (medfuse.resample / medfuse.register)"),
            )
    refused = (ndim is not None and f.ndim != ndim) or f.ndim not in (2, 3) or min(f.shape) < min_side
    squeezed = tuple(n for n in f.shape if n != 1)
    if refused and 1 in f.shape and len(squeezed) in (2, 3) and min(squeezed) >= min_side:
        # A (1, 1, H, W) network output or an (H, W, 1) image: neither RGB nor too small, just unsqueezed.
        then = "" if ndim in (None, len(squeezed)) else (
            " and score it with mode='2d'" if len(squeezed) == 2 else " and score it with mode='native' or 'slicewise'")
        raise InvalidInputError(
            f"the images have shape {f.shape}, with axes of length 1",
            fix=f"drop them first: np.squeeze(x) gives {squeezed}{then}; do the same to every image")
    if ndim is not None and f.ndim != ndim:
        if f.ndim == 3:
            hint = ("score volumes with mode='slicewise' (over the three planes) or mode='native' (whole-volume "
                    "metrics); an (H, W, 3) RGB image: convert it to grey first (medfuse.fusion.color.rgb_to_gray)")
        elif f.ndim == 2 and ndim == 3:
            hint = "score 2-D images with mode='2d' (the default)"
        else:
            hint = f"pass {ndim}-D arrays"
        raise InvalidInputError(f"expected {ndim}-D images, got shape {f.shape}", fix=hint)
    if f.ndim not in (2, 3):
        raise InvalidInputError(f"expected 2-D images or 3-D volumes, got shape {f.shape}", fix="pass 2-D or 3-D arrays")
    if min(f.shape) < min_side:
        rgb = f.ndim == 3 and f.shape[-1] in (3, 4) and min(f.shape[:2]) >= min_side
        raise InvalidInputError(
            f"the images are too small to score ({'x'.join(map(str, f.shape))}); every side needs at least {min_side} pixels",
            fix=("these look like RGB images: convert them to grey first (medfuse.fusion.color.rgb_to_gray)" if rgb
                 else "the window metrics (3-D SSIM too) need 7 pixels a side: score a thin volume slice-wise across "
                 "the axes whose slices are large enough (mode='slicewise', axes=...; medfuse evaluate --mode "
                 "slicewise), or ask only for the pixel statistics (" + ", ".join(PIXEL_METRICS) + ")"
                 if f.ndim == 3 and sorted(f.shape)[1] >= min_side
                 else "score whole images, not single pixels or thin strips"),
        )
    if not _SCALE_CHECKED.get():
        _warn_on_scale(f, srcs, stacklevel=4)
    return f, srcs


def _warn_on_scale(f: np.ndarray, srcs: Sequence[np.ndarray], *, stacklevel: int = 4) -> None:
    """Warn when the images are not on one 0-255 scale: the definitions assume it.

    PSNR, Qabf, VIF and MI compare raw intensities (F in 0..1 against sources in HU gives numbers, not meaning),
    and EN (256 bins of 0..255), SSIM and MS-SSIM (``data_range=255``) and VIF (noise variance 2) assume
    the 8-bit scale itself: images in 0..1, 16 bits or HU give numbers no table can be compared with.
    """
    # Peak magnitudes, not ranges: a low-contrast F on the right scale (a collapsed fusion, 100..103) is a poor
    # fusion to be scored, not a scale mistake. Every image is compared with the brightest one, not F with the
    # sources only: score(F, A, B / 255) gave VIF 169 unwarned. A factor of 6 separates 0..1 and SUV (up to about
    # 40) from 0..255, and lets through the darkest real 8-bit sources (Harvard's darkest SPECT, of all 1,440
    # images, peaks at 79 against 255: a factor of 3.2); 16 let a PET in SUV 0..20 beside 0..255 images through
    # unwarned, with VIF 1.98 against 1.09. A constant-zero image has no scale to compare.
    names = ["the fused image", *(f"source {i + 1}" for i in range(len(srcs)))]
    peaks = [float(np.max(np.abs(x))) for x in (f, *srcs)]
    top = max(peaks)
    off = [i for i, p in enumerate(peaks) if 0 < p and p * _SCALE_FACTOR < top]
    if off:
        which = " and ".join(names[i] for i in off)
        warnings.warn(
            f"{which} {'is' if len(off) == 1 else 'are'} on a very different intensity scale from the other images "
            f"(largest magnitudes: {', '.join(f'{n} {p:.3g}' for n, p in zip(names, peaks))}); the metrics "
            "assume one scale (very different intensity scales make VIF, SSIM, MS-SSIM, PSNR and Qabf wrong). "
            "Put all of them on one 0-255 scale first (as published tables do): multiply a 0..1 image by 255, "
            "min-max scale SUV or HU to 0..255",
            MedfuseWarning, stacklevel=stacklevel)
        return
    _warn_unless_0_255([f, *srcs], stacklevel=stacklevel + 1)


def _warn_unless_0_255(images: Sequence[np.ndarray], *, stacklevel: int) -> None:
    lo = min(float(x.min()) for x in images)
    hi = max(float(x.max()) for x in images)
    if hi > 1.1 * 255 or lo < -0.1 * 255:
        warnings.warn(
            f"the images hold values from {lo:.6g} to {hi:.6g}, outside the 0-255 scale the metrics are defined on "
            "(EN bins 0..255, SSIM uses data_range=255); the scores are not comparable with published tables. "
            "Rescale to 0-255 first (16-bit: divide by 257; scanner units: window or min-max scale)",
            MedfuseWarning, stacklevel=stacklevel)
    elif hi <= 1.1 and lo >= -1.0 and hi > lo:  # 0..1 with a little overshoot too (an interpolated output)
        warnings.warn(
            f"the images hold values from {lo:.6g} to {hi:.6g}: they look like the 0-1 scale, but the metrics are "
            "defined on 0-255 (EN bins 0..255, SSIM uses data_range=255). Multiply every image by 255 first",
            MedfuseWarning, stacklevel=stacklevel)


# ---------------------------------------------------------------------- masks
#: How a 2-D mask is put on every slice across each axis of an (x, y, z) volume (axial slices are [:, :, k]).
_SLICE_INDEX = {0: ("[k, :, :]", "mask[None, :, :]"), 1: ("[:, k, :]", "mask[:, None, :]"),
                2: ("[:, :, k]", "mask[:, :, None]")}


def _slice_mask_fix(mshape: Tuple[int, ...], shape: Tuple[int, ...],
                    axes: Optional[Tuple[int, ...]] = None) -> Optional[str]:
    """The fix for a 2-D mask given for a volume, or None when its shape is that of no slice of the volume.

    Why: the hint was ``np.broadcast_to(mask, volume.shape)``, which lines the mask up with the volume's last two
    axes, the (y, z) plane; medfuse volumes are (x, y, z) with axial slices ``[:, :, k]``, so on a cube following
    it scored another region silently. Each axis whose slices have the mask's shape is named, the axes being
    scored (slice-wise ``axes``) first, then axial, coronal, sagittal.
    """
    order = [a for a in (axes or ()) if a in (0, 1, 2)] + [2, 1, 0]
    fits = [a for a in dict.fromkeys(order) if tuple(n for i, n in enumerate(shape) if i != a) == tuple(mshape)]
    if not fits:
        return None
    ways = [f"across axis {a} (slices {_SLICE_INDEX[a][0]}): np.broadcast_to({_SLICE_INDEX[a][1]}, volume.shape)"
            for a in fits]
    return ("pass a 3-D mask of the volume's shape; the same 2-D mask on every slice " + "; or ".join(ways)
            + (" (pick the axis whose slices the mask was drawn on)" if len(fits) > 1 else ""))


def _as_mask(mask, shape: Tuple[int, ...], *, axes: Optional[Tuple[int, ...]] = None) -> Optional[np.ndarray]:
    """The region of interest as a boolean array of ``shape`` (None for no mask), or a clear error.

    Accepted: booleans, or numbers that are all 0 or 1 (a uint8 or float label file of a brain mask).
    Refused: another shape, other values (a probability map, a label image), no pixel selected, a Volume.
    ``axes`` (slice-wise scoring's axes) only orders the fix offered for a 2-D mask on a volume.
    """
    if mask is None:
        return None
    if _MASK_CHECKED.get() and isinstance(mask, np.ndarray) and mask.dtype == bool and mask.shape == shape:
        return mask
    if hasattr(mask, "array") and hasattr(mask, "affine"):
        # The metrics take arrays, not Volumes, so there is no grid here to compare the mask's with.
        raise InvalidInputError(f"the mask is a {type(mask).__name__}, not an array",
                                fix="pass its voxels, mask.array, after checking that it lies on the images' grid "
                                "(medfuse.resample(mask, image, interpolation='nearest') if not)")
    if isinstance(mask, np.ma.MaskedArray):
        mask = np.ma.filled(mask, 0)  # a masked entry of the mask is outside the region
    try:
        m = np.asarray(mask)
    except Exception as e:  # noqa: BLE001 - anything that is not array-like
        raise InvalidInputError(f"the mask is not an array NumPy can read ({type(mask).__name__})",
                                fix="pass a boolean NumPy array of the images' shape") from e
    if m.dtype != bool:
        if not np.issubdtype(m.dtype, np.number) or np.iscomplexobj(m):
            raise InvalidInputError(f"the mask must be boolean (or 0/1 numbers), got dtype {m.dtype}",
                                    fix="pass a boolean array: True inside the region, False outside")
        inside = m == 1
        other = ~(inside | (m == 0))
        if other.any():
            seen = ", ".join(f"{v:g}" for v in np.unique(m[other])[:3])
            raise InvalidInputError(
                f"the mask holds values other than 0 and 1 (e.g. {seen}): it looks like a probability map or a "
                "label image, not a region", fix="threshold it (mask = p > 0.5) or pick the labels you mean "
                "(mask = np.isin(labels, [1, 2]))")
        m = inside
    if m.shape != tuple(shape):
        slice_fix = _slice_mask_fix(m.shape, tuple(shape), axes) if m.ndim == 2 and len(shape) == 3 else None
        if slice_fix is not None:
            fix = slice_fix
        elif sorted(m.shape) == sorted(shape):
            fix = "its axes are in another order than the images' (a transposed array?): put them in the same order"
        elif tuple(n for n in m.shape if n != 1) == tuple(n for n in shape if n != 1):
            fix = "drop or add the length-1 axes (np.squeeze / np.reshape) so that it has the images' shape"
        else:
            fix = "resample the mask onto the images' grid (nearest neighbour), or crop it as the images were"
        raise InvalidInputError(f"the mask has shape {m.shape} but the images have shape {tuple(shape)}", fix=fix)
    if not m.any():
        raise InvalidInputError("the mask selects no pixel (it is all False)",
                                fix="check that it is on the images' grid and not inverted, or pass mask=None "
                                "to score the whole image")
    return m


def _require_window(m: Optional[np.ndarray], what: str) -> None:
    """Refuse a region that holds no whole 7-pixel-a-side window (7x7, or 7x7x7 in 3-D).

    The window metrics are averaged over the region's pixels; with no full window inside, every value would
    come from windows that are mostly background, and SF could have no pair of neighbours inside at all.
    """
    if m is None:
        return
    from scipy.ndimage import minimum_filter

    # Separable erosion by a cube of side 7: a voxel survives when its whole window lies inside the mask.
    if not minimum_filter(m.view(np.uint8), size=_MIN_SIDE, mode="constant", cval=0).any():
        block = "x".join([str(_MIN_SIDE)] * m.ndim)
        raise InvalidInputError(
            f"the mask is too small for {what}: it holds no whole {block} block ({int(m.sum())} pixels selected), "
            "and these metrics look at neighbourhoods of that size",
            fix=f"use a larger region, or ask only for the pixel statistics ({', '.join(PIXEL_METRICS)})")


def _slices_fitting_a_window(m: np.ndarray, axis: int) -> np.ndarray:
    """Per index along ``axis``: True when that slice of the 3-D mask holds a whole 7x7 block.

    Slice-wise scoring skips the other slices, as 2-D scoring refuses such a region: their window metrics would
    come from windows that are mostly outside it.
    """
    from scipy.ndimage import minimum_filter

    size = [1 if a == axis else _MIN_SIDE for a in range(3)]
    fits = minimum_filter(m.view(np.uint8), size=size, mode="constant", cval=0)
    return fits.any(axis=tuple(a for a in range(3) if a != axis))


def _in(x: np.ndarray, m: Optional[np.ndarray]) -> np.ndarray:
    """The pixels of ``x`` inside the region (all of them, flattened, for no mask)."""
    return x.ravel() if m is None else x[m]


def _region_mean(values: np.ndarray, m: Optional[np.ndarray]) -> float:
    """Mean of a per-pixel map over the region; NaN when the region holds none of the map's pixels."""
    v = values if m is None else values[m]
    return float(np.mean(v)) if v.size else float("nan")


def _metric_mask(mask, f: np.ndarray, *, windows: bool, what: str) -> Optional[np.ndarray]:
    """A public metric's ``mask=`` argument, checked against ``f`` (and, for window metrics, its size)."""
    if mask is None:
        return None
    checked = _MASK_CHECKED.get()
    m = _as_mask(mask, f.shape)
    if windows and not checked:
        _require_window(m, what)
    return m


# ---------------------------------------------------------------------- helpers
def _corr(x: np.ndarray, y: np.ndarray) -> float:
    """Pearson correlation; 0 when either side is constant (no linear relation can be measured)."""
    dx = x - x.mean()
    dy = y - y.mean()
    # Each side over its largest deviation (the correlation does not change): sums of squares of values near
    # 1e100 overflowed to inf, and the correlation came out 0.
    sx, sy = float(np.max(np.abs(dx))), float(np.max(np.abs(dy)))
    if sx > 0 and sy > 0:
        dx, dy = dx / sx, dy / sy
    den = math.sqrt(float(np.sum(dx * dx)) * float(np.sum(dy * dy)))
    return float(np.sum(dx * dy) / den) if den > 0 else 0.0


def _nanmean(values) -> float:
    """Mean over the finite values (NaN when there is none): a NaN or PSNR's +inf has no place in a mean."""
    v = np.asarray(list(values), dtype=np.float64)
    v = v[np.isfinite(v)]
    return float(v.mean()) if v.size else float("nan")


def _labels(x: np.ndarray) -> np.ndarray:
    """Integer labels (one per distinct value, not necessarily contiguous) of ``x``, flattened."""
    v = x.ravel()
    if np.issubdtype(v.dtype, np.integer) or np.array_equal(v, np.round(v)):
        lo, hi = v.min(), v.max()
        if hi - lo < 1 << 16:  # integers in a small range: the offset is a label (gaps do not matter)
            return (v - lo).astype(np.int64)
    return np.unique(v, return_inverse=True)[1].ravel().astype(np.int64)


def _mutual_info(x: np.ndarray, y: np.ndarray) -> float:
    """Mutual information (nats) of two label arrays, as scikit-learn's ``mutual_info_score``."""
    xi, yi = _labels(x), _labels(y)
    ny = int(yi.max()) + 1
    nx = int(xi.max()) + 1
    if nx * ny <= 1 << 22:  # small label sets (8-bit images): one bincount, no sort
        counts = np.bincount(xi * ny + yi, minlength=nx * ny)
        codes = np.flatnonzero(counts)
        counts = counts[codes]
    else:
        codes, counts = np.unique(xi * ny + yi, return_counts=True)
    n = float(xi.size)
    px = np.bincount(xi).astype(np.float64)
    py = np.bincount(yi).astype(np.float64)
    pxy = counts / n
    outer = px[codes // ny] * py[codes % ny]
    terms = pxy * (np.log(counts) - np.log(n)) + pxy * (np.log(n) + np.log(n) - np.log(outer))
    terms = np.where(np.abs(terms) < np.finfo(np.float64).eps, 0.0, terms)
    return float(max(terms.sum(), 0.0))


def _filter_valid(x: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable 'valid' correlation of a 2-D image with ``outer(g, g)`` (symmetric g)."""
    from scipy.ndimage import correlate1d

    r = len(g) // 2
    y = correlate1d(x, g, axis=0, mode="constant")
    y = correlate1d(y, g, axis=1, mode="constant")
    return y[r:x.shape[0] - r, r:x.shape[1] - r]


def _gauss1d(n: int, sd: float) -> np.ndarray:
    m = (n - 1) / 2.0
    t = np.arange(-m, m + 1)
    g = np.exp(-(t * t) / (2.0 * sd * sd))
    return g / g.sum()


def _sobel(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    """Sobel responses (x, y) with zero padding, as MATLAB's ``conv2(..., 'same')``."""
    from scipy.ndimage import convolve

    hy = np.array([[1.0, 2, 1], [0, 0, 0], [-1, -2, -1]])
    hx = np.array([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]])
    return convolve(img, hx, mode="constant"), convolve(img, hy, mode="constant")


def _entropy_bits(counts: np.ndarray) -> float:
    p = counts[counts > 0] / counts.sum()
    return float(-np.sum(p * np.log2(p))) + 0.0  # + 0.0 turns -0.0 into 0.0


# ---------------------------------------------------------------------- single-image metrics
def _as_image2d(fused) -> np.ndarray:
    """The fused image for SF and AG: 2-D, at least 2 pixels a side (they take differences along both axes)."""
    f = _as_float(fused, "the fused image")
    if f.ndim > 2 and sum(n > 1 for n in f.shape) == 2:
        raise InvalidInputError(f"SF and AG are defined on 2-D images, got shape {f.shape} (axes of length 1)",
                                fix="drop the length-1 axes first: np.squeeze(x)")
    if f.ndim != 2:
        hint = ("score volumes with score(..., mode='slicewise'); an (H, W, 3) RGB image: convert it to grey first "
                "(medfuse.fusion.color.rgb_to_gray)" if f.ndim == 3 else "pass a 2-D image")
        raise InvalidInputError(f"SF and AG are defined on 2-D images, got shape {f.shape}", fix=hint)
    if min(f.shape) < 2:
        raise InvalidInputError(f"the image is too small for SF and AG ({f.shape[0]}x{f.shape[1]}); they need "
                                "at least 2 pixels a side", fix="score whole images, not single rows or columns")
    return f


def en(fused, *, mask=None) -> float:
    """Shannon entropy (bits) of the 256-bin histogram of ``uint8(round(F))`` (values clipped to 0..255).

    With ``mask``, the histogram of the pixels inside it.
    
    Args:
        fused: the fused image ``F`` on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The entropy in bits, 0..8. Higher is better, as the published tables read it (noise raises it too).

    Raises:
        InvalidInputError: ``F`` is not a numeric array (a Volume: pass ``vol.array``), is a single number,
            is empty or holds NaN/inf; the mask has another shape,
            values other than 0/1, or selects nothing.
    """
    f = _as_float(fused, "the fused image")
    m = _metric_mask(mask, f, windows=False, what="EN")
    if not _SCALE_CHECKED.get():
        _warn_unless_0_255([f], stacklevel=3)  # 0..1 or 16-bit input would land in one or two bins
    q = np.clip(np.round(_in(f, m)), 0, 255).astype(np.uint8)
    return _entropy_bits(np.bincount(q, minlength=256).astype(np.float64))


def sd(fused, *, mask=None) -> float:
    """Population standard deviation of ``F`` (of its pixels inside ``mask``).

    Args:
        fused: the fused image ``F`` on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The standard deviation, in ``F``'s units: contrast.
        Higher is better, as the published tables read it (noise raises it too).

    Raises:
        InvalidInputError: ``F`` is not a numeric array (a Volume: pass ``vol.array``), is a single number,
            is empty or holds NaN/inf; the mask has another shape,
            values other than 0/1, or selects nothing.
    """
    f = _as_float(fused, "the fused image")
    return float(np.std(_in(f, _metric_mask(mask, f, windows=False, what="SD"))))


def sf(fused, *, mask=None) -> float:
    """Spatial frequency: ``sqrt(mean(dx^2) + mean(dy^2))`` with one-pixel forward differences (2-D).

    With ``mask``, each mean is over the differences whose two pixels both lie inside it (the step from the
    region to the background is no detail of the region). The mask must hold a whole 7x7 block, as for every
    neighbourhood metric.

    Args:
        fused: the fused image ``F`` on the 0..255 scale (any real dtype; CPU torch tensors are taken), 2-D.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The spatial frequency, in ``F``'s units per pixel: detail.
        Higher is better, as the published tables read it (noise raises it too).

    Raises:
        InvalidInputError: ``F`` is not a numeric array (a Volume: pass ``vol.array``), is a single number,
            is empty or holds NaN/inf, is not 2-D or is under 2 pixels a side; the mask has another shape,
            values other than 0/1, selects nothing, or holds no whole 7x7 block.
    """
    f = _as_image2d(fused)
    m = _metric_mask(mask, f, windows=True, what="SF")
    dx2, dy2 = np.diff(f, axis=1) ** 2, np.diff(f, axis=0) ** 2
    if m is None:
        return float(np.sqrt(np.mean(dx2) + np.mean(dy2)))
    v = float(np.sqrt(_region_mean(dx2, m[:, 1:] & m[:, :-1]) + _region_mean(dy2, m[1:, :] & m[:-1, :])))
    return _undefined("SF", v, "no two neighbouring pixels lie inside the mask") if math.isnan(v) else v


def ag(fused, *, mask=None) -> float:
    """Average gradient: mean of ``sqrt((Gx^2 + Gy^2) / 2)`` (2-D); with ``mask``, the mean over its pixels
    of the gradients computed on the whole image (the mask must hold a whole 7x7 block, as for every
    neighbourhood metric).

    Args:
        fused: the fused image ``F`` on the 0..255 scale (any real dtype; CPU torch tensors are taken), 2-D.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The average gradient, in ``F``'s units per pixel: sharpness.
        Higher is better, as the published tables read it (noise raises it too).

    Raises:
        InvalidInputError: ``F`` is not a numeric array (a Volume: pass ``vol.array``), is a single number,
            is empty or holds NaN/inf, is not 2-D or is under 2 pixels a side; the mask has another shape,
            values other than 0/1, selects nothing, or holds no whole 7x7 block.
    """
    f = _as_image2d(fused)
    m = _metric_mask(mask, f, windows=True, what="AG")
    # np.gradient: central differences inside, one-sided at the borders -- the definition.
    gy, gx = np.gradient(f)
    return _region_mean(np.sqrt((gx * gx + gy * gy) / 2.0), m)


# ---------------------------------------------------------------------- reference metrics
def _warn_if_mi_on_continuous_values(images: Sequence[np.ndarray], *, stacklevel: int) -> None:
    """MI counts distinct values: on a continuous F (a network's float output) it measures the number of
    distinct values, not information (the same fusion scored 3.9 rounded, 10.5 with 0.01 of noise)."""
    for x in images:
        if np.abs(x - np.round(x)).max() > 1e-6:  # not float noise such as (a / 255) * 255
            # Rounding a 0..1 image as it is makes it binary: say to put it on 0..255 first.
            small = max(float(np.max(np.abs(i))) for i in images) <= 1.1
            how = ("put them on 0-255 and round, as saved 8-bit images are (np.round(F * 255) for a 0..1 image)"
                   if small else "rounded to 8 bits (np.round(F))")
            warnings.warn(
                "MI is computed on the raw values, and these images are not whole numbers: MI then counts distinct "
                f"values and comes out far too high. Score the images as saved, {how}",
                MedfuseWarning, stacklevel=stacklevel)
            return


def mi(fused, *sources, mask=None) -> float:
    """Sum over sources of the mutual information (nats) between raw pixel values (inside ``mask``).

    Meant for whole-number images (8-bit, as saved); warns on continuous values, where MI counts distinct values.
    In nats (natural log), while :func:`en` is in bits: divide by ``ln 2`` (0.693) for the bits the VIFB and
    MATLAB toolkits report (2.661 nats is 3.839 bits). Summed over the sources, so ``F = A`` scores ``H(A)``
    plus ``I(A; B)``: copying a source scores high (docs/fusion.md, "Identity baselines").
    
    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed mutual information in nats (0 or more). Higher is better: ``F`` carries more of the sources.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or empty; the mask
            has another shape, values other than 0/1, or selects nothing.
    """
    f, srcs = _check(fused, sources, ndim=None, min_side=1)
    m = _metric_mask(mask, f, windows=False, what="MI")
    if not _SCALE_CHECKED.get():
        _warn_if_mi_on_continuous_values([f, *srcs], stacklevel=3)
    return float(sum(_mutual_info(_in(f, m), _in(s, m)) for s in srcs))


def scd(fused, *sources, mask=None) -> float:
    """Sum of the correlations of differences: ``sum_i corr(S_i, F - sum_{j != i} S_j)`` (inside ``mask``).

    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed correlations, -2..2 for two sources (-3..3 for three). Higher is better: ``F`` holds more
        of what each source adds to the others.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or empty; the mask
            has another shape, values other than 0/1, or selects nothing.
    """
    f, srcs = _check(fused, sources, ndim=None, min_side=1)
    m = _metric_mask(mask, f, windows=False, what="SCD")
    total = sum(srcs)
    return float(sum(_corr(_in(s, m), _in(f - (total - s), m)) for s in srcs))


def cc(fused, *sources, mask=None) -> float:
    """Mean over sources of the correlation coefficient with ``F`` (of the pixels inside ``mask``).

    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The mean correlation coefficient, -1..1. Higher is better: ``F`` follows the sources more closely.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or empty; the mask
            has another shape, values other than 0/1, or selects nothing.
    """
    f, srcs = _check(fused, sources, ndim=None, min_side=1)
    m = _metric_mask(mask, f, windows=False, what="CC")
    return float(np.mean([_corr(_in(s, m), _in(f, m)) for s in srcs]))


def psnr(fused, *sources, mask=None) -> float:
    """``10 log10(max(F)^2 / mean_i MSE(S_i, F))``: inf when F equals every source, -inf when ``max(F) == 0``.

    With ``mask``, ``max(F)`` and the MSEs are over the pixels inside it.
    Invariant to one scale factor on every image, not to an offset (``max(F)``).
    The peak is ``max(F)`` (the reference code's convention), not 255, so one bright pixel raises it: on a
    Harvard CT-MRI pair (2013, max rule, halved) setting a single pixel to 255 takes PSNR from 8.19 to 14.18 dB
    (+20 log10(255 / max(F)) = +6 dB), above the undarkened max rule's 13.00 dB. Compare PSNR only between
    fusions of like peak, and never as the only figure.
    
    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        PSNR in dB (inf or -inf in the cases above). Higher is better: ``F`` is closer to the sources.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or empty; the mask
            has another shape, values other than 0/1, or selects nothing.
    """
    f, srcs = _check(fused, sources, ndim=None, min_side=1)
    m = _metric_mask(mask, f, windows=False, what="PSNR")
    if m is not None:
        f, srcs = f[m], [s[m] for s in srcs]
    mse = float(np.mean([np.mean((s - f) ** 2) for s in srcs]))
    peak = float(np.max(f)) ** 2
    if mse == 0:
        return _undefined("PSNR", float("inf"), "F equals every source (no error: the limit is +inf)")
    if peak == 0:
        return _undefined("PSNR", float("-inf"), "F is all zero (max(F) = 0)")
    return float(10.0 * np.log10(peak / mse))


def _ssim_pair(f: np.ndarray, s: np.ndarray, data_range: float = 255.0, m: Optional[np.ndarray] = None) -> float:
    from skimage.metrics import structural_similarity

    if m is None:
        return float(structural_similarity(f, s, data_range=data_range))
    _, smap = structural_similarity(f, s, data_range=data_range, full=True)
    # scikit-image averages the map without a border of half a window (3 pixels): so does the region's mean,
    # so that an all-True mask gives scikit-image's value.
    pad = (7 - 1) // 2
    inner = tuple(slice(pad, n - pad) for n in smap.shape)
    return _region_mean(smap[inner], m[inner])


def ssim(fused, *sources, mask=None) -> float:
    """Sum over sources of SSIM (scikit-image defaults, ``data_range=255``); 2-D or 3-D.

    With ``mask``, each SSIM map (windows on the whole image) is averaged over the mask's pixels, leaving out,
    as scikit-image does, the 3 pixels along the image's border.
    
    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed SSIM: up to 2 for two sources (3 for three). Higher is better: ``F`` keeps more of the
        sources' structure.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or under 7 pixels a
            side; the mask has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources, ndim=None)
    m = _metric_mask(mask, f, windows=True, what="SSIM")
    return float(sum(_ssim_pair(f, s, 255.0, m) for s in srcs))


def ssim_r2(fused, *sources, mask=None) -> float:
    """:func:`ssim` with ``data_range=2``, as CDDFuse's published tables computed it; 2-D or 3-D.

    Only for comparing with those tables: on 0..255 images its stabilising constants are almost 0, so it
    is lower than :func:`ssim` and dominated by flat, noisy regions. ``mask`` as in :func:`ssim`.
    
    Args:
        fused: the fused image ``F`` (2-D or 3-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed SSIM with ``data_range=2``: up to 2 for two sources (3 for three). Higher is better, as
        for :func:`ssim`.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or 3-D or under 7 pixels a
            side; the mask has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources, ndim=None)
    m = _metric_mask(mask, f, windows=True, what="SSIM_r2")
    return float(sum(_ssim_pair(f, s, 2.0, m) for s in srcs))


def _vifp_pair(ref: np.ndarray, dist: np.ndarray, m: Optional[np.ndarray] = None) -> float:
    sigma_nsq = 2.0
    eps = 1e-10
    num = den = 0.0
    for scale in range(1, 5):
        n = 2 ** (5 - scale) + 1
        r = n // 2
        g = _gauss1d(n, n / 5.0)
        if scale > 1:
            if min(ref.shape) < n:
                break  # too small for this scale: the coarser scales add nothing
            if m is not None:  # the region at the next scale: the centres of the filtered, kept pixels
                m = m[r:m.shape[0] - r, r:m.shape[1] - r][::2, ::2]
            ref = _filter_valid(ref, g)[::2, ::2]
            dist = _filter_valid(dist, g)[::2, ::2]
        if min(ref.shape) < n:
            break
        mu1 = _filter_valid(ref, g)
        mu2 = _filter_valid(dist, g)
        s1 = _filter_valid(ref * ref, g) - mu1 * mu1
        s2 = _filter_valid(dist * dist, g) - mu2 * mu2
        s12 = _filter_valid(ref * dist, g) - mu1 * mu2
        s1[s1 < 0] = 0
        s2[s2 < 0] = 0
        gain = s12 / (s1 + eps)
        sv = s2 - gain * s12
        low1 = s1 < eps
        gain[low1] = 0
        sv[low1] = s2[low1]
        s1[low1] = 0
        low2 = s2 < eps
        gain[low2] = 0
        sv[low2] = 0
        neg = gain < 0
        sv[neg] = s2[neg]
        gain[neg] = 0
        sv[sv <= eps] = eps
        num_map = np.log10(1.0 + gain * gain * s1 / (sv + sigma_nsq))
        den_map = np.log10(1.0 + s1 / sigma_nsq)
        if m is not None:  # the windows centred inside the region
            inside = m[r:m.shape[0] - r, r:m.shape[1] - r]
            num_map, den_map = num_map[inside], den_map[inside]
        num += float(np.sum(num_map))
        den += float(np.sum(den_map))
    if den == 0:
        # A featureless source (constant where VIF looks): 0/0. The reference code returns 1, a perfect term
        # whatever F is, which lifted slice-wise means wherever one source had no content.
        return float("nan")
    return num / den


def vif(fused, *sources, mask=None) -> float:
    """Pixel-domain VIF (4 scales, sigma_n^2 = 2) of ``F`` against each source, summed (2-D).

    Summed over the sources, so ``F = A`` scores 1 (VIF of A against itself) plus VIF(B -> A): a copy of one
    source scores above 1, above most fusions (docs/fusion.md, "Identity baselines").

    VIF is a ratio of sums over windows: with ``mask``, both sums run over the windows centred inside it (at
    each coarser scale, the mask is sampled at the filtered pixels' centres, as the image is).
    NaN for images under 17 pixels a side: VIF's finest window (17x17) does not fit, so there is nothing to
    measure (the reference code's featureless-image convention, 1 per source, would pass for a perfect score).
    Images under 41 pixels a side are scored on the scales that fit, which departs from the reference code: it
    scores every scale, and a scale whose window does not fit gives it a meaningless term (a Harvard CT-MRI crop,
    max rule: 20x23 pixels gives 1.049 here and 1.690 there; 41x37, 0.931 and 0.936). Values on such small
    images compare with nothing published. NaN too when a source is constant: it
    has no information to preserve (0/0; the reference code's 1 would be a perfect term whatever ``F`` is).
    Every NaN comes with an :class:`UndefinedMetricWarning`; slice-wise means and ``medfuse evaluate`` leave it
    out and count it. Depends on the intensity scale
    (the noise variance 2 is on 0..255).
    
    Args:
        fused: the fused image ``F`` (2-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed VIF (NaN in the cases above). Higher is better: ``F`` keeps more of the sources' visual
        information.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or under 7 pixels a side; the mask
            has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources)
    m = _metric_mask(mask, f, windows=True, what="VIF")
    if min(f.shape) < _VIF_MIN_SIDE:
        return _undefined("VIF", float("nan"), f"the images are under {_VIF_MIN_SIDE} pixels a side (VIF's "
                          "finest window does not fit)")
    terms = [_vifp_pair(s, f, m) for s in srcs]
    flat = [i + 1 for i, t in enumerate(terms) if math.isnan(t)]
    if flat:
        # No limit to take: as a source's variance goes to 0 its term can go anywhere in 0..inf, depending on F.
        where = " inside the mask" if m is not None else ""
        which = f"source {flat[0]} is" if len(flat) == 1 else f"sources {', '.join(map(str, flat))} are"
        return _undefined("VIF", float("nan"), f"{which} constant{where} (no "
                          "information to preserve: 0/0)")
    return float(sum(terms))


def _qabf_edges(img: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
    gx, gy = _sobel(img)
    strength = np.sqrt(gx * gx + gy * gy)
    angle = np.full(img.shape, math.pi / 2)
    nz = gx != 0
    angle[nz] = np.arctan(gy[nz] / gx[nz])
    return strength, angle


def _qabf_preservation(ga, aa, gf, af) -> np.ndarray:
    tg, kg, dg = 0.9994, -15.0, 0.5
    ta, ka, da = 0.9879, -22.0, 0.8
    # Relative strength: smaller over larger; where equal the reference code keeps gF itself.
    rel = np.where(ga > gf, gf / np.where(ga > gf, ga, 1.0), np.where(ga < gf, ga / np.where(ga < gf, gf, 1.0), gf))
    rel_angle = 1.0 - np.abs(aa - af) / (math.pi / 2)
    return tg / (1.0 + np.exp(kg * (rel - dg))) * ta / (1.0 + np.exp(ka * (rel_angle - da)))


def qabf(fused, *sources, mask=None) -> float:
    """Xydeas–Petrović edge-information preservation ``Q^{AB/F}`` (Sobel gradients; 2-D).

    Qabf is a ratio of sums over pixels: with ``mask``, both sums run over its pixels (gradients computed on
    the whole image).
    NaN when no source has an edge (all-zero sources; a non-zero constant has one at the zero-padded border).
    As in the reference code, where a source's gradient equals F's the relative strength is F's gradient
    itself, not 1: on whole-number 0..255 images that is 1 or more and so as good as 1, but on the 0..1
    scale it is below 0.5 and those pixels count as lost (0.82x on a max-rule pair), so Qabf depends on the
    scale as well; zero padding makes it depend on an offset too.
    
    Args:
        fused: the fused image ``F`` (2-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        Qabf in 0..1 (NaN in the case above). Higher is better: more of the sources' edges kept (1: all).

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or under 7 pixels a side; the mask
            has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources)
    m = _metric_mask(mask, f, windows=True, what="Qabf")
    gf, af = _qabf_edges(f)
    num = den = 0.0
    for s in srcs:
        gs, as_ = _qabf_edges(s)
        q = _qabf_preservation(gs, as_, gf, af) * gs
        num += float(np.sum(q if m is None else q[m]))
        den += float(np.sum(gs if m is None else gs[m]))
    if den > 0:
        return num / den
    return _undefined("Qabf", float("nan"), "no source has an edge" + (" inside the mask" if m is not None else "")
                      + " (nothing to preserve: 0/0)")


def _quantise(x: np.ndarray, bins: int = 256) -> np.ndarray:
    top = float(x.max())
    if top <= 0:
        return np.zeros(x.shape, dtype=np.int64)
    return np.minimum((x / top * bins).astype(np.int64), bins - 1)


def fmi(fused, *sources, mask=None) -> float:
    """Feature mutual information on Sobel gradient magnitudes (global form), in 0..1 (2-D).

    A pair whose gradient histograms both have no entropy counts as perfect: all-zero images score 1.
    Invariant to one scale factor on every image (the magnitudes are binned relative to their maximum).
    With ``mask``, the gradients are computed on the whole image and the histograms (and the maximum they are
    binned by) taken over the mask's pixels.
    
    Args:
        fused: the fused image ``F`` (2-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        FMI in 0..1. Higher is better: more of the sources' gradient features kept.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or under 7 pixels a side; the mask
            has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources)
    m = _metric_mask(mask, f, windows=True, what="FMI")
    ff = _quantise(_in(np.hypot(*_sobel(f)), m))
    hf = _entropy_bits(np.bincount(ff.ravel()).astype(np.float64))
    total = 0.0
    for s in srcs:
        fs = _quantise(_in(np.hypot(*_sobel(s)), m))
        hs = _entropy_bits(np.bincount(fs.ravel()).astype(np.float64))
        denom = hf + hs
        # _mutual_info is in nats; the entropies are in bits.
        total += (_mutual_info(ff, fs) / math.log(2) / denom) if denom > 0 else 1.0 / 2
    return float(2.0 * total / len(srcs))


_MS_WEIGHTS = np.array([0.0448, 0.2856, 0.3001, 0.2363, 0.1333])


def _ms_ssim_pair(x: np.ndarray, y: np.ndarray, m: Optional[np.ndarray] = None) -> float:
    c1 = (0.01 * 255) ** 2
    c2 = (0.03 * 255) ** 2
    # Images under 11 pixels a side get the largest odd window that fits.
    side = min(x.shape)
    g = _gauss1d(11 if side >= 11 else side - (1 - side % 2), 1.5)
    levels = 1
    while levels < 5 and min(x.shape) // 2 ** levels >= 11:
        levels += 1
    # Wang's five weights as published (they sum to 1.0001); only a truncated set is renormalised.
    weights = _MS_WEIGHTS if levels == len(_MS_WEIGHTS) else _MS_WEIGHTS[:levels] / _MS_WEIGHTS[:levels].sum()
    vals = []
    r = len(g) // 2
    for lev in range(levels):
        mx, my = _filter_valid(x, g), _filter_valid(y, g)
        sxx = _filter_valid(x * x, g) - mx * mx
        syy = _filter_valid(y * y, g) - my * my
        sxy = _filter_valid(x * y, g) - mx * my
        cs = (2 * sxy + c2) / (sxx + syy + c2)
        inside = None if m is None else m[r:m.shape[0] - r, r:m.shape[1] - r]  # windows centred in the region
        if lev == levels - 1:
            vals.append(_region_mean((2 * mx * my + c1) / (mx * mx + my * my + c1) * cs, inside))
        else:
            vals.append(_region_mean(cs, inside))
            # 2x2 average then decimate, as in Wang's reference code.
            h, w = (x.shape[0] // 2) * 2, (x.shape[1] // 2) * 2
            x = x[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            y = y[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3))
            if m is not None:  # a coarse pixel is in the region when at least half of its 2x2 block is
                m = m[:h, :w].reshape(h // 2, 2, w // 2, 2).mean(axis=(1, 3)) >= 0.5
    if any(math.isnan(v) for v in vals):
        return float("nan")  # the region holds no whole window at some scale: nothing to measure there
    v = np.clip(np.asarray(vals), 0.0, None)  # negative contrast terms would make the product meaningless
    return float(np.prod(v ** weights))


def ms_ssim(fused, *sources, mask=None) -> float:
    """Multi-scale SSIM of ``F`` against each source, summed (2-D).

    With ``mask``, each scale's map is averaged over the windows centred inside the mask, the mask being
    downsampled with the image (a coarse pixel is inside when half or more of its 2x2 block is). NaN when the
    region holds no window centre at some scale (a small region near the border, or one that vanishes).
    
    Args:
        fused: the fused image ``F`` (2-D) on the 0..255 scale (any real dtype; CPU torch tensors are taken).
        *sources: the two or three source images, each of ``F``'s shape and scale.
        mask: (keyword-only) the region of interest: a boolean (or 0/1) array of ``F``'s shape, True inside;
            None (default) for the whole image.

    Returns:
        The summed MS-SSIM: up to 2 for two sources (3 for three); NaN as above. Higher is better, as for
        :func:`ssim`.

    Raises:
        InvalidInputError: fewer than two sources, an input that is not a numeric array (a Volume: pass
            ``vol.array``), shapes that differ, NaN/inf, images that are not 2-D or under 7 pixels a side; the mask
            has another shape, values other than 0/1, or selects nothing (or no whole 7x7 block).
    """
    f, srcs = _check(fused, sources)
    m = _metric_mask(mask, f, windows=True, what="MS-SSIM")
    v = float(sum(_ms_ssim_pair(f, s, m) for s in srcs))
    if math.isnan(v):
        return _undefined("MS-SSIM", v, "the mask holds no window centre at some scale")
    return v


# ---------------------------------------------------------------------- score
_SINGLE = {"EN": en, "SD": sd, "SF": sf, "AG": ag}
_MULTI = {"MI": mi, "SCD": scd, "VIF": vif, "Qabf": qabf, "SSIM": ssim, "PSNR": psnr, "CC": cc, "FMI": fmi,
          "MS-SSIM": ms_ssim, "SSIM_r2": ssim_r2}


def _names(metrics: Optional[Iterable[str]], allowed: Sequence[str]) -> list:
    if metrics is None:
        return list(allowed)
    try:
        names = [metrics] if isinstance(metrics, str) else list(metrics)
    except TypeError:  # why: metrics=5 failed with "'int' object is not iterable"
        raise InvalidInputError(f"metrics must be metric names, got a {type(metrics).__name__}",
                                fix=f"pass a name or a list of them, e.g. metrics=['Qabf', 'VIF'] (from "
                                    f"{', '.join(allowed)})") from None
    if not names:
        raise InvalidInputError("no metric was named (an empty list)",
                                fix=f"name at least one of {', '.join(allowed)}, or pass metrics=None for all")
    lookup = {m.upper(): m for m in METRICS}
    out = []
    for m in names:
        key = lookup.get(str(m).upper())
        if key is None:
            raise unknown_choice(m, "metric", METRICS, fix=f"choose from {', '.join(METRICS)}")
        if key not in allowed:
            raise InvalidInputError(
                f"metric {key} is not defined for this mode", fix=f"choose from {', '.join(allowed)} or another mode"
            )
        out.append(key)
    return out


def _score2d(f: np.ndarray, srcs: Sequence[np.ndarray], names: Sequence[str], m: Optional[np.ndarray] = None
             ) -> Dict[str, float]:
    out = {}
    with _mask_checked():  # m is None or a checked boolean array
        for name in names:
            out[name] = _SINGLE[name](f, mask=m) if name in _SINGLE else _MULTI[name](f, *srcs, mask=m)
    return out


# For type checkers: mode "2d" (the default) gives only floats; "native" adds "mode" (a str), "slicewise" the
# per-axis dicts, counts and lists its Returns section lists.
@overload
def score(fused: Any, *sources: Any, mode: Literal["2d"] = ..., metrics: Optional[Iterable[str]] = ...,
          axes: Sequence[int] = ..., min_content: float = ..., mask: Any = ...) -> Dict[str, float]: ...


@overload
def score(fused: Any, *sources: Any, mode: str, metrics: Optional[Iterable[str]] = ...,
          axes: Sequence[int] = ..., min_content: float = ..., mask: Any = ...) -> Dict[str, Any]: ...


def score(fused: Any, *sources: Any, mode: str = "2d", metrics: Optional[Iterable[str]] = None,
          axes: Sequence[int] = (0, 1, 2), min_content: float = 0.01, mask: Any = None) -> Dict[str, Any]:
    """Score a fused image against its sources with every metric (or the ones named).

    Args:
        fused: the fused image ``F`` (2-D image or 3-D volume), on the 0–255 scale.
        *sources: the source images ``A, B`` (and optionally ``C``), same shape as ``F``.
        mode: ``"2d"`` for images; for volumes ``"native"`` (whole-volume metrics:
            EN, SD, MI, 3-D SSIM, SCD, PSNR, CC, 3-D SSIM_r2) or ``"slicewise"`` (every 2-D metric on
            every slice of the planes in ``axes``, averaged over slices that carry content,
            then over planes).
        metrics: metric names to compute (default: all that the mode defines).
        axes: slicewise only: the axes across which slices are taken, one (``axes=2``: the axial slices
            ``[:, :, k]`` of an (x, y, z) volume) or several, whole numbers 0..2. Another value with
            ``mode="2d"`` or ``"native"`` is refused (it would be ignored).
        min_content: slicewise only: a slice carries content when at least this fraction (0..1, default
            0.01) of its pixels is above the volume's minimum in some source (and, with ``mask``, inside it).
        mask: a region of interest: a boolean array of the images' shape (0/1 numbers are taken too), or
            None for the whole image. The pixel statistics (EN, SD, MI, SCD, PSNR, CC) are computed on the
            pixels inside it; the window metrics (SF, AG, VIF, Qabf, SSIM, SSIM_r2, MS-SSIM, FMI) on the whole
            image, then their maps averaged (or, for the ratios of sums VIF and Qabf, their sums taken) over
            it. Slice-wise, each slice uses its own slice of the mask; slices where it is empty, or holds no
            whole 7x7 block, are skipped. An all-True mask gives the unmasked values.

    Returns:
        ``{name: value}``, each value a float (all that mode ``"2d"`` returns); for volumes also ``"mode"``, and
        for slicewise ``"per_axis"`` (``{axis: {name: value}}``), ``"axes"``, ``"min_content"``, ``"n_slices"``
        (per axis: the slices with content),
        ``"n_slices_used"`` (per metric: the slices, over all axes, whose value was not NaN, i.e. what its
        means are over; fewer than ``sum(n_slices.values())`` when some were left out) and
        ``"n_slices_used_per_axis"`` (``{axis: {name: count}}``).

    Raises:
        InvalidInputError: fewer than two sources, shapes that differ, NaN/inf, values beyond 1e50, images
            too small for the window metrics named (under 7 pixels a side; slice-wise: slices across ``axes``
            under 7x7), unknown metric or mode, ``metrics`` that are not names, ``min_content`` outside 0..1,
            ``axes`` that are not whole numbers 0..2 (a bool or a float too) or that pick planes with a mode
            other than ``"slicewise"``; a mask of another shape (a 2-D mask for a volume: the fix says how to
            put it on every slice), with values other than 0/1 or True/False, that selects nothing, or (2-D and
            native, with a window metric named) that holds no whole 7x7 (7x7x7) block.

    Example:
        >>> import numpy as np
        >>> a = np.tile(np.arange(16.0), (16, 1)) * 10; b = a.T.copy()
        >>> round(score(a, a, b, metrics=["CC"])["CC"], 3)
        0.5
    """
    if not isinstance(mode, str) or mode not in ("2d", "native", "slicewise"):  # an array: "truth value ambiguous"
        raise InvalidInputError(f"unknown mode {mode!r}" if isinstance(mode, str) else
                                f"mode must be a string, got a {type(mode).__name__}",
                                fix="use mode='2d', 'native' or 'slicewise'")
    min_content = number(min_content, "min_content", low=0, high=1, what="a fraction", example="min_content=0.01")
    axes = _parse_axes(axes)
    if mode != "slicewise" and set(axes) != {0, 1, 2}:
        # It was ignored silently: score(F, A, B, axes=1) on 2-D images scored them whole, as asked for nothing.
        raise InvalidInputError(f"axes={axes[0] if len(axes) == 1 else axes} picks the planes of slice-wise scoring, "
                                f"but mode is {mode!r}, which has no slices to pick",
                                fix="leave axes out, or score a volume with mode='slicewise'")
    # Names first: a typo is reported before any work. Scale warnings come once, from _check here.
    names = _names(metrics, NATIVE_3D_METRICS if mode == "native" else METRICS)
    # Sizes only where they are used: the pixel statistics take any shape, and slice-wise only the planes
    # of the slices scored matter (a 64x64x5 volume has 64x64 slices across axis 2); see _score_slicewise.
    windowed = [n for n in names if n in WINDOW_METRICS]
    # SF and AG are differences of neighbours: 2 pixels a side do, as their own functions take (score asked 7).
    side = 2 if set(windowed) <= {"SF", "AG"} else _MIN_SIDE
    f, srcs = _check(fused, sources, ndim=2 if mode == "2d" else 3,
                     min_side=side if windowed and mode != "slicewise" else 1)
    # The fix for a 2-D mask names the planes being scored first, when some were picked.
    m = _as_mask(mask, f.shape, axes=axes if mode == "slicewise" and set(axes) != {0, 1, 2} else None)
    if mode != "slicewise" and windowed:  # slice-wise, a slice's region may be small; it is then scored as it is
        _require_window(m, ", ".join(windowed))
    if "MI" in names:
        _warn_if_mi_on_continuous_values([f, *srcs], stacklevel=3)
    with _scale_checked(), _collect_undefined() as seen:
        if mode == "2d":
            out: Dict[str, Any] = dict(_score2d(f, srcs, names, m))
        elif mode == "native":
            out = dict(_score2d(f, srcs, names, m))  # the same calls, on the whole volume
            out["mode"] = "native"
        else:
            out = _score_slicewise(f, srcs, names, axes, min_content, m)
    # Once per call (slice-wise: how many slices each metric had no value on), after the collector is gone.
    _report_undefined(seen, of=sum(out["n_slices"].values()) if mode == "slicewise" else None)
    return out


def _is_axis(a) -> bool:
    return isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) and int(a) in (0, 1, 2)


def _parse_axes(axes) -> Tuple[int, ...]:
    """``score``'s ``axes``: one axis or several, each plane once, as a tuple of ints.

    Why: ``int(axes)`` took ``True`` as axis 1 and ``2.7`` as axis 2; an axis is a whole number 0, 1 or 2.

    Raises:
        InvalidInputError: neither an axis nor a non-empty list of axes 0, 1, 2 (bools, floats and text are
            refused).
    """
    if _is_axis(axes):
        return (int(axes),)
    items = None
    if isinstance(axes, (list, tuple, range)) or (isinstance(axes, np.ndarray) and axes.ndim == 1):
        items = list(axes)
    if not items or not all(_is_axis(a) for a in items):
        shown = repr(axes) if isinstance(axes, (int, float, bool, np.number, np.bool_, list, tuple, range)) \
            and len(repr(axes)) <= 40 else f"a {type(axes).__name__}"
        raise InvalidInputError(f"axes must be an axis (0, 1 or 2, a whole number) or a non-empty list of them, "
                                f"got {shown}", fix="pass e.g. axes=2 or axes=(0, 1, 2)")
    return tuple(dict.fromkeys(int(a) for a in items))


def _score_slicewise(f: np.ndarray, srcs: Sequence[np.ndarray], names: Sequence[str], axes, min_content: float,
                     m: Optional[np.ndarray] = None) -> Dict[str, Any]:
    axes = _parse_axes(axes)
    windowed = [n for n in names if n in WINDOW_METRICS]
    small = [a for a in axes if min(n for i, n in enumerate(f.shape) if i != a) < _MIN_SIDE]
    if windowed and small:
        # Checked before any work, on the planes asked for only (score() checks no size slice-wise).
        ax = small[0]
        h, w = (n for i, n in enumerate(f.shape) if i != ax)
        fitting = [a for a in range(3) if min(n for i, n in enumerate(f.shape) if i != a) >= _MIN_SIDE]
        raise InvalidInputError(
            f"slices across axis {ax} of this {'x'.join(map(str, f.shape))} volume are {h}x{w} pixels, too small "
            f"for {', '.join(windowed)} (every side needs at least {_MIN_SIDE} pixels)",
            fix=(f"score across the axes whose slices are large enough, axes={tuple(fitting)}, or " if fitting
                 else "") + f"ask only for the pixel statistics ({', '.join(PIXEL_METRICS)})")
    floors = [float(s.min()) for s in srcs]
    per_axis: Dict[int, Dict[str, float]] = {}
    counts: Dict[int, int] = {}
    used: Dict[int, Dict[str, int]] = {}
    above = np.zeros(f.shape, dtype=bool)
    for s, lo in zip(srcs, floors):
        above |= s > lo
    if m is not None:
        above &= m
    for ax in axes:
        other = tuple(a for a in range(3) if a != ax)
        content = above.mean(axis=other) >= min_content
        if m is not None:  # a slice outside the region, or with too little of it, carries no content
            content &= _slices_fitting_a_window(m, ax)
        rows = []
        for k in np.flatnonzero(content):
            sl = [slice(None)] * 3
            sl[ax] = int(k)
            fs = f[tuple(sl)]
            ss = [s[tuple(sl)] for s in srcs]
            rows.append(_score2d(fs, ss, names, None if m is None else m[tuple(sl)]))
        counts[ax] = len(rows)
        per_axis[ax] = {n: _nanmean(r[n] for r in rows) for n in names}
        # A NaN slice (VIF on a blank source, say) or PSNR's +inf is left out of its metric's mean: count what
        # each is over.
        used[ax] = {n: int(sum(math.isfinite(r[n]) for r in rows)) for n in names}
    if not sum(counts.values()):
        where = " inside the mask" if m is not None else ""
        raise InvalidInputError(
            f"no slice carries content: fewer than {min_content:.3g} of the pixels of every slice are above the "
            f"sources' minimum{where} (constant or empty sources{', or a small mask' if where else ''})",
            fix="check that the sources are not empty" + (" and that the mask covers them" if where else "")
            + ", or lower min_content")
    out: Dict[str, Any] = {n: _nanmean(per_axis[a][n] for a in axes) for n in names}
    out.update(mode="slicewise", axes=list(axes), per_axis=per_axis, n_slices=counts, min_content=min_content,
               n_slices_used={n: sum(used[a][n] for a in axes) for n in names}, n_slices_used_per_axis=used)
    return out


# ---------------------------------------------------------------------- volumes: through-plane checks
def anisotropy(fused, sources: Sequence) -> np.ndarray:
    """Through-plane consistency of a fused volume: per axis, its roughness relative to the sources'.

    The roughness along an axis is the mean absolute second difference along it. For each axis the value is
    the fused volume's roughness over the roughest source's, divided by the mean of that ratio on the other
    two axes. A fusion that treats the axes alike keeps the sources' own anisotropy (the mean rule's value is
    the reference); fusing slice by slice, or stripes, raise the value of the stacking axis.

    Args:
        fused: the fused volume.
        sources: the source volumes (same shape).

    Returns:
        A (3,) array, one value per axis (NaN for an axis when the fused volume has no roughness along the other
        two, e.g. a constant volume).

    Raises:
        InvalidInputError: ``sources`` is not a list of volumes (unlike the metrics, they come as one list), fewer
            than two of them, an input that is not a numeric 3-D array of ``fused``'s shape, NaN/inf, or a volume
            under 7 voxels a side.
    """
    if not (isinstance(sources, (list, tuple)) or (isinstance(sources, np.ndarray) and sources.ndim == 4)):
        # Why: None or a number failed in len(), and one volume was taken as a list of its slices.
        raise InvalidInputError(f"anisotropy takes the sources as one list, got a {type(sources).__name__}"
                                + (f" of shape {tuple(sources.shape)}" if hasattr(sources, "shape") else ""),
                                fix="pass anisotropy(fused, [a, b]) (or [a, b, c]), the sources in one list")
    with _scale_checked():  # ratios of roughness: any scale will do
        f, srcs = _check(fused, sources, ndim=3)

    def rough(v: np.ndarray, axis: int) -> float:
        return float(np.abs(np.diff(v, n=2, axis=axis)).mean())

    r = np.array([rough(f, ax) / max(max(rough(s, ax) for s in srcs), 1e-12) for ax in range(3)])
    others = np.array([np.mean(np.delete(r, i)) for i in range(3)])
    # A fused volume flat along the other two axes (constant, say) has no anisotropy to speak of: NaN.
    return np.array([r[i] / others[i] if others[i] > 0 else float("nan") for i in range(3)])


def sampled_slice_scores(fused, *sources, step: int = 8, min_fraction: float = 0.2,
                         metrics: Sequence[str] = ("Qabf", "VIF"), mask=None) -> np.ndarray:
    """2-D metrics of a fused volume, averaged over every ``step``-th slice along each of the three axes.

    A quick through-plane-aware score (``score(mode="slicewise")`` scores every slice): inputs are on the
    0..1 scale; each slice is scored on the 8-bit scale with the fused slice clipped and rounded (the sources
    too for MI, which on continuous values counts distinct values), and only slices in
    which more than ``min_fraction`` of the first source is non-zero count.

    With ``mask`` (a boolean volume of the inputs' shape), each slice is scored within its slice of the mask
    as :func:`score` does, and a slice counts when more than ``min_fraction`` of its pixels are inside the
    mask and non-zero in the first source, and its mask holds a whole 7x7 block.

    Args:
        fused: the fused volume (3-D), on the 0..1 scale.
        *sources: the two or three source volumes, of ``fused``'s shape, on the 0..1 scale.
        step: (keyword-only) score every ``step``-th slice along each axis (a positive whole number).
        min_fraction: (keyword-only) a slice counts when more than this fraction (0..1) of it is non-zero in the
            first source (and inside ``mask``).
        metrics: (keyword-only) names of metrics that compare with the sources (not EN, SD, SF or AG).
        mask: (keyword-only) a boolean volume of the inputs' shape, or None.

    Returns:
        The mean of each named metric, in the order given.

    Raises:
        InvalidInputError: inputs as :func:`score` refuses them, values off the 0..1 scale, a ``step`` that is
            not a positive whole number, an unknown or single-image metric, or no slice with enough content.
    """
    names = _names(metrics, METRICS)
    min_fraction = number(min_fraction, "min_fraction", low=0, high=1, what="a fraction",
                          example="min_fraction=0.2")
    step = whole(step, "step", minimum=1, what="a whole number of slices", example="step=8")
    bad = [n for n in names if n not in _MULTI]
    if bad:
        raise InvalidInputError(f"sampled_slice_scores takes metrics that compare with the sources, not {bad[0]}",
                                fix=f"choose from {', '.join(_MULTI)}")
    with _scale_checked():  # 0..1 by definition here; each slice is scored on 0..255
        f, srcs = _check(fused, sources, ndim=3)
        for what, x in (("the fused volume", f), *((f"source {i + 1}", s) for i, s in enumerate(srcs))):
            lo, hi = float(x.min()), float(x.max())
            # The slices are scored as 255 * x (F clipped to 0..1): a 0..255 volume would be scored as garbage.
            # The margin lets a network's small overshoot through.
            if lo < -0.5 or hi > 1.5:
                raise InvalidInputError(
                    f"sampled_slice_scores takes volumes on the 0..1 scale, but {what} holds values from {lo:.6g} "
                    f"to {hi:.6g}", fix="divide 8-bit volumes by 255, or scale every volume to 0..1 first "
                    "(medfuse.fusion.normalise.normalise)")
        m = _as_mask(mask, f.shape)
        rows = []
        with _collect_undefined() as seen:  # one warning for all the slices, below
            for ax in range(3):
                f3, s3 = np.moveaxis(f, ax, 0), [np.moveaxis(s, ax, 0) for s in srcs]
                m3 = None if m is None else np.moveaxis(m, ax, 0)
                fits = None if m is None else _slices_fitting_a_window(m, ax)
                for i in range(0, f3.shape[0], int(step)):
                    present = s3[0][i] > 0 if m3 is None else (s3[0][i] > 0) & m3[i]
                    if present.mean() > min_fraction and (fits is None or fits[i]):
                        f8, ss8 = np.round(np.clip(f3[i], 0, 1) * 255), [s[i] * 255 for s in s3]
                        # MI on sources rounded as F is: on unrounded ones it counts distinct values (5.5 nats on
                        # 8-bit sources became 7.9 with 1e-4 of noise), and its warning is off in here.
                        mi8 = [np.round(np.clip(s, 0, 255)) for s in ss8] if "MI" in names else ss8
                        with _mask_checked():
                            rows.append([_MULTI[n](f8, *(mi8 if n == "MI" else ss8), mask=None if m3 is None else m3[i])
                                         for n in names])
    if not rows:
        raise InvalidInputError("no slice has enough content to score",
                                fix="lower min_fraction or step, or check that the first source is not empty")
    _report_undefined(seen, of=len(rows), stacklevel=2)
    # Over the slices where each metric is defined (VIF is NaN on slices under 17 pixels a side).
    return np.array([_nanmean(col) for col in zip(*rows)])
