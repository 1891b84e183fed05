"""Volume <-> napari layer geometry (GUI-free, NumPy + medfuse only).

napari world coordinates in this plugin are LPS millimetres in the order ``(S, P, L)`` (napari's
``(z, y, x)``), so the default 2-D view is axial in radiological convention (anterior up, patient left on
the right of the screen) and every layer from every reader shares one world. napari cannot display a
rotated scale/translate grid reliably, so each volume is put on an axis-aligned grid first:

* axis-permuted or flipped scans are **reordered** (transpose + flip, voxels untouched);
* oblique scans are **resampled** onto an axis-aligned grid covering the same box.

The scanner's true affine is always kept in ``layer.metadata["medfuse"]["affine"]``.

Layers from other plugins may have other napari ``units`` (µm, say): napari then draws each layer in its own units
converted to a common one, so the Volumes and placements made here are converted to mm (:func:`mm_matrix`).
"""

from __future__ import annotations

import contextlib
import contextvars
from typing import Any, Dict, Iterator, Optional, Tuple

import numpy as np

from medfuse.display import display_settings
from medfuse.volume import Volume

#: Row permutation LPS <-> napari world (S, P, L); it is its own inverse.
R4 = np.array([[0, 0, 1, 0], [0, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 1]], dtype=float)

#: Modalities of functional images (PET, SPECT); :func:`is_functional` also counts an RT dose as one.
FUNCTIONAL = ("PT", "NM")


def is_functional(item: Any) -> bool:
    """Whether an image is shown over the anatomy: PET/SPECT (modality in :data:`FUNCTIONAL`) or an RT dose (unit Gy).

    Why the unit: a dose grid's modality is ``unknown``, so a test on the modality alone stacked a dose under the
    CT opened with it (opaque, hiding it) and never pre-selected it as the overlay.

    Args:
        item: a :class:`~medfuse.volume.Volume`, a napari layer (its medfuse metadata) or that metadata as a dict;
            a layer from another plugin (no medfuse metadata) is not functional.
    """
    if isinstance(item, Volume):
        md = {"modality": item.modality, "unit": item.unit}
    else:
        md = item if isinstance(item, dict) else meta(item)
    return md.get("modality") in FUNCTIONAL or md.get("unit") == "Gy"


def display_grid(volume: Volume) -> Tuple[np.ndarray, Tuple[float, ...], Tuple[float, ...], str]:
    """Put ``volume`` on an axis-aligned grid in napari axis order ``(S, P, L)``.

    Returns:
        ``(array, scale, translate, how)`` where ``how`` is ``"native"``, ``"reordered"`` or ``"resampled"``.
    """
    if volume.is_oblique:
        volume = _axis_aligned(volume)
        how = "resampled"
    else:
        how = "native"
    d = volume.direction
    axis_of_world = {int(np.argmax(np.abs(d[:, c]))): c for c in range(3)}  # world axis -> voxel axis
    order = [axis_of_world[w] for w in (2, 1, 0)]  # voxel axes for S, P, L
    arr = np.transpose(volume.array, order)
    flips = [n for n, c in enumerate(order) if d[2 - n, c] < 0]
    if flips:
        arr = np.flip(arr, axis=flips)
    if order != [0, 1, 2] or flips:
        how = "reordered" if how == "native" else how
        arr = np.ascontiguousarray(arr)
    spacing = np.asarray(volume.spacing)
    scale = tuple(float(spacing[c]) for c in order)
    # World position of the new voxel (0, 0, 0): the old index with flipped axes at their far end.
    first = np.zeros(3)
    for n in flips:
        first[order[n]] = volume.shape[order[n]] - 1
    origin_lps = volume.index_to_world(first)
    translate = tuple(float(origin_lps[w]) for w in (2, 1, 0))
    return arr, scale, translate, how


def _axis_aligned(volume: Volume) -> Volume:
    """Resample an oblique volume onto an axis-aligned LPS grid with the same box and similar spacing.

    A label map or mask (a boolean volume, or an integer one of unknown modality with up to 4096 distinct values
    in flat regions) is resampled with nearest neighbour and keeps its integer dtype; images stay linearly
    interpolated.

    Why: linear interpolation blended an oblique label map's labels (a uint8 ``{0, 1, 2, 4}`` file opened as a
    float32 layer with tens of thousands of values, ~3.0 between 2 and 4, saved back as label 3), and the
    warning ``resample`` gives about it did not reach the napari user.
    """
    from medfuse.registration import resample

    lo, hi = volume.bounds()
    d = np.abs(volume.direction)
    # Spacing along each world axis: that of the voxel axis closest to it.
    spacing = np.array([volume.spacing[int(np.argmax(d[w]))] for w in range(3)])
    shape = tuple(int(np.floor((hi[w] - lo[w]) / spacing[w] + 1e-6)) + 1 for w in range(3))
    aff = np.eye(4)
    aff[:3, :3] = np.diag(spacing)
    aff[:3, 3] = lo
    ref = Volume(np.zeros(shape, dtype=np.uint8), aff)
    return resample(volume, ref, interpolation="nearest" if _label_like(volume) else "linear")


#: Distinct values a label map may have to be shown as one (see :func:`_label_like`).
LABEL_VALUES = 4096


def _label_like(volume: Volume) -> bool:
    """Whether ``volume`` looks like a label map or mask: boolean, or integer of unknown modality with up to
    :data:`LABEL_VALUES` distinct values in flat regions (medfuse's own tests, :mod:`medfuse.registration.resample`).

    Why 4096 and flat regions: TotalSegmentator's 117 classes and FreeSurfer's aparc+aseg (labels up to 2035) exceed
    the 64 values ``resample()`` warns at; an MR stored as int16 with fewer than 4096 values (BraTS t1n: about 2000)
    has neighbours that differ by noise (about 0.02 of its pairs equal, a label map's over 0.5).
    """
    from medfuse.registration.resample import _is_label_map, label_map_description, piecewise_constant

    return _is_label_map(volume) or (label_map_description(volume, max_values=LABEL_VALUES) is not None
                                     and piecewise_constant(volume.array))


def is_label_map(volume: Volume) -> bool:
    """Whether the reader opens ``volume`` as a napari Labels layer (coloured, semi-transparent over the anatomy).

    A label map or mask (:func:`_label_like`) with no negative value and no physical unit: a volume whose modality
    (MR, CT, PET, SPECT) or unit (HU, SUV, Bq/mL, counts, Gy) is known is an image, whatever its values. A float
    volume of unknown modality holding whole numbers only (a 0/1 mask stored as float32) counts when the display's
    own test takes it for a mask (:func:`medfuse.display._is_label_map`) and its regions are flat.
    """
    arr = volume.array
    if volume.unit != "arbitrary" or arr.size == 0:
        return False
    if arr.dtype.kind == "f":
        from medfuse.display import _is_label_map as whole_labels
        from medfuse.registration.resample import piecewise_constant

        return volume.modality == "unknown" and whole_labels(arr[arr != 0]) and piecewise_constant(arr)
    return _label_like(volume) and (arr.dtype == bool or int(arr.min()) >= 0)


def _integer_labels(volume: Volume) -> Volume:
    """A label map as napari's Labels take it: integers (booleans and whole floats converted), geometry kept.

    Why before :func:`display_grid`: an oblique float mask is then resampled with nearest neighbour, as an
    integer one is, not blended.
    """
    arr = volume.array
    if arr.dtype.kind in "iu":
        return volume
    top = int(arr.max()) if arr.size else 0  # non-negative (is_label_map): the smallest unsigned type holding it
    return Volume(arr.astype(np.min_scalar_type(top)), volume.affine, modality=volume.modality, unit=volume.unit,
                  provenance=volume.provenance)


#: The fix for a layer whose napari ``units`` are not lengths, when medfuse computes on it.
UNITS_FIX = ("give the layer length units in napari (nm, um, mm, cm or m; in the console: "
             "layer.units = ('mm', 'mm', 'mm')), then run again")


def units_to_mm(units: Any, name: str, *, error: Optional[type] = None, fix: str = UNITS_FIX) -> Optional[np.ndarray]:
    """Millimetres per world unit of each axis of a layer's napari ``units``; None for napari's default (pixel).

    Why: napari's world is in the layer's own units, while medfuse's geometry (and its registration presets) is
    in mm: a layer in µm with scale 2000 was registered as if its voxels were 2 m wide. napari's default unit
    (pixel, as on medfuse's own layers) is taken as mm.

    Args:
        units: the layer's ``units`` (one unit or one per axis; pint units or names).
        name: the layer's name, for the message.
        error: the :class:`~medfuse.errors.MedfuseError` subclass raised (default ``InvalidInputError``).
        fix: the fix given with it.

    Raises:
        MedfuseError: a unit that is not a length (seconds, say), or one pint does not know.
    """
    if error is None:
        from medfuse.errors import InvalidInputError as error
    if units is None:
        return None
    units = [units] * 3 if isinstance(units, str) else list(units)
    if all(str(u) in ("pixel", "px", "") for u in units):
        return None  # napari's default: medfuse's own layers, whose scale is in mm already
    try:
        import pint
        from napari.utils._units import get_unit_registry
    except ImportError as exc:  # pint comes with napari; without it the units cannot be converted
        raise error(f"layer '{name}' has axis units {tuple(str(u) for u in units)}, and converting them "
                    "needs the package pint", fix=fix) from exc
    try:
        registry = get_unit_registry()
        factors = [float(registry.Quantity(1.0, str(u)).to("millimeter").magnitude) for u in units]
    except (ValueError, AttributeError, pint.errors.PintError) as exc:
        raise error(f"layer '{name}' has axis units {tuple(str(u) for u in units)}, which are not all "
                    f"lengths, so its voxel spacing in mm is unknown", fix=fix) from exc
    return np.asarray(factors, dtype=float)


def mm_matrix(layer: Any) -> np.ndarray:
    """4x4 from the layer's world units to mm: ``diag(mm per unit of its last three axes, 1)``.

    Identity for napari's default unit (pixel: medfuse's own layers) and for objects without ``units`` (the
    writer's stand-in layer, already converted to mm).

    Raises:
        InvalidInputError: units that are not lengths.
    """
    factors = units_to_mm(getattr(layer, "units", None), str(getattr(layer, "name", "layer")))
    m = np.eye(4)
    if factors is not None:
        m[:3, :3] = np.diag(np.resize(factors[-3:], 3))
    return m


def layer_matrix(scale, translate, affine=None, *, rotate=None, shear=None) -> np.ndarray:
    """napari data -> world 4x4 of a 3-D layer: ``affine @ (rotate @ shear @ scale + translate)``.

    Why this order: it is napari's own (``Layer._data_to_world``: affine * (rotate * shear * scale + translate)).
    """
    lin = np.diag(np.asarray(scale, dtype=float)[-3:])
    if shear is not None:
        lin = _shear_matrix(shear) @ lin
    if rotate is not None:
        lin = np.asarray(rotate, dtype=float)[-3:, -3:] @ lin
    m = np.eye(4)
    m[:3, :3] = lin
    m[:3, 3] = np.asarray(translate, dtype=float)[-3:]
    if affine is not None:
        m = np.asarray(affine, dtype=float)[-4:, -4:] @ m
    return m


def _shear_matrix(shear) -> np.ndarray:
    """napari's shear (3 upper-triangular values or a 3x3 triangular matrix) as a 3x3 matrix."""
    sh = np.asarray(shear, dtype=float)
    if sh.ndim == 2:
        return sh[-3:, -3:]
    m = np.eye(3)
    if sh.size:
        m[np.triu_indices(3, k=1)] = sh[-3:]
    return m


def data_to_world(layer: Any) -> np.ndarray:
    """The layer's full napari data -> world 4x4 (scale, rotate, shear, translate and affine)."""
    return layer_matrix(layer.scale, layer.translate, layer.affine.affine_matrix,
                        rotate=layer.rotate, shear=layer.shear)


def layer_geometry(layer: Any) -> Dict[str, Any]:
    """napari keyword arguments that put a new layer on ``layer``'s data grid exactly as napari shows it.

    ``units`` go along: a layer in µm from another plugin gives a fused/resampled layer in µm, which the writer
    converts to mm (without them the new layer was saved 1000 times too large).
    """
    geometry = dict(scale=tuple(layer.scale), translate=tuple(layer.translate), rotate=np.array(layer.rotate),
                    shear=np.array(layer.shear), affine=layer.affine.affine_matrix.copy())
    units = getattr(layer, "units", None)
    if units is not None:
        geometry["units"] = tuple(str(u) for u in units)
    return geometry


def _affine_holds_grid(layer: Any) -> bool:
    """Whether the layer's napari ``affine`` holds its voxel grid (spacing, origin), as some readers write it.

    Why: such a layer has ``scale`` 1 and its voxel spacing in ``affine``; taken as a placement, the spacing went
    into ``medfuse.register(initial_transform=...)`` and a rigid run kept only its rotation: the pair was registered
    as if with 1 mm voxels. It counts when the ``affine`` is the layer's only transform (``scale`` 1, no
    ``translate``, ``rotate`` or ``shear``). medfuse's own layers never count (grid in ``scale``/``translate``: their
    ``affine`` is a registration or a hand placement), nor do layers with a grid in ``scale``/``translate`` (an
    ``affine`` there is a placement, as before).
    """
    if "display_grid" in meta(layer):
        return False
    aff = np.asarray(layer.affine.affine_matrix, dtype=float)[-4:, -4:]
    if np.allclose(aff, np.eye(4), atol=1e-9):
        return False
    inner = layer_matrix(layer.scale, layer.translate, rotate=layer.rotate, shear=layer.shear)
    return bool(np.allclose(inner, np.eye(4), atol=1e-9))


def layer_grid(layer: Any) -> np.ndarray:
    """The layer's physical grid: napari data -> physical (world axes) 4x4; what remains napari shows is the placement.

    * a grid recorded by a registration in this plugin (``metadata["medfuse"]["grid"]``), while the layer's
      ``scale`` and ``translate`` are still those it was recorded with;
    * a layer whose ``affine`` holds its voxel grid (see :func:`_affine_holds_grid`): its whole transform, so its
      placement is none, as for the same volume given with ``scale``/``translate``; when that transform has a shear
      (voxel axes not perpendicular, which a medfuse grid cannot hold), an axis-aligned grid with the true voxel
      spacing and origin, the shear staying in the placement (resampled exactly; a rigid registration keeps its
      rigid part and ``medfuse.register`` warns about the rest);
    * a medfuse layer of a file whose ``translate`` was changed in napari (its ``scale`` unchanged): the file's
      grid (:func:`_file_grid`), so the move is a placement, as a hand drag (``affine``) is;
    * otherwise ``scale`` and ``translate``, as before (``rotate``, ``shear``, ``affine`` are the placement).
    """
    recorded = meta(layer).get("grid")
    if isinstance(recorded, dict):
        try:
            m = np.asarray(recorded["matrix"], dtype=float)
            same = (np.allclose(np.asarray(recorded["scale"], float), np.asarray(layer.scale, float)[-3:])
                    and np.allclose(np.asarray(recorded["translate"], float), np.asarray(layer.translate, float)[-3:]))
            if m.shape == (4, 4) and same:
                return m
        except (KeyError, TypeError, ValueError):
            pass  # a malformed record: the layer's own transform decides
    own = layer_matrix(layer.scale, layer.translate)
    read = _file_grid(layer)
    if read is not None and not np.allclose(own, read, atol=1e-6) and np.allclose(
            np.diag(read)[:3], own.diagonal()[:3], rtol=1e-6, atol=1e-9):
        # Only the translate differs from the file's grid: a move in napari (console, script), a placement as a hand
        # drag is (the writer keeps the file's voxel order with the move in the affine, and writes a sidecar).
        return read
    if not _affine_holds_grid(layer):
        return own
    m = data_to_world(layer)
    lin = m[:3, :3]
    lengths = np.linalg.norm(lin, axis=0)
    if np.all(lengths > 1e-9) and np.allclose((lin / lengths).T @ (lin / lengths), np.eye(3), atol=1e-4):
        return m
    return layer_matrix(np.where(lengths > 1e-9, lengths, 1.0), m[:3, 3])


def _file_grid(layer: Any) -> Optional[np.ndarray]:
    """The grid the reader gave a medfuse layer of a native or reordered file (napari data -> world 4x4), rebuilt
    from the file's affine in its metadata and the layer's shape; None for other layers.

    Why: it tells a ``translate`` set later in napari (a move) from the file's own origin, as :func:`display_grid`
    computed it: scale = the voxel spacing, translate = the world position of display voxel (0, 0, 0).
    """
    md = meta(layer)
    if md.get("display_grid") not in ("native", "reordered") or "affine" not in md:
        return None
    try:
        m = R4 @ np.asarray(md["affine"], dtype=float)  # native index -> world (S, P, L)
        shape = np.shape(layer_array(layer))[-3:]
    except (TypeError, ValueError):
        return None
    if m.shape != (4, 4) or len(shape) != 3:
        return None
    lin = m[:3, :3]
    axis = [int(np.argmax(np.abs(lin[:, c]))) for c in range(3)]  # world (= display) axis of native axis c
    if sorted(axis) != [0, 1, 2]:
        return None
    first = np.zeros(3)
    for c, w in enumerate(axis):
        if lin[w, c] < 0:  # a flipped axis: display voxel 0 is the file's last one along it
            first[c] = shape[w] - 1
    grid = np.eye(4)
    for c, w in enumerate(axis):
        grid[w, w] = float(np.linalg.norm(lin[:, c]))
    grid[:3, 3] = lin @ first + m[:3, 3]
    return grid


def file_order(layer: Any) -> Dict[str, Any]:
    """The file geometry (true affine, ``display_grid``) to give a layer made on ``layer``'s data grid; else {}.

    Why: a fused or resampled layer has the base layer's display voxels (``S, P, L``); with the base file's affine
    and its ``reordered`` record the writer saves it in the base file's voxel order, as the CLI does (``medfuse fuse
    T1.nii SPECT.nii`` gives T1's affine; the widget's fusion was saved in display order, axcodes S, P, L). Empty for
    a base napari shows resampled (oblique: its voxels are on the display grid only) or from another reader.
    """
    md = meta(layer)
    if md.get("display_grid") not in ("native", "reordered") or "affine" not in md:
        return {}
    return {"affine": np.asarray(md["affine"], dtype=float).tolist(), "display_grid": md["display_grid"]}


def grid_record(layer: Any, grid: np.ndarray) -> Dict[str, Any]:
    """``metadata["medfuse"]["grid"]`` for a layer whose ``affine`` now holds a placement on top of ``grid``."""
    return {"matrix": np.asarray(grid, dtype=float).tolist(),
            "scale": [float(v) for v in np.asarray(layer.scale, float)[-3:]],
            "translate": [float(v) for v in np.asarray(layer.translate, float)[-3:]]}


def voxel_spacing(layer: Any) -> np.ndarray:
    """Length in mm of one voxel step along each of the layer's last three data axes (its true spacing).

    A layer whose units are not lengths gives its world length (no mm to convert to; nothing is computed on it).
    """
    from medfuse.errors import MedfuseError

    try:
        units = mm_matrix(layer)
    except MedfuseError:
        units = np.eye(4)
    return np.linalg.norm((units @ data_to_world(layer))[:3, :3], axis=0)


def lps_to_world(matrix: Any) -> np.ndarray:
    """Express an LPS 4x4 (point -> point) in napari world axes (and back: the map is an involution)."""
    return R4 @ np.asarray(matrix, dtype=float) @ R4


#: Opacity of a label map's layer: the anatomy under it stays visible, as in 3D Slicer.
LABELS_OPACITY = 0.5


def volume_to_layer(volume: Volume, *, name: str, overlay: bool = False) -> Tuple[np.ndarray, dict, str]:
    """Return napari ``(data, kwargs, kind)`` for a volume, with modality-aware display defaults.

    ``kind`` is ``"labels"`` for a label map or mask (:func:`is_label_map`: a FreeSurfer aseg, a lesion mask),
    shown coloured and semi-transparent over the image it was drawn on; ``"image"`` otherwise. Both get the same
    placement (``scale``, ``translate``) and ``metadata["medfuse"]``.

    An RT dose (unit Gy) is always an overlay (a dose wash over the anatomy), whatever ``overlay`` says: callers
    that test modalities only (the sample data) do not say so.
    """
    labels = is_label_map(volume)
    data, scale, translate, how = display_grid(_integer_labels(volume) if labels else volume)
    if labels:
        kwargs: Dict[str, Any] = dict(opacity=LABELS_OPACITY, blending="translucent")
    else:
        kwargs = dict(display_settings(volume, overlay=overlay or volume.unit == "Gy").as_kwargs())
    kwargs.update(name=name, scale=scale, translate=translate,
                  metadata={"medfuse": {"affine": np.asarray(volume.affine).tolist(), "display_grid": how,
                                        "modality": volume.modality, "unit": volume.unit,
                                        "provenance": dict(volume.provenance or {})}})
    return data, kwargs, "labels" if labels else "image"


def volume_digest(array: Any) -> str:
    """A short BLAKE2b digest of a volume's voxels (dtype and shape included).

    Why: napari's *Split Stack* gives each volume of a 4-D layer a copy of the 4-D layer's metadata and nothing that
    says which volume it was; the reader keeps each volume's digest (``metadata["medfuse"]["volume_digests"]``) so
    that the writer can tell, from a part's voxels, which volume of the series it is.
    """
    import hashlib

    arr = np.ascontiguousarray(array)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{arr.dtype.str}{arr.shape}".encode())
    h.update(memoryview(arr).cast("B"))
    return h.hexdigest()


def meta(layer: Any) -> Dict[str, Any]:
    """The medfuse metadata of a layer (empty for layers from other plugins)."""
    return dict(getattr(layer, "metadata", {}).get("medfuse", {}))


#: Within :func:`read_once`: the pixels read of each lazily loaded layer, by the layer's id (with the layer, so
#: that the id is not reused meanwhile).
_READ: contextvars.ContextVar[Optional[Dict[int, Tuple[Any, np.ndarray]]]] = contextvars.ContextVar("_READ",
                                                                                                   default=None)


@contextlib.contextmanager
def read_once() -> Iterator[None]:
    """Within it, :func:`layer_array` reads each lazily loaded layer (a dask or zarr array) once.

    Why: starting a registration read a lazy fixed layer twice (its file grid and its display grid), which held
    the viewer for both reads.
    """
    token = _READ.set({})
    try:
        yield
    finally:
        _READ.reset(token)


def layer_array(layer: Any) -> np.ndarray:
    """The layer's pixels at full resolution.

    Why: ``np.asarray`` of a multiscale layer gives its coarsest level, which napari draws with level 0's scale.
    """
    data = layer.data[0] if getattr(layer, "multiscale", False) else layer.data
    read = _READ.get()
    if read is None or isinstance(data, np.ndarray):
        return np.asarray(data)
    if id(layer) not in read:
        read[id(layer)] = (layer, np.asarray(data))
    return read[id(layer)][1]


def layer_to_volume(layer: Any, *, registered: bool = True) -> Volume:
    """A Volume (LPS) from a napari image layer: its data grid placed where napari shows it.

    Args:
        layer: a 3-D napari Image layer.
        registered: include the layer's ``rotate``, ``shear`` and ``affine`` (a registration applied to it);
            False gives the grid as read from the file (``scale`` and ``translate`` only).
    """
    from medfuse.errors import InvalidInputError

    data = layer_array(layer)
    if data.ndim != 3 or getattr(layer, "rgb", False):
        raise InvalidInputError(f"layer '{layer.name}' is not a 3-D greyscale volume (shape {data.shape})",
                                fix="pick a 3-D image layer")
    # In mm whatever the layer's units: medfuse's geometry and registration presets are in mm.
    m = R4 @ mm_matrix(layer) @ (data_to_world(layer) if registered else layer_grid(layer))
    md = meta(layer)
    # The file's provenance goes along (its frame of reference: resampling across frames unregistered is warned).
    return Volume(data, m, modality=md.get("modality", "unknown"), unit=md.get("unit", "arbitrary"),
                  provenance=md.get("provenance") or {})


def world_matrix(layer: Any) -> np.ndarray:
    """The layer's placement as an LPS 4x4: its physical space -> viewer world (identity when unplaced).

    Physical space is the layer's orthogonal grid (:func:`layer_grid`: ``scale`` and ``translate``, or an
    ``affine`` that holds the grid); everything else napari applies (``rotate``, ``shear`` and the ``affine``
    holding a registration) is the placement. Both spaces are in mm (:func:`mm_matrix`), whatever the layer's units.
    """
    grid = layer_grid(layer)
    units = mm_matrix(layer)
    return lps_to_world(units @ data_to_world(layer) @ np.linalg.inv(grid) @ np.linalg.inv(units))


def viewer_alignment(fixed: Any, moving: Any, *, atol: float = 1e-6) -> Optional[np.ndarray]:
    """How napari shows ``moving`` against ``fixed``, as an initial transform for ``medfuse.register``; or None.

    Returns the LPS 4x4 fixed physical point -> moving physical point (ITK convention) that puts the two layers
    where the viewer shows them, when the moving layer has a placement of its own (``rotate``, ``shear`` or
    ``affine``: dragged or rotated by hand, or an earlier registration); None when it has none, so that the
    registration starts from the scanners' coordinates as before. Physical space is each layer's grid
    (:func:`layer_grid`), which is where :func:`native_volume` puts the volume (a ``translate`` set in napari on a
    medfuse layer of a file is a placement; on other layers it is part of the grid).
    """
    placed = world_matrix(moving)
    if np.allclose(placed, np.eye(4), atol=atol):
        return None
    return np.linalg.inv(placed) @ world_matrix(fixed)


def resample_onto(layer: Any, base: Any) -> Volume:
    """``layer`` resampled onto ``base``'s data grid as napari shows them, registrations included.

    Works for any affine registration (scaling and shear too): grids stay the layers' own orthogonal
    ones and the registrations go into the resampling transform (base physical -> world -> layer physical).
    """
    return resample_between(layer_to_volume(layer, registered=False), world_matrix(layer),
                            layer_to_volume(base, registered=False), world_matrix(base))


def resample_between(volume: Volume, world: np.ndarray, ref: Volume, ref_world: np.ndarray) -> Volume:
    """``volume`` (placed in the world by ``world``) resampled onto ``ref``'s grid (placed by ``ref_world``)."""
    from medfuse.registration import Transform, resample

    m = np.linalg.inv(world) @ ref_world  # ref physical -> world -> volume physical
    if np.allclose(m, np.eye(4), atol=1e-9):
        return volume if volume.same_grid(ref) else resample(volume, ref)
    return resample(volume, ref, transform=Transform.from_matrix(m))


def coverage_between(volume: Volume, world: np.ndarray, ref: Volume, ref_world: np.ndarray) -> float:
    """Share (0..1) of ``ref``'s grid that ``volume`` covers, both placed as for :func:`resample_between`."""
    from medfuse.registration import Transform, coverage

    m = np.linalg.inv(world) @ ref_world  # the same transform resample_between uses
    return coverage(volume, ref, transform=None if np.allclose(m, np.eye(4), atol=1e-9) else Transform.from_matrix(m))


def coverage_onto(layer: Any, base: Any) -> float:
    """Share (0..1) of ``base``'s grid that ``layer`` covers where napari shows them (as :func:`resample_onto`)."""
    return coverage_between(layer_to_volume(layer, registered=False), world_matrix(layer),
                            layer_to_volume(base, registered=False), world_matrix(base))


def native_volume(layer: Any) -> Volume:
    """The volume as the file holds it (voxel order and true affine), ignoring any registration affine.

    Why: registration samples voxels at random, so the voxel order changes the result slightly; working on
    the file's own grid gives exactly what ``medfuse.register`` and the CLI give on the same files. A ``translate``
    set in napari is a placement (:func:`layer_grid`), not part of the file's grid. Falls back to the display grid
    (``layer_to_volume(layer, registered=False)``) for resampled (oblique) scans, for layers from other plugins and
    for layers whose ``scale`` or shape no longer match the file.
    """
    md = meta(layer)
    if md.get("display_grid") not in ("native", "reordered") or "affine" not in md:
        return layer_to_volume(layer, registered=False)
    true_affine = np.asarray(md["affine"], dtype=float)
    display_to_native = np.linalg.inv(true_affine) @ R4 @ mm_matrix(layer) @ layer_grid(layer)
    lin = np.round(display_to_native[:3, :3])
    if not np.allclose(display_to_native[:3, :3], lin, atol=1e-3) or not np.all(np.abs(lin).sum(1) == 1):
        return layer_to_volume(layer, registered=False)
    order = [int(np.argmax(np.abs(lin[a]))) for a in range(3)]  # native axis a <- display axis order[a]
    data = layer_array(layer)
    flips = [a for a in range(3) if lin[a, order[a]] < 0]
    # The layer's grid must be the file's grid voxel for voxel, origin included: a translate set in napari
    # (or a layer resampled onto another grid that kept stale metadata) places the voxels elsewhere.
    expected = np.zeros((4, 4))
    expected[3, 3] = 1.0
    for a in range(3):
        expected[a, order[a]] = -1.0 if a in flips else 1.0
        expected[a, 3] = data.shape[order[a]] - 1 if a in flips else 0.0
    if not np.allclose(display_to_native, expected, atol=1e-3):
        return layer_to_volume(layer, registered=False)
    arr = np.transpose(data, order)
    if flips:
        arr = np.flip(arr, axis=flips)
    return Volume(np.ascontiguousarray(arr), true_affine, modality=md.get("modality", "unknown"),
                  unit=md.get("unit", "arbitrary"), provenance=md.get("provenance") or {})


def checker3d(shape: Tuple[int, int, int], tiles: Tuple[int, int, int]) -> np.ndarray:
    """3-D checkerboard: True where the sum of tile indices is even, so every slice orientation alternates."""
    idx = [(np.arange(n) // max(1, int(t))) for n, t in zip(shape, tiles)]
    return ((idx[0][:, None, None] + idx[1][None, :, None] + idx[2][None, None, :]) % 2) == 0


def curtain3d(shape: Tuple[int, int, int], *, axis: int, position: float) -> np.ndarray:
    """True before ``position`` (0-1) along ``axis`` (the screen's horizontal axis), for swipe/curtain mode."""
    from medfuse.display import curtain_mask

    line = curtain_mask((int(shape[axis]),), position=position)
    view = [1, 1, 1]
    view[axis] = int(shape[axis])
    return np.broadcast_to(line.reshape(view), tuple(shape))


def real_layer(layer: Any) -> Any:
    """The layer object itself behind napari's ``PublicOnlyProxy``; anything else as it is.

    Why: a dock widget opened from the Plugins menu gets a proxy of the viewer, and ``viewer.layers[name]`` gives a
    new proxy object on every call while iterating ``viewer.layers`` gives the layers themselves, so an ``is`` check
    or an identity cache between the two always failed (a fusion "of a removed layer", a registration never applied).
    """
    try:
        from napari.utils._proxies import PublicOnlyProxy
    except ImportError:  # a napari without proxies hands out the layers themselves
        return layer
    while isinstance(layer, PublicOnlyProxy):
        layer = layer.__wrapped__
    return layer


def layer_axis(viewer_dim: int, viewer_ndim: int, layer_ndim: int) -> Optional[int]:
    """The layer's own axis shown along viewer dimension ``viewer_dim``, or None when the layer has none there.

    napari aligns a layer's axes with the viewer's last ones: a 3-D layer in a 4-D viewer (a 4-D series open
    beside it) has its axis 0 on viewer dimension 1.
    """
    axis = int(viewer_dim) - (int(viewer_ndim) - int(layer_ndim))
    return axis if 0 <= axis < int(layer_ndim) else None
