"""Atomic-write helpers: write beside the target, then ``os.replace``.

A crash or exception mid-write leaves either the old file (or nothing) or the
complete new file, never a partial one. Other modules may import these.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, Optional, Union

from ..errors import OutputExistsError

__all__ = ["check_output", "atomic_path", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "same_file"]

PathLike = Union[str, os.PathLike]


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when two paths name the same file or folder (or one is inside the other folder)."""
    try:
        pa, pb = Path(a).resolve(), Path(b).resolve()
    except OSError:
        return False
    return pa == pb or pb in pa.parents or pa in pb.parents


def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Refuse to write over an input, or over an existing path unless ``overwrite``; return the Path.

    Raises:
        OutputExistsError: the target exists (and ``overwrite`` is False) or is one of ``inputs``.
    """
    p = Path(path)
    for src in inputs:
        if src and same_file(p, src):
            raise OutputExistsError(
                "refusing to write onto the volume's own source file or folder (inputs are never modified)",
                fix="choose another output path", path=p)
    if (p.exists() or p.is_symlink()) and not overwrite:
        raise OutputExistsError("the output exists", fix="choose another path, or pass overwrite=True to replace it", path=p)
    if not p.parent.is_dir():
        raise OutputExistsError("the output's folder does not exist", fix="create the folder first", path=p.parent)
    return p


def _public_mode(path: PathLike, *, folder: bool = False) -> None:
    """mkstemp/mkdtemp create 0600/0700; give results the usual umask-based permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``.

    The temporary name keeps the full suffix (``.nii.gz``) so that writers that choose a
    format from the name still work.
    """
    p = check_output(path, overwrite=overwrite, inputs=inputs)
    name = p.name
    suffix = "".join(Path(name).suffixes[-2:]) if name.lower().endswith(".nii.gz") else p.suffix
    fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=".medfuse-tmp-", suffix=suffix)
    os.close(fd)
    try:
        yield Path(tmp)
        _public_mode(tmp)
        if p.exists() and not overwrite:  # appeared while we were writing
            raise OutputExistsError("the output appeared while writing", fix="choose another path", path=p)
        os.replace(tmp, p)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    With ``overwrite`` an existing folder is moved aside first and removed only after the
    new one is in place.
    """
    p = check_output(path, overwrite=overwrite, inputs=inputs)
    tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=".medfuse-tmp-"))
    old: Optional[Path] = None
    try:
        yield tmp
        _public_mode(tmp, folder=True)
        if p.exists() or p.is_symlink():
            if not overwrite:
                raise OutputExistsError("the output appeared while writing", fix="choose another path", path=p)
            old = Path(tempfile.mkdtemp(dir=p.parent, prefix=".medfuse-old-")) / "x"
            os.replace(p, old)
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False) -> Path:
    """Write bytes atomically; returns the Path."""
    with atomic_path(path, overwrite=overwrite) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = False) -> Path:
    """Write UTF-8 text atomically; returns the Path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite)
