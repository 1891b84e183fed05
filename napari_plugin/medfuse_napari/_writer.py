"""napari writer: save an image layer as NIfTI / MetaImage / NRRD with its true geometry.

napari's own writers save the pixels only (``.tif``, ``.npy``): a fused or registered volume saved that way
loses where it lies in the patient. This writer rebuilds the medfuse ``Volume`` from the layer (the file's
voxel order and affine kept in the layer metadata, plus any placement a registration gave the layer in napari)
and writes it with :func:`medfuse.save` (atomic; never onto the file the layer was read from).
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any, Dict, List

import numpy as np

from ._layers import native_volume, world_matrix


def _layer_like(data: Any, attributes: Dict[str, Any]) -> SimpleNamespace:
    """The parts of a napari Image layer that :mod:`._layers` reads, from a writer's ``(data, attributes)``."""
    ndim = np.ndim(data[0] if attributes.get("multiscale") else data)
    return SimpleNamespace(
        data=data, name=attributes.get("name", "layer"), metadata=attributes.get("metadata") or {},
        multiscale=bool(attributes.get("multiscale", False)), rgb=bool(attributes.get("rgb", False)),
        scale=tuple(attributes.get("scale", (1.0,) * ndim)), translate=tuple(attributes.get("translate", (0.0,) * ndim)),
        rotate=np.asarray(attributes.get("rotate", np.eye(ndim))), shear=np.asarray(attributes.get("shear", ())),
        affine=SimpleNamespace(affine_matrix=np.asarray(attributes.get("affine", np.eye(ndim + 1)))))


def layer_volume(data: Any, attributes: Dict[str, Any]):
    """The Volume a layer shows: the file's grid (or the display grid) placed where napari draws it.

    Raises:
        InvalidInputError: not a 3-D greyscale layer.
    """
    from medfuse.errors import InvalidInputError
    from medfuse.volume import Volume

    layer = _layer_like(data, attributes)
    arr = data[0] if layer.multiscale else data
    if np.ndim(arr) != 3 or layer.rgb:
        series = np.ndim(arr) == 4 and not layer.rgb  # a 4-D series from the reader (fMRI, multi-echo, gated)
        raise InvalidInputError(f"layer '{layer.name}' is not a 3-D greyscale volume (shape {np.shape(arr)}); "
                                "medfuse writes volumes",
                                fix=("split it into volumes (right-click it in the layer list › Split Stack) and "
                                     "save those" if series else "save a 3-D image layer") +
                                ", or use napari's own writers (.tif, .npy) for other layers")
    vol = native_volume(layer)
    placed = world_matrix(layer)  # a registration applied in napari moves the grid, not the voxels
    if not np.allclose(placed, np.eye(4), atol=1e-9):
        vol = Volume(vol.array, placed @ vol.affine, modality=vol.modality, unit=vol.unit,
                     provenance=vol.provenance)
    return vol


def write_image(path: str, data: Any, attributes: Dict[str, Any]) -> List[str]:
    """npe2 single-layer writer: ``path`` ends in .nii.gz, .nii, .mha or .nrrd.

    napari's save dialog has already asked before replacing an existing file, so an existing output is
    replaced; the file the layer was read from never is (:func:`medfuse.save` refuses it).
    """
    import medfuse

    written = medfuse.save(layer_volume(data, attributes), path, overwrite=True)
    return [str(written)]
