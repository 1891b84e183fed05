"""Readers and writers. ``load`` dispatches on what the path is.

* ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files -> :mod:`medfuse.io.nifti`
* a folder, or any other single file -> DICOM (:mod:`medfuse.io.dicom`)
"""

from __future__ import annotations

import errno
import errno as _errno
import os
import stat
import warnings
from contextlib import contextmanager
from contextvars import ContextVar
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, List, Optional, Union

from .._checks import as_path as _checked_path
from .._checks import describe as _kind
from .._checks import flag as _check_flag  # noqa: F401 - the readers' and writers' yes/no check
from .._checks import whole as _whole
from ..errors import InvalidInputError, MedfuseWarning, UnreadableFileError
from ..volume import Volume

if TYPE_CHECKING:  # .dicom imports this package: imported where used at run time
    from .dicom import SeriesInfo

__all__ = ["load", "load_volumes", "scan", "select_series", "save", "is_image_file", "check_readable",
           "series_choice_record", "IMAGE_SUFFIXES", "SUV_CHOICES", "COMBINE_CHOICES"]

PathLike = Union[str, os.PathLike]

#: File name endings read by the NIfTI/ITK-image reader.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr")

#: What ``suv=`` accepts (PET only; other inputs ignore it).
SUV_CHOICES = ("auto", "bw", "lbm", "lbm_janma", "bsa", "none")

#: What ``combine=`` accepts: how :func:`load` makes one volume of all those of a 4-D series or file.
COMBINE_CHOICES = ("sum", "mean")

#: The command line's ``--volume`` (an index, ``"sum"`` or ``"mean"``), for every 4-D input loaded inside
#: :func:`four_d_choice`; None outside it.
_FOUR_D: ContextVar[Any] = ContextVar("medfuse_four_d_choice", default=None)


# ------------------------------------------------------------------------------------------ argument checks
def _as_path(value: Any, *, what: str = "path", fix: Optional[str] = None, images: bool = True) -> Path:
    """``value`` as a Path (:func:`medfuse._checks.as_path`), refusing a null character in it.

    Why: every file-system call raises a bare ``ValueError: embedded null byte`` on such a path.

    Raises:
        InvalidInputError: as :func:`medfuse._checks.as_path`, or the path holds a null character.
    """
    p = _checked_path(value, what=what, fix=fix, images=images)
    text = os.fspath(p)
    if "\0" in text:
        shown = os.fsencode(text).decode("utf-8", "backslashreplace")
        named = what if what.startswith("the ") else f"the {what}"
        raise InvalidInputError(f"{named} {shown!r} holds a null character (\\0), which no file name can contain",
                                fix="check how the path was built (a C string, a fixed-width field or a file read "
                                    "in binary mode can leave a \\0 in it) and pass it without")
    return p


def _home(p: Path) -> Path:
    """An input path with a leading ``~`` expanded, as ``nibabel.load`` and the command line take it (a quoted
    ``"~/t1.nii.gz"`` reached Python unexpanded and was "no such file")."""
    text = os.fspath(p)
    return Path(os.path.expanduser(text)) if text.startswith("~") else p


def _check_volume_index(value: Any) -> Optional[int]:
    """``volume_index`` as an int (None stays None).

    Raises:
        InvalidInputError: not a whole number (bool included: True would quietly pick volume 1).
    """
    if value is None:
        return None
    return _whole(value, "volume_index", what="a whole number (0-based, negative from the end)",
                  example="volume_index=0, or leave it out for a 3-D image")


def _check_combine(value: Any, volume_index: Optional[int]) -> Optional[str]:
    """``combine`` checked against :data:`COMBINE_CHOICES` (None stays None), and against ``volume_index``.

    Raises:
        InvalidInputError: any other value, or both ``combine`` and ``volume_index`` given.
    """
    if value is None:
        return None
    if not isinstance(value, str) or value not in COMBINE_CHOICES:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise InvalidInputError(f"combine must be 'sum' or 'mean', got {shown}",
                                fix="pass combine='sum' (a gated series' counts: the ungated image) or "
                                    "combine='mean' (a dynamic series' frames), or leave it out")
    if volume_index is not None:
        raise InvalidInputError("volume_index and combine were both given: one picks a volume of a 4-D series, "
                                "the other combines all of them", fix="pass only one of them")
    return value


@contextmanager
def four_d_choice(choice: Any) -> Iterator[None]:
    """Within the block, :func:`load` picks or combines the volumes of every 4-D input it reads without its own
    ``volume_index`` or ``combine`` by ``choice`` (the command line's ``--volume``); 3-D inputs ignore it.

    Args:
        choice: a volume index (int), ``"sum"``, ``"mean"``, or None (no choice: a 4-D input is refused).

    Raises:
        InvalidInputError: ``choice`` is none of those.
    """
    if isinstance(choice, str):
        _check_combine(choice, None)
    elif choice is not None:
        choice = _check_volume_index(choice)
    token = _FOUR_D.set(choice)
    try:
        yield
    finally:
        _FOUR_D.reset(token)


def _one_of(vols: List[Volume], choice: Any, path: Path) -> Volume:
    """The volume ``choice`` (an index, ``"sum"``/``"mean"`` or None) makes of ``vols``: a 3-D input's one volume
    whatever the choice; a 4-D one's by index (refused out of range, or without a choice), or combined
    (:func:`_combined`)."""
    from .dicom import _one_volume

    if len(vols) == 1:
        return vols[0]
    if isinstance(choice, str):
        return _combined(vols, choice, path)
    return _one_volume(vols, choice, path)


def _summable(unit: str) -> bool:
    """False for a unit whose sum over the volumes of a 4-D series is no value of it (each volume is a
    concentration or a density already: Bq/mL, SUV, HU, Gy); ``mean`` combines those."""
    return not (unit.startswith("SUV") or "Bq" in unit or unit in ("HU", "Gy"))


def _combined(vols: List[Volume], how: str, path: Path) -> Volume:
    """One volume of the volumes of a 4-D series or file: their sum or mean (duration-weighted where each gives
    its frame duration), recorded in the history as a ``combine`` step.

    Raises:
        InvalidInputError: volumes that are no repeats of one acquisition on one grid: different energy windows
            (isotopes), image types (Dixon in-phase and opposed-phase) or units, other grids; or ``sum`` of a
            concentration (Bq/mL, SUV), of HU or of Gy.
    """
    import numpy as np

    first, n = vols[0], len(vols)
    facts = [v.provenance.get("volume") or {} for v in vols]
    pick = f"pass volume_index=0..{n - 1} for one of them (command line: --volume N)"

    def refuse(what: str, fix: str = pick) -> None:
        raise InvalidInputError(f"the {n} volumes cannot be combined ({how}): {what}", fix=fix, path=path)

    windows = {(f.get("energy_window"), f.get("energy_window_name")) for f in facts}
    if len(windows) > 1:
        shown = ", ".join(f"{w}" + (f" {name}" if name else "") for w, name in sorted(windows, key=repr))
        refuse(f"they are different energy windows ({shown}): images of different isotopes or photopeaks, not "
               "repeats of one image")
    kinds = {f.get("kind") for f in facts}
    if len(kinds) > 1:
        refuse(f"they are images of different types ({', '.join(sorted(str(k or '?') for k in kinds))}), such as "
               "Dixon in-phase and opposed-phase images, not repeats of one image")
    if len({v.unit for v in vols}) > 1:
        refuse(f"their units differ ({', '.join(sorted({v.unit for v in vols}))})")
    if any(v.shape != first.shape or not np.allclose(v.affine, first.affine, atol=1e-4) for v in vols):
        refuse("they are not on one grid (shape, spacing, origin or orientation differ)")
    if how == "sum" and not _summable(first.unit):
        refuse(f"a sum of values in {first.unit} is no {first.unit} value (each volume is a concentration or "
               "density already)", fix="pass combine='mean' (command line: --volume mean): for a gated PET the "
                                       "ungated image, for a dynamic one the time-averaged image")
    durations = [f.get("frame_duration_s") for f in facts]
    weighted = how == "mean" and all(isinstance(d, (int, float)) and d > 0 for d in durations)
    weights = np.asarray(durations if weighted else [1.0] * n, float)
    total = np.zeros(first.shape, np.float64)
    for w, v in zip(weights, vols):
        total += w * np.asarray(v.array, np.float64)
    if how == "mean":
        total /= weights.sum()
    out = first.with_array(total.astype(np.float32))
    prov = out.provenance
    prov["volume_index"] = None
    factors = [v.provenance.get("suv_factor") for v in vols]
    flat = [x for f in factors if f is not None for x in (f if isinstance(f, list) else [f])]
    if flat and len(set(flat)) > 1:
        prov["suv_factor"] = [min(flat), max(flat)]
    labels = [f.get("label") for f in facts if f.get("label")]
    out.add_history("combine", how=how, n_volumes=n,
                    weighting="frame durations (ActualFrameDuration)" if weighted else
                    "equal" + (" (frame durations unknown)" if how == "mean" else ""),
                    **({"axis": facts[0].get("axis"), "volumes": labels} if labels else {}))
    return out


def _check_suv(value: Any) -> str:
    """``suv`` checked against :data:`SUV_CHOICES`.

    Raises:
        InvalidInputError: any other value, the accepted ones named.
    """
    if not isinstance(value, str) or value not in SUV_CHOICES:
        shown = repr(value) if isinstance(value, str) else _kind(value)
        raise InvalidInputError(f"suv must be one of {', '.join(map(repr, SUV_CHOICES))}, got {shown}",
                                fix="pass suv='auto' (the default: SUVbw, or the kind an SUV series holds), a kind "
                                    "('bw', 'lbm', 'lbm_janma', 'bsa'), or 'none' for the stored unit")
    return value


def _check_text(value: Any, name: str, fix: str) -> Optional[str]:
    """An optional text option (modality, unit, series_description, format).

    Raises:
        InvalidInputError: neither a str nor None.
    """
    if value is not None and not isinstance(value, str):
        raise InvalidInputError(f"{name} must be text or None, got {_kind(value)}", fix=fix)
    return value


def _check_series(value: Any) -> Optional[str]:
    """``series_uid``: a UID, a number (as :func:`scan` lists the series) or a modality; None for no choice.

    Raises:
        InvalidInputError: any other type.
    """
    import numpy as np

    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return str(int(value))
    raise InvalidInputError(f"series_uid must be text or a series number, got {_kind(value)}",
                            fix="pass the series' number as medfuse.scan lists it (e.g. '2'), its modality ('PT'), "
                                "or its SeriesInstanceUID")


def _check_body(value: Any) -> None:
    """``body`` (PET weight, height, sex) checked: :func:`medfuse.io.suv.check_body`.

    Raises:
        InvalidInputError: not a dict of plausible values.
    """
    from .suv import check_body

    check_body(value)


def _body_unused(body: Optional[dict]) -> None:
    """Warn that ``body`` was given for an image file, whose SUV (a PET-BIDS sidecar's) does not use it."""
    if body:
        warnings.warn("body= was not used: it gives a DICOM PET's weight, height and sex for SUV, and a "
                      "NIfTI/MetaImage/NRRD file takes them from its PET-BIDS sidecar (BodyWeight); correct that "
                      "instead", MedfuseWarning, stacklevel=3)


def _check_load_options(*, modality: Any = None, unit: Any = None) -> None:
    _check_text(modality, "modality", "pass e.g. modality='MR', 'CT', 'PT' or 'NM', or leave it out")
    _check_text(unit, "unit", "pass e.g. unit='HU', 'SUVbw' or 'arbitrary', or leave it out")


# ------------------------------------------------------------------------------------------ helpers
def dicom_template(path: Any) -> Optional[Path]:
    """``path`` when it names a DICOM series (a folder, or a file without an image file ending) that a DICOM output
    on its grid may take its study context from (``save(..., template=)``); else None (a NIfTI, a Volume).

    Why: the command line wrote DICOM outputs with a new study and frame of reference, today's dates and no
    patient position, so a viewer would not overlay them with the series they were made on.

    Args:
        path: an input as given (a path, a Volume, anything).

    Returns:
        The Path, or None.
    """
    if not isinstance(path, (str, os.PathLike)) or not str(path).strip():
        return None
    p = Path(path)
    try:
        if p.is_dir() or (p.is_file() and not is_image_file(p)):
            return p
    except OSError:
        pass
    return None


def is_image_file(path: PathLike) -> bool:
    """Whether ``path`` has an ending the NIfTI/MetaImage/NRRD reader takes (:data:`IMAGE_SUFFIXES`, any case).

    Args:
        path: a file name or path; it need not exist.

    Returns:
        True for ``.nii``, ``.nii.gz``, ``.mha``, ``.mhd``, ``.nrrd``, ``.nhdr``, ``.img`` and ``.hdr``.

    Raises:
        InvalidInputError: ``path`` is not a path.
    """
    if not isinstance(path, (str, os.PathLike)):
        _as_path(path)  # raises, saying what to pass
    return os.fspath(path).lower().endswith(IMAGE_SUFFIXES)


def check_readable(path: PathLike) -> None:
    """Refuse a file or folder this user may not read (a folder: list and enter), saying so.

    Why here: the readers would otherwise report it as a damaged file ("not a valid NIfTI", advising a re-export)
    or as a folder with no images.

    Args:
        path: an existing file or folder.

    Raises:
        UnreadableFileError: permission denied; or the path is missing, a symbolic link that loops or points
            nowhere, or a named pipe, socket or device (nothing is opened, so a pipe cannot block).
        InvalidInputError: ``path`` is not a path.
    """
    p = _as_path(path)
    folder = stat.S_ISDIR(_stat_or_refuse(p).st_mode)
    if not os.access(p, os.R_OK | (os.X_OK if folder else 0)):
        raise UnreadableFileError(f"permission denied: this user may not read the {'folder' if folder else 'file'}",
                                  fix="change its permissions (chmod u+r" + (", u+x" if folder else "")
                                  + ") or run medfuse as a user who may read it", path=p)


#: What each kind of special file is called in messages (by the test of ``os.stat``'s mode that finds it).
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _stat_or_refuse(path: Path) -> os.stat_result:
    """``os.stat`` of an existing regular file or folder (links followed); anything else refused in words.

    Why: ``Path.exists`` is False for a link that loops, which was reported as "no such file"; and a named pipe
    or socket was handed to the DICOM reader ("no readable DICOM"). ``stat`` opens nothing, so a pipe with no
    writer cannot block here (opening it for reading would wait forever).

    Raises:
        UnreadableFileError: the path does not exist, is a link that loops or points nowhere, or is a pipe,
            socket or device.
    """
    try:
        st = os.stat(path)
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnreadableFileError("the path is a symbolic link that loops (it leads, through one or more links, "
                                      "back to itself), so it names no file or folder",
                                      fix="point the link at the real file or folder (ls -l shows where each link "
                                          "points), or give the file's own path", path=path) from None
        if e.errno == errno.ENOENT and os.path.islink(path):
            raise UnreadableFileError(f"the path is a symbolic link to '{os.readlink(path)}', which does not exist",
                                      fix="point the link at the real file or folder, or give the file's own path",
                                      path=path) from None
        if e.errno in (errno.EACCES, errno.EPERM):  # a folder on the way may not be entered
            raise UnreadableFileError("permission denied: a folder on the path may not be entered",
                                      fix="change its permissions (chmod u+x) or run medfuse as a user who may "
                                          "read it", path=path) from None
        from ._atomic import missing_hint  # an NFD twin, a Windows path, an unexpanded ~: said with the error

        raise UnreadableFileError(f"no such file or folder{missing_hint(path)}", errno=_errno.ENOENT,
                                  fix="check the path", path=path) from None
    if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
        kind = next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "a special file")
        raise UnreadableFileError(f"this is {kind}, not a regular file or folder, so medfuse cannot read an image "
                                  "from it", fix="give the path of an image file (NIfTI, MetaImage, NRRD, DICOM) or "
                                  "a DICOM folder; to load data that arrives through a pipe, save it to a file first",
                                  path=path)
    return st


def _check_exists(path: Path) -> None:
    _stat_or_refuse(path)
    check_readable(path)
    if path.name.lower().endswith((".hdr.gz", ".img.gz")) and path.is_file():
        # Without this, a gzipped Analyze/NIfTI pair was called "not a medical image: neither DICOM nor NIfTI".
        raise UnreadableFileError("a gzipped Analyze/NIfTI pair (.hdr.gz/.img.gz) is not read by medfuse",
                                  fix="decompress both files (gunzip NAME.hdr.gz NAME.img.gz) and load the .hdr, "
                                      "or convert the pair to one .nii.gz", path=path)


def _absolute_source(vol: Volume) -> Volume:
    """Record the source as an absolute path: ``save`` refuses to write onto it, and a relative one would
    name another file once the working folder changes (``os.chdir``, a notebook's ``%cd``)."""
    src = vol.provenance.get("source")
    if isinstance(src, (str, os.PathLike)) and not os.path.isabs(src):
        vol.provenance["source"] = os.path.abspath(src)
    return vol


# ------------------------------------------------------------------------------------------ the public faces
def load(path: PathLike, *, series_uid: Optional[str] = None, volume_index: Optional[int] = None,
         modality: Optional[str] = None, unit: Optional[str] = None, suv: str = "auto",
         whole_series: bool = False, body: Optional[dict] = None, combine: Optional[str] = None) -> Volume:
    """Load one 3-D volume from a NIfTI/MetaImage/NRRD file, a DICOM file or a DICOM folder.

    A DICOM file is read on its own (one slice of a classic series gives a one-slice volume) unless
    ``whole_series=True``.

    Args:
        path: file or folder.
        series_uid: which DICOM series to read when a folder holds several: its SeriesInstanceUID, or its
            number as :func:`scan` lists it (1-based, e.g. ``"2"``), or a modality that only one series there has
            (``"PT"``, ``"CT"``).
        volume_index: which volume of a 4-D series or file to return (0-based, negative from the end).
        modality: override the modality (NIfTI carries none; default ``unknown`` or guessed).
        unit: override the unit.
        suv: PET only: ``"auto"`` (default: SUVbw, or the SUV kind a GML series already holds),
            ``"bw"``, ``"lbm"``, ``"lbm_janma"``, ``"bsa"``, or ``"none"`` for the stored unit (Bq/mL).
            Checked for every input; a NIfTI PET gets SUVbw from a PET-BIDS sidecar beside it that gives what SUV
            needs (docs/io.md); a MetaImage/NRRD file carries no SUV header, so it is not applied there.
            A DICOM series whose headers lack what the kind needs (a weight, a height for ``"lbm"``) loads in its
            stored unit with a :class:`~medfuse.errors.MedfuseWarning` saying why: check ``Volume.unit``.
        whole_series: DICOM only: when ``path`` is one file of a series, load the whole series it belongs to:
            the files in the same folder (not its sub-folders) with the same SeriesInstanceUID (the other slices
            of a classic series; the other volumes of a multi-frame series stored one file per volume); other
            series there are ignored. Folders are whole already. The volume's recorded source is then the
            folder. Without it, a file that is one of several of its series loads alone, with a warning.
        body: DICOM PET only: the patient's body in place of the header's, for SUV, when the header lacks it or
            has it wrong: a dict with any of ``weight_kg`` (kg), ``height_m`` (m) and ``sex`` (``"M"``/``"F"``),
            e.g. ``body={"weight_kg": 3.2, "height_m": 0.52, "sex": "M"}``. Checked as the header's are (docs/io.md);
            ``provenance["suv_source"]`` records that it was given and which keys, never the values. Other inputs
            do not use it (a warning says so).
        combine: one volume made of all those of a 4-D series or file, instead of picking one with
            ``volume_index`` (not both): ``"sum"`` (a gated NM series' counts: the ungated image) or ``"mean"``
            (a gated PET, or a dynamic PET's frames: weighted by their durations where the headers give them).
            Refused for volumes that are no repeats of one acquisition on one grid (energy windows of two isotopes,
            Dixon images, other grids), and ``"sum"`` for a concentration (Bq/mL, SUV). The history's
            ``combine`` step records it (docs/io.md); a 3-D input is returned as it is.

    Returns:
        The :class:`~medfuse.volume.Volume`, its source recorded as an absolute path.

    Raises:
        InvalidInputError: an argument of the wrong type or value (a path that is not a str or Path, an unknown
            ``suv``, a ``volume_index`` that is not a whole number or out of range, a ``body`` that is not a dict
            of plausible values, ``combine`` with ``volume_index`` or on volumes that cannot be combined), or
            zero-size/all-NaN data.
        UnreadableFileError: missing, unreadable, damaged or misnamed file.
        UnsupportedDataError: a DICOM object that holds no image (RT, SEG, SR...).
        MultipleSeriesError: several series in a folder, or several volumes, and none chosen.
        GeometryError: invalid geometry (sheared or singular affine, missing slices).
    """
    p = _home(_as_path(path, fix="pass the path of a NIfTI/MetaImage/NRRD file, a DICOM file or a DICOM folder"))
    series_uid = _check_series(series_uid)
    volume_index = _check_volume_index(volume_index)
    combine = _check_combine(combine, volume_index)
    # The command line's --volume, for an input given neither (3-D inputs ignore it).
    choice = combine if combine is not None or volume_index is not None else _FOUR_D.get()
    _check_load_options(modality=modality, unit=unit)
    suv = _check_suv(suv)
    whole_series = _check_flag(whole_series, "whole_series")
    _check_body(body)  # before the path: a wrong body= is said whatever the input
    _check_exists(p)
    if p.is_file() and is_image_file(p):
        from .nifti import load_image, load_image_volumes

        _body_unused(body)
        if series_uid is not None:
            raise InvalidInputError("a series was chosen, but this file holds one image (series are picked in DICOM "
                                    "folders)", fix="leave the series choice out for this input ('-')", path=p)

        if choice is None:
            vol = load_image(p, modality=modality, unit=unit, volume_index=volume_index, suv=suv)
        else:
            vol = _one_of(load_image_volumes(p, modality=modality, unit=unit, suv=suv), choice, p)
        said = any("BIDS sidecar" in w for w in vol.provenance.get("warnings", []))  # pet_bids said why already
        if suv not in ("auto", "none") and vol.modality == "PT" and not vol.unit.startswith("SUV") and not said:
            # Asked for by name, and not given: say so (the PET's values are not SUV, whatever was asked).
            warnings.warn(f"suv={suv!r} was not applied: a NIfTI/MetaImage/NRRD file holds no SUV header (dose, "
                          f"body size, times) and no PET-BIDS sidecar beside it gives them, so the PET stays in "
                          f"{vol.unit}; add them to its BIDS sidecar (docs/io.md), or load the DICOM series for SUV",
                          MedfuseWarning, stacklevel=2)
        return _absolute_source(vol)
    from .dicom import blanking_errors, load_dicom, load_dicom_volumes

    try:
        if choice is None:
            vol = load_dicom(p, series_uid=series_uid, volume_index=volume_index, suv=suv,
                             whole_series=whole_series, body=body)
        else:
            with blanking_errors():  # the refusals quote the path, which may name the patient
                vol = _one_of(load_dicom_volumes(p, series_uid=series_uid, suv=suv, whole_series=whole_series,
                                                 body=body), choice, p)
    except UnreadableFileError as e:
        raise _image_files_instead(p, e) from None
    if modality is not None or unit is not None:
        vol = vol.with_array(vol.array, **{k: v for k, v in (("modality", modality), ("unit", unit)) if v is not None})
    return _absolute_source(vol)


def load_volumes(path: PathLike, *, series_uid: Optional[str] = None, suv: str = "auto",
                 whole_series: bool = False, body: Optional[dict] = None) -> List[Volume]:
    """Load every volume of a (possibly 4-D) series or file as a list of 3-D volumes.

    Args:
        path: a NIfTI/MetaImage/NRRD file, a DICOM file or a DICOM folder.
        series_uid: which DICOM series when a folder holds several (as :func:`load` takes it).
        suv: PET only, as :func:`load` takes it.
        whole_series: DICOM only: one file of a series loads the whole series (see :func:`load`).
        body: DICOM PET only: weight, height and sex in place of the header's (see :func:`load`).

    Returns:
        The volumes in their stored order (a 3-D input gives a list of one).

    Raises:
        InvalidInputError: an argument of the wrong type or value, a ``series_uid`` for an image file, or
            zero-size/all-NaN data.
        UnreadableFileError: missing, unreadable, damaged or misnamed file.
        UnsupportedDataError: a DICOM object that holds no image.
        MultipleSeriesError: several series in a folder and none chosen.
        GeometryError: invalid geometry.
    """
    p = _home(_as_path(path, fix="pass the path of a NIfTI/MetaImage/NRRD file, a DICOM file or a DICOM folder"))
    series_uid = _check_series(series_uid)
    suv = _check_suv(suv)
    whole_series = _check_flag(whole_series, "whole_series")
    _check_body(body)  # before the path: a wrong body= is said whatever the input
    _check_exists(p)
    if p.is_file() and is_image_file(p):
        from .nifti import load_image_volumes

        _body_unused(body)
        if series_uid is not None:  # it was ignored; load() refuses it
            raise InvalidInputError("a series was chosen, but this file holds one image (series are picked in DICOM "
                                    "folders)", fix="leave series_uid out for this input", path=p)

        return [_absolute_source(v) for v in load_image_volumes(p, suv=suv)]
    from .dicom import load_dicom_volumes

    try:
        vols = load_dicom_volumes(p, series_uid=series_uid, suv=suv, whole_series=whole_series, body=body)
    except UnreadableFileError as e:
        raise _image_files_instead(p, e) from None
    return [_absolute_source(v) for v in vols]


#: Endings of 2-D pictures, which :func:`load` (3-D volumes) does not read.
_PICTURE_ENDINGS = (".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp", ".gif")

#: Where 2-D pictures are read instead: the Harvard atlas pairs are PNGs.
_PICTURE_FIX = ("read 2-D PNG images (such as the Harvard atlas pairs) with medfuse.harvard: "
                "medfuse.harvard.load_gray(path) gives an image as an array, medfuse.harvard.list_pairs(folder) "
                "the pairs of a folder; fuse the arrays with medfuse.fuse(a, b, method=...)")


def _image_files_instead(folder: Path, e: UnreadableFileError) -> UnreadableFileError:
    """``e`` for a folder without DICOM images that holds NIfTI/MetaImage/NRRD files: its fix names them; for
    a 2-D picture (or a folder of them), an error whose fix names :mod:`medfuse.harvard`, which reads them.

    Why the pictures: ``medfuse.load("28010.png")`` said "not a medical image: neither DICOM nor NIfTI...",
    and a class with the Harvard pairs did not learn where those are read.

    Why: ``medfuse info`` lists such a folder's image files, but loading it said only "no readable DICOM image
    files were found; check the folder", though the file to pass was right there. A folder is read as DICOM
    (an image file is one volume, passed by its own name), so they are named, not loaded.
    """
    if folder.is_file() and folder.name.lower().endswith(_PICTURE_ENDINGS) and e.problem.startswith("not a medical"):
        return UnreadableFileError(f"not a medical image but a 2-D picture ({folder.suffix.lower()}): medfuse.load "
                                   "reads 3-D volumes (NIfTI, MetaImage and NRRD files, DICOM)", fix=_PICTURE_FIX,
                                   path=folder)
    if not folder.is_dir() or not e.problem.startswith("no readable DICOM image files"):
        return e
    try:
        found = sorted(f.name for f in folder.iterdir() if f.is_file() and is_image_file(f))
        pictures = not found and any(f.name.lower().endswith(_PICTURE_ENDINGS) for f in folder.iterdir())
    except OSError:
        return e
    if pictures:  # a Harvard pair type's MRI/ or CT/ folder
        e.fix = f"the folder holds 2-D pictures, not DICOM: {_PICTURE_FIX}"
        e.args = (e._compose(),)
    if found:
        from .._checks import label

        names = ", ".join(label(n) for n in found[:3]) + (f" and {len(found) - 3} more" if len(found) > 3 else "")
        e.fix = (f"the folder holds {len(found)} image file(s) ({names}): pass the file itself, not its folder "
                 "(a folder is read as DICOM)")
        e.args = (e._compose(),)
    return e


def scan(folder: PathLike) -> List[SeriesInfo]:
    """List the DICOM series in a folder (recursively) without reading pixels.

    Args:
        folder: the folder to search (a DICOM file: the series it holds).

    Returns:
        A list of :class:`medfuse.io.dicom.SeriesInfo` (UID, modality, description, shape, volumes, files,
        folder), in the order a several-series error numbers them.

    Raises:
        InvalidInputError: ``folder`` is not a path.
        UnreadableFileError: it does not exist or may not be read, or holds no readable DICOM image file.
        UnsupportedDataError: it holds DICOM objects but no image series (RT, SEG, SR, a DICOMDIR alone), or is
            one such object.
    """
    p = _as_path(folder, what="folder", fix="pass the folder as a str or pathlib.Path")
    _check_exists(p)
    from .dicom import scan as _scan

    return _scan(p)


def select_series(path: PathLike, selector: Optional[str]) -> Optional[str]:
    """The SeriesInstanceUID of the series ``selector`` names in the DICOM folder ``path``.

    For folders that hold several series, as PACS and CD exports of a PET/CT or PET/MR study often do (all
    series side by side in one folder), so that no files need moving. ``load(path, series_uid=selector)`` takes
    the same choices directly (one pass over the headers); this gives the UID itself.

    Args:
        path: a DICOM folder.
        selector: the series' number as a several-series error or ``scan`` lists it (1-based, in
            :func:`scan`'s order); a modality (``CT``, ``MR``, ``PT``/``PET``, ``NM``/``SPECT``) that exactly one
            series in the folder has; or a SeriesInstanceUID. ``None`` or ``"-"``: no choice (returns ``None``).

    Returns:
        The SeriesInstanceUID, or None when no choice was given.

    Raises:
        InvalidInputError: ``path`` is not a path or not a folder, ``selector`` is not text or a number, or
            nothing (or more than one series) matches; the message lists the series by number and modality (no
            UIDs or descriptions, which may identify the patient).
        UnreadableFileError: the folder does not exist or may not be read.
    """
    from .dicom import blanking_errors, resolve_series_choice

    p = _as_path(path, fix="pass the DICOM folder as a str or pathlib.Path")
    selector = _check_series(selector)
    if selector is None or str(selector).strip() in ("", "-"):
        return None
    _check_exists(p)  # a missing folder was called "a file"
    if not p.is_dir():
        raise InvalidInputError("a series can be picked in a DICOM folder only; this is a file",
                                fix="leave the series choice out for this input ('-')", path=p)
    with blanking_errors():  # the folder may be named after the patient, whose headers scan reads
        series = scan(p)
        entries = [(s.series_uid, s.modality, f"{s.modality or '?'} {'x'.join(map(str, s.shape))}, {s.n_files} files"
                    + (f", SeriesNumber {s.series_number}" if s.series_number else "")) for s in series]
        key = str(selector).strip()
        uid = resolve_series_choice(key, entries, p) or key
        if uid not in {s.series_uid for s in series}:
            raise InvalidInputError(f"no series in this folder matches the choice given: it is not one of the "
                                    f"{len(series)} series "
                                    f"({'; '.join(f'{i}: {e[2]}' for i, e in enumerate(entries, start=1))})",
                                    fix="give the series' number as listed, its modality, or its SeriesInstanceUID",
                                    path=p)
    return uid


def series_choice_record(selector: Optional[str]) -> Optional[str]:
    """``selector`` as provenance records it: numbers and modalities as given, a UID as ``"uid"`` (UIDs trace
    back to the study, and sidecars hold no identifiers).

    Args:
        selector: a series choice as :func:`select_series` takes it, or None.

    Returns:
        The choice to record, or None.

    Raises:
        InvalidInputError: ``selector`` is neither text, a number nor None.
    """
    from ..volume import _MODALITY_ALIASES

    selector = _check_series(selector)
    if selector is None:
        return None
    key = str(selector).strip()
    return key if key in ("", "-") or key.isdigit() or key.upper() in _MODALITY_ALIASES else "uid"


def save(volume: Volume, path: PathLike, *, overwrite: bool = False, format: Optional[str] = None,
         deidentify: bool = True, series_description: Optional[str] = None, template: Any = None) -> Path:
    """Write a volume atomically: NIfTI, MetaImage, NRRD, or a DICOM series folder.

    The format comes from the name (``.nii``/``.nii.gz``, ``.mha``/``.mhd``, ``.nrrd``/``.nhdr``; a name without
    one of those endings writes a DICOM series into a new folder) or from ``format``. Existing outputs are
    refused unless ``overwrite=True``; the volume's own source (and the files it was made from) never.

    Args:
        volume: the :class:`~medfuse.volume.Volume` to write.
        path: the output file, or for DICOM a folder that does not exist yet.
        overwrite: replace an existing output (never the volume's own source).
        format: ``nifti``, ``nifti2``, ``metaimage``, ``nrrd`` or ``dicom``; default from the name.
        deidentify: DICOM only: drop patient name/ID/birth date and other identifiers taken from the template.
        series_description: DICOM only: SeriesDescription of the derived series.
        template: DICOM only: a pydicom Dataset, DICOM file or folder whose study context is kept.

    Returns:
        The path written.

    Raises:
        InvalidInputError: an argument of the wrong type, an unknown format, a name the format cannot take, or
            voxels the format cannot store exactly.
        OutputExistsError: the output exists (without ``overwrite``), or is an input.
        OutputWriteError: the output cannot be written (permission, read-only or full disk, a missing folder);
            its ``errno`` says which.
        UnreadableFileError: the DICOM template cannot be read.
    """
    from .writers import save as _save

    return _save(volume, path, overwrite=overwrite, format=format, deidentify=deidentify,
                 series_description=series_description, template=template)
