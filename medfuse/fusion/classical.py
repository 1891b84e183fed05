"""Classical fusion rules: baselines to beat, and a fallback that needs no torch.

Every rule works on two or more 2-D images or 3-D volumes of one shape, is
deterministic, and returns float64 on the inputs' intensity scale (the
multi-scale rules clipped to the inputs' joint range):

* ``mean`` — (weighted) average.
* ``max`` — pixel-wise maximum.
* ``laplacian`` — Laplacian pyramid; detail levels take the coefficient with the
  largest magnitude, the coarsest (base) level is averaged (Burt & Adelson 1983).
  Each axis is reduced while it keeps 8 pixels, so a volume's long axes get the
  levels a 2-D image of them gets.
* ``wavelet`` — discrete wavelet transform (PyWavelets): max-abs details,
  averaged approximation.
* ``gff`` — guided-filter fusion (Li, Kang & Hu 2013): two-scale decomposition,
  Laplacian saliency, weight maps refined with a box-filter guided filter. Ties of saliency (a flat
  background in every input) go to the first input, as in the published code: unlike the other rules, the
  result depends on the inputs' order.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from typing import Any, Optional, Sequence

import numpy as np

from .._checks import _shown, describe, did_you_mean, label, number, refuse_volumes, unknown_choice
from ..errors import InvalidInputError
from ..progress import check, check_callbacks

__all__ = ["METHODS", "fuse_arrays", "guided_filter"]

#: The classical rule names, in the order of the baseline tables.
METHODS = ("mean", "max", "laplacian", "wavelet", "gff")


def _check(arrays: Sequence) -> list:
    if arrays is None or isinstance(arrays, (str, bytes, Mapping)) or not hasattr(arrays, "__len__") \
            or not hasattr(arrays, "__getitem__"):
        # Why: len(None) raised a bare TypeError, and a str was read as a list of one-character "images".
        raise InvalidInputError(f"classical fusion takes a list of 2 or 3 arrays, got {describe(arrays)}",
                                fix="pass a list of 2 or 3 arrays, e.g. fuse_arrays([a, b], method='mean')")
    if isinstance(arrays, np.ndarray) or len(arrays) < 2:
        raise InvalidInputError(
            "fusion needs a list of at least two images", fix="pass fuse_arrays([a, b]) (or [a, b, c])"
        )
    refuse_volumes(arrays, takes="the classical rules here take arrays")
    out = []
    for i, a in enumerate(arrays):
        x = np.asarray(a)
        if not (np.issubdtype(x.dtype, np.number) or x.dtype == bool) or np.iscomplexobj(x):
            raise InvalidInputError(f"input {i + 1} must be real and numeric, got dtype {x.dtype}", fix="pass numeric arrays")
        # No copy of an input already in float64 (8 bytes a voxel each, on top of the peak): no rule writes to
        # its inputs (tests/pipeline/test_memory_steps.py holds that), and none returns one of them as its result.
        x = x.astype(np.float64, copy=False)
        if x.ndim not in (2, 3):
            raise InvalidInputError(
                f"input {i + 1} has shape {x.shape}; classical fusion takes 2-D images or 3-D volumes",
                fix="pass 2-D or 3-D arrays (for RGB PET/SPECT use medfuse.fusion.color.fuse_rgb)",
            )
        if not np.all(np.isfinite(x)):
            raise InvalidInputError(f"input {i + 1} contains NaN or infinite values", fix="replace them before fusing")
        if out and x.ndim != out[0].ndim:  # not a grid matter: resampling advice sent users the wrong way
            raise InvalidInputError(
                f"input {i + 1} has shape {x.shape} but input 1 has shape {out[0].shape}: different numbers of "
                "dimensions", fix="give every input the same dimensions: squeeze singleton axes (numpy.squeeze), or "
                                  "fuse 2-D images with 2-D images and volumes with volumes")
        if out and x.shape != out[0].shape:
            raise InvalidInputError(
                f"input {i + 1} has shape {x.shape} but input 1 has shape {out[0].shape}",
                fix="resample the inputs onto one grid first (medfuse.register / medfuse.resample)",
            )
        if min(x.shape) < 2:
            raise InvalidInputError(f"input {i + 1} is too small ({x.shape})", fix="every side needs at least 2 pixels")
        out.append(x)
    return out


def _weights(weights: Optional[Sequence[float]], n: int) -> np.ndarray:
    if weights is None:
        return np.full(n, 1.0 / n)
    fix = f"pass weights=[...] with {n} entries, e.g. {[round(1 / n, 3)] * n}"
    if isinstance(weights, (list, tuple)) and any(x is None for x in weights):
        # None became NaN: "got [nan, 1.0]" quoted what the caller never passed.
        raise InvalidInputError(f"weights must be {n} non-negative numbers, got a {type(weights).__name__} holding "
                                "None", fix=fix)
    try:
        if isinstance(weights, (str, bytes, Mapping)):  # a str would be read as one number, or its text echoed
            raise TypeError
        items = np.asarray(weights, dtype=object).ravel()
        w = np.asarray(weights, dtype=np.float64).ravel()
    except (TypeError, ValueError):
        raise InvalidInputError(f"weights must be {n} non-negative numbers, got {describe(weights)}", fix=fix) from None
    if any(isinstance(x, (str, bytes)) for x in items):
        # NumPy parses ["1", "2"] as numbers: text where numbers belong is a mistake upstream (a CSV read as str).
        raise InvalidInputError(f"weights must be {n} non-negative numbers, got text",
                                fix=f"convert them first ([float(x) for x in weights]), or {fix}")
    if w.size != n or not np.all(np.isfinite(w)) or np.any(w < 0) or w.max() <= 0:
        raise InvalidInputError(
            f"weights must be {n} non-negative numbers with a positive sum, got {w.tolist()}",
            fix=f"pass weights=[...] with {n} entries, e.g. {[round(1 / n, 3)] * n}",
        )
    with np.errstate(over="ignore"):
        total = w.sum()
    if not np.isfinite(total):
        # The sum of finite weights overflowed (1e308 + 1e308 = inf, and w / inf gave all-zero weights, a black
        # image, with NumPy's raw warning): divided by the largest first, the sum lies in 1..n.
        w = w / w.max()
        total = w.sum()
    return w / total


def _select_max_abs(coeffs: Sequence[np.ndarray]) -> np.ndarray:
    """Pick, per position, the coefficient with the largest magnitude (first wins ties).

    Pairwise rather than through a stacked array: the stack, its magnitudes and the index array cost about 5
    volumes more at the peak of a Laplacian fusion (a 512x512x300 CT grid: gigabytes). A strict ``>`` keeps the
    first of equal magnitudes, as ``argmax`` did; the inputs are finite (checked), so the result is the same.
    """
    best = np.array(coeffs[0], copy=True)
    best_abs = np.abs(best)
    for c in coeffs[1:]:
        c_abs = np.abs(c)
        wins = c_abs > best_abs
        np.copyto(best, c, where=wins)
        np.maximum(best_abs, c_abs, out=best_abs)
    return best


# ---------------------------------------------------------------------- Laplacian pyramid
#: The shortest side a pyramid level is reduced to: an axis is halved only while the result keeps this many pixels.
_SMALLEST = 8


def _reduce_axes(shape, smallest: int = _SMALLEST) -> tuple:
    """The axes of ``shape`` long enough to be halved once more (to ``ceil(n / 2) >= smallest``)."""
    return tuple(ax for ax, n in enumerate(shape) if n // 2 >= smallest)


def _reduce(x: np.ndarray, axes) -> np.ndarray:
    """Gaussian blur (sigma 1) and keep every second pixel, along ``axes`` only: coarse ``k`` is fine ``2k``.

    The other axes are left as they are (neither blurred nor sampled), so that a short axis of a volume (40
    slices) stops while the long ones go on. Keeps the dtype (float32 stays float32).
    """
    from scipy.ndimage import gaussian_filter

    sigma = [1.0 if ax in axes else 0.0 for ax in range(x.ndim)]  # sigma 0: that axis is not filtered
    return gaussian_filter(x, sigma=sigma, mode="reflect")[
        tuple(slice(None, None, 2) if ax in axes else slice(None) for ax in range(x.ndim))]


def _upsample_axis(c: np.ndarray, n: int, axis: int) -> np.ndarray:
    """Linear upsampling by 2 along ``axis`` to length ``n``, the inverse grid of :func:`_reduce`.

    ``out[2k] = c[k]``, ``out[2k+1] = (c[k] + c[k+1]) / 2``, the last sample held. (``scipy.ndimage.zoom`` with
    ``grid_mode=True`` puts coarse ``k`` at ``2k + 0.5``: half a pixel off the reduce, so detail layers of different
    sources no longer lined up.) Keeps the dtype; one output array, no temporaries of its size.
    """
    m = c.shape[axis]

    def at(s):
        return tuple(s if ax == axis else slice(None) for ax in range(c.ndim))

    out = np.empty(c.shape[:axis] + (n,) + c.shape[axis + 1:], dtype=c.dtype)
    out[at(slice(0, None, 2))] = c  # ceil(n / 2) == m even positions
    if m > 1:
        odd = out[at(slice(1, 2 * m - 1, 2))]  # the m - 1 positions between two coarse samples
        np.add(c[at(slice(0, -1))], c[at(slice(1, None))], out=odd)
        odd *= 0.5
    if n == 2 * m:  # an even length ends on an odd position past the last coarse sample: hold it
        out[at(slice(n - 1, n))] = c[at(slice(m - 1, m))]
    return out


def _expand(x: np.ndarray, shape, axes) -> np.ndarray:
    """Back to ``shape`` along ``axes`` (those :func:`_reduce` halved), separably."""
    for ax in axes:
        x = _upsample_axis(x, shape[ax], ax)
    return x


def _laplacian_pyramid(x: np.ndarray, levels: int, smallest: int = _SMALLEST) -> list:
    """Detail levels (finest first) and the base; an axis is reduced while it keeps ``smallest`` pixels."""
    pyr = []
    cur = x
    for i in range(levels):
        axes = _reduce_axes(cur.shape, smallest)
        if not axes and i == 0:  # an image under 2 * smallest a side still gets one level, as it always did
            axes = tuple(ax for ax, n in enumerate(cur.shape) if n >= 2)
        if not axes:
            break
        small = _reduce(cur, axes)
        pyr.append(cur - _expand(small, cur.shape, axes))
        cur = small
    pyr.append(cur)
    return pyr


def _collapse(pyr: list) -> np.ndarray:
    cur = pyr[-1]
    for detail in reversed(pyr[:-1]):
        axes = tuple(ax for ax in range(detail.ndim) if detail.shape[ax] != cur.shape[ax])
        cur = detail + _expand(cur, detail.shape, axes)
    return cur


def _max_levels(shape, smallest: int = _SMALLEST) -> int:
    """How many times the longest axis can be halved keeping ``smallest`` pixels (the shorter axes stop sooner)."""
    n, shape = 0, tuple(shape)
    while True:
        axes = _reduce_axes(shape, smallest)
        if not axes:
            return n
        shape = tuple(-(-s // 2) if ax in axes else s for ax, s in enumerate(shape))
        n += 1


def _warn_cut(rule: str, option: str, asked, used, why: str) -> None:
    """One MedfuseWarning for an option the image's size cut, pointing at the first caller outside medfuse (the
    user's line, whether it called fuse_arrays or medfuse.fuse)."""
    import os
    import sys

    from ..errors import MedfuseWarning

    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__))) + os.sep
    frame, level = sys._getframe(0), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(package):
        frame, level = frame.f_back, level + 1
    warnings.warn(MedfuseWarning(f"{rule}: {option}={asked} is more than this image allows; {used} used ({why})"),
                  stacklevel=level)


def _no_poll() -> None:
    return None


def _laplacian(xs, *, levels: Optional[int] = None, weights=None, poll=_no_poll) -> np.ndarray:
    # levels None: the default 4, cut silently on small images; a levels the caller chose is cut with a warning.
    most = _max_levels(xs[0].shape)
    used = max(1, min(4 if levels is None else int(levels), most))
    if levels is not None and int(levels) > used:
        _warn_cut("laplacian", "levels", int(levels), used,
                  f"the longest side, {max(xs[0].shape)} pixels, can be halved {most} times keeping {_SMALLEST} "
                  f"pixels" if most else f"no side has the {2 * _SMALLEST} pixels a second level needs")
    levels = used
    w = _weights(weights, len(xs))
    pyrs = []
    for x in xs:
        poll()
        pyrs.append(_laplacian_pyramid(x, levels))
    poll()
    levels = len(pyrs[0]) - 1  # as many as built (an image with no axis of 2 pixels would have none)
    fused = [_select_max_abs([p[k] for p in pyrs]) for k in range(levels)]
    fused.append(sum(wi * p[-1] for wi, p in zip(w, pyrs)))
    return _collapse(fused)


# ---------------------------------------------------------------------- wavelet
def _wavelet(xs, *, wavelet: str = "db2", levels: Optional[int] = None, weights=None, poll=_no_poll) -> np.ndarray:
    import pywt

    fix = "use a PyWavelets name such as 'db2', 'haar' or 'sym4'"
    if not isinstance(wavelet, str):  # PyWavelets raised AttributeError/TypeError for these
        raise InvalidInputError(f"unknown wavelet: it must be a PyWavelets name (a str), got {describe(wavelet)}",
                                fix=fix)
    try:
        wav = pywt.Wavelet(wavelet)
    except ValueError:
        try:
            pywt.ContinuousWavelet(wavelet)
            continuous = True
        except ValueError:
            continuous = False
        if continuous:  # 'mexh' or 'cmor1.5-1.0': "names no wavelet" sent users checking the spelling
            raise InvalidInputError(f"{wavelet!r} is a continuous wavelet; the wavelet rule needs a discrete one",
                                    fix=fix + " (pywt.wavelist(kind='discrete') lists them)") from None
        raise InvalidInputError(f"unknown wavelet {label(wavelet)}: it names no PyWavelets wavelet"
                                f"{did_you_mean(wavelet, pywt.wavelist(kind='discrete'))}", fix=fix) from None
    # wavedecn takes one level count for every axis, and dwtn_max_level that of the shortest axis: a volume of
    # 40 slices gets the levels 40 allows on its long axes too (docs/fusion.md). levels None: the default 3, cut
    # silently; a levels the caller chose is cut with a warning.
    lmax = pywt.dwtn_max_level(xs[0].shape, wav)
    used = max(1, min(3 if levels is None else int(levels), lmax))
    if levels is not None and int(levels) > used:
        _warn_cut("wavelet", "levels", int(levels), used,
                  (f"the shortest side, {min(xs[0].shape)} pixels, allows {lmax} of the {wav.name!r} filter"
                   if lmax else f"the shortest side, {min(xs[0].shape)} pixels, is shorter than the {wav.name!r} "
                   "filter: one level, the least") + "; the wavelet rule decomposes every axis alike")
    levels = used
    w = _weights(weights, len(xs))
    with warnings.catch_warnings():
        # An image shorter than the filter gets one level, with PyWavelets' "level too high" warning; the
        # symmetric extension still reconstructs it exactly, so the warning says nothing the caller can act on.
        warnings.filterwarnings("ignore", message="Level value of", category=UserWarning)
        decs = []
        for x in xs:
            poll()
            decs.append(pywt.wavedecn(x, wav, mode="symmetric", level=levels))
    poll()
    fused = [sum(wi * d[0] for wi, d in zip(w, decs))]
    for k in range(1, levels + 1):
        fused.append({key: _select_max_abs([d[k][key] for d in decs]) for key in decs[0][k]})
    out = pywt.waverecn(fused, wav, mode="symmetric")
    return out[tuple(slice(0, s) for s in xs[0].shape)]


# ---------------------------------------------------------------------- guided filter
def _box(x: np.ndarray, r) -> np.ndarray:
    """Box mean of radius ``r``: one int, or one per axis."""
    from scipy.ndimage import uniform_filter

    return uniform_filter(x, size=tuple(2 * k + 1 for k in r) if np.ndim(r) else 2 * r + 1, mode="reflect")


def _capped_radius(shape, radius: int) -> tuple:
    """``radius`` per axis, capped at ``(n - 1) // 2`` (at least 1) so that the box fits that axis.

    Per axis, not at the shortest side for all: a 40-slice volume keeps radius 45 in-plane (as its 2-D slices do)
    and gets 19 through-plane only.
    """
    return tuple(max(1, min(int(radius), (n - 1) // 2)) for n in shape)


def guided_filter(guide: np.ndarray, src: np.ndarray, *, radius: int, eps: float, poll=None) -> np.ndarray:
    """Edge-preserving guided filter (He, Sun & Tang 2010) with box means; n-D.

    Args:
        guide: the guidance image ``I``.
        src: the image ``p`` to filter (same shape).
        radius: box radius ``r`` (window ``2r+1`` per axis).
        eps: regularisation; larger smooths more.
        poll: called between its box filters (a cancel check: one 3-D filter takes seconds).

    Returns:
        The filtered image, of ``src``'s shape; the radius is capped per axis at ``(n - 1) // 2`` for an axis of
            ``n`` pixels (at least 1), so that the box fits that axis; the longer axes keep ``radius``.

    Raises:
        InvalidInputError: ``guide`` or ``src`` not an array of real numbers with at least one axis, the two of
            different shapes; ``radius`` not a whole number; ``eps`` not a finite number >= 0; ``poll`` not
            callable. (Their values are not scanned for NaN: :func:`fuse_arrays` checks the images.)
        CancelledError: raised by ``poll`` (a cancel check that fires) and let through.
    """
    guide, src = _filter_image(guide, "guide"), _filter_image(src, "src")
    if guide.shape != src.shape:
        raise InvalidInputError(f"guided_filter's guide has shape {guide.shape} but src has shape {src.shape}",
                                fix="pass a guide and an image of one shape")
    rad = number(radius, "guided_filter radius", example="radius=8", what="a whole number")
    if not rad.is_integer():
        raise InvalidInputError(f"guided_filter radius must be a whole number, got {_shown(radius)}",
                                fix="pass e.g. radius=8")
    number(eps, "guided_filter eps", example="eps=0.01", low=0.0)  # checked only: eps itself keeps its dtype
    poll = poll or _no_poll
    if not callable(poll):
        raise InvalidInputError(f"guided_filter's poll must be callable, got {describe(poll)}",
                                fix="pass a function of no arguments (e.g. lambda: check(cancel)), or leave it out")
    r = _capped_radius(guide.shape, int(radius))
    mi, mp = _box(guide, r), _box(src, r)
    poll()
    var = _box(guide * guide, r) - mi * mi
    poll()
    cov = _box(guide * src, r) - mi * mp
    poll()
    a = cov / (var + eps)
    del var, cov  # a volume's filter holds several of these at once: freed as soon as they are used
    b = mp - a * mi
    del mi, mp
    out = _box(a, r)
    del a
    out = out * guide
    return out + _box(b, r)


def _filter_image(x: Any, name: str) -> np.ndarray:
    """``x`` as an array of real numbers with at least one axis (an ndarray itself, untouched), or a typed error."""
    from ..volume import Volume

    fix = f"pass {name} as a NumPy array of real numbers (a Volume's voxels are its .array)"
    if isinstance(x, Volume) or x is None or isinstance(x, (str, bytes)):
        raise InvalidInputError(f"guided_filter's {name} must be an array, got {describe(x)}", fix=fix)
    try:
        a = np.asarray(x)
    except Exception:  # noqa: BLE001 - e.g. a GPU tensor, whose conversion raises its library's own error
        raise InvalidInputError(f"guided_filter's {name} must be an array, got {describe(x)}", fix=fix) from None
    if not np.issubdtype(a.dtype, np.number) or np.iscomplexobj(a) or a.ndim == 0 or a.size == 0:
        raise InvalidInputError(f"guided_filter's {name} must be a non-empty array of real numbers, got "
                                f"{describe(x) if a.ndim == 0 else f'an array of shape {a.shape}, dtype {a.dtype}'}",
                                fix=fix)
    return a


def _gff(xs, *, base_radius: int = 15, r1: Optional[int] = None, eps1: float = 0.3, r2: Optional[int] = None,
         eps2: float = 1e-6, sigma: float = 5.0, poll=_no_poll) -> np.ndarray:
    from scipy.ndimage import gaussian_filter, laplace

    # r1/r2 None: the defaults 45 and 7, capped per axis silently; radii the caller chose are capped with a warning.
    for name, asked in (("r1", r1), ("r2", r2)):
        if asked is None:
            continue
        cut = [(ax, r) for ax, r in enumerate(_capped_radius(xs[0].shape, int(asked))) if r < int(asked)]
        if cut:
            _warn_cut("gff", name, int(asked), ", ".join(f"{r} along axis {ax}" for ax, r in cut)
                      + f" ({int(asked)} along the others)" * (len(cut) < len(xs[0].shape)),
                      "a box of 2r+1 pixels must fit each axis: " + ", ".join(
                          f"axis {ax} has {xs[0].shape[ax]}" for ax, _ in cut))
    r1 = 45 if r1 is None else int(r1)
    r2 = 7 if r2 is None else int(r2)
    base = _bounded_per_axis(xs[0].shape, "base_radius", int(base_radius), 15, int)
    sigma = _bounded_per_axis(xs[0].shape, "sigma", float(sigma), 5.0, float)

    # The published parameters assume 0..1 images; scale jointly, undo at the end.
    lo = min(float(x.min()) for x in xs)
    hi = max(float(x.max()) for x in xs)
    span = hi - lo if hi > lo else 1.0
    us = [(x - lo) / span for x in xs]
    bases = [_box(u, base) for u in us]
    poll()
    saliency = np.stack([gaussian_filter(np.abs(laplace(u, mode="reflect")), sigma, mode="reflect", truncate=1.0)
                         for u in us])
    winner = np.argmax(saliency, axis=0)
    del saliency
    wb, wd = [], []
    for k, u in enumerate(us):
        p = (winner == k).astype(np.float64)
        poll()
        wb.append(guided_filter(u, p, radius=r1, eps=eps1, poll=poll))
        poll()
        wd.append(guided_filter(u, p, radius=r2, eps=eps2, poll=poll))
    del winner, p
    poll()
    # In place from here, and the detail layers made one at a time: the same operations in the same order (the
    # same values), at about half the peak memory (a BraTS pair took 1.9 GB above its inputs).
    wb, wd = _normalised(wb), _normalised(wd)
    fused = None
    for k, u in enumerate(us):
        term = wb[k] * bases[k]
        detail = u - bases[k]
        detail *= wd[k]
        term += detail
        del detail
        fused = term if fused is None else np.add(fused, term, out=fused)
    fused *= span
    fused += lo
    return fused


def _bounded_per_axis(shape, name: str, asked, default, kind):
    """``asked`` (gff's ``base_radius`` or ``sigma``), cut per axis at the axis length or the default, whichever
    is larger, with a warning; ``asked`` itself (the same computation as before) when nothing is cut.

    Why: neither had an upper bound, and scipy's filters allocate and loop over the kernel's width: 10**9 gave a
    raw MemoryError, sigma=1e300 a raw ValueError, sigma=1e6 ran for minutes on a 128x128 pair. A box or a
    Gaussian wider than the image (reflected) only tends to the image's mean; values up to the bound run as
    before, the defaults (15, 5) on any image.
    """
    caps = [kind(max(n, default)) for n in shape]
    if all(asked <= c for c in caps):
        return asked
    used = tuple(min(asked, c) for c in caps)
    cut = [ax for ax, c in enumerate(caps) if asked > c]
    _warn_cut("gff", name, f"{asked:g}", ", ".join(f"{used[ax]:g} along axis {ax}" for ax in cut)
              + f" ({asked:g} along the others)" * (len(cut) < len(shape)),
              f"{name} is bounded by each axis's length, or {default:g} (the default) on shorter axes: " + ", ".join(
                  f"axis {ax} has {shape[ax]}" for ax in cut))
    return used


def _normalised(ws: list) -> np.ndarray:
    """The weight maps clipped at 0 (guided filtering overshoots) and divided by their sum; equal weights where the
    sum is 0. The list is emptied as the stack is made."""
    stack = np.empty((len(ws),) + ws[0].shape, dtype=np.result_type(*ws))
    for k in range(len(ws)):
        stack[k] = ws[k]
        ws[k] = None
    np.clip(stack, 0.0, None, out=stack)
    tot = stack.sum(axis=0)
    some = tot > 1e-12
    stack /= np.where(some, tot, 1.0)
    stack[:, ~some] = 1.0 / len(stack)
    return stack


def _max(xs) -> np.ndarray:
    """The voxel-wise maximum, pairwise into one result: ``np.maximum.reduce`` of a list first stacks it (8 bytes
    a voxel and input more at the peak). Same operations in the same order, so the same values."""
    out = np.maximum(xs[0], xs[1])
    for x in xs[2:]:
        np.maximum(out, x, out=out)
    return out


# ---------------------------------------------------------------------- dispatch
def fuse_arrays(arrays: Sequence, *, method: str = "mean", cancel=None, **options) -> np.ndarray:
    """Fuse two or more images/volumes of one shape with a classical rule.

    Args:
        arrays: 2-D or 3-D arrays, all the same shape, on a common intensity scale.
        method: one of :data:`METHODS`.
        **options: per rule -- ``mean``: ``weights``; ``laplacian``: ``levels`` (4),
            ``weights`` for the base; ``wavelet``: ``wavelet`` ("db2"), ``levels`` (3),
            ``weights``; ``gff``: ``base_radius`` (15), ``r1`` (45), ``eps1`` (0.3),
            ``r2`` (7), ``eps2`` (1e-6), ``sigma`` (5). ``levels`` beyond what the image allows,
            and ``r1``/``r2`` beyond an axis (capped per axis), are cut; when they were given, with
            one ``MedfuseWarning`` saying what was used. ``base_radius`` and ``sigma`` beyond an axis's
            length (or their defaults, on shorter axes) are cut per axis with a warning too.
        cancel: a :class:`medfuse.progress.CancelToken`, polled between the rule's steps (a 3-D gff runs
            for seconds).

    Returns:
        The fused array (float64), same shape as the inputs.

    Raises:
        InvalidInputError: not a list of two or more arrays, shapes that differ, NaN, an unknown ``method``
            (or one that is not a str), an unknown or invalid option, or ``cancel`` not a CancelToken.

    Example:
        >>> import numpy as np
        >>> float(fuse_arrays([np.zeros((8, 8)), np.ones((8, 8))], method="max").max())
        1.0
    """
    xs = _check(arrays)
    if not isinstance(method, str):
        raise InvalidInputError(f"the classical fusion method must be a str, got {describe(method)}",
                                fix=f"use one of {', '.join(METHODS)}")
    check_callbacks(cancel=cancel)

    def poll() -> None:
        check(cancel, "fusion")

    rules = {
        "mean": lambda weights=None: sum(wi * x for wi, x in zip(_weights(weights, len(xs)), xs)),
        "max": lambda: _max(xs),
        "laplacian": lambda **kw: _laplacian(xs, poll=poll, **kw),
        "wavelet": lambda **kw: _wavelet(xs, poll=poll, **kw),
        "gff": lambda **kw: _gff(xs, poll=poll, **kw),
    }
    key = str(method).lower()
    rule = rules.get(key)
    if rule is None:
        raise unknown_choice(method, "classical fusion method", METHODS)
    unknown = sorted(set(options) - _OPTIONS[key])
    if unknown:
        raise _unknown_options(key, unknown)
    _check_options(key, options)
    out = np.asarray(rule(**options), dtype=np.float64)
    if key in ("laplacian", "wavelet", "gff"):
        # Multi-scale rules overshoot at strong edges (detail from one input on the
        # other's averaged base); keep the result in the inputs' joint range.
        out = np.clip(out, min(float(x.min()) for x in xs), max(float(x.max()) for x in xs))
    return out


_OPTIONS = {
    "mean": {"weights"},
    "max": set(),
    "laplacian": {"levels", "weights"},
    "wavelet": {"wavelet", "levels", "weights"},
    "gff": {"base_radius", "r1", "eps1", "r2", "eps2", "sigma"},
}

def _unknown_options(key: str, unknown: Sequence[str]) -> InvalidInputError:
    """The error for keyword options that rule ``key`` does not take, each with its near name (``level``: did you
    mean 'levels'?) or, failing one, the rules that take it (``levels`` given to ``mean``).

    Why: the message listed the options taken, and a one-letter typo had to be spotted in that list.
    """
    takes = sorted(_OPTIONS[key])
    hints = []
    for name in unknown:
        near = did_you_mean(name, takes)
        elsewhere = [m for m in METHODS if name in _OPTIONS[m]]
        if near:
            hints.append(f"{name}: {near[2:]}")
        elif elsewhere:
            hints.append(f"{name} is an option of {', '.join(elsewhere)}")
    said = f"option {unknown[0]}" if len(unknown) == 1 else f"options {', '.join(unknown)}"
    problem = f"{said} not understood by method {key!r}"
    if len(hints) == 1 and len(unknown) == 1 and hints[0].startswith(f"{unknown[0]}: "):
        problem += f"; {hints[0][len(unknown[0]) + 2:]}"  # one typo: "...; did you mean 'levels'?"
    elif hints:
        problem += f" ({'; '.join(hints)})"
    return InvalidInputError(problem, fix=f"{key} takes {', '.join(takes) or 'no options'}")


#: Numeric options: (integer?, smallest allowed value, is that value allowed?).
_NUMERIC = {"levels": (True, 1, True), "base_radius": (True, 1, True), "r1": (True, 1, True), "r2": (True, 1, True),
            "eps1": (False, 0.0, False), "eps2": (False, 0.0, False), "sigma": (False, 0.0, False)}


def _check_options(key: str, options: dict) -> None:
    """Refuse option values the rules would misread: NaN eps (a NaN image), 0 levels (silently 1), text."""
    import numbers

    for name, value in options.items():
        if name not in _NUMERIC:
            continue
        integer, lo, closed = _NUMERIC[name]
        ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and np.isfinite(float(value))
        # An int is whole whatever its size: float(10**30) != 10**30, and levels=10**30 was "not a whole number"
        # while 1e30 was cut to the largest level count with a warning.
        whole_number = isinstance(value, (int, np.integer)) or (ok and float(value) == int(value))
        ok = ok and (not integer or whole_number) and (value >= lo if closed else value > lo)
        if not ok:
            want = f"{'a whole number' if integer else 'a number'} {'>=' if closed else '>'} {lo:g}"
            raise InvalidInputError(f"option {name}={_shown(value)} of method {key!r} is invalid: it must be {want}",
                                    fix=f"pass {name} as {want}, or leave it out for the default")
