"""Readers and writers. ``load`` dispatches on what the path is.

* ``.nii``/``.nii.gz``/``.mha``/``.mhd``/``.nrrd``/``.nhdr`` files -> :mod:`medfuse.io.nifti`
* a folder, or any other single file -> DICOM (:mod:`medfuse.io.dicom`)
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Union

from ..errors import UnreadableFileError
from ..volume import Volume

PathLike = Union[str, os.PathLike]

#: File name endings read by the NIfTI/ITK-image reader.
IMAGE_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".img", ".hdr")


def is_image_file(path: PathLike) -> bool:
    name = os.fspath(path).lower()
    return name.endswith(IMAGE_SUFFIXES)


def check_readable(path: PathLike) -> None:
    """Refuse a file or folder this user may not read (a folder: list and enter), saying so.

    Why here: the readers would otherwise report it as a damaged file ("not a valid NIfTI", advising a re-export)
    or as a folder with no images.

    Raises:
        UnreadableFileError: permission denied.
    """
    p = Path(path)
    folder = p.is_dir()
    if not os.access(p, os.R_OK | (os.X_OK if folder else 0)):
        raise UnreadableFileError(f"permission denied: this user may not read the {'folder' if folder else 'file'}",
                                  fix="change its permissions (chmod u+r" + (", u+x" if folder else "")
                                  + ") or run medfuse as a user who may read it", path=p)


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise UnreadableFileError("no such file or folder", fix="check the path", path=path)
    check_readable(path)


def _absolute_source(vol: Volume) -> Volume:
    """Record the source as an absolute path: ``save`` refuses to write onto it, and a relative one would
    name another file once the working folder changes (``os.chdir``, a notebook's ``%cd``)."""
    src = vol.provenance.get("source")
    if isinstance(src, (str, os.PathLike)) and not os.path.isabs(src):
        vol.provenance["source"] = os.path.abspath(src)
    return vol


def load(path: PathLike, *, series_uid: Optional[str] = None, volume_index: Optional[int] = None,
         modality: Optional[str] = None, unit: Optional[str] = None, suv: str = "auto",
         whole_series: bool = False) -> Volume:
    """Load one 3-D volume from a NIfTI/MetaImage/NRRD file, a DICOM file or a DICOM folder.

    A DICOM file is read on its own (one slice of a classic series gives a one-slice volume) unless
    ``whole_series=True``.

    Args:
        path: file or folder.
        series_uid: which DICOM series to read when a folder holds several: its SeriesInstanceUID, or its
            number as :func:`scan` lists it (1-based, e.g. ``"2"``), or a modality that only one series there has
            (``"PT"``, ``"CT"``).
        volume_index: which volume of a 4-D series to return (0-based).
        modality: override the modality (NIfTI carries none; default ``unknown`` or guessed).
        unit: override the unit.
        suv: PET only: ``"auto"`` (default: SUVbw, or the SUV kind a GML series already holds),
            ``"bw"``, ``"lbm"``, ``"lbm_janma"``, ``"bsa"``, or ``"none"`` for the stored unit (Bq/mL).
        whole_series: DICOM only: when ``path`` is one file of a series, load the whole series it belongs to:
            the files in the same folder (not its sub-folders) with the same SeriesInstanceUID (the other slices
            of a classic series; the other volumes of a multi-frame series stored one file per volume); other
            series there are ignored. Folders are whole already. The volume's recorded source is then the
            folder. Without it, a file that is one of several of its series loads alone, with a warning.

    Raises:
        UnreadableFileError, UnsupportedDataError, MultipleSeriesError, GeometryError, InvalidInputError
    """
    p = Path(path)
    _check_exists(p)
    if p.is_file() and is_image_file(p):
        from ..errors import InvalidInputError
        from .nifti import load_image

        if series_uid is not None:
            raise InvalidInputError("a series was chosen, but this file holds one image (series are picked in DICOM "
                                    "folders)", fix="leave the series choice out for this input ('-')", path=p)

        return _absolute_source(load_image(p, modality=modality, unit=unit, volume_index=volume_index))
    from .dicom import load_dicom

    vol = load_dicom(p, series_uid=series_uid, volume_index=volume_index, suv=suv, whole_series=whole_series)
    if modality is not None or unit is not None:
        vol = vol.with_array(vol.array, **{k: v for k, v in (("modality", modality), ("unit", unit)) if v is not None})
    return _absolute_source(vol)


def load_volumes(path: PathLike, *, series_uid: Optional[str] = None, suv: str = "auto",
                 whole_series: bool = False) -> List[Volume]:
    """Load every volume of a (possibly 4-D) series as a list of 3-D volumes (``whole_series``: see :func:`load`)."""
    p = Path(path)
    _check_exists(p)
    if p.is_file() and is_image_file(p):
        from .nifti import load_image_volumes

        return [_absolute_source(v) for v in load_image_volumes(p)]
    from .dicom import load_dicom_volumes

    return [_absolute_source(v) for v in load_dicom_volumes(p, series_uid=series_uid, suv=suv,
                                                            whole_series=whole_series)]


def scan(folder: PathLike):
    """List the DICOM series in a folder (recursively) without reading pixels.

    Returns a list of :class:`medfuse.io.dicom.SeriesInfo`.
    """
    p = Path(folder)
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

    Raises:
        InvalidInputError: not a folder, or nothing (or more than one series) matches; the message lists the
            series by number and modality (no UIDs or descriptions, which may identify the patient).
    """
    from ..errors import InvalidInputError
    from .dicom import resolve_series_choice

    if selector is None or str(selector).strip() in ("", "-"):
        return None
    p = Path(path)
    if not p.is_dir():
        raise InvalidInputError("a series can be picked in a DICOM folder only; this is a file",
                                fix="leave the series choice out for this input ('-')", path=p)
    series = scan(p)
    entries = [(s.series_uid, s.modality, f"{s.modality or '?'} {'x'.join(map(str, s.shape))}, {s.n_files} files")
               for s in series]
    key = str(selector).strip()
    uid = resolve_series_choice(key, entries, p) or key
    if uid not in {s.series_uid for s in series}:
        raise InvalidInputError(f"no series in this folder matches the choice given: it is not one of the {len(series)} series "
                                f"({'; '.join(f'{i}: {e[2]}' for i, e in enumerate(entries, start=1))})",
                                fix="give the series' number as listed, its modality, or its SeriesInstanceUID",
                                path=p)
    return uid


def series_choice_record(selector: Optional[str]) -> Optional[str]:
    """``selector`` as provenance records it: numbers and modalities as given, a UID as ``"uid"`` (UIDs trace
    back to the study, and sidecars hold no identifiers)."""
    from ..volume import _MODALITY_ALIASES

    if selector is None:
        return None
    key = str(selector).strip()
    return key if key in ("", "-") or key.isdigit() or key.upper() in _MODALITY_ALIASES else "uid"


def save(volume: Volume, path: PathLike, *, overwrite: bool = False, **kwargs) -> Path:
    """Write a volume: NIfTI (``.nii``/``.nii.gz``), MetaImage (``.mha``/``.mhd``), NRRD, or a
    DICOM series (a path without one of those endings, or ``format="dicom"``). Atomic; refuses to
    overwrite unless ``overwrite=True``."""
    from .writers import save as _save

    return _save(volume, path, overwrite=overwrite, **kwargs)
