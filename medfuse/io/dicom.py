"""DICOM reader: single files, folders (recursive), multi-frame, mosaics, 4-D series, PET SUV, RT dose grids.

Geometry is taken from ImagePositionPatient / ImageOrientationPatient (or the enhanced
functional groups), never from file names. The voxel array keeps the DICOM order
(i = columns, j = rows, k = slices sorted along the slice normal) with an LPS affine.
See ``docs/dicom.md`` for the conventions (Philips scaling, gaps, gantry tilt).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import errno as _errno
import os
import threading
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from ..errors import (GeometryError, InvalidInputError, MedfuseError, MedfuseWarning, MultipleSeriesError,
                      UnreadableFileError, UnsupportedDataError)
from .. import io as _io
from ..volume import Volume, normalise_modality
from .._checks import is_or_above, user_stacklevel as _user_stacklevel
from .._patient import keys_disagree, patient_key

__all__ = ["SeriesInfo", "scan", "load_dicom", "load_dicom_volumes"]

PathLike = Union[str, os.PathLike]

#: Modalities that carry no image medfuse can use (an RTDOSE's dose grid is one: see _rtdose_frames).
_NON_IMAGE = {"RTSTRUCT", "RTPLAN", "RTRECORD", "SEG", "SR", "KO", "PR", "REG", "DOC", "RWV"}
#: What the RT objects medfuse refuses hold, for the message.
_NON_IMAGE_WHAT = {"RTSTRUCT": "an RT structure set (contours)", "RTPLAN": "an RT plan (beams, no image)",
                   "RTRECORD": "an RT treatment record", "SEG": "a segmentation", "SR": "a structured report"}
#: Relative deviation of slice spacing tolerated before resampling.
_SPACING_TOL = 0.01
#: Largest gap (in slice spacings) that is interpolated; larger gaps are refused.
_MAX_GAP = 3.0
#: Slice positions (mm along the normal) closer than this are one position.
_POS_TOL = 0.01
#: Gantry tilt below this (degrees) is ignored as rounding noise.
_TILT_TOL_DEG = 0.05


@dataclass
class SeriesInfo:
    """One series found by :func:`scan` (no patient data).

    Attributes:
        series_uid: SeriesInstanceUID; ``UID#N`` (N its SeriesNumber) when files sharing that UID have
            different SeriesNumbers, each of which is then a series of its own (as dcm2niix splits them).
        modality: the DICOM Modality as stored (``CT``, ``PT``, ``MR``, ...).
        description: SeriesDescription.
        shape: voxels per volume (columns, rows, slices); slices 0 when the series cannot be assembled.
        n_volumes: volumes in the series (more than 1: 4-D), 0 when it cannot be assembled.
        n_files: files of the series.
        folder: the folder its files are in (the folder scanned when they are in several).
        series_number: its SeriesNumber as text ("" when absent). Series are listed by study, then by this number
            (then first acquisition, then UID), as viewers list them, never by file names.
        not_volume: what an NM series that is no volume holds instead (``"gated projections (GATED TOMO, not
            reconstructed)"``, ``"planar (STATIC)"``...), "" otherwise.
    """

    series_uid: str
    modality: str
    description: str
    shape: Tuple[int, int, int]
    n_volumes: int
    n_files: int
    folder: str
    series_number: str = ""
    not_volume: str = ""


@dataclass
class _Frame:
    file: Path
    index: Optional[int]  # frame number in a multi-frame file, None for single-frame
    pos: np.ndarray
    iop: np.ndarray
    spacing: Tuple[float, float]
    slope: float
    intercept: float
    time_key: Tuple
    tile: Optional[Tuple[int, int, int, int]] = None  # mosaic tile (row0, col0, rows, cols)
    thickness: float = 1.0  # slice spacing used when a volume has a single slice
    # Classic multi-frame file with one position for all frames: ("slices", tag the spacing came from) when its
    # frames were placed as slices, ("time", why not) when they stay at that one position.
    shared_pos: Optional[Tuple[str, str]] = None
    # FrameType value 4 of an enhanced frame (M, P, FIELD_MAP, ...): a magnitude and a field map in one file are
    # not time points, and the warning about volumes without a time order says which is which.
    frame_type: str = ""
    # ImageType (0008,0008) from value 3 of a single-frame image (IP\\DIXON, W\\DIXON, M\\ND...): a Philips mDIXON
    # series holds in-phase, opposed-phase, water and fat images, which are no time points either.
    image_kind: str = ""
    # An NM frame's frame-increment values other than its slice ((vector keyword, value), e.g. ("TimeSlotVector",
    # 3)): what its volume is (a gate, an energy window), for the provenance.
    vectors: Tuple[Tuple[str, float], ...] = ()


# ---------------------------------------------------------------------------- headers
def _pydicom():
    import pydicom

    return pydicom


#: What _read_header returns (when not strict) for a file that is DICOM but cannot be read.
_BROKEN = object()


# Nesting count of without_value_checks across threads: the pydicom setting is process-wide, so the first
# reader in saves it and the last one out restores it (a per-call save/restore let one thread's exit switch
# the checks back on under another, and the last exit leave them off for good).
_checks_lock = threading.Lock()
_checks_depth = 0
_checks_saved = None


@contextlib.contextmanager
def without_value_checks():
    """pydicom's checks of header values off while medfuse reads: they print the offending value word for word
    (``Invalid value for VR UI: '1.2.04...'``), in warnings and in the ``pydicom`` log, and such a value may be a
    UID or a name; a user who set pydicom to raise would see it in an error. Restored when the last medfuse
    read in any thread ends. Usable as a decorator."""
    global _checks_depth, _checks_saved
    import pydicom

    settings = pydicom.config.settings
    with _checks_lock:
        if _checks_depth == 0:
            _checks_saved = settings.reading_validation_mode
            settings.reading_validation_mode = pydicom.config.IGNORE
        _checks_depth += 1
    try:
        yield
    finally:
        with _checks_lock:
            _checks_depth -= 1
            if _checks_depth == 0:
                settings.reading_validation_mode = _checks_saved


def _read_header(path: Path, *, strict: bool):
    """Header without pixels; when not strict, None for non-DICOM files and ``_BROKEN`` for damaged DICOM ones
    (the preamble is there but the rest cannot be read, or the file cannot be opened at all) and empty files."""
    pydicom = _pydicom()
    try:
        if path.stat().st_size == 0:
            raise UnreadableFileError("the file is empty", fix="re-export or re-copy the file", path=path)
        try:
            return pydicom.dcmread(os.fspath(path), stop_before_pixels=True)
        except pydicom.errors.InvalidDicomError:
            if not _looks_like_raw_dataset(path):
                raise
            # A DICOM data set without the 128-byte preamble and "DICM" prefix (old PACS and
            # ACR-NEMA-style exports): dcm2niix reads these, so do we.
            ds = pydicom.dcmread(os.fspath(path), stop_before_pixels=True, force=True)
            if "SOPClassUID" not in ds and "Modality" not in ds:
                raise
            return ds
    except UnreadableFileError:
        if strict:
            raise
        # Why: an empty file among slices is a slice lost in a copy or export as often as anything else; it is
        # treated as a damaged file (named; a gap next to it is not interpolated), never silently skipped.
        return _BROKEN
    except Exception as e:  # pydicom raises many kinds (InvalidDicomError, EOFError, ValueError...)
        if strict:
            if not _has_dicom_preamble(path):
                raise UnreadableFileError(
                    "not a medical image: neither DICOM nor a NIfTI/MetaImage/NRRD file",
                    fix="pass a .nii/.nii.gz, .mha/.mhd, .nrrd/.nhdr file, a DICOM file or a DICOM folder",
                    path=path) from None
            raise UnreadableFileError(f"not a readable DICOM file ({type(e).__name__})",
                                      fix="check that the file is a complete DICOM file (not truncated)",
                                      path=path) from None
        return _BROKEN if isinstance(e, PermissionError) or _has_dicom_preamble(path) or _cut_in_preamble(path) \
            else None


#: Endings that say a file is DICOM even when too little of it is left to show the "DICM" prefix.
_DICOM_ENDINGS = (".dcm", ".dicom", ".ima")


def _cut_in_preamble(path: Path) -> bool:
    """True for a file cut before the end of the 128-byte preamble and "DICM" prefix: shorter than 132 bytes and
    named as DICOM (``.dcm``, ``.dicom``, ``.ima``) or all zeros so far (the preamble most writers leave empty).

    Why: such a slice was taken for a stranger file and skipped; the gap it left was interpolated with only an
    "uneven slice spacing" warning, or (the last slice) the series lost a slice without a word.
    """
    try:
        if path.stat().st_size >= 132:
            return False
        with open(path, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return bool(head) and (path.suffix.lower() in _DICOM_ENDINGS or not head.strip(b"\0"))


def _looks_like_raw_dataset(path: Path) -> bool:
    """True when the file starts like a DICOM data set written without preamble: the first element
    is in group 0002 (file meta) or 0008 (identification), little-endian, with a small element number."""
    try:
        with open(path, "rb") as fh:
            head = fh.read(8)
    except OSError:
        return False
    if len(head) < 8:
        return False
    group, elem = int.from_bytes(head[0:2], "little"), int.from_bytes(head[2:4], "little")
    return group in (0x0002, 0x0008) and elem < 0x0100


def _read_full(path: Path):
    """Whole data set with pixels; files without preamble are read with force and given a transfer syntax."""
    pydicom = _pydicom()
    try:
        return pydicom.dcmread(os.fspath(path))
    except pydicom.errors.InvalidDicomError:
        if not _looks_like_raw_dataset(path):
            raise
    ds = pydicom.dcmread(os.fspath(path), force=True)
    if "TransferSyntaxUID" not in ds.file_meta:
        from pydicom.uid import ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

        implicit, little = getattr(ds, "original_encoding", (True, True))
        ds.file_meta.TransferSyntaxUID = (ImplicitVRLittleEndian if implicit else
                                          ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    return ds


def _has_dicom_preamble(path: Path) -> bool:
    try:
        with open(path, "rb") as fh:
            return fh.read(132)[128:132] == b"DICM"
    except OSError:
        return False


def _files(path: Path) -> List[Path]:
    if path.is_file():
        return [path]
    # Hidden files and everything in hidden folders left out: a killed write's .medfuse-tmp-*/ folder held a
    # partial series that scan() listed as one more series. Linked folders are followed (each real folder
    # once): rglob skipped them, and a study whose series folder was a symlink had "no PET" in it.
    out, seen = [], set()
    top = os.path.realpath(path)
    for root, dirs, names in os.walk(path, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:  # a link loop, or one folder linked twice
            dirs[:] = []
            continue
        seen.add(real)
        # A link to this folder or one above it (sub-01/up -> ../.., a link to /) would search the whole
        # dataset, or the whole disk: not followed.
        dirs[:] = [d for d in dirs if not d.startswith(".")
                   and not is_or_above(os.path.realpath(os.path.join(root, d)), top)]
        out += [Path(root, n) for n in names if not n.startswith(".") and os.path.isfile(os.path.join(root, n))]
    return sorted(out)


_HIDDEN_PEEK = 100  # files looked at in each hidden folder: enough to tell a series from macOS/VCS bookkeeping


def _hidden_dicom_folders(path: Path) -> int:
    """How many hidden folders below ``path`` (the outermost ones) hold DICOM files; medfuse's own unfinished
    writes (``.medfuse-tmp-*``) and folders of other files (``.Spotlight-V100``, ``.git``) are not counted.

    Only asked when nothing readable was found, to say why: a study whose series lay in a hidden folder got
    "no readable DICOM image files" without a word about the folder left out.
    """
    n = 0
    for root, dirs, _ in os.walk(path):
        hidden = [d for d in dirs if d.startswith(".")]
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        n += sum(1 for d in hidden if not d.startswith(".medfuse-tmp-") and _holds_dicom(Path(root) / d))
    return n


def _holds_dicom(folder: Path) -> bool:
    """True when one of the first ``_HIDDEN_PEEK`` files under ``folder`` starts like a DICOM file."""
    seen = 0
    for root, _, names in os.walk(folder):
        for name in sorted(names):
            f = Path(root) / name
            if _has_dicom_preamble(f) or _looks_like_raw_dataset(f):
                return True
            seen += 1
            if seen >= _HIDDEN_PEEK:
                return False
    return False


def _hidden_note(path: Path) -> Tuple[str, str]:
    """(what to add to the problem, the fix) when hidden folders below ``path`` hold DICOM files; ("", "")
    otherwise. Only a count: a folder's name may be the patient's."""
    n = _hidden_dicom_folders(path) if path.is_dir() else 0
    if not n:
        return "", ""
    return (f"; {n} hidden folder{'s' if n > 1 else ''} (name starting with '.') holding DICOM files "
            f"{'were' if n > 1 else 'was'} skipped",
            "medfuse leaves hidden folders out of a folder search; to load a series in one, give that hidden "
            "folder's own path (e.g. medfuse.load('study/.series1')), or rename it without the leading '.'")


def _cut_short(ds) -> bool:
    """True for a truncated file that pydicom read without complaint: nothing after the file meta, or an image
    storage object (by its SOP class) without Rows/Columns. pydicom returns what it read before the file ended."""
    if len(ds) == 0:
        return True
    sop = ds.get("SOPClassUID") or getattr(getattr(ds, "file_meta", None), "MediaStorageSOPClassUID", None)
    name = str(getattr(sop, "name", "")) if sop else ""
    return "Image Storage" in name and ("Rows" not in ds or "Columns" not in ds)


def _headers(path: Path, broken: Optional[List[Path]] = None,
             files: Optional[Sequence[Path]] = None) -> Dict[str, List[Tuple[Path, Any]]]:
    """Series UID -> [(file, header)] for every image DICOM under path (or among ``files``, read as a folder's);
    damaged DICOM files go to ``broken``."""
    single = files is None and path.is_file()
    series: Dict[str, List[Tuple[Path, Any]]] = {}
    n_non_image = 0
    damaged: List[Path] = []
    for f in (_files(path) if files is None else files):
        ds = _read_header(f, strict=single)
        if ds is _BROKEN:
            damaged.append(f)
            if broken is not None:
                broken.append(f)
            continue
        if ds is None:
            continue
        modality = str(ds.get("Modality", "")).upper()
        if modality not in _NON_IMAGE and _cut_short(ds):
            if single:
                raise UnreadableFileError("the file is cut short: its header ends before the image is described",
                                          fix="copy or export the file again", path=f)
            damaged.append(f)
            if broken is not None:
                broken.append(f)
            continue
        if modality in _NON_IMAGE or "Rows" not in ds or "Columns" not in ds:
            if single:
                what = ("an RT dose object without a dose grid (dose-volume histograms only)"
                        if modality == "RTDOSE" else _NON_IMAGE_WHAT.get(modality, ""))
                raise UnsupportedDataError(
                    f"this DICOM object ({modality or 'no modality'}{': ' + what if what else ''}) holds no image "
                    "medfuse can load (medfuse loads images and RT dose grids)",
                    fix="load the image series it refers to instead" + (
                        ", or an RTDOSE exported with its dose grid" if modality == "RTDOSE" else ""), path=f)
            n_non_image += 1
            continue
        series.setdefault(str(ds.get("SeriesInstanceUID", "unknown")), []).append((f, ds))
    if series:
        series = _in_viewer_order(_split_by_number(series))
    if not series:
        hidden, hidden_fix = _hidden_note(path) if files is None else ("", "")
        if n_non_image:
            raise UnsupportedDataError(f"the folder holds DICOM objects but no image series (RT, SEG, SR...){hidden}",
                                       fix=hidden_fix or "point to a folder with an image series", path=path)
        if damaged:  # "no DICOM here" read as the wrong folder, where the files were there but damaged
            # Counted, not named: no header was readable to blank a patient's name from their file names.
            raise UnreadableFileError(f"no readable DICOM image files were found: {len(damaged)} DICOM file(s) here "
                                      f"are damaged, truncated or empty{hidden}",
                                      fix="copy or export the series again", path=path)
        raise UnreadableFileError(f"no readable DICOM image files were found{hidden}",
                                  fix=hidden_fix or "check the folder; medfuse reads DICOM, NIfTI, MetaImage and NRRD",
                                  path=path)
    return series


def _series_number(ds) -> str:
    """SeriesNumber as text ("" when absent or empty); "05" and "5" are one number."""
    return series_number_text(ds.get("SeriesNumber", ""))


def series_number_text(value) -> str:
    """A SeriesNumber value as the reader compares it ("" when absent or empty; "05" and "5" alike)."""
    v = str(value or "").strip()
    try:
        return str(int(float(v)))
    except ValueError:
        return v


def _split_by_number(series: Dict[str, List[Tuple[Path, Any]]]) -> Dict[str, List[Tuple[Path, Any]]]:
    """Each SeriesInstanceUID whose files have different SeriesNumbers split into one series per number, keyed
    ``UID#N`` (``UID#`` for files without one); the others keep their UID as key.

    Why: the 9 files of a transfer-syntax test set share one SeriesInstanceUID under SeriesNumbers 1..9, and were
    read as one 4-D series of 9 "volumes" with no time order; dcm2niix writes 9 series.
    """
    out: Dict[str, List[Tuple[Path, Any]]] = {}
    for uid, files in series.items():
        by_number: Dict[str, List[Tuple[Path, Any]]] = {}
        for f, ds in files:
            by_number.setdefault(_series_number(ds), []).append((f, ds))
        if len([n for n in by_number if n]) <= 1:
            # One number, and files that carry none (an empty SeriesNumber is no sign of another series)
            out[uid] = files
            continue
        for number in sorted(by_number, key=lambda n: (not n.isdigit(), int(n) if n.isdigit() else 0, n)):
            out[f"{uid}#{number}"] = by_number[number]
    return out


def _number_of(files: Sequence[Tuple[Path, Any]]) -> str:
    """The SeriesNumber of a series' files (the first one given; "" when none has one)."""
    return next((n for n in (_series_number(ds) for _, ds in files) if n), "")


def _number_key(number: str) -> Tuple[int, int, str]:
    """Sort key of a SeriesNumber text: numbers in numeric order, then other text, then none."""
    try:
        return 0, int(number), ""
    except ValueError:
        return (1 if number else 2), 0, number


def _in_viewer_order(series: Dict[str, List[Tuple[Path, Any]]]) -> Dict[str, List[Tuple[Path, Any]]]:
    """The series ordered as viewers list them: by study (its earliest acquisition, then StudyInstanceUID), then by
    SeriesNumber (numeric; series without one last), then the series' first acquisition, then its folder (copies
    of one series in two folders), then SeriesInstanceUID.

    Why: they were listed in the order of their first file's name, so that ``--series 1`` (a number as listed)
    was the T1 in a PACS export named IM00001... and a Dixon image in the same study exported with
    SOPInstanceUID file names, and a series added later (SeriesNumber 1) came last. Without the study, a folder
    holding a baseline and a follow-up listed their series interleaved by number.
    """
    def first(files: List[Tuple[Path, Any]]) -> Tuple[int, float]:
        return min((a for a in (_acquired(ds) for _, ds in files) if a != (0, -1.0)), default=(0, -1.0))

    def study(files: List[Tuple[Path, Any]]) -> str:
        return next((u for u in (_uid_text(ds.get("StudyInstanceUID") or "") for _, ds in files) if u), "")

    # A study's time is its earliest series' (a study without a dated one sorts after those with one: a time of
    # day alone does not order two studies).
    began: Dict[str, Tuple[int, float]] = {}
    for files in series.values():
        t, uid = first(files), study(files)
        if t[0]:
            began[uid] = min(began.get(uid, t), t)

    def key(item: Tuple[str, List[Tuple[Path, Any]]]) -> Tuple:
        uid, files = item
        st = study(files)
        folder = min(os.fspath(f.parent) for f, _ in files)
        return (st not in began, began.get(st, (0, -1.0)), st, _number_key(_number_of(files)), first(files), folder,
                uid)

    return dict(sorted(series.items(), key=key))


def _real_uid(key: str) -> str:
    """The SeriesInstanceUID of a series key (``UID#N`` -> ``UID``; UIDs hold digits and dots only)."""
    return key.rsplit("#", 1)[0]


def _dedupe(files: List[Tuple[Path, Any]], path: Path, notes: Optional[List[str]] = None, *,
            pixels: bool = True) -> List[Tuple[Path, Any]]:
    """Drop second copies of one instance (same SOPInstanceUID, position and instance number).

    A folder holding a series twice (an export and its backup, a copied file) would otherwise look
    like a 4-D series with identical volumes, or like an incomplete one. A copy under another patient (a PACS
    merge) is no duplicate: the mixed-patients check refuses the series. ``pixels`` (a load, not a listing):
    copies that are not byte-equal have their pixel data compared, which reads them whole.

    Raises:
        UnreadableFileError: two whole copies of one instance hold different pixel data.
    """
    seen: Dict[Tuple, int] = {}  # key -> index in out
    out: List[Tuple[Path, Any]] = []
    shorter: List[Path] = []
    for f, ds in files:
        uid = ds.get("SOPInstanceUID")
        if uid is None:
            out.append((f, ds))
            continue
        key = (str(uid), str(ds.get("ImagePositionPatient", "")), str(ds.get("InstanceNumber", "")),
               str(ds.get("NumberOfFrames", "")), str(ds.get("Rows", "")), str(ds.get("Columns", "")))
        if key not in seen:
            seen[key] = len(out)
            out.append((f, ds))
            continue
        kept, kept_ds = out[seen[key]]
        if keys_disagree(patient_key(kept_ds), patient_key(ds)):
            # Another patient's copy: kept, so that the mixed-patients refusal sees it (it was dropped, and which
            # patient was read depended on file size). Formatting alone (a trailing '^', case) is one patient.
            out.append((f, ds))
            continue
        if _syntax(ds) != _syntax(kept_ds):  # a compressed and a plain copy differ in size, and neither is damaged
            continue
        if pixels:
            which = _damaged_copy(kept, f)
            if which is None:  # the same pixels (a header-only difference, or byte-equal files)
                continue
            if which == "neither":
                # Which copy was read depended on the file names: a slice of zeros under one name, the image under
                # the other.
                raise UnreadableFileError(
                    f"two files hold the same image (one SOPInstanceUID, position and instance number) with "
                    f"different pixel data: {kept.name} and {f.name}", fix="find out which copy is right and move "
                    "the other out of the folder (an edited or re-processed image needs its own SOPInstanceUID)",
                    path=path)
            if which == "first":  # a truncated copy that sorted first failed the whole load, the whole one there
                out[seen[key]] = (f, ds)
            shorter.append(kept if which == "first" else f)
            continue
        # A listing reads no pixels: the longer copy stands for the instance.
        size_f, size_kept = _file_size(f), _file_size(kept)
        if size_f > size_kept:
            out[seen[key]] = (f, ds)
            shorter.append(kept)
        elif size_f < size_kept:
            shorter.append(f)
    n = len(files) - len(out)
    if n:
        msg = (f"{n} duplicate file{'s' if n > 1 else ''} (the same instance stored twice) "
               f"{'were' if n > 1 else 'was'} ignored")
        if shorter:
            names = ", ".join(p.name for p in shorter[:3]) + (", ..." if len(shorter) > 3 else "")
            msg += (f"; {len(shorter)} of them shorter than the copy kept (damaged or truncated: {names}), which "
                    "may be deleted")
        _left_out(path, msg, notes)
    return out


def _damaged_copy(a: Path, b: Path) -> Optional[str]:
    """Of two copies of one instance: None when they hold the same pixels (byte-equal files, or a header-only
    difference, as a re-export makes); ``"first"``/``"second"`` for the one whose pixel data is cut short or
    unreadable (a truncated copy: pydicom returns what it read without an error); ``"neither"`` when both are
    whole and differ."""
    import filecmp

    import pydicom

    try:
        if filecmp.cmp(a, b, shallow=False):
            return None
    except OSError:
        pass
    got = []
    for p in (a, b):
        try:
            px = pydicom.dcmread(os.fspath(p), force=True).get("PixelData")
        except Exception:  # noqa: BLE001 - any failure to read it is a damaged copy
            px = None
        got.append(px if isinstance(px, (bytes, bytearray)) else None)
    pa, pb = got
    if pa is not None and pa == pb:
        return None
    if pa is None or (pb is not None and len(pa) < len(pb)):
        return "first"
    if pb is None or len(pb) < len(pa):
        return "second"
    return "neither"


def _syntax(ds: Any) -> str:
    return str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")


def _file_size(f: Path) -> int:
    try:
        return f.stat().st_size
    except OSError:
        return -1


class _Unsaid(list):
    """Notes kept without a warning (a listing: load says it). Why not ``warnings.catch_warnings``: it swaps
    process-wide state, so on a batch worker's threads another subject's warnings were dropped meanwhile."""


#: The patient identifiers of the series being loaded (:func:`_patient_ids`), blanked from its warnings, the
#: warnings its Volumes record and its errors: PACS exports name files and folders after the patient
#: (``SMITH_JOHN_IM0002.dcm``), and the loader named them where only the command line blanked them.
_PATIENT_IDS: "contextvars.ContextVar[Tuple[str, ...]]" = contextvars.ContextVar("medfuse_dicom_ids", default=())
_BLANKING_DEPTH: "contextvars.ContextVar[int]" = contextvars.ContextVar("medfuse_dicom_blanking", default=0)


@contextlib.contextmanager
def blanking_errors():
    """Blank the patient identifiers of the headers read inside from the MedfuseErrors raised inside.

    Nested uses share the outermost one's identifiers, so a check made after the headers were read (a 4-D
    series without ``volume_index``, a series choice that matches nothing) is blanked as well: those errors were
    raised once the loader's own blanking had ended, and quoted a folder named after the patient verbatim.
    """
    outer = _BLANKING_DEPTH.get()
    token = None if outer else _PATIENT_IDS.set(())
    depth = _BLANKING_DEPTH.set(outer + 1)
    try:
        yield
    except MedfuseError as e:
        _blank_error(e, _PATIENT_IDS.get())
        raise
    finally:
        _BLANKING_DEPTH.reset(depth)
        if token is not None:
            _PATIENT_IDS.reset(token)


def _warn(path: Path, msg: str) -> None:
    """Warn ``path: msg`` at the user's line (not medfuse's, nor contextlib's), with the identifiers blanked."""
    warnings.warn(_blanked(f"{path}: {msg}", _PATIENT_IDS.get()), MedfuseWarning, stacklevel=_user_stacklevel())


def _left_out(path: Path, msg: str, notes: Optional[List[str]]) -> None:
    """Say that files of a series were left out: a warning for the caller, and a note for the provenance."""
    if not isinstance(notes, _Unsaid):
        _warn(path, msg)
    if notes is not None:
        notes.append(msg)


def _is_localizer(ds) -> bool:
    """ImageType says LOCALIZER (CT Image value 3; many MR exports write it too)."""
    return "LOCALIZER" in [str(x).strip().upper() for x in (ds.get("ImageType") or [])]


def _drop_localizers(files: List[Tuple[Path, Any]], path: Path,
                     notes: Optional[List[str]] = None) -> List[Tuple[Path, Any]]:
    """Leave out localizer (scout) images stored under the series' own SeriesInstanceUID.

    Some scanners and PACS exports put the scout in the same series as the slices; it is another orientation (and
    often another size), so it made the series unreadable, and the advice to pick another series cannot separate
    them. Only images whose ImageType says LOCALIZER are left out, and only when other images remain.
    """
    keep = [(f, ds) for f, ds in files if not _is_localizer(ds)]
    n = len(files) - len(keep)
    if not n or not keep:
        return files
    _left_out(path, f"{n} localizer (scout) image{'s' if n > 1 else ''} stored in the series (ImageType "
                    f"LOCALIZER) {'were' if n > 1 else 'was'} left out", notes)
    return keep


#: Whose images, which study, which patient space: one series' instances agree on these (PS3.3 C.7.1.1, C.7.2.1,
#: C.7.4.1; enhanced multi-frame files keep them at the top level too).
_SUBJECT_KEYWORDS = ("PatientID", "PatientName", "PatientBirthDate", "StudyInstanceUID", "FrameOfReferenceUID")
_SUBJECT_TAGS = (0x00100020, 0x00100010, 0x00100030, 0x0020000D, 0x00200052)


def _raw_value(ds, tag: int) -> Any:
    """The element's value as stored (bytes, not decoded: a PatientName decoded took 150 us a file), or its value
    when already decoded; b"" when absent."""
    el = ds.get_item(tag)
    v = b"" if el is None or el.value is None else el.value
    return v if isinstance(v, bytes) else str(v)


def _uid_text(v: Any) -> str:
    return (v.decode("ascii", "replace") if isinstance(v, bytes) else v).strip(" \x00")


def _refuse_mixed_subjects(files: List[Tuple[Path, Any]], path: Path, notes: Optional[List[str]] = None) -> None:
    """Refuse a series whose instances disagree on the patient, the study or the frame of reference.

    Two patients' (or studies') instances under one SeriesInstanceUID (a copy, merge or anonymiser that reused the
    UID) were interleaved into one volume without a word. Only the headers already read are used: the raw values of
    :data:`_SUBJECT_KEYWORDS` go into a set (one tuple per instance), and only when it holds more than one tuple
    are the patients compared, on :func:`medfuse._patient.patient_key` (IDs and names as the fusion check compares
    them: letter case and trailing name components do not count). A value missing from some instances is not a
    disagreement (an export may empty it). A study or frame-of-reference UID that differs on every one of 3 or more
    files groups nothing (an exporter or anonymiser that made a new UID per file, not two series merged): a
    warning. No value is ever put in the message.

    Cost: the stored bytes are compared (about 7 us a file); names are decoded only for one file of each distinct
    patient module.
    """
    raw = [(tuple(_raw_value(ds, t) for t in _SUBJECT_TAGS), ds) for _, ds in files]
    if len({r for r, _ in raw}) < 2:
        return
    uids = [(_uid_text(r[3]), _uid_text(r[4])) for r, _ in raw]
    patients = {r[:3]: ds for r, ds in raw}  # one header per distinct stored patient module
    keys = list(dict.fromkeys(patient_key(ds) for ds in patients.values()))
    # Compared as normalised (letter case, trailing name components); an identifier left out of some files is no
    # disagreement (a birth date emptied on a few files of a real GE series).
    what = None
    if any(keys_disagree(a, b) for i, a in enumerate(keys) for b in keys[i + 1:]):
        what = ("belong to different patients (their PatientID, PatientName or PatientBirthDate differ; the values "
                "are not shown)")
    else:
        for i, (kw, noun) in ((0, ("StudyInstanceUID", "studies")), (1, ("FrameOfReferenceUID", "patient spaces"))):
            given = [u[i] for u in uids if u[i]]
            n = len(set(given))
            if n > 1 and n == len(given) >= 3:
                msg = (f"the series' {kw} differs on every file (made anew per file by an exporter or anonymiser?); "
                       "its files were read as one series by their SeriesInstanceUID")
                _warn(path, msg)
                if notes is not None:
                    notes.append(msg)
            elif n > 1:
                what = f"belong to {n} different {noun} (their {kw} differ)"
                break
    if what:
        raise UnreadableFileError(
            f"the series' files {what} although they share one SeriesInstanceUID: loaded as one series their "
            "slices would be interleaved into one volume", path=path,
            fix="put each patient's (or study's) files in a folder of their own and load that folder; a copy, merge "
                "or anonymisation that gave two series one SeriesInstanceUID must be redone from the originals")


# ---------------------------------------------------------------------------- frames
def _f(v, default=None):
    try:
        return float(v)
    except (TypeError, ValueError):
        return default


#: Seconds in a day, and the most a 4-D series' acquisition times may span when they carry no date: longer
#: spans that are short once read across midnight are read across midnight (see _unwrap_midnight).
_DAY_S = 86400.0
_HALF_DAY_S = _DAY_S / 2


def _tm_seconds(text: Any) -> Optional[float]:
    """Seconds after midnight of a DICOM TM (``HHMMSS.FFFFFF``, or the old ``HH:MM:SS``), None when absent or not
    a time."""
    main, _, frac = str(text if text is not None else "").strip().partition(".")
    main = main.replace(":", "")
    if not main.isdigit() or len(main) > 6:
        return None
    if len(main) % 2:  # a writer that stored the time as a number dropped its leading zero: "93015" is 09:30:15
        main = "0" + main
    hh, mm, ss = int(main[0:2]), int(main[2:4] or 0), int(main[4:6] or 0)
    if hh > 23 or mm > 59 or ss > 60:
        return None
    return hh * 3600.0 + mm * 60.0 + ss + (float("0." + frac) if frac.isdigit() else 0.0)


def _da_day(text: Any) -> Optional[int]:
    """Day number of a DICOM DA (``YYYYMMDD``, or the old ``YYYY.MM.DD``), None when absent or not a date."""
    from datetime import date

    d = str(text if text is not None else "").strip().replace(".", "").replace("-", "")
    try:
        return date(int(d[0:4]), int(d[4:6]), int(d[6:8])).toordinal() if len(d) == 8 and d.isdigit() else None
    except ValueError:
        return None


def _dt_stamp(text: Any) -> Optional[Tuple[int, float]]:
    """(day number, seconds after midnight) of a DICOM DT (``YYYYMMDDHHMMSS.FFFFFF&ZZXX``), None when it has no
    valid date. The UTC offset is dropped: the times of one series share it."""
    s = str(text if text is not None else "").strip()
    for sign in ("+", "-"):
        at = s.rfind(sign)
        if at >= 8:
            s = s[:at]
    day = _da_day(s[:8])
    if day is None:
        return None
    secs = _tm_seconds(s[8:]) if len(s) > 8 else 0.0
    return (day, secs) if secs is not None else None


def _acquired(ds) -> Tuple[int, float]:
    """(day number, seconds after midnight) of the image's acquisition; day 0 when no date is known, seconds -1
    when no time is.

    AcquisitionDateTime first: it carries the date (a series exported with it alone was ordered by
    InstanceNumber), then AcquisitionDate with AcquisitionTime.
    """
    stamp = _dt_stamp(ds.get("AcquisitionDateTime"))
    if stamp is not None:
        return stamp
    secs = _tm_seconds(ds.get("AcquisitionTime"))
    return _da_day(ds.get("AcquisitionDate")) or 0, -1.0 if secs is None else secs


class _TimeKey(NamedTuple):
    """Sort key of an image (or enhanced frame) among the volumes of a 4-D series; absent values 0 (seconds -1).
    NM frames have keys of their own (their frame vectors), which are plain tuples."""

    position: float  # a PET's gate or frame (_pet_position), else TemporalPositionIndex/TemporalPositionIdentifier
    day: float  # acquisition day number
    seconds: float  # acquisition time, seconds after midnight
    instance: float  # InstanceNumber
    source: str = ""  # the PET key that gave ``position`` (ImageIndex, TriggerTime...), "" for the others
    # (position, source) without ImageIndex, when ``source`` is ImageIndex: the key if ImageIndex proves not to
    # separate the volumes (_check_image_index).
    fallback: Tuple = ()


def _pet_series_type(ds) -> str:
    """SeriesType value 1 of a PET image (``GATED``, ``DYNAMIC``, ``STATIC``, ``WHOLE BODY``...), "" otherwise."""
    if str(ds.get("Modality", "")).strip().upper() != "PT":
        return ""
    kind = _text_values(ds, "SeriesType")
    return kind[0].upper() if kind else ""


def _pet_position(ds, image_index: bool = True) -> Optional[Tuple[float, str]]:
    """(place, key) of a classic PET image among the volumes of a GATED or DYNAMIC series, by the standard's keys
    (PS3.3 C.8.9.4.1.9); None for any other image (or one without those keys).

    GATED: ImageIndex counts slices fastest, then time slots, then R-R intervals, so (ImageIndex - 1) //
    NumberOfSlices is the gate (R-R windows included); TriggerTime when either is missing (or ``image_index`` is
    False). DYNAMIC: FrameReferenceTime, else ImageIndex likewise (the acquisition time follows in the key).

    Why: gates were ordered by InstanceNumber, and an export that numbered them backwards reversed them silently.
    """
    kind = _pet_series_type(ds)
    if kind not in ("GATED", "DYNAMIC"):
        return None
    index, per = _f(ds.get("ImageIndex")), _f(ds.get("NumberOfSlices"))
    by_index = (float((int(index) - 1) // int(per)) if image_index and index and per and index >= 1 and per >= 1
                else None)
    if kind == "GATED" and by_index is not None:
        return by_index, "ImageIndex"
    key = "TriggerTime" if kind == "GATED" else "FrameReferenceTime"
    v = _f(ds.get(key))
    if v is not None and math.isfinite(v):
        return v, key
    return (by_index, "ImageIndex") if by_index is not None else None


def _time_key(ds, fg=None) -> _TimeKey:
    """The :class:`_TimeKey` of an image, or of its enhanced frame ``fg``."""
    tp, stamp, source = None, None, ""
    if fg is not None:
        fc = fg.get("FrameContentSequence")
        if fc:
            tp = _f(fc[0].get("TemporalPositionIndex"))
            if tp is None:
                stamp = _dt_stamp(fc[0].get("FrameAcquisitionDateTime"))
    elif (pet := _pet_position(ds)) is not None:
        tp, source = pet
    temporal = _f(ds.get("TemporalPositionIdentifier"))
    if tp is None and stamp is None:
        tp = temporal
    fallback: Tuple = ()
    if source == "ImageIndex":
        alt = _pet_position(ds, image_index=False)
        fallback = alt if alt is not None else (temporal if temporal is not None else 0.0, "")
    # The date with the time: a dynamic series that runs past midnight restarts AcquisitionTime at 000000.
    day, secs = stamp if stamp is not None else _acquired(ds)
    return _TimeKey(tp if tp is not None else 0.0, float(day), secs, _f(ds.get("InstanceNumber"), 0.0), source,
                    fallback)


def _check_image_index(per_pos: Dict[float, List[_Frame]], nvol: int) -> None:
    """Key a PET series' images by TriggerTime (FrameReferenceTime; their :attr:`_TimeKey.fallback`) in place of
    ImageIndex when ImageIndex does not separate its ``nvol`` volumes: two images at one slice position in one
    place, or not ``nvol`` places in all (NumberOfSlices not the slices of one volume).

    Why: an export whose ImageIndex restarted at 1 in each gate put every image in place 0, so the gates came in
    their InstanceNumber order (reversed) and all were labelled gate 1.
    """
    keyed = [fr for v in per_pos.values() for fr in v
             if isinstance(fr.time_key, _TimeKey) and fr.time_key.source == "ImageIndex"]
    if not keyed:
        return

    def places(frs: Sequence[_Frame]) -> set:
        return {fr.time_key.position for fr in frs if fr.time_key.source == "ImageIndex"}

    if len(places(keyed)) == nvol and all(len(places(v)) == len(v) for v in per_pos.values()):
        return
    for fr in keyed:
        fr.time_key = fr.time_key._replace(position=fr.time_key.fallback[0], source=fr.time_key.fallback[1])


def _unwrap_midnight(frames: Sequence[_Frame]) -> None:
    """Give the times after midnight of a series without acquisition dates a day more (in the frames' time keys).

    Why: frames acquired at 23:58, 23:59 and 00:00 with AcquisitionTime alone were ordered 00:00 first, against
    their InstanceNumbers. Times that span more than half a day but less once read across midnight (the largest
    gap between them is over 12 hours) are read across midnight; a 4-D series does not last 12 hours.
    """
    if any(not isinstance(fr.time_key, _TimeKey) or fr.time_key.day for fr in frames):
        return  # dated (the date orders them), or NM frames
    times = sorted({fr.time_key.seconds for fr in frames if fr.time_key.seconds >= 0})
    if len(times) < 2 or times[-1] - times[0] <= _HALF_DAY_S:
        return
    gap, last_early = max((b - a, a) for a, b in zip(times, times[1:]))
    if gap <= _HALF_DAY_S:
        return
    for fr in frames:
        if 0 <= fr.time_key.seconds <= last_early:
            fr.time_key = fr.time_key._replace(seconds=fr.time_key.seconds + _DAY_S)


#: Fix for header values that cannot be right (a damaged or hand-edited header).
_FIX_DAMAGED = "the series' headers are damaged; export the series again from the scanner or PACS"


def _rescale_value(src, keyword: str, default: float, path: Optional[Path], where: str = "") -> float:
    """RescaleSlope/RescaleIntercept of ``src``, ``default`` when absent.

    Raises:
        UnreadableFileError: present but not a finite number (NaN, infinite, text), or a zero RescaleSlope.
    """
    try:
        v = src.get(keyword)
    except (ValueError, TypeError, OverflowError):  # pydicom converts a DS on access and raises on text
        v = "?"
    if v is None or (isinstance(v, str) and not v.strip()):
        return default
    x = _f(v)
    # Why: a NaN slope gave an all-NaN volume and a zero slope an all-constant one, both without a word.
    if x is None or not math.isfinite(x):
        raise UnreadableFileError(f"{keyword}{where} is not a finite number, so the stored pixel values cannot be "
                                  "rescaled", fix=_FIX_DAMAGED, path=path)
    if keyword == "RescaleSlope" and x == 0:
        raise UnreadableFileError(f"{keyword}{where} is 0, which would turn every pixel into the same value",
                                  fix=_FIX_DAMAGED, path=path)
    return x


def _scaling(ds, fg=None, shared=None, path: Optional[Path] = None) -> Tuple[float, float]:
    """(slope, intercept) of the stored pixels, Philips floating-point scaling included.

    Raises:
        UnreadableFileError: a slope or intercept that is not a finite number, or a zero slope (``path`` named).
    """
    slope = _rescale_value(ds, "RescaleSlope", 1.0, path)
    inter = _rescale_value(ds, "RescaleIntercept", 0.0, path)
    for g in (shared, fg):
        if g is not None and g.get("PixelValueTransformationSequence"):
            t = g.PixelValueTransformationSequence[0]
            where = " (PixelValueTransformationSequence)"
            slope = _rescale_value(t, "RescaleSlope", slope, path, where)
            inter = _rescale_value(t, "RescaleIntercept", inter, path, where)
    # Philips floating-point scaling (dcm2niix's "float not display" convention):
    # FP = (SV * RS + RI) / (RS * SS).
    ss_el = None
    for src in (fg, ds):
        pm = src.get((0x2005, 0x140F)) if src is not None else None
        if pm is not None and pm.VR == "SQ" and len(pm.value) and (0x2005, 0x100E) in pm.value[0]:
            ss_el = pm.value[0][(0x2005, 0x100E)]
            break
    if ss_el is None:
        ss_el = ds.get((0x2005, 0x100E))
    if "PHILIPS" in str(ds.get("Manufacturer", "")).upper() and ss_el is not None:
        ss = _f(ss_el.value)
        if ss is not None and not math.isfinite(ss):  # why: 1/NaN made every voxel NaN
            raise UnreadableFileError("the Philips scale slope (2005,100E) is not a finite number, so the pixel "
                                      "values cannot be rescaled", fix=_FIX_DAMAGED, path=path)
        if ss and slope:
            slope, inter = 1.0 / ss, inter / (slope * ss)
    return slope, inter


def _checked_plane(iop: Any, ps: Any, f: Path, where: str = "") -> Tuple[np.ndarray, Tuple[float, float]]:
    """ImageOrientationPatient (row and column cosines, normalised) and PixelSpacing (row, column mm), checked.

    Why: a negative spacing mirrored the image without a word, a zero one was refused with NIfTI advice, and an
    orientation of zeros, NaN or two parallel vectors gave nonsense (or a message about mixed orientations).

    Raises:
        GeometryError: a spacing that is not two finite positive numbers, or an orientation that is not two finite,
            unit-length, perpendicular vectors (within 1%).
    """
    sp = np.array([float(x) for x in ps], float)
    if sp.shape != (2,) or not np.all(np.isfinite(sp)) or np.any(sp <= 0):
        what = "does not hold two values" if sp.shape != (2,) else "is not finite" if not np.all(np.isfinite(sp)) else \
            "is zero or negative"
        raise GeometryError(f"PixelSpacing{where} {what}, so the voxel size is unknown", fix=_FIX_DAMAGED, path=f)
    v = np.array([float(x) for x in iop], float)
    if v.shape != (6,) or not np.all(np.isfinite(v)):
        what = "does not hold six values" if v.shape != (6,) else "is not finite (NaN or infinite values)"
    else:
        r, c = v[:3], v[3:]
        nr, nc = float(np.linalg.norm(r)), float(np.linalg.norm(c))
        if abs(nr - 1) > 0.01 or abs(nc - 1) > 0.01:
            what = "holds a row or column direction that is not a unit vector (zeros?)"
        elif abs(float(r @ c)) / (nr * nc) > 0.01:
            what = "holds row and column directions that are not perpendicular (parallel?)"
        else:
            return np.concatenate([r / nr, c / nc]), (float(sp[0]), float(sp[1]))
    raise GeometryError(f"ImageOrientationPatient{where} {what}, so the slice orientation is unknown",
                        fix=_FIX_DAMAGED, path=f)


def _frame_bits(ds) -> int:
    """Bits of one uncompressed frame: Rows x Columns x SamplesPerPixel x BitsAllocated (a missing or non-numeric
    tag raises AttributeError, TypeError or ValueError)."""
    return int(ds.Rows) * int(ds.Columns) * int(ds.get("SamplesPerPixel", 1) or 1) * int(ds.BitsAllocated)


def _frame_count(f: Path, ds) -> int:
    """NumberOfFrames, refused when the file is too small to hold that many frames.

    Why: the count sizes lists (and later arrays) before any pixel is read; a 900-byte file claiming 2**31 frames
    took a minute and all memory before it failed. Every frame needs at least 8 bytes (an encapsulated frame's
    item header), and uncompressed ones Rows x Columns x bits.
    """
    try:
        n = int(ds.get("NumberOfFrames", 1) or 1)
    except (TypeError, ValueError):
        raise UnreadableFileError("NumberOfFrames (0028,0008) is not a whole number",
                                  fix="check the export; the header is damaged", path=f) from None
    if n < 1:
        raise UnreadableFileError(f"NumberOfFrames (0028,0008) is {n}", fix="check the export; the header is "
                                  "damaged", path=f)
    if n == 1:
        return n
    try:
        size = f.stat().st_size
    except OSError:
        return n
    per_frame = 8
    try:
        ts = ds.file_meta.TransferSyntaxUID
        if not ts.is_compressed and not getattr(ts, "is_deflated", False):  # deflated files are smaller
            per_frame = max(per_frame, _frame_bits(ds) // 8)
    except (AttributeError, TypeError, ValueError):
        pass
    if n * per_frame > size:
        raise UnreadableFileError(f"NumberOfFrames (0028,0008) says {n} frames, but the file ({size} bytes) "
                                  f"cannot hold them", fix="copy or export the file again (a complete file with "
                                  "this message has a wrong NumberOfFrames)", path=f)
    return n


def _frames_of(f: Path, ds) -> List[_Frame]:
    n = _frame_count(f, ds)
    modality = str(ds.get("Modality", "")).upper()
    if "PerFrameFunctionalGroupsSequence" in ds:
        shared = ds.SharedFunctionalGroupsSequence[0] if ds.get("SharedFunctionalGroupsSequence") else None
        out = []
        for idx, fg in enumerate(ds.PerFrameFunctionalGroupsSequence):
            def pick(seq, kw):
                for g in (fg, shared):
                    if g is not None and g.get(seq):
                        v = g.get(seq)[0].get(kw)
                        if v is not None:
                            return v
                return None
            pos, iop, ps = pick("PlanePositionSequence", "ImagePositionPatient"), \
                pick("PlaneOrientationSequence", "ImageOrientationPatient"), pick("PixelMeasuresSequence", "PixelSpacing")
            if pos is None or iop is None or ps is None:
                raise GeometryError("an enhanced multi-frame frame lacks its plane position/orientation/pixel spacing",
                                    fix="re-export the series with geometry", path=f)
            iop, sp = _checked_plane(iop, ps, f, f" (functional groups, frame {idx + 1})")
            s, i = _scaling(ds, fg, shared, path=f)
            out.append(_Frame(f, idx, np.array(pos, float), iop, sp, s, i, _time_key(ds, fg),
                              frame_type=_frame_type(fg, shared)))
        return out
    if modality == "NM" and n > 1:
        return _nm_frames(f, ds, n)
    if modality == "RTDOSE":
        return _rtdose_frames(f, ds, n)
    iop, pos, ps = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"), ds.get("PixelSpacing")
    if iop is None or pos is None:
        raise GeometryError("the image has no ImagePositionPatient/ImageOrientationPatient",
                            fix="medfuse needs patient geometry; re-export the series with it", path=f)
    ps = ps or ds.get("ImagerPixelSpacing")
    if not ps:
        raise GeometryError("the image has no PixelSpacing, so its voxel size is unknown",
                            fix="medfuse does not guess a voxel size; re-export the series with PixelSpacing", path=f)
    iop, ps = _checked_plane(iop, ps, f)
    pos = np.array(pos, float)
    s, i = _scaling(ds, path=f)
    key = _time_key(ds)
    itype = [str(x).upper() for x in (ds.get("ImageType") or [])]
    if "MOSAIC" in itype:
        ntiles = _mosaic_count(ds)
        if ntiles is None:
            raise UnsupportedDataError(
                "this Siemens mosaic lacks NumberOfImagesInMosaic (0019,100A), so its tiles cannot be split into "
                "slices (the private tags were probably removed by an anonymiser)",
                fix="use the series as exported by the scanner, or an anonymiser that keeps the Siemens private "
                    "groups 0019 and 0029", path=f)
        return _mosaic_frames(f, ds, ntiles, iop, pos, ps, s, i, key)
    dz = _f(ds.get("SpacingBetweenSlices")) or _f(ds.get("SliceThickness")) or 1.0
    if n > 1:
        return _classic_multiframe(f, ds, n, modality, iop, pos, ps, s, i, key)
    return [_Frame(f, None, pos, iop, (float(ps[0]), float(ps[1])), s, i, key, thickness=abs(dz))]


def _frame_type(fg, shared) -> str:
    """FrameType value 4 of an enhanced frame (from any ``*FrameTypeSequence``: MR, CT, PET...), "" when absent."""
    for g in (fg, shared):
        if g is None:
            continue
        for kw in g.dir("FrameTypeSequence"):
            seq = g.get(kw)
            ft = list(seq[0].get("FrameType") or []) if seq else []
            if len(ft) >= 4:
                return str(ft[3]).strip().upper()
    return ""


#: Frame increment pointers that make a classic multi-frame file's frames slices (PS3.3 C.7.6.6, C.8.4.9).
_SLICE_POINTERS = {0x00182005: "SliceLocationVector", 0x00540080: "SliceVector"}


def _classic_multiframe(f, ds, n, modality, iop, pos, ps, s, i, key) -> List[_Frame]:
    """Frames of a classic (not enhanced) multi-frame file, which gives one ImagePositionPatient for all of them.

    A CT, MR or PT file with a slice spacing and no frame increment other than a slice vector holds slices
    (GDCM, SimpleITK and dcm2niix stack them along the normal): frame k is placed k x spacing along row x column
    from the stored position (derived, and said so at load). Otherwise (a cine, another modality, no spacing) the
    frames stay at the one position: time points of one slice each, with the reason kept for the message.
    """
    from pydicom.multival import MultiValue

    fip = ds.get("FrameIncrementPointer")
    fip = [] if fip is None else [int(t) for t in (fip if isinstance(fip, (list, tuple, MultiValue)) else [fip])]
    spacing = [(t, v) for t in ("SpacingBetweenSlices", "SliceThickness")
               if (v := _f(ds.get(t))) is not None and math.isfinite(v) and v != 0]
    others = [t for t in fip if t not in _SLICE_POINTERS]
    if modality not in ("CT", "MR", "PT"):
        why = f"its modality ({modality or 'none'}) is not CT, MR or PT"
    elif others:
        from pydicom.datadict import keyword_for_tag

        why = "its FrameIncrementPointer names " + ", ".join(
            keyword_for_tag(t) or f"({t >> 16:04X},{t & 0xFFFF:04X})" for t in others)
    elif not spacing:
        why = "it gives neither SpacingBetweenSlices nor SliceThickness"
    else:
        tag, dz = spacing[0]
        normal = np.cross(iop[:3], iop[3:])
        return [_Frame(f, k, pos + k * abs(dz) * normal, iop, (float(ps[0]), float(ps[1])), s, i, key,
                       thickness=abs(dz), shared_pos=("slices", tag)) for k in range(n)]
    dz = abs(spacing[0][1]) if spacing else 1.0
    return [_Frame(f, k, pos, iop, (float(ps[0]), float(ps[1])), s, i, key, thickness=dz,
                   shared_pos=("time", why)) for k in range(n)]


def _shared_position_note(frames: Sequence[_Frame]) -> Optional[str]:
    """What load says about classic multi-frame files whose frames share one stored position; None if none."""
    by_file: Dict[Path, List[_Frame]] = {}
    for fr in frames:
        if fr.shared_pos is not None:
            by_file.setdefault(fr.file, []).append(fr)
    if not by_file:
        return None
    (how, what), group = next((g[0].shared_pos, g) for g in by_file.values())
    nf = len(by_file)
    files = "the multi-frame file" if nf == 1 else f"each of the {nf} multi-frame files"
    if how == "slices":
        return (f"the {len(group)} frames of {files} share one ImagePositionPatient (no position per frame): they "
                f"were placed as slices {group[0].thickness:g} mm apart along the slice normal (row x column) "
                f"from its {what}, as GDCM and dcm2niix read such files (derived positions, not stored ones)")
    return (f"the {len(group)} frames of {files} share one ImagePositionPatient and {what}, so they are read as "
            f"{len(group)} volumes of one slice (time points), not as the slices of one volume")


#: NM frame-increment vectors (PS3.3 C.8.4.9/C.8.4.10).
_NM_SLICE_VECTOR = 0x00540080
_NM_VECTORS = {0x00540010: "EnergyWindowVector", 0x00540020: "DetectorVector", 0x00540030: "PhaseVector",
               0x00540050: "RotationVector", 0x00540060: "RRIntervalVector", 0x00540070: "TimeSlotVector",
               0x00540080: "SliceVector", 0x00540090: "AngularViewVector", 0x00540100: "TimeSliceVector"}
#: NM image types (ImageType value 3) whose frames are not reconstructed slices.
_NM_PLANAR = {"STATIC", "DYNAMIC", "GATED", "WHOLE BODY", "TOMO", "GATED TOMO"}
#: What those frames are, in words.
_NM_NOT_SLICES = {"TOMO": "projection (TOMO, not reconstructed)", "GATED TOMO": "gated projection (GATED TOMO, not "
                  "reconstructed)", "WHOLE BODY": "whole-body planar"}


def _nm_kind(ds) -> str:
    """ImageType value 3 of an NM image (``RECON TOMO``, ``GATED TOMO``...), upper case; "" when absent."""
    itype = [str(x).strip().upper() for x in (ds.get("ImageType") or [])]
    return itype[2] if len(itype) > 2 else ""


def _nm_not_volume(ds) -> str:
    """What a listing says an NM image whose frames are no slices holds (projections, planar frames); ""
    for any other image."""
    kind = _nm_kind(ds)
    if str(ds.get("Modality", "")).strip().upper() != "NM" or kind not in _NM_PLANAR:
        return ""
    what = _NM_NOT_SLICES.get(kind, f"planar ({kind})")
    return what.replace("projection (", "projections (")


def _nm_frames(f: Path, ds, n: int) -> List[_Frame]:
    """NM multi-frame: only reconstructed tomography (SPECT) is a volume.

    Frames are placed with SliceVector when the frame increment pointer has one (other vectors,
    such as gated time slots, make 4-D volumes); planar, dynamic, whole-body and projection
    (TOMO) frames are refused instead of being stacked as if they were slices.
    """
    from pydicom.multival import MultiValue

    kind = _nm_kind(ds)
    fip = ds.get("FrameIncrementPointer")
    fip = [] if fip is None else [int(t) for t in (fip if isinstance(fip, (list, tuple, MultiValue)) else [fip])]
    has_slices = _NM_SLICE_VECTOR in fip
    if kind in _NM_PLANAR or (fip and not has_slices):
        what = _NM_NOT_SLICES.get(kind, kind.lower() if kind else "planar")
        vecs = ", ".join(_NM_VECTORS.get(t, f"({t >> 16:04X},{t & 0xFFFF:04X})") for t in fip) or "none"
        # A gated study's reconstruction is RECON GATED TOMO (its gates) beside RECON TOMO (the summed image).
        gated = "GATED" in kind or any(t in fip for t in (0x00540060, 0x00540070))
        raise UnsupportedDataError(
            f"this NM image holds {n} {what} frames (frame increment: {vecs}), not reconstructed slices, "
            "so it is not a 3-D volume",
            fix="load the reconstructed SPECT series instead: ImageType RECON GATED TOMO (the gates) or RECON TOMO "
                "(the ungated image)" if gated else "load the reconstructed SPECT series (ImageType RECON TOMO) "
                "instead", path=f)
    det = ds.get("DetectorInformationSequence")
    d0 = det[0] if det else None
    iop = (d0.get("ImageOrientationPatient") if d0 is not None else None) or ds.get("ImageOrientationPatient")
    pos = (d0.get("ImagePositionPatient") if d0 is not None else None) or ds.get("ImagePositionPatient")
    ps = ds.get("PixelSpacing")
    if iop is None or pos is None or ps is None:
        missing = [name for name, v in (("ImageOrientationPatient", iop), ("ImagePositionPatient", pos),
                                        ("PixelSpacing", ps)) if v is None]
        raise GeometryError(f"the NM image lacks {' and '.join(missing)} (DetectorInformationSequence), so its "
                            "position in the patient is unknown",
                            fix="re-export the reconstructed SPECT with patient geometry", path=f)
    dz = _f(ds.get("SpacingBetweenSlices")) or _f(ds.get("SliceThickness"))
    if not dz:
        raise GeometryError("the NM image has neither SpacingBetweenSlices nor SliceThickness, so the distance "
                            "between its slices is unknown", fix="re-export the reconstructed SPECT with them", path=f)
    iop, ps = _checked_plane(iop, ps, f)
    normal = np.cross(iop[:3], iop[3:])
    s, i = _scaling(ds, path=f)
    vectors = {t: list(ds[t].value) if t in ds and ds[t].VM > 1 else [ds[t].value] if t in ds else None for t in fip}
    slice_no = vectors.get(_NM_SLICE_VECTOR)
    if has_slices and (slice_no is None or len(slice_no) != n):
        raise GeometryError("the NM SliceVector does not list one slice per frame",
                            fix="re-export the reconstructed SPECT", path=f)
    out = []
    for k in range(n):
        z = (int(slice_no[k]) - 1) if has_slices else k
        named = tuple((_NM_VECTORS.get(t, str(t)), float(v[k])) for t, v in vectors.items()
                      if t != _NM_SLICE_VECTOR and v and len(v) == n)
        out.append(_Frame(f, k, np.array(pos, float) + z * dz * normal, iop, (float(ps[0]), float(ps[1])), s, i,
                          tuple(x for _, x in named) or (0.0,), vectors=named))
    return out


#: Fix for an RT dose grid whose geometry or scaling cannot be read.
_FIX_DOSE = "export the dose again from the treatment planning system (with its dose grid, not only the DVHs)"


def _rtdose_frames(f: Path, ds, n: int) -> List[_Frame]:
    """Frames of an RT Dose grid (PS3.3 C.8.8.3): slices at ImagePositionPatient plus GridFrameOffsetVector
    (3004,000C) along the normal (row x column), values stored x DoseGridScaling (after any rescale).

    GridFrameOffsetVector comes in the standard's two forms (C.8.8.3.2): relative (first value 0, the frames'
    distances from the first one) or, for an axial grid (ImageOrientationPatient 1\\0\\0\\0\\1\\0) only, absolute (each
    frame's z, the first equal to ImagePositionPatient's). The offsets vary monotonically (increasing or
    decreasing); uneven ones are regularised as uneven slice spacing is.

    Raises:
        GeometryError: no position, orientation or pixel spacing; no GridFrameOffsetVector for several frames, one
            that lists another number of offsets than frames, that does not vary monotonically, or that starts
            neither at 0 nor (axial grids) at the first frame's z.
        UnreadableFileError: a DoseGridScaling that is missing, not a finite number, or not positive.
    """
    iop, pos, ps = ds.get("ImageOrientationPatient"), ds.get("ImagePositionPatient"), ds.get("PixelSpacing")
    missing = [name for name, v in (("ImagePositionPatient", pos), ("ImageOrientationPatient", iop),
                                    ("PixelSpacing", ps)) if not v]
    if missing:
        raise GeometryError(f"the RT dose grid lacks {' and '.join(missing)}, so where it lies in the patient is "
                            "unknown", fix=_FIX_DOSE, path=f)
    iop, sp = _checked_plane(iop, ps, f)
    pos = np.array([float(x) for x in pos], float)
    if pos.shape != (3,) or not np.all(np.isfinite(pos)):
        raise GeometryError("ImagePositionPatient of the RT dose grid is not three finite numbers", fix=_FIX_DOSE,
                            path=f)
    scale = _f(ds.get("DoseGridScaling"))
    if scale is None or not math.isfinite(scale) or scale <= 0:
        what = "is missing" if ds.get("DoseGridScaling") in (None, "") else "is not a finite positive number"
        # Why no default of 1: the stored integers are dose / DoseGridScaling (often 1e-5 Gy a step), and reading
        # them as Gy would be wrong by that factor, without a word.
        raise UnreadableFileError(f"DoseGridScaling (3004,000E) of the RT dose {what}, so the stored values cannot "
                                  "be turned into dose", fix=_FIX_DOSE, path=f)
    raw = ds.get("GridFrameOffsetVector")
    offsets = [] if raw is None or raw == "" else [_f(v) for v in (raw if isinstance(raw, (list, tuple)) or
                                                                 type(raw).__name__ == "MultiValue" else [raw])]
    if not offsets and n > 1:
        raise GeometryError(f"the RT dose grid has {n} frames but no GridFrameOffsetVector (3004,000C), so where "
                            "its frames lie is unknown", fix=_FIX_DOSE, path=f)
    off = np.array(offsets or [0.0], float) if all(v is not None for v in offsets) else np.array([np.nan])
    if not np.all(np.isfinite(off)):
        raise GeometryError("GridFrameOffsetVector (3004,000C) of the RT dose holds values that are not finite "
                            "numbers", fix=_FIX_DOSE, path=f)
    if len(off) != n:
        raise GeometryError(f"GridFrameOffsetVector (3004,000C) lists {len(off)} offsets for the dose grid's {n} "
                            "frames (NumberOfFrames), so its frames cannot be placed", fix=_FIX_DOSE, path=f)
    steps = np.diff(off)
    if n > 1 and not (np.all(steps > 0) or np.all(steps < 0)):
        raise GeometryError("GridFrameOffsetVector (3004,000C) of the RT dose does not vary monotonically (an "
                            "offset repeated, or the order reversed), so its frames do not form one grid",
                            fix=_FIX_DOSE, path=f)
    if abs(off[0]) > _POS_TOL:
        axial = np.allclose(iop, [1, 0, 0, 0, 1, 0], atol=1e-3)
        if not (axial and abs(off[0] - pos[2]) <= _POS_TOL):
            raise GeometryError(
                f"GridFrameOffsetVector (3004,000C) of the RT dose starts at {off[0]:g} mm: neither 0 (offsets from "
                "the first frame) nor" + (f" the first frame's z ({pos[2]:g} mm; absolute offsets)" if axial else
                                          " allowed as absolute offsets (only for an axial grid)")
                + ", so where its frames lie is ambiguous", fix=_FIX_DOSE, path=f)
        off = off - pos[2]  # absolute: each frame's z; the normal of an axial grid is +z
    normal = np.cross(iop[:3], iop[3:])
    s, i = _scaling(ds, path=f)
    key = _time_key(ds)
    thickness = float(np.min(np.abs(steps))) if n > 1 else abs(_f(ds.get("SliceThickness")) or 1.0)
    return [_Frame(f, k if n > 1 else None, pos + off[k] * normal, iop, sp, s * scale, i * scale, key,
                   thickness=thickness) for k in range(n)]


def _mosaic_count(ds) -> Optional[int]:
    """NumberOfImagesInMosaic (Siemens private (0019,xx0A)), also when read with VR UN; None when absent."""
    el = None
    try:
        block = ds.private_block(0x0019, "SIEMENS MR HEADER")
        if 0x0A in block:
            el = block[0x0A]
    except (KeyError, ValueError):
        pass
    if el is None:
        el = ds.get((0x0019, 0x100A))
    if el is None:
        return None
    v = el.value
    if isinstance(v, (bytes, bytearray)):
        v = int.from_bytes(bytes(v[:2]), "little")  # US read as UN (mosaics are little-endian in practice)
    n = int(_f(v, 0) or 0)
    return n if n > 0 else None


_NICOM_WARNING = "The DICOM readers are highly experimental"


@functools.lru_cache(maxsize=None)
def _csareader():
    """nibabel's Siemens CSA header reader. Importing ``nibabel.nicom`` warns that its DICOM readers are
    experimental; medfuse uses only the CSA parser, so that one message is filtered, once per process (a targeted
    filter, not ``catch_warnings``, which swaps process-wide state under other threads)."""
    warnings.filterwarnings("ignore", message=_NICOM_WARNING, category=UserWarning)
    from nibabel.nicom import csareader

    return csareader


def _csa_slice_normal(ds, cross: np.ndarray) -> Optional[np.ndarray]:
    """SliceNormalVector of the Siemens CSA image header (0029,xx10) as a unit vector; None when the header is
    absent (an anonymiser removed group 0029), unreadable, or the vector is not parallel to ``cross`` (row x
    column, unit length) within about 8 degrees (then the cross product alone is used, as before)."""
    if (0x0029, 0x0010) not in ds:  # no private creator in group 0029: no CSA header (cheap test first)
        return None
    try:
        csar = _csareader()
        v = csar.get_slice_normal(csar.get_csa_header(ds, "image"))
        if v is None:
            return None
        v = np.array([float(x) for x in v], float)
    except Exception:  # noqa: BLE001 - a damaged or foreign private header: fall back to row x column
        return None
    if v.shape != (3,) or not np.all(np.isfinite(v)):
        return None
    n = float(np.linalg.norm(v))
    if n == 0 or abs(float(v @ cross)) < 0.99 * n:
        return None
    return v / n


def _mosaic_frames(f, ds, ntiles, iop, pos, ps, s, i, key) -> List[_Frame]:
    # Siemens mosaic: IPP refers to the corner of the whole mosaic; shift it to the first
    # tile's corner as dcm2niix does, then step along the normal.
    m = int(math.ceil(math.sqrt(ntiles)))
    rows, cols = int(ds.Rows) // m, int(ds.Columns) // m
    r, c = iop[:3], iop[3:]
    row_sp, col_sp = float(ps[0]), float(ps[1])
    first = pos + r * col_sp * (int(ds.Columns) - cols) / 2.0 + c * row_sp * (int(ds.Rows) - rows) / 2.0
    dz = _f(ds.get("SpacingBetweenSlices")) or _f(ds.get("SliceThickness")) or 1.0
    normal = np.cross(r, c)
    # Why: the tiles run along the CSA SliceNormalVector, which points against row x column when
    # det([row, col, normal]) < 0 (Siemens sagittal, R>>L); stacking along the cross product put every slice but
    # the first on the wrong side (122 mm off at the last). dcm2niix and nibabel take the sign from the CSA.
    csa = _csa_slice_normal(ds, normal)
    if csa is not None and float(csa @ normal) < 0:
        normal = -normal
    return [_Frame(f, None, first + t * dz * normal, iop, (row_sp, col_sp), s, i, key,
                   ((t // m) * rows, (t % m) * cols, rows, cols)) for t in range(ntiles)]


# ---------------------------------------------------------------------------- grouping
def _series_frames(files: Sequence[Tuple[Path, Any]], path: Path) -> List[_Frame]:
    frames: List[_Frame] = []
    for f, ds in files:
        try:
            frames.extend(_frames_of(f, ds))
        except (GeometryError, UnsupportedDataError, UnreadableFileError):
            raise
        except (ValueError, TypeError, IndexError, AttributeError, KeyError) as e:
            raise GeometryError(f"the geometry tags are malformed ({type(e).__name__})",
                                fix="check ImagePositionPatient, ImageOrientationPatient and PixelSpacing",
                                path=f) from None
    kinds = {f: _image_kind(ds) for f, ds in files}
    for fr in frames:
        if not fr.frame_type and fr.index is None:  # a single-frame image: its ImageType says its kind
            fr.image_kind = kinds[fr.file]
    dims = {}
    for f, ds in files:
        dims.setdefault((int(ds.Rows), int(ds.Columns)), f)
    if len(dims) > 1:
        shown = ", ".join(f"{r}x{c}" for r, c in sorted(dims))
        raise GeometryError(f"the series mixes image sizes (rows x columns: {shown}), so its slices do not "
                            "form one volume", fix="load the images of one size at a time, or re-export the series",
                            path=path)
    sp = np.array([fr.spacing for fr in frames])
    if len(sp) and np.max(np.abs(sp - sp[0])) > 1e-3 * max(float(np.max(sp[0])), 1e-6):
        shown = ", ".join(f"{a:g}x{b:g}" for a, b in sorted({(round(a, 4), round(b, 4)) for a, b in sp}))
        raise GeometryError(f"the series mixes pixel spacings ({shown} mm), so its slices do not form one volume",
                            fix="load the images of one reconstruction at a time, or re-export the series", path=path)
    return frames


#: ImageOrientationPatient values that differ by more than 1e-3 (about 0.06 degrees) are another orientation; a
#: spread under 1 degree is a drift, not a localizer (whose planes are 90 degrees apart).
_IOP_TOL_DEG = math.degrees(1e-3)
_DRIFT_DEG = 1.0


def _iop_angle(a: np.ndarray, b: np.ndarray) -> float:
    """The largest angle (degrees) between the row, column and normal directions of two orientations."""
    na, nb = np.cross(a[:3], a[3:]), np.cross(b[:3], b[3:])
    cos = [float(np.dot(u, v) / (np.linalg.norm(u) * np.linalg.norm(v) or 1.0))
           for u, v in ((a[:3], b[:3]), (a[3:], b[3:]), (na, nb))]
    return max(math.degrees(math.acos(min(1.0, max(-1.0, c)))) for c in cos)


def _split_volumes(frames: List[_Frame], path: Path,
                   notes: Optional[List[str]] = None) -> Tuple[List[List[_Frame]], np.ndarray]:
    """Group frames into volumes of slices sorted along the normal; returns (volumes, normal).

    When ``notes`` is given (a load, not a listing), volumes whose frames have the same time key (temporal
    position, acquisition date and time, instance number) are said to have no time order, with a warning: their
    order is then the order of the files and frames, which may not be the acquisition's.
    """
    iop = frames[0].iop
    if any(not np.allclose(fr.iop, iop, atol=1e-3) for fr in frames):
        # One SeriesInstanceUID: choosing a series cannot separate them, so say how many and which files.
        groups: List[List[_Frame]] = []
        for fr in frames:
            g = next((g for g in groups if np.allclose(g[0].iop, fr.iop, atol=1e-3)), None)
            g.append(fr) if g is not None else groups.append([fr])
        groups.sort(key=len, reverse=True)
        spread = max(_iop_angle(fr.iop, iop) for fr in frames)
        if spread < _DRIFT_DEG:
            # Direction cosines that drift by hundredths of a degree from slice to slice are no localizer: the
            # advice to move most of the series out of the folder did not fit.
            raise GeometryError(f"the slice orientation drifts across the series, by up to {spread:.2f} degrees "
                                f"(more than the {_IOP_TOL_DEG:.2f} degrees medfuse takes as one orientation), so "
                                "its slices do not form one regular volume",
                                fix="re-export the series from the scanner or PACS (a conversion that rounded or "
                                    "recomputed ImageOrientationPatient per slice?), or resample it with a tool "
                                    "that reads each slice's own orientation", path=path)
        main = {fr.file for fr in groups[0]}
        odd = sorted({fr.file.name for g in groups[1:] for fr in g if fr.file not in main})
        fix = (f"move the {len(odd)} file(s) of the other orientation(s) (e.g. {odd[0]}) out of the folder, then "
               "load it again" if odd else "its multi-frame file(s) hold frames of several orientations (a "
               "multi-plane localizer?), which are not one volume: load another series")
        raise GeometryError(f"the series mixes {len(groups)} slice orientations ("
                            f"{', '.join(str(len(g)) for g in groups)} images; a localizer or scout stored in the "
                            "same series?), so its images do not form one volume", fix=fix, path=path)
    normal = np.cross(iop[:3], iop[3:])
    proj = np.array([float(fr.pos @ normal) for fr in frames])
    # One slice position per cluster of projections closer than _POS_TOL: positions written by
    # scanners jitter by micrometres between the volumes of a 4-D series, and rounding them
    # would split a position in two when the jitter straddles a rounding boundary.
    order = np.argsort(proj, kind="stable")
    keys = np.empty(len(proj))
    start = 0
    for n, idx in enumerate(order):
        if n and proj[idx] - proj[order[n - 1]] > _POS_TOL:
            start = n
        keys[idx] = proj[order[start]]
    uniq = np.unique(keys)
    per_pos: Dict[float, List[_Frame]] = {}
    for k, fr in zip(keys, frames):
        per_pos.setdefault(float(k), []).append(fr)
    counts = {len(v) for v in per_pos.values()}
    if len(counts) != 1:
        by_count: Dict[int, List[List[_Frame]]] = {}
        for v in per_pos.values():
            by_count.setdefault(len(v), []).append(v)
        shown = ", ".join(f"{len(by_count[c])} hold{'s' if len(by_count[c]) == 1 else ''} {c}"
                          for c in sorted(by_count))
        # The rarer count is the odd one out: an image stored twice under two SOPInstanceUIDs (a re-sent image),
        # or the positions an incomplete 4-D series still has.
        rare = min(by_count, key=lambda c: (len(by_count[c]), -c))
        example = ", ".join(sorted({fr.file.name for fr in by_count[rare][0]})[:3])
        if rare < max(by_count):
            # Fewer images than elsewhere: one is missing there (the advice to remove a copy misled).
            raise GeometryError(f"slice positions hold different numbers of images ({len(per_pos)} positions: "
                                f"{shown}): an incomplete 4-D series, an image missing at the odd position(s)",
                                fix=f"re-export the complete series (or restore the missing file); the images at "
                                    f"the odd position are {example}", path=path)
        raise GeometryError(f"slice positions hold different numbers of images ({len(per_pos)} positions: {shown}): "
                            "an image stored twice under two instance UIDs, or an incomplete 4-D series",
                            fix=f"check the images at the odd position ({example}): remove a second copy, or "
                                "re-export the complete series", path=path)
    nvol = counts.pop()
    _check_image_index(per_pos, nvol)
    _unwrap_midnight(frames)
    for v in per_pos.values():
        # The kind breaks ties: images of one time and several kinds (mDIXON) were in the files' order, and a
        # volume could mix them.
        v.sort(key=lambda fr: (fr.time_key, fr.image_kind))
    vols = [[per_pos[float(k)][t] for k in uniq] for t in range(nvol)]
    if notes is not None and nvol > 1 and not _kinds_note(vols, path, notes):
        _untimed_note(vols, path, notes)
    if notes is not None and nvol > 1:
        _instance_note(vols, path, notes)
    return vols, normal


def _instance_note(vols: List[List[_Frame]], path: Path, notes: List[str]) -> None:
    """Warn when a gated or dynamic PET's volumes, ordered by the standard's keys, are numbered in another order by
    their InstanceNumbers (which order them nowhere now: an export that renumbered them, or a reader that trusted
    InstanceNumber, got the gates reversed)."""
    sources = {fr.time_key.source for vol in vols for fr in vol if isinstance(fr.time_key, _TimeKey)} - {""}
    if not sources:
        return
    # Equal numbers say nothing (an export that numbers each volume's slices from 1): only a reversal counts.
    at = sum(any(a.time_key.instance > b.time_key.instance for a, b in zip(pos, pos[1:]))
             for pos in zip(*vols) if all(fr.time_key.instance for fr in pos))
    if not at:
        return
    msg = (f"the {len(vols)} volumes were ordered by {', '.join(sorted(sources))} (the PET standard's key for "
           f"their gates or frames), which InstanceNumber contradicts at {at} of {len(vols[0])} slice positions "
           "(images renumbered by an export?): check the volume order against the scanner's")
    _warn(path, msg)
    notes.append(msg)


def _kinds_note(vols: List[List[_Frame]], path: Path, notes: List[str]) -> bool:
    """Warn when the volumes of a 4-D series are of different image types (ImageType value 3 on); True if so.

    Why: a Philips mDIXON series (in-phase, opposed-phase, water and fat images, one acquisition time) loaded as
    four "time points" without a word."""
    kinds = []
    for vol in vols:
        these = {fr.image_kind for fr in vol}
        kinds.append(these.pop() if len(these) == 1 else "mixed")
    if len(set(kinds)) < 2:
        return False
    shown = ", ".join(f"{i} {k or '?'}" for i, k in enumerate(kinds[:12])) + (", ..." if len(kinds) > 12 else "")
    msg = (f"the {len(vols)} volumes differ in image type (ImageType from value 3, by volume index: {shown}): images "
           "of different kinds (e.g. Dixon in-phase, opposed-phase, water and fat), not time points; pick the "
           "volume you need by its index")
    _warn(path, msg)
    notes.append(msg)
    return True


def _untimed_note(vols: List[List[_Frame]], path: Path, notes: List[str]) -> None:
    """Warn when volumes share a time key at some slice position: their order is only the files' order."""
    tied = sum(len({fr.time_key for fr in pos}) < len(pos) for pos in zip(*vols))
    if not tied:
        return
    types = [vol[0].frame_type for vol in vols]
    if len(set(types)) > 1:  # a Philips B0 file: magnitude (M) and field map (FIELD_MAP) frames
        msg = (f"the {len(vols)} volumes are of different frame types ({', '.join(t or '?' for t in types)}, in "
               "volume order): images of different kinds (a magnitude and a field map or phase image), not time "
               "points, all given the one unit of the series although theirs differ (a field map is in Hz); pick "
               "the volume you need by its index")
    else:
        msg = (f"the {len(vols)} volumes have no time order at {tied} of {len(vols[0])} slice positions (the same "
               "temporal position, acquisition time and instance number): they are in the order of the files and "
               "frames, which may not be the acquisition's; check that they are one series' time points")
    _warn(path, msg)
    notes.append(msg)


# ---------------------------------------------------------------------------- pixels
def _missing_decoder(ts_uid: str) -> Optional[str]:
    """The pip command that installs a decoder for this transfer syntax, when none is installed."""
    try:
        from pydicom.pixels import get_decoder

        dec = get_decoder(ts_uid)
        if dec.is_available:
            return None
        deps = " ".join(dec.missing_dependencies)
    except Exception:  # not a pixel transfer syntax pydicom knows: no advice
        return None
    pkgs = [p for p in ("pylibjpeg", "pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "pylibjpeg-rle") if f"{p}>=" in deps]
    return "pip install " + " ".join(pkgs) if pkgs else "install one of: " + deps


def _no_decoder_exists(ts_uid: str) -> bool:
    """True when pydicom has no pixel decoder at all for this transfer syntax (no package to install helps)."""
    try:
        from pydicom.pixels import get_decoder

        get_decoder(ts_uid)
    except NotImplementedError:
        return True
    except Exception:  # noqa: BLE001 - any other trouble: not this case
        return False
    return False


def _refuse_cut_pixels(ds, f: Path) -> None:
    """A file cut short before or in its (uncompressed) pixel data, said in words instead of pydicom's length error.

    Raises:
        UnreadableFileError: no pixel data element, or fewer bytes than Rows x Columns x frames need.
    """
    if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableFileError("the file is cut short: it ends before or inside its pixel data",
                                  fix="copy or export the file again", path=f)
    try:
        ts = ds.file_meta.TransferSyntaxUID
        if "PixelData" not in ds or ts.is_compressed:  # compressed: the decoder finds a short stream
            return
        need = (_frame_bits(ds) * int(ds.get("NumberOfFrames", 1) or 1) + 7) // 8
        have = len(ds.PixelData)
    except (AttributeError, TypeError, ValueError):  # no or a private transfer syntax: the decoder says why
        return
    if have < need:
        raise UnreadableFileError(f"the file is cut short: its pixel data holds {have} of the {need} bytes its "
                                  "image needs", fix="copy or export the file again (a complete file with this "
                                  "message has wrong Rows, Columns or NumberOfFrames)", path=f)


def _decode_file(f: Path) -> np.ndarray:
    ds = None
    try:
        ds = _read_full(f)
        if int(ds.get("SamplesPerPixel", 1) or 1) > 1:
            raise UnsupportedDataError("colour (RGB) images are not supported", fix="load a greyscale series", path=f)
        _refuse_cut_pixels(ds, f)
        arr = ds.pixel_array
    except (UnsupportedDataError, UnreadableFileError):
        raise
    except Exception as e:
        uid = str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")
        name = ""
        try:
            name = ds.file_meta.TransferSyntaxUID.name  # type: ignore[union-attr]
        except Exception:
            pass
        ts = f" (transfer syntax {name})" if name else ""
        if uid and _no_decoder_exists(uid):
            raise UnreadableFileError(f"pydicom has no decoder for the transfer syntax {name or uid} (a compression "
                                      "it does not read, such as JPEG XL, video, or a vendor's private syntax), so "
                                      "the pixel data cannot be read", fix="convert the files to an uncompressed "
                                      "transfer syntax first (e.g. GDCM's gdcmconv --raw), or export "
                                      "the series uncompressed from the PACS or scanner", path=f) from None
        install = _missing_decoder(uid) if uid else None
        if install:
            raise UnreadableFileError(f"no decoder for {name or uid} is installed, so the pixel data cannot be read",
                                      fix=f"{install}, then load the series again", path=f) from None
        raise UnreadableFileError(f"the pixel data cannot be decoded{ts}: {type(e).__name__}",
                                  fix="the file may be truncated or corrupt; re-export or re-copy it", path=f) from None
    return arr


_LE_UNCOMPRESSED = {"1.2.840.10008.1.2": 8, "1.2.840.10008.1.2.1": 12}  # -> PixelData element header size


def _fast_raw(f: Path, ds) -> Optional[np.ndarray]:
    """Uncompressed little-endian single-frame greyscale: read the trailing PixelData bytes directly.

    Only used when the bytes just before them are the PixelData tag with the expected length, and
    the stored bits need no sign extension; bits above BitsStored are cleared as pydicom does.
    Anything else goes through pydicom.
    """
    try:
        ts = str(ds.file_meta.TransferSyntaxUID)
        hdr = _LE_UNCOMPRESSED.get(ts)
        bits, stored, signed = int(ds.BitsAllocated), int(ds.BitsStored), int(ds.PixelRepresentation)
        if hdr is None or int(ds.get("NumberOfFrames", 1) or 1) != 1 or int(ds.get("SamplesPerPixel", 1)) != 1 \
                or bits not in (8, 16, 32) or (signed and stored != bits):
            return None
        rows, cols = int(ds.Rows), int(ds.Columns)
        nbytes = rows * cols * bits // 8
        size = f.stat().st_size
        off = size - nbytes
        with open(f, "rb") as fh:
            fh.seek(off - hdr)
            head = fh.read(hdr)
            data = fh.read(nbytes)
        length = int.from_bytes(head[-4:], "little")
        if head[:4] != b"\xe0\x7f\x10\x00" or length != nbytes or len(data) != nbytes:
            return None
        dtype = np.dtype(f"<{'i' if signed else 'u'}{bits // 8}")
        arr = np.frombuffer(data, dtype=dtype).reshape(rows, cols)
        if stored < bits:  # bits above BitsStored (old overlays) are not part of the value
            arr = arr & dtype.type((1 << stored) - 1)
        return arr
    except Exception:
        return None


def _decode(item: Tuple[Path, Any]) -> np.ndarray:
    f, ds = item
    arr = _fast_raw(f, ds)
    return _decode_file(f) if arr is None else arr


def _pixels(frames_by_vol: List[List[_Frame]], headers: Dict[Path, Any]) -> Dict[Path, np.ndarray]:
    files = sorted({fr.file for v in frames_by_vol for fr in v})
    with ThreadPoolExecutor(max_workers=min(8, (os.cpu_count() or 2) + 2)) as ex:
        arrs = list(ex.map(_decode, [(f, headers[f]) for f in files]))
    return dict(zip(files, arrs))


#: The largest whole number float32 holds exactly (and with it every integer below): 2**24 + 1 becomes 2**24.
_FLOAT32_EXACT = 2 ** 24


def _out_dtype(raws: Sequence[np.dtype], slopes: np.ndarray, inters: np.ndarray, bits_stored: int,
               largest: Optional[float] = None) -> np.dtype:
    """Output dtype for slices of these stored dtypes (they differ when PixelRepresentation varies per slice).

    ``largest``: the largest magnitude a rescaled value takes (None: not known). Above 2**24 the values go to
    float64: float32 would round whole numbers there (uint16 x RescaleSlope 301: 16777439 read as 16777440)
    without a word.
    """
    raws = list(dict.fromkeys(np.dtype(r) for r in raws))
    raw = np.result_type(*raws)  # int16 + uint16 -> int32: no stored value wraps
    if np.all(slopes == 1) and np.all(inters == 0):
        return raw
    if np.all(slopes == 1) and np.all(np.mod(inters, 1) == 0) and all(r.kind in "iu" and r.itemsize <= 2 for r in raws):
        hi = max((2 ** min(bits_stored, r.itemsize * 8)) - 1 if r.kind == "u" else int(np.iinfo(r).max) for r in raws)
        lo = min(0 if r.kind == "u" else int(np.iinfo(r).min) for r in raws)
        if hi + inters.max() <= 32767 and lo + inters.min() >= -32768:
            return np.dtype(np.int16)
        if hi + inters.max() <= 2 ** 31 - 1 and lo + inters.min() >= -2 ** 31:
            return np.dtype(np.int32)
        return np.dtype(np.float64)  # an intercept beyond int32 would wrap; float64 holds these sums exactly
    if raw.itemsize > 2 or largest is None or largest > _FLOAT32_EXACT:
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _assemble(slices: List[np.ndarray], slopes: np.ndarray, inters: np.ndarray, *, bits_stored: int) -> np.ndarray:
    """Stack rescaled slices into one (i=columns, j=rows, k) array.

    The buffer is filled slice by slice in (k, rows, columns) order, which is contiguous for each
    write, and returned as a transposed (Fortran-ordered) view: no extra copy.
    """
    largest = None
    if not (np.all(slopes == 1) and np.all(inters == 0)):
        # The rescaled extremes (a slope may be negative): whether float32 can hold every value.
        largest = max((max(abs(float(sl.min()) * float(s) + float(i)), abs(float(sl.max()) * float(s) + float(i)))
                      for sl, s, i in zip(slices, slopes, inters) if sl.size), default=0.0)
    dtype = _out_dtype([sl.dtype for sl in slices], slopes, inters, bits_stored, largest)
    buf = np.empty((len(slices),) + slices[0].shape, dtype=dtype)
    integer = dtype.kind in "iu"
    for k, sl in enumerate(slices):
        if slopes[k] == 1 and inters[k] == 0:
            buf[k] = sl
        elif integer:
            buf[k] = sl  # range checked in _out_dtype, so the cast is exact
            buf[k] += dtype.type(inters[k])
        else:
            np.multiply(sl, dtype.type(slopes[k]), out=buf[k], casting="unsafe")
            buf[k] += dtype.type(inters[k])
    return buf.transpose(2, 1, 0)


def _padding_range(ds) -> Optional[Tuple[float, float]]:
    """The stored values PixelPaddingValue (0028,0120) and PixelPaddingRangeLimit (0028,0121) mark as padding
    (the pair's range, ends included; the value alone without a limit), None when the header has no padding value.
    """
    pad = _f(getattr(ds.get(0x00280120), "value", None))
    if pad is None or not math.isfinite(pad):
        return None
    limit = _f(getattr(ds.get(0x00280121), "value", None))
    if limit is None or not math.isfinite(limit):
        return pad, pad
    return min(pad, limit), max(pad, limit)


def _padding_masks(slices: Sequence[np.ndarray], frames: Sequence[_Frame],
                   headers: Dict[Path, Any]) -> Optional[List[np.ndarray]]:
    """Per slice, where its stored values are pixel padding (see :func:`_padding_range`), or None when no
    slice has any. Compared before rescaling: the standard gives padding in stored values."""
    masks, found = [], False
    for sl, fr in zip(slices, frames):
        rng = _padding_range(headers[fr.file])
        if rng is None:
            masks.append(None)
            continue
        m = (sl == rng[0]) if rng[0] == rng[1] else ((sl >= rng[0]) & (sl <= rng[1]))
        found = found or bool(m.any())
        masks.append(m)
    return masks if found else None


def _fill_padding(arr: np.ndarray, masks: Sequence[Optional[np.ndarray]], modality: str, unit: str) -> str:
    """Replace the padding voxels of ``arr`` (in place; slices along its last axis) by the lowest real value (a
    CT's at most -1000 HU, air) and return the warning that says so.

    Why: a CT padded with -2000 outside its round field of view loaded as -2000..8000 HU, a fifth of its voxels
    "real" values 1000 HU below air that weighed in registration and were written out as measured.
    """
    by_slice = arr.transpose(2, 1, 0)  # (k, rows, columns): a view, as _assemble built it
    real = [by_slice[k][~m] if m is not None else by_slice[k].ravel() for k, m in enumerate(masks)]
    real = [r for r in real if r.size]
    n_pad = int(sum(int(m.sum()) for m in masks if m is not None))
    if not real:
        return (f"every voxel ({n_pad}) is pixel padding (PixelPaddingValue): the image holds no measured value; "
                "it was loaded as stored")
    fill = min(float(r.min()) for r in real)
    if unit == "HU" and arr.dtype.kind != "u":
        fill = min(fill, -1000.0)
    fill_value = arr.dtype.type(fill)
    for k, m in enumerate(masks):
        if m is not None:
            by_slice[k][m] = fill_value
    what = "air" if unit == "HU" else "the lowest measured value"
    return (f"{n_pad} voxels ({100.0 * n_pad / arr.size:.1f} %) are pixel padding (PixelPaddingValue "
            f"(0028,0120): no measurement, e.g. outside the field of view) and were set to {fill:g} {unit} "
            f"({what}), not kept as measured values")


def _slice(fr: _Frame, pix: Dict[Path, np.ndarray]) -> np.ndarray:
    a = pix[fr.file]
    if fr.index is not None:
        a = a[fr.index]
    if fr.tile is not None:
        r0, c0, nr, nc = fr.tile
        a = a[r0:r0 + nr, c0:c0 + nc]
    return a


# ---------------------------------------------------------------------------- geometry fixes
def _interp_dtype(arr: np.ndarray) -> np.dtype:
    """The float dtype to interpolate ``arr`` in: float32, or float64 where it holds values float32 rounds (whole
    numbers above 2**24, and float64 voxels), so that measured slices keep their values."""
    if arr.dtype == np.float64 or (arr.dtype.kind in "iu" and arr.dtype.itemsize > 2 and arr.size
                                   and max(abs(int(arr.min())), abs(int(arr.max()))) > _FLOAT32_EXACT):
        return np.dtype(np.float64)
    return np.dtype(np.float32)


def _regularise(arr: np.ndarray, frames: List[_Frame], normal: np.ndarray, path: Path,
                notes: List[str], prov: Dict[str, Any], broken: Sequence[Path] = (),
                unit: str = "") -> Tuple[np.ndarray, np.ndarray]:
    """Return (array, affine) on a uniform orthogonal grid, correcting tilt, gaps and variable spacing (``unit``:
    the values' unit, for the warnings).

    A gap is interpolated only when no damaged DICOM file lies beside the series: the missing slice is then most
    likely in that file, and an interpolated slice must never stand in for a real one that failed to read.
    """
    fr0 = frames[0]
    r, c = fr0.iop[:3], fr0.iop[3:]
    row_sp, col_sp = fr0.spacing
    aff = np.eye(4)
    aff[:3, 0], aff[:3, 1], aff[:3, 3] = r * col_sp, c * row_sp, fr0.pos
    n = len(frames)
    if n == 1:
        aff[:3, 2] = normal * fr0.thickness
        return arr, aff
    pos = np.array([fr.pos for fr in frames])
    proj = (pos - pos[0]) @ normal
    inplane = (pos - pos[0]) - np.outer(proj, normal)
    step = pos[-1] - pos[0]
    tilt = math.degrees(math.acos(min(1.0, abs(float(step @ normal)) / float(np.linalg.norm(step)))))
    if tilt > _TILT_TOL_DEG:
        from scipy import ndimage

        # Each slice's in-plane offset from the first (columns, rows). The grid is widened to hold every slice
        # whole: on the first slice's grid, a 15-degree tilt cut 10 % of the measured pixels off the far slices
        # (39 rows of the last) and filled the other edge with air.
        shifts = np.array([(inplane[k] @ r / col_sp, inplane[k] @ c / row_sp) for k in range(n)])
        lo = np.floor(np.minimum(shifts.min(axis=0), 0.0) + 1e-6).astype(int)
        hi = np.ceil(np.maximum(shifts.max(axis=0), 0.0) - 1e-6).astype(int)
        grown = hi - lo
        work = _interp_dtype(arr)
        # The lowest value, not 0: 0 is water in a CT, and a band of it along the edge was fake tissue.
        fill = float(np.min(arr))
        shape = (arr.shape[0] + int(grown[0]), arr.shape[1] + int(grown[1]))
        shifted = np.empty(shape + (n,), dtype=work)
        plane = np.empty(shape, dtype=work)
        for k in range(n):
            plane.fill(fill)
            plane[:arr.shape[0], :arr.shape[1]] = arr[:, :, k]
            shifted[:, :, k] = ndimage.shift(plane, tuple(shifts[k] - lo), order=1, mode="constant", cval=fill)
        arr = shifted
        aff[:3, 3] = fr0.pos + lo[0] * col_sp * r + lo[1] * row_sp * c
        wider = (f"; the grid was widened by {int(grown[0])} columns and {int(grown[1])} rows so that every measured "
                 "pixel is kept" if grown.any() else "")
        msg = (f"gantry tilt of {tilt:.2f} degrees detected; slices were shifted in-plane onto an orthogonal grid "
               f"(linear interpolation{wider}; the part of each slice no measured slice covers is filled with the "
               "series' lowest value: in a CT, air or the scanner's own padding value)")
        _warn(path, msg)
        notes.append(msg)
        prov["gantry_tilt_deg"], prov["tilt_corrected"] = round(tilt, 3), True
    d = np.diff(proj)
    dz = float(np.median(d))
    if dz <= 0:
        raise GeometryError("two slices share one position", fix="remove duplicate files", path=path)
    if np.max(np.abs(d - dz)) > _SPACING_TOL * dz:
        dz = float(np.min(d))
        blocks = _spacing_blocks(d)
        if np.max(d) > _MAX_GAP * dz and blocks is None:
            raise GeometryError(f"slice spacing is uneven with a gap of {np.max(d):.2f} mm "
                                f"(> {_MAX_GAP:g} x {dz:.2f} mm): slices are missing",
                                fix="re-export the complete series", path=path)
        if broken:
            raise UnreadableFileError(
                f"slices are missing from the series, and {len(broken)} DICOM file(s) here could not be read "
                f"(damaged, truncated, empty or not readable, e.g. {broken[0].name}): the missing slices are probably "
                "in them", fix="copy or export the series again (or remove the damaged files to accept "
                "interpolated slices in their place)", path=path)
        # The grid's step from the whole run, not from its smallest step alone: positions are rounded in the
        # headers, and one pair 4.99996 mm apart put every measured slice off the grid (all of them interpolated,
        # off by up to 0.5 on values of 7000 by slice 13, where only the gap's slice is new).
        # The regular step: the mean of the steps that are no gap (under 1.5 x the smallest; a lost slice makes
        # about 2 x). Positions rounded to 0.01 mm make 0.62 and 0.63 of a 0.625 mm step.
        regular = float(np.mean(d[d < 1.5 * dz]))
        if blocks is not None:
            # Runs of spacings: the grid is the finest run's own, so that its slices (the target's, measured
            # finest) are kept as measured; from the first slice, a 1 mm run 2.5 mm off the 5 mm slices was
            # interpolated half-way between its own slices. The grid stays within the first and last slices.
            dz, anchor = _finest_run(blocks, proj)
            first = -int(math.floor((anchor - proj[0]) / dz + 0.05))
            last = int(math.floor((proj[-1] - anchor) / dz + 0.05))
            target = anchor + np.arange(first, last + 1) * dz
            nk = len(target)
        else:
            nk = int(round(proj[-1] / regular)) + 1
            fitted = float(proj[-1]) / (nk - 1)
            # Fitted to the first and last slice when that is the regular step (gaps of whole steps); otherwise
            # (steps that are no multiples of each other) the regular step itself.
            dz = fitted if abs(fitted - regular) <= _SPACING_TOL * regular else regular
            target = np.arange(nk) * dz
        hi = np.clip(np.searchsorted(proj, target, side="left"), 1, n - 1)
        lo = hi - 1
        work = _interp_dtype(arr)
        w = ((target - proj[lo]) / (proj[hi] - proj[lo])).astype(work)
        # A grid slice within rounding of a measured one (5 % of the step: positions to 0.01 mm on 0.625 mm steps
        # are off by 1.2 %) is that slice, as measured.
        w[np.abs(target - proj[lo]) < 0.05 * dz] = 0
        w[np.abs(target - proj[hi]) < 0.05 * dz] = 1
        a32 = arr.astype(work)
        arr = a32[:, :, lo] * (1 - w) + a32[:, :, hi] * w
        gap = int(np.argmax(d))
        # Every gap is counted: a copy that lost every third file has 21 of them, and naming the largest alone
        # read as one missing slice.
        n_gaps = int(np.sum(d > (1 + _SPACING_TOL) * dz))
        where = (f"a gap of {d[gap]:.2f} mm after slice {gap + 1} of {n}" if n_gaps <= 1 else
                 f"{n_gaps} gaps, the largest {d[gap]:.2f} mm after slice {gap + 1} of {n}")
        if blocks is not None or not np.any(d >= 1.5 * float(d.min())):
            # Runs of regular steps (1 mm through the target, 5 mm outside), or no step a slice or more beyond the
            # smallest (5 mm, then 4 mm): several spacings, not missing slices.
            n_new = int(np.sum((w != 0) & (w != 1)))
            runs = f": {_blocks_text(blocks)}, in runs with no gap" if blocks is not None else ""
            msg = (f"uneven slice spacing: slices {float(d.min()):.2f} to {float(d.max()):.2f} mm apart (more than one "
                   f"spacing in one series: parts acquired or reconstructed differently{runs}); {n} slices "
                   f"resampled linearly onto {nk} slices of {dz:.3f} mm ({'most' if 2 * n_new > nk else 'some'} of "
                   f"them interpolated, not measured: {n_new} of {nk}"
                   f"{f', their {unit} interpolated between the measured slices' if unit == 'HU' else ''})")
        else:
            msg = (f"uneven slice spacing (missing slice{'s' if n_gaps > 1 else ''}?): {where}, where slices are "
                   f"{dz:.2f} mm apart; {n} slices resampled linearly onto {nk} slices of {dz:.3f} mm (the slices in "
                   f"the gap{'s' if n_gaps > 1 else ''} are interpolated, not measured)")
        if abs(float(target[0])) > 1e-6 * dz:
            msg += (f"; the grid is the {dz:.3f} mm run's, so it starts {float(target[0]):.2f} mm from the first "
                    "slice along the slice normal")
        _warn(path, msg)
        notes.append(msg)
        prov["resampled"] = True
        aff[:3, 3] += normal * float(target[0])
    aff[:3, 2] = normal * dz
    return arr, aff


def _finest_run(blocks: Sequence[Tuple[float, int]], proj: np.ndarray) -> Tuple[float, float]:
    """(step, position of its first slice along the normal) of the finest run of ``blocks`` (the longest of the
    finest when several have that step), the slices' positions being ``proj``."""
    finest = min(step for step, _ in blocks)
    starts = np.cumsum([0] + [count for _, count in blocks])[:-1]
    runs = [(count, -start, step) for (step, count), start in zip(blocks, starts)
            if step <= finest * (1 + _RUN_TOL) + _RUN_TOL_MM]
    count, start, _ = max(runs)
    first = -start
    # The run's own mean step (positions rounded in the headers), from its first slice to its last.
    return float(proj[first + count] - proj[first]) / count, float(proj[first])


#: Steps (mm) within this much of each other (5 %, or 0.02 mm for positions rounded to 0.01 mm) are one spacing
#: when telling runs of regular spacing apart.
_RUN_TOL, _RUN_TOL_MM = 0.05, 0.02


def _spacing_blocks(d: np.ndarray) -> Optional[List[Tuple[float, int]]]:
    """The runs of one regular step each that the slice steps ``d`` form, as (step, count), when they are a
    complete series with variable spacing; None when they look like missing slices.

    Variable spacing (a planning CT with 1 mm slices through the target and 5 mm outside): the wider runs lie at the
    ends of the series. Every step wider than the finest belongs to a run of at least two, or is a single step
    joining two runs of different steps and no wider than the wider of them. A single wider step at an end is a
    gap, and so is a run wider than both its neighbours in the middle when they have one step (1 mm, 4 mm, 1 mm:
    the slices between were lost) or when it is shorter than 3 steps.
    """
    runs: List[List[float]] = []
    for x in map(float, d):
        if runs and _same_step(x, runs[-1][0]):
            runs[-1][1] += 1
            runs[-1][2] += x
        else:
            runs.append([x, 1, x])
    if len(runs) < 2:
        return None
    steps = [total / count for _, count, total in runs]
    finest = min(steps)
    for i, (step, (_, count, _)) in enumerate(zip(steps, runs)):
        if _same_step(step, finest) or step < finest:
            continue
        if not 0 < i < len(runs) - 1:
            if count >= 2:
                continue
            return None
        before, after = steps[i - 1], steps[i + 1]
        wider = max(before, after)
        if step > wider and not _same_step(step, wider):
            # Wider than both neighbours, in the middle: variable spacing only when long and between two spacings.
            if count < 3 or _same_step(before, after):
                return None
            continue
        if count >= 2 or not _same_step(before, after):
            continue  # a run, or a single step joining two spacings
        return None
    return [(r[2] / r[1], r[1]) for r in runs]


def _same_step(a: float, b: float) -> bool:
    """Whether slice steps ``a`` and ``b`` (mm) are one spacing (within ``_RUN_TOL`` or ``_RUN_TOL_MM``)."""
    return abs(a - b) <= _RUN_TOL * min(a, b) + _RUN_TOL_MM


def _blocks_text(blocks: Sequence[Tuple[float, int]]) -> str:
    """Runs of regular spacing in words: "slices 1-12 5.00 mm apart, slices 12-52 1.00 mm apart, ..."."""
    parts, first = [], 1
    for step, count in blocks[:6]:
        parts.append(f"slices {first}-{first + count} {step:.2f} mm apart")
        first += count
    return ", ".join(parts) + (f" and {len(blocks) - 6} more runs" if len(blocks) > 6 else "")


#: Evenly spaced slices further apart than this many times the spacing the headers give are taken as a series that
#: lost every other (or every k-th) slice: those ratios are whole numbers from 2, and a rounded header stays near 1.
_SPARSE_RATIO = 1.5


def _header_value(dss: Sequence[Any], keyword: str) -> Optional[float]:
    """The positive value of ``keyword`` the files that have it agree on (within 1 %); None when none has it or
    they disagree (then it is no evidence either way)."""
    vals = [abs(v) for v in (_f(ds.get(keyword)) for ds in dss) if v is not None and math.isfinite(v) and v != 0]
    if not vals or max(vals) - min(vals) > _SPACING_TOL * max(vals):
        return None
    return float(np.median(vals))


def _sparse_check(frames: Sequence[_Frame], headers: Dict[Path, Any], dz: float) -> Tuple[str, Optional[str]]:
    """Whether the evenly spaced slices of one volume lie clearly further apart than the headers say
    (SpacingBetweenSlices, and for PET/NM NumberOfSlices against the slices found).

    Why: a copy that lost every other file keeps even spacing, so the gap check of :func:`_regularise` never
    fires and the series loaded at half its resolution without a word. Only single-frame files are checked: the
    positions of mosaic tiles and classic multi-frame slices are made from the spacing tag itself, and an
    enhanced file holds all of its frames. SliceThickness is no evidence (thin slices with gaps are normal).

    Returns:
        ("sparse", the warning) when slices appear to be missing; ("whole", None) when the headers confirm the
        spacing or count; ("unknown", None) when they give nothing sound to check against.
    """
    if len(frames) < 2 or any(fr.index is not None or fr.tile is not None for fr in frames):
        return "unknown", None
    dss = [headers[f] for f in dict.fromkeys(fr.file for fr in frames)]
    n = len(frames)
    sbs = _header_value(dss, "SpacingBetweenSlices")
    modality = str(dss[0].get("Modality", "")).strip().upper()
    total = _header_value(dss, "NumberOfSlices") if modality in ("PT", "NM") else None
    total = int(round(total)) if total is not None and total == round(total) else None
    if total is not None and total <= n:  # the count says the series is whole: a wrong spacing tag, not lost files
        return "whole", None
    if sbs is not None:
        if dz <= _SPARSE_RATIO * sbs:
            # As far apart as the header says: none lost between the first and last. Fewer than NumberOfSlices
            # then is a series cut to a range of slices (a partial export), not lost files.
            return "whole", None
        thick = _header_value(dss, "SliceThickness")
        if modality == "MR" and thick and sbs < thick and abs(dz - (thick + sbs)) <= _SPACING_TOL * dz:
            return "unknown", None  # an MR export that wrote the gap between slices (not their spacing) in this tag
        said = (f"its {n} slices are evenly spaced {dz:.2f} mm apart, but SpacingBetweenSlices (0018,0088) says "
                f"{sbs:.2f} mm" + (f" and NumberOfSlices (0054,0081) says {total} slices ({n} found)" if total else ""))
        how = (f"as found, with {dz:.2f} mm between slices (a lower resolution along the slice normal; the geometry "
               "is right)")
    elif total is not None and total > _SPARSE_RATIO * n:
        # The count alone cannot tell slices lost in between from a series cut to a range: neither is claimed.
        said = f"NumberOfSlices (0054,0081) says {total} slices, but {n} were found (evenly spaced {dz:.2f} mm apart)"
        how = f"with the {n} slices found (the geometry is right, but part of the series is not in it)"
    else:
        return "unknown", None
    return "sparse", (f"slices appear to be missing from the series: {said}; it was loaded {how}; copy or "
                      "export the whole series again")


# ---------------------------------------------------------------------------- public
def _shown_folder(folder: Path, root: Path) -> str:
    """``folder`` relative to the folder the user gave ("." for that folder itself)."""
    try:
        return os.fspath(folder.relative_to(root)) if root.is_dir() else "."
    except ValueError:
        return os.fspath(folder)


def resolve_series_choice(choice: str, entries: Sequence[Tuple[str, str, Any]], path: Path,
                          numbers: Optional[Sequence[str]] = None) -> Optional[str]:
    """The UID that ``choice`` names among ``entries`` ((uid, modality, description for messages, or a callable
    giving it only when a message needs it), in listing order): a 1-based number or a modality exactly one series
    has; None when it is neither (a UID, say).

    ``numbers``: the entries' SeriesNumbers (as :func:`series_number_text` gives them), when known: a number
    chosen that is another series' SeriesNumber is warned about (it is taken as the list position).

    Raises:
        InvalidInputError: a number out of range, or a modality no series (or several) has; the message lists the
            series by number (no UIDs or descriptions).
    """
    from ..volume import _MODALITY_ALIASES

    aliases = {**_MODALITY_ALIASES, "RTDOSE": "RTDOSE"}  # a dose grid is picked by its DICOM modality
    key = str(choice).strip()
    modality = None if key.isdigit() else aliases.get(key.upper())
    if not key.isdigit() and modality is None:
        return None

    def listed() -> str:
        return _listed([what() if callable(what) else what for _, _, what in entries])

    if key.isdigit():
        n = int(key)
        if not 1 <= n <= len(entries):
            raise InvalidInputError(f"series {n} asked for, but the folder holds {len(entries)} ({listed()})",
                                    fix=f"give a number from 1 to {len(entries)}", path=path)
        if numbers is not None and len(numbers) == len(entries) and numbers[n - 1] != str(n) and str(n) in numbers:
            own = f" (SeriesNumber {numbers[n - 1]})" if numbers[n - 1] else ""
            _warn(path, f"series {n} is taken as list position {n}{own}; the series with SeriesNumber {n} is list "
                        f"position {list(numbers).index(str(n)) + 1}: choose that position for it")
        return entries[n - 1][0]
    hits = [uid for uid, mod, _ in entries if aliases.get(str(mod).strip().upper()) == modality]
    if len(hits) == 1:
        return hits[0]
    raise InvalidInputError(f"{'no' if not hits else len(hits)} {modality} series in this folder ({listed()})",
                            fix=("pick it by its number instead, as listed here" if hits else "check the folder, or "
                                 "pick a series by its number") + "; medfuse.scan(folder) (command line: medfuse "
                                 "info FOLDER) lists the series with their SeriesNumbers and descriptions",
                            path=path)


_LISTED_MAX = 12


def _listed(lines: List[str]) -> str:
    """Numbered series for a message, the first ``_LISTED_MAX`` only: a PACS export (or a folder picked by mistake,
    such as the working folder) can hold hundreds, and a message pages long hides its own advice."""
    shown = "; ".join(f"{i}: {line}" for i, line in enumerate(lines[:_LISTED_MAX], start=1))
    more = len(lines) - _LISTED_MAX
    return shown + (f"; and {more} more, which medfuse.scan(folder) lists" if more > 0 else "")


def _patient_ids(series: Sequence[list]) -> List[str]:
    """The patient identifiers (name, ID, birth date... in the spellings folder names use, as the command line
    blanks them) of the headers already read for these series: no file is read again. Each distinct patient
    module is spelled out once."""
    from .. import provenance

    seen: set = set()
    out: Dict[str, None] = {}
    for fs in series:
        for _, ds in fs:
            key = tuple(str(ds.get(kw, "")) for kw in provenance._ID_KEYWORDS)
            if key not in seen:
                seen.add(key)
                out.update(dict.fromkeys(provenance._values(ds)))
    return sorted(out, key=len, reverse=True)


def _series_line(fs: list, path: Path, ids: Sequence[str] = (), image_type: bool = False) -> str:
    """One series in messages: modality, size, volumes, file count and folder, as :func:`scan` gives them (the
    raw Columns x Rows of a Siemens mosaic, 384x384, was not the 64x64x35 that scan and ``medfuse info`` give),
    then its SeriesNumber and, with ``image_type``, its ImageType. The folder's name is blanked of ``ids``
    (:func:`_patient_ids`): PACS exports name folders after the patient. No description: free text that may name
    the patient or a physician (``medfuse info`` shows them, blanked, when asked).

    Why the number and type: six series of one PACS folder (a T1, four Dixon images and a mu-map) were listed as
    six identical "MR 160x192x160, 160 files in ." lines, and nothing told which number to pick."""
    try:
        shape, nvol, files = _series_shape(fs, path)
    except Exception:  # noqa: BLE001 - a listing never fails: the header's own size
        shape, nvol, files = (fs[0][1].get("Columns", "?"), fs[0][1].get("Rows", "?"), 0), 0, fs
    size = "x".join(str(x) for x in (shape if shape[2] else shape[:2]))
    vols = f", {nvol} volumes" if nvol > 1 else ""
    number = _number_of(fs)
    kind = _image_type(fs[0][1]) if image_type else ""
    return (f"{str(fs[0][1].get('Modality', '?'))} {size}{vols}, "
            f"{len(files)} files in {_blanked(_shown_folder(fs[0][0].parent, path), ids)}"
            + (f", SeriesNumber {number}" if number else "") + (f", ImageType {kind}" if kind else "")
            + _attenuation_text(fs[0][1]))


def _attenuation_text(ds) -> str:
    """", attenuation-corrected" or ", not attenuation-corrected" for a PET whose CorrectedImage (0028,0051) says
    (ATTN or not); "" otherwise. Why: an AC and a NAC reconstruction of one scan share ImageType, size and
    file count, and a listing of two PET series gave nothing to pick the one to quantify by."""
    if str(ds.get("Modality", "")).strip().upper() != "PT" or ds.get("CorrectedImage") is None:
        return ""
    corrected = {x.upper() for x in _text_values(ds, "CorrectedImage")}
    return ", attenuation-corrected" if "ATTN" in corrected else ", not attenuation-corrected"


def _image_kind(ds) -> str:
    """ImageType from value 3 on (what kind of image: ``M\\ND``, ``W\\DIXON``...), upper case; "" when absent."""
    return "\\".join(_image_type(ds).upper().split("\\")[2:])


def _image_type(ds) -> str:
    """ImageType (0008,0008) as stored, values joined by backslashes ("" when absent)."""
    return "\\".join(_text_values(ds, "ImageType"))


def _text_values(ds, keyword: str) -> List[str]:
    """The values of a multi-valued text element, stripped ([] when absent)."""
    v = ds.get(keyword)
    if v is None:
        return []
    items = list(v) if isinstance(v, (list, tuple)) or type(v).__name__ == "MultiValue" else [v]
    return [str(x).strip() for x in items]


def _blanked(text: str, ids: Sequence[str]) -> str:
    """``text`` with the identifiers ``ids`` replaced by ``[removed]`` (medfuse.provenance.scrub)."""
    if not ids:
        return text
    from ..provenance import scrub

    return scrub(text, ids)


def _series_shape(files: list, path: Path) -> Tuple[Tuple[int, int, int], int, list]:
    """(shape of one volume (columns, rows, slices), number of volumes, files kept) of a series, from its headers
    (no pixels). A series that does not form a volume gives (columns, rows, 0) and 0 volumes: load says why (and
    :func:`_nm_not_volume` what an NM one holds instead)."""
    unsaid = _Unsaid()
    files = _drop_localizers(_dedupe(files, path, unsaid, pixels=False), path, unsaid)
    ds0 = files[0][1]
    try:
        vols, _ = _split_volumes(_series_frames(files, path), path)
    except (GeometryError, UnsupportedDataError, UnreadableFileError):
        return (int(ds0.Columns), int(ds0.Rows), 0), 0, files
    tile = vols[0][0].tile
    if tile is not None:  # a Siemens mosaic: the tile, not the whole mosaic
        return (tile[3], tile[2], len(vols[0])), len(vols), files
    return (int(ds0.Columns), int(ds0.Rows), len(vols[0])), len(vols), files


def _choose(series: Dict[str, list], series_uid: Optional[str], path: Path) -> Tuple[str, list]:
    # UIDs and descriptions stay out of these messages (they end up in logs and batch reports; UIDs trace back to
    # the study, and a description is free text that may name the patient or a physician): the series are named
    # by modality, size, file count, folder and SeriesNumber (ImageType where the series differ in it), and
    # error.choices holds the UIDs.
    # Folder names in the listing are blanked of the patients' identifiers (a PACS export names series folders
    # "DOE^JANE_PID12345_ct"), found in the headers already read; spelled out only when a message is made.
    ids: List[List[str]] = []
    types: List[bool] = []

    def line(fs: list) -> str:
        if not ids:
            ids.append(_patient_ids(list(series.values())))
            types.append(len({_image_type(f[0][1]) for f in series.values()}) > 1)
        return _series_line(fs, path, ids[0], types[0])

    if series_uid is not None and series_uid not in series:
        # A number as listed, or a modality (medfuse fuse --series CT PT on a PACS export's one folder).
        # The lines only when a message needs them: a mosaic's size comes from its geometry.
        series_uid = resolve_series_choice(
            series_uid, [(u, str(fs[0][1].get("Modality", "")), functools.partial(line, fs))
                         for u, fs in series.items()], path, [_number_of(fs) for fs in series.values()]) or series_uid
    if series_uid is not None and series_uid not in series and "#" in series_uid:
        # A "UID#N" key from a listing of a folder above, where the UID's files had several numbers: in this
        # folder the UID may hold number N alone, unsplit (a study folder with one such series per sub-folder
        # opened nothing in napari).
        uid, number = series_uid.rsplit("#", 1)
        if uid in series and {_series_number(ds) for _, ds in series[uid]} <= {number, ""}:
            series_uid = uid
    if series_uid is not None and series_uid not in series:
        # A SeriesInstanceUID whose files have several SeriesNumbers (keyed "UID#N"): one of them, or say which.
        parts = [k for k in series if k != series_uid and _real_uid(k) == series_uid]
        if len(parts) == 1:
            series_uid = parts[0]
        elif parts:
            raise MultipleSeriesError(f"the SeriesInstanceUID given is shared by {len(parts)} series with different "
                                      f"SeriesNumbers ({_listed([line(series[k]) for k in parts])})", choices=parts,
                                      fix="pass one of the error's .choices (UID#SeriesNumber, as medfuse.scan lists "
                                          "them), or the series' number as the folder's listing gives it", path=path)
    if series_uid is not None:
        if series_uid not in series:
            listed = _listed([line(fs) for fs in series.values()])
            raise InvalidInputError(f"no series in this folder matches the choice given: it is not one of the {len(series)} series "
                                    f"({listed})", fix="give the series' number as listed, its modality, or its "
                                    "SeriesInstanceUID", path=path)
        return series_uid, series[series_uid]
    images = [u for u, fs in series.items() if str(fs[0][1].get("Modality", "")).strip().upper() != "RTDOSE"]
    if len(images) == 1 and len(series) > 1:
        # A planning export (CT, RTSTRUCT, RTPLAN, RTDOSE): its one image series loads, as before dose grids were
        # read; the dose is there to be asked for.
        n = len(series) - 1
        _warn(path, f"the folder also holds {n} RT dose grid{'s' if n > 1 else ''} (RTDOSE), not loaded: its one "
                    "image series was; to load a dose grid pass series_uid='RTDOSE' (or its number as "
                    "medfuse.scan(folder) lists it)")
        return images[0], series[images[0]]
    if len(series) > 1:
        raise MultipleSeriesError(f"the folder holds {len(series)} series "
                                  f"({_listed([line(fs) for fs in series.values()])})",
                                  choices=list(series), path=path,
                                  fix="load the folder of one series, or pass series_uid= its number as listed, "
                                  "its modality or its UID (medfuse.scan(folder) lists the UIDs, SeriesNumbers and "
                                  "descriptions in this order; the error's .choices has the UIDs)")
    uid = next(iter(series))
    return uid, series[uid]


#: How Philips raw counts (Units CNTS) were made Bq/mL.
_BQ_NOTE = "PET loaded in Bq/mL (Philips counts x the activity concentration scale factor (7053,1009))"


def _pet_acquisition(modality: str, files) -> Optional[Dict[str, Any]]:
    """The tracer, dose and uptake time of a PET, or of an NM (SPECT) series whose header has a
    RadiopharmaceuticalInformationSequence (:func:`medfuse.io.suv.acquisition_facts`), and its attenuation
    correction (:func:`_attenuation_facts`); None for other series."""
    if modality != "PT" and not (modality == "NM" and any(
            ds.get("RadiopharmaceuticalInformationSequence") for _, ds in files)):
        return None
    from . import suv as _suv

    facts = _suv.acquisition_facts([_suv.header_from_dataset(ds) for _, ds in files])
    facts.update(_attenuation_facts(modality, files))
    return facts


def _attenuation_corrected(modality: str, files) -> Optional[bool]:
    """Whether the series is attenuation-corrected, by its coded CorrectedImage (0028,0051) alone: ATTN in every
    instance's, True; a PET's that holds other flags without ATTN in every instance, False; None when absent or
    empty in any instance, or when the instances disagree. An NM series without ATTN is None, not False: SPECT
    exports often leave their attenuation correction out of the (type 3) CorrectedImage. SeriesDescription and
    ImageType ("NAC", "AC") are never read: free text, unreliable, and it may hold identifiers."""
    said = set()
    for _, ds in files:
        flags = {f.upper() for f in _text_values(ds, "CorrectedImage") if f}
        said.add("ATTN" in flags if flags else None)
    corrected = said.pop() if len(said) == 1 else None
    return None if corrected is False and modality != "PT" else corrected


def _attenuation_facts(modality: str, files) -> Dict[str, Any]:
    """``attenuation_corrected`` (:func:`_attenuation_corrected`) and ``attenuation_method``: the
    AttenuationCorrectionMethod (0054,1101) text all instances state (e.g. ``measured,AC CT``), None when absent,
    disagreeing, or holding a date (free text: never an identifier in the provenance)."""
    from . import suv as _suv

    methods = {"\\".join(_text_values(ds, "AttenuationCorrectionMethod")) for _, ds in files}
    return {"attenuation_corrected": _attenuation_corrected(modality, files),
            "attenuation_method": _suv._text_fact(methods.pop()) if len(methods) == 1 else None}


def _unit_and_suv(modality: str, files, suv: str, notes: List[str], path: Path,
                  body: Optional[Dict[str, Any]] = None):
    """(unit, SUV factor per file or None, the SUV kind applied or None); ``body``: the header tags
    :func:`medfuse.io.suv.check_body` made of ``body=``, in place of the header's."""
    if modality == "CT":
        # RescaleType is required only when the rescaled values are not HU (PS3.3 C.8.2.1): absent means HU.
        kinds = {str(ds.get("RescaleType", "HU") or "HU").strip().upper() for _, ds in files}
        if kinds - {"HU"}:
            msg = (f"the CT's RescaleType is {'/'.join(sorted(kinds))}, not HU: values are loaded as stored "
                   "(unit 'arbitrary'), and no HU window applies")
            _warn(path, msg)
            notes.append(msg)
            return "arbitrary", None, None
        return "HU", None, None
    if modality == "NM":
        # Quantitative SPECT exports declare Units BQML (the loader applies their RescaleSlope): Bq/mL, as a PET
        # in BQML loads. Anything else (no Units, CNTS) is counts, except NONE.
        units = {str(ds.get("Units", "") or "").strip().upper() for _, ds in files}
        # NONE: values on no physical scale (medfuse writes it for a normalised SPECT, which read back as counts).
        return {frozenset({"BQML"}): "Bq/mL", frozenset({"NONE"}): "arbitrary"}.get(frozenset(units), "counts"), \
            None, None
    if modality != "PT":
        return "arbitrary", None, None
    from . import suv as _suv
    from ..errors import SUVError

    if suv not in (*_suv.SUV_KINDS, "none", "auto"):
        raise InvalidInputError(f"unknown suv kind {suv!r}",
                                fix=f"use 'auto', one of {', '.join(_suv.SUV_KINDS)}, or 'none' (values as stored)")
    headers = [_suv.with_body(_suv.header_from_dataset(ds), body) for _, ds in files]
    # One unit for the series, or none: a CNTS instance among BQML ones was labelled Bq/mL, counts and all.
    units = {_suv.stored_unit(h) for h in headers}
    stored = units.pop() if len(units) == 1 else "arbitrary"
    # Philips raw counts with their activity concentration factor: Bq/mL, the unit every other PET is loaded in
    # when it gives no SUV (in counts, a follow-up could not be compared with a baseline in Bq/mL).
    to_bq = [_suv.counts_to_bq_ml(h) for h in headers]
    bq_factors = {f: fac for (f, _), fac in zip(files, to_bq)} if stored == "counts" and None not in to_bq else None
    as_stored = ("Bq/mL", bq_factors, None) if bq_factors else (stored, None, None)
    if suv == "none":
        # Values as stored; a stored SUVlbm still names its formula (medfuse's DerivationDescription): saved again,
        # it was written as plain LBM and read back as James's.
        kind = _suv._stored_kind(headers[0]) if headers and stored == "SUVlbm" else None
        if bq_factors:
            notes.append(_BQ_NOTE)  # said in the provenance, not warned: suv='none' asked for no SUV
            return as_stored
        return stored, None, kind if kind in ("lbm", "lbm_janma") else None
    if suv == "auto":  # keep an SUV series in the kind it was stored in (Janmahasatian's LBM too); otherwise SUVbw
        suv = (_suv._stored_kind(headers[0]) if headers else None) or "bw"
    try:
        said: List[str] = []  # a height read as centimetres, a lean body mass capped: warned once for the series
        factors = _suv.series_suv_factors(headers, kind=suv, notes=said)
    except SUVError as e:
        why, fix = e.problem, e.fix
    else:
        for msg in said:
            _warn(path, msg)
            notes.append(msg)
        # The kind itself is kept: the unit cannot tell James's lean body mass from Janmahasatian's.
        return _suv.KIND_UNITS[suv], {f: fac for (f, _), fac in zip(files, factors)}, suv
    if suv != "bw" and why.startswith(("PatientSize", "PatientSex")):
        # SUVlbm or SUVbsa cannot be had for want of height or sex, but body-weight SUV can: SUVbw, said, rather
        # than the stored unit (counts, for Philips raw data), which no SUV of a baseline could be compared with.
        try:
            factors = _suv.series_suv_factors(headers, kind="bw")
        except SUVError:
            pass
        else:
            msg = (f"PET loaded in SUVbw (body-weight SUV), not {_suv.KIND_UNITS[suv]} as asked: {why}; compare it "
                   f"only with PETs in SUVbw" + (f". To get {_suv.KIND_UNITS[suv]}: {fix}" if fix else ""))
            msg = msg.removesuffix(", or use SUVbw")  # the fix's other way is what was done
            _warn(path, msg)
            notes.append(msg)
            return "SUVbw", {f: fac for (f, _), fac in zip(files, factors)}, "bw"
    if _attenuation_corrected(modality, files) is False:
        # Not converted (medfuse.io.suv refuses it; an SUVbw label would pass as quantitative everywhere after), and
        # said as the reason in its own right: "CorrectedImage lacks ATTN" alone sent users to look for a bad tag.
        why = ("the series is not attenuation-corrected (its CorrectedImage lacks ATTN), so its values are not "
               "quantitative and an SUV of it would be meaningless")
        fix = ("load the study's attenuation-corrected PET series for SUV, or load it with suv='none' to keep "
               + ("Bq/mL" if as_stored[0] == "Bq/mL" else "the stored values"))
    # Without Units the stored unit is a guess (Bq/mL, what scanners store): say it is one.
    no_units = not headers or not str(headers[0].get("Units") or "").strip()
    assumed = " (assumed: the header has no Units)" if no_units else ""
    if bq_factors:
        as_what = f"in {_BQ_NOTE[len('PET loaded in '):]}"
    else:
        as_what = f"in {stored}" if stored != "arbitrary" else "as stored (unit 'arbitrary')"
    # A stored SUV that could not be converted is still SUV: "not SUV" sent users to look for a missing header.
    not_what = f"as stored, not converted to {_suv.KIND_UNITS[suv]}" if stored.startswith("SUV") else "not SUV"
    msg = f"PET loaded {as_what}{assumed}, {not_what}: {why}" + (f". Fix: {fix}" if fix else "")
    _warn(path, msg)
    notes.append(msg)
    return as_stored


def _dose_unit(files, notes: List[str], path: Path) -> str:
    """The unit of an RT dose grid: ``Gy`` for DoseUnits GY; otherwise (RELATIVE: relative to a reference dose the
    file does not give; absent) ``arbitrary``, with a warning."""
    units = {str(ds.get("DoseUnits", "") or "").strip().upper() for _, ds in files}
    if units == {"GY"}:
        return "Gy"
    stated = "/".join(sorted(u for u in units if u)) or "absent"
    msg = (f"the RT dose's DoseUnits is {stated}, not GY: its values are not absolute dose (RELATIVE: relative to a "
           "reference dose the file does not give), and were loaded in unit 'arbitrary'")
    _warn(path, msg)
    notes.append(msg)
    return "arbitrary"


def _series_of_file(path: Path, broken: List[Path]) -> Tuple[Path, Dict[str, List[Tuple[Path, Any]]], str]:
    """(where the data comes from, series found, the series to load) for one file read as its whole series.

    The file is read strictly first (a bad file is reported as such). It brings the files of the same
    SeriesInstanceUID beside it in its folder (not in sub-folders: a slice saved in a home or study folder must
    not start a search of everything below it): the other slices of a classic series, and the other files of a
    multi-frame series stored one volume per file (Siemens XA enhanced); a multi-frame file alone stays alone.
    """
    own = _headers(path)
    uid = next(iter(own))
    series = _headers(path.parent, broken, files=_folder_files(path))
    # The folder's key of the file's series: "UID#N" when files of its UID have other SeriesNumbers.
    uid = next((k for k, fs in series.items() if any(f.name == path.name for f, _ in fs)), uid)
    if len(series.get(uid, [])) <= 1:  # the file is the whole series (a multi-frame file alone): its own source
        return path, own, next(iter(own))
    return path.parent, series, uid


def _folder_files(path: Path) -> List[Path]:
    """The visible files beside ``path`` in its folder (``path`` included)."""
    try:
        return sorted(f for f in path.parent.iterdir() if f.is_file() and not f.name.startswith("."))
    except OSError as e:
        raise UnreadableFileError(f"the folder of the file cannot be listed ({type(e).__name__})",
                                  fix="check its permissions, or load the file without whole_series",
                                  path=path.parent) from None


def _series_files_beside(path: Path, uid: str, number: Optional[str] = None) -> int:
    """How many files in ``path``'s folder belong to series ``uid`` (``path`` included); 1 when unknown. With
    ``number`` (:func:`_series_number`), only the files with that SeriesNumber count (files of one UID under
    several numbers are several series).

    Only the SeriesInstanceUID and SeriesNumber of each are read (about 0.5 ms a file), to tell a user who loaded
    one slice that the rest of its series is there.
    """
    import pydicom

    try:
        files = _folder_files(path)
    except UnreadableFileError:
        return 1
    n = 0
    for f in files:
        try:
            ds = pydicom.dcmread(f, stop_before_pixels=True, force=True,
                                 specific_tags=[(0x0020, 0x000E), (0x0020, 0x0011)])
        except Exception:  # noqa: BLE001 - not DICOM, or damaged: not one of the series' files
            continue
        # A file without a number belongs with the numbered ones (see _split_by_number), and they with it.
        n += str(ds.get("SeriesInstanceUID", "")) == uid and (not number or _series_number(ds) in (number, ""))
    return max(n, 1)


@without_value_checks()
def load_dicom_volumes(path: PathLike, *, series_uid: Optional[str] = None, suv: str = "auto",
                       whole_series: bool = False, body: Optional[Dict[str, Any]] = None) -> List[Volume]:
    """Load every volume of one DICOM series (a 3-D series gives a list of one).

    Args:
        path: a DICOM file or a folder searched recursively (non-DICOM files are ignored).
        series_uid: which series to load when the folder holds several (see :func:`scan`).
        suv: PET only: ``"auto"`` (SUVbw, or the SUV kind a GML series holds), ``"bw"``,
            ``"lbm"`` (James), ``"lbm_janma"``, ``"bsa"``, or ``"none"`` to keep the
            stored unit (Bq/mL for BQML).
        whole_series: when ``path`` is one file of a series, load the whole series it belongs to (the files of
            its folder with the same SeriesInstanceUID; other series there are ignored) instead of that file. No
            effect on folders. Without it, a file that is one of several of its series loads alone, with a
            warning.
        body: PET only: the patient's weight, height and sex in place of the header's, for SUV (a header that
            lacks them or has them wrong): a dict with any of ``weight_kg``, ``height_m``, ``sex``
            (:func:`medfuse.io.suv.check_body`). ``provenance["suv_source"]`` says which were given, never the
            values; the history's ``suv`` step holds them (as header tags), for the DICOM writer.

    Returns:
        The volumes of the series in acquisition order (a 3-D series gives a list of one).

    Raises:
        InvalidInputError: an argument of the wrong type or value (an unknown ``suv``, a ``body`` that is not a
            dict of plausible values).
        UnreadableFileError: missing, unreadable or damaged files, or a RescaleSlope/RescaleIntercept that is
            not a finite number (or a zero slope).
        UnsupportedDataError: an object that holds no image (RTSTRUCT, RTPLAN, SEG, SR...; an RTDOSE loads).
        MultipleSeriesError: several series and no ``series_uid``.
        GeometryError: invalid geometry (missing slices, inconsistent orientation, a non-positive PixelSpacing,
            an ImageOrientationPatient that is not two perpendicular unit vectors).
    """
    path = _checked_path(path)
    series_uid = _io._check_series(series_uid)
    suv = _io._check_suv(suv)
    whole_series = _io._check_flag(whole_series, "whole_series")
    from .suv import check_body

    body = check_body(body)
    if not path.exists():
        raise UnreadableFileError("no such file or folder", errno=_errno.ENOENT, fix="check the path", path=path)
    with blanking_errors():
        return _load_volumes(path, series_uid, suv, whole_series, body)


def _blank_error(e: MedfuseError, ids: Sequence[str]) -> None:
    """``e``'s message with the patient identifiers ``ids`` blanked (its ``path`` attribute stays the caller's)."""
    if not ids:
        return
    blanked = _blanked(str(e), ids)
    if blanked != str(e):
        e.problem, e.fix = _blanked(e.problem, ids), (_blanked(e.fix, ids) if e.fix else e.fix)
        e.args = (blanked,)


def _load_volumes(path: Path, series_uid: Optional[str], suv: str, whole_series: bool,
                  body: Optional[Dict[str, Any]] = None) -> List[Volume]:
    """:func:`load_dicom_volumes` once its arguments are checked; sets :data:`_PATIENT_IDS` once headers are read."""
    broken: List[Path] = []
    if whole_series and path.is_file():
        path, series, own_uid = _series_of_file(path, broken)
        if series_uid is not None and series_uid not in (own_uid, _real_uid(own_uid)):
            raise InvalidInputError("series_uid names another series than the one the file belongs to",
                                    fix="leave out series_uid, or pass the folder instead of one of its files",
                                    path=path)
        series_uid = own_uid
    else:
        series = _headers(path, broken)
    _PATIENT_IDS.set(tuple(_patient_ids(list(series.values()))))
    uid, files = _choose(series, series_uid, path)
    notes: List[str] = []
    if path.is_file() and not whole_series:  # whole_series has read the folder already: the file is all of it
        n = _series_files_beside(path, str(files[0][1].get("SeriesInstanceUID", "unknown")),
                                 _series_number(files[0][1]))
        if n > 1:  # one slice fused or registered on its own, without a word, is never what was meant
            msg = (f"this file is one of {n} files of its series in its folder, and was loaded alone; for the "
                   "whole series pass the folder (or whole_series=True)")
            # At the user's line, through medfuse.load or load_volumes alike (3 pointed into medfuse).
            _warn(path, msg)
            notes.append(msg)
    files = _dedupe(files, path, notes)
    files = _drop_localizers(files, path, notes)
    _refuse_mixed_subjects(files, path, notes)
    ds0 = files[0][1]
    stated = sorted({str(ds.get("Modality", "")).upper() for _, ds in files} - {""})
    if len(stated) > 1:
        # One series UID over CT and MR slices (a bad anonymiser or merge): loaded as the first file's modality,
        # with the other's values under its unit.
        raise UnreadableFileError(f"the series' files disagree on their modality ({', '.join(stated)}) although "
                                  "they share one SeriesInstanceUID", path=path,
                                  fix="export the series again, or give the folder of one modality's files")
    modality = normalise_modality(str(ds0.get("Modality", "")) or None) if str(ds0.get("Modality", "")).upper() in (
        "MR", "CT", "PT", "NM") else "unknown"
    frames = _series_frames(files, path)
    vols, normal = _split_volumes(frames, path, notes)
    shared_note = _shared_position_note(frames)
    if shared_note:
        _warn(path, shared_note)
        notes.append(shared_note)
    if stated == ["RTDOSE"]:  # a dose grid: modality unknown (no image modality of its own), unit Gy
        unit, factors, suv_kind = _dose_unit(files, notes, path), None, None
    else:
        unit, factors, suv_kind = _unit_and_suv(modality, files, suv, notes, path, body)
    if body and modality != "PT":  # an RT dose grid too (modality unknown)
        msg = "body= was not used: it gives the weight, height and sex for a PET's SUV, and this series is no PET"
        _warn(path, msg)
        notes.append(msg)
    suv_source = None
    if factors is not None and suv_kind is not None:  # how the SUV factor was made, in words (tags' names, never
        from . import suv as _suv  # values), for `medfuse info`

        suv_source = _suv.factor_source(_suv.header_from_dataset(ds0), kind=suv_kind) + _suv.body_note(body)
    pet_acquisition = _pet_acquisition(modality, files)
    headers = dict(files)
    pix = _pixels(vols, headers)
    facts = _volume_facts(vols, headers) if len(vols) > 1 else None
    out = []
    statuses: set = set()  # of _sparse_check, over the volumes: what the warning about unreadable files may say
    for vi, vframes in enumerate(vols):
        slices = [_slice(fr, pix) for fr in vframes]
        slopes = np.array([fr.slope for fr in vframes])
        inters = np.array([fr.intercept for fr in vframes])
        fac = None
        if factors is not None:
            fac = np.array([factors[fr.file] for fr in vframes])
            slopes, inters = slopes * fac, inters * fac
        padding = _padding_masks(slices, vframes, headers)
        arr = _assemble(slices, slopes, inters, bits_stored=int(ds0.get("BitsStored", 16) or 16))
        prov: Dict[str, Any] = {}
        vnotes = list(notes)
        if padding is not None:
            pad_note = _fill_padding(arr, padding, modality, unit)
            _warn(path, pad_note)
            vnotes.append(pad_note)
        arr, aff = _regularise(arr, vframes, normal, path, vnotes, prov, broken, unit)
        # Slices evenly spaced but further apart than the headers say (lost files): uneven ones were resampled above.
        status, sparse = ("unknown", None) if prov.get("resampled") else _sparse_check(
            vframes, headers, float(np.linalg.norm(aff[:3, 2])))
        statuses.add(status)
        if sparse:
            _warn(path, sparse)
            vnotes.append(sparse)
        # Study and frame of reference: which volumes share a patient space (never logged: UIDs identify).
        prov.update(study_uid=_uid_of(ds0, "StudyInstanceUID"),
                    frame_of_reference_uid=_uid_of(ds0, "FrameOfReferenceUID"))
        # Salted in memory, never written: lets fusing two patients' series be warned about (medfuse._patient).
        patient = patient_key(ds0)
        if patient:
            prov["patient_key"] = patient
        prov.update(series_uid=str(ds0.get("SeriesInstanceUID", "unknown")), source=os.path.abspath(path), reader="medfuse.dicom",
                    series_description=str(ds0.get("SeriesDescription", "")), volume_index=vi,
                    n_volumes=len(vols), transfer_syntax=_transfer_syntax(vframes, headers),
                    manufacturer=str(ds0.get("Manufacturer", "")), series_number=_number_of(files),
                    warnings=vnotes, unit_stated=True,
                    # What kind of image (ORIGINAL\PRIMARY\M\ND, a Dixon water image) and how the patient lay
                    # (HFS, FFP...): a physicist checks both; the geometry itself follows the orientation tags.
                    image_type=_image_type(ds0), patient_position=str(ds0.get("PatientPosition") or "").strip())
        prov.setdefault("gantry_tilt_deg", 0.0)
        prov.setdefault("tilt_corrected", False)
        if factors is not None and suv_kind is not None:
            prov["suv"] = suv_kind  # the kind applied ("auto" resolved)
            prov["suv_source"] = suv_source
            # The multiplier itself, to check against the scanner console's: one number, or [min, max] where the
            # slices' factors differ (each slice decayed to its own time).
            lo, hi = float(fac.min()), float(fac.max())
            prov["suv_factor"] = lo if hi - lo <= 1e-9 * hi else [lo, hi]
        elif suv_kind is not None:  # suv="none" on a stored SUVlbm: its formula, no factor applied
            prov["suv"] = suv_kind
        if pet_acquisition is not None:
            prov["pet_acquisition"] = dict(pet_acquisition)  # each volume its own record, as the NIfTI reader's
        vol = Volume(arr, aff, modality=modality, unit=unit, provenance=prov)
        if facts is not None:
            vol.provenance["volume"] = facts[vi]
        if body and factors is not None and suv_kind is not None:
            # The values themselves, for the DICOM writer (a saved series must carry the weight its SUV was made
            # with): in the history, which stays with resampled and fused results and is in no CLI sidecar.
            vol.add_history("suv", kind=suv_kind, body=dict(body))
        out.append(vol)
    if broken:  # no uneven gap (that would have been refused above), but evenly spaced slices may still be lost
        names = ", ".join(b.name for b in broken[:3]) + (", ..." if len(broken) > 3 else "")
        if "sparse" in statuses:
            why = ("slices appear to be missing from the series (see the warning about them), and are probably in "
                   "these files; copy or export the whole series again")
        elif statuses == {"whole"}:
            why = "the series has no missing slice between its first and last"
        else:  # nothing in the headers to check the spacing against: say only what the positions show
            why = ("its slices are evenly spaced, so their positions show no missing slice between its first and "
                   "last (the headers give no slice spacing or count to confirm it)")
        if "sparse" not in statuses:
            # "No missing slice" read as all is well, while a damaged first or last slice leaves no gap.
            why += (f", but they may be its first or last slices, which leave no gap: it loads with "
                    f"{out[0].shape[2]} slices; if that is fewer than the scanner wrote, copy or export it again")
        msg = (f"{len(broken)} DICOM file(s) beside the series could not be read (damaged, truncated, empty or not "
               f"readable: {names}) and were left out; {why}")
        _warn(path, msg)
        for v in out:
            v.provenance["warnings"].append(msg)
    ids = _PATIENT_IDS.get()
    for v in out:  # the notes as the warnings said them
        v.provenance["warnings"] = [_blanked(w, ids) for w in v.provenance["warnings"]]
    return out


#: NM frame vectors (other than the slice) by the key ``provenance["volume"]`` gives their value under.
_NM_FACTS = {"EnergyWindowVector": "energy_window", "DetectorVector": "detector", "PhaseVector": "phase",
             "RotationVector": "rotation", "RRIntervalVector": "rr_window", "TimeSlotVector": "gate",
             "AngularViewVector": "view", "TimeSliceVector": "time_slice"}


def _number(v: Optional[float]) -> Any:
    """``v`` as an int when whole (a vector's 3.0 is window 3), else as it is."""
    return int(v) if isinstance(v, float) and v.is_integer() else v


def _energy_window_name(ds, window: Any) -> Optional[str]:
    """EnergyWindowName of window ``window`` (1-based) of an NM header's EnergyWindowInformationSequence."""
    seq = ds.get("EnergyWindowInformationSequence") or []
    if not isinstance(window, int) or not 1 <= window <= len(seq):
        return None
    name = str(seq[window - 1].get("EnergyWindowName") or "").strip()
    return _blanked(name, _PATIENT_IDS.get()) or None


def _series_start_s(ds, day: float, seconds: float) -> Optional[float]:
    """Seconds from the series' start (SeriesDate/SeriesTime) to an acquisition at (``day``, ``seconds``)."""
    start = _tm_seconds(ds.get("SeriesTime"))
    if start is None or seconds < 0:
        return None
    start_day = _da_day(ds.get("SeriesDate"))
    days = day - start_day if day and start_day else 0.0
    return round(days * _DAY_S + seconds - start, 3)


def _one_volume_facts(fr: _Frame, ds) -> Dict[str, Any]:
    """What the volume whose first frame is ``fr`` is (see :func:`_volume_facts`), before the label."""
    d: Dict[str, Any] = {}
    for name, v in fr.vectors:  # NM: the frame vectors
        d[_NM_FACTS.get(name, name)] = _number(v)
    if "energy_window" in d and (name := _energy_window_name(ds, d["energy_window"])):
        d["energy_window_name"] = name
    key = fr.time_key if isinstance(fr.time_key, _TimeKey) else None
    kind = _pet_series_type(ds) if key is not None and key.source else ""
    gates = _number(_f(ds.get("NumberOfTimeSlots")))
    if kind == "GATED" and key.source == "ImageIndex" and isinstance(gates, int) and gates >= 1:
        # Every volume its R-R window (1 too), as an NM file's RRIntervalVector: window 1 was never named.
        d["rr_window"] = int(key.position) // gates + 1
        d["gate"] = int(key.position) % gates + 1
    if kind == "GATED" and _f(ds.get("TriggerTime")) is not None:
        d["trigger_time_ms"] = _f(ds.get("TriggerTime"))
    if "gate" in d and isinstance(gates, int):
        d["n_gates"] = gates
    if kind == "DYNAMIC":
        for k, v in (("frame_start_s", _series_start_s(ds, key.day, key.seconds)),
                     ("frame_reference_s", _f(ds.get("FrameReferenceTime"))),
                     ("frame_duration_s", _f(ds.get("ActualFrameDuration")))):
            if v is not None and math.isfinite(v):
                d[k] = v if k == "frame_start_s" else v / 1000.0  # the header's milliseconds
    return d


def _volume_label(d: Dict[str, Any], axis: Sequence[str]) -> str:
    """A volume's ``label``: what ``axis`` (the facts that differ between the volumes) says it is."""
    parts = []
    for k in axis:
        v = d.get(k)
        if v is None:
            continue
        if k == "energy_window":
            parts.append(f"energy window {v}" + (f" ({d['energy_window_name']})" if d.get("energy_window_name")
                                                 else ""))
        elif k == "rr_window":
            parts.append(f"R-R window {v}")
        elif k == "gate":
            parts.append(f"gate {v}" + (f"/{d['n_gates']}" if d.get("n_gates") else "")
                         + (f" (trigger {d['trigger_time_ms']:g} ms)" if "trigger_time_ms" in d else ""))
        elif k == "trigger_time_ms":  # a gate known by its TriggerTime alone
            parts.append(f"trigger {v:g} ms")
        elif k == "frame_start_s":
            parts.append(f"frame from {v:g} s" + (f", {d['frame_duration_s']:g} s long"
                                                  if "frame_duration_s" in d else ""))
        elif k == "frame_reference_s":
            parts.append(f"frame at {v:g} s (FrameReferenceTime)")
        elif k == "frame_duration_s":
            parts.append(f"frame {v:g} s long")
        elif k == "kind":
            parts.append(f"image type {v or '?'}")
        else:
            parts.append(f"{k.replace('_', ' ')} {v}")
    return ", ".join(parts)


#: Facts that only qualify another (said in its label): left out of ``axis`` where that one is in it.
_QUALIFIES = {"energy_window_name": "energy_window", "trigger_time_ms": "gate", "frame_duration_s": "frame_start_s",
              "frame_reference_s": "frame_start_s"}


def _volume_facts(vols: List[List[_Frame]], headers: Dict[Path, Any]) -> List[Dict[str, Any]]:
    """What each volume of a 4-D series is, for ``provenance["volume"]`` (docs/io.md): an NM file's energy window,
    R-R window and gate (time slot); a gated PET's gate and TriggerTime; a dynamic PET's frame start, reference
    time and duration; ``kind`` (ImageType from value 3, or FrameType) where the volumes differ in it. ``axis``
    lists the facts that differ between the volumes (less those that qualify another listed one, :data:`_QUALIFIES`:
    a gate's TriggerTime is listed where no gate is known), ``label`` says them in words.

    Why: a dual-isotope SPECT's two energy windows were "volumes" like time points, and nothing said which gate
    or frame a volume was."""
    out = []
    for vol in vols:
        d = _one_volume_facts(vol[0], headers[vol[0].file])
        kinds = {fr.image_kind or fr.frame_type for fr in vol}
        d["kind"] = kinds.pop() if len(kinds) == 1 else "mixed"
        out.append(d)
    keys = [k for k in dict.fromkeys(k for d in out for k in d)
            if len({repr(d.get(k)) for d in out}) > 1]
    for d in out:
        if "kind" not in keys:
            d.pop("kind")
        d["axis"] = [k for k in keys if _QUALIFIES.get(k) not in keys]
        d["label"] = _volume_label(d, d["axis"])
    return out


def _transfer_syntax(frames: Sequence[_Frame], headers: Dict[Path, Any]) -> str:
    """The transfer syntax UID of the files of one volume (each distinct one, ", "-joined, when they differ).
    Why per volume: the first file's was recorded for every volume of the series."""
    seen: Dict[str, None] = {}
    for fr in frames:
        ds = headers[fr.file]
        seen[str(getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "") or "")] = None
    return ", ".join(t for t in seen if t)


def _checked_path(path: Any) -> Path:
    """``path`` as a Path, or InvalidInputError saying what to pass."""
    return _io._as_path(path, fix="pass the path of a DICOM file or folder")


def _uid_of(ds, keyword: str) -> Optional[str]:
    """A top-level UID of the header (enhanced images too keep these at the top level); None when absent."""
    return str(ds.get(keyword, "") or "").strip() or None


def load_dicom(path: PathLike, *, series_uid: Optional[str] = None, volume_index: Optional[int] = None,
               suv: str = "auto", whole_series: bool = False, body: Optional[Dict[str, Any]] = None) -> Volume:
    """Load one 3-D volume from a DICOM file or folder.

    Args:
        path: a DICOM file or a folder searched recursively.
        series_uid: which series to load when the folder holds several.
        volume_index: which volume of a 4-D series (0-based); required when there are several.
        suv: PET only: ``"auto"``, ``"bw"``, ``"lbm"``, ``"lbm_janma"``, ``"bsa"`` or ``"none"``.
        whole_series: a single-frame slice loads the whole series it belongs to (see :func:`load_dicom_volumes`).
        body: PET only: weight, height and sex in place of the header's (see :func:`load_dicom_volumes`).

    Returns:
        The :class:`~medfuse.volume.Volume`.

    Raises:
        MultipleSeriesError: several series, or a 4-D series without ``volume_index``.
        InvalidInputError: an argument of the wrong type or value, ``volume_index`` out of range.
        UnreadableFileError: missing, unreadable or damaged files, or a RescaleSlope/RescaleIntercept that is
            not a finite number (or a zero slope).
        UnsupportedDataError: an object that holds no image.
        GeometryError: invalid geometry.
    """
    path = _checked_path(path)
    volume_index = _io._check_volume_index(volume_index)
    with blanking_errors():  # the checks below quote the path too
        return _one_volume(load_dicom_volumes(path, series_uid=series_uid, suv=suv, whole_series=whole_series,
                                              body=body), volume_index, path)


def _combine_advice(unit: str) -> str:
    """The ``combine=`` a 4-D series in ``unit`` takes, in words: ``'sum'`` only for counts.

    Why: a gated PET in Bq/mL was told to pass combine='sum', which is refused (a sum of concentrations is none).
    """
    if not _io._summable(unit):
        return "combine='mean' (a gated PET's ungated image, a dynamic PET's time average)"
    if unit == "counts":
        return ("combine='sum' (a gated series' counts: the ungated image) or combine='mean' (a dynamic series' "
                "frames)")
    return "combine='mean' (their average)"


def _one_volume(vols: List[Volume], volume_index: Optional[int], path: Path) -> Volume:
    """The volume ``volume_index`` chooses of a series' ``vols`` (the only one when None), or the error."""
    if volume_index is None:
        if len(vols) > 1:
            # Volumes of one slice each: say why (a multi-frame file's frames at one position are time points).
            said = vols[0].provenance.get("warnings", [])
            why = next((w for w in said if "share one ImagePositionPatient" in w
                        and "time points" in w), None) if all(v.shape[2] == 1 for v in vols) else None
            # Volumes of different image types (mDIXON): which index is which, for the volume_index to pass.
            why = why or next((w for w in said if "differ in image type" in w), None)
            # What each volume is (gates, frames, energy windows: a dual-isotope SPECT's are no time points).
            labels = [str((v.provenance.get("volume") or {}).get("label") or "") for v in vols]
            if not why and all(labels):
                why = "by volume index: " + ", ".join(f"{i} {t}" for i, t in enumerate(labels[:8])) + (
                    f", ... {len(labels) - 1} {labels[-1]}" if len(labels) > 8 else "")
            # Different isotopes or image types are not combined (load refuses it): no combine advice for them.
            axis = (vols[0].provenance.get("volume") or {}).get("axis") or []
            combine = "" if {"energy_window", "kind"} & set(axis) else \
                f"{_combine_advice(vols[0].unit)} for all of them as one, "
            raise MultipleSeriesError(f"the series holds {len(vols)} volumes (4-D)" + (f": {why}" if why else ""),
                                      choices=list(range(len(vols))),
                                      fix=f"pass volume_index=0..{len(vols) - 1} for one, {combine}or use "
                                          "medfuse.load_volumes", path=path)
        return vols[0]
    if not -len(vols) <= volume_index < len(vols):
        raise InvalidInputError(f"volume_index {volume_index} is out of range (the series has {len(vols)})",
                                fix=f"pass volume_index=0..{len(vols) - 1}", path=path)
    return vols[volume_index]


@without_value_checks()
def scan(folder: PathLike) -> List[SeriesInfo]:
    """List the image series under a folder (recursive) without decoding pixels.

    Args:
        folder: the folder (or one DICOM file).

    Returns:
        One :class:`SeriesInfo` per series.

    Raises:
        InvalidInputError: ``folder`` is not a path.
        UnreadableFileError: it does not exist, or holds no readable DICOM image file (empty, other files only, or
            only damaged, truncated or empty DICOM files, which the message counts).
        UnsupportedDataError: it holds DICOM objects but no image series (RTSTRUCT, RTPLAN, SEG, SR, a DICOMDIR
            alone; an RTDOSE with a dose grid is listed).
    """
    folder = _io._as_path(folder, what="folder", fix="pass the folder as a str or pathlib.Path")
    if not folder.exists():
        raise UnreadableFileError("no such file or folder", errno=_errno.ENOENT, fix="check the path", path=folder)
    with blanking_errors():
        return _scan(folder)


def _scan(folder: Path) -> List[SeriesInfo]:
    series = _headers(folder)
    _PATIENT_IDS.set(tuple(_patient_ids(list(series.values()))))
    out = []
    for uid, files in series.items():
        shape, nvol, files = _series_shape(files, folder)  # a series with no volume is listed: load says why
        ds0 = files[0][1]
        dirs = {os.fspath(f.parent) for f, _ in files}
        out.append(SeriesInfo(uid, str(ds0.get("Modality", "")), str(ds0.get("SeriesDescription", "")), shape, nvol,
                              len(files), dirs.pop() if len(dirs) == 1 else os.fspath(folder),
                              series_number=_number_of(files), not_volume="" if nvol else _nm_not_volume(ds0)))
    return out
