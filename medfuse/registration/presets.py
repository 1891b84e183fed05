"""Registration presets per modality pair.

Each preset is a plain dict of settings (all in physical units where possible) that
:func:`medfuse.registration.register` reads. Pick one by name (``preset="MR-PT"``) or let
``register`` choose from the two volumes' modalities.
"""

from __future__ import annotations

from typing import Any, Dict, Optional

from ..errors import InvalidInputError

__all__ = ["PRESETS", "get_preset", "preset_for"]

_BASE: Dict[str, Any] = {
    "metric": "mattes",
    "histogram_bins": 32,
    # Pyramid by physical spacing (mm) of the working images, coarse to fine.
    "levels_mm": (8.0, 4.0, 2.0),
    "smoothing_vox": (1.0, 0.5, 0.0),
    # Random samples per level: sparse sampling is where the speed comes from.
    "samples": 30000,
    "iterations": (150, 100, 100),
    "learning_rate_mm": 2.0,
    "min_step_mm": 0.01,
    # Step shrink factor on a direction change: 0.8 keeps the optimiser walking instead of stalling early.
    "relaxation": 0.9,
    "multistart_deg": 30.0,
    # Deformable (B-spline) stage.
    "bspline_grid_mm": 40.0,
    "bspline_levels_mm": (4.0, 2.0),
    "bspline_iterations": (40, 25),
    "bspline_samples": 20000,
    "bspline_max_displacement_mm": 30.0,
}

PRESETS: Dict[str, Dict[str, Any]] = {
    "MR-MR": {**_BASE, "histogram_bins": 48, "samples": 40000},
    "MR-CT": {**_BASE, "histogram_bins": 48},
    "MR-PT": dict(_BASE),
    "MR-NM": {**_BASE, "histogram_bins": 24},
    "CT-PT": dict(_BASE),
    "CT-NM": {**_BASE, "histogram_bins": 24},
    "default": dict(_BASE),
}


def preset_for(fixed_modality: str, moving_modality: str) -> str:
    """Name of the preset for a modality pair (order-insensitive); ``default`` when unknown."""
    order = ("MR", "CT", "PT", "NM")
    pair = sorted([fixed_modality, moving_modality], key=lambda m: order.index(m) if m in order else 9)
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
    """A copy of a preset (chosen by name, or from the modalities when ``name`` is None) with overrides."""
    if name is None:
        name = preset_for(fixed_modality, moving_modality)
    key = str(name).upper().replace("PET", "PT").replace("SPECT", "NM").replace("MRI", "MR")
    key = "default" if key == "DEFAULT" else key
    if key not in PRESETS:
        raise InvalidInputError(f"unknown registration preset {name!r}", fix=f"use one of {', '.join(PRESETS)}")
    p = dict(PRESETS[key])
    unknown = set(overrides) - set(p)
    if unknown:
        raise InvalidInputError(f"unknown preset setting(s) {sorted(unknown)}", fix=f"use keys of {sorted(p)}")
    p.update(overrides)
    p["name"] = key
    return p
