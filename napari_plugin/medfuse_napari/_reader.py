"""npe2 reader: narrow patterns, returns None for anything medfuse cannot read."""

from __future__ import annotations

from pathlib import Path

from ._layers import volume_to_layer

_SUFFIXES = (".nii", ".nii.gz", ".mha", ".mhd", ".nrrd", ".nhdr", ".dcm")


def napari_get_reader(path):
    """Return a reader for medical volumes, else ``None`` (never hijack other formats)."""
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None
        path = path[0]
    p = Path(str(path))
    if p.is_dir() or str(p).lower().endswith(_SUFFIXES):
        return _read
    return None


def _read(path):
    import medfuse
    from medfuse.errors import MedfuseError
    from napari.utils.notifications import show_error

    if isinstance(path, (list, tuple)):
        path = path[0]
    try:
        volume = medfuse.load(path)
    except MedfuseError as exc:  # a notification, never a traceback dialog
        show_error(exc.one_line())
        return [(None,)]
    return [volume_to_layer(volume, name=Path(str(path)).name)]
