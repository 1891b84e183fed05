"""``save``: NIfTI, MetaImage, NRRD or a DICOM series, atomically.

* NIfTI (``.nii``/``.nii.gz``; ``format="nifti2"`` for NIfTI-2): RAS affine in both sform and
  qform, with the code of the volume's recorded NIfTI space (``provenance["nifti_space"]``, e.g. 4 for
  an MNI template) or 1 (scanner) when none is recorded; units mm; modality and unit in ``descrip``
  (``"medfuse modality=PT unit=SUVbw"``), read back by :func:`medfuse.io.nifti.load_image`.
* MetaImage (``.mha``/``.mhd``) and NRRD (``.nrrd``/``.nhdr``) via SimpleITK, with metadata keys
  ``medfuse_modality``/``medfuse_unit``.
* DICOM: a folder, one file per slice (:mod:`medfuse.io.dicom_writer`).

Every write goes to a temporary name in the destination folder, then moves into place in one step; an
existing target is refused unless ``overwrite=True`` (also one that appears during the write), and the volume's
own source never; ``overwrite`` replaces a DICOM folder only when it holds a series medfuse wrote.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
from pathlib import Path
from typing import Any, Optional, Tuple, Union

import numpy as np

from .._checks import describe
from ..errors import GeometryError, InvalidInputError, MedfuseError, OutputExistsError
from ..volume import Volume
from ..provenance import _detached_data_file
from ._atomic import (_durable, _flush_file, _flush_folder, _link_into_place, _make_aside, _make_temp_dir,
                      _make_temp_file, _name_the_output, _public_mode, _temp_suffix, _typed_os_error, atomic_path,
                      check_output, refuse_foreign_folder, same_file)
from . import _as_path, _check_flag, _check_text, _kind
from .nifti import format_tag, lbm_formula, nifti_space_code

__all__ = ["save", "check_save_target", "FORMATS"]

PathLike = Union[str, os.PathLike]
FORMATS = ("nifti", "nifti2", "metaimage", "nrrd", "dicom")
_BY_SUFFIX = ((".nii.gz", "nifti"), (".nii", "nifti"), (".mha", "metaimage"), (".mhd", "metaimage"),
              (".nrrd", "nrrd"), (".nhdr", "nrrd"))
#: Analyze/NIfTI pair endings: no writer makes them (the reader takes .hdr/.img, not gzipped ones).
_READ_ONLY_SUFFIXES = (".img", ".hdr", ".img.gz", ".hdr.gz")
#: Endings surely not meant as a DICOM series folder's name (2-D pictures, sidecars, transforms, tables).
_NOT_VOLUME_SUFFIXES = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif", ".json", ".tfm", ".txt", ".h5",
                        ".hdf5", ".mat", ".csv")


def _check_args(path: Any, *, overwrite: Any, format: Any) -> Tuple[Path, bool]:
    """The output path and ``overwrite`` checked, and ``format``'s type.

    Raises:
        InvalidInputError: a path that is not a str or Path, a non-bool ``overwrite`` (``overwrite="no"`` would
            overwrite), a ``format`` that is not text.
    """
    p = _as_path(path, what="the output path", fix="pass the output's name as a str or pathlib.Path, e.g. "
                                                    "'fused.nii.gz' (no ending: a DICOM series folder)")
    _check_text(format, "format", f"pass one of {', '.join(FORMATS)}, or leave it out to take it from the name")
    return p, _check_flag(overwrite, "overwrite")


def _check_template(template: Any) -> None:
    """A DICOM template: None, a pydicom Dataset or a path.

    Raises:
        InvalidInputError: anything else (a Volume holds no DICOM header to copy).
    """
    if template is None or isinstance(template, (str, os.PathLike)):
        return
    if type(template).__module__.startswith("pydicom"):
        import pydicom

        if isinstance(template, pydicom.Dataset):
            return
    raise InvalidInputError(f"template must be a pydicom Dataset or the path of a DICOM file or folder, got "
                            f"{_kind(template)}", fix="pass the DICOM file or folder the volume came from (its "
                            "provenance['source']), or leave template out")


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
    if name.endswith(_READ_ONLY_SUFFIXES):
        # Without this, "scan.img" would silently become a DICOM series folder of that name.
        gz = name.endswith(".gz")  # gzipped pairs are not read either (io.load says so)
        raise InvalidInputError(f"medfuse {'neither reads nor writes gzipped' if gz else 'reads'} Analyze/NIfTI "
                                f"pairs ({name[name.rfind('.', 0, -3 if gz else None):]})"
                                + ("" if gz else " but does not write them"),
                                fix="name the output .nii.gz or .nii (or give no suffix for a DICOM series)",
                                path=path)
    ending = name[name.rfind("."):] if "." in name.lstrip(".") else ""
    if name.endswith(_NOT_VOLUME_SUFFIXES) or (ending and not os.path.lexists(path)):
        # Only a name without an ending (or an existing folder) is a DICOM series folder: "fused.png", "a.dcm",
        # "a.nii.bz2" or "a.nii.gz." (a typo) silently became a folder of DICOM files. Something already there is
        # left to check_output, which refuses an input (e.g. a .mhd's .raw) or a file in the way as such.
        raise InvalidInputError(f"the output name ends in {ending!r}, which is not a 3-D image format medfuse "
                                f"writes (known endings: {', '.join(s for s, _ in _BY_SUFFIX)}; a name without an "
                                "ending writes a DICOM series folder)",
                                fix="end the name in .nii.gz, .nii, .mha or .nrrd; for a DICOM series use a name "
                                    "without a dot ending, an existing series folder, or pass format='dicom'",
                                path=path)
    return "dicom"


def _refuse_file_ending_for_series(p: Path) -> None:
    """A DICOM series is a folder: "x.nii.gz" with format="dicom" became a folder of that name."""
    ending = next((sfx for sfx, _ in _BY_SUFFIX if p.name.lower().endswith(sfx)), None)
    if ending is not None:
        raise InvalidInputError(f"format='dicom' writes a series folder, but the name ends in {ending!r}, a file "
                                "format's ending", fix="name the series folder without that ending, or leave format "
                                "out to write the file the ending names", path=p)


def _refuse_all_nonfinite(arr: np.ndarray, path: Path) -> None:
    """Refuse a volume in which no voxel is finite: load() refuses such a file, and DICOM stores all zeros.

    Raises:
        InvalidInputError: every voxel is NaN or infinite.
    """
    if arr.size and np.issubdtype(arr.dtype, np.inexact) and not np.isfinite(arr).any():
        raise InvalidInputError("every voxel is NaN or infinite: the file would hold no image (medfuse.load refuses "
                                "it, and a DICOM series would be all zeros); nothing was written",
                                fix="check the step that made the volume (a division by zero, an empty mask), or "
                                    "replace them first, e.g. vol.with_array(np.nan_to_num(vol.array))", path=path)


#: Integers above this magnitude are not exact in float64 (2**53).
_EXACT_FLOAT64_INT = 2 ** 53


def _storable(arr: np.ndarray, fmt: str = "nifti", path: Optional[Path] = None) -> np.ndarray:
    """Dtypes every format and reader handles, converted without losing a value, or refused.

    bool -> uint8; float16 -> float32; long double (float128) -> float64; 64-bit integers -> int16/int32
    when their range fits, else float64 when every value is exact there (|v| <= 2**53), else refused.
    Complex data is kept for NIfTI and NRRD and refused for MetaImage and DICOM (which would store two
    components medfuse cannot read back, or drop the imaginary part).

    Raises:
        InvalidInputError: the values cannot be stored exactly in the format.
    """
    if arr.dtype == bool:
        return arr.astype(np.uint8)
    if np.issubdtype(arr.dtype, np.complexfloating):
        if fmt in ("metaimage", "dicom") or arr.dtype.itemsize > 16:
            raise InvalidInputError(f"{arr.dtype} voxels cannot be stored in {fmt} in a form medfuse reads back "
                                    "(DICOM pixels are real; MetaImage keeps two components)",
                                    fix="save np.abs(...) or .real of the array, or write .nii.gz/.nrrd (complex64/"
                                        "complex128 are kept there)", path=path)
        return arr
    if arr.dtype in (np.int64, np.uint64):
        if arr.size == 0:
            return arr.astype(np.int16)
        lo, hi = (int(arr.min()), int(arr.max()))
        for t in (np.int16, np.int32):
            if np.iinfo(t).min <= lo and hi <= np.iinfo(t).max:
                return arr.astype(t)
        if -_EXACT_FLOAT64_INT <= lo and hi <= _EXACT_FLOAT64_INT:
            return arr.astype(np.float64)
        raise InvalidInputError(f"{arr.dtype} voxels up to {max(abs(lo), abs(hi)):.3g} cannot be stored exactly "
                                "(medfuse writes 64-bit integers as int32 or, beyond that, float64, exact only up to "
                                "2**53)", fix="rescale the values, or convert the array to float64 yourself if the "
                                              "rounding is acceptable", path=path)
    if arr.dtype == np.float16:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.floating) and arr.dtype.itemsize > 8:
        return arr.astype(np.float64)
    return arr


def _written(tmp: Path, path: Path) -> None:
    """A writer that did not understand the name may leave the temporary file empty: never install that."""
    if tmp.stat().st_size == 0:
        raise InvalidInputError("the image writer produced an empty file (nothing was written)",
                                fix="use a lower-case .nii.gz, .nii, .mha, .mhd, .nrrd or .nhdr name", path=path)


#: NIfTI-1 stores the image's size along each axis as a signed 16-bit integer.
_NIFTI1_MAX_DIM = 32767


def _check_fits_float32(volume: Volume, path: Path) -> None:
    """Refuse a geometry that NIfTI-1's float32 header fields cannot hold: an origin past 3.4e38 was written as
    infinity (the file then refused by every reader, medfuse's own included), and a spacing below ~1e-38 as 0
    (read back as 1 mm), with NumPy's "overflow encountered in cast" as the only sign."""
    a = volume.affine_ras
    with np.errstate(over="ignore", under="ignore"):
        stored = a.astype(np.float32).astype(np.float64)
    spacing, kept = np.linalg.norm(a[:3, :3], axis=0), np.linalg.norm(stored[:3, :3], axis=0)
    if np.all(np.isfinite(stored)) and np.allclose(kept, spacing, rtol=1e-3, atol=0.0):
        return
    raise GeometryError("the volume's geometry does not fit a NIfTI-1 header, whose affine is float32 "
                        f"(spacing {', '.join(f'{v:.3g}' for v in spacing)} mm; origin up to "
                        f"{float(np.max(np.abs(a[:3, 3]))):.3g} mm)",
                        fix="write NIfTI-2 (medfuse.save(..., format='nifti2'), same .nii/.nii.gz name) or a "
                            ".nrrd/.mha file, which keep 64-bit geometry; or check the affine, which looks wrong "
                            "for a medical image", path=path)


def _save_nifti(volume: Volume, path: Path, *, overwrite: bool, inputs, nifti2: bool) -> Path:
    import nibabel as nib

    code = nifti_space_code(volume)  # before any work: a bad recorded space is refused early
    if not nifti2 and max(volume.shape) > _NIFTI1_MAX_DIM:
        # Why: NIfTI-1 stores each size as int16; nibabel's own error for this was a raw HeaderDataError.
        raise InvalidInputError(f"the volume's shape {tuple(volume.shape)} does not fit a NIfTI-1 header, which "
                                f"holds at most {_NIFTI1_MAX_DIM} voxels along an axis",
                                fix="write NIfTI-2 (medfuse.save(..., format='nifti2'), same .nii/.nii.gz name) or "
                                    "a .nrrd/.mha file, or crop or downsample the volume", path=path)
    if not nifti2:
        _check_fits_float32(volume, path)
    arr = _storable(volume.array, "nifti", path)
    cls = nib.Nifti2Image if nifti2 else nib.Nifti1Image
    img = cls(arr, volume.affine_ras)
    # Why the recorded code: FSL, ANTs and Slicer treat template (MNI/aligned) and scanner spaces differently.
    img.set_sform(volume.affine_ras, code=code)
    img.set_qform(volume.affine_ras, code=code)
    img.header.set_xyzt_units("mm", "sec")
    img.header.set_data_dtype(arr.dtype)
    img.header["descrip"] = format_tag(volume.modality, volume.unit, suv=lbm_formula(volume)).encode("ascii")[:79]
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        nib.save(img, str(tmp))
        _written(tmp, path)
    return path


#: What ITK's "File cannot be written ... Reason: ..." says for an error the user can fix, and its errno.
_ITK_WRITE_REASONS = (("No space left on device", errno.ENOSPC), ("Disk quota exceeded", getattr(errno, "EDQUOT", 122)),
                      ("File too large", errno.EFBIG), ("Permission denied", errno.EACCES),
                      ("Read-only file system", errno.EROFS))


def _write_itk(img, file: Path, *, compress: bool) -> None:
    """``sitk.WriteImage`` to ``file``; a write error the user can fix becomes the OSError it was, for the typed
    error that names the output (ITK's RuntimeError was an "internal error" naming the temporary file)."""
    import SimpleITK as sitk

    from ._c_locale import c_numeric_locale
    from .nifti import itk_path

    try:
        with c_numeric_locale():  # NRRD's writer prints numbers in LC_NUMERIC: "-96,75" under a decimal comma
            sitk.WriteImage(img, itk_path(file, writing=True), compress)
    except RuntimeError as e:
        text = str(e)
        for reason, code in _ITK_WRITE_REASONS:
            if reason in text:
                raise OSError(code, reason, os.fspath(file)) from None
        if _too_little_room(file, img):  # NRRD's writer says "fwrite wrote only ..." or "couldn't write gzip data"
            raise OSError(errno.ENOSPC, "No space left on device", os.fspath(file)) from None
        raise


def _too_little_room(file: Path, img) -> bool:
    """After a failed write: is the disk too full for the image (free space under its uncompressed size)?"""
    import shutil

    try:
        free = shutil.disk_usage(file.parent).free
    except OSError:
        return False
    size = img.GetNumberOfPixels() * img.GetNumberOfComponentsPerPixel() * img.GetSizeOfPixelComponent()
    return free < max(size, 1 << 20)


def _refuse_data_file_keywords(path: Path) -> None:
    """Refuse a .mhd/.nhdr name whose data file name the format reads as a keyword: MetaImage takes a data file
    starting with "LIST" as a list of files, and both formats take "%" as a numbered-file pattern. The header
    written was unreadable (medfuse refused it, SimpleITK read uninitialised memory): the output was lost."""
    name = path.name
    if not name.lower().endswith((".mhd", ".nhdr")):
        return
    data = name[:name.rfind(".")] + ".raw"
    # MetaIO reads any '%' as a numbered-file pattern; NRRD only a printf integer ("%d", "%03d").
    pattern = "%" in name if name.lower().endswith(".mhd") else re.search(r"%\d*d", name) is not None
    if pattern or (name.lower().endswith(".mhd") and data.startswith("LIST")):
        why = "'%' (a numbered-file pattern)" if pattern else "'LIST' (a list of data files) at its start"
        raise InvalidInputError(f"the output's data file would be named {data!r}, which the header format reads as "
                                f"{why}, not as a file name: no tool could read the image back",
                                fix="choose another output name (no '%'; not starting with upper-case 'LIST'), or "
                                    "a single-file .mha/.nrrd/.nii.gz", path=path)


def _save_itk(volume: Volume, path: Path, *, overwrite: bool, inputs, fmt: str) -> Path:
    _refuse_data_file_keywords(path)
    img = volume.with_array(_storable(volume.array, fmt, path)).to_sitk()
    img.SetMetaData("medfuse_modality", volume.modality)
    img.SetMetaData("medfuse_unit", volume.unit)
    if lbm_formula(volume) is not None:
        img.SetMetaData("medfuse_suv", lbm_formula(volume))
    name = path.name.lower()
    if name.endswith((".mha", ".nrrd")):
        with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
            _write_itk(img, tmp, compress=True)
            _written(tmp, path)
        return path
    # Header + data file pair (.mhd/.raw, .nhdr/.raw): write both in a temp folder beside the target
    # (the header under a lower-case suffix, which ITK needs), then move the data file(s) first and the
    # header last. Files they replace (with overwrite) are kept aside (.medfuse-old-<key>-*, the key from the
    # header's name) until the end and put back on failure, so the old header never ends up beside a new data
    # file; after a kill, the next write to the header puts them back (_atomic.recover_leftovers). The temp
    # folder is named after the header (_atomic._temp_prefix), so that write also removes it when it was killed,
    # with any new data file it had already linked into place (kept linked in the folder until the end: proof).
    check_output(path, overwrite=overwrite, inputs=inputs, kind="file")
    low_suffix = _temp_suffix(path.name)
    header = path.name[: len(path.name) - len(low_suffix)] + low_suffix
    try:
        tmpdir = _make_temp_dir(path)
    except OSError as e:
        raise (_typed_os_error(e, path) or e) from e
    aside: Optional[Path] = None
    placed = []  # (target, where the file it replaced is kept aside, or None), once the new file is in place
    try:
        _write_itk(img, tmpdir / header, compress=False)
        others = sorted(f for f in tmpdir.iterdir() if f.name != header)
        own = _detached_data_file(path) if path.is_file() else None  # the data file of the header replaced
        for f in others:
            dst = path.parent / f.name
            # Said first: check_output's "pass overwrite=True" led to this refusal once followed.
            if os.path.lexists(dst) and not (own is not None and same_file(dst, own)):
                # An input's data file (or a folder) is said as such; check_output refuses nothing else here.
                check_output(dst, overwrite=True, inputs=inputs, kind="file", recover=False)
                # e.g. a.nhdr written over a.raw, the data of an existing a.mhd: overwrite names a.nhdr, not a.mhd
                raise OutputExistsError("the output's data file exists and belongs to another image (its header "
                                        "is not the one being replaced)",
                                        fix="choose another output name, or delete that file first", path=dst)
            # The data file is an output too: never an input (another .mhd's data file), never a folder.
            dst = check_output(dst, overwrite=overwrite, inputs=inputs, kind="file")
        check_output(path, overwrite=overwrite, inputs=inputs, kind="file", recover=False)  # appeared meanwhile
        durable = _durable()
        if durable:  # header and data reach the disk before they take their names (see _atomic)
            for f in [*others, tmpdir / header]:
                _flush_file(f)
        aside = _make_aside(path)
        for src, dst in [(f, path.parent / f.name) for f in others] + [(tmpdir / header, path)]:
            kept = None
            # A private (chmod 600) output stays private, and none is wider than its inputs (see _atomic).
            _public_mode(src, replacing=dst if os.path.lexists(dst) else None, inputs=inputs)
            if os.path.lexists(dst):
                kept = aside / dst.name
                os.replace(dst, kept)
            try:
                # Its earlier version is aside: whatever is there now is not ours.
                _link_into_place(src, dst, keep_source=True)
            except BaseException:
                if kept is not None and not os.path.lexists(dst):
                    os.replace(kept, dst)
                raise
            placed.append((dst, kept))
        placed = []  # done: what was replaced goes with the aside folder
        if durable:
            _flush_folder(path.parent)
        shutil.rmtree(aside, ignore_errors=True)
    except BaseException as e:
        for dst, kept in reversed(placed):  # put every replaced file back
            if kept is not None:
                os.replace(kept, dst)
            elif os.path.lexists(dst):
                os.unlink(dst)
        if aside is not None:
            with contextlib.suppress(OSError):
                os.rmdir(aside)  # only when empty: never a file it still holds
        if isinstance(e, MedfuseError):
            _name_the_output(e, tmpdir, path)
        typed = _typed_os_error(e, path)
        if typed is None:
            raise
        raise typed from e
    finally:
        shutil.rmtree(tmpdir, ignore_errors=True)
    return path


def check_save_target(path: PathLike, *, overwrite: bool = False, inputs=(), format: Optional[str] = None) -> Path:
    """Refuse, before any work, every output path :func:`save` would refuse at the end (same rules).

    For commands that register or fuse for minutes before saving: an existing output without ``overwrite``, an
    input, a folder in the way of a file, a file in the way of a DICOM series folder, a folder that holds
    more than a DICOM series medfuse wrote (``overwrite`` never deletes such a folder, nor a scanner's series), or
    a folder this process cannot write in (tried with a temporary file).

    Args:
        path: the output :func:`save` will be given.
        overwrite: as :func:`save` will be given it.
        inputs: the paths of the inputs, which are never written over.
        format: as :func:`save` will be given it (default: from the name).

    Returns:
        ``path`` as a Path.

    Raises:
        OutputExistsError: as :func:`save` would (an existing output, an input, something in the way).
        OutputWriteError: as :func:`save` would (an unwritable or missing folder, a full disk, a name too long).
        InvalidInputError: as :func:`save` would (an argument of the wrong type, an unknown format), or
            ``inputs`` is not a list.
    """
    p, _ = _check_args(path, overwrite=overwrite, format=format)
    if isinstance(inputs, (str, bytes, os.PathLike)) or not hasattr(inputs, "__iter__"):
        # One path would be read letter by letter: "." among them made every output here "inside an input".
        raise InvalidInputError(f"inputs takes a list of paths, got {_kind(inputs)}", fix="pass inputs=[path, ...]")
    fmt = _format_of(p, format)
    check_output(p, overwrite=overwrite, inputs=inputs, kind="folder" if fmt == "dicom" else "file")
    if fmt == "dicom":
        _refuse_file_ending_for_series(p)
        refuse_foreign_folder(p, own_series=True)  # as write_dicom_series: never a scanner's series
    if fmt in ("metaimage", "nrrd"):
        from .nifti import itk_path

        _refuse_data_file_keywords(p)
        # Windows: SimpleITK needs an ASCII path (a .mhd/.nhdr header is written under its own name, a .mha/.nrrd
        # under an ASCII temporary one): refused now, not after minutes of work.
        pair = p.name.lower().endswith((".mhd", ".nhdr"))
        itk_path(p if pair else p.with_name(".medfuse-tmp" + _temp_suffix(p.name)), writing=True)
    _probe_writable(p)
    return p


def _probe_writable(p: Path) -> None:
    """Create and remove a temporary file beside ``p``: a read-only or forbidden folder (or a full disk) is found
    before minutes of work, not at the end. A real write, since permission bits do not tell (root, ACLs,
    read-only mounts, network shares).

    Raises:
        OutputWriteError: permission denied, read-only file system, disk full (with a fix and the errno).
    """
    try:
        tmp = _make_temp_file(p)  # named after p: if killed right here, the next write to p removes it
    except OSError as e:
        raise (_typed_os_error(e, p) or e) from e
    os.unlink(tmp)


def save(volume: Volume, path: PathLike, *, overwrite: bool = False, format: Optional[str] = None,
         deidentify: bool = True, series_description: Optional[str] = None, template: Any = None) -> Path:
    """Write a volume atomically and return the path written.

    Args:
        volume: the Volume.
        path: output file (``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``) or, for DICOM,
            a folder: a name without an ending (or an existing series folder).
        overwrite: replace an existing output (never the volume's own source); a DICOM folder only when it is
            empty or holds a series medfuse wrote (never a scanner's series or other files).
        format: ``nifti``, ``nifti2``, ``metaimage``, ``nrrd`` or ``dicom``; default from the suffix
            (no suffix -> DICOM series; an unknown one is refused).
        deidentify: DICOM only: drop patient name/ID/birth date and other identifiers from the template.
        series_description: DICOM only: SeriesDescription of the derived series.
        template: DICOM only (refused for other formats): a pydicom Dataset, DICOM file or folder whose study
            context is kept.

    Returns:
        The path written.

    Raises:
        OutputExistsError: the output exists (without ``overwrite``), is the volume's source, or is a folder
            holding anything but a DICOM series medfuse wrote.
        OutputWriteError: the output cannot be written (permission, read-only or full disk, a name too long, its
            folder missing); ``errno`` says which.
        InvalidInputError: an argument of the wrong type, an unknown format or ending, a name the format cannot
            take, a template for a non-DICOM output, voxels the format cannot store exactly, or no finite voxel.
        UnreadableFileError: the DICOM template cannot be read (DICOM output).
    """
    if not isinstance(volume, Volume):
        swapped = isinstance(volume, (str, os.PathLike)) and isinstance(path, Volume)
        raise InvalidInputError(f"expected a medfuse Volume, got {describe(volume)}",
                                fix="the volume comes first: save(volume, path)" if swapped else
                                "load or build a Volume first (medfuse.load or medfuse.Volume)")
    p, overwrite = _check_args(path, overwrite=overwrite, format=format)
    deidentify = _check_flag(deidentify, "deidentify")
    _check_text(series_description, "series_description", "pass the description as text, or leave it out")
    _check_template(template)
    fmt = _format_of(p, format)
    if template is not None and fmt != "dicom":
        # Why refused: a NIfTI/MetaImage/NRRD file holds no DICOM study context, so the template would be ignored.
        raise InvalidInputError(f"template is used only for a DICOM series output, not for {fmt}",
                                fix="leave template out, or write a DICOM series (a name without an ending, or "
                                    "format='dicom')", path=p)
    # The volume's own file and, for a derived volume (fused), the files it was made from.
    inputs = [volume.provenance.get("source"), *volume.provenance.get("sources", [])]
    if fmt == "dicom":
        from .dicom_writer import write_dicom_series

        _refuse_file_ending_for_series(p)
        if np.iscomplexobj(volume.array):
            _storable(volume.array, "dicom", p)  # refused: DICOM pixels are real

        return write_dicom_series(volume, p, overwrite=overwrite, deidentify=deidentify,
                                  series_description=series_description, template=template)
    _refuse_all_nonfinite(volume.array, p)  # (write_dicom_series checks its own)
    if fmt in ("nifti", "nifti2"):
        if not p.name.lower().endswith((".nii", ".nii.gz")):
            raise InvalidInputError("a NIfTI output needs a .nii or .nii.gz name", fix="rename the output", path=p)
        return _save_nifti(volume, p, overwrite=overwrite, inputs=inputs, nifti2=fmt == "nifti2")
    want = (".mha", ".mhd") if fmt == "metaimage" else (".nrrd", ".nhdr")
    if not p.name.lower().endswith(want):
        raise InvalidInputError(f"a {fmt} output needs a {' or '.join(want)} name", fix="rename the output", path=p)
    return _save_itk(volume, p, overwrite=overwrite, inputs=inputs, fmt=fmt)
