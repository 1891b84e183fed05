"""Small argument checks and slab-wise array scans shared by the loaders, writers, provenance and fusion.

Private: the public functions call these so that a wrong argument gets one wording everywhere, and a scan of a
whole volume never makes a volume-sized temporary.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Iterator, Optional

import numpy as np

from .errors import InvalidInputError


def describe(value: Any) -> str:
    """A wrong value described by its type (never its contents: a path or a header may identify a patient)."""
    from .volume import Volume

    if value is None:
        return "None"
    if isinstance(value, Volume):
        return "a medfuse Volume"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"a {type(value).__name__} of shape {tuple(value.shape)}"
    return f"a {type(value).__name__}"


def _path_fix(value: Any, fix: Optional[str]) -> str:
    """How to mend a wrong path, for the mistakes seen in notebooks."""
    from .volume import Volume

    if isinstance(value, Volume):
        return "the volume is loaded already: pass it on as it is, or give the path of its file"
    if isinstance(value, (list, tuple, set)):
        return "pass one path at a time, e.g. [medfuse.load(p) for p in paths]"
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return "wrap voxels in medfuse.Volume(array, affine) instead; a path is a str or pathlib.Path"
    return fix or "pass the path as a str or pathlib.Path"


def as_path(value: Any, *, what: str = "path", fix: Optional[str] = None) -> Path:
    """``value`` as a Path, or a typed error saying what to pass.

    Why: ``Path(None)`` raises pathlib's bare TypeError, and ``Path("")`` is the working folder, which a reader
    would then search for DICOM files.

    Raises:
        InvalidInputError: not a str or os.PathLike naming a str, or an empty string.
    """
    try:
        text = os.fspath(value) if isinstance(value, (str, os.PathLike)) else None
    except TypeError:
        text = None
    if not isinstance(text, str):
        raise InvalidInputError(f"{what} must be a file path (or a folder's: a str or pathlib.Path), got "
                                f"{describe(value)}", fix=_path_fix(value, fix))
    if not text.strip():
        raise InvalidInputError(f"{what} is an empty string", fix="give the file or folder's path")
    return Path(text)


def slab_slices(x: np.ndarray, elements: int) -> Iterator[slice]:
    """Index ranges along the first axis of about ``elements`` values each (one slice for a 0-d array)."""
    step = max(1, elements // max(1, int(np.prod(x.shape[1:]))))
    for s in range(0, x.shape[0] if x.ndim else 1, step):
        yield slice(s, s + step)


def all_finite(x: np.ndarray, elements: int) -> bool:
    """Whether every value is finite, checked ``elements`` values at a time (no volume-sized boolean temporary)."""
    if not np.issubdtype(x.dtype, np.inexact):
        return True  # integers and booleans
    if x.ndim == 0:
        return bool(np.isfinite(x))
    return all(np.isfinite(x[s]).all() for s in slab_slices(x, elements))


def refuse_volumes(items: Any, *, takes: str) -> None:
    """Refuse Volumes among ``items`` where arrays are taken: NumPy reads a Volume's voxels, so the result would be a
    bare array with the grid and modality dropped unsaid.

    Raises:
        InvalidInputError: an item is a Volume (the fix names :func:`medfuse.fuse`).
    """
    from .volume import Volume

    if isinstance(items, (np.ndarray, str, bytes)) or not hasattr(items, "__iter__"):
        return
    for i, item in enumerate(items, start=1):
        if isinstance(item, Volume):
            raise InvalidInputError(f"input {i} is a Volume; {takes}",
                                    fix="fuse Volumes with medfuse.fuse(a, b, method=...), which normalises them by "
                                        "modality and keeps their grid, or pass their voxels (a.array, b.array)")
