"""Explicit, recorded intensity normalisation before fusion.

Fusion rules and the network work on a common 0..1 scale, but CT comes in HU,
PET in SUV and MR in arbitrary units. Each input is mapped linearly from an
interval ``[low, high]`` onto 0..1 (values outside are clipped), with the interval
chosen per modality:

* CT: a window (default level 40 HU, width 400 HU: soft tissue and bone edges);
* PET in SUV: the range ``[0, suv_max]`` (default 10);
* MR, SPECT, PET not in SUV and anything else: percentiles (default 0.5 and 99.5);
* ``"range"``: an explicit ``[low, high]``; ``"none"``: identity.

:func:`normalise` returns the scaled array and a JSON-safe record of what was
done; :func:`denormalise` maps a 0..1 array back through a record (clipping is
not undone). Records go into a fused Volume's provenance (``normalisation``).
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Tuple

import numpy as np

from ..errors import InvalidInputError, MedfuseWarning

__all__ = ["normalise", "denormalise", "auto_method", "DEFAULT_CT_WINDOW", "DEFAULT_SUV_MAX", "DEFAULT_PERCENTILES"]

DEFAULT_CT_WINDOW = (40.0, 400.0)  # (level, width) in HU
DEFAULT_SUV_MAX = 10.0
DEFAULT_PERCENTILES = (0.5, 99.5)

_METHODS = ("window", "suv", "percentile", "minmax", "range", "none")


def auto_method(modality: Optional[str], unit: Optional[str] = None) -> str:
    """The method ``"auto"`` picks for a modality code and unit."""
    m = (modality or "unknown").upper()
    if m == "CT" or unit == "HU":
        return "window"
    if m in ("PT", "PET") and unit is not None and str(unit).startswith("SUV"):
        return "suv"
    return "percentile"


def _number(name: str, value: Any) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"normalisation {name} must be a number, got {value!r}", fix=f"pass e.g. {name}=40") from None
    if not np.isfinite(out):
        raise InvalidInputError(f"normalisation {name} must be finite, got {value!r}", fix="pass a finite number")
    return out


def _percentiles(value: Any) -> Tuple[float, float]:
    try:
        pl, ph = (float(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"percentiles must be two numbers (low, high), got {value!r}",
                                fix="pass e.g. percentiles=(0.5, 99.5)") from None
    if not 0.0 <= pl < ph <= 100.0:
        raise InvalidInputError(f"percentiles must satisfy 0 <= low < high <= 100, got {value!r}",
                                fix="pass e.g. percentiles=(0.5, 99.5)")
    return pl, ph


def _warn_if_not_hu(x: np.ndarray, width: float) -> None:
    """Warn when a volume labelled HU spans under 2 % of the CT window: it is not in HU any more.

    Why: a CT rescaled to 0..1 (``vol.with_array(x / x.max())``) keeps ``unit="HU"``, and the CT window then maps
    the whole image onto 0.400..0.4025, a flat grey that fuses as nothing, without a word. A real CT spans
    hundreds of HU (air, tissue, bone).
    """
    span = float(x.max() - x.min()) if x.size else 0.0
    if 0.0 < span < 0.02 * width:
        import warnings

        warnings.warn(f"an input labelled CT/HU spans only {span:.3g} (from {float(x.min()):.3g} to "
                      f"{float(x.max()):.3g}), under 2 % of the {width:g} HU window that 'auto' applies: it does "
                      "not look like HU (rescaled?), and the window maps it to a flat grey. Fix: give the "
                      "rescaled volume unit='arbitrary' (vol.with_array(x, unit='arbitrary')), or pass "
                      "normalise='percentile'", MedfuseWarning, stacklevel=3)


def normalise(array, *, method: str = "auto", modality: Optional[str] = None, unit: Optional[str] = None,
              level: Optional[float] = None, width: Optional[float] = None, suv_max: Optional[float] = None,
              percentiles: Optional[Tuple[float, float]] = None, low: Optional[float] = None,
              high: Optional[float] = None) -> Tuple[np.ndarray, Dict[str, Any]]:
    """Scale an image or volume to 0..1 and say how.

    Args:
        array: the image (any numeric dtype; NaN refused).
        method: ``"auto"`` (from ``modality``/``unit``), ``"window"``, ``"suv"``,
            ``"percentile"``, ``"minmax"``, ``"range"`` or ``"none"``.
        modality: ``MR``, ``CT``, ``PT``, ``NM`` or ``unknown`` (used by ``auto``; recorded).
        unit: the physical unit (used by ``auto``; recorded).
        level, width: CT window in HU (defaults 40, 400).
        suv_max: upper end of the PET SUV range (default 10).
        percentiles: (low, high) percentiles (default 0.5, 99.5).
        low, high: the interval for ``"range"``.

    Returns:
        ``(scaled, record)``: float64 in 0..1 and a JSON-safe dict with ``method``,
        ``low``, ``high``, ``modality``, ``unit``, ``clipped_fraction`` and the parameters.

    Raises:
        InvalidInputError: NaN/inf values, unknown method, or an empty interval.
    """
    x = np.asarray(array)
    if not np.issubdtype(x.dtype, np.number) and x.dtype != bool:
        raise InvalidInputError(f"cannot normalise dtype {x.dtype}", fix="pass a numeric array")
    x = x.astype(np.float64)
    if not np.all(np.isfinite(x)):
        raise InvalidInputError("the image contains NaN or infinite values", fix="replace them before fusing")
    chosen = auto_method(modality, unit) if method == "auto" else method
    if chosen not in _METHODS:
        raise InvalidInputError(f"unknown normalisation {method!r}", fix=f"use 'auto' or one of {', '.join(_METHODS)}")
    rec: Dict[str, Any] = {"method": chosen, "modality": modality or "unknown", "unit": unit or "arbitrary"}
    if chosen == "none":
        lo, hi = 0.0, 1.0
    elif chosen == "window":
        lv = DEFAULT_CT_WINDOW[0] if level is None else _number("level", level)
        wd = DEFAULT_CT_WINDOW[1] if width is None else _number("width", width)
        lo, hi = lv - wd / 2.0, lv + wd / 2.0
        rec.update(level=lv, width=wd)
        if method == "auto":
            _warn_if_not_hu(x, wd)
    elif chosen == "suv":
        lo, hi = 0.0, DEFAULT_SUV_MAX if suv_max is None else _number("suv_max", suv_max)
        rec.update(suv_max=hi)
    elif chosen == "percentile":
        pl, ph = DEFAULT_PERCENTILES if percentiles is None else _percentiles(percentiles)
        lo, hi = (float(v) for v in np.percentile(x, [pl, ph]))
        rec.update(percentiles=[pl, ph])
        if hi <= lo:  # sparse images (a few bright voxels): fall back to the full range
            lo, hi = float(x.min()), float(x.max())
    elif chosen == "minmax":
        lo, hi = float(x.min()), float(x.max())
    else:  # range
        if low is None or high is None:
            raise InvalidInputError("normalisation 'range' needs low= and high=", fix="pass e.g. low=0, high=255")
        lo, hi = _number("low", low), _number("high", high)
    if hi <= lo:
        if chosen in ("minmax", "percentile"):
            hi = lo + 1.0  # a constant image: map it to 0 rather than fail
        else:
            raise InvalidInputError(f"empty normalisation interval [{lo}, {hi}]", fix="choose high > low")
    rec.update(low=lo, high=hi)
    if chosen == "none":
        rec["clipped_fraction"] = 0.0
        return x, rec
    # In place on x (a float64 copy of the input made above): the same arithmetic as (x - lo) / (hi - lo),
    # without two more copies of a volume (which set the peak memory of medfuse.fuse on large volumes).
    y = np.subtract(x, lo, out=x)
    y = np.divide(y, hi - lo, out=y)
    rec["clipped_fraction"] = float(np.mean((y < 0) | (y > 1)))
    return np.clip(y, 0.0, 1.0, out=y), rec


def denormalise(array01, record: Dict[str, Any]) -> np.ndarray:
    """Map a 0..1 array back to the scale described by a :func:`normalise` record."""
    try:
        lo, hi = float(record["low"]), float(record["high"])
    except (KeyError, TypeError, ValueError):
        raise InvalidInputError("the normalisation record has no low/high", fix="pass a record made by normalise()") from None
    y = np.asarray(array01, dtype=np.float64)
    if record.get("method") == "none":
        return y
    return lo + y * (hi - lo)
