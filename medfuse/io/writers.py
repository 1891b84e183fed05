"""``save``: NIfTI, MetaImage, NRRD or a DICOM series, atomically.

* NIfTI (``.nii``/``.nii.gz``; ``format="nifti2"`` for NIfTI-2): RAS affine in both sform and
  qform, with the code of the volume's recorded NIfTI space (``provenance["nifti_space"]``, e.g. 4 for
  an MNI template) or 1 (scanner) when none is recorded; units mm; modality and unit in ``descrip``
  (``"medfuse modality=PT unit=SUVbw"``), read back by :func:`medfuse.io.nifti.load_image`.
* MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) via SimpleITK, with metadata keys
  ``medfuse_modality``/``medfuse_unit``.
* DICOM: a folder, one file per slice (:mod:`medfuse.io.dicom_writer`).

Every write goes to a temporary name in the destination folder, then ``os.replace``; an
existing target is refused unless ``overwrite=True``, and the volume's own source never.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Optional, Union

import numpy as np

from ..errors import InvalidInputError, OutputExistsError
from ..volume import Volume
from ._atomic import atomic_path, check_output
from .nifti import format_tag, nifti_space_code

__all__ = ["save", "FORMATS"]

PathLike = Union[str, os.PathLike]
FORMATS = ("nifti", "nifti2", "metaimage", "nrrd", "dicom")
_BY_SUFFIX = ((".nii.gz", "nifti"), (".nii", "nifti"), (".mha", "metaimage"), (".mhd", "metaimage"),
              (".nrrd", "nrrd"), (".nhdr", "nrrd"))


def _format_of(path: Path, fmt: Optional[str]) -> str:
    if fmt is not None:
        f = fmt.lower().replace("-", "")
        f = {"nii": "nifti", "mha": "metaimage", "mhd": "metaimage", "itk": "metaimage"}.get(f, f)
        if f not in FORMATS:
            raise InvalidInputError(f"unknown output format {fmt!r}", fix=f"use one of {', '.join(FORMATS)}", path=path)
        return f
    name = path.name.lower()
    for suffix, f in _BY_SUFFIX:
        if name.endswith(suffix):
            return f
    return "dicom"


def _storable(arr: np.ndarray) -> np.ndarray:
    """Dtypes every format and reader handles: bool -> uint8, 64-bit ints narrowed when lossless."""
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if arr.dtype in (np.int64, np.uint64):
        lo, hi = (int(arr.min()), int(arr.max()))
        for t in (np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return arr.astype(t)
        return arr.astype(np.float64)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    return arr


def _save_nifti(volume: Volume, path: Path, *, overwrite: bool, inputs, nifti2: bool) -> Path:
    import nibabel as nib

    code = nifti_space_code(volume)  # before any work: a bad recorded space is refused early
    arr = _storable(volume.array)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(arr, volume.affine_ras)
    # Why the recorded code: FSL, ANTs and Slicer treat template (MNI/aligned) and scanner spaces differently.
    img.set_sform(volume.affine_ras, code=code)
    img.set_qform(volume.affine_ras, code=code)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(arr.dtype)
    img.header["descrip"] = format_tag(volume.modality, volume.unit).encode("ascii")[:79]
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        nib.save(img, str(tmp))
    return path


def _save_itk(volume: Volume, path: Path, *, overwrite: bool, inputs) -> Path:
    import SimpleITK as sitk

    img = volume.with_array(_storable(volume.array)).to_sitk()
    img.SetMetaData("medfuse_modality", volume.modality)
    img.SetMetaData("medfuse_unit", volume.unit)
    name = path.name.lower()
    if name.endswith((".mha", ".nrrd")):
        with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
            sitk.WriteImage(img, str(tmp), True)
        return path
    # Header + data file pair (.mhd/.raw, .nhdr/.raw.gz): write both in a temp folder beside the
    # target, then move the data file(s) first and the header last.
    check_output(path, overwrite=overwrite, inputs=inputs)
    tmpdir = Path(tempfile.mkdtemp(dir=path.parent, prefix=".medfuse-tmp-"))
    try:
        sitk.WriteImage(img, str(tmpdir / path.name), False)
        others = [f for f in tmpdir.iterdir() if f.name != path.name]
        for f in others:
            dst = path.parent / f.name
            if dst.exists() and not overwrite:
                raise OutputExistsError("the output's data file exists", fix="pass overwrite=True", path=dst)
        for f in others:
            os.replace(f, path.parent / f.name)
        os.replace(tmpdir / path.name, path)
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def save(volume: Volume, path: PathLike, *, overwrite: bool = False, format: Optional[str] = None,
         deidentify: bool = True, series_description: Optional[str] = None, template: Any = None) -> Path:
    """Write a volume atomically and return the path written.

    Args:
        volume: the Volume.
        path: output file (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) or, for DICOM,
            a folder that does not exist yet.
        overwrite: replace an existing output (never the volume's own source).
        format: ``nifti``, ``nifti2``, ``metaimage``, ``nrrd`` or ``dicom``; default from the suffix
            (no known suffix -> DICOM series).
        deidentify: DICOM only: drop patient name/ID/birth date and other identifiers from the template.
        series_description: DICOM only: SeriesDescription of the derived series.
        template: DICOM only: a pydicom Dataset, DICOM file or folder whose study context is kept.

    Raises:
        OutputExistsError: the output exists (without ``overwrite``) or is the volume's source.
        InvalidInputError: unknown format.
    """
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"expected a medfuse Volume, got {type(volume).__name__}",
                                fix="load or build a Volume first (medfuse.load or medfuse.Volume)")
    p = Path(path)
    fmt = _format_of(p, format)
    inputs = [volume.provenance.get("source")]
    if fmt == "dicom":
        from .dicom_writer import write_dicom_series

        return write_dicom_series(volume, p, overwrite=overwrite, deidentify=deidentify,
                                  series_description=series_description, template=template)
    if fmt in ("nifti", "nifti2"):
        if not p.name.lower().endswith((".nii", ".nii.gz")):
            raise InvalidInputError("a NIfTI output needs a .nii or .nii.gz name", fix="rename the output", path=p)
        return _save_nifti(volume, p, overwrite=overwrite, inputs=inputs, nifti2=fmt == "nifti2")
    want = (".mha", ".mhd") if fmt == "metaimage" else (".nrrd", ".nhdr")
    if not p.name.lower().endswith(want):
        raise InvalidInputError(f"a {fmt} output needs a {' or '.join(want)} name", fix="rename the output", path=p)
    return _save_itk(volume, p, overwrite=overwrite, inputs=inputs)
