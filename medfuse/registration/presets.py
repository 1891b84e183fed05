"""Registration presets per modality pair.

Each preset is a plain dict of settings (all in physical units where possible) that
:func:`medfuse.registration.register` reads. Pick one by name (``preset="MR-PT"``) or let
``register`` choose from the two volumes' modalities.
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Optional

from .._checks import describe, label
from ..errors import InvalidInputError

__all__ = ["PRESETS", "get_preset", "preset_for"]

_BASE: Dict[str, Any] = {
    "metric": "mattes",
    "histogram_bins": 32,
    # Pyramid by physical spacing (mm) of the working images, coarse to fine. A coarser level is run by the
    # initialisation (``multistart_mm``); the 6 mm level makes the low-resolution (SPECT) cases robust.
    "levels_mm": (6.0, 4.0, 2.0),
    "smoothing_vox": (1.0, 0.5, 0.0),
    # Random samples per level: sparse sampling is where the speed comes from.
    "samples": 30000,
    "iterations": (100, 100, 100),
    "learning_rate_mm": 2.0,
    "min_step_mm": 0.02,
    # Step shrink factor on a direction change.
    "relaxation": 0.85,
    # Initialisation: 27 rotations (0, +-multistart_deg about each axis) around each start, on a copy at
    # multistart_mm; the best multistart_keep are polished there for up to multistart_iterations.
    "multistart_deg": 30.0,
    "multistart_mm": 8.0,
    "multistart_keep": 3,
    "multistart_iterations": 100,
    # initialise="auto" also scores the 23 other axis-aligned orientations (90-degree turns) on the same copy; the
    # best wide_keep of them get the whole multi-start above (one polish each).
    "wide_keep": 2,
    # Final level at the fixed image's native resolution (never finer than final_mm) when the fixed image is finer
    # than the last level of levels_mm (the moving image's spacing is not looked at); None switches it off.
    "final_mm": 1.0,
    "final_iterations": 40,
    "final_learning_rate_mm": 1.0,
    "final_samples": 30000,
    # Rigid runs: the finest level of levels_mm again from the result, with a fresh step, up to this many times while
    # each run improves the metric by more than the sampling noise and moves the result by half a voxel of that
    # level or more (0: none). A step collapsed by noisy gradients stopped an 11 degree MR-CT rotation 3 degrees
    # short (2.3 mm); with restarts 0.05-0.09 mm.
    "restarts": 8,
    # Deformable (B-spline) stage.
    "bspline_grid_mm": 40.0,
    "bspline_levels_mm": (4.0, 2.0),
    "bspline_iterations": (20, 20),
    "bspline_samples": 20000,
    # Bound on each B-spline coefficient (a displacement in mm on top of the linear part): MI otherwise invents
    # large warps where two modalities' contrasts differ (SPM12 T2 -> T1, pure shift: 13 mm at 30).
    "bspline_max_displacement_mm": 8.0,
    # A warp must improve the metric by this share of |metric| per mm of its mean displacement, or it is dropped
    # (the result is then the affine part; report.bspline_kept False). 0 keeps every warp.
    "bspline_min_gain_per_mm": 0.03,
}

# Sharp, fine anatomical pairs need no 6 mm level (the native final level carries the precision; 2x faster on 256^3).
_FINE = {"levels_mm": (4.0, 2.0), "smoothing_vox": (0.5, 0.0), "iterations": (100, 100)}

# 300 at every level: until December 2026 every level ran the largest per-level count (SimpleITK has one), and
# these presets' accuracy was measured so; each level now keeps its own budget.
_SHALLOW = {"relaxation": 0.95, "iterations": (300, 300, 300), "final_iterations": 200, "final_samples": 60000}

PRESETS: Dict[str, Dict[str, Any]] = {
    "MR-MR": {**_BASE, **_FINE, "histogram_bins": 48, "samples": 40000},
    "MR-CT": {**_BASE, **_FINE, "histogram_bins": 48},
    "MR-PT": dict(_BASE),
    # SPECT (4-5 mm voxels) has a shallow MI basin: noisy sampled gradients flip direction often, and with the
    # default 0.85 relaxation the step collapses ~1-2 mm short of the optimum. Shrink the step more slowly.
    "MR-NM": {**_BASE, **_SHALLOW, "histogram_bins": 24},
    "CT-PT": dict(_BASE),
    "CT-NM": {**_BASE, **_SHALLOW, "histogram_bins": 24},
    "default": dict(_BASE),
}


def preset_for(fixed_modality: str, moving_modality: str) -> str:
    """Name of the preset for a modality pair (order-insensitive); ``default`` when unknown.

    Args:
        fixed_modality, moving_modality: medfuse modality codes (``MR``, ``CT``, ``PT``, ``NM``); anything else
            counts as unknown.

    Returns:
        A key of :data:`PRESETS`. A same-modality pair without its own preset borrows the closest one (CT-CT uses
        ``MR-MR``; PT-PT and NM-NM use ``MR-PT``; PT-NM uses ``MR-NM``).
    """
    order = ("MR", "CT", "PT", "NM")
    # Only a str is a modality (an array here made ``in`` ambiguous, a bare NumPy ValueError).
    codes = [m if isinstance(m, str) else "unknown" for m in (fixed_modality, moving_modality)]
    pair = sorted(codes, key=lambda m: order.index(m) if m in order else 9)
    name = f"{pair[0]}-{pair[1]}"
    if name in PRESETS:
        return name
    if pair[0] == pair[1] and pair[0] in ("CT", "PT", "NM"):
        return "MR-MR" if pair[0] == "CT" else "MR-PT"
    if pair == ["PT", "NM"]:
        return "MR-NM"
    return "default"


def get_preset(name: Optional[str], fixed_modality: str = "unknown", moving_modality: str = "unknown",
               **overrides: Any) -> Dict[str, Any]:
    """A copy of a preset (chosen by name, or from the modalities when ``name`` is None) with overrides.

    Args:
        name: a preset name (``"MR-PT"``; any letter case, either order, PET/SPECT/MRI accepted as PT/NM/MR), or
            None to choose by the modalities.
        fixed_modality, moving_modality: the two images' modalities, used only when ``name`` is None.
        **overrides: preset keys to replace (``iterations=(50, 50, 50)``); per-level lists are fitted to the
            pyramid when their lengths differ.

    Returns:
        A new dict of settings, checked, with ``"name"`` set to the preset's key.

    Raises:
        InvalidInputError: an unknown preset name (or one that is not a str), an override that is not a preset
            key, or a setting SimpleITK would reject (a wrong type, out of range, per-level lists that do not match
            the pyramid).
    """
    if name is None:
        name = preset_for(fixed_modality, moving_modality)
    if not isinstance(name, str):  # str() of an array or a tensor would be matched, then echoed, as a name
        raise InvalidInputError(f"a preset name must be a str (or None), got {describe(name)}",
                                fix=f"use one of {', '.join(PRESETS)}, or None to choose by the modalities")
    key = str(name).upper().replace("PET", "PT").replace("SPECT", "NM").replace("MRI", "MR")
    key = "default" if key == "DEFAULT" else key
    if key not in PRESETS and "-" in key:  # a pair is a pair in either order: "CT-MR" is "MR-CT"
        a, _, b = key.partition("-")
        key = f"{b}-{a}" if f"{b}-{a}" in PRESETS else key
    if key not in PRESETS:
        raise InvalidInputError(f"unknown registration preset {label(name)}", fix=f"use one of {', '.join(PRESETS)}")
    p = dict(PRESETS[key])
    unknown = set(overrides) - set(p)
    if unknown == {"threads"}:  # the command line's --threads; Python sets ITK's count for the process
        raise InvalidInputError("register() takes no threads= (the command line's --threads sets ITK's thread "
                                "count for the process)",
                                fix="call SimpleITK.ProcessObject.SetGlobalDefaultNumberOfThreads(1) before it (one "
                                    "thread repeats a registration bit for bit)")
    if unknown:
        raise InvalidInputError(f"unknown preset setting(s) {sorted(unknown)}", fix=f"use keys of {sorted(p)}")
    p.update(overrides)
    # Per-level lists follow the pyramid (SimpleITK refuses lists of different lengths): longer ones keep their
    # last (finest) values, as the affine stage does; when levels_mm itself is overridden, shorter preset lists
    # are padded with their first value. levels_mm=(4, 2) on a three-level preset just works.
    for levels, per_level in (("levels_mm", ("smoothing_vox", "iterations")), ("bspline_levels_mm", ("bspline_iterations",))):
        if _is_seq(p[levels]) and len(p[levels]):
            n = len(p[levels])
            for k in per_level:
                if _is_seq(p[k]) and len(p[k]) > n:
                    p[k] = tuple(p[k])[-n:]
                elif levels in overrides and k not in overrides and _is_seq(p[k]) and 0 < len(p[k]) < n:
                    p[k] = (p[k][0],) * (n - len(p[k])) + tuple(p[k])
    _validate(p)
    p["name"] = key
    return p


def _is_seq(v: Any) -> bool:
    return isinstance(v, (list, tuple))


def _shown(v: Any) -> str:
    """A setting's value for a message: ``=value`` for numbers (and lists of them), else `` (its type)``."""
    def plain(x: Any) -> bool:
        return x is None or isinstance(x, numbers.Number)

    if plain(v) or _is_seq(v) and len(v) <= 8 and all(plain(x) for x in v):
        return f"={v!r}"
    return f" ({describe(v)})"


def _validate(p: Dict[str, Any]) -> None:
    """Refuse settings that SimpleITK would reject deep inside (or, worse, accept and ignore), saying which."""
    import math

    def bad(k: str, want: str) -> InvalidInputError:
        return InvalidInputError(f"registration setting {k}{_shown(p[k])} is invalid: it must be {want}",
                                 fix=f"pass {k} as {want}, or leave it out to use the preset's {PRESETS['default'][k]!r}")

    def number(k: str, lo: float, *, lo_open: bool = True, hi: float = math.inf, integer: bool = False):
        v = p[k]
        ok = isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
        ok = ok and (v > lo if lo_open else v >= lo) and v <= hi and (not integer or float(v) == int(v))
        if not ok:
            kind = "an integer" if integer else "a number"
            raise bad(k, f"{kind} {'>' if lo_open else '>='} {lo:g}" + (f" and <= {hi:g}" if hi < math.inf else ""))

    def levels(k: str):
        v = p[k]
        if not (_is_seq(v) and len(v) >= 1 and all(isinstance(x, numbers.Real) and not isinstance(x, bool)
                                                   and math.isfinite(x) and x > 0 for x in v)
                and all(a >= b for a, b in zip(v, v[1:]))):
            raise bad(k, "a non-empty list of spacings in mm > 0, coarse to fine")

    def per_level(k: str, of: str, *, integer: bool, lo: float):
        v = p[k]
        if not (_is_seq(v) and len(v) == len(p[of]) and all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) and math.isfinite(x) and x >= lo
                and (not integer or float(x) == int(x)) for x in v)):
            raise bad(k, f"a list of {len(p[of])} {'integers' if integer else 'numbers'} >= {lo:g} (one per level of "
                         f"{of}={tuple(p[of])!r})")

    if p.get("metric") not in ("mattes", "correlation"):
        raise bad("metric", "'mattes' or 'correlation'")
    number("histogram_bins", 4, lo_open=False, hi=1024, integer=True)
    levels("levels_mm")
    per_level("smoothing_vox", "levels_mm", integer=False, lo=0)
    per_level("iterations", "levels_mm", integer=True, lo=1)
    for k in ("samples", "final_samples", "bspline_samples"):
        number(k, 100, lo_open=False, integer=True)
    for k in ("learning_rate_mm", "min_step_mm", "final_learning_rate_mm", "multistart_mm", "bspline_grid_mm",
              "bspline_max_displacement_mm"):
        number(k, 0)
    number("relaxation", 0, hi=0.999)
    number("bspline_min_gain_per_mm", 0, lo_open=False, hi=1)
    number("multistart_deg", 0, lo_open=False, hi=90)
    for k in ("multistart_keep", "multistart_iterations", "final_iterations", "wide_keep"):
        number(k, 1, lo_open=False, integer=True)
    number("restarts", 0, lo_open=False, hi=20, integer=True)
    if p["final_mm"] is not None:
        number("final_mm", 0)
    levels("bspline_levels_mm")
    per_level("bspline_iterations", "bspline_levels_mm", integer=True, lo=1)
