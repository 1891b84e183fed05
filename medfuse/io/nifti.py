"""NIfTI (nibabel) and MetaImage/NRRD (SimpleITK) readers.

* NIfTI-1 and NIfTI-2, ``.nii``/``.nii.gz``/``.img``+``.hdr``: the sform is used when its code
  is > 0, else the qform (nibabel's ``get_best_affine``); ``scl_slope``/``scl_inter`` are applied
  (integer data without scaling stays integer, so voxels are exact). Big-endian data is
  converted to native byte order.
* The NIfTI space of the transform used (its xform code: sform code if > 0, else qform code) is recorded as
  ``provenance["nifti_space"]`` (``"scanner"``, ``"aligned"``, ``"talairach"``, ``"mni"`` or ``"template"``;
  nothing for code 0), so that a template-space image is written back with its code
  (:func:`nifti_space_code`).
* ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` via SimpleITK.
* Modality and unit: the ``modality``/``unit`` arguments win; otherwise what medfuse's writer
  stored is read back (NIfTI ``descrip`` ``"medfuse modality=PT unit=SUVbw"``; MetaImage/NRRD
  metadata keys ``medfuse_modality``/``medfuse_unit``); otherwise ``unknown``/``arbitrary``.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import List, Optional, Tuple, Union

import numpy as np

from ..errors import (InvalidInputError, MedfuseError, MedfuseWarning, MultipleSeriesError,
                      UnreadableFileError)
from ..volume import LPS_TO_RAS, Volume, affine_from_geometry

__all__ = ["load_image", "load_image_volumes", "format_tag", "parse_tag", "nifti_space_code", "NIFTI_SPACES",
           "NIFTI_SUFFIXES", "ITK_SUFFIXES"]

PathLike = Union[str, os.PathLike]
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_TAG_RE = re.compile(r"medfuse\s+modality=(\S+)\s+unit=(\S+)")

#: NIfTI xform codes 1..5 by nibabel's names (``nibabel.nifti1.xform_codes``); code 0 ("unknown") is not a space.
NIFTI_SPACES = ("scanner", "aligned", "talairach", "mni", "template")


def format_tag(modality: str, unit: str) -> str:
    """The text medfuse stores in NIfTI ``descrip`` to carry modality and unit (≤ 80 bytes)."""
    return f"medfuse modality={modality} unit={unit}"


def parse_tag(text: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """Modality and unit from a :func:`format_tag` string, or ``(None, None)``."""
    m = _TAG_RE.search(text or "")
    return (m.group(1), m.group(2)) if m else (None, None)


def _space_name(hdr) -> Optional[str]:
    """Name of the space of the transform ``get_best_affine`` used, or ``None`` (code 0, Analyze, odd codes)."""
    if "sform_code" not in hdr:  # Analyze 7.5 has no xforms
        return None
    code = int(hdr["sform_code"]) or int(hdr["qform_code"])
    return NIFTI_SPACES[code - 1] if 1 <= code <= len(NIFTI_SPACES) else None


def nifti_space_code(volume: Volume) -> int:
    """The NIfTI xform code to write for ``volume``: its recorded ``provenance["nifti_space"]``, else 1 (scanner).

    Code 1 is also right for a volume read from a file with code 0: medfuse used (and warned about) an affine
    guessed from the voxel sizes, and code 1 makes other tools use that same affine rather than guess their own.

    Raises:
        InvalidInputError: the recorded space is not one of :data:`NIFTI_SPACES`.
    """
    space = volume.provenance.get("nifti_space")
    if space is None:
        return 1
    if space not in NIFTI_SPACES:
        raise InvalidInputError(f"the volume's provenance['nifti_space'] is {space!r}, not a NIfTI space name",
                                fix=f"set it to one of {', '.join(NIFTI_SPACES)}, or delete it to write 'scanner'")
    return NIFTI_SPACES.index(space) + 1


def _native(arr: np.ndarray) -> np.ndarray:
    if arr.dtype.byteorder not in ("=", "|") and arr.dtype.byteorder != ("<" if np.little_endian else ">"):
        return arr.astype(arr.dtype.newbyteorder("="))
    return arr


def _nib_load(p: Path):
    """nibabel's image for a NIfTI file, whatever the case of its ending.

    nibabel rebuilds the file name from a lower-cased ending ("b.Nii.Gz" -> "b.nii.Gz", which does not exist), so
    a single-file NIfTI whose ending is not in lower case is read from its bytes instead.
    """
    import gzip

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    name = p.name
    ending = ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii" if name.lower().endswith(".nii") else None
    if ending is None or name.endswith(ending):
        return nib.load(str(p))
    with (gzip.open if ending == ".nii.gz" else open)(p, "rb") as fh:
        data = fh.read()
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except (HeaderDataError, ImageFileError, ValueError):
            continue
    raise ImageFileError("neither a NIfTI-1 nor a NIfTI-2 header")


def _read_nifti(p: Path) -> Tuple[np.ndarray, np.ndarray, Optional[str], Optional[str], Optional[str]]:
    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    try:
        img = _nib_load(p)
    except (ImageFileError, EOFError, OSError, ValueError) as e:
        kind = "empty" if p.stat().st_size == 0 else "not a valid NIfTI file (or truncated)"
        raise UnreadableFileError(f"the file is {kind} ({type(e).__name__})",
                                  fix="check the file was copied completely; re-export it", path=p) from None
    try:
        arr = np.asanyarray(img.dataobj)
    except Exception as e:  # truncated gzip/short data: zlib.error, EOFError, OSError, ValueError
        raise UnreadableFileError(f"the voxel data cannot be read; the file looks truncated ({type(e).__name__})",
                                  fix="copy or export the file again", path=p) from None
    hdr = img.header
    aff = np.asarray(hdr.get_best_affine() if hasattr(hdr, "get_best_affine") else img.affine, dtype=float)
    if "sform_code" in hdr and int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        warnings.warn("a NIfTI file has neither a qform nor an sform (both codes 0): its orientation and origin are "
                      "a guess from the voxel sizes alone; check them before registering or fusing", MedfuseWarning,
                      stacklevel=3)
    # World coordinates in mm, whatever the file's spatial unit (medfuse and ITK work in mm).
    xyz_unit = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "unknown"
    to_mm = {"meter": 1000.0, "micron": 0.001}.get(xyz_unit, 1.0)
    if to_mm != 1.0:
        aff = np.diag([to_mm, to_mm, to_mm, 1.0]) @ aff
    descrip = hdr["descrip"].item().decode("latin-1", "ignore") if "descrip" in hdr else ""
    mod, unit = parse_tag(descrip)
    return np.asarray(arr), LPS_TO_RAS @ np.asarray(aff, dtype=float), mod, unit, _space_name(hdr)


def _read_itk(p: Path) -> Tuple[np.ndarray, np.ndarray, Optional[str], Optional[str]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise UnreadableFileError("the file is empty", fix="copy or export the file again", path=p)
    try:
        # The reader named by the lower-cased ending: ITK picks one by a case-sensitive ending, and "X.MHA" has none.
        io = "NrrdImageIO" if p.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImageIO"
        img = sitk.ReadImage(str(p), imageIO=io)
    except RuntimeError:
        raise UnreadableFileError("the file cannot be read as MetaImage/NRRD (corrupt or truncated)",
                                  fix="copy or export the file again", path=p) from None
    if img.GetNumberOfComponentsPerPixel() != 1:
        raise InvalidInputError(f"the image has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour/vector)",
                                fix="convert it to a scalar image first", path=p)
    dim = img.GetDimension()
    if dim not in (2, 3, 4):
        raise InvalidInputError(f"the image is {dim}-D", fix="medfuse reads 3-D images (or 4-D series of them)", path=p)
    arr = sitk.GetArrayFromImage(img)  # [t,] k, j, i
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # i, j, k[, t]
    sp, org = img.GetSpacing()[:3], img.GetOrigin()[:3]
    d = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3] if dim >= 3 else None
    if dim == 2:
        sp, org = tuple(img.GetSpacing()) + (1.0,), tuple(img.GetOrigin()) + (0.0,)
        d = np.eye(3)
        d[:2, :2] = np.asarray(img.GetDirection(), dtype=float).reshape(2, 2)
    aff = affine_from_geometry(sp, org, d)
    get = lambda k: img.GetMetaData(k).strip() if img.HasMetaDataKey(k) else None  # noqa: E731
    return arr, aff, get("medfuse_modality"), get("medfuse_unit")


def _read(path: PathLike) -> Tuple[List[np.ndarray], np.ndarray, Optional[str], Optional[str], dict, Path]:
    p = Path(path)
    if not p.is_file():
        raise UnreadableFileError("no such file", fix="check the path", path=p)
    name = p.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        arr, aff, mod, unit, space = _read_nifti(p)
        facts = {"reader": "nibabel"}
        if space is not None:
            facts["nifti_space"] = space
    elif name.endswith(ITK_SUFFIXES):
        arr, aff, mod, unit = _read_itk(p)
        facts = {"reader": "SimpleITK"}
    else:
        raise UnreadableFileError("unknown image file ending",
                                  fix=f"use one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}, or a DICOM file/folder", path=p)
    arr = _native(arr)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.size == 0:
        raise InvalidInputError(f"the image has zero size (shape {arr.shape})", fix="use a non-empty image", path=p)
    if arr.ndim == 3:
        vols = [arr]
    elif arr.ndim == 4 or (arr.ndim > 4 and all(s == 1 for s in arr.shape[4:])):
        arr = arr.reshape(arr.shape[:4])
        vols = [arr[..., t] for t in range(arr.shape[3])]
    else:
        raise InvalidInputError(f"the image has {arr.ndim} dimensions (shape {arr.shape})",
                                fix="medfuse reads 3-D images or 4-D series of them", path=p)
    return vols, aff, mod, unit, facts, p


def _make(arr: np.ndarray, aff: np.ndarray, p: Path, *, modality, unit, facts, index, n) -> Volume:
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.any():
            raise InvalidInputError("every voxel is NaN or infinite", fix="check the export; the image holds no data", path=p)
        if not finite.all():
            warnings.warn(f"{p}: {int((~finite).sum())} voxel(s) are NaN or infinite; they were kept as they are",
                          MedfuseWarning, stacklevel=3)
    prov = {"source": os.path.abspath(p), **facts}  # absolute: save() protects it after a chdir too
    if n > 1:
        prov.update(volume_index=index, n_volumes=n)
    try:
        return Volume(np.ascontiguousarray(arr), aff, modality=modality, unit=unit, provenance=prov)
    except MedfuseError as e:
        raise type(e)(e.problem, fix=e.fix, path=p) from None


def _labels(mod: Optional[str], unit: Optional[str], modality: Optional[str], unit_override: Optional[str]):
    return (modality if modality is not None else (mod or "unknown"),
            unit_override if unit_override is not None else (unit or "arbitrary"))


def load_image(path: PathLike, *, modality: Optional[str] = None, unit: Optional[str] = None) -> Volume:
    """Load one 3-D volume from a NIfTI, MetaImage or NRRD file.

    Args:
        path: the file.
        modality: override the stored modality (``MR``, ``CT``, ``PT``/``PET``, ``NM``/``SPECT``).
        unit: override the stored unit.

    Raises:
        UnreadableFileError: empty, truncated or unreadable file.
        MultipleSeriesError: a 4-D file with more than one volume (use :func:`load_image_volumes`).
        GeometryError: sheared or singular affine.
        InvalidInputError: zero size, all-NaN voxels, vector/colour data.
    """
    vols, aff, mod, u, facts, p = _read(path)
    if len(vols) > 1:
        raise MultipleSeriesError(
            f"the file holds {len(vols)} volumes (4-D)", choices=list(range(len(vols))),
            fix="use medfuse.load_volumes(path) to get all of them", path=p)
    m, un = _labels(mod, u, modality, unit)
    return _make(vols[0], aff, p, modality=m, unit=un, facts=facts, index=0, n=1)


def load_image_volumes(path: PathLike, *, modality: Optional[str] = None, unit: Optional[str] = None) -> List[Volume]:
    """Load every volume of a 3-D or 4-D NIfTI/MetaImage/NRRD file as a list of 3-D volumes."""
    vols, aff, mod, u, facts, p = _read(path)
    m, un = _labels(mod, u, modality, unit)
    return [_make(a, aff, p, modality=m, unit=un, facts=facts, index=i, n=len(vols)) for i, a in enumerate(vols)]
