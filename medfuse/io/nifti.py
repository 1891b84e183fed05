"""NIfTI (nibabel) and MetaImage/NRRD (SimpleITK) readers.

* NIfTI-1 and NIfTI-2, ``.nii``/``.nii.gz``/``.img``+``.hdr``: the sform is used when its code
  is > 0, else the qform (nibabel's ``get_best_affine``); ``scl_slope``/``scl_inter`` are applied
  (integer data without scaling stays integer, so voxels are exact). Big-endian data is
  converted to native byte order.
* Geometry that tools read differently is not used silently: a ``MedfuseWarning`` when the sform and qform
  disagree, when SimpleITK (ITK: pixdim spacing, sometimes the qform) places the grid elsewhere (measured, over
  :data:`GEOMETRY_TOL_MM`), for zero/negative pixdim under a qform, for codes 0 and for Analyze 7.5 (no
  orientation). NaN/inf transforms, shear and colour (RGB) voxels are refused with typed errors; a sheared or
  singular sform beside a valid qform is read through the qform with a warning, as ITK reads it.
* The NIfTI space of the transform used (its xform code: sform code if > 0, else qform code) is recorded as
  ``provenance["nifti_space"]`` (``"scanner"``, ``"aligned"``, ``"talairach"``, ``"mni"`` or ``"template"``;
  nothing for code 0), so that a template-space image is written back with its code
  (:func:`nifti_space_code`).
* ``.mha``/``.mhd``/``.nrrd``/``.nhdr`` via SimpleITK, geometry as ITK reads it (MetaImage: ``TransformMatrix``
  and ``Offset``; ``AnatomicalOrientation`` is a label ITK ignores). An NRRD whose ``space`` names no patient
  orientation (``scanner-xyz``, ``3D-right-handed``, none) is read as LPS with a ``MedfuseWarning``. NRRD
  ``space units`` in metres, cm, microns or nm are converted to mm with a ``MedfuseWarning`` (ITK ignores them),
  as a NIfTI's ``xyzt_units`` are. SimpleITK reads with ``LC_NUMERIC`` set to "C" (:mod:`._c_locale`): under a
  decimal-comma locale (napari's Qt sets one from LANG) ITK read an NRRD's 4.5 mm spacing as 4 mm.
* Paths reach SimpleITK as UTF-8 text when their bytes (``os.fsencode``) are UTF-8, also under ``LC_ALL=C``
  where Python holds such names with surrogate escapes; names whose bytes are not UTF-8 are read through a link.
* Modality and unit: the ``modality``/``unit`` arguments win; otherwise what medfuse's writer
  stored is read back (NIfTI ``descrip`` ``"medfuse modality=PT unit=SUVbw"``; MetaImage/NRRD
  metadata keys ``medfuse_modality``/``medfuse_unit``); otherwise, for NIfTI, a BIDS JSON sidecar's
  ``Modality`` (and a PET's ``Units``) as dcm2niix writes it (a CT is then HU); otherwise ``unknown``/``arbitrary``.
  A CT named by ``modality=`` with no stored unit is HU when it holds values below -100.
* PET SUV: a NIfTI PET in Bq/mL whose PET-BIDS sidecar gives the injected activity, body weight, radionuclide and
  times is scaled to SUVbw (:mod:`.pet_bids`, through :mod:`.suv`); ``suv="none"`` keeps Bq/mL.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Sequence, Tuple, Union

import numpy as np

from .._checks import user_stacklevel
from ..errors import (GeometryError, InvalidInputError, MedfuseError, MedfuseWarning, MultipleSeriesError,
                      UnreadableFileError)
from ..volume import LPS_TO_RAS, Volume, _check_affine, affine_from_geometry
from ._c_locale import c_numeric_locale
from .suv import KIND_UNITS

__all__ = ["load_image", "load_image_volumes", "format_tag", "parse_tag", "lbm_formula", "parse_lbm_formula",
           "nifti_space_code", "NIFTI_SPACES",
           "NIFTI_SUFFIXES", "ITK_SUFFIXES"]

PathLike = Union[str, os.PathLike]
NIFTI_SUFFIXES = (".nii", ".nii.gz", ".img", ".hdr")
ITK_SUFFIXES = (".mha", ".mhd", ".nrrd", ".nhdr")
_TAG_RE = re.compile(r"medfuse\s+modality=(\S+)\s+unit=(\S+)")

#: NIfTI xform codes 1..5 by nibabel's names (``nibabel.nifti1.xform_codes``); code 0 ("unknown") is not a space.
NIFTI_SPACES = ("scanner", "aligned", "talairach", "mni", "template")


#: Whether SimpleITK must be given ASCII paths. On Windows ITK opens files by their name in the ANSI code page,
#: so the UTF-8 bytes SimpleITK passes for ``C:\\Users\\Łukasz\\a.mha`` name a file that does not exist
#: (SimpleITK issues 795 and 1255, its FAQ on "special characters").
_ITK_NEEDS_ASCII = os.name == "nt"


def _short_path(path: PathLike) -> Optional[str]:  # pragma: no cover - Windows only
    """Windows' short (8.3) form of an existing path, ASCII where the disk keeps 8.3 names; None if it has none."""
    import ctypes
    from ctypes import wintypes

    get = ctypes.windll.kernel32.GetShortPathNameW
    get.argtypes = [wintypes.LPCWSTR, wintypes.LPWSTR, wintypes.DWORD]
    get.restype = wintypes.DWORD
    buf = ctypes.create_unicode_buffer(32768)
    n = get(os.fspath(path), buf, len(buf))
    return buf.value if 0 < n < len(buf) else None


def _itk_text(path: PathLike) -> Optional[str]:
    """The text to give SimpleITK for ``path``, or None when the file's name is not UTF-8.

    SimpleITK's binding turns a str into UTF-8 bytes, and POSIX opens names by their bytes: so what counts is
    whether the name's bytes (``os.fsencode``) are UTF-8. Under ``LC_ALL=C`` without UTF-8 mode Python holds a
    name such as ``Données`` with surrogate escapes, whose ``str.encode("utf-8")`` fails although its bytes are
    UTF-8 (such MetaImage/NRRD outputs were refused as "not UTF-8 text"); decoded, it names the same file.
    """
    text = os.fspath(path)
    if isinstance(text, bytes):
        raw: Optional[bytes] = text
    elif os.name == "nt":  # names are Unicode there; itk_path finds an ASCII form
        raw = None
    else:
        try:
            raw = os.fsencode(text)
        except UnicodeEncodeError:  # text the file system encoding cannot hold: Python cannot open it either
            raw = None
    if raw is not None:
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return None
    return text


def itk_path(path: PathLike, *, writing: bool = False) -> str:
    """The path to give SimpleITK's readers and writers for ``path`` (unchanged but on Windows).

    On Windows a path with characters outside ASCII is given in its short (8.3) form: the file's own for reading,
    its existing folder's (plus the file's name, which must be ASCII) for writing. medfuse writes through temporary
    files whose names are ASCII, so only the folder matters there.

    Raises:
        UnreadableFileError (reading) or OutputWriteError (writing): the path has no ASCII form (8.3 names are
            switched off on that disk, or the file's own name is not ASCII when writing).
    """
    text = _itk_text(path)
    if text is None:
        # A name with bytes that are not UTF-8 (Python keeps them as surrogates): SimpleITK's binding cannot
        # convert it and aborts the whole process (std::logic_error), napari included.
        from ..errors import OutputWriteError

        # A write error, not "exists": nothing is in the way, and another name in that folder fails the same way.
        raise (OutputWriteError if writing else UnreadableFileError)(
            "the path holds bytes that are not UTF-8 text, which SimpleITK (medfuse's MetaImage/NRRD/transform "
            "reader and writer) cannot open",
            fix="rename the file or folder to UTF-8 text, or use NIfTI (.nii.gz), which medfuse reads and writes "
                "without SimpleITK", path=Path(os.fsencode(os.fspath(path)).decode("utf-8", "backslashreplace")))
    if not _ITK_NEEDS_ASCII or text.isascii():
        return text
    p = Path(text)
    if writing:
        folder = _short_path(p.parent) if p.name.isascii() else None
        short = os.path.join(folder, p.name) if folder else None
    else:
        short = _short_path(p)
    if short and short.isascii():
        return short
    from ..errors import OutputWriteError

    problem = ("SimpleITK (medfuse's MetaImage/NRRD/transform reader and writer) cannot open a path with characters "
               "outside ASCII on Windows")
    fix = ("use a folder and name in plain ASCII letters (e.g. C:\\data\\pet.mha), or NIfTI (.nii.gz), which "
           "medfuse reads and writes without SimpleITK")
    raise (OutputWriteError if writing else UnreadableFileError)(problem, fix=fix, path=p)


@contextlib.contextmanager
def _itk_readable(p: Path, *, gz: Optional[bool] = None) -> Iterator[str]:
    """A path SimpleITK can read ``p`` through, valid inside the ``with`` block: :func:`itk_path`'s, or for a name
    holding bytes that are not UTF-8 (which SimpleITK's binding cannot convert: it aborts the process) a link with
    an ASCII name in a private temporary folder, removed on leaving.

    ``gz`` (a single-file NIfTI: whether it is gzip-compressed) links a NIfTI whose ending is not in lower case
    or does not match its compression (``X.Nii.Gz``, a gzipped ``.nii``) as ``image.nii.gz``/``image.nii``: ITK's
    NIfTI library chooses gzip by the name and printed its own lines on stderr ("mixed case extension ... is not
    valid", "bad sizeof_hdr") for such names.

    Why: medfuse writes such names (through ASCII temporary names) and must read them back. ITK finds a
    header's separate data file (MetaImage ``ElementDataFile``, NRRD ``data file``) beside the header it was
    given, so it gets a link of its own name beside the header's link (one named outside the header's folder,
    absolute or through ``..``, is refused by :func:`_itk_data_source`).

    Raises:
        UnreadableFileError: on Windows, as :func:`itk_path`; or the header names its data by a list or a
            numbered pattern (not linked), or outside its folder.
    """
    import shutil
    import tempfile

    text = os.fspath(p)
    low = p.name.lower()
    ending = next((e for e in (".nii.gz",) + NIFTI_SUFFIXES + ITK_SUFFIXES if low.endswith(e)), p.suffix.lower())
    relink = False
    if gz is not None and ending in (".nii", ".nii.gz"):
        ending = ".nii.gz" if gz else ".nii"
        relink = not p.name.endswith(ending)  # another case, or another compression than the name says
    if not relink and (_itk_text(text) is not None or os.name == "nt"):
        yield itk_path(p)
        return
    shown = Path(os.fsencode(text).decode("utf-8", "backslashreplace"))
    refuse = UnreadableFileError(
        "the path holds bytes that are not UTF-8 text, and this header's data files cannot be linked under an "
        "ASCII name for SimpleITK (medfuse's MetaImage/NRRD reader)",
        fix="rename the file or folder to UTF-8 text, or use NIfTI (.nii.gz), which medfuse reads without SimpleITK",
        path=shown)
    rel = None
    if ending in ITK_SUFFIXES:
        try:
            key, data, _ = _itk_data_source(p)  # refuses a data file named outside the header's folder
        except UnreadableFileError as e:  # e.g. a data file named through '..': not linked either; say both
            raise UnreadableFileError(f"{refuse.problem}; and {e.problem}", fix=f"{refuse.fix}; and {e.fix}",
                                      path=shown) from None
        except OSError:
            key, data = "", None  # ITK's own reading says why
        if key is None:
            raise refuse  # a list or pattern of data files (or no data field: nothing to link either)
        if data is not None:
            try:
                rel = data.relative_to(p.parent)
            except ValueError:  # not below the header's folder: refused by _itk_data_source already
                rel = None
            if rel is not None and (".." in rel.parts or not rel.parts):
                raise refuse
    elif ending in (".img", ".hdr"):
        raise refuse  # a NIfTI pair: ITK finds the other file by renaming; not linked
    folder = Path(tempfile.mkdtemp(prefix="medfuse-itk-"))  # private (mode 0700)
    try:
        if _itk_text(folder) is None:  # TMPDIR itself not UTF-8: the link's path would abort SimpleITK too
            raise refuse
        link = folder / ("image" + ending)
        if rel is not None and rel.parts[0] == link.name:
            link = folder / ("header" + ending)
        try:
            os.symlink(os.path.abspath(text), link)
            if rel is not None:
                (folder / rel).parent.mkdir(parents=True, exist_ok=True)
                os.symlink(os.path.abspath(p.parent / rel), folder / rel)
        except OSError:  # no symbolic links on this file system (or the temporary folder is full)
            raise refuse from None
        yield _itk_text(link)  # the folder's name as UTF-8 text (surrogate escapes under LC_ALL=C)
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # the links only: rmtree does not follow them


def format_tag(modality: str, unit: str, *, suv: Optional[str] = None) -> str:
    """The text medfuse stores in NIfTI ``descrip`` to carry modality and unit (≤ 80 bytes).

    Args:
        modality: the volume's modality (``MR``, ``CT``, ``PT``, ``NM``, ``unknown``).
        unit: the volume's unit (``HU``, ``SUVbw``, ...).
        suv: for an SUVlbm, the lean-body-mass formula it was made with (``lbm``: James, ``lbm_janma``:
            Janmahasatian; :func:`lbm_formula`); ignored for any other unit.

    Returns:
        ``"medfuse modality=<modality> unit=<unit>"`` (plus ``" suv=<formula>"``), which :func:`parse_tag` and
        :func:`parse_lbm_formula` read back.

    Raises:
        InvalidInputError: either is not text.
    """
    for name, value in (("modality", modality), ("unit", unit)):
        if not isinstance(value, str):
            raise InvalidInputError(f"{name} must be text, got {type(value).__name__}",
                                    fix="pass the Volume's .modality and .unit")
    tag = f"medfuse modality={modality} unit={unit}"
    return tag + f" suv={suv}" if unit == "SUVlbm" and suv in _LBM_FORMULAS else tag


def parse_tag(text: Optional[str]) -> Tuple[Optional[str], Optional[str]]:
    """Modality and unit from a :func:`format_tag` string.

    Args:
        text: a NIfTI ``descrip`` (or MetaImage/NRRD) text, or None.

    Returns:
        ``(modality, unit)``, or ``(None, None)`` when the text holds no medfuse tag.

    Raises:
        InvalidInputError: ``text`` is neither text nor None.
    """
    if text is not None and not isinstance(text, str):
        raise InvalidInputError(f"parse_tag takes text, got {type(text).__name__}",
                                fix="decode a header's bytes first, e.g. bytes(hdr['descrip']).decode('ascii')")
    m = _TAG_RE.search(text or "")
    return (m.group(1), m.group(2)) if m else (None, None)


#: The SUV kinds that name a lean-body-mass formula (medfuse.io.suv): James's and Janmahasatian's.
_LBM_FORMULAS = ("lbm", "lbm_janma")


def lbm_formula(volume: Volume) -> Optional[str]:
    """The lean-body-mass formula (``lbm`` or ``lbm_janma``) of an SUVlbm volume, from its provenance; else None.

    Why: an SUVlbm made with Janmahasatian's formula and later converted as James's (what DICOM's SUVType LBM
    alone is read as) is off by about 3 %, so every writer keeps the formula beside the unit.

    Args:
        volume: the Volume to be written.

    Returns:
        ``"lbm"`` (James) or ``"lbm_janma"`` (Janmahasatian) for an SUVlbm whose provenance records one; None
        for any other unit, or an SUVlbm whose formula is not recorded.

    Raises:
        InvalidInputError: ``volume`` is not a Volume.
    """
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"lbm_formula takes a Volume, got {type(volume).__name__}",
                                fix="pass the Volume to be written")
    kind = volume.provenance.get("suv") if volume.unit == "SUVlbm" else None
    return kind if kind in _LBM_FORMULAS else None


def parse_lbm_formula(text: Optional[str]) -> Optional[str]:
    """The lean-body-mass formula a :func:`format_tag` string names for an SUVlbm, else None.

    Args:
        text: a NIfTI ``descrip`` (or MetaImage/NRRD) text, or None.

    Returns:
        ``"lbm"`` or ``"lbm_janma"`` when the text is a medfuse tag of unit SUVlbm naming one; else None.

    Raises:
        InvalidInputError: ``text`` is neither text nor None.
    """
    parse_tag(text)  # the same check of the argument
    m = _TAG_RE.search(text or "")
    if m is None or m.group(2) != "SUVlbm":
        return None
    f = re.match(r"\s+suv=(\S+)", (text or "")[m.end():])
    return f.group(1) if f and f.group(1) in _LBM_FORMULAS else None


def _space_name(hdr, used: Optional[str] = None) -> Optional[str]:
    """Name of the space of the transform ``get_best_affine`` used (``used="qform"``: of the qform), or ``None``
    (code 0, Analyze, odd codes)."""
    if "sform_code" not in hdr:  # Analyze 7.5 has no xforms
        return None
    code = int(hdr["qform_code"]) if used == "qform" else int(hdr["sform_code"]) or int(hdr["qform_code"])
    return NIFTI_SPACES[code - 1] if 1 <= code <= len(NIFTI_SPACES) else None


def nifti_space_code(volume: Volume) -> int:
    """The NIfTI xform code to write for ``volume``: its recorded ``provenance["nifti_space"]``, else 1 (scanner).

    Code 1 is also right for a volume read from a file with code 0: medfuse used (and warned about) an affine
    guessed from the voxel sizes, and code 1 makes other tools use that same affine rather than guess their own.

    Args:
        volume: the Volume to be written.

    Returns:
        The code, 1 to 5.

    Raises:
        InvalidInputError: ``volume`` is not a Volume, or its recorded space is not one of :data:`NIFTI_SPACES`.
    """
    if not isinstance(volume, Volume):
        raise InvalidInputError(f"nifti_space_code takes a medfuse Volume, got {type(volume).__name__}",
                                fix="pass the Volume to be written")
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


def _pair_files(p: Path) -> Optional[Tuple[Path, Optional[Path]]]:
    """For one file of an Analyze/NIfTI pair (``.img``/``.hdr``, any case): ``(image file, header file)``, the
    partner found whatever the case of its ending (``None`` when it is not beside it); ``None`` for other names.

    Why: nibabel rebuilds both names from a lower-cased ending unless the ending is all upper case, so
    ``scan.Img`` + ``scan.Hdr`` (or ``scan.img`` + ``scan.Hdr``) were reported as a damaged file.

    Raises:
        UnreadableFileError: more than one file beside it matches the partner's name in different cases.
    """
    name = p.name
    low = name.lower()
    if not low.endswith((".img", ".hdr")):
        return None
    stem, ending = name[:-4], name[-4:]
    other = ".hdr" if ending.lower() == ".img" else ".img"
    # An all-lower or all-upper ending: the partner in that case first, as nibabel takes it.
    exact = p.with_name(stem + (other.upper() if ending.isupper() else other))
    if ending in (ending.lower(), ending.upper()) and exact.is_file():
        partner: Optional[Path] = exact
    else:
        try:
            # The same stem, the ending in any case (a stem differing in case is another image's).
            found = sorted(e for e in os.listdir(p.parent) if len(e) == len(name) and e[:-4] == stem
                           and e[-4:].lower() == other and (p.parent / e).is_file())
        except OSError:
            found = []
        if len(found) > 1:
            raise UnreadableFileError(f"more than one file could be this pair's {other} file ({', '.join(found)}; "
                                      "endings differing only in case)", fix=f"keep one {other} file beside it",
                                      path=p)
        partner = p.parent / found[0] if found else None
    return (p, partner) if ending.lower() == ".img" else (partner, p)


def _same_case_pair(image: Path, header: Path) -> bool:
    """Whether nibabel and ITK find this pair's partner themselves: both endings all lower or all upper case."""
    return (image.name[-4:], header.name[-4:]) in ((".img", ".hdr"), (".IMG", ".HDR"))


def _load_pair(image: Path, header: Path):
    """nibabel's image for a pair whose two names nibabel would not rebuild (endings of mixed case), read through
    an explicit file map, with the image class ``nibabel.load`` picks for these header bytes."""
    from nibabel.filebasedimages import ImageFileError
    from nibabel.imageclasses import all_image_classes

    with open(header, "rb") as fh:
        sniff = fh.read(1024)
    for klass in all_image_classes:  # nibabel.load's order: NIfTI-1, NIfTI-2, then the Analyze flavours
        if ".img" not in getattr(klass, "valid_exts", ()) or len(sniff) < klass._meta_sniff_len:
            continue
        if klass.header_class.may_contain_header(sniff):
            mapping = {"image": str(image), "header": str(header), "mat": str(image.with_suffix(".mat"))}
            names = {t: mapping[t] for t, _ in klass.files_types}
            return klass.from_file_map(klass.make_file_map(names))
    raise ImageFileError("not a NIfTI or Analyze header")


def _nib_load(p: Path, gz: Optional[bool]):
    """nibabel's image for a NIfTI file, whatever the case of its ending and whether it is really gzipped.

    nibabel rebuilds the file name from a lower-cased ending ("b.Nii.Gz" -> "b.nii.Gz", which does not exist), and
    chooses gzip or not by the name alone, so a single-file NIfTI whose ending is not in lower case, or whose
    compression is not the one its name says (``gz``: it is gzipped; None: unknown, as the name says), is read from
    its bytes instead.
    """
    import gzip

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError
    from nibabel.wrapstruct import WrapStructError

    name = p.name
    pair = _pair_files(p)
    if pair is not None and all(pair):
        if not _same_case_pair(*pair):
            return _load_pair(*pair)
    ending = ".nii.gz" if name.lower().endswith(".nii.gz") else ".nii" if name.lower().endswith(".nii") else None
    if gz is None:
        gz = ending == ".nii.gz"
    if ending is None or (name.endswith(ending) and (ending == ".nii.gz") == gz):
        return nib.load(str(p))
    if (ending == ".nii.gz") != gz:
        # ITK reads these (zlib passes plain data through), nibabel and FSL do not: read, and say so.
        warnings.warn(f"{p}: the file is named {ending} but is {'gzip-compressed' if gz else 'not gzip-compressed'}; "
                      f"medfuse reads it, but nibabel-based tools (FSL, nilearn) refuse it: rename it to end in "
                      f"{'.nii.gz' if gz else '.nii'}", MedfuseWarning, stacklevel=user_stacklevel())
    with (gzip.open if gz else open)(p, "rb") as fh:
        # Only as many bytes as the header describes: a whole-file read decompressed a 3 MB gzip bomb (a small
        # image, then gigabytes of zeros) into memory before anything was checked.
        head = fh.read(540)
        need = _described_bytes(head)
        if need is not None:
            _refuse_impossible_size(need, os.path.getsize(p), gz, "an image", p,
                                    fix="copy or export the file again (a complete file holds its voxels)")
        data = head + (fh.read(need - len(head)) if need is not None and need > len(head) else b"")
    for cls in (nib.Nifti1Image, nib.Nifti2Image):
        try:
            return cls.from_bytes(data)
        except (HeaderDataError, ImageFileError, ValueError, WrapStructError):
            continue
    raise ImageFileError("neither a NIfTI-1 nor a NIfTI-2 header")


def _described_bytes(head: bytes) -> Optional[int]:
    """Header plus voxel bytes a NIfTI-1/2 header (the file's first 540 bytes) describes, or None if it is none.

    Only the fixed header is parsed (348 or 540 bytes, by its ``sizeof_hdr`` in either byte order): extensions
    (AFNI's run to kilobytes) lie beyond it, up to ``vox_offset``, and are read with the voxels.
    """
    import nibabel as nib

    for cls, size in ((nib.Nifti1Header, 348), (nib.Nifti2Header, 540)):
        if len(head) < size or size not in (int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")):
            continue
        try:
            hdr = cls(binaryblock=head[:size], check=False)
            shape = [int(x) for x in hdr.get_data_shape()]
            if any(x < 0 for x in shape):
                return None  # nibabel's own reading refuses it, typed
            offset = max(int(hdr.get_data_offset()), size + 4)  # 0 (invalid) is read as just after the header
            return offset + int(np.prod(shape, dtype=object)) * int(hdr.get_data_dtype().itemsize)
        except Exception:  # a damaged header: nibabel's reading of the whole says why
            return None
    return None


#: Deflate (gzip, zlib) never compresses by more than 1032:1, so a compressed file of n bytes holds at most about
#: 1032 n bytes of data; a header that claims more cannot be true, and is refused before anything is allocated.
_MAX_DEFLATE_RATIO = 1100


def _size_text(n: int) -> str:
    """A byte count for messages: exact below 100 kB, else in kB/MB/GB to 3 digits."""
    if n < 100_000:
        return f"{n} bytes"
    unit, k = next((u, k) for u, k in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)) if n >= k)
    return f"{n / k:.3g} {unit}"


def _refuse_impossible_size(need: int, have: int, compressed: bool, what: str, p: Path, fix: str,
                            where: str = "the file") -> None:
    """Refuse a header that claims more voxel data than the file can hold (a truncated file, or a damaged header).

    Why: nibabel and ITK allocate the claimed size before they read, so a 1 kB file claiming 10^9 voxels took 4 GB
    of memory (or the process) before failing.

    Raises:
        UnreadableFileError: ``need`` bytes cannot come from ``have`` bytes (raw, or deflate-compressed).
    """
    if need <= (have * _MAX_DEFLATE_RATIO if compressed else have):
        return
    needed, held = _size_text(need), _size_text(have)
    if needed == held:  # "9.83 MB needed, holds only 9.83 MB": a file short by a few kB reads as complete
        needed, held = f"{need:,} bytes", f"{have:,} bytes"
    raise UnreadableFileError(f"the header describes {what} ({needed} of voxel data), but {where} holds "
                              f"only {held}{' compressed' if compressed else ''}: it is truncated, or its "
                              "header is damaged", fix=fix, path=p)


def _image_file(img, p: Path, part: str = "image") -> str:
    """The file nibabel's image ``img`` (of ``p``) holds its ``part`` (``image`` or ``header``) in: ``p`` itself
    for a single file read from its bytes (a name nibabel cannot open: ``X.NII.GZ``, a gzipped ``.nii``), whose
    image has no file name.

    Why: the checks on the file (size, gzip checksum, raw pixdim) were skipped for such names, so a damaged
    ``X.NII.GZ`` loaded as wrong voxels where ``x.nii.gz`` was refused.
    """
    if part not in img.file_map:
        part = "image"
    return img.file_map[part].filename or os.fspath(p)


def _check_nifti_size(img, p: Path) -> None:
    """Refuse a NIfTI whose header claims more data than its image file holds, before nibabel allocates it."""
    fname = _image_file(img, p)
    if not os.path.isfile(fname):
        # Why: a .hdr whose .img was not copied with it ended in a bare FileNotFoundError from the open below.
        raise UnreadableFileError(f"the image data file its header goes with ('{Path(fname).name}') is missing: "
                                  f"{fname}", fix="keep the header and its data file together (copy the "
                                  f"{Path(fname).name} file beside it), or load a single-file .nii/.nii.gz", path=p)
    hdr = img.header
    need = int(np.prod([int(x) for x in img.shape], dtype=object)) * int(hdr.get_data_dtype().itemsize)
    try:
        with open(fname, "rb") as fh:
            compressed = fh.read(2) == b"\x1f\x8b"
        have = os.path.getsize(fname)
    except OSError:  # unreadable (permissions): nibabel's own read below says so, typed
        return
    shape = "x".join(str(int(x)) for x in img.shape)
    _refuse_impossible_size(need, have, compressed, f"{shape} voxels of {hdr.get_data_dtype()}",
                            Path(fname), fix="copy or export the file again (a complete file holds its voxels)")


#: How far past the data its header describes a gzip stream is decompressed to reach its checksum (at least; twice
#: the described size for larger images). A gzip bomb (a small image, then gigabytes of zeros) costs no more.
_GZIP_CHECK_SLACK = 16 << 20


def _verify_gzip(fname: Optional[str], described: Optional[int] = None) -> None:
    """Check a gzip-compressed image file's CRC-32 and length, which nibabel never reads.

    Why: nibabel stops decompressing once it has the voxels, before the gzip trailer, so a ``.nii.gz`` damaged in
    the middle (a bit flipped in a copy or a transfer) could load as wrong voxels without a word. This decompresses
    the file once more into nothing (about +0.05 s on a 240x240x155 BraTS volume) and lets zlib check the trailer.
    A stream that runs on far past the ``described`` bytes (header and voxels) is not followed to its end: the
    image is used with a :class:`MedfuseWarning` that its checksum was not checked.

    Raises:
        UnreadableFileError: the file's checksum or length does not match its data.
    """
    import gzip
    import zlib

    if fname is None or not os.path.isfile(fname):
        return
    with open(fname, "rb") as fh:
        if fh.read(2) != b"\x1f\x8b":
            return
    cap = None if described is None else described + max(described, _GZIP_CHECK_SLACK)
    done = 0
    try:
        with gzip.open(fname, "rb") as g:  # reads every member to its end, where the trailer is checked
            while True:
                chunk = len(g.read(1 << 22))
                if not chunk:
                    break
                done += chunk
                if cap is not None and done > cap:
                    warnings.warn(f"{fname}: the file's gzip data run on for more than {_size_text(done - described)} "
                                  "past the image its header describes; medfuse read the image but did not "
                                  "decompress the rest to reach the file's checksum, so damage to the voxels is not "
                                  "ruled out: re-save the image with medfuse.save", MedfuseWarning, stacklevel=user_stacklevel())
                    return
    except (OSError, EOFError, zlib.error) as e:  # BadGzipFile is an OSError
        raise UnreadableFileError(f"the file is damaged: its gzip data does not match its checksum or length "
                                  f"({type(e).__name__})", fix="copy or export the file again (the voxels read "
                                  "would be wrong)", path=Path(fname)) from None


@contextlib.contextmanager
def _nibabel_notes() -> Iterator[List[str]]:
    """Collect what nibabel logs about a header it repairs (``nibabel.global``: "pixdim[1,2,3] should be non-zero;
    setting 0 dims to 1", "vox offset ... too low") in this thread, instead of its own lines on stderr.

    Why: they reached the user as bare lines beside medfuse's messages; the caller says them once, as a
    :class:`MedfuseWarning` that names the file. Other threads' records pass (the filter only drops this one's).
    """
    import logging
    import threading

    notes: List[str] = []
    me = threading.get_ident()

    class _Catch(logging.Filter):
        def filter(self, record: logging.LogRecord) -> bool:
            if record.thread != me:
                return True
            notes.append(record.getMessage().strip())
            return False

    catch = _Catch()
    logger = logging.getLogger("nibabel.global")
    logger.addFilter(catch)  # a logger's filters run before its handlers: a dropped record prints nothing
    try:
        yield notes
    finally:
        logger.removeFilter(catch)


def _refuse_bad_dims(p: Path, gz: Optional[bool]) -> None:
    """Refuse a NIfTI-1/2 (or Analyze) header whose ``dim`` field cannot describe an image, naming the entry.

    Why: a negative size (``dim[2] = -5``) reached NumPy and was reported as a truncated file ("OverflowError",
    "ValueError"), and a ``dim[0]`` outside 1..7 made nibabel guess the wrong byte order ("not a valid NIfTI").
    The byte order is taken from ``sizeof_hdr`` (348 or 540), which a damaged ``dim`` does not change. A size of
    0 is left to the zero-size check.

    Raises:
        UnreadableFileError: ``dim[0]`` is not 1 to 7, or one of ``dim[1..dim[0]]`` is negative.
    """
    import gzip
    import struct
    import zlib

    pair = _pair_files(p)
    head_file = pair[1] if pair is not None and pair[1] is not None else p
    try:
        with open(head_file, "rb") as fh:
            packed = fh.read(2) == b"\x1f\x8b"
        with (gzip.open if packed or (gz and head_file == p) else open)(head_file, "rb") as fh:
            head = fh.read(540)
    except (OSError, EOFError, zlib.error):
        return  # the reader says what is wrong with the file
    if len(head) < 348:
        return
    for order in "<>":
        size = struct.unpack(order + "i", head[:4])[0]
        if size == 348:  # NIfTI-1 / Analyze: 8 int16 at byte 40
            dims = struct.unpack(order + "8h", head[40:56])
            break
        if size == 540 and len(head) >= 540:  # NIfTI-2: 8 int64 at byte 16
            dims = struct.unpack(order + "8q", head[16:80])
            break
    else:
        return  # not a header this knows: nibabel says so
    fix = ("repair the header (dim[0] = the number of axes, dim[1..dim[0]] = the image's size along each; e.g. "
           "nibabel's header.set_data_shape) or export the image again")
    if not 1 <= dims[0] <= 7:
        raise UnreadableFileError(f"not a valid NIfTI header: its dimension field is invalid: dim[0] (the number "
                                  f"of axes) is {dims[0]}, where NIfTI allows 1 to 7", fix=fix, path=p)
    bad = [(i, dims[i]) for i in range(1, dims[0] + 1) if dims[i] < 0]
    if bad:
        shown = ", ".join(f"dim[{i}] is {v}" for i, v in bad)
        raise UnreadableFileError(f"not a valid NIfTI header: its dimension field is invalid: {shown} (a size "
                                  f"along an axis cannot be negative; dim = {list(dims[:dims[0] + 1])})", fix=fix,
                                  path=p)


def _memory_error(p: Path, shape) -> UnreadableFileError:
    """The error for an image too large for the free memory (it was reported as "truncated" before)."""
    need = f" ({'x'.join(str(int(x)) for x in shape)} voxels)" if shape else ""
    return UnreadableFileError(f"there is not enough free memory to hold the image{need}",
                               fix="close other programs, or crop or downsample the image with another tool first",
                               path=p)


def _read_nifti(p: Path, gz: Optional[bool]) -> Tuple[np.ndarray, np.ndarray, Optional[str], Optional[str],
                                                      Optional[str], Optional[str]]:
    from nibabel.filebasedimages import ImageFileError
    from nibabel.spatialimages import HeaderDataError

    pair = _pair_files(p)
    if pair is not None and not all(pair):
        header = pair[1]
        want = p.name[:-4] + (".img" if header is not None else ".hdr")
        what = "image data file its header" if header is not None else "header file its image data"
        # Why here: nibabel's error for a lone half of a pair read as "not a valid NIfTI file (or truncated)".
        raise UnreadableFileError(f"the {what} goes with ('{want}', in any case) is missing beside it",
                                  fix=f"keep the .hdr and .img files together (copy {want} beside it), or load a "
                                      "single-file .nii/.nii.gz", path=p)
    _refuse_bad_dims(p, gz)
    try:
        with _nibabel_notes() as notes:
            img = _nib_load(p, gz)
    except MemoryError:
        raise _memory_error(p, None) from None
    except (ImageFileError, EOFError, OSError, ValueError, HeaderDataError) as e:
        header_fault = _header_fault(str(e))
        if header_fault is not None:  # a whole file with one bad header field: "truncated" sent users to copy it again
            raise UnreadableFileError(header_fault[0], fix=header_fault[1], path=p) from None
        kind = "empty" if p.stat().st_size == 0 else "not a valid NIfTI file (or truncated)"
        raise UnreadableFileError(f"the file is {kind} ({type(e).__name__})",
                                  fix="check the file was copied completely; re-export it", path=p) from None
    if notes:
        warnings.warn(f"{p}: the NIfTI header breaks the standard, and nibabel repaired it while reading "
                      f"({'; '.join(dict.fromkeys(notes))}); medfuse used the repaired values: check the image's "
                      "voxel sizes and position, and re-save it with medfuse.save for a valid header",
                      MedfuseWarning, stacklevel=user_stacklevel())
    _check_nifti_size(img, p)
    try:
        arr = np.asanyarray(img.dataobj)
    except MemoryError:
        raise _memory_error(p, img.shape) from None
    except Exception as e:  # truncated gzip/short data: zlib.error, EOFError, OSError, ValueError
        raise UnreadableFileError(f"the voxel data cannot be read; the file looks truncated ({type(e).__name__})",
                                  fix="copy or export the file again", path=p) from None
    _verify_gzip(_image_file(img, p), int(img.header.get_data_offset()) + int(arr.nbytes))
    hdr = img.header
    _refuse_colour(arr, p)
    aff = np.asarray(hdr.get_best_affine() if hasattr(hdr, "get_best_affine") else img.affine, dtype=float)
    if "sform_code" not in hdr:
        warnings.warn(f"{p}: an Analyze 7.5 file {ANALYZE_NOTE}", MedfuseWarning, stacklevel=user_stacklevel())
    elif int(hdr["sform_code"]) == 0 and int(hdr["qform_code"]) == 0:
        warnings.warn(f"{p}: a NIfTI file {NO_FORM_NOTE}", MedfuseWarning, stacklevel=user_stacklevel())
    # World coordinates in mm, whatever the file's spatial unit (medfuse and ITK work in mm).
    xyz_unit = hdr.get_xyzt_units()[0] if hasattr(hdr, "get_xyzt_units") else "unknown"
    to_mm = {"meter": 1000.0, "micron": 0.001}.get(xyz_unit, 1.0)
    if to_mm != 1.0:
        aff = np.diag([to_mm, to_mm, to_mm, 1.0]) @ aff
    _refuse_non_finite(hdr, aff, p)
    aff_lps = LPS_TO_RAS @ np.asarray(aff, dtype=float)
    space = _space_name(hdr)
    qform = _qform_instead(hdr, aff_lps, to_mm, p)
    if qform is not None:
        aff_lps, space = qform, _space_name(hdr, "qform")
    elif "sform_code" in hdr and (int(hdr["sform_code"]) or int(hdr["qform_code"])) and _valid(aff_lps):
        _warn_ambiguous_geometry(img, aff_lps, to_mm, p)
    descrip = hdr["descrip"].item().decode("latin-1", "ignore") if "descrip" in hdr else ""
    mod, unit = parse_tag(descrip)
    return np.asarray(arr), aff_lps, mod, unit, space, parse_lbm_formula(descrip)


_RESAVE_WITH_ITK = ("re-save it with an ITK-based tool, which repairs it: in Python, SimpleITK.WriteImage("
                    "SimpleITK.ReadImage('IN.nii'), 'OUT.nii.gz')")


def _header_fault(message: str) -> Optional[Tuple[str, str]]:
    """(problem, fix) for nibabel's errors about one header field of a whole file, else None."""
    if "w2 should be positive" in message:
        return ("the NIfTI qform's rotation quaternion (quatern_b, quatern_c, quatern_d) is longer than 1 (values "
                "rounded when written?), which nibabel refuses; ITK renormalises it", _RESAVE_WITH_ITK)
    if "invalid intercept" in message or "invalid slope" in message.lower():
        return ("the NIfTI header's intensity scaling (scl_slope / scl_inter) holds NaN or infinity",
                "set the bad field to 0 in the header (nibabel: img.header['scl_inter'] = 0), or " + _RESAVE_WITH_ITK)
    return None


def _qform(hdr) -> np.ndarray:
    """The header's qform; a quaternion (quatern_b, c, d) a little longer than 1, which nibabel refuses, is
    renormalised first, as the NIfTI reference library and ITK do (a valid sform beside such a qform was an
    internal error)."""
    try:
        return hdr.get_qform()
    except ValueError:
        fixed = hdr.copy()
        bcd = np.array([float(fixed[k]) for k in ("quatern_b", "quatern_c", "quatern_d")])
        norm = float(np.linalg.norm(bcd))
        if not np.isfinite(norm) or norm == 0.0:
            raise
        for k, v in zip(("quatern_b", "quatern_c", "quatern_d"), bcd / norm):
            fixed[k] = v
        return fixed.get_qform()


def _qform_instead(hdr, aff_lps: np.ndarray, to_mm: float, p: Path) -> Optional[np.ndarray]:
    """The qform's LPS affine, with a warning, when the sform (code > 0) is sheared or singular but the qform
    (code > 0) is a valid rigid grid; else ``None`` (the sform is used, or refused).

    Why: ITK (ANTs, Slicer, ITK-SNAP) reads such a file through its qform; refusing it outright left no way to
    load a file every ITK tool opens. nibabel and FSL use the sheared sform, hence the warning.
    """
    if _transform_used(hdr) != "sform" or int(hdr["qform_code"]) <= 0 or _valid(aff_lps):
        return None
    qform = LPS_TO_RAS @ (np.diag([to_mm, to_mm, to_mm, 1.0]) @ np.asarray(_qform(hdr), dtype=float))
    if not _valid(qform):
        return None
    problem = "sheared"
    try:
        _check_affine(aff_lps)
    except GeometryError as e:
        problem = "sheared" if "sheared" in e.problem else "singular"
    then = ("resample it onto an orthogonal grid with a tool that applies the sform" if problem == "sheared" else
            "repair the sform (or set sform_code 0) so that every tool reads the qform")

    warnings.warn(f"{p}: the NIfTI sform (code {int(hdr['sform_code'])}) is {problem}, which medfuse cannot use; "
                  f"medfuse uses the qform (code {int(hdr['qform_code'])}) instead, as ITK does, so the sform's "
                  f"{'shear is' if problem == 'sheared' else 'values are'} ignored (nibabel and FSL use the sform, "
                  f"and place voxels elsewhere); check the image's position, or {then}", MedfuseWarning,
                  stacklevel=user_stacklevel())
    return qform


#: Two readings of one header are the same geometry when every grid corner lies within this distance (mm). Real
#: files (dcm2niix, SPM, BraTS) differ by at most 2e-4 mm (float32 rounding); 0.01 mm is far below any voxel.
GEOMETRY_TOL_MM = 0.01


def _corner_distance(a: np.ndarray, b: np.ndarray, shape) -> float:
    """Largest distance (mm) between where two 4x4 affines put the corners of a grid of ``shape``."""
    size = (list(shape[:3]) + [1, 1, 1])[:3]
    corners = np.array([[i, j, k, 1.0] for i in (0, size[0] - 1) for j in (0, size[1] - 1) for k in (0, size[2] - 1)])
    return float(np.linalg.norm(((a - b) @ corners.T)[:3], axis=0).max())


def _valid(aff: np.ndarray) -> bool:
    """True for an affine a Volume accepts (a sheared or singular one is refused later: no warning before that)."""
    try:
        _check_affine(aff)
    except GeometryError:
        return False
    return True


def _transform_used(hdr) -> str:
    """Which header transform nibabel's ``get_best_affine`` uses: ``"sform"``, ``"qform"`` or ``"pixdim"``."""
    if "sform_code" not in hdr:
        return "pixdim"
    return "sform" if int(hdr["sform_code"]) > 0 else "qform" if int(hdr["qform_code"]) > 0 else "pixdim"


def _refuse_non_finite(hdr, aff: np.ndarray, p: Path) -> None:
    """A NaN or infinite transform is refused naming the header fields it came from (not just "the affine").

    Raises:
        GeometryError: the transform used holds NaN or infinite values.
    """
    if np.all(np.isfinite(aff)):
        return
    fields = {"sform": "sform (srow_x, srow_y, srow_z)",
              "qform": "qform (quatern_b/c/d, qoffset_x/y/z, pixdim)",
              "pixdim": "voxel sizes (pixdim)"}[_transform_used(hdr)]
    raise GeometryError(f"the header's {fields} holds NaN or infinite values, so the image has no position",
                        fix="repair the header (write a valid sform/qform, e.g. with nibabel's set_sform/set_qform) "
                            "or export the image again", path=p)


def _refuse_colour(arr: np.ndarray, p: Path) -> None:
    """RGB24/RGBA32 NIfTI voxels (a structured dtype) are refused in words, not as "not numeric".

    Raises:
        InvalidInputError: the voxels are colour (several channels per voxel).
    """
    if arr.dtype.names:
        raise InvalidInputError(f"the voxels are colour ({'/'.join(arr.dtype.names)} channels, NIfTI RGB), not scalar",
                                fix="convert the image to grey (or keep one channel) before loading it into medfuse",
                                path=p)


def _itk_nifti_affine(p: Path) -> Optional[np.ndarray]:
    """The LPS affine SimpleITK reads from the file's header (no voxels are read), or ``None`` when it reads none.

    ITK drops the third axis of a 2-D file (its slice position), so a 2-D file gives ``None`` too.
    """
    import SimpleITK as sitk

    pair = _pair_files(p)
    if pair is not None and all(pair) and not _same_case_pair(*pair):
        return None  # ITK's NIfTI library cannot open it (and says so on stderr): no cross-check
    try:
        with open(p, "rb") as fh:
            gz = fh.read(2) == b"\x1f\x8b"
    except OSError:
        return None
    reader = sitk.ImageFileReader()
    reader.SetImageIO("NiftiImageIO")
    shown = sitk.ProcessObject.GetGlobalWarningDisplay()
    try:
        # Through a link: a name that is not UTF-8, X.Nii.Gz, a gzipped .nii (a pair whose name is not UTF-8: skipped).
        with _itk_readable(p, gz=gz) as given:
            reader.SetFileName(given)
            sitk.ProcessObject.SetGlobalWarningDisplay(False)  # ITK's notes on stderr; medfuse warns in words
            with c_numeric_locale():  # every SimpleITK read: NRRD's numbers follow LC_NUMERIC (see _c_locale)
                reader.ReadImageInformation()
    except MedfuseError:  # no ASCII form on Windows, or a pair whose name is not UTF-8: the cross-check is skipped
        return None
    except RuntimeError:
        return None
    finally:
        sitk.ProcessObject.SetGlobalWarningDisplay(shown)
    n = reader.GetDimension()
    if n < 3:
        return None
    d = np.asarray(reader.GetDirection(), dtype=float).reshape(n, n)[:3, :3]
    return affine_from_geometry(reader.GetSpacing()[:3], reader.GetOrigin()[:3], d)


#: How an Analyze 7.5 header is described (after "an Analyze 7.5 file" or "the nibabel image is").
ANALYZE_NOTE = ("(no NIfTI header) stores no orientation: medfuse uses nibabel's guess (radiological LAS voxel order, "
                "origin from the header's origin field or the grid centre), which other tools (ITK, Slicer) do not "
                "share; check left/right before registering or fusing")

#: How a NIfTI header with both form codes 0 is described (after "a NIfTI file" or "the nibabel image").
NO_FORM_NOTE = ("with neither a qform nor an sform (both codes 0): its orientation and origin are a guess from the "
                "voxel sizes alone; check them before registering or fusing")


def form_gap_note(hdr, shape, to_mm: float) -> Optional[str]:
    """A note when a NIfTI header's sform and qform (both codes > 0) place the grid apart, else None."""
    if "sform_code" not in hdr or int(hdr["sform_code"]) <= 0 or int(hdr["qform_code"]) <= 0:
        return None
    gap = to_mm * _corner_distance(hdr.get_sform(), _qform(hdr), shape)
    if gap <= GEOMETRY_TOL_MM:
        return None
    return (f"its sform (code {int(hdr['sform_code'])}) and qform (code {int(hdr['qform_code'])}) place the grid up "
            f"to {gap:.3g} mm apart")


def _warn_ambiguous_geometry(img, aff_lps: np.ndarray, to_mm: float, p: Path) -> None:
    """One :class:`MedfuseWarning` when the header gives other tools another geometry than the one medfuse uses.

    Three ways a valid-looking header is read differently: an sform and a qform (both codes > 0) that place the
    grid apart (nibabel and FSL use the sform; ITK may use the qform), voxel sizes (pixdim) that differ from the
    sform's (ITK takes spacing from pixdim), and zero or negative pixdim under a qform (nibabel takes
    ``|pixdim|`` and 1 for 0; the NIfTI standard requires them positive). The distance SimpleITK's reading is
    from medfuse's is measured, not guessed.
    """
    import nibabel as nib

    hdr = img.header
    shape = img.shape
    used = _transform_used(hdr)
    notes = []
    gap = form_gap_note(hdr, shape, to_mm)
    if gap is not None:
        notes.append(gap)
    n = max(1, min(3, int(hdr["dim"][0])))
    pixdim = _raw_pixdim(img, p)
    pixdim = None if pixdim is None else pixdim[1:1 + n]
    if used == "qform" and pixdim is not None and np.any(pixdim <= 0):
        notes.append(f"its voxel sizes (pixdim {', '.join(f'{x:g}' for x in pixdim)}) are not all positive, as the "
                     "qform needs; medfuse (as nibabel) uses their absolute values, 1 mm for 0")
    if not isinstance(hdr, nib.Nifti2Header):  # ITK 5.4's reader takes NIfTI-1 only
        itk = _itk_nifti_affine(p)
        if itk is not None:
            gap = _corner_distance(itk, aff_lps, shape)
            if gap > GEOMETRY_TOL_MM:
                notes.append(f"SimpleITK (and ITK-based tools: ANTs, Slicer, ITK-SNAP) places the grid up to "
                             f"{gap:.3g} mm away from medfuse (ITK takes voxel sizes from pixdim and may use the "
                             "qform)")
    if notes:
        warnings.warn(f"{p}: the NIfTI header's geometry is ambiguous: {'; '.join(notes)}. medfuse uses the {used} "
                      "(the NIfTI rule nibabel follows: sform when sform_code > 0, else qform); check the image's "
                      "position, and re-save it with medfuse.save so that every tool reads one geometry",
                      MedfuseWarning, stacklevel=user_stacklevel())


def _raw_pixdim(img, p: Path) -> Optional[np.ndarray]:
    """``pixdim`` as the file stores it, or ``None`` when it cannot be re-read.

    nibabel repairs a zero or negative voxel size while it reads the header (it only logs that), so the image's
    own header no longer shows it. Compression is told from the file's first bytes, not its name (a gzipped
    ``.nii`` read as plain bytes gave a garbage header).
    """
    import gzip
    import io

    try:
        name = _image_file(img, p, "header")  # a pair's .hdr, or the single file
        with open(name, "rb") as fh:
            packed = fh.read(2) == b"\x1f\x8b"
        with (gzip.open if packed else open)(name, "rb") as fh:
            head = fh.read(540)
        hdr = type(img.header).from_fileobj(io.BytesIO(head), check=False)
        return np.asarray(hdr["pixdim"], dtype=float)
    except Exception:  # a header nibabel just read; if it cannot be re-read, only this note is lost
        return None


def _read_itk(p: Path) -> Tuple[np.ndarray, np.ndarray, Optional[str], Optional[str], Optional[str]]:
    import SimpleITK as sitk

    if p.stat().st_size == 0:
        raise UnreadableFileError("the file is empty", fix="copy or export the file again", path=p)
    # The reader named by the lower-cased ending: ITK picks one by a case-sensitive ending, and "X.MHA" has none.
    io = "NrrdImageIO" if p.name.lower().endswith((".nrrd", ".nhdr")) else "MetaImageIO"
    if io == "MetaImageIO":
        _check_metaimage_geometry(p)
    # "C" numbers: under a decimal-comma LC_NUMERIC (napari's Qt sets one) ITK read an NRRD's 4.5 mm as 4 mm.
    with _itk_readable(p) as given, c_numeric_locale():
        size = _check_itk_data(p, io, given)
        try:
            img = sitk.ReadImage(given, imageIO=io)
            arr = sitk.GetArrayFromImage(img) if img.GetNumberOfComponentsPerPixel() == 1 else None
        except MemoryError:
            raise _memory_error(p, size or ()) from None
        except RuntimeError as e:
            err = e
        else:
            err = None
    if err is not None:
        text = str(err).replace(given, os.fspath(p))
        if os.path.dirname(given):  # a bare name has none: replacing "" put a "." between every character
            text = text.replace(os.path.dirname(given), os.fspath(p.parent))
        reason = _itk_reason(text, p)
        raise UnreadableFileError("the file cannot be read as MetaImage/NRRD"
                                  + (f"; ITK says: {reason}" if reason else " (corrupt or truncated)"),
                                  fix="check the header's sizes, spacing and space fields (or copy or export the "
                                      "file again)", path=p) from None
    _warn_non_anatomical_space(img, p)
    if img.GetNumberOfComponentsPerPixel() != 1:
        # An NRRD time series whose first axis is a "list" (not "time") reads as components too.
        raise InvalidInputError(f"the image has {img.GetNumberOfComponentsPerPixel()} components per voxel (colour, a "
                                "vector field, or a series stored along a 'list' axis)",
                                fix="save each volume (or channel) as its own scalar 3-D file", path=p)
    dim = img.GetDimension()
    if dim not in (2, 3, 4):
        raise InvalidInputError(f"the image is {dim}-D", fix="medfuse reads 3-D images (or 4-D series of them)", path=p)
    # arr: [t,] k, j, i
    arr = np.transpose(arr, tuple(range(arr.ndim))[::-1])  # i, j, k[, t]
    sp, org = img.GetSpacing()[:3], img.GetOrigin()[:3]
    d = np.asarray(img.GetDirection(), dtype=float).reshape(dim, dim)[:3, :3] if dim >= 3 else None
    if dim == 2:
        sp, org = tuple(img.GetSpacing()) + (1.0,), tuple(img.GetOrigin()) + (0.0,)
        d = np.eye(3)
        d[:2, :2] = np.asarray(img.GetDirection(), dtype=float).reshape(2, 2)
    aff = affine_from_geometry(sp, org, d)
    if io == "NrrdImageIO":
        to_mm = _nrrd_mm_per_unit(p)
        if to_mm != 1.0:
            # ITK ignores the field: say where medfuse and ITK-based tools part.
            warnings.warn(f"{p}: the NRRD header gives its spacing and origin in {_nrrd_unit_name(to_mm)}: medfuse "
                          f"converts them to mm (x {to_mm:g}), as it does for a NIfTI; ITK-based tools (SimpleITK, "
                          "ANTs, ITK-SNAP) ignore NRRD space units and read these numbers as mm. Re-save the image "
                          "with medfuse.save (mm) so that every tool reads one geometry", MedfuseWarning,
                          stacklevel=user_stacklevel())
            aff = np.diag([to_mm, to_mm, to_mm, 1.0]) @ aff
    get = lambda k: img.GetMetaData(k).strip() if img.HasMetaDataKey(k) else None  # noqa: E731
    formula = get("medfuse_suv") if get("medfuse_unit") == "SUVlbm" else None
    return arr, aff, get("medfuse_modality"), get("medfuse_unit"), formula if formula in _LBM_FORMULAS else None


#: NRRD encodings by what bounds their size: raw bytes, deflate, or one text number per value at least.
_NRRD_ENCODINGS = {"raw": "raw", "gzip": "deflate", "gz": "deflate", "ascii": "text", "text": "text", "txt": "text",
                   "hex": "text"}


def _nrrd_fields(text: str) -> dict:
    """An NRRD header's ``field: value`` lines (field names lower-cased; the first of each kept), from the text of
    its first bytes (the header ends at the first blank line); comments and ``key:=value`` pairs are skipped."""
    head = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0]
    fields = {}
    for line in _header_lines(head)[1:]:
        m = re.match(r"\s*([^:#]+?)\s*:\s?(.*?)\s*$", line)
        # A key:=value pair is one only when ":=" comes before the first ": " (as NrrdIO reads it): a data file
        # line holding ":=" in its name was skipped here and read by ITK unchecked.
        kv = line.find(":=")
        pair = kv >= 0 and (line.find(": ") < 0 or kv < line.find(": "))
        if m and not line.lstrip().startswith("#") and not pair:
            fields.setdefault(m.group(1).lower(), m.group(2))
    return fields


def _header_lines(text: str) -> List[str]:
    """A MetaImage/NRRD header's lines as ITK's readers split them: at newlines only, a carriage return before one
    dropped.

    Why not ``str.splitlines``: it also breaks at \\x0b, \\x0c, \\x1c-\\x1e and \\x85, so a comment holding one
    hid a harmless data-file line that only medfuse saw, while ITK read the next one (outside the folder).
    """
    lines = text.split("\n")
    if lines and lines[-1] == "":  # the newline that ends the last line starts none
        lines.pop()
    return [ln[:-1] if ln.endswith("\r") else ln for ln in lines]


#: NRRD ``space units`` (free text in the format) -> mm per unit. An empty unit is unknown, read as mm (as ITK).
_NRRD_UNITS_MM = {"mm": 1.0, "millimeter": 1.0, "millimeters": 1.0, "millimetre": 1.0, "millimetres": 1.0,
                  "m": 1000.0, "meter": 1000.0, "meters": 1000.0, "metre": 1000.0, "metres": 1000.0,
                  "cm": 10.0, "centimeter": 10.0, "centimeters": 10.0, "centimetre": 10.0, "centimetres": 10.0,
                  "um": 0.001, "\u00b5m": 0.001, "\u03bcm": 0.001, "micron": 0.001, "microns": 0.001,
                  "micrometer": 0.001, "micrometers": 0.001, "micrometre": 0.001, "micrometres": 0.001,
                  "nm": 1e-6, "nanometer": 1e-6, "nanometers": 1e-6, "nanometre": 1e-6, "nanometres": 1e-6}


def _nrrd_mm_per_unit(p: Path) -> float:
    """How many mm one unit of an NRRD's coordinates is, from its ``space units`` field (1 when it has none).

    Why: ITK ignores ``space units``, so an NRRD in metres (``"m" "m" "m"``) or microns read 1000 times too large
    or small, while medfuse converts a NIfTI in metres or microns to mm. The spatial axes' units are read (a
    ``-time`` space's last unit is time's).

    Raises:
        UnreadableFileError: the spatial axes' units differ from each other, or one is not a length unit medfuse
            knows (converting it would be a guess).
    """
    try:
        with open(p, "rb") as fh:
            text = fh.read(65536).decode("latin-1")
    except OSError:
        return 1.0  # ITK has just read it; nothing more to learn here
    raw = _nrrd_fields(text).get("space units")
    if raw is None:
        return 1.0
    units = re.findall(r'"((?:[^"\\]|\\.)*)"', raw)
    # Text was decoded as latin-1: "µm" written as UTF-8 reads as "Âµm".
    units = [u.encode("latin-1").decode("utf-8", "replace").strip().lower() for u in units][:3]
    known = [u for u in units if u not in ("", "???", "none", "unknown")]
    if not known:
        return 1.0
    fix = ('rewrite the header\'s space units as "mm" "mm" "mm" with the spacing and origin in mm (e.g. load it with '
           'pynrrd, scale "space directions" and "space origin", and write it again)')
    if len(known) != len(units) or len(set(known)) > 1:
        raise UnreadableFileError(f"the NRRD header's space units differ between axes ({raw.strip()}): medfuse reads "
                                  "one length unit for all axes", fix=fix, path=p)
    scale = _NRRD_UNITS_MM.get(known[0])
    if scale is None:
        raise UnreadableFileError(f"the NRRD header's space units ({raw.strip()}) are not a length unit medfuse "
                                  "knows (mm, cm, m, um/micron, nm)", fix=fix, path=p)
    return scale


#: A MetaImage header line as MetaIO reads it: the name runs to the first ``=`` or ``:`` (both separate), and the
#: value starts after every ``=``, ``:`` and blank that follow ("ElementDataFile : x.raw", "ElementDataFile =
#: :/x" naming "/x" are read so).
_METAIMAGE_LINE = re.compile(r"\s*([^=:\r\n]*?)[ \t]*[=:][=:\s]*(.*?)\s*$")


def _metaimage_line(line: str) -> Optional[Tuple[str, str]]:
    """(name, value) of one MetaImage header line, as MetaIO splits it; None for a line without a separator."""
    m = _METAIMAGE_LINE.match(line)
    return (m.group(1), m.group(2)) if m else None


def _metaimage_fields(text: str) -> dict:
    """The ``key = value`` fields of a MetaImage header's text, up to ElementDataFile (always its last field).

    MetaIO also takes ``:`` as the separator: ``ElementDataFile : /etc/passwd`` was not seen here (the data file
    went unchecked) while ITK read it."""
    fields: dict = {}
    for line in _header_lines(text):
        kv = _metaimage_line(line)
        if kv:
            fields.setdefault(*kv)
            if kv[0] == "ElementDataFile":
                break
    return fields


#: MetaImage geometry fields and how many numbers each holds, in terms of NDims.
_METAIMAGE_GEOMETRY = (("Offset", 1), ("Origin", 1), ("Position", 1), ("ElementSpacing", 1), ("ElementSize", 1),
                       ("TransformMatrix", 2), ("Rotation", 2), ("Orientation", 2))


def _check_metaimage_geometry(p: Path) -> None:
    """Refuse a MetaImage header whose geometry fields do not hold NDims (NDims² for a matrix) finite numbers.

    Why: MetaIO stops at the first value it cannot read and fills the rest with 0: "Offset = 10 nan 30" loaded
    with the origin (10, 0, 0), silently, and a matrix with a NaN gave "ITK says: 0 0 0".

    Raises:
        GeometryError: a geometry field with too few values, or a value that is not a finite number.
    """
    try:
        with open(p, "rb") as fh:
            fields = _metaimage_fields(fh.read(65536).decode("latin-1"))
        n = int(fields.get("NDims", ""))
    except (OSError, ValueError):
        return  # not a header ITK can read: it says why itself
    for key, power in _METAIMAGE_GEOMETRY:
        if key not in fields:
            continue
        want = n ** power
        values = fields[key].split()
        try:
            numbers = [float(v) for v in values]
        except ValueError:
            numbers = []
        if len(values) < want or len(numbers) < want or not np.all(np.isfinite(numbers[:want])):
            raise GeometryError(f"the MetaImage header's {key} is {fields[key]!r}: it needs {want} finite numbers "
                                f"(NDims {n}), and ITK would fill what it cannot read with 0, placing the image "
                                "elsewhere", fix=f"correct the {key} line of the header", path=p)


#: The most of a header read for its fields: a MetaImage's list of slice files (one line per slice), or a header
#: whose end does not come within its first 64 kB.
_MAX_LIST_HEADER = 1 << 22

#: What to do with a header whose data file lies outside its folder (or is named so).
_OUTSIDE_FIX = ("copy the data file beside the header and name it without a folder in the header's {field} line "
                "(a folder below the header's, e.g. data/image.raw, is also read)")


def _header_ends(text: str, nrrd: bool) -> bool:
    """Whether ``text`` (a header's first bytes) holds the header's end: an NRRD's first blank line, a MetaImage's
    ElementDataFile line (its last field)."""
    if nrrd:
        return re.search(r"\r?\n\r?\n", text) is not None
    return any((_metaimage_line(ln) or ("",))[0] == "ElementDataFile" for ln in _header_lines(text))


def _header_text(p: Path, nrrd: bool) -> str:
    """The text of a MetaImage/NRRD header (its bytes decoded as latin-1): its first 64 kB, or up to 4 MB when its
    end lies beyond them.

    Why: the data-file field was looked for in the first 64 kB only, so a header padded past them with comments
    named its data file unchecked (one outside its folder too), while ITK read the whole header.

    Raises:
        UnreadableFileError: the header does not end within its first 4 MB.
    """
    with open(p, "rb") as fh:
        data = fh.read(65536)
        if len(data) == 65536 and not _header_ends(data.decode("latin-1"), nrrd):
            data += fh.read(_MAX_LIST_HEADER - len(data))
            if len(data) == _MAX_LIST_HEADER and fh.read(1) and not _header_ends(data.decode("latin-1"), nrrd):
                what = "blank line" if nrrd else "ElementDataFile line"
                raise UnreadableFileError(f"its header's end (its {what}) is not within its first "
                                          f"{_size_text(_MAX_LIST_HEADER)}: medfuse does not read a header that "
                                          "long", fix="re-save the image (a header holds a few kB of text)", path=p)
    return data.decode("latin-1")


def _leaves_folder(name: str) -> Optional[str]:
    """Why a data file name written in a header leads outside the header's folder ("an absolute path", "a path
    through '..'"), judged on the text as written, or None when it names a file in that folder or below it.

    The name is judged, not the file it resolves to: a link in the folder that points elsewhere (git-annex and
    DataLad store data so) is read. Both separators and drive letters count on every system.
    """
    text = name.strip()
    if text.startswith(("/", "\\")) or re.match(r"[A-Za-z]:", text):
        return "an absolute path"
    if ".." in re.split(r"[\\/]", text):
        return "a path through '..' (a folder above)"
    return None


def _refuse_outside(name: str, field: str, p: Path) -> None:
    """Refuse a header that names a data file outside its own folder (``name`` as the header writes it).

    Why: ITK opens what the header names, so a tampered header (``ElementDataFile = /etc/passwd``, ``data file:
    ../../x``) turned any file the user can read into the voxels of an image, and of the outputs made from it.

    Raises:
        UnreadableFileError: ``name`` is an absolute path or goes through ``..``.
    """
    why = _leaves_folder(name)
    if why:
        raise UnreadableFileError(f"the data file name '{name.strip()}' in its header ({field}) is {why}: medfuse "
                                  "reads a header's data files only from the header's folder or a folder below it",
                                  fix=_OUTSIDE_FIX.format(field=field.split(" = ")[0]), path=p)


def _nrrd_numbered(value: str) -> bool:
    """Whether an NRRD ``data file`` value is a numbered pattern (``x%03d.raw <min> <max> <step>``), as NrrdIO
    decides: its first ``%`` that is not ``%%`` is followed by digits and ``d``. Other ``%`` names are plain."""
    at = 0
    while True:
        i = value.find("%", at)
        if i < 0 or i + 1 >= len(value):
            return False
        if value[i + 1] != "%":
            return re.match(r"\d*d", value[i + 1:]) is not None
        at = i + 2


def _itk_data_source(p: Path) -> Tuple[Optional[str], Optional[Path], Optional[str]]:
    """(the header's data-file field, the file it names or None when the data follow the header, the encoding:
    ``raw``, ``deflate``, ``text`` or None when unknown) for a MetaImage/NRRD header; field None: a MetaImage whose
    data are several files (a list, a numbered pattern: :func:`_check_itk_slices` checks them), or no data field.

    ITK does not expose these; they are single ``key = value`` / ``key: value`` lines of the text header.

    Raises:
        UnreadableFileError: the header names its data file outside its folder (an absolute path, ``..``); an NRRD
            whose data are bzip2-compressed or in several files; a header longer than 4 MB.
    """
    nrrd = p.name.lower().endswith((".nrrd", ".nhdr"))
    text = _header_text(p, nrrd)
    if nrrd:
        fields = _nrrd_fields(text)
        encoding = fields.get("encoding", "raw").strip().lower()
        if encoding in ("bzip2", "bz2"):
            # Why: ITK's NrrdIO has no bzip2 decoder, but says so only after allocating what the header claims
            # (a 1 kB file took 1.5 GB; a larger claim, the process).
            raise UnreadableFileError(
                "its data are bzip2-compressed (NRRD 'encoding: bzip2'), which ITK's NRRD reader (medfuse's) "
                "cannot decode", fix="re-save the image with raw or gzip encoding (e.g. 'unu save -e gzip', or "
                "pynrrd's nrrd.write with header['encoding'] = 'gzip')", path=p)
        enc = _NRRD_ENCODINGS.get(encoding)
        key = None
        for k in ("data file", "datafile"):  # NrrdIO reads both spellings
            if k not in fields:
                continue
            key = key or k
            value = fields[k].strip()
            if value.startswith("LIST") or _nrrd_numbered(value):
                # Why: ITK allocated what such a header claims before opening any file (a 100-byte data file
                # took 1.7 GB; a larger claim, the process), and the list's names went unchecked.
                raise UnreadableFileError(
                    f"its header names its data as several files ({k}: {value.split()[0]}"
                    f"{' ...' if ' ' in value else ''}), which medfuse does not read",
                    fix="join the data into one file (for raw encoding, concatenate the files in order, e.g. "
                        "'cat x1.raw x2.raw > x.raw', and write 'data file: x.raw' in the header), or re-save the "
                        "image as a single .nrrd (e.g. with 3D Slicer or 'unu join')", path=p)
            _refuse_outside(value, k, p)
        name = fields[key].strip() if key else None
    else:
        fields = _metaimage_fields(text)
        key, name = "ElementDataFile", fields.get("ElementDataFile")
        enc = ("deflate" if fields.get("CompressedData", "").lower() == "true" else
               "text" if fields.get("BinaryData", "true").lower() == "false" else "raw")
        if name is None:  # not a header ITK can read: it says why itself
            return None, None, None
        if name.upper() == "LOCAL":
            return key, None, enc
        # Several data files. ITK compares LIST's four letters, case and all: "list" names one file (was taken
        # for a list, so its absence was not checked and ITK's "No such file or directory" named no file).
        if name.startswith("LIST") or "%" in name or " " in name.strip():
            if not name.startswith("LIST"):  # a pattern: judged whole here (a list's names by _check_itk_slices)
                _refuse_outside(name, key, p)
            return None, None, None
        _refuse_outside(name, key, p)
    if name is None:  # the data follow the header
        return key or "", None, enc
    # The header was decoded as latin-1 (any bytes): the name's bytes are the file name's, in the file system's
    # encoding ("é.raw" was looked for as "Ã©.raw" and reported missing).
    return key, p.parent / Path(os.fsdecode(name.encode("latin-1"))), enc


def _leading_int(word: str) -> Optional[int]:
    """The number a word starts with (ITK reads "2D" as 2 with atof), None when it starts with none."""
    m = re.match(r"\s*[-+]?\d+", word)
    return int(m.group()) if m else None


#: The one number conversion a MetaImage slice-file pattern may hold (besides ``%%``): C's sprintf and Python's
#: ``%`` write these alike, in digits, signs and hex letters only (no precision: "%.0d" writes 0 as nothing in C).
_SLICE_NUMBER = re.compile(r"%[-+ 0#]*\d*[diouxX]")


def _itk_slice_files(p: Path, size: Sequence[int]
                     ) -> Optional[Tuple[str, Iterable[str], int, int, int, Optional[str]]]:
    """(the header's ElementDataFile value, the slice file names as the header writes them, how many it names, how
    many the image needs, the voxels each holds, the encoding) of a MetaImage whose data are several files, as
    ITK's MetaIO reads them: ``LIST [dims]`` followed by one file name a line (each a ``dims``-D block, by default
    NDims - 1), or a numbered pattern ``name%03d.raw [min [max [step]]]`` (each a slice). None for any other
    header (NRRD included), or a pattern ITK cannot step through. ``size``: the image size ITK read from the
    header. Names are relative to the header's folder.

    The names are a list no longer than the lines the header holds, or (a pattern) made one at a time: a header
    claiming 10^9 slices took 27 s and 3.5 GB (a list of 8 GB) before any file was looked at.

    Raises:
        UnreadableFileError: a pattern whose step comes out 0 or less, or that is not one number conversion.
    """
    if p.name.lower().endswith((".nrrd", ".nhdr")):
        return None
    with open(p, "rb") as fh:
        lines = _header_lines(fh.read(_MAX_LIST_HEADER).decode("latin-1"))
    at = next((i for i, ln in enumerate(lines) if (_metaimage_line(ln) or ("",))[0] == "ElementDataFile"), None)
    if at is None or not size:
        return None
    value = _metaimage_line(lines[at])[1]
    words = value.split()
    fields = dict(kv for kv in map(_metaimage_line, lines[:at]) if kv)
    enc = ("deflate" if fields.get("CompressedData", "").lower() == "true" else
           "text" if fields.get("BinaryData", "true").lower() == "false" else "raw")
    if value.startswith("LIST"):  # ITK compares the first four characters, case and all
        dim = _leading_int(words[1]) if len(words) > 1 else None
        dim = dim if dim is not None and 0 < dim <= len(size) else len(size) - 1
        count = int(np.prod(size[dim:], dtype=object))
        names = [ln.strip() for ln in lines[at + 1:at + 1 + count]]  # no more than the header holds
        return value, names, len(names), count, int(np.prod(size[:dim], dtype=object)), enc
    if "%" not in value:
        return None
    nums = [_leading_int(w) for w in words[1:]]
    if len(words) >= 5:  # a name with spaces: the last three words are the numbers
        pattern, nums = " ".join(words[:-3]), nums[-3:]
    else:
        pattern = words[0]
    if any(x is None for x in nums):
        return None
    if len(_SLICE_NUMBER.findall(pattern.replace("%%", ""))) != 1 or pattern.replace("%%", "").count("%") != 1:
        # Why: ITK fills the pattern with C's sprintf and one number; another conversion (%s, %n, two of them)
        # reads memory it was not given.
        raise UnreadableFileError(f"the MetaImage header's slice file pattern {value!r} does not hold exactly "
                                  "one slice number such as %d or %03d", path=p,
                                  fix="write the pattern with one number, e.g. 'ElementDataFile = name%03d.raw 1 "
                                      "N 1' (first, last, step), or list the slice files with "
                                      "'ElementDataFile = LIST'")
    lo = nums[0] if nums else 1
    hi = nums[1] if len(nums) > 1 else lo + size[-1] - 1
    step = nums[2] if len(nums) > 2 else (hi - lo) // size[-1] if len(nums) > 1 else 1
    if step <= 0:
        # ITK divides by this step: "t%d.raw 1 6" over 6 slices gives (6 - 1) // 6 = 0, and a floating-point
        # exception killed the whole process (napari with it).
        raise UnreadableFileError(
            f"the MetaImage header's slice file pattern {value!r} gives a step of {step} between slice "
            f"numbers for {size[-1]} slices; ITK cannot read it (it crashes)", path=p,
            fix="write the pattern with its step, e.g. 'ElementDataFile = name%d.raw 1 N 1' (first, last, "
                "step), or list the slice files with 'ElementDataFile = LIST'")
    hi = min(hi, (size[-1] - 1) * step + lo)  # ITK reads no more slices than the last size
    listed = max(0, (hi - lo) // step + 1)
    names = (pattern % i for i in range(lo, lo + listed * step, step))  # one at a time: 10^9 may be claimed
    return value, names, listed, int(size[-1]), int(np.prod(size[:-1], dtype=object)), enc


def _check_itk_slices(p: Path, size: Sequence[int], bytes_per_voxel: int) -> None:
    """The slice files of a MetaImage whose data are several files must all be there, in the header's folder (or
    below it), and hold their slice.

    Why: a missing slice file gave "ITK says: Reason: No such file or directory" without its name (and ITK's
    "MetaImage: Read: cannot open slice" on stderr), a short one "corrupt or truncated" without its name, and a
    list shorter than the image loaded without a word, the slices it lacks left as ITK's buffer held them. A
    list naming ``/etc/passwd`` read it as slices.

    The files are looked at in order and the check stops at the fourth missing one, so that a header claiming
    10^9 slices costs no more than the files that are there.

    Raises:
        UnreadableFileError: a slice file is named outside the header's folder, is missing, or holds less than
            its slice; the header names too few.
    """
    found = _itk_slice_files(p, size)
    if found is None:
        return
    value, names, listed, count, per, enc = found
    field = f"ElementDataFile = {value}"
    listing = isinstance(names, list)
    if listing:  # every name as written, before any file is looked at
        for name in names:
            _refuse_outside(name, field, p)
    if listed < count:
        raise UnreadableFileError(f"its header ({field}) lists {listed} data files, but its sizes "
                                  f"({'x'.join(map(str, size))} voxels) need {count}",
                                  fix="add the missing file names to the header's list, or correct its DimSize",
                                  path=p)

    def shown(bad: List[str]) -> str:
        return ", ".join(n or "(a blank line)" for n in bad[:3]) + (" and more" if len(bad) > 3 else "")

    need = per * bytes_per_voxel if enc == "raw" else per  # text: a character and a separator per value
    sizes: dict = {}  # a list's names may repeat: each file is looked at once
    missing: List[str] = []
    short: List[str] = []
    n_short = 0
    for name in names:
        if not listing:
            _refuse_outside(name, field, p)
        have = sizes.get(name)
        if have is None:
            f = p.parent / Path(os.fsdecode(name.encode("latin-1")))
            try:
                have = f.stat().st_size if name and f.is_file() else -1
            except OSError:
                have = -1
            if listing:
                sizes[name] = have
        if have < 0:
            missing.append(name)
            if len(missing) > 3:
                break
        elif enc != "deflate" and (have if enc == "raw" else (have + 1) // 2) < need:
            n_short += 1
            if len(short) < 4:
                short.append(name)
    if missing:
        more = " or more" if len(missing) > 3 else ""
        raise UnreadableFileError(f"{min(len(missing), 3) if more else len(missing)}{more} of the {count} data "
                                  f"files its header names ({field}) are missing: {shown(missing)}", path=p,
                                  fix="keep the header and its data files together (copy them beside it), or "
                                      "correct the header's file names")
    if short:  # compressed slices: their size says nothing certain (enc "deflate" never gets here)
        raise UnreadableFileError(f"{n_short} of the {count} data files its header names ({field}) are "
                                  f"too short for the {per} voxels each must hold: {shown(short)}; they are "
                                  "truncated, or the header's sizes are wrong", path=p,
                                  fix="copy or export the image again (header and all its data files)")


def _check_itk_data(p: Path, io: str, given: Optional[str] = None) -> Optional[Tuple[int, ...]]:
    """Before ITK reads the voxels: the data file a header names must be in the header's folder (or below it),
    exist, and hold as much data as the header describes (ITK allocates the described size first: a 1 kB file
    claiming 10^9 voxels took 4 GB). Returns the image size ITK reads from the header, or None when it cannot read
    the header (it then says why itself).

    Raises:
        UnreadableFileError: the data file (or one of a MetaImage's slice files) is named outside the header's
            folder, is missing, or is too small for the header's sizes; an NRRD in bzip2 or in several files.
    """
    import SimpleITK as sitk

    try:
        key, data, enc = _itk_data_source(p)
    except UnreadableFileError:
        raise
    except OSError:
        return None
    written = None if data is None else os.fspath(data.relative_to(p.parent))  # the name as the header has it
    if data is not None and not data.is_file():
        # The path shown is the header's folder and the name it writes (names leading elsewhere were refused).
        raise UnreadableFileError(f"the data file its header names ({key} '{written}') is missing: {data}",
                                  fix="keep the header and its data file together (copy the data file beside it), "
                                      f"or correct the header's {key} line", path=p)
    reader = sitk.ImageFileReader()
    reader.SetImageIO(io)
    reader.SetFileName(itk_path(p) if given is None else given)  # given: the path SimpleITK reads p through
    try:
        with c_numeric_locale():  # NRRD's sizes and spacings are parsed with the C library's number locale
            reader.ReadImageInformation()
        pixel = sitk.Image([1, 1], reader.GetPixelID())  # for the size of one component
    except RuntimeError:
        return None
    size = tuple(int(x) for x in reader.GetSize())
    n = int(np.prod(size, dtype=object)) * int(reader.GetNumberOfComponents())
    if key is None:  # several data files (or none named): each is checked by name
        _check_itk_slices(p, size, int(reader.GetNumberOfComponents()) * pixel.GetSizeOfPixelComponent())
    if key is not None and enc is not None:
        have = (data or p).stat().st_size
        # Text: at least one character and one separator per value.
        need, have = (n, (have + 1) // 2) if enc == "text" else (n * pixel.GetSizeOfPixelComponent(), have)
        _refuse_impossible_size(need, have, enc == "deflate", f"{'x'.join(map(str, size))} voxels",
                                p, fix="copy or export the image again (header and data file)",
                                where="the file" if data is None else f"its data file {written}")
    return size


def _nrrd_unit_name(to_mm: float) -> str:
    """A word for a length unit by its size in mm (for messages)."""
    names = {1000.0: "metres", 10.0: "centimetres", 0.001: "microns", 1e-6: "nanometres"}
    return names.get(to_mm, f"{to_mm:g} mm units")


def _itk_reason(message: str, p: Path) -> str:
    """ITK's own words for why it refused a file (its last line), without source paths, addresses or the file name.

    E.g. a zero ``ElementSpacing`` or a 2-D NRRD whose orientation is 3-D: "corrupt" alone sends the user to copy
    a file that is complete.
    """
    lines = [ln.strip() for ln in message.splitlines() if ln.strip()]
    if not lines:
        return ""
    last = lines[-1].replace(str(p), "the file")
    last = re.sub(r"^(sitk::)?ERROR:\s*", "", re.sub(r"^ITK ERROR:\s*\w+\(0x[0-9a-fA-F]+\):\s*", "", last))
    if re.fullmatch(r"(Reason:\s*)?Success\.?", last, re.I):  # errno 0 as ITK words it: no reason at all
        return ""
    return last[:200]


#: NRRD spaces that name patient directions (ITK turns each into LPS); the others (scanner-xyz, 3D-right-handed,
#: ...) are only axes.
_ANATOMICAL_NRRD_SPACES = ("right-anterior-superior", "left-anterior-superior", "left-posterior-superior",
                           "right-anterior-superior-time", "left-anterior-superior-time",
                           "left-posterior-superior-time")


def _warn_non_anatomical_space(img, p: Path) -> None:
    """Warn when an NRRD states no patient orientation (``space: scanner-xyz``, ``3D-right-handed``, or none).

    ITK then takes the axes as LPS, which may put left on the right: say so instead of using a guess silently.
    """
    if not p.name.lower().endswith((".nrrd", ".nhdr")):
        return
    space = img.GetMetaData("NRRD_space").strip() if img.HasMetaDataKey("NRRD_space") else None
    if space in _ANATOMICAL_NRRD_SPACES:
        return
    what = f"'space: {space}'" if space else "no 'space' field"
    warnings.warn(f"{p}: the NRRD header has {what}, which names no patient orientation: medfuse (as ITK) takes its "
                  "axes as LPS (x towards the patient's left); check left/right and the origin before registering "
                  "or fusing", MedfuseWarning, stacklevel=user_stacklevel())


def _sniff(p: Path) -> Tuple[bool, Optional[str]]:
    """(whether the file is gzip-compressed, the format its first bytes show: ``NIfTI``, ``MetaImage``, ``NRRD``,
    ``DICOM``, or None when unknown)."""
    import gzip
    import zlib

    with open(p, "rb") as fh:
        head = fh.read(1024)
    gz = head[:2] == b"\x1f\x8b"
    if gz:
        try:
            with gzip.open(p, "rb") as fh:
                head = fh.read(1024)
        except (OSError, EOFError, zlib.error):
            return True, None
    if len(head) >= 132 and head[128:132] == b"DICM":
        return gz, "DICOM"
    if head.startswith(b"NRRD000"):
        return gz, "NRRD"
    if len(head) >= 4 and {348, 540} & {int.from_bytes(head[:4], "little"), int.from_bytes(head[:4], "big")}:
        return gz, "NIfTI"  # sizeof_hdr of NIfTI-1 (and Analyze 7.5) or NIfTI-2
    text = head.decode("latin-1")
    if re.match(r"\s*\w+\s*=", text) and re.search(r"^\s*NDims\s*=", text, re.M):
        return gz, "MetaImage"
    return gz, None


#: The format each file ending promises, and the ending to rename a file of each format to.
_FORMAT_OF_ENDING = {".nii": "NIfTI", ".nii.gz": "NIfTI", ".hdr": "NIfTI", ".mha": "MetaImage", ".mhd": "MetaImage",
                     ".nrrd": "NRRD", ".nhdr": "NRRD"}
_ENDING_OF_FORMAT = {"NIfTI": ".nii", "MetaImage": ".mha", "NRRD": ".nrrd", "DICOM": ".dcm"}


def _refuse_other_format(p: Path) -> Optional[bool]:
    """Refuse a file whose contents are another format than its ending says (a NIfTI named ``.mha``); returns
    whether it is gzip-compressed, or None when its format is not recognised (the reader then says why).

    Why: each reader is chosen by the ending, and its error for another format's bytes misleads ("Inappropriate
    ioctl for device", "check the file was copied completely").

    Raises:
        UnreadableFileError: the file holds another format; the message says which and what to rename it to.
    """
    name = p.name.lower()
    ending = next((e for e in (".nii.gz", ".nii", ".hdr", ".mha", ".mhd", ".nrrd", ".nhdr") if name.endswith(e)), None)
    try:
        gz, found = _sniff(p)
    except OSError:
        return None
    if found is None:
        return None
    if ending is None or found == _FORMAT_OF_ENDING[ending]:
        return gz
    new = _ENDING_OF_FORMAT[found] + (".gz" if found == "NIfTI" and gz else "")
    raise UnreadableFileError(f"the file is named {ending} but holds {found} data", fix=f"rename it to end in {new} "
                              f"(what it holds), then load it again", path=p)


def _read(path: PathLike) -> Tuple[List[np.ndarray], np.ndarray, Optional[str], Optional[str], dict, Path,
                                   Optional[dict]]:
    """(volumes, affine, modality, unit, provenance facts, path, the BIDS sidecar read for labels or None)."""
    from . import _stat_or_refuse

    p = Path(path)
    _stat_or_refuse(p)  # a loop, a dangling link, a pipe or socket (never opened: it would block) say so
    if not p.is_file():
        raise UnreadableFileError("this is a folder, not an image file", fix="give the image file's path (a DICOM "
                                  "folder is read by medfuse.load)", path=p)
    name = p.name.lower()
    gz = _refuse_other_format(p)
    if name.endswith(NIFTI_SUFFIXES):
        arr, aff, mod, unit, space, formula = _read_nifti(p, gz)
        facts = {"reader": "nibabel"}
        if space is not None:
            facts["nifti_space"] = space
        bids = None
        if mod is None:  # no medfuse tag: a converter's BIDS sidecar may say what the image is
            from .pet_bids import read_sidecar

            bids = read_sidecar(p)  # a broken one is ignored, with a warning saying so
            mod, unit = _bids_labels(bids)
            if mod is not None:
                facts["labels_from"] = "BIDS sidecar"
    elif name.endswith(ITK_SUFFIXES):
        arr, aff, mod, unit, formula = _read_itk(p)
        facts, bids = {"reader": "SimpleITK"}, None
    else:
        raise UnreadableFileError("unknown image file ending",
                                  fix=f"use one of {', '.join(NIFTI_SUFFIXES + ITK_SUFFIXES)}, or a DICOM file/folder", path=p)
    if unit:  # the file states it: a modality override keeps it (volume.relabelled reads this)
        facts["unit_stated"] = True
    if formula is not None:  # the SUVlbm's formula, as the DICOM reader records it (converting it needs it)
        facts["suv"] = formula
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
    return vols, aff, mod, unit, facts, p, bids


def _make(arr: np.ndarray, aff: np.ndarray, p: Path, *, modality, unit, facts, index, n) -> Volume:
    if np.issubdtype(arr.dtype, np.floating):
        finite = np.isfinite(arr)
        if not finite.any():
            raise InvalidInputError("every voxel is NaN or infinite", fix="check the export; the image holds no data", path=p)
    said = None
    if np.issubdtype(arr.dtype, np.floating) and not finite.all():
        said = f"{int((~finite).sum())} voxel(s) were NaN or infinite when loaded; they were kept as they are"
        warnings.warn(f"{p}: {said}", MedfuseWarning, stacklevel=user_stacklevel())
    # Each volume its own lists and dicts (warnings, pet_acquisition): one volume's edits stay its own.
    prov = {"source": os.path.abspath(p), **copy.deepcopy(facts)}  # absolute: save() protects it after a chdir too
    if said is not None:  # kept with the volume (medfuse info --json listed no warning, a sidecar none)
        prov["warnings"] = [*prov.get("warnings", []), said]
    if unit != KIND_UNITS.get(prov.get("suv")):  # a unit= override: the SUV kind no longer describes the voxels
        prov.pop("suv", None)
    if n > 1:
        prov.update(volume_index=index, n_volumes=n)
    try:
        return Volume(np.ascontiguousarray(arr), aff, modality=modality, unit=unit, provenance=prov)
    except MedfuseError as e:
        raise type(e)(e.problem, fix=e.fix, path=p) from None


#: BIDS sidecar ``Units`` of PET (the DICOM (0054,1001) codes dcm2niix copies) -> medfuse's unit.
_BIDS_UNITS = {"BQML": "Bq/mL", "BQ/ML": "Bq/mL", "BQ/CC": "Bq/mL", "KBQ/ML": "Bq/mL", "KBQ/CC": "Bq/mL",
               "MBQ/ML": "Bq/mL", "GML": "SUVbw", "G/ML": "SUVbw", "CNTS": "counts"}
#: Bq/mL per unit of a PET-BIDS ``Units`` written with a prefix (OpenNeuro PETs use kBq/mL): the voxels are scaled
#: to Bq/mL on reading, so that SUV and every other Bq/mL figure use one unit.
_BIDS_PER_BQML = {"KBQ/ML": 1e3, "KBQ/CC": 1e3, "MBQ/ML": 1e6}


def _bids_units(meta: dict) -> Optional[str]:
    """A sidecar's ``Units`` as a key of :data:`_BIDS_UNITS` (upper case, micro and spaces folded), None if absent."""
    units = meta.get("Units")
    return units.strip().upper().replace(" ", "") if isinstance(units, str) else None


def read_bids_sidecar(side: Path) -> Optional[dict]:
    """The JSON at ``side`` when it is a BIDS sidecar (a dict with a top-level ``Modality`` str, as dcm2niix
    writes, or PET-BIDS fields such as ``TracerRadionuclide``; medfuse's provenance sidecars have neither), else
    None; unreadable, not JSON or over 1 MB: None, without a word (the reader's :func:`.pet_bids.read_sidecar`
    warns)."""
    from .pet_bids import is_pet_sidecar, load_json

    meta = load_json(side)[0]
    return meta if isinstance(meta, dict) and (isinstance(meta.get("Modality"), str) or is_pet_sidecar(meta)) \
        else None


def _bids_sidecar(p: Path) -> Tuple[Optional[str], Optional[str]]:
    """Modality and unit from the BIDS JSON sidecar beside a NIfTI (``ct.nii.gz`` -> ``ct.json``), as dcm2niix
    writes it, or ``(None, None)``.

    Why: a CT converted by dcm2niix is in HU and its sidecar says ``"Modality": "CT"``; without reading it, it
    loaded as ``unknown``/``arbitrary``, so resampling filled outside it with 0 (water) and fusion did not window
    it. Only a top-level ``Modality`` of MR, CT, PT or NM counts (medfuse's own provenance sidecars have none), and
    an unreadable sidecar is ignored: it is optional metadata, and the image itself is still read.
    """
    from .pet_bids import sidecar_path

    return _bids_labels(read_bids_sidecar(sidecar_path(p)))


def _bids_labels(meta: Optional[dict]) -> Tuple[Optional[str], Optional[str]]:
    """:func:`_bids_sidecar`'s modality and unit from a parsed sidecar (None: none was read).

    A sidecar without ``Modality`` but with PET-BIDS fields (``TracerRadionuclide``...; the BIDS PET section does
    not require ``Modality``) is a PET's.
    """
    from .pet_bids import is_pet_sidecar

    if not isinstance(meta, dict):
        return None, None
    mod = meta.get("Modality")
    if mod is None and is_pet_sidecar(meta):
        mod = "PT"
    if not isinstance(mod, str) or mod.strip().upper() not in ("MR", "CT", "PT", "NM"):
        return None, None
    mod = mod.strip().upper()
    if mod == "CT":
        return mod, "HU"  # dcm2niix applies RescaleSlope/Intercept (scl_slope/scl_inter): the voxels are HU
    return mod, _BIDS_UNITS.get(_bids_units(meta) or "") if mod == "PT" else None


def _labels(mod: Optional[str], unit: Optional[str], modality: Optional[str], unit_override: Optional[str],
            arr: Optional[np.ndarray] = None):
    """The volume's (modality, unit): the arguments win, then what the file (or its BIDS sidecar) stores.

    A CT named by ``modality=`` with no unit stored anywhere is taken as HU when it holds values below -100
    (air and fat: only Hounsfield units go there); otherwise its unit stays ``arbitrary``, with a warning.
    """
    from ..volume import ct_unit, normalise_modality

    m = modality if modality is not None else (mod or "unknown")
    if unit_override is not None:
        return m, unit_override
    if unit:
        return m, unit
    try:
        is_ct = normalise_modality(m) == "CT"
    except MedfuseError:  # an unknown name: Volume() refuses it, with its own message
        is_ct = False
    if arr is not None and is_ct:
        return m, ct_unit(arr, stacklevel=4)
    return m, "arbitrary"


def _sidecar_suv(vols: List[np.ndarray], bids: Optional[dict], p: Path, facts: dict, *, modality: str, unit: str,
                 unit_given: bool, suv: str) -> Tuple[List[np.ndarray], str, dict]:
    """The volumes, unit and provenance facts after PET-BIDS SUV (:func:`.pet_bids.apply_suv`).

    Only for a PET whose sidecar was read (no medfuse tag in the file: a tagged file states its own unit), and not
    when ``unit=`` names the unit: the voxels are then what the caller says, and are not rescaled.
    """
    from ..volume import normalise_modality

    try:
        is_pet = normalise_modality(modality) == "PT"
    except MedfuseError:  # an unknown name: Volume() refuses it, with its own message
        is_pet = False
    if bids is None or not is_pet or unit_given:
        return vols, unit, facts
    units = _bids_units(bids)
    if units is not None and units not in _BIDS_UNITS:
        # Said, not guessed: an activity read as arbitrary numbers is fused and measured without a word otherwise.
        warnings.warn(f"{p}: its sidecar's Units {bids['Units'].strip()[:20]!r} is not one medfuse reads (Bq/mL, "
                      "kBq/mL, MBq/mL, g/mL, BQML, GML, CNTS), so the PET loaded in arbitrary units, without SUV; "
                      "write the unit as one of those in the sidecar, or load with unit='Bq/mL' if that is what the "
                      "voxels hold", MedfuseWarning, stacklevel=user_stacklevel())
    scale = _BIDS_PER_BQML.get(units or "")
    if scale is not None:
        vols = [np.asarray(v, dtype=np.float64 if v.dtype == np.float64 else np.float32) * scale for v in vols]
    from .pet_bids import apply_suv

    vols, unit, more = apply_suv(vols, bids, p, unit=unit, suv=suv)
    return vols, unit, {**facts, **more}


def _checked(path, *, modality, unit) -> Path:
    """The reader's arguments checked before any file is opened (raises InvalidInputError)."""
    from . import _as_path, _check_load_options

    _check_load_options(modality=modality, unit=unit)
    return _as_path(path, fix="pass the path of a NIfTI, MetaImage or NRRD file")


def load_image(path: PathLike, *, modality: Optional[str] = None, unit: Optional[str] = None,
               volume_index: Optional[int] = None, suv: str = "auto") -> Volume:
    """Load one 3-D volume from a NIfTI, MetaImage or NRRD file.

    Args:
        path: the file.
        modality: override the stored modality (``MR``, ``CT``, ``PT``/``PET``, ``NM``/``SPECT``).
        unit: override the stored unit.
        volume_index: which volume of a 4-D file (0-based, negative from the end); required when there are
            several, as for a DICOM series.
        suv: a NIfTI PET in Bq/mL with a PET-BIDS sidecar giving what SUV needs: ``"auto"`` (default) or
            ``"bw"`` scale it to SUVbw, ``"none"`` keeps Bq/mL; ``"lbm"``, ``"lbm_janma"`` and ``"bsa"`` give
            SUVbw with a warning (the sidecar holds no height or sex). Other images ignore it.

    Returns:
        The :class:`~medfuse.volume.Volume`.

    Raises:
        UnreadableFileError: missing, empty, truncated or unreadable file.
        MultipleSeriesError: a 4-D file with more than one volume and no ``volume_index``.
        GeometryError: sheared, singular or non-finite affine.
        InvalidInputError: an argument of the wrong type, zero size, all-NaN voxels, vector/colour data,
            ``volume_index`` out of range.
    """
    from . import _check_suv, _check_volume_index

    path = _checked(path, modality=modality, unit=unit)
    volume_index = _check_volume_index(volume_index)
    suv = _check_suv(suv)
    vols, aff, mod, u, facts, p, bids = _read(path)
    n = len(vols)
    if volume_index is None:
        if n > 1:
            raise MultipleSeriesError(
                f"the file holds {n} volumes (4-D)", choices=list(range(n)),
                fix=f"pass volume_index=0..{n - 1} for one, combine='sum' or combine='mean' for all of them as one "
                    "(docs/io.md, 4-D series), or use medfuse.load_volumes(path) to get all of them",
                path=p)
        index = 0
    else:
        if not -n <= volume_index < n:
            raise InvalidInputError(f"volume_index {volume_index} is out of range (the file holds {n})",
                                    fix=f"pass volume_index=0..{n - 1}", path=p)
        index = volume_index % n
    m, un = _labels(mod, u, modality, unit, vols[index])
    (arr,), un, facts = _sidecar_suv([vols[index]], bids, p, facts, modality=m, unit=un, unit_given=unit is not None,
                                     suv=suv)
    return _make(arr, aff, p, modality=m, unit=un, facts=facts, index=index, n=n)


def load_image_volumes(path: PathLike, *, modality: Optional[str] = None, unit: Optional[str] = None,
                       suv: str = "auto") -> List[Volume]:
    """Load every volume of a 3-D or 4-D NIfTI/MetaImage/NRRD file as a list of 3-D volumes.

    Args:
        path: the file.
        modality: override the stored modality.
        unit: override the stored unit.
        suv: a PET's SUV from its PET-BIDS sidecar, as :func:`load_image` takes it (one factor for every volume:
            they are decay-corrected to one time).

    Returns:
        The volumes in the file's order (a 3-D file gives a list of one).

    Raises:
        UnreadableFileError: missing, empty, truncated or unreadable file.
        GeometryError: sheared, singular or non-finite affine.
        InvalidInputError: an argument of the wrong type, zero size, all-NaN voxels, vector/colour data.
    """
    from . import _check_suv

    path = _checked(path, modality=modality, unit=unit)
    suv = _check_suv(suv)
    vols, aff, mod, u, facts, p, bids = _read(path)
    m, un = _labels(mod, u, modality, unit, vols[0])
    vols, un, facts = _sidecar_suv(vols, bids, p, facts, modality=m, unit=un, unit_given=unit is not None, suv=suv)
    return [_make(a, aff, p, modality=m, unit=un, facts=facts, index=i, n=len(vols)) for i, a in enumerate(vols)]
