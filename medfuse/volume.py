"""The :class:`Volume`: one 3-D image with its world geometry, modality and unit.

Conventions (stated once, used everywhere):

* ``Volume.array`` is indexed ``array[i, j, k]``, the same order as nibabel
  (i is the fastest-varying index in the file; for an axial DICOM series i runs
  along the columns, j along the rows and k through the slices).
* ``Volume.affine`` maps ``(i, j, k, 1)`` to world coordinates in millimetres in
  **LPS** (+x = patient Left, +y = Posterior, +z = Superior), the convention of
  DICOM, ITK and SimpleITK. ``Volume.affine_ras`` gives the NIfTI/nibabel/MONAI
  RAS form; the two differ by ``diag(-1, -1, 1, 1)``.
* SimpleITK's ``GetArrayFromImage`` returns ``[k, j, i]``; the bridges below
  transpose so that geometry is never lost or recomputed by hand elsewhere.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import warnings
from dataclasses import KW_ONLY, dataclass, field
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple

import numpy as np

from ._checks import number, user_stacklevel
from .errors import GeometryError, InvalidInputError, MedfuseWarning, MissingDependencyError

__all__ = ["Volume", "LPS_TO_RAS", "MODALITIES", "UNITS", "normalise_modality", "affine_from_geometry", "require_finite"]

#: Flip between LPS and RAS world coordinates (its own inverse).
LPS_TO_RAS = np.diag([-1.0, -1.0, 1.0, 1.0])

#: Modalities medfuse knows. DICOM's PT is PET, NM covers SPECT.
MODALITIES = ("MR", "CT", "PT", "NM", "unknown")

#: Physical units medfuse records. ``arbitrary`` for MR and anything unscaled; ``Gy`` for an RT dose grid.
UNITS = ("HU", "SUVbw", "SUVlbm", "SUVbsa", "Bq/mL", "counts", "Gy", "arbitrary")

_MODALITY_ALIASES = {
    "MRI": "MR", "MR": "MR", "T1": "MR", "T2": "MR", "FLAIR": "MR", "PD": "MR",
    "CT": "CT",
    "PT": "PT", "PET": "PT",
    "NM": "NM", "SPECT": "NM", "ST": "NM",
    "": "unknown", "UNKNOWN": "unknown", "OT": "unknown",
}

# Provenance keys that may be stored. Anything else is dropped, so that a
# careless caller cannot smuggle a patient identifier into outputs or logs.
_PROVENANCE_KEYS = {
    "series_uid", "study_uid", "frame_of_reference_uid", "source", "reader", "series_description",
    "volume_index", "n_volumes", "warnings", "suv", "history", "transfer_syntax", "manufacturer",
    "gantry_tilt_deg", "tilt_corrected", "resampled", "normalisation", "method", "weights_sha256",
    "registration", "scaling", "network_functional", "nifti_space", "sources", "suv_source", "labels_from",
    "unit_stated", "patient_key", "series_number", "network_path", "network_threads", "suv_factor",
    "image_type", "patient_position", "pet_acquisition", "volume",
}


def mm_text(value: float, spacing: Sequence[float], *, least: int = 1) -> str:
    """``value`` (mm) with enough decimals to tell a tenth of the finest voxel side (at least ``least``), and no
    negative zero: a mouse's 0.05 mm grid printed its origin at 0.1 mm, a 5 micrometre one as "-0.0"."""
    import math

    finest = min((abs(float(s)) for s in spacing if s), default=1.0)
    decimals = max(least, math.ceil(-math.log10(finest / 10.0))) if finest > 0 else least
    return f"{float(value) + 0.0:.{min(decimals, 9)}f}".replace("-0." + "0" * min(decimals, 9), "0." + "0" * min(decimals, 9))


def normalise_modality(modality: Optional[str]) -> str:
    """Map a modality name (``"PET"``, ``"SPECT"``, ``"MRI"``, DICOM codes) to medfuse's code.

    Args:
        modality: the name, in any letter case; None (or "") is ``unknown``.

    Returns:
        One of :data:`MODALITIES`.

    Raises:
        InvalidInputError: a name medfuse does not know.
    """
    if modality is None:
        return "unknown"
    key = str(modality).strip().upper()
    if key in _MODALITY_ALIASES:
        return _MODALITY_ALIASES[key]
    raise InvalidInputError(
        f"unknown modality {modality!r}",
        fix=f"use one of {', '.join(MODALITIES)} (PET and SPECT are accepted as aliases of PT and NM)",
    )


def affine_from_geometry(spacing: Sequence[float], origin: Sequence[float], direction: Any) -> np.ndarray:
    """Build a 4×4 LPS affine from ITK-style spacing, origin and a 3×3 direction matrix.

    Args:
        spacing: the voxel size in mm along i, j, k (SimpleITK's ``GetSpacing()``).
        origin: the LPS position in mm of voxel (0, 0, 0)'s centre (``GetOrigin()``).
        direction: the 3×3 direction cosines, columns along i, j, k, as a matrix or ITK's row-major 9-tuple
            (``GetDirection()``).

    Returns:
        The 4×4 float64 voxel-to-world (LPS mm) affine.

    Raises:
        GeometryError: an argument that is not numbers of the right count (3, 3 and 9).
    """
    for value, what in ((spacing, "spacing"), (origin, "origin"), (direction, "direction")):
        _refuse_complex(value, what)
    try:
        d = np.asarray(direction, dtype=float).reshape(3, 3)
        sp = np.asarray(spacing, dtype=float).reshape(3)
        org = np.asarray(origin, dtype=float).reshape(3)
    except (TypeError, ValueError) as e:
        raise GeometryError("the geometry needs 3 spacings, 3 origin coordinates and 9 direction cosines",
                            fix="pass image.GetSpacing(), image.GetOrigin() and image.GetDirection() of a 3-D "
                                "SimpleITK image, or numbers of those counts") from e
    aff = np.eye(4)
    aff[:3, :3] = d * sp[None, :]
    aff[:3, 3] = org
    return aff


def _refuse_complex(value: Any, what: str) -> None:
    """GeometryError when ``value`` holds complex numbers (even with zero imaginary parts).

    Why: NumPy's cast to float drops the imaginary part with only a ComplexWarning, so a geometry computed
    wrongly upstream was silently taken as its real part.
    """
    try:
        complex_ = np.iscomplexobj(np.asarray(value))
    except (TypeError, ValueError, RuntimeError):  # not array-like: the float conversion says what it is
        return
    if complex_:
        raise GeometryError(f"the {what} holds complex numbers; a geometry is real (voxel-to-world, LPS mm) and "
                            "medfuse does not drop an imaginary part silently",
                            fix=f"pass real numbers: if the imaginary parts are meant to be zero, pass "
                                f"numpy.real(x) after checking numpy.allclose(numpy.imag(x), 0); otherwise the "
                                f"{what} was computed wrongly upstream")


def _as_affine(affine: Any) -> np.ndarray:
    """``affine`` as a float64 array, or a :class:`GeometryError` saying what it is instead."""
    _refuse_complex(affine, "affine")
    try:
        return np.array(affine, dtype=float)
    except (TypeError, ValueError) as e:
        raise GeometryError(f"the affine is not a numeric matrix ({type(affine).__name__})",
                            fix="pass a 4x4 NumPy array (voxel-to-world, LPS mm), e.g. "
                                "medfuse.volume.affine_from_geometry(spacing, origin, direction)") from e


#: A voxel axis longer than this (1000 km) is no image's: its squares overflow the geometry's arithmetic long before
#: float64's end (a norm of a 1e160 mm axis is inf).
_MAX_SPACING_MM = 1e9


def _check_affine(affine: np.ndarray, *, tol: float = 1e-4) -> None:
    if affine.shape != (4, 4):
        raise GeometryError(f"the affine must be a 4x4 matrix, got shape {affine.shape}",
                            fix="pass a homogeneous 4x4 voxel-to-world matrix (a 3x3 one lacks the origin)")
    if not np.all(np.isfinite(affine)):
        raise GeometryError("the affine holds NaN or infinite values",
                            fix="repair the image header (pixdim/sform/qform, or DICOM spacing, position and "
                                "orientation) so that the geometry is finite")
    if not np.allclose(affine[3], [0, 0, 0, 1]):
        raise GeometryError("the affine's last row must be [0, 0, 0, 1]", fix="pass a homogeneous 4x4 affine")
    m = affine[:3, :3]
    # Each column over its largest entry first: a plain norm of a 1e160 mm axis overflowed to inf, and the affine
    # was called singular ("zero length").
    peak = np.max(np.abs(m), axis=0)
    spacing = peak * np.linalg.norm(m / np.where(peak > 0, peak, 1.0), axis=0)
    if np.any(spacing > _MAX_SPACING_MM):
        raise GeometryError(
            f"a voxel axis is {float(spacing.max()):.3g} mm long, beyond any image's geometry (and beyond what the "
            "spacing arithmetic can hold)",
            fix="repair the image header (pixdim/sform/qform): the spacing is in mm, so a value like this is "
                "usually a unit or a parsing error")
    # Why the direction's determinant: the matrix's own one is tiny for fine (sub-mm) but valid grids.
    if np.any(spacing <= 0) or abs(np.linalg.det(m / np.where(spacing > 0, spacing, 1.0))) < 1e-6:
        raise GeometryError(
            "the affine is singular (a voxel axis has zero length)",
            fix="repair the image header (pixdim/sform/qform) so that every axis has a non-zero spacing",
        )
    d = m / spacing
    if not np.allclose(d.T @ d, np.eye(3), atol=tol):
        raise GeometryError(
            "the affine is sheared (voxel axes are not perpendicular); medfuse keeps orthogonal grids only",
            fix="resample the image onto an orthogonal grid first (for example with a tool that applies the shear)",
        )


def _placed_metatensor(t: Any) -> bool:
    """Whether a MONAI MetaTensor carries geometry of its own: an affine other than the identity placeholder
    MONAI gives plain voxels, or the file it was read from."""
    try:
        aff = np.asarray(t.affine.detach().cpu() if hasattr(t.affine, "detach") else t.affine, dtype=float)
        source = t.meta.get("filename_or_obj") if isinstance(t.meta, dict) else None
    except (TypeError, ValueError, AttributeError):
        return True
    return aff.shape != (4, 4) or not np.allclose(aff, np.eye(4)) or bool(source)


def _checked_array(array: Any) -> np.ndarray:
    """``array`` as a 3-D numeric NumPy array in native byte order, or a typed error saying what is wrong."""
    _refuse_volume(array)
    if hasattr(array, "affine") and hasattr(array, "meta") and not isinstance(array, np.ndarray) \
            and _placed_metatensor(array):
        # A MONAI MetaTensor read from a file: Volume(t, affine) kept its voxels and dropped its geometry without a
        # word. One a MONAI array transform made from plain voxels has only MONAI's identity placeholder.
        raise InvalidInputError("the array is a MONAI MetaTensor, which carries its own affine; Volume(array, affine) "
                                "would drop it for the affine given",
                                fix="convert it with Volume.from_metatensor(t), which keeps its affine; to place its "
                                    "voxels by another affine on purpose, pass t.as_tensor() or numpy.asarray(t)")
    arr = _to_numpy(array)  # a torch tensor on a GPU or needing grad has no NumPy view of its own
    if arr.ndim != 3:
        fix = "pass a 3-D array; split 4-D data into volumes (medfuse.load_volumes) and add a slice axis to 2-D data"
        if hasattr(array, "affine") and hasattr(array, "meta"):  # a MONAI MetaTensor has its own geometry
            fix = "convert a MONAI MetaTensor with Volume.from_metatensor(t), which keeps its affine"
        raise InvalidInputError(
            f"a Volume is 3-D but the array has {arr.ndim} dimension(s) with shape {arr.shape}", fix=fix)
    if arr.size == 0:
        raise InvalidInputError(f"the array has zero size (shape {arr.shape})", fix="load a non-empty image")
    # timedelta64 is a NumPy "number" that no image library stores (raw TypeErrors in fuse, save, resample).
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool) or arr.dtype.kind == "m":
        raise InvalidInputError(f"voxels must be numeric, got dtype {arr.dtype}",
                                fix="convert the array to a numeric dtype, e.g. array.astype(numpy.float32)")
    if not arr.dtype.isnative:
        # Why: big-endian data (DICOM Explicit VR Big Endian, old Analyze files) is refused by ITK and torch.
        arr = arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _refuse_volume(array: Any) -> None:
    # Why: NumPy makes a 0-d object array of a Volume, and the error said "0 dimension(s) with shape ()".
    if isinstance(array, Volume):
        raise InvalidInputError("voxels were expected but a Volume was given",
                                fix="pass its voxels, vol.array (checked to lie on this grid: same_grid), or use "
                                    "vol.copy() for an independent Volume")
    # Why: np.asarray drops a masked array's mask, so the masked voxels' hidden values were kept and saved.
    if isinstance(array, np.ma.MaskedArray):
        raise InvalidInputError("the voxels are a NumPy masked array, and a Volume has no mask: the masked voxels' "
                                "values would be kept as if valid",
                                fix="fill them first, np.ma.filled(a, fill_value) (e.g. 0 or numpy.nan), or pass "
                                    "the plain data and keep the mask separately (np.ma.getmaskarray(a))")


def _require_volume(other: Any, method: str) -> None:
    """Refuse a non-Volume where a grid is compared (it has no geometry: an AttributeError said only that)."""
    if not isinstance(other, Volume):
        raise InvalidInputError(
            f"{method} compares two Volumes' grids, got a {type(other).__name__}",
            fix="pass a medfuse.Volume (medfuse.load(path) for a file; Volume.from_metatensor, from_sitk or "
                "from_nibabel for a library's image); a bare array has no grid, compare its .shape instead")


def _tolerance(atol: Any) -> float:
    """``atol`` as a non-negative number of mm, or a typed error."""
    return number(atol, "atol", low=0, what="a distance in mm", example="atol=1e-3 (1 micrometre, the default)")


def _points(points: Any, name: str, what: str) -> np.ndarray:
    """``points`` as a float64 ``(..., 3)`` array, or a typed error saying what they must be."""
    try:
        p = np.asarray(_to_numpy(points), dtype=float)
    except (TypeError, ValueError) as e:
        raise InvalidInputError(f"{name} must be numbers, got a {type(points).__name__}",
                                fix=f"pass {what}: a sequence of 3 numbers or an (N, 3) array") from e
    if p.ndim == 0 or p.shape[-1] != 3:
        raise InvalidInputError(f"{name} must have 3 coordinates along its last axis, got shape {p.shape}",
                                fix=f"pass {what}: a sequence of 3 numbers or an (N, 3) array (transpose a (3, N) "
                                    "one)")
    return p


def _checked_affine(affine: Any) -> np.ndarray:
    """A float64 copy of a valid 4x4 affine (see :func:`_check_affine`)."""
    aff = _as_affine(affine)
    _check_affine(aff)
    return aff.copy()


def _unstated_unit(modality: str, array: Any) -> str:
    """The unit of a Volume made without one: ``HU`` for a CT holding values below -100 (air and fat; no other
    CT scale goes there), else ``arbitrary``. Silent: a CT without air gets the percentile normalisation, and the
    fused record's ``auto`` says why."""
    if modality != "CT" or array is None:
        return "arbitrary"
    arr = np.asarray(array)
    try:
        return "HU" if np.issubdtype(arr.dtype, np.number) and arr.size and float(np.nanmin(arr)) < -100 else "arbitrary"
    except (TypeError, ValueError):  # complex or odd voxels: the array check says what is wrong with them
        return "arbitrary"


def _checked_unit(unit: Any) -> str:
    if unit not in UNITS:
        hint = " (a plain 'SUV' is body-weight SUV: 'SUVbw')" if str(unit).upper() == "SUV" else ""
        raise InvalidInputError(f"unknown unit {unit!r}", fix=f"use one of {', '.join(UNITS)}{hint}")
    return unit


def _checked_provenance(provenance: Any) -> Dict[str, Any]:
    """The whitelisted keys of a provenance mapping (``None`` is an empty one)."""
    if provenance is None:
        return {}
    if not isinstance(provenance, Mapping):
        raise InvalidInputError(f"provenance must be a dict, got {type(provenance).__name__}",
                                fix='pass a dict such as {"source": "ct.nii.gz"}, or leave it out')
    # Deep: a shared ``history`` list let ``add_history`` on one Volume edit another's (or the caller's dict).
    return copy.deepcopy({k: v for k, v in provenance.items() if k in _PROVENANCE_KEYS})


def ct_unit(array: np.ndarray, *, stacklevel: int = 2) -> str:
    """The unit of a CT whose unit is stored nowhere: ``HU`` when it holds values below -100, else ``arbitrary``.

    Air and fat lie below -100 HU, and no other CT scale goes there. Otherwise the CT window and the air fill
    outside the field of view would be applied to values that are not HU; a warning says how to state the unit.
    """
    arr = np.asarray(array)
    if np.issubdtype(arr.dtype, np.number) and arr.size and float(np.nanmin(arr)) < -100:
        return "HU"
    warnings.warn("a CT with no unit stored and no value below -100 is not taken as HU: pass unit='HU' if it "
                  "is in Hounsfield units (the CT window and the air outside it then apply)", MedfuseWarning,
                  stacklevel=stacklevel + 1)
    return "arbitrary"


def relabelled(vol: "Volume", modality: Optional[str]) -> "Volume":
    """``vol`` with a caller's ``modality=`` override, applied as :func:`medfuse.load` applies it to a file.

    A volume named CT whose unit is unknown becomes HU when it holds values below -100 (see :func:`ct_unit`):
    the same image as a path and as a loaded Volume then fuses alike. Unknown is ``arbitrary`` where no file
    stated it (``provenance["unit_stated"]`` unset): a unit a reader found in a DICOM header, a medfuse tag or a
    BIDS sidecar is kept, as ``medfuse.load`` keeps it. ``None`` keeps ``vol``.
    """
    if modality is None:
        return vol
    mod = normalise_modality(modality)
    unknown = vol.unit == "arbitrary" and not vol.provenance.get("unit_stated")
    unit = ct_unit(vol.array, stacklevel=3) if mod == "CT" and unknown else vol.unit
    return vol.with_array(vol.array, modality=mod, unit=unit)


#: The modalities a physical unit belongs to (``arbitrary`` belongs to all; ``unknown`` takes every unit).
_UNIT_MODALITIES = {"HU": ("CT",), "SUVbw": ("PT", "NM"), "SUVlbm": ("PT", "NM"), "SUVbsa": ("PT", "NM"),
                    "Bq/mL": ("PT", "NM"), "counts": ("PT", "NM"), "Gy": ("unknown",)}


def _check_pair(modality: Optional[str], unit: Optional[str]) -> None:
    """Refuse a unit that no image of ``modality`` has (a PET in HU, an MR in SUV).

    Why: the unit picks the normalisation and the fill value outside the image, so a mislabelled input changed
    every result without a word.
    """
    owners = _UNIT_MODALITIES.get(unit or "")
    if owners is None or modality in (None, "unknown") or modality in owners:
        return
    owned = "RT dose grids, of modality 'unknown'" if unit == "Gy" else f"{' and '.join(owners)} images"
    raise InvalidInputError(
        f"unit {unit!r} is not a unit of modality {modality!r} (it belongs to {owned})",
        fix="give the image's modality and unit together (Volume(..., modality=M, unit=U), or "
            "vol.with_array(vol.array, modality=M, unit=U)): HU goes with CT; SUVbw, SUVlbm, SUVbsa, Bq/mL and counts "
            "with PT or NM; Gy (an RT dose) with unknown; 'arbitrary' with any modality")


#: Field name -> check run whenever the field is set (in the constructor and afterwards).
_FIELD_CHECKS = {"array": _checked_array, "affine": _checked_affine, "modality": normalise_modality,
                 "unit": _checked_unit, "provenance": _checked_provenance}


@dataclass(eq=False)
class Volume:
    """A 3-D image: voxels, LPS affine, modality, physical unit and provenance.

    Args:
        array: the voxels, shape ``(I, J, K)``, any numeric or bool dtype (complex voxels are kept and saved as
            NIfTI/NRRD (not MetaImage or DICOM); fusion, registration and resampling take real ones only).
        affine: 4×4 voxel-to-world matrix in LPS millimetres.
        modality: (keyword-only) ``MR``, ``CT``, ``PT``, ``NM`` or ``unknown`` (aliases accepted).
        unit: (keyword-only) physical unit, one of :data:`UNITS`. Not given (None): ``arbitrary``, except for a CT
            that holds values below -100, which is ``HU`` (as :func:`medfuse.load` reads such a file).
        provenance: (keyword-only) non-identifying facts about where the data came from; keys medfuse does not
            record are dropped.

    Raises:
        InvalidInputError: the array is not 3-D, empty, not numeric or a masked array (a Volume given as its
            own voxels included), or the modality, unit or provenance is not one medfuse knows.
        GeometryError: the affine is not a finite, invertible 4×4 matrix with perpendicular axes.

    The array is kept by reference, not copied: a read-only or memory-mapped array stays so, and an edit of
    the caller's array shows in the Volume. Only a big-endian array is copied (to native byte order, which ITK
    and torch need). Use :meth:`copy` for an independent volume. The affine is always copied.

    Every field is checked when it is set, in the constructor and afterwards (``v.unit = "SUV"`` raises as
    ``Volume(..., unit="SUV")`` does); an in-place edit (``v.affine[0, 3] += 5``, ``v.array[...] = 0``) is not
    seen. ``vol[10:20, :, ::-1]`` crops, strides or flips with the affine following (:meth:`__getitem__`),
    :meth:`reorient` permutes and flips axes to an orientation code. ``==`` is identity, as for nibabel images:
    compare grids with :meth:`same_grid` and voxels with ``numpy.array_equal(a.array, b.array)``.

    NumPy sees the voxels (:meth:`__array__`): ``np.asarray(vol)`` is ``vol.array`` itself (no copy),
    ``np.mean(vol)`` their mean, and any library that calls ``np.asarray`` gets them. What comes back is a
    plain array, without the geometry; medfuse functions that take Volumes keep it.

    Example:
        >>> import numpy as np
        >>> v = Volume(np.zeros((4, 5, 6)), np.diag([2.0, 2.0, 3.0, 1.0]), modality="CT", unit="HU")
        >>> v.spacing
        (2.0, 2.0, 3.0)
    """

    array: np.ndarray
    affine: np.ndarray
    _: KW_ONLY  # why: the options after the data are named (Volume(a, m, modality="CT")), never positional
    modality: str = "unknown"
    unit: Optional[str] = None  # None: "arbitrary", or for a CT "HU" when it holds air (see __setattr__)
    provenance: Dict[str, Any] = field(default_factory=dict)

    def __setattr__(self, name: str, value: Any) -> None:
        # Why here and not in __post_init__: a field set after construction (``v.unit = "SUV"``,
        # ``v.affine = m``) is checked as the constructor checks it. Unchecked, ``v.unit = "SUV"`` wrote a file
        # that medfuse.load then refused.
        if name == "unit" and value is None:
            # A unit nobody stated: a CT holding air (below -100) is in HU, as medfuse.load reads such a file; the
            # rest "arbitrary". Decided here, once, so that resampling (the -1024 fill), the pipeline and fuse
            # all see one unit; a unit stated ("arbitrary" too) is kept.
            value = _unstated_unit(getattr(self, "modality", "unknown"), getattr(self, "array", None))
        if name in ("array", "affine") and "_field_of_view" in self.__dict__:
            # New voxels or a new grid: where the resampled image had voxels of its own no longer follows.
            del self.__dict__["_field_of_view"]
        check = _FIELD_CHECKS.get(name)
        value = value if check is None else check(value)
        if name == "modality":
            _check_pair(value, getattr(self, "unit", None))
        elif name == "unit":
            _check_pair(getattr(self, "modality", None), value)
        object.__setattr__(self, name, value)

    # ------------------------------------------------------------------ geometry
    @property
    def shape(self) -> Tuple[int, int, int]:
        """``(I, J, K)``, the voxel counts along i, j, k (Python ints)."""
        return tuple(int(s) for s in self.array.shape)  # type: ignore[return-value]

    @property
    def dtype(self) -> np.dtype:
        """The voxels' NumPy dtype."""
        return self.array.dtype

    @property
    def ndim(self) -> int:
        """3 (as ``array.ndim``): libraries that read ``shape`` and ``dtype`` off an array-like read it too."""
        return 3

    @property
    def size(self) -> int:
        """The number of voxels (as ``array.size``)."""
        return int(self.array.size)

    @property
    def spacing(self) -> Tuple[float, float, float]:
        """Voxel size in mm along i, j, k."""
        return tuple(float(s) for s in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    @property
    def origin(self) -> Tuple[float, float, float]:
        """World (LPS) position of voxel (0, 0, 0)'s centre."""
        return tuple(float(x) for x in self.affine[:3, 3])  # type: ignore[return-value]

    @property
    def direction(self) -> np.ndarray:
        """3×3 matrix whose columns are the unit LPS directions of i, j, k."""
        return self.affine[:3, :3] / np.asarray(self.spacing)[None, :]

    @property
    def affine_ras(self) -> np.ndarray:
        """The same affine in RAS (NIfTI/nibabel/MONAI convention)."""
        return LPS_TO_RAS @ self.affine

    @property
    def orientation(self) -> str:
        """Three-letter code of the world directions i, j, k point to (e.g. ``"LPS"`` or ``"RAI"``).

        The letters say where each axis goes *to*, as ITK's ``DICOMOrientImageFilter`` and nibabel's
        ``aff2axcodes`` name them (an identity LPS affine is ``"LPS"``). An oblique axis takes the nearest world
        axis; each world axis is used once (the largest cosine is matched first), so a strongly oblique grid
        never gets a code such as ``"LLS"``.
        """
        letters = (("L", "R"), ("P", "A"), ("S", "I"))
        d = self.direction
        free = np.abs(d)
        code = [""] * 3
        for _ in range(3):
            world, axis = np.unravel_index(int(np.argmax(free)), free.shape)
            code[axis] = letters[world][0] if d[world, axis] > 0 else letters[world][1]
            free[world, :] = -1.0
            free[:, axis] = -1.0
        return "".join(code)

    @property
    def is_oblique(self) -> bool:
        """True when a voxel axis is not parallel to a world axis (beyond 1e-4)."""
        d = np.abs(self.direction)
        return bool(np.any((d > 1e-4) & (d < 1 - 1e-4)))

    def index_to_world(self, ijk: Any) -> np.ndarray:
        """Map voxel indices to world positions (LPS mm).

        Args:
            ijk: one index ``(i, j, k)`` or an array of them, shape ``(..., 3)``; fractional indices allowed.

        Returns:
            float64 array of the same shape: the LPS positions in mm.

        Raises:
            InvalidInputError: not numbers, or the last axis does not have length 3.
        """
        p = _points(ijk, "ijk", "voxel indices (i, j, k)")
        return p @ self.affine[:3, :3].T + self.affine[:3, 3]

    def world_to_index(self, xyz: Any) -> np.ndarray:
        """Map world positions (LPS mm) to fractional voxel indices.

        Args:
            xyz: one LPS position ``(x, y, z)`` in mm or an array of them, shape ``(..., 3)``.

        Returns:
            float64 array of the same shape: the (fractional) indices ``(i, j, k)``.

        Raises:
            InvalidInputError: not numbers, or the last axis does not have length 3.
        """
        p = _points(xyz, "xyz", "LPS positions (x, y, z) in mm")
        inv = np.linalg.inv(self.affine)
        return p @ inv[:3, :3].T + inv[:3, 3]

    @property
    def center(self) -> np.ndarray:
        """World (LPS) position of the grid's centre."""
        return self.index_to_world((np.asarray(self.shape) - 1) / 2.0)

    def _corners(self, *, edges: bool = False) -> np.ndarray:
        """The 8 corner indices (8, 3) of the grid: voxel centres, or the voxels' outer edges."""
        lo = -0.5 if edges else 0.0
        hi = np.asarray(self.shape, dtype=float) - (0.5 if edges else 1.0)
        return np.array([[a, b, c] for a in (lo, hi[0]) for b in (lo, hi[1]) for c in (lo, hi[2])])

    def bounds(self, *, edges: bool = False) -> Tuple[np.ndarray, np.ndarray]:
        """Axis-aligned world (LPS mm) bounding box ``(min, max)`` of the grid.

        Args:
            edges: False (default) for the box of the voxel *centres*; True for the box of the voxels' outer
                edges (half a voxel further out: the extent an image covers, e.g. for a display field of view).

        Returns:
            ``(min, max)``, two (3,) arrays of LPS mm.
        """
        w = self.index_to_world(self._corners(edges=edges))
        return w.min(axis=0), w.max(axis=0)

    def max_voxel_distance(self, other: "Volume") -> float:
        """Largest distance in mm between the world positions the two affines give one voxel index.

        Taken over the grid's corners (an affine map's largest difference lies there), so that a tiny
        rotation, which moves far voxels most, counts as much as a shift of the origin.

        Args:
            other: the Volume whose affine is compared (its shape is not: this grid's corners are used).

        Returns:
            The distance in mm (0.0 for the same affine).

        Raises:
            InvalidInputError: ``other`` is not a Volume.
        """
        _require_volume(other, "max_voxel_distance")
        c = self._corners()
        return float(np.max(np.linalg.norm(self.index_to_world(c) - other.index_to_world(c), axis=1)))

    def same_grid(self, other: "Volume", *, atol: float = 1e-3) -> bool:
        """True when ``other`` has the same shape and every voxel centre is within ``atol`` mm of this grid's.

        The default (1 µm) takes in float32 round-off of a NIfTI header (origins of 1000 mm included) and
        refuses a shift of a tenth of a voxel (voxels of 0.01 mm and more) or a rotation that moves the far
        corner that much.

        Args:
            other: the Volume to compare with.
            atol: (keyword-only) the tolerance in mm.

        Returns:
            True when the grids are the same.

        Raises:
            InvalidInputError: ``other`` is not a Volume (for an array, compare its ``.shape``).
        """
        _require_volume(other, "same_grid")
        return self.shape == other.shape and self.max_voxel_distance(other) <= _tolerance(atol)

    def grid_difference(self, other: "Volume", *, atol: float = 1e-3) -> str:
        """How ``other``'s grid differs from this one, in words (``""`` when it is the same grid).

        Error messages use it: two grids of one shape and spacing can still differ by a flipped axis or a
        shifted origin, and "a different grid" alone does not say which.

        Args:
            other: the Volume to compare with.
            atol: (keyword-only) the tolerance in mm, as :meth:`same_grid` takes it.

        Returns:
            The differences joined by "; " (shape, spacing, orientation or rotation, origin), or ``""``.

        Raises:
            InvalidInputError: ``other`` is not a Volume.
        """
        _require_volume(other, "grid_difference")
        atol = _tolerance(atol)
        parts = []
        if self.shape != other.shape:
            parts.append(f"shape {other.shape} against {self.shape}")
        sp_a, sp_b = np.asarray(self.spacing), np.asarray(other.spacing)
        if not np.allclose(sp_a, sp_b, atol=atol):
            parts.append(f"spacing {tuple(round(float(s), 3) for s in sp_b)} mm against "
                         f"{tuple(round(float(s), 3) for s in sp_a)} mm")
        if not np.allclose(self.direction, other.direction, atol=1e-4):
            if other.orientation != self.orientation:
                parts.append(f"orientation {other.orientation} against {self.orientation} (an axis is flipped "
                             "or permuted)")
            else:
                deg = rotation_angle_deg(self.direction.T @ other.direction)
                far = ""
                if self.shape == other.shape:  # what the rotation does where it matters most
                    far = f", voxel centres up to {self.max_voxel_distance(other):.3g} mm apart"
                parts.append(f"axes rotated by {deg:.2g} degrees{far}")
        shift = float(np.linalg.norm(self.affine[:3, 3] - other.affine[:3, 3]))
        if shift > atol:
            parts.append(f"origin {shift:.3g} mm away")
        if not parts and not self.same_grid(other, atol=atol):
            parts.append(f"voxel centres up to {self.max_voxel_distance(other):.3g} mm apart (tolerance {atol:g} mm)")
        return "; ".join(parts)

    # ------------------------------------------------------------------ NumPy
    def __array__(self, dtype: Any = None, copy: Optional[bool] = None) -> np.ndarray:
        """The voxels for NumPy (``np.asarray(vol)``, ``np.mean(vol)``), without the geometry.

        Follows NumPy 2's protocol: with ``copy=None`` (``np.asarray``) the voxels are :attr:`array` itself
        when no conversion is needed, so an edit of the result edits the Volume; ``copy=True``
        (``np.array``) always copies.

        Args:
            dtype: the dtype wanted (``None``: the voxels' own).
            copy: ``True`` always copies, ``None`` copies only to change the dtype, ``False`` never copies.

        Returns:
            A NumPy array of shape :attr:`shape`.

        Raises:
            InvalidInputError: (a ``ValueError``) ``copy=False`` with a ``dtype`` that needs a copy.
        """
        arr = self.array
        if dtype is not None and np.dtype(dtype) != arr.dtype:
            if copy is False:
                raise InvalidInputError(
                    f"the voxels are {arr.dtype}, so a {np.dtype(dtype)} array of them needs a copy, "
                    "which copy=False forbids",
                    fix=f"pass copy=None (numpy.asarray(vol, dtype=...)), or use vol.array, which is {arr.dtype}")
            return arr.astype(dtype)
        return arr.copy() if copy else arr

    # ------------------------------------------------------------------ indexing and orientation
    #: Not iterable: ``for plane in volume`` would silently drop the geometry. Iterate ``volume.array``.
    __iter__ = None

    def __getitem__(self, index: Any) -> "Volume":
        """A sub-grid (crop, stride or flip) as a Volume: ``vol[10:20, :, ::-1]``.

        Only slices (and ``...``) are taken, as SimpleITK's ``image[...]`` and nibabel's ``img.slicer[...]``
        take them, and the affine moves with them: every kept voxel keeps its world position (the origin moves
        to the first kept voxel, a step of 2 doubles that axis' spacing, a negative step flips the axis).
        The voxels are a view of this Volume's (NumPy slicing); ``.copy()`` makes them independent.

        Raises:
            InvalidInputError: an integer, array or mask index (it would drop an axis or the grid), more than
                three indices, or a slice that selects no voxel.
        """
        key = index if isinstance(index, tuple) else (index,)
        n_ellipsis = sum(k is Ellipsis for k in key)
        if n_ellipsis > 1:
            raise InvalidInputError("an index can only have a single ellipsis ('...')", fix="use at most one '...'")
        if n_ellipsis:
            at = next(n for n, k in enumerate(key) if k is Ellipsis)
            key = key[:at] + (slice(None),) * (4 - len(key)) + key[at + 1:]
        if len(key) > 3:
            raise InvalidInputError(f"a Volume has 3 axes but the index has {len(key)}",
                                    fix="index with at most three slices, e.g. vol[10:20, :, 5:9]")
        key = key + (slice(None),) * (3 - len(key))
        starts, steps = [], []
        for axis, (k, n) in enumerate(zip(key, self.shape)):
            if not isinstance(k, slice):
                raise InvalidInputError(
                    f"a Volume is indexed with slices only, got {type(k).__name__} on axis {axis}: an integer "
                    "would drop the axis (a Volume is 3-D) and an array or mask has no grid",
                    fix="use a one-voxel slab (vol[5:6] rather than vol[5]), or index the bare voxels, "
                        "vol.array[...], which have no geometry")
            try:
                start, stop, step = k.indices(n)
            except (TypeError, ValueError) as e:
                raise InvalidInputError(f"axis {axis}: {e}",
                                        fix="use integer slice bounds and a non-zero step") from e
            if len(range(start, stop, step)) == 0:
                raise InvalidInputError(f"the index selects no voxel along axis {axis} (size {n}, {k})",
                                        fix=f"choose bounds within 0..{n - 1}")
            starts.append(start)
            steps.append(step)
        affine = self.affine.copy()
        affine[:3, :3] = self.affine[:3, :3] * np.asarray(steps, dtype=float)[None, :]
        affine[:3, 3] = self.index_to_world(np.asarray(starts, dtype=float))
        return Volume(self.array[key], affine, modality=self.modality, unit=self.unit,
                      provenance=copy.deepcopy(self.provenance))

    def reorient(self, axcodes: str) -> "Volume":
        """The same image with its voxel axes pointing to ``axcodes`` (e.g. ``"RAS"``, ``"LPS"``).

        The counterpart of nibabel's ``as_closest_canonical`` (``vol.reorient("RAS")``), SimpleITK's
        ``DICOMOrient`` and MONAI's ``Orientation``: axes are only permuted and flipped (no interpolation), so
        every voxel keeps its value and its world position; afterwards :attr:`orientation` is ``axcodes``. An
        oblique grid stays oblique (each axis goes to its nearest world direction, as :attr:`orientation` names
        it). The voxels are a view of this Volume's; ``.copy()`` makes them independent.

        Args:
            axcodes: three letters, one of L/R, one of P/A and one of S/I, naming where i, j and k point to.

        Returns:
            A new Volume (same modality, unit and provenance) whose :attr:`orientation` is ``axcodes``.

        Raises:
            InvalidInputError: ``axcodes`` is not such a code.
        """
        from nibabel.orientations import apply_orientation, axcodes2ornt, inv_ornt_aff, ornt_transform

        code = str(axcodes).upper()
        pairs = ("LR", "PA", "SI")
        if len(code) != 3 or sorted(next((n for n, p in enumerate(pairs) if c in p), 9) for c in code) != [0, 1, 2]:
            raise InvalidInputError(f"{axcodes!r} is not an orientation code",
                                    fix="give three letters, one of L/R, one of P/A and one of S/I, e.g. 'RAS' "
                                        "or 'LPS'")
        transform = ornt_transform(axcodes2ornt(tuple(self.orientation)), axcodes2ornt(tuple(code)))
        array = apply_orientation(self.array, transform)
        # inv_ornt_aff works in either world convention: it only reorders and flips the voxel axes.
        affine = self.affine @ inv_ornt_aff(transform, self.shape)
        return Volume(array, affine, modality=self.modality, unit=self.unit, provenance=copy.deepcopy(self.provenance))

    # ------------------------------------------------------------------ copies
    def with_array(self, array: np.ndarray, *, modality: Optional[str] = None, unit: Optional[str] = None,
                   provenance: Optional[Mapping[str, Any]] = None) -> "Volume":
        """A new Volume on the same grid with other voxels (and optionally other modality/unit).

        The unit is kept unless ``unit=`` changes it: after a rescale (to 0..1, z-scores) pass
        ``unit="arbitrary"``. A CT still labelled HU after scaling to 0..1 is windowed as HU by
        :func:`medfuse.fuse` (``normalise="auto"``), which maps it to one flat grey.

        Args:
            array: the new voxels, of this Volume's shape (a NumPy array, or a torch tensor: one on a GPU is
                copied to the CPU; a CPU tensor's memory is shared, as a NumPy array's is).
            modality: (keyword-only) the new modality; None keeps this one.
            unit: (keyword-only) the new unit; None keeps this one.
            provenance: (keyword-only) the new provenance; None keeps a copy of this one.

        Returns:
            A new Volume with a copy of this affine; the voxels are ``array`` itself where NumPy need not copy.

        Raises:
            InvalidInputError: ``array`` is a Volume (pass ``vol.array``) or a masked array, or has another
                shape, or an unknown modality or unit.
        """
        _refuse_volume(array)
        arr = _to_numpy(array)
        if arr.shape != self.array.shape:
            raise InvalidInputError(
                f"the new array has shape {arr.shape} but the volume's grid is {self.array.shape}",
                fix="resample the data onto this grid first (medfuse.resample)",
            )
        return Volume(arr, self.affine.copy(), modality=self.modality if modality is None else modality,
                      unit=self.unit if unit is None else unit,
                      provenance=copy.deepcopy(self.provenance) if provenance is None else provenance)

    def __copy__(self) -> "Volume":
        """``copy.copy``: the voxels are shared (a shallow copy), the affine and provenance are not (a shared
        history list let ``add_history`` on the copy edit the original's)."""
        return self._keep_view(Volume(self.array, self.affine.copy(), modality=self.modality, unit=self.unit,
                                      provenance=self.provenance))  # the constructor deep-copies provenance

    def _no_arithmetic(self, *_: Any) -> Any:
        # Why: a Python TypeError ("unsupported operand") said nothing of what to do; geometry and unit cannot
        # follow arithmetic silently (vol * 2 of a CT is no longer HU).
        raise TypeError("a medfuse Volume does not take arithmetic or comparison operators: use "
                        "vol.with_array(vol.array * 2, unit='arbitrary') for a Volume on the same grid, or "
                        "np.asarray(vol) * 2 (vol.array) for plain voxels")

    __add__ = __radd__ = __sub__ = __rsub__ = __mul__ = __rmul__ = __truediv__ = __rtruediv__ = _no_arithmetic
    __floordiv__ = __rfloordiv__ = __mod__ = __rmod__ = __pow__ = __rpow__ = __matmul__ = __rmatmul__ = _no_arithmetic
    __neg__ = __pos__ = __abs__ = __lt__ = __le__ = __gt__ = __ge__ = _no_arithmetic

    def __eq__(self, other: Any) -> Any:
        # Equality is identity (a Volume is a mutable object), but ``mask = vol == 0`` was silently False where
        # ``vol > 0`` raised: against a number or an array it is refused like the other comparisons.
        if isinstance(other, (numbers.Number, np.generic, np.ndarray)):
            self._no_arithmetic()
        return NotImplemented

    def __ne__(self, other: Any) -> Any:
        if isinstance(other, (numbers.Number, np.generic, np.ndarray)):
            self._no_arithmetic()
        return NotImplemented

    __hash__ = object.__hash__

    def copy(self) -> "Volume":
        """An independent Volume: voxels, affine and provenance copied.

        Returns:
            The copy (its array is writable even where this one is read-only or memory-mapped).
        """
        return self._keep_view(Volume(self.array.copy(), self.affine.copy(), modality=self.modality, unit=self.unit,
                                      provenance=copy.deepcopy(self.provenance)))

    def _keep_view(self, other: "Volume") -> "Volume":
        """``other`` (a copy of this Volume's voxels on its grid) with this one's field of view, if it has one: a
        copy fused alike (copy() and copy.copy dropped it, deepcopy and pickle kept it)."""
        view = self.__dict__.get("_field_of_view")
        if view is not None:
            object.__setattr__(other, "_field_of_view", view)
        return other

    def add_history(self, step: str, **params: Any) -> "Volume":
        """Append a processing step to the provenance history (in place).

        Args:
            step: the step's name (e.g. ``"resample"``).
            **params: its settings, recorded beside it (no patient identifiers).

        Returns:
            This Volume (so that calls chain).
        """
        self.provenance.setdefault("history", []).append({"step": step, **params})
        return self

    def __repr__(self) -> str:
        sp = "x".join(f"{s:.3g}" for s in self.spacing)
        org = ", ".join(mm_text(o, self.spacing) for o in self.origin)
        return (
            f"Volume(shape={self.shape}, spacing={sp} mm, origin=({org}) LPS, orientation={self.orientation}, "
            f"modality={self.modality}, unit={self.unit}, dtype={self.array.dtype})"
        )

    # ------------------------------------------------------------------ SimpleITK
    def to_sitk(self):
        """Convert to a ``SimpleITK.Image`` (geometry exact; voxels copied, never shared with this Volume).

        ITK has no bool, float16 or long double pixels: they become uint8, float32 (exact) and float64.
        Modality and unit go into the image's metadata (``medfuse_modality``, ``medfuse_unit``, the keys
        :func:`medfuse.save` writes to MetaImage/NRRD files), where :meth:`from_sitk` finds them.
        """
        import SimpleITK as sitk

        arr = _bridge_dtype(np.transpose(self.array, (2, 1, 0)))
        img = sitk.GetImageFromArray(np.ascontiguousarray(arr))  # GetImageFromArray copies
        img.SetSpacing(self.spacing)
        img.SetOrigin(self.origin)
        img.SetDirection(tuple(float(x) for x in self.direction.ravel()))
        img.SetMetaData("medfuse_modality", self.modality)
        img.SetMetaData("medfuse_unit", self.unit)
        from .io.nifti import lbm_formula

        if lbm_formula(self) is not None:  # as medfuse.save writes it (an SUVlbm's formula)
            img.SetMetaData("medfuse_suv", lbm_formula(self))
        return img

    @classmethod
    def from_sitk(cls, image, *, modality: Optional[str] = None, unit: Optional[str] = None,
                  provenance: Optional[dict] = None) -> "Volume":
        """Build a Volume from a 3-D scalar ``SimpleITK.Image`` (geometry exact; voxels copied).

        ``modality`` and ``unit`` default to the image's ``medfuse_modality``/``medfuse_unit`` metadata
        (set by :meth:`to_sitk` and by MetaImage/NRRD files medfuse wrote), else ``unknown``/``arbitrary``.

        Args:
            image: a 3-D scalar ``SimpleITK.Image``.
            modality: (keyword-only) the modality; None takes the one in the image's metadata, else ``unknown``.
            unit: (keyword-only) the unit; None takes the one in the image's metadata, else ``arbitrary``.
            provenance: (keyword-only) non-identifying facts to record (see :class:`Volume`).

        Returns:
            The Volume (voxels copied; spacing, origin and direction exact).

        Raises:
            InvalidInputError: not a SimpleITK image, not 3-D, several components, or a label map.
        """
        import SimpleITK as sitk

        if not isinstance(image, sitk.Image):
            raise InvalidInputError(
                f"from_sitk takes a SimpleITK.Image, got {type(image).__name__}",
                fix="read the file with medfuse.load(path) (or SimpleITK.ReadImage), or use Volume.from_nibabel "
                    "for a nibabel image and Volume(array, affine_lps) for a NumPy array")
        if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
            raise InvalidInputError(
                f"expected a 3-D scalar SimpleITK image, got {image.GetDimension()}-D with "
                f"{image.GetNumberOfComponentsPerPixel()} component(s)",
                fix="add a slice axis to a 2-D image (SimpleITK.JoinSeries(image))" if image.GetDimension() == 2
                else "extract a single 3-D scalar volume first (SimpleITK.Extract, or VectorIndexSelectionCast "
                     "for one component)",
            )
        if "label" in image.GetPixelIDTypeAsString():
            # Why: SimpleITK's GetArrayFromImage aborts the whole Python process on a label map (C++ terminate).
            raise InvalidInputError("the SimpleITK image is a label map, which has no voxel array",
                                    fix="convert it first: SimpleITK.LabelMapToLabel(image)")
        arr = np.transpose(sitk.GetArrayFromImage(image), (2, 1, 0))
        aff = affine_from_geometry(image.GetSpacing(), image.GetOrigin(), image.GetDirection())
        meta = lambda k: image.GetMetaData(k).strip() if image.HasMetaDataKey(k) else None  # noqa: E731
        modality, unit = _stored_labels(modality, unit, meta("medfuse_modality"), meta("medfuse_unit"),
                                        "metadata (medfuse_modality, medfuse_unit)", "from_sitk")
        prov = dict(provenance or {})
        _record_lbm_formula(prov, unit, meta("medfuse_unit"), meta("medfuse_suv"))
        return cls(arr, aff, modality=modality, unit=unit, provenance=prov)

    # ------------------------------------------------------------------ nibabel
    def to_nibabel(self):
        """Convert to a ``nibabel.Nifti1Image`` with sform and qform set (RAS affine; voxels copied); a
        ``Nifti2Image`` when an axis has more than 32767 voxels, which a NIfTI-1 header cannot hold.

        Both codes are the recorded ``provenance["nifti_space"]`` (an MNI template stays "mni"), else 1 (scanner).
        ``image.affine`` is this Volume's exact float64 affine (the header keeps float32, as a file does).
        NIfTI has no bool, float16 or long double voxels: they become uint8, float32 (exact) and float64.
        Modality and unit go into ``descrip`` (``"medfuse modality=PT unit=SUVbw"``), as :func:`medfuse.save`
        writes them.
        """
        import nibabel as nib

        from .io.nifti import format_tag, lbm_formula, nifti_space_code

        code = nifti_space_code(self)
        # A copy: an edit of the image's data (img.get_fdata()[...] = 0) must not change this Volume.
        arr = np.array(_bridge_dtype(self.array), copy=True)
        # NIfTI-1 keeps each size as int16: nibabel's own error for a longer axis was a raw HeaderDataError.
        cls = nib.Nifti2Image if max(self.shape) > 32767 else nib.Nifti1Image
        img = cls(arr, self.affine_ras, dtype=arr.dtype)  # dtype: nibabel refuses int64 otherwise
        # On the header, not the image: Nifti1Image.set_sform would round image.affine to float32.
        img.header.set_sform(self.affine_ras, code=code)
        img.header.set_qform(self.affine_ras, code=code)
        img.header.set_xyzt_units("mm", "sec")
        # Modality and unit as medfuse.save writes them, so that nibabel.save(vol.to_nibabel(), f) keeps them.
        img.header["descrip"] = format_tag(self.modality, self.unit, suv=lbm_formula(self)).encode("ascii")[:79]
        return img

    @classmethod
    def from_nibabel(cls, image, *, modality: Optional[str] = None, unit: Optional[str] = None,
                     provenance: Optional[dict] = None) -> "Volume":
        """Build a Volume from a nibabel spatial image (3-D, or 4-D with one volume).

        Voxels of an image held in memory are copied; a file-backed image's are read (memory-mapped where
        nibabel maps them, copy-on-write, so that the file is never changed). A header's spatial unit of metres
        or microns is converted to mm, as :func:`medfuse.load` converts it.

        A header whose geometry is a guess (an Analyze image, a NIfTI with both form codes 0) or ambiguous (an
        sform and a qform placing the grid apart) gives the :class:`~medfuse.errors.MedfuseWarning`
        :func:`medfuse.load` gives for the file.

        ``modality`` and ``unit`` default to the ones in a NIfTI ``descrip`` medfuse wrote (:meth:`to_nibabel`,
        :func:`medfuse.save`), else ``unknown``/``arbitrary``. A NIfTI image's space (sform code, else qform
        code) is recorded as ``provenance["nifti_space"]`` unless ``provenance`` names one, and the file it was read
        from (``get_filename()``) as ``provenance["source"]``, so that :func:`medfuse.save` never writes over it.

        Args:
            image: a nibabel spatial image (``Nifti1Image``, ``Nifti2Image``, ``MGHImage``...).
            modality: (keyword-only) the modality; None takes the one medfuse wrote in the header, else ``unknown``.
            unit: (keyword-only) the unit; None takes the one medfuse wrote in the header, else ``arbitrary``.
            provenance: (keyword-only) non-identifying facts to record (see :class:`Volume`).

        Returns:
            The Volume (voxels copied or memory-mapped copy-on-write; the affine in LPS mm).

        Raises:
            InvalidInputError: not a nibabel image, or not one 3-D volume.
            GeometryError: the image has no usable affine.
        """
        from .io.nifti import (ANALYZE_NOTE, NO_FORM_NOTE, _qform_instead, _space_name, form_gap_note,
                               parse_lbm_formula, parse_tag)

        if not (hasattr(image, "dataobj") and hasattr(image, "affine") and hasattr(image, "header")):
            raise InvalidInputError(
                f"from_nibabel takes a nibabel image, got {type(image).__name__}",
                fix="read the file with medfuse.load(path) (or nibabel.load), or use Volume.from_sitk for a "
                    "SimpleITK image and Volume(array, affine_lps) for a NumPy array")
        if image.affine is None:
            raise GeometryError("the nibabel image has no affine, so its voxels have no place in the world",
                                fix="build it with one: nibabel.Nifti1Image(data, affine_ras)")
        hdr = image.header
        in_memory = isinstance(image.dataobj, np.ndarray)
        arr = np.asanyarray(image.dataobj)
        if in_memory:  # the image's own array: copied, so that the two do not change each other
            arr = np.array(arr, copy=True)
        if arr.ndim == 4 and arr.shape[3] == 1:
            arr = arr[..., 0]
        aff = np.asarray(image.affine, dtype=float)
        xyz_unit = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "unknown"
        to_mm = {"meter": 1000.0, "micron": 0.001}.get(xyz_unit, 1.0)
        aff = np.diag([to_mm, to_mm, to_mm, 1.0]) @ aff  # medfuse's world is in mm
        # What medfuse.load says of the same header (its checks that re-read the file are left to it).
        from nibabel.analyze import AnalyzeHeader

        if isinstance(hdr, AnalyzeHeader) and "sform_code" not in hdr:  # NIfTI headers are Analyze ones too
            warnings.warn(f"an Analyze 7.5 nibabel image {ANALYZE_NOTE}", MedfuseWarning, stacklevel=user_stacklevel())
        elif "sform_code" in hdr and int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
            warnings.warn(f"the nibabel image has a header {NO_FORM_NOTE}", MedfuseWarning,
                          stacklevel=user_stacklevel())
        # A sheared sform beside a valid qform: the qform, with load's warning (the sform was refused here, a
        # file medfuse.load reads).
        qform = _qform_instead(hdr, LPS_TO_RAS @ aff, to_mm, "the nibabel image") if "sform_code" in hdr else None
        if qform is not None:
            aff = LPS_TO_RAS @ qform
        gap = None if qform is not None else form_gap_note(hdr, arr.shape[:3], to_mm)
        if gap is not None:
            warnings.warn(f"the nibabel image's header geometry is ambiguous: {gap}. medfuse uses nibabel's affine "
                          "(the sform when its code is above 0); check the image's position, and re-save it with "
                          "medfuse.save so that every tool reads one geometry", MedfuseWarning,
                          stacklevel=user_stacklevel())
        descrip = hdr["descrip"].item().decode("latin-1", "ignore") if "descrip" in hdr else ""
        tag_mod, tag_unit = parse_tag(descrip)
        prov = dict(provenance or {})
        space = _space_name(hdr, "qform" if qform is not None else None)
        if space is not None:
            prov.setdefault("nifti_space", space)
        _record_source(prov, image.get_filename() if callable(getattr(image, "get_filename", None)) else None)
        modality, unit = _stored_labels(modality, unit, tag_mod, tag_unit, "header (descrip)", "from_nibabel")
        _record_lbm_formula(prov, unit, tag_unit, parse_lbm_formula(descrip))
        return cls(arr, LPS_TO_RAS @ aff, modality=modality, unit=unit, provenance=prov)

    # ------------------------------------------------------------------ MONAI
    def to_metatensor(self):
        """Convert to a channel-first MONAI ``MetaTensor`` (shape ``(1, I, J, K)``, RAS affine in meta; voxels copied).

        bool voxels become uint8 and long double float64 (torch has none); uint16 becomes int32 and uint32 and
        uint64 int64 (torch's unsigned types beyond uint8 lack max, min, abs, sum...), values unchanged, with
        the original dtype in the meta's ``medfuse_dtype`` so that :meth:`from_metatensor` gives it back; a
        uint64 volume with values above int64's range is refused. Other dtypes are kept.

        The meta holds what MONAI's own NIfTI reader puts there and medfuse needs back: ``affine`` and
        ``original_affine`` (RAS), ``space`` (``"RAS"``), ``spatial_shape``, ``original_channel_dim`` (NaN, MONAI's
        "no channel", as its NIfTI reader stores it: a Volume has none; the channel axis is added here, as
        ``LoadImage(ensure_channel_first=True)`` adds it, so do not put an ``EnsureChannelFirst`` after), medfuse's
        ``modality`` and ``unit``, ``filename_or_obj`` (the recorded source, which ``SaveImage`` names its output
        after) and, for a volume with a recorded ``provenance["nifti_space"]``, that name plus the NIfTI
        ``sform_code``/``qform_code`` MONAI's nibabel reader gives (e.g. 4 for an MNI template). MONAI's
        writers ignore these codes and always write 1; :func:`medfuse.save` of :meth:`from_metatensor`'s
        Volume keeps them.

        Raises:
            MissingDependencyError: MONAI (or torch) is not installed.
            InvalidInputError: uint64 voxels too large for int64.
        """
        try:
            import torch
            from monai.data import MetaTensor
        except ImportError as e:  # pragma: no cover - depends on the environment
            raise MissingDependencyError.for_package("monai", "MetaTensor conversion", "ml") from e

        arr = self.array.astype(np.uint8) if self.array.dtype == bool else self.array
        arr = _double(arr)  # torch has no long double
        stored = arr.dtype
        arr = _torch_int(arr)
        affine = torch.as_tensor(self.affine_ras, dtype=torch.float64)
        meta = {
            "original_affine": torch.as_tensor(self.affine_ras, dtype=torch.float64),
            "space": "RAS",
            "modality": self.modality,
            "unit": self.unit,
            # Tensors, not NumPy arrays, in the meta: MONAI's PersistentDataset reloads its cache with
            # torch.load(weights_only=True), which refuses NumPy arrays (the cache was recomputed on every read).
            "spatial_shape": torch.as_tensor(np.asarray(self.shape)),
            # "No channel", as MONAI's readers say of a channel-less image. 0 made SaveImage, once it had squeezed
            # the channel, count two spatial axes and fail on every coronal or sagittal volume ("cannot find a
            # suitable writer": a 2-D resampling with a singular 2x2 affine).
            "original_channel_dim": float("nan"),
        }
        # Always set (not only when widened): MONAI's collate needs the same meta keys in every item of a batch.
        meta["medfuse_dtype"] = stored.name  # from_metatensor narrows a widened dtype back where values still fit
        if isinstance(self.provenance.get("source"), str):  # MONAI's SaveImage names its output after it
            meta["filename_or_obj"] = self.provenance["source"]
        # All the files a fused image came from, as JSON text (one string collates in a batch; a list would not):
        # from_metatensor gives them back, and medfuse.save then refuses to write over any of them, not only
        # the first input that ``filename_or_obj`` names. Always set, for collate, as medfuse_dtype.
        meta["medfuse_sources"] = json.dumps([s for s in self.provenance.get("sources") or [] if isinstance(s, str)])
        if "nifti_space" in self.provenance:  # so that a template space survives MONAI transforms
            from .io.nifti import nifti_space_code

            code = nifti_space_code(self)  # int16, as MONAI's NibabelReader gives it (but a tensor: see above)
            meta.update(nifti_space=self.provenance["nifti_space"], sform_code=torch.tensor(code, dtype=torch.int16),
                        qform_code=torch.tensor(code, dtype=torch.int16))
        # A copy: an in-place edit of the tensor (t[t < 0] = 0, t.clamp_()) must not change this Volume.
        return MetaTensor(torch.from_numpy(np.array(arr, order="C", copy=True))[None], affine=affine, meta=meta)

    @classmethod
    def from_metatensor(cls, tensor, *, modality: Optional[str] = None, unit: Optional[str] = None, provenance: Optional[dict] = None) -> "Volume":
        """Build a Volume from a MONAI ``MetaTensor`` of shape ``(1, I, J, K)`` or ``(I, J, K)`` (voxels copied).

        The affine is the tensor's, in the meta's ``space`` (MONAI's default RAS, or LPS). The NIfTI space
        (``provenance["nifti_space"]``) is taken from the meta's ``nifti_space`` (written by
        :meth:`to_metatensor`), else from the ``sform_code`` (else ``qform_code``) MONAI's nibabel reader
        copies from the file header. Unsigned voxels :meth:`to_metatensor` widened for torch (meta
        ``medfuse_dtype``) come back in their dtype while they are integers that fit it. The meta's
        ``filename_or_obj``, when it names an existing file, becomes ``provenance["source"]`` (never written over).

        Args:
            tensor: a MONAI ``MetaTensor`` of one image, ``(1, I, J, K)`` or ``(I, J, K)``, on any device.
            modality: (keyword-only) the modality; None takes the one in the tensor's meta, else ``unknown``.
            unit: (keyword-only) the unit; None takes the one in the tensor's meta, else as a Volume made
                without one (``HU`` for a CT holding values below -100, else ``arbitrary``).
            provenance: (keyword-only) non-identifying facts to record (see :class:`Volume`).

        Returns:
            The Volume (voxels copied; the affine in LPS mm).

        Raises:
            InvalidInputError: not a MetaTensor (no affine), a batch, several channels, channel-last data, a
                2-D image (``(1, H, W)`` with a 2-D ``spatial_shape``, or a 3x3 affine: add a slice axis,
                ``tensor.unsqueeze(-1)``), an affine that is not 4x4, or a meta ``space`` other than RAS or LPS.
        """
        if isinstance(tensor, Volume):
            # Why: NumPy reads a Volume's voxels, and its LPS affine was then taken for a RAS one (flipped x, y).
            raise InvalidInputError("from_metatensor takes a MONAI MetaTensor, got a Volume",
                                    fix="use the Volume as it is, or vol.copy() for an independent one")
        meta = getattr(tensor, "meta", None)
        meta = meta if isinstance(meta, dict) else {}
        raw_aff = getattr(tensor, "affine", None)
        if raw_aff is None:
            raw_aff = meta.get("affine")
        if raw_aff is None or not hasattr(tensor, "shape"):
            raise InvalidInputError(
                f"a {type(tensor).__name__} carries no affine: a Volume needs the image's geometry",
                fix="pass a MONAI MetaTensor (e.g. from LoadImage(image_only=True)), or build "
                "Volume(array, affine_lps) from the array and its voxel-to-world matrix")
        if (len(tensor.shape) == 5 and tuple(tensor.shape[:2]) == (1, 1) and not getattr(tensor, "is_batch", False)
                and np.ndim(_to_numpy(raw_aff)) == 2):
            # to_metatensor's tensors are channel-first already but say "no channel" (as MONAI's readers do):
            # an EnsureChannelFirst after them adds a second axis.
            raise InvalidInputError(
                f"the MetaTensor has two leading axes of 1 (shape {tuple(tensor.shape)}): a channel axis was added "
                "to an image that had one already", fix="drop the EnsureChannelFirst(d) after LoadVolume(d)/"
                "Volume.to_metatensor() (they give (1, I, J, K) already), or convert tensor[0]")
        if getattr(tensor, "is_batch", False) or np.ndim(_to_numpy(raw_aff)) == 3 or len(tensor.shape) == 5:
            n = int(tensor.shape[0])
            raise InvalidInputError(
                f"the MetaTensor is a batch of {n} image(s) (shape {tuple(tensor.shape)}), not one image",
                fix="convert one item: monai.data.decollate_batch(batch)[i] or batch[i]")
        arr = _to_numpy(tensor)
        aff_shape = np.shape(_to_numpy(raw_aff))
        spatial = meta.get("spatial_shape")
        two_d = (arr.ndim == 3 and arr.shape[0] == 1 and spatial is not None and np.size(spatial) == 2
                 and tuple(int(n) for n in np.ravel(spatial)) == tuple(arr.shape[1:]))
        if two_d or aff_shape == (3, 3):
            # Why: MONAI's channel-first 2-D image (1, H, W) was taken as a 3-D (1, H, W) volume, its channel axis
            # a spatial one: every voxel in the wrong place, silently.
            add_axis = "" if aff_shape == (3, 3) else (
                "Volume.from_metatensor(tensor.unsqueeze(-1)) (its 4x4 affine places the slice as medfuse.load "
                "places a 2-D file), or ")
            raise InvalidInputError(
                f"the MetaTensor holds a 2-D image (shape {tuple(arr.shape)}, affine {aff_shape[0]}x"
                f"{aff_shape[-1]}), and a Volume is 3-D",
                fix=f"convert it with a slice axis added: {add_axis}Volume(array[..., None], affine_4x4_lps); "
                    "2-D images fuse as arrays too: medfuse.fuse(a[0].numpy(), b[0].numpy())")
        if aff_shape != (4, 4):
            raise InvalidInputError(f"the MetaTensor's affine has shape {aff_shape}; a 3-D image's is 4x4",
                                    fix="give the tensor its 4x4 voxel-to-world affine (MONAI's readers set one)")
        if arr.ndim == 4:
            if arr.shape[0] != 1:
                # MONAI keeps original_channel_dim -1 after EnsureChannelFirst too: a (5, 32, 32, 20) tensor, channel
                # first already, was told to add that step. Channels are the short axis.
                channel_last = arr.shape[-1] == 1 or (meta.get("original_channel_dim") in (-1, 3)
                                                      and arr.shape[-1] < arr.shape[0])
                hint = (" It looks channel-last (MONAI's LoadImage without a channel-first step)" if channel_last
                        else f" It holds {arr.shape[0]} channels (the volumes of a 4-D image, or several images)")
                raise InvalidInputError(
                    f"expected one channel first, shape (1, I, J, K), got shape {arr.shape}.{hint}",
                    fix="add EnsureChannelFirst (or LoadImage(ensure_channel_first=True)) and select a single "
                    "channel, e.g. tensor[0:1], before converting")
            arr = arr[0]
        arr = _narrowed(np.array(arr, copy=True), meta)  # a copy: in-place edits of either stay apart
        aff = _to_numpy(raw_aff).astype(float)
        aff_lps = LPS_TO_RAS @ aff if _metatensor_xyz(meta) == "RAS" else aff
        prov = dict(provenance or {})
        space_name = _metatensor_space(meta)
        if space_name is not None:
            prov.setdefault("nifti_space", space_name)
        _record_source(prov, meta.get("filename_or_obj"))
        if "sources" not in prov:
            prov.update(_recorded_sources(meta.get("medfuse_sources")))
        return cls(
            arr, aff_lps,
            modality=modality or meta.get("modality", "unknown"),
            unit=unit or meta.get("unit"),  # none in the meta: as a Volume made without one (a CT with air: HU)
            provenance=prov,
        )


def _record_source(prov: dict, name: Any) -> None:
    """Record the file an image was read from as ``prov["source"]``, when it names one that exists.

    Why: :func:`medfuse.save` refuses to write over a volume's source, even with ``overwrite``; a volume that came
    through nibabel or MONAI carried none, so ``save(v, its_own_file, overwrite=True)`` rewrote the input.
    """
    if "source" in prov or not isinstance(name, (str, os.PathLike)) or not str(name).strip():
        return
    try:
        path = Path(name)
        if path.exists():
            prov["source"] = os.fspath(path.absolute())
    except (OSError, ValueError):  # a name no file system takes is no source
        pass


def _recorded_sources(text: Any) -> Dict[str, Any]:
    """``{"sources": [...]}`` from a MetaTensor's ``medfuse_sources`` (JSON text of paths), else ``{}``."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        found = json.loads(text)
    except ValueError:
        return {}
    paths = [s for s in found if isinstance(s, str) and s] if isinstance(found, list) else []
    return {"sources": paths} if paths else {}


def _record_lbm_formula(prov: dict, unit: Optional[str], stored_unit: Optional[str], formula: Optional[str]) -> None:
    """Record a stored SUVlbm's lean-body-mass formula as ``prov["suv"]`` (as medfuse.load does), when the image
    keeps its stored unit and the caller's provenance does not say otherwise."""
    if formula in ("lbm", "lbm_janma") and stored_unit == "SUVlbm" and unit in (None, "SUVlbm"):
        prov.setdefault("suv", formula)


def _stored_labels(modality: Optional[str], unit: Optional[str], stored_modality: Optional[str],
                   stored_unit: Optional[str], where: str, method: str) -> Tuple[str, Optional[str]]:
    """The modality and unit a converted image gets: the caller's, else the ones stored in the image (checked).

    Why: a stored value medfuse does not know (a file saved with ``unit="SUV"`` before fields were checked) was
    refused as "unknown unit 'SUV'", with a fix ("use one of ...") naming no option, when the caller had passed
    none; the caller's own ``modality=``/``unit=`` replaces it.

    Raises:
        InvalidInputError: a stored value (not overridden by the caller) is not one medfuse knows.
    """
    checks = (("modality", modality, stored_modality, normalise_modality),
              ("unit", unit, stored_unit, _checked_unit))
    out = []
    for name, given, stored, check in checks:
        if given is not None or not stored:
            # No unit anywhere: None, so that the Volume decides it as when made without one (a CT holding air
            # is HU), and from_sitk/from_nibabel give what Volume(...) and medfuse.load give.
            out.append(given if given is not None else ("unknown" if name == "modality" else None))
            continue
        try:
            out.append(check(stored))
        except InvalidInputError as e:
            raise InvalidInputError(f"the image's {where} gives the {name} {stored!r}, which medfuse does not know",
                                    fix=f"pass {name}= to Volume.{method} to replace it; {e.fix}") from None
    return out[0], out[1]


def _bridge_dtype(arr: np.ndarray) -> np.ndarray:
    """``arr`` in a dtype ITK and NIfTI store: bool -> uint8, float16 -> float32 (exact), long double -> float64
    (and complex long double -> complex128); any other dtype is returned as it is."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return _double(arr)


def _torch_int(arr: np.ndarray) -> np.ndarray:
    """``arr`` with uint16 widened to int32 and uint32/uint64 to int64, values exact.

    Why: torch keeps uint16/32/64 tensors but most operations (``max``, ``min``, ``abs``, ``sum``) raise
    NotImplementedError on them, so a DICOM volume's tensor failed at its first use.

    Raises:
        InvalidInputError: uint64 values above int64's largest.
    """
    if arr.dtype.kind != "u" or arr.dtype.itemsize == 1:
        return arr
    if arr.dtype.itemsize == 8 and int(arr.max()) > np.iinfo(np.int64).max:
        raise InvalidInputError("the uint64 voxels hold values above int64's range, which torch cannot hold exactly",
                                fix="convert the voxels first, e.g. vol.with_array(vol.array.astype(numpy.float64))")
    return arr.astype(np.int32 if arr.dtype.itemsize == 2 else np.int64)


def _narrowed(arr: np.ndarray, meta: Dict[str, Any]) -> np.ndarray:
    """``arr`` back in the unsigned dtype :meth:`Volume.to_metatensor` widened (meta ``medfuse_dtype``), when it
    is still an integer array whose values all fit; otherwise as it is (a transform made it float, or negative)."""
    name = meta.get("medfuse_dtype")
    if name not in ("uint16", "uint32", "uint64") or arr.dtype.kind != "i" or arr.size == 0:
        return arr
    target = np.dtype(name)
    if int(arr.min()) < 0 or int(arr.max()) > int(np.iinfo(target).max):
        return arr
    return arr.astype(target)


def _double(arr: np.ndarray) -> np.ndarray:
    """``arr`` with long double (float128, complex256) narrowed to float64/complex128, which libraries store."""
    if arr.dtype.kind == "f" and arr.dtype.itemsize > 8:
        return arr.astype(np.float64)
    if arr.dtype.kind == "c" and arr.dtype.itemsize > 16:
        return arr.astype(np.complex128)
    return arr


def _to_numpy(x: Any) -> np.ndarray:
    """A NumPy array from a torch tensor (any device, grad, bfloat16) or an array-like."""
    if hasattr(x, "detach"):
        x = x.detach().cpu()
        if str(x.dtype) == "torch.bfloat16":  # NumPy has no bfloat16
            x = x.float()
        return np.asarray(x.numpy())
    return np.asarray(x)


def _metatensor_xyz(meta: Dict[str, Any]) -> str:
    """The world space of a MetaTensor's affine: ``"RAS"`` (also when ``space`` is absent, MONAI's default) or
    ``"LPS"`` (monai.utils.SpaceKeys' values, any case; a SpaceKeys member is a str).

    Why: any other value was taken for LPS, while a missing one was RAS: a typo flipped x and y silently.

    Raises:
        InvalidInputError: any other ``space`` value (None included).
    """
    if "space" not in meta:
        return "RAS"
    value = meta["space"]
    space = value.strip().upper() if isinstance(value, str) else None
    if space not in ("RAS", "LPS"):
        shown = repr(value)[:40] if isinstance(value, str) else type(value).__name__
        raise InvalidInputError(f"the MetaTensor's meta['space'] is {shown}, not 'RAS' or 'LPS', so the world axes "
                                "of its affine are unknown",
                                fix="set meta['space'] to monai.utils.SpaceKeys.RAS or SpaceKeys.LPS (the space its "
                                    "affine is in), or delete the key for RAS, MONAI's default")
    return space


def _metatensor_space(meta: Dict[str, Any]) -> Optional[str]:
    """The NIfTI space name in a MetaTensor's meta: ``nifti_space``, else ``sform_code`` or ``qform_code``."""
    from .io.nifti import NIFTI_SPACES

    name = meta.get("nifti_space")
    if isinstance(name, str) and name in NIFTI_SPACES:
        return name
    codes = []
    for key in ("sform_code", "qform_code"):  # like nibabel's get_best_affine: sform first
        try:
            codes.append(int(np.asarray(_to_numpy(meta[key])).reshape(-1)[0]))
        except (KeyError, TypeError, ValueError, IndexError):
            codes.append(0)
    code = codes[0] or codes[1]
    return NIFTI_SPACES[code - 1] if 1 <= code <= len(NIFTI_SPACES) else None


def require_finite(array: Any, what: str, *, before: str) -> None:
    """Refuse an image with NaN or infinite voxels, naming it (never its path) and how much of it is bad.

    Args:
        array: the voxels (an array, or a Volume).
        what: how to name the image in the message (e.g. ``"input 2"``).
        before: (keyword-only) what the caller was about to do, for the fix (e.g. ``"fusing"``).

    Raises:
        InvalidInputError: the array holds NaN or infinite values.
    """
    arr = np.asarray(array)
    if not np.issubdtype(arr.dtype, np.floating) and not np.issubdtype(arr.dtype, np.complexfloating):
        return
    bad = int(arr.size - np.count_nonzero(np.isfinite(arr)))
    if bad:
        # Why the hint: NaN usually marks voxels outside a resampled field of view or a mask.
        raise InvalidInputError(
            f"{what} has {bad} NaN or infinite values ({100.0 * bad / arr.size:.3g} % of it)",
            # posinf/neginf 0 too: nan_to_num's default turns inf into 1.8e308, which a float32 step (registration)
            # reads as inf again.
            fix=f"replace them before {before}: numpy.nan_to_num(array, nan=0.0, posinf=0.0, neginf=0.0), for a "
            "Volume v.with_array(numpy.nan_to_num(v.array, nan=0.0, posinf=0.0, neginf=0.0)); or save the file "
            "with them set to 0",
        )


def spacing_from_affine(affine: np.ndarray) -> Tuple[float, float, float]:
    """Voxel sizes of a 4×4 affine (either convention)."""
    return tuple(float(s) for s in np.linalg.norm(np.asarray(affine)[:3, :3], axis=0))  # type: ignore[return-value]


def rotation_angle_deg(direction: np.ndarray) -> float:
    """Angle of a 3×3 rotation in degrees (used for tilt and transform reports)."""
    c = (np.trace(direction) - 1.0) / 2.0
    return math.degrees(math.acos(max(-1.0, min(1.0, c))))
