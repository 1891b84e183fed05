"""Resampling onto a reference grid, or onto a common grid chosen automatically.

Modality, unit and provenance survive; label maps use nearest neighbour.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import numpy as np

from ..errors import InvalidInputError
from ..volume import Volume, affine_from_geometry

__all__ = ["resample", "resample_to_common_grid", "common_grid"]

_INTERP = ("linear", "nearest", "bspline")


def _interpolator(name: str):
    import SimpleITK as sitk

    table = {"linear": sitk.sitkLinear, "nearest": sitk.sitkNearestNeighbor, "bspline": sitk.sitkBSpline}
    if name not in table:
        raise InvalidInputError(f"unknown interpolation {name!r}", fix=f"use one of {', '.join(_INTERP)}")
    return table[name]


def _check_volume(v, name: str) -> Volume:
    if not isinstance(v, Volume):
        raise InvalidInputError(f"{name} must be a medfuse Volume, got {type(v).__name__}",
                                fix="load it with medfuse.load or wrap the array in medfuse.Volume(array, affine)")
    return v


def _is_label_map(v: Volume) -> bool:
    return v.array.dtype == bool


def resample(volume: Volume, reference: Volume, *, transform=None, interpolation: str = "linear",
             default: Optional[float] = None) -> Volume:
    """Resample ``volume`` onto ``reference``'s grid.

    Args:
        volume: the image to resample (moving space).
        reference: the grid to sample on (fixed space); only its geometry is used.
        transform: a :class:`~medfuse.registration.transforms.Transform` mapping reference (fixed) points to
            ``volume`` (moving) points; identity when ``None``.
        interpolation: ``"linear"`` (default), ``"nearest"`` (label maps, masks), or ``"bspline"``.
            Boolean volumes always use nearest neighbour.
        default: value outside ``volume``; default: -1024 for CT in HU, else 0.

    Returns:
        A Volume on the reference grid with ``volume``'s modality, unit, dtype (floats for linear/bspline of
        integers) and provenance, plus a ``resampled`` history entry.
    """
    import SimpleITK as sitk

    from .transforms import Transform

    _check_volume(volume, "volume")
    _check_volume(reference, "reference")
    if transform is not None and not isinstance(transform, Transform):
        transform = Transform(transform)
    if _is_label_map(volume):
        interpolation = "nearest"
    interp = _interpolator(interpolation)
    if default is None:
        default = -1024.0 if (volume.modality == "CT" and volume.unit == "HU") else 0.0
    src = volume.to_sitk()
    if interpolation != "nearest" and src.GetPixelID() not in (sitk.sitkFloat32, sitk.sitkFloat64):
        src = sitk.Cast(src, sitk.sitkFloat32)
    ref = sitk.Image(list(reference.shape), sitk.sitkUInt8)
    ref.SetSpacing(reference.spacing)
    ref.SetOrigin(reference.origin)
    ref.SetDirection(tuple(float(x) for x in reference.direction.ravel()))
    tx = sitk.Transform(3, sitk.sitkIdentity) if transform is None else transform.sitk
    out = sitk.Resample(src, ref, tx, interp, float(default), src.GetPixelID())
    arr = np.transpose(sitk.GetArrayFromImage(out), (2, 1, 0))
    if volume.array.dtype == bool:
        arr = arr.astype(bool)
    res = Volume(arr, reference.affine.copy(), modality=volume.modality, unit=volume.unit,
                 provenance=dict(volume.provenance))
    res.provenance["history"] = list(volume.provenance.get("history", []))
    res.add_history("resample", interpolation=interpolation, transform=None if transform is None else transform.sitk.GetName(),
                    shape=list(reference.shape), spacing=[round(s, 6) for s in reference.spacing])
    res.provenance["resampled"] = True
    return res


def common_grid(volumes: Sequence[Volume], *, reference_index: int = 0) -> Volume:
    """An empty grid covering ``volumes[reference_index]``'s field of view at the finest spacing of all volumes.

    The orientation (direction) of the reference is kept.
    """
    if not volumes:
        raise InvalidInputError("no volumes given", fix="pass at least one Volume")
    vols = [_check_volume(v, f"volumes[{i}]") for i, v in enumerate(volumes)]
    if not (-len(vols) <= reference_index < len(vols)):
        raise InvalidInputError(f"reference_index {reference_index} is out of range for {len(vols)} volumes",
                                fix="pass the index of the fixed volume")
    ref = vols[reference_index]
    finest = min(min(v.spacing) for v in vols)
    extent = (np.asarray(ref.shape) - 1) * np.asarray(ref.spacing)  # centre-to-centre field of view
    # Same outer edges: first and last voxel half a voxel inside the reference's edges.
    fov = extent + np.asarray(ref.spacing)
    shape = np.maximum(1, np.round(fov / finest).astype(int))
    spacing = np.full(3, finest)
    start_edge = ref.index_to_world([-0.5, -0.5, -0.5])
    origin = start_edge + ref.direction @ (spacing / 2.0)
    aff = affine_from_geometry(spacing, origin, ref.direction)
    return Volume(np.zeros(tuple(int(s) for s in shape), dtype=np.uint8), aff)


def resample_to_common_grid(volumes: Sequence[Volume], *, reference_index: int = 0,
                            interpolation: str = "linear") -> List[Volume]:
    """Resample every volume onto one grid: the finest spacing among them, covering the reference's field of view.

    No registration is done: volumes are assumed to share a world frame (register first otherwise).
    Boolean volumes (masks, label maps) use nearest neighbour.
    """
    grid = common_grid(volumes, reference_index=reference_index)
    out = []
    for v in volumes:
        if v.same_grid(grid):
            out.append(v.copy())
        else:
            out.append(resample(v, grid, interpolation="nearest" if v.array.dtype == bool else interpolation))
    return out
