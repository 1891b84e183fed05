"""npe2 reader: narrow patterns, returns None for anything medfuse cannot read."""

from __future__ import annotations

import os
import re
import sys
import threading

from pathlib import Path
from typing import List, Tuple

import numpy as np

from medfuse.io import IMAGE_SUFFIXES

from ._layers import display_grid, is_functional, volume_digest, volume_to_layer

_SUFFIXES = IMAGE_SUFFIXES + (".dcm",)  # medfuse.load's endings: .hdr/.img pairs opened in Python open here too
_PEEK_FILES = 20  # files inspected per folder to decide whether a folder is DICOM
_PEEK_DEPTH = 2  # sub-folder levels looked into (study/series/files)
_PEEK_DIRS = 20  # folders looked into at most

#: The napari ``open`` call being read (its path list, held so that its id is not reused by a later call) and the
#: DICOM series already read in it, as ``(folder, SeriesInstanceUID)``. napari hands a reader one path at a time
#: (``napari ct/*.dcm``, File > Open Files on a selection, a drop of several files), and each slice file opens its
#: whole series: 40 files of one CT gave 40 full copies. Per call, so a user's later open of the same series still
#: gives another layer.
_OPEN_CALL: dict = {"paths": None, "series": []}
_OPEN_LOCK = threading.Lock()


def napari_get_reader(path):
    """Return a reader for medical volumes, else ``None`` (never hijack other formats).

    A list of paths (napari's ``stack=True``, ``--stack``) is read when every path is one medfuse reads: one layer
    per series, not one per file (napari has no per-file layers to stack for DICOM slices of one series).
    """
    if isinstance(path, (list, tuple)):
        if len(path) > 1 and all(napari_get_reader(p) is not None for p in path):
            return _read_many
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if p.is_dir():
        return _read if _looks_like_dicom_folder(p) else None
    if str(p).lower().endswith(_SUFFIXES):
        return _read
    # Scanners and PACS exports name DICOM files without ".dcm" (IM0001, 1.3.12.2..., Siemens' .IMA): the
    # manifest offers those names, and the file's own DICM marker decides.
    if _has_dicom_marker(p):
        return _read
    return None


def _has_dicom_marker(f: Path) -> bool:
    """True when ``f`` is a file with ``DICM`` at byte 128 (the DICOM Part 10 preamble): medfuse's own test."""
    from medfuse.io.dicom import _has_dicom_preamble

    return _has_dicom_preamble(f)


def _looks_like_dicom_folder(folder: Path) -> bool:
    """True when a file near the top is DICOM (``DICM`` at byte 128, or a ``.dcm`` name).

    Looks at the first files of the folder, then of its first sub-folders, down to ``_PEEK_DEPTH`` levels: a
    study exported from a PACS nests its series (``study/series/IM0001``), and medfuse reads folders recursively.
    Why not accept every folder: that would steal zarr stores and image stacks from other readers.
    """
    todo = [(folder, 0)]
    visited = 0
    while todo and visited < _PEEK_DIRS:
        current, depth = todo.pop(0)
        visited += 1
        if current.name.lower().endswith((".zarr", ".n5")):
            continue
        try:
            entries = sorted(current.iterdir())[: 4 * _PEEK_FILES]
        except OSError:
            continue
        try:
            files = [f for f in entries if f.is_file()][:_PEEK_FILES]
            subdirs = [d for d in entries if d.is_dir() and not d.name.startswith(".")]
        except OSError:
            continue
        for f in files:
            if f.name.lower().endswith(".dcm") or _has_dicom_marker(f):
                return True
        if depth < _PEEK_DEPTH:
            todo.extend((d, depth + 1) for d in subdirs)
    return False


def layer_name(path) -> str:
    """The layer name for a file or folder: its name without a known image suffix.

    Why not ``split(".")[0]``: DICOM folders are often named by UID (``1.3.12...``) and ``pet.ac.nii.gz`` and
    ``pet.nac.nii.gz`` must stay apart; folders keep their whole name.
    """
    p = Path(str(path).rstrip("/\\"))
    name = p.name
    if not p.is_dir():
        for suffix in sorted(_SUFFIXES, key=len, reverse=True):  # .nii.gz before .nii
            if name.lower().endswith(suffix) and len(name) > len(suffix):
                return name[: -len(suffix)]
    return name or "volume"


def _read_many(paths) -> List[tuple]:
    """Read several paths as one open: the files of a series already read are skipped (see :data:`_OPEN_CALL`)."""
    call = [os.fspath(p) for p in paths]
    # The two files of an Analyze/NIfTI pair chosen together are one image: its .img is read through its .hdr.
    lowered = {os.path.normcase(p).lower() for p in call}
    reads = [p for p in call if not (p.lower().endswith(".img") and (p[:-4] + ".hdr").lower() in lowered)]
    layers = [layer for p in reads for layer in _read(p, call=call) if layer[0] is not None]
    return _stacked_for_reading(layers) or [(None,)]


def _read(path, *, call=None):
    """napari reader: the layers of every series under ``path``, errors as notifications.

    Args:
        path: a file or folder (or a one-item list of it).
        call: the path list of the open this read belongs to (default: napari's ``open`` call on the stack); a
            DICOM file of a series already read in it gives nothing (napari's ``[(None,)]``).
    """
    import warnings

    from medfuse.errors import MedfuseError, MedfuseWarning
    from napari.utils.notifications import show_error, show_warning

    if isinstance(path, (list, tuple)):
        path = path[0]
    call = call if call is not None else _open_call()
    if call is not None and _already_read(call, path):
        return [(None,)]  # napari's sentinel for "read, nothing to add": its series is open from this call already
    identifiers = _identifiers(path)
    error = None
    # medfuse's own warnings are shown here, cleaned, rather than by napari's hook (which quotes them raw).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            layers, problems = _layers_for(path, identifiers)
        except MedfuseError as exc:  # a notification, never a traceback dialog
            layers, problems, error = [(None,)], [], exc.one_line()  # napari's sentinel for "read, nothing to add"
    for w in caught:
        if issubclass(w.category, MedfuseWarning):
            show_warning(_clean(str(w.message), identifiers))
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    if error is not None:
        show_error(_clean(error, identifiers))
        return layers
    for problem in problems:  # a series that could not be read, beside others that could
        show_warning(_clean(problem, identifiers))
    for layer in layers:
        _blank_name(layer, identifiers)
    if call is not None:
        _remember_series(call, layers)
    _prehash_in_background(path)
    return layers


def _open_call():
    """The path list of the napari ``open`` call (``ViewerModel.open``) this read is part of, or None.

    Why the call stack: napari passes a reader one path and nothing about the others of the same open, and a
    reader has no other way to tell one open of 40 slice files from 40 opens (napari 0.9.2: ``paths_`` local).
    """
    frame = sys._getframe(1)
    try:
        while frame is not None:
            if frame.f_code.co_name == "open" and "paths_" in frame.f_code.co_varnames:
                owner = frame.f_locals.get("self")
                paths = frame.f_locals.get("paths_")
                if type(owner).__module__.startswith("napari") and isinstance(paths, list):
                    return paths if len(paths) > 1 else None
            frame = frame.f_back
        return None
    finally:
        del frame  # no reference cycle through this frame


def _series_uid(path) -> str:
    """The series of a DICOM file as ``UID#SeriesNumber`` ("" when it has no UID or is no DICOM file). Header
    only: ~1 ms. The number is part of it: medfuse reads one UID under several numbers as several series."""
    try:
        import pydicom

        ds = pydicom.dcmread(str(path), stop_before_pixels=True, specific_tags=[(0x0020, 0x000E), (0x0020, 0x0011)],
                             force=True)
        uid = str(getattr(ds, "SeriesInstanceUID", "") or "")
        return _series_key(uid, _number_text(getattr(ds, "SeriesNumber", ""))) if uid else ""
    except Exception:  # noqa: BLE001 - unreadable: it is read (and its error shown) as before
        return ""


def _number_text(value) -> str:
    """SeriesNumber as medfuse's DICOM reader compares it ("05" and "5" alike, "" when absent)."""
    from medfuse.io.dicom import series_number_text

    return series_number_text(value)


def _series_key(uid: str, number: str) -> str:
    return f"{uid}#{number}"


def _same_series(a: str, b: str) -> bool:
    """Whether two ``UID#number`` keys name one series as medfuse reads it: one UID, and one number or a file
    without one (medfuse keeps files without a SeriesNumber with the numbered ones)."""
    (ua, _, na), (ub, _, nb) = a.rpartition("#"), b.rpartition("#")
    return ua == ub and (na == nb or not na or not nb)


def _already_read(call: list, path) -> bool:
    """Whether ``path`` is a DICOM file of a series an earlier path of the same open call gave layers for."""
    with _OPEN_LOCK:
        if _OPEN_CALL["paths"] is not call:
            _OPEN_CALL["paths"], _OPEN_CALL["series"] = call, []
            return False
        series = list(_OPEN_CALL["series"])
    if not series or not _is_dicom_file(path):
        return False
    key = _series_uid(path)
    here = os.path.dirname(os.path.realpath(str(path)))
    return bool(key) and any(_same_series(key, s_key) and (here == folder or here.startswith(folder + os.sep))
                             for folder, s_key in series)


def _remember_series(call: list, layers: List[tuple]) -> None:
    """Note the DICOM series (folder, UID) of ``layers`` as read in the open call ``call``."""
    found = []
    for layer in layers:
        if len(layer) < 2 or not isinstance(layer[1], dict):
            continue
        prov = layer[1].get("metadata", {}).get("medfuse", {}).get("provenance", {}) or {}
        source, uid = prov.get("source"), prov.get("series_uid")
        if uid and source and Path(str(source)).is_dir():  # a folder: a file shown alone covers no other file
            found.append((os.path.realpath(str(source)),
                          _series_key(str(uid), _number_text(prov.get("series_number", "")))))
    with _OPEN_LOCK:
        if _OPEN_CALL["paths"] is call:
            _OPEN_CALL["series"].extend(found)


def _prehash_in_background(path) -> None:
    """Hash the file or series just read in a daemon thread: napari calls readers on the GUI thread, and saving a
    layer made from it would otherwise hash a large series there (see :func:`._writer.prehash_inputs`)."""
    import threading

    from ._writer import prehash_inputs

    threading.Thread(target=prehash_inputs, args=([path],), name="medfuse-prehash", daemon=True).start()


def _identifiers(path) -> List[str]:
    """The patient name/ID/birth date of a DICOM input (nothing for other files), to blank from what is shown.

    Why: a PACS export folder is often named after the patient (``MRN998877_DOE``); the CLI blanks its messages
    the same way (``_scrubbed`` in medfuse/cli.py).
    """
    try:
        from medfuse.provenance import patient_identifiers

        return patient_identifiers([path])
    except Exception:  # noqa: BLE001 - reading must go on; the worst case is an unblanked message
        return []


def _clean(message: str, identifiers: List[str]) -> str:
    """A reader message for a notification: identifiers blanked, Python advice in napari terms."""
    from medfuse.provenance import scrub

    from ._jobs import napari_words

    return napari_words(scrub(message, identifiers))


def _blank_name(layer: tuple, identifiers: List[str]) -> None:
    """Rename a layer whose name (from a folder or file name) holds an identifier: modality + series description.

    The description is free text too: used only when it holds no identifier, else just "series".
    """
    from medfuse.provenance import scrub

    if len(layer) < 2 or not isinstance(layer[1], dict) or not identifiers:
        return
    name = str(layer[1].get("name", ""))
    if scrub(name, identifiers) == name:
        return
    md = layer[1].get("metadata", {}).get("medfuse", {})
    desc = " ".join(str(md.get("provenance", {}).get("series_description", "") or "").split())
    if not desc or scrub(desc, identifiers) != desc:
        desc = "series"
    suffix = re.search(r" \[\d+\]$", name)  # a volume number of a 4-D series on several grids
    layer[1]["name"] = " ".join(p for p in (str(md.get("modality") or ""), desc) if p) + (suffix.group() if suffix
                                                                                          else "")


def _layers_for(path, identifiers=()) -> Tuple[List[tuple], List[str]]:
    """Layer data for every series under ``path`` (each 4-D series as one layer), and the series' problems.

    Why not ``medfuse.load``: in napari a 4-D series or a study folder of several series is opened whole
    (the API asks the caller to choose with ``volume_index`` or ``series_uid``, which napari cannot pass).

    Args:
        path: a file or folder.
        identifiers: the input's patient identifiers (:func:`_identifiers`): a folder name or series description
            holding one is left out of a study folder's layer names.
    """
    import medfuse
    from medfuse.errors import MedfuseError, MultipleSeriesError

    name = layer_name(path)
    if _is_dicom_file(path):
        return _slice_file_layers(path)
    try:
        return _series_layers(medfuse.load_volumes(path), name), []
    except MultipleSeriesError:
        if not Path(str(path)).is_dir():
            raise
    problems: List[str] = []
    series = medfuse.scan(path)
    read = []  # (label, volumes, list number) of each series read
    for i, s in enumerate(series, start=1):
        rel = os.path.relpath(s.folder, path) if s.folder else "."
        try:
            # A series alone in its sub-folder (study/series/files) is read from there: one header pass, not all.
            volumes = medfuse.load_volumes(s.folder or path, series_uid=s.series_uid)
        except MedfuseError as exc:
            label = _series_label(name, s.modality, rel, "", s.description, identifiers)
            listed = f" #{i}" if rel == "." else ""  # its number as `medfuse info` lists it
            problems.append(f"{label}{listed}: {exc.one_line()}")
            continue
        prov = volumes[0].provenance
        description = prov.get("series_description", s.description)
        read.append(([_series_label(name, s.modality, rel, number, description, identifiers)
                      for number in ("", prov.get("series_number", ""))], volumes, i))
    if not read:
        from medfuse.errors import UnsupportedDataError

        raise UnsupportedDataError(f"none of the {len(series)} series could be read ({'; '.join(problems)})",
                                   fix="re-export the study, or open one series folder at a time", path=path)
    labels = _distinct_labels([(short, numbered) for (short, numbered), _, _ in read])
    layers: List[tuple] = []
    for label, (_, volumes, i) in zip(labels, read):
        # Two series alike in all the name shows (one number and description, no sub-folders) get their number
        # in the list, as `medfuse info` lists them.
        layers.extend(_series_layers(volumes, label if labels.count(label) == 1 else f"{label} #{i}"))
    return _stacked_for_reading(layers), problems


def _distinct_labels(labels: List[Tuple[str, str]]) -> List[str]:
    """Each series' name without its SeriesNumber where that alone names it in the folder, with it otherwise.

    Why: scanners number series in the millions (``series 1093950``), which made every name long in a dock a few
    hundred pixels wide, while the modality, sub-folder and description mostly tell the series apart already.

    Args:
        labels: ``(without number, with number)`` for each series read.
    """
    shorts = [short for short, _ in labels]
    return [short if shorts.count(short) == 1 else numbered for short, numbered in labels]


def _series_label(folder: str, modality: str, rel: str, number, description, identifiers) -> str:
    """A study folder's layer name for one series: ``folder modality [sub-folder] [series N] [description]``
    (``number`` empty for the name without ``series N``: see :func:`_distinct_labels`).

    What tells series apart on a scanner console or PACS (SeriesNumber, SeriesDescription), so that six MR series
    of one flat export are not ``MR #1`` to ``MR #6``. Free text holding a patient identifier (a folder named
    after the patient, a description naming them) is left out, not blanked: the rest still names the series.
    """
    from medfuse.provenance import scrub

    def safe(text) -> str:
        text = " ".join("".join(c for c in str(text or "") if c.isprintable()).split())
        return text if not identifiers or scrub(text, identifiers) == text else ""

    number = str(number or "").strip()
    parts = (safe(folder), modality, safe(rel) if rel != "." else "", f"series {number}" if number else "",
             safe(description))
    return " ".join(p for p in parts if p) or "series"


def _stacked_for_reading(layers: List[tuple]) -> List[tuple]:
    """Several series opened at once, ordered and shown as a fused reading starts: PET/SPECT or a dose over CT/MR.

    napari adds a reader's layers bottom up and draws an image at full opacity over those below, so a PET/MR study
    whose ``pet`` folder sorts before ``t1`` showed no PET at all, under two opaque MR layers. Anatomical layers
    go first, functional ones last (on top, additive); only the first of each kind is shown, the others are in the
    layer list hidden (an opaque second MR would hide the first, two additive PETs would add up). The order among
    layers of one kind is kept. Label maps go on top of all (semi-transparent: a segmentation opened with its T1
    sorted first, under the opaque T1, and was hidden).
    """
    def kind(layer: tuple):
        """True for a functional image layer, False for another image layer, None for anything else."""
        if len(layer) < 3 or layer[2] != "image" or not isinstance(layer[1], dict):
            return None
        return is_functional(layer[1].get("metadata", {}).get("medfuse", {}))

    def rank(layer: tuple) -> int:
        return 2 if len(layer) > 2 and layer[2] == "labels" else int(kind(layer) is True)

    ordered = sorted(layers, key=rank)  # stable: the order within each kind is kept
    if sum(kind(l) is not None for l in layers) < 2:
        return ordered
    shown = set()
    for layer in ordered:
        if kind(layer) is not None:
            if kind(layer) in shown:
                layer[1]["visible"] = False
            shown.add(kind(layer))
    return ordered


def _is_dicom_file(path) -> bool:
    """A file the DICOM reader takes (not a NIfTI/MetaImage/NRRD image)."""
    from medfuse.io import is_image_file

    return Path(str(path)).is_file() and not is_image_file(path)


def _slice_file_layers(path) -> Tuple[List[tuple], List[str]]:
    """A DICOM file opens its whole series: a user who drops one slice of a classic series wants the volume.

    The layer is named after the folder the series was read from. When the series cannot be read (a gap, a
    damaged neighbour), the file alone is shown, with the reason as a warning.
    """
    import medfuse
    from medfuse.errors import MedfuseError

    try:
        volumes = medfuse.load_volumes(path, whole_series=True)
    except MedfuseError as exc:
        import warnings

        from medfuse.errors import MedfuseWarning

        with warnings.catch_warnings():  # "loaded alone; pass the folder": the series was tried, said below
            warnings.filterwarnings("ignore", message=".*loaded alone", category=MedfuseWarning)
            volumes = medfuse.load_volumes(path)  # errors about the file itself are raised here
        return _series_layers(volumes, layer_name(path)), [
            f"{layer_name(path)}: only this file is shown; its series could not be read: {exc.one_line()}"]
    source = Path(str(volumes[0].provenance.get("source", path)))
    return _series_layers(volumes, layer_name(source if source.is_dir() else path)), []


def _series_layers(volumes, name: str) -> List[tuple]:
    """One layer for a 3-D series; one 4-D layer (volume, S, P, L) for a 4-D series on one grid.

    A 4-D series whose volumes lie on different grids gives one 3-D layer per volume.
    """
    overlay = is_functional(volumes[0])
    first = volume_to_layer(volumes[0], name=name, overlay=overlay)
    if len(volumes) == 1:
        return [first]
    # Display defaults from the first volume; the others only need their grid (no percentiles per volume).
    grids = [display_grid(v) for v in volumes[1:]]
    same_grid = all(a.shape == first[0].shape and np.allclose(scale, first[1]["scale"])
                    and np.allclose(translate, first[1]["translate"]) for a, scale, translate, _ in grids)
    if not same_grid:
        width = len(str(len(volumes)))
        return [volume_to_layer(v, name=f"{name} [{n:0{width}d}]", overlay=overlay) for n, v in enumerate(volumes)]
    kwargs = dict(first[1])
    kwargs["scale"] = (1.0, *kwargs["scale"])
    kwargs["translate"] = (0.0, *kwargs["translate"])
    arrays = [first[0], *(a for a, _, _, _ in grids)]
    md = dict(kwargs["metadata"]["medfuse"])
    md["n_volumes"] = len(volumes)
    # The layer holds every volume: volume 0's index in its provenance was copied by Split Stack into every part
    # and saved as such. Each volume's digest lets the writer tell which volume a part is.
    md["provenance"] = {k: v for k, v in dict(md.get("provenance") or {}).items() if k != "volume_index"}
    md["volume_digests"] = [volume_digest(a) for a in arrays]
    kwargs["metadata"] = {"medfuse": md}
    _warn_unlike_ranges(arrays, name)
    stacked = np.stack(arrays)
    # Labels only while every volume holds integers (napari's Labels refuse floats).
    return [(stacked, kwargs, first[2] if stacked.dtype.kind in "iu" else "image")]


#: Volumes of one 4-D layer whose largest magnitudes differ by this factor or more cannot share contrast limits.
_RANGE_RATIO = 100.0


def _warn_unlike_ranges(arrays: List[np.ndarray], name: str) -> None:
    """Warn when a 4-D layer's volumes differ in scale by orders of magnitude (a Philips B0 field map in Hz beside
    magnitude images): napari has one set of contrast limits per layer, volume 0's, and such a volume shows black.

    Why a warning, not other limits: no linear window shows 1e8 and 100 both; *Split Stack* gives each volume its
    own limits. A strided sample per volume (min/max): milliseconds even for hundreds of volumes.
    """
    import warnings

    from medfuse.errors import MedfuseWarning

    peaks = []
    for a in arrays:
        sample = np.asarray(a[::4, ::4, ::4], dtype=np.float64)
        sample = sample[np.isfinite(sample)]
        peaks.append(float(np.max(np.abs(sample))) if sample.size else 0.0)
    ref = peaks[0]
    unlike = [n for n, p in enumerate(peaks[1:], start=1)
              if p > 0 and ref > 0 and max(p / ref, ref / p) >= _RANGE_RATIO]
    if not unlike:
        return
    shown = ", ".join(f"volume {n} up to {peaks[n]:.3g}" for n in unlike[:3]) + (" ..." if len(unlike) > 3 else "")
    warnings.warn(f"{name}: its volumes' values differ by orders of magnitude (volume 0 up to {ref:.3g}; {shown}), "
                  "and napari shows every volume with volume 0's contrast limits, so those look blank. Fix: "
                  "right-click the layer › Split Stack (each volume gets its own limits), or set the contrast "
                  "limits while that volume is shown", MedfuseWarning, stacklevel=2)
