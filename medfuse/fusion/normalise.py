"""Explicit, recorded intensity normalisation before fusion.

Fusion rules and the network work on a common 0..1 scale, but CT comes in HU,
PET in SUV and MR in arbitrary units. Each input is mapped linearly from an
interval ``[low, high]`` onto 0..1 (values outside are clipped), with the interval
chosen per modality:

* CT in HU (or of unknown unit): a window (default level 40 HU, width 400 HU: soft tissue and bone edges);
* PET in SUV: the range ``[0, suv_max]`` (default 10; 2.5 for SUVbsa, in cm²/mL): adult values, fixed so that fused
  images of different patients compare; when the default clips more than 5 % of the uptake (a child's SUVbsa) a
  ``MedfuseWarning`` says so and how to set the range, and the record keeps it (``warning``);
* an RT dose in Gy: the range ``[0, dose_max]`` (default: its largest dose; pass the prescription to show every
  dose as a fraction of it), a fixed dose scale rather than percentiles, which clipped the hot spot;
* MR, SPECT, PET not in SUV, CT not in HU and anything else: percentiles (default 0.5 and 99.5);
* ``"range"``: an explicit ``[low, high]``; ``"none"``: identity.

:func:`normalise` returns the scaled array and a JSON-safe record of what was
done; :func:`denormalise` maps a 0..1 array back through a record (clipping is
not undone). Records go into a fused Volume's provenance (``normalisation``).
"""

from __future__ import annotations

import numbers
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Dict, Optional, Tuple, Union, overload

import numpy as np

from .._checks import all_finite, describe, label, number, slab_slices, unknown_choice, user_stacklevel
from ..errors import InvalidInputError, MedfuseWarning

if TYPE_CHECKING:  # imported where used at run time
    from ..volume import Volume

__all__ = ["normalise", "denormalise", "auto_method", "DEFAULT_CT_WINDOW", "DEFAULT_SUV_MAX", "DEFAULT_PERCENTILES",
           "FUNCTIONAL_UNITS"]

DEFAULT_CT_WINDOW = (40.0, 400.0)  # (level, width) in HU
DEFAULT_SUV_MAX = 10.0
#: SUVbsa (cm²/mL) is SUVbw times body surface over weight, about 0.25 cm²/g for an adult (1.9 m², 75 kg): its
#: window is scaled so (the SUVbw window gave an SUVbsa PET peaking at 1.6 a quarter of the grey range).
SUVBSA_MAX = 2.5
#: Voxels above this fraction of the SUV range count as uptake (below: air, background, a resampled PET's fill).
UPTAKE_FLOOR = 0.1
#: Share of the uptake the default SUV range may clip before normalise warns. The bundled adult PET clips 0.03 %
#: (SUVbw; 0.05 % read as an adult's SUVbsa); relabelled as a child's, its SUVbsa clips 1.2 % (12.5 kg), 28 %
#: (a 3.2 kg neonate) and 46 % (a 0.9 kg premature).
UPTAKE_CLIP_WARN = 0.05
DEFAULT_PERCENTILES = (0.5, 99.5)

_METHODS = ("window", "suv", "dose", "percentile", "minmax", "range", "none")

#: Units of a functional image whatever its modality: an RT dose grid (modality "unknown") is an overlay of dose on
#: the anatomy, as a PET's uptake is (the fusion network's ``functional`` and the display follow it).
FUNCTIONAL_UNITS = ("Gy",)


def auto_method(modality: Optional[str], unit: Optional[str] = None) -> str:
    """The method ``"auto"`` picks for a modality code and unit.

    Args:
        modality: a DICOM modality code (``CT``, ``PT``/``PET``, ``MR``, ``NM``, ...; case-insensitive), or None.
        unit: the physical unit, or None (not known): ``HU`` picks the CT window whatever the modality, and
            ``SUV...`` the SUV range for PET, ``Gy`` (an RT dose) the dose range. A CT with a unit other than HU
            (``arbitrary``: the loader's label
            for a CT with no value below -100) gets percentiles, not the window.

    Returns:
        ``"window"`` (unit HU, or CT of unknown unit), ``"suv"`` (PET in SUV), ``"dose"`` (unit Gy) or
        ``"percentile"`` (anything else, unknown and CT not in HU included).
    """
    return _auto_choice(modality, unit)[0]


def _auto_choice(modality: Any, unit: Any) -> Tuple[str, str]:
    """``(method, why)``: what ``"auto"`` picks and the reason, which goes into the record."""
    m = modality.upper() if isinstance(modality, str) else "UNKNOWN"
    u = unit if isinstance(unit, str) else None  # an array's == would be elementwise
    if u is not None and u.upper() == "HU":
        return "window", "unit HU"
    if u == "Gy":
        return "dose", "unit Gy (an RT dose)"
    if m == "CT" and u is None:
        return "window", "CT, unit not given (taken as HU)"
    if m == "CT":
        # Why: the window on a CT that is not in HU (raw stored values 0..4095, or rescaled to 0..1) clipped it
        # all to white or to a flat grey; the loader's and _warn_if_not_hu's advice (unit='arbitrary') means this.
        return "percentile", f"CT not in HU (unit {u!r})"
    if m in ("PT", "PET") and u is not None and u.startswith("SUV"):
        return "suv", f"PET in {u}"
    return "percentile", f"modality {m if isinstance(modality, str) else 'unknown'}" + (f", unit {u!r}" if u else "")


def _percentiles(value: Any) -> Tuple[float, float]:
    try:
        if isinstance(value, (str, bytes)):  # float() reads "5" and would then echo the text
            raise TypeError
        pl, ph = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"percentiles must be two numbers (low, high), got {describe(value)}",
                                fix="pass e.g. percentiles=(0.5, 99.5)") from None
    if not 0.0 <= pl < ph <= 100.0:
        raise InvalidInputError(f"percentiles must satisfy 0 <= low < high <= 100, got ({pl:g}, {ph:g})",
                                fix="pass e.g. percentiles=(0.5, 99.5)")
    return pl, ph


def _warn_if_not_hu(x: np.ndarray, width: float, stacklevel: int = 3) -> None:
    """Warn when a volume labelled HU spans under 2 % of the CT window: it is not in HU any more.

    Why: a CT rescaled to 0..1 (``vol.with_array(x / x.max())``) keeps ``unit="HU"``, and the CT window then maps
    the whole image onto 0.400..0.4025, a flat grey that fuses as nothing, without a word. A real CT spans
    hundreds of HU (air, tissue, bone).
    """
    span = float(x.max()) - float(x.min()) if x.size else 0.0  # in float64 whatever x's type (int16 wraps)
    if 0.0 < span < 0.02 * width:
        import warnings

        warnings.warn(f"an input labelled CT/HU spans only {span:.3g} (from {float(x.min()):.3g} to "
                      f"{float(x.max()):.3g}), under 2 % of the {width:g} HU window that 'auto' applies: it does "
                      "not look like HU (rescaled?), and the window maps it to a flat grey. Fix: give the "
                      "rescaled volume unit='arbitrary' (vol.with_array(x, unit='arbitrary')), or pass "
                      "normalise='percentile'", MedfuseWarning, stacklevel=stacklevel)


def _warn_if_uptake_clipped(x: np.ndarray, hi: float, unit: Optional[str], rec: Dict[str, Any]) -> None:
    """Warn, and say so in ``rec``, when the default SUV range ``[0, hi]`` clips more than
    :data:`UPTAKE_CLIP_WARN` of the uptake: the voxels above :data:`UPTAKE_FLOOR` of the range.

    Why: the defaults are adult values (SUVbsa's assumes 0.25 cm² of body surface per g; a neonate has about 0.65,
    a premature 1.03), and a child's SUVbsa PET came out mostly white (57 % of a neonate's uptake, 97 % of a
    premature's, at 1.0) with only ``clipped_fraction`` in the record, a share of the whole grid (air included),
    to tell. The range stays fixed (that is what makes fused images compare); the warning says how to set it.
    """
    floor = UPTAKE_FLOOR * hi
    flat = np.atleast_1d(x)  # a view; slab by slab, as the float32 path works (no volume-sized temporary)
    above = clipped = 0
    for s in slab_slices(flat, SLAB_ELEMENTS):
        above += int(np.count_nonzero(flat[s] > floor))
        clipped += int(np.count_nonzero(flat[s] > hi))
    if not above or clipped <= UPTAKE_CLIP_WARN * above:
        return
    share = clipped / above
    # A range that keeps all but the hottest 0.5 % of the uptake, rounded up to two significant digits.
    top = float(np.percentile(flat[flat > floor].astype(np.float64), 99.5))
    step = 10.0 ** (np.floor(np.log10(top)) - 1)
    suggest = float(f"{np.ceil(top / step - 1e-9) * step:.2g}")
    why = (" (it assumes an adult's 0.25 cm² of body surface per g; a child has more, a neonate about 0.65, so its "
           "SUVbsa is higher)" if unit == "SUVbsa" else "")
    msg = (f"the default SUV range 0..{hi:g} clips {100.0 * share:.1f} % of this PET's uptake to white ({clipped} of "
           f"the {above} voxels above {floor:g}, a tenth of the range): the range is an adult default{why}, kept "
           f"fixed so that fused images of different patients compare. For this one, set it, e.g. to its uptake's "
           f"99.5th percentile: normalise(..., suv_max={suggest:g}), medfuse.fuse(..., normalise=[..., "
           f"{{'method': 'suv', 'suv_max': {suggest:g}}}]) (the PET's entry) or medfuse fuse --suv-range 0 "
           f"{suggest:g}, and compare it only with images given the same range")
    rec.update(uptake_clipped_fraction=share, warning=msg)
    import warnings

    warnings.warn(msg, MedfuseWarning, stacklevel=user_stacklevel())


def _warn_if_other_quantity(method: str, modality: Optional[str], unit: Optional[str]) -> None:
    """Warn when ``method`` "window" (HU), "suv" or "dose" (Gy) is named for an image whose unit or modality says it
    holds another quantity.

    Why: ``normalise="window"`` for an MR + PET + CT fusion windowed the PET's SUV as HU (0.400..0.435: the lesion
    gone) and the MR too, and "suv" clipped 90 % of a SPECT in counts, without a word; "auto" picks per image.
    """
    from ..volume import normalise_modality

    try:
        mod = normalise_modality(modality) if modality else "unknown"
    except InvalidInputError:
        mod = "unknown"
    if method == "window":
        other = unit not in (None, "HU", "arbitrary") or mod not in ("CT", "unknown")
        wanted = "HU (a CT)"
    elif method == "dose":
        other = unit not in (None, "Gy", "arbitrary") or mod != "unknown"
        wanted = "Gy (an RT dose)"
    else:
        other = (unit is not None and unit != "arbitrary" and not unit.startswith("SUV")) or mod not in ("PT",
                                                                                                          "unknown")
        wanted = "SUV (a PET)"
    if other:
        import warnings

        units = "arbitrary units" if unit == "arbitrary" else unit or "unknown units"
        said = f"an image of modality {mod}, in {units}" if mod != "unknown" else f"an image in {units}"
        warnings.warn(f"normalisation '{method}' is for {wanted}, but it is applied to {said}: its values are "
                      f"scaled as if they were {wanted.split()[0]}. Fix: normalise='auto' (each image by its own "
                      "modality and unit), or one entry per image (normalise=[..., ...])", MedfuseWarning,
                      stacklevel=user_stacklevel())


# For type checkers: a Volume in gives a Volume (on its grid), a NumPy array an array; anything else (a list: an
# array at run time) either, so that a Volume typed as Any is not promised an array.
@overload
def normalise(array: Volume, *, method: str = ..., modality: Optional[str] = ..., unit: Optional[str] = ...,
              level: Optional[float] = ..., width: Optional[float] = ..., suv_max: Optional[float] = ...,
              dose_max: Optional[float] = ..., percentiles: Optional[Tuple[float, float]] = ...,
              low: Optional[float] = ..., high: Optional[float] = ..., dtype: Any = ...) -> Tuple[Volume, Dict[str, Any]]: ...


@overload
def normalise(array: np.ndarray, *, method: str = ..., modality: Optional[str] = ..., unit: Optional[str] = ...,
              level: Optional[float] = ..., width: Optional[float] = ..., suv_max: Optional[float] = ...,
              dose_max: Optional[float] = ..., percentiles: Optional[Tuple[float, float]] = ...,
              low: Optional[float] = ..., high: Optional[float] = ..., dtype: Any = ...) -> Tuple[np.ndarray, Dict[str, Any]]: ...


@overload
def normalise(array: Any, *, method: str = ..., modality: Optional[str] = ..., unit: Optional[str] = ...,
              level: Optional[float] = ..., width: Optional[float] = ..., suv_max: Optional[float] = ...,
              dose_max: Optional[float] = ..., percentiles: Optional[Tuple[float, float]] = ...,
              low: Optional[float] = ..., high: Optional[float] = ..., dtype: Any = ...) -> Tuple[Union[np.ndarray, Volume], Dict[str, Any]]: ...


def normalise(array: Any, *, method: str = "auto", modality: Optional[str] = None, unit: Optional[str] = None,
              level: Optional[float] = None, width: Optional[float] = None, suv_max: Optional[float] = None,
              dose_max: Optional[float] = None, percentiles: Optional[Tuple[float, float]] = None,
              low: Optional[float] = None, high: Optional[float] = None, dtype: Any = None) -> Tuple[Union[np.ndarray, Volume], Dict[str, Any]]:
    """Scale an image or volume to 0..1 and say how.

    Args:
        array: the image (any numeric dtype; NaN refused), or a :class:`~medfuse.Volume`, whose modality and unit
            ``"auto"`` then uses (``modality=``/``unit=`` given here win).
        method: ``"auto"`` (from ``modality``/``unit``), ``"window"``, ``"suv"``, ``"dose"``,
            ``"percentile"``, ``"minmax"``, ``"range"`` or ``"none"``.
        modality: ``MR``, ``CT``, ``PT``, ``NM`` or ``unknown``, in any letter case, or an alias a Volume takes
            (``PET``, ``SPECT``, ``MRI``...); None: not known (used by ``auto``; recorded).
        unit: the physical unit, spelt as in :data:`medfuse.volume.UNITS` (``HU``, ``SUVbw``...); None: not
            known (used by ``auto``; recorded).
        level, width: CT window in HU (defaults 40, 400).
        suv_max: upper end of the PET SUV range (default 10; 2.5 for SUVbsa). The defaults are adult values, fixed
            so that fused images of different patients compare; where the default clips more than 5 % of the voxels
            above a tenth of the range (a child's SUVbsa) a :class:`~medfuse.errors.MedfuseWarning` says how
            much and suggests a ``suv_max``, and the record keeps it (``warning``, ``uptake_clipped_fraction``).
        dose_max: upper end of the dose range in Gy (default: the largest dose; e.g. the prescription).
        percentiles: (low, high) percentiles (default 0.5, 99.5).
        low, high: the interval for ``"range"``.
        dtype: ``None`` or ``numpy.float64`` (the default: a float64 result), or ``numpy.float32``: the same
            values as ``normalise(...)[0].astype(numpy.float32)``, computed in float64 slab by slab, so that no
            float64 copy of the whole volume is made (8 bytes a voxel less at the peak).

    Returns:
        ``(scaled, record)``: float64 (or ``dtype``) in 0..1 and a JSON-safe dict with ``method``,
        ``low``, ``high``, ``modality``, ``unit``, ``clipped_fraction`` and the parameters. Given a Volume,
        ``scaled`` is a Volume on its grid, unit ``arbitrary``, with the record in its provenance.

    Raises:
        InvalidInputError: NaN/inf values, an unknown ``method`` (or one that is not a str), a ``modality`` or
            ``unit`` that is neither a str nor None, or names none medfuse knows (those a Volume takes: modality
            codes and aliases in any letter case, units as :data:`medfuse.volume.UNITS` spells them), a ``dtype``
            other than float64/float32, an empty image (no pixels) or an empty interval.
    """
    from ..volume import Volume

    _check_labels(method, modality, unit)

    if isinstance(array, Volume):
        # Why: NumPy reads a Volume as its voxels, so without this a CT in HU got the percentile rule, not its window.
        scaled, rec = normalise(array.array, method=method, modality=array.modality if modality is None else modality,
                                unit=array.unit if unit is None else unit, level=level, width=width, suv_max=suv_max,
                                dose_max=dose_max, percentiles=percentiles, low=low, high=high, dtype=dtype)
        out = array.with_array(scaled, unit="arbitrary")
        out.provenance["normalisation"] = rec
        return out, rec
    x = np.asarray(array)
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise InvalidInputError(f"cannot normalise dtype {x.dtype}", fix="pass a numeric array")
    dtype = _dtype(dtype)
    if dtype is not None and np.dtype(dtype) == np.float32 and x.size:
        return _normalise_float32(x, method=method, modality=modality, unit=unit, level=level, width=width,
                                  suv_max=suv_max, dose_max=dose_max, percentiles=percentiles, low=low, high=high)
    if dtype is not None and np.dtype(dtype) not in (np.float32, np.float64):
        raise InvalidInputError(f"normalise returns float64 or float32, not {np.dtype(dtype)}",
                                fix="pass dtype=numpy.float32, or leave dtype out for float64")
    x = x.astype(np.float64)
    y, rec = _scaled(x, _interval(x, method=method, modality=modality, unit=unit, level=level, width=width,
                                  suv_max=suv_max, dose_max=dose_max, percentiles=percentiles, low=low, high=high))
    return (y if dtype is None or np.dtype(dtype) == np.float64 else y.astype(dtype)), rec


def _in_own_view(array: np.ndarray, view: Any, *, method: str, modality: Optional[str], unit: Optional[str],
                 percentiles: Optional[Tuple[float, float]] = None,
                 dtype: Any = None) -> Optional[Tuple[np.ndarray, Dict[str, Any]]]:
    """``(scaled, record)`` by the percentile rule with its percentiles taken over the voxels a resampled image has
    of its own, or None where that does not apply: ``method`` (``"auto"`` by ``modality``/``unit``) takes no
    percentiles, or ``view`` (a :class:`~medfuse.registration.resample.FieldOfView`, asked only then) covers the
    whole grid or none of it. The pipeline's normalise step and :func:`medfuse.fuse` both use it.

    Why: outside its field of view a resampled image is only the fill value, and percentiles over the whole grid
    then depended on how much of it the image covered (a SPECT on a whole-body CT's grid, 1 % of it, had 39 % of
    its voxels clipped to 1). The record says ``"over"`` which voxels, and ``clipped_fraction`` counts those.
    """
    chosen, why = _auto_choice(modality, unit) if method == "auto" else (method, "")
    if chosen != "percentile":
        return None
    mask = view.mask()  # as costly as resampling the image: only for a rule that uses it
    if mask is None or mask.shape != np.shape(array) or not mask.any():
        return None
    pl, ph = _percentiles(DEFAULT_PERCENTILES if percentiles is None else percentiles)
    own = np.asarray(array)[mask].astype(np.float64)
    lo, hi = (float(x) for x in np.percentile(own, [pl, ph]))
    if hi <= lo:  # as the percentile rule does for a sparse image: its full range
        lo, hi = float(own.min()), float(own.max())
    if hi <= lo:
        hi = lo + 1.0
    del own
    scaled, rec = normalise(array, method="range", low=lo, high=hi, modality=modality, unit=unit, dtype=dtype)
    inside = np.asarray(array)[mask]  # clipped where the image is: the fill outside is not the image's
    rec["clipped_fraction"] = float(np.mean((inside < lo) | (inside > hi)))
    del inside
    return scaled, {**rec, "method": "percentile", "percentiles": [pl, ph],
                    "over": f"its own field of view ({100.0 * float(mask.mean()):.3g} % of the grid)",
                    **({"auto": why} if method == "auto" else {})}


def _check_labels(method: Any, modality: Any, unit: Any) -> None:
    """Refuse a method, modality or unit that is not a str (None allowed for the latter two).

    Why: an array there failed in a comparison deep inside (``truth value of an array is ambiguous``), and the
    record, which goes into provenance as JSON, would hold it.
    """
    if not isinstance(method, str):
        raise InvalidInputError(f"the normalisation method must be a str, got {describe(method)}",
                                fix=f"pass method='auto' or one of {', '.join(_METHODS)}")
    for name, value, example in (("modality", modality, "modality='CT'"), ("unit", unit, "unit='HU'")):
        if value is not None and not isinstance(value, str):
            raise InvalidInputError(f"the normalisation {name} must be a str or None, got {describe(value)}",
                                    fix=f"pass e.g. {example}, or leave it out")
    _check_known(modality, unit)


def _check_known(modality: Optional[str], unit: Optional[str]) -> None:
    """Refuse a modality or unit that a Volume would refuse (None allowed: not known).

    Why: a typo ('XR', unit 'suvbw' or 'furlongs') fell through to the percentile rule without a word, and
    was recorded in provenance as if it had been read.
    """
    from ..volume import MODALITIES, UNITS, normalise_modality

    if modality is not None:
        try:
            normalise_modality(modality)
        except InvalidInputError:
            raise InvalidInputError(f"unknown normalisation modality {label(modality)}",
                                    fix=f"use one of {', '.join(MODALITIES)} in any letter case (PET, SPECT and MRI "
                                        "are accepted as aliases), or leave it out") from None
    if unit is not None and unit not in UNITS:
        # Spelt as a Volume takes them (it refuses 'suvbw' too): denormalise gives a Volume back only such a unit.
        same = [u for u in UNITS if u.lower() == unit.lower()]
        hint = f" (units are case-sensitive: {same[0]!r})" if same else \
            " (a plain 'SUV' is body-weight SUV: 'SUVbw')" if unit.upper() == "SUV" else ""
        raise InvalidInputError(f"unknown normalisation unit {label(unit)}",
                                fix=f"use one of {', '.join(UNITS)}{hint}, or leave it out (not known)")


def _dtype(dtype: Any) -> Any:
    """``dtype`` as given if NumPy reads it as a dtype, or a typed error (np.dtype echoes a str it cannot read)."""
    if dtype is None:
        return None
    try:
        np.dtype(dtype)
    except (TypeError, ValueError):
        raise InvalidInputError(f"normalise returns float64 or float32, got dtype={describe(dtype)}",
                                fix="pass dtype=numpy.float32, or leave dtype out for float64") from None
    return dtype


def _interval(x: np.ndarray, *, method, modality, unit, level, width, suv_max, percentiles, low,
              high, dose_max=None, stacklevel: int = 4) -> Dict[str, Any]:
    """The record of the mapping ``[low, high] -> 0..1`` for ``x`` (float64, or any dtype its float64 values
    are read from exactly: min, max and percentiles are taken on float64 values), ``clipped_fraction`` aside."""
    if x.size == 0:  # NumPy's percentile/min raised IndexError/ValueError; the fixed windows gave a NaN record
        raise InvalidInputError(f"cannot normalise an empty image (shape {x.shape})",
                                fix="pass an image with pixels in it")
    if np.iscomplexobj(x):  # the float64 cast below dropped the imaginary part with only NumPy's warning
        raise InvalidInputError(f"the image is complex ({x.dtype}: MR phase/real-imaginary data)",
                                fix="normalise its magnitude: numpy.abs(image) (Volume: v.with_array(numpy.abs(v.array)))")
    if not all_finite(x, SLAB_ELEMENTS):
        raise InvalidInputError("the image contains NaN or infinite values", fix="replace them before fusing")
    chosen, why = _auto_choice(modality, unit) if method == "auto" else (method, "")
    if chosen not in _METHODS:
        # The wording medfuse.fuse gives (with the near name of a typo: 'minmx', did you mean 'minmax'?).
        raise unknown_choice(method, "normalisation method", ("auto", *_METHODS))
    if method in ("window", "suv", "dose"):
        _warn_if_other_quantity(method, modality, unit)
    rec: Dict[str, Any] = {"method": chosen, "modality": modality or "unknown", "unit": unit or "arbitrary"}
    if method == "auto":
        rec["auto"] = why  # why "auto" chose this method (e.g. "CT not in HU (unit 'arbitrary')")
    if chosen == "none":
        lo, hi = 0.0, 1.0
    elif chosen == "window":
        lv = DEFAULT_CT_WINDOW[0] if level is None else number(level, "normalisation level", example="level=40")
        wd = DEFAULT_CT_WINDOW[1] if width is None else number(width, "normalisation width", example="width=80")
        lo, hi = lv - wd / 2.0, lv + wd / 2.0
        rec.update(level=lv, width=wd)
        if method == "auto":
            _warn_if_not_hu(x, wd, stacklevel)  # pointing at normalise()'s caller
    elif chosen == "suv":
        default = SUVBSA_MAX if unit == "SUVbsa" else DEFAULT_SUV_MAX
        hi = default if suv_max is None else number(suv_max, "normalisation suv_max", example="suv_max=10")
        lo = 0.0
        rec.update(suv_max=hi)
        if suv_max is None:  # a range the caller chose clips what they meant it to
            _warn_if_uptake_clipped(x, hi, unit, rec)
    elif chosen == "dose":
        # A fixed dose scale, 0 Gy black: percentiles clipped the top 0.5 % of voxels, which in a dose grid are
        # the hot spot (a boost flattened to the dose around it), and put the low end wherever the beams were.
        hi = float(x.max()) if dose_max is None else number(dose_max, "normalisation dose_max",
                                                             example="dose_max=60", low=0.0, open_low=True)
        lo = 0.0
        if hi <= lo:  # an all-zero dose: 0 maps to 0 rather than failing
            hi = 1.0
        rec.update(dose_max=hi)
    elif chosen == "percentile":
        pl, ph = DEFAULT_PERCENTILES if percentiles is None else _percentiles(percentiles)
        # On float64 values, as always: percentiles of float32 interpolate in float32 (other last digits).
        x64 = x if x.dtype == np.float64 else x.astype(np.float64)
        with np.errstate(over="ignore", invalid="ignore"):
            lo, hi = (float(v) for v in np.percentile(x64, [pl, ph]))
        if not (np.isfinite(lo) and np.isfinite(hi)):
            # Neighbours further apart than float64 holds (-1.7e308 next to 1.7e308) overflowed NumPy's
            # interpolation; halved (exactly), they do not.
            lo, hi = (2.0 * float(v) for v in np.percentile(x64 * 0.5, [pl, ph]))
        rec.update(percentiles=[pl, ph])
        if hi <= lo:  # sparse images (a few bright voxels): fall back to the full range
            lo, hi = float(x.min()), float(x.max())
    elif chosen == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:  # range
        if low is None or high is None:
            raise InvalidInputError("normalisation 'range' needs low= and high=", fix="pass e.g. low=0, high=255")
        lo, hi = (number(low, "normalisation low", example="low=0"),
                  number(high, "normalisation high", example="high=1"))
    if hi <= lo:
        if chosen in ("minmax", "percentile"):
            hi = lo + 1.0  # a constant image: map it to 0 rather than fail
        else:
            raise InvalidInputError(f"empty normalisation interval [{lo}, {hi}]", fix="choose high > low")
    rec.update(low=lo, high=hi)
    return rec


def _scaled(x: np.ndarray, rec: Dict[str, Any]) -> Tuple[np.ndarray, Dict[str, Any]]:
    """``x`` (a float64 copy, overwritten) mapped through ``rec``; the record gets ``clipped_fraction``."""
    if rec["method"] == "none":
        # Nothing is clipped here, but whatever lies outside 0..1 is clipped by a fusion that takes this record.
        rec["clipped_fraction"] = float(np.mean((x < 0) | (x > 1))) if x.size else 0.0
        return x, rec
    # In place on x (a float64 copy of the input made above): the same arithmetic as (x - lo) / (hi - lo),
    # without two more copies of a volume (which set the peak memory of medfuse.fuse on large volumes).
    y = _onto01(x, rec["low"], rec["high"])
    rec["clipped_fraction"] = float(np.mean((y < 0) | (y > 1)))
    return np.clip(y, 0.0, 1.0, out=y), rec


def _onto01(y: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """``(y - lo) / (hi - lo)``, in place on the float64 array ``y``.

    Why the halves: finite values spanning more than float64 holds (-1.7e308..1.7e308) overflowed ``hi - lo`` to
    inf, and the NaN that came of it was reported as "an input contains NaN or infinite values".
    """
    span = hi - lo
    if np.isfinite(span):
        np.subtract(y, lo, out=y)
        return np.divide(y, span, out=y)
    np.multiply(y, 0.5, out=y)  # exact, bar subnormals (far below the resolution of such a scale)
    np.subtract(y, lo * 0.5, out=y)
    return np.divide(y, hi * 0.5 - lo * 0.5, out=y)


#: Values per slab of the slab-by-slab paths (2 MB of float64): a 512x512 CT slice a slab.
SLAB_ELEMENTS = 1 << 18


def _normalise_float32(x: np.ndarray, **options: Any) -> Tuple[np.ndarray, Dict[str, Any]]:
    """:func:`normalise` into float32: float64 arithmetic on one slab at a time, each slab rounded once."""
    if x.ndim == 0:
        y, rec = _scaled(x.astype(np.float64), _interval(x, **options))
        return y.astype(np.float32), rec
    rec = _interval(x, stacklevel=5, **options)
    out = np.empty(x.shape, dtype=np.float32)
    clipped = 0
    for s in slab_slices(x, SLAB_ELEMENTS):
        y = x[s].astype(np.float64)
        if rec["method"] != "none":  # _scaled's arithmetic, on this slab
            _onto01(y, rec["low"], rec["high"])
        clipped += int(np.count_nonzero((y < 0) | (y > 1)))
        if rec["method"] != "none":
            np.clip(y, 0.0, 1.0, out=y)
        out[s] = y
    # The count over the size: what np.mean of the whole mask gives (its float64 sum of ones is exact).
    rec["clipped_fraction"] = clipped / x.size if x.size else 0.0
    return out, rec


@overload
def denormalise(array01: Volume, record: Dict[str, Any]) -> Volume: ...


@overload
def denormalise(array01: np.ndarray, record: Dict[str, Any]) -> np.ndarray: ...


@overload
def denormalise(array01: Any, record: Dict[str, Any]) -> Union[np.ndarray, Volume]: ...  # as normalise's


def denormalise(array01: Any, record: Dict[str, Any]) -> Union[np.ndarray, Volume]:
    """Map a 0..1 array back to the scale described by a :func:`normalise` record.

    Clipping is not undone: values clipped to 0 or 1 come back as the interval's ends.

    Args:
        array01: the array on the 0..1 scale (a fusion's output).
        record: the record :func:`normalise` returned with the scaled input (its ``low``, ``high`` and
            ``method`` are read).

    Returns:
        float64 array, ``low + array01 * (high - low)`` (the values unchanged, as a copy, for method ``"none"``).
        Given a Volume, a Volume on its grid with the record's unit (``HU``, ``SUVbw``...) where it names one.

    Raises:
        InvalidInputError: ``record`` is not a mapping with finite numeric ``low``/``high`` (not a
            :func:`normalise` record), or ``array01`` is not real numbers.
    """
    fix = "pass the record normalise() returned with the scaled input (a dict with numeric 'low' and 'high')"
    if not isinstance(record, Mapping):
        raise InvalidInputError(f"the normalisation record must be a dict, got {describe(record)}", fix=fix)
    bounds = []
    for key in ("low", "high"):
        value = record.get(key)
        ok = isinstance(value, numbers.Real) and not isinstance(value, (bool, np.bool_))
        if not ok or not np.isfinite(value):
            got = "no such key" if key not in record else describe(value) if not ok else "a non-finite number"
            raise InvalidInputError(f"the normalisation record has no numeric {key!r} ({got})", fix=fix)
        bounds.append(float(value))
    lo, hi = bounds
    from ..volume import UNITS, Volume

    if isinstance(array01, Volume):  # the type it was given: normalise(vol) returns a Volume too
        values = denormalise(array01.array, record)
        unit = record.get("unit")
        return array01.with_array(values, **({"unit": unit} if unit in UNITS else {}))
    y = np.asarray(array01)
    if not (np.issubdtype(y.dtype, np.number) or y.dtype == bool) or np.iscomplexobj(y):
        raise InvalidInputError(f"denormalise takes an array of real numbers in 0..1, got {describe(array01)}",
                                fix="pass the fused array (values in 0..1)")
    method = record.get("method")
    if isinstance(method, str) and method == "none":
        return y.astype(np.float64, copy=True)  # never the caller's own array (an edit of one changed the other)
    y = y.astype(np.float64, copy=False)
    if not np.isfinite(hi - lo):  # an interval wider than float64 holds: on halves, as normalise scaled it
        return (lo * 0.5 + y * (hi * 0.5 - lo * 0.5)) * 2.0
    return lo + y * (hi - lo)
