"""Convert a medfuse Volume into napari layer data (axis-aligned scans only)."""

from __future__ import annotations

from typing import Any, Tuple

import numpy as np

from medfuse.display import display_settings


def volume_to_layer(volume: Any, *, name: str, overlay: bool = False) -> Tuple[np.ndarray, dict, str]:
    """Return napari ``(data, kwargs, "image")`` in array order (i, j, k).

    Oblique/permuted scans are not reordered yet: the true affine is always kept in
    ``metadata["medfuse"]`` so nothing is lost.
    """
    settings = display_settings(volume, overlay=overlay)
    kwargs = dict(settings.as_kwargs()) if hasattr(settings, "as_kwargs") else {
        "colormap": settings.colormap, "contrast_limits": list(settings.contrast_limits),
        "blending": settings.blending, "opacity": settings.opacity}
    kwargs.update(name=name, scale=tuple(volume.spacing), translate=tuple(volume.origin),
                  metadata={"medfuse": {"affine": np.asarray(volume.affine).tolist(),
                                        "modality": volume.modality, "unit": volume.unit,
                                        "provenance": dict(volume.provenance or {})}})
    return np.asarray(volume.array), kwargs, "image"
