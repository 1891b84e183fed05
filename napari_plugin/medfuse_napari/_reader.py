"""npe2 reader: narrow patterns, returns None for anything medfuse cannot read."""

from __future__ import annotations

from pathlib import Path

from ._layers import FUNCTIONAL, volume_to_layer

_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")
_PEEK_FILES = 20  # files inspected to decide whether a folder is DICOM


def napari_get_reader(path):
    """Return a reader for medical volumes, else ``None`` (never hijack other formats)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if p.is_dir():
        return _read if _looks_like_dicom_folder(p) else None
    if str(p).lower().endswith(_SUFFIXES):
        return _read
    return None


def _looks_like_dicom_folder(folder: Path) -> bool:
    """True when one of the first files is DICOM (``DICM`` at byte 128, or a ``.dcm`` name).

    Why: accepting every folder would steal zarr stores and image stacks from other readers.
    """
    if folder.name.lower().endswith((".zarr", ".n5")):
        return False
    try:
        files = [f for f in sorted(folder.iterdir())[: 4 * _PEEK_FILES] if f.is_file()][:_PEEK_FILES]
    except OSError:
        return False
    for f in files:
        if f.name.lower().endswith(".dcm"):
            return True
        try:
            with open(f, "rb") as fh:
                head = fh.read(132)
        except OSError:
            continue
        if head[128:132] == b"DICM":
            return True
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


def _read(path):
    import medfuse
    from medfuse.errors import MedfuseError
    from napari.utils.notifications import show_error

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        volume = medfuse.load(path)
        layer = volume_to_layer(volume, name=layer_name(path), overlay=volume.modality in FUNCTIONAL)
    except MedfuseError as exc:  # a notification, never a traceback dialog
        show_error(exc.one_line())
        return [(None,)]  # napari's sentinel for "read, nothing to add"
    return [layer]
