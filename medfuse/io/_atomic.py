"""Atomic-write helpers: write beside the target, then ``os.replace``.

A crash or exception mid-write leaves either the old file (or nothing) or the
complete new file, never a partial one, and no temporary file behind. Other modules may import these.

Errors from the file system that the user can fix (permission denied, read-only file system, disk
full or over quota) become :class:`~medfuse.errors.OutputExistsError` naming the output, with a fix.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

from ..errors import MedfuseError, OutputExistsError

__all__ = ["check_output", "atomic_path", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "same_file",
           "input_files"]

PathLike = Union[str, os.PathLike]

_TMP_PREFIX = ".medfuse-tmp-"


def _stat(p: Path) -> Optional[os.stat_result]:
    try:
        return os.stat(p)
    except (OSError, ValueError):
        return None


def _resolved(p: PathLike) -> Path:
    try:
        return Path(p).resolve()
    except (OSError, RuntimeError):  # a symlink loop: compare the spelled path
        return Path(os.path.abspath(p))


def same_file(a: PathLike, b: PathLike) -> bool:
    """True when two paths name the same file or folder (or one is inside the other folder).

    Besides the resolved spelling (``./a/../a.nii.gz``, symlinks), existing paths are compared by
    device and inode, so another spelling of the same file is caught too: a hard link, or ``A.NII.GZ``
    for ``a.nii.gz`` on a case-insensitive file system (macOS, Windows).
    """
    pa, pb = _resolved(a), _resolved(b)
    if pa == pb or pb in pa.parents or pa in pb.parents:
        return True
    sb = _stat(pb)
    if sb is not None:  # a is b, or a lies inside b
        for q in (pa, *pa.parents):
            sq = _stat(q)
            if sq is not None and os.path.samestat(sq, sb):
                return True
    sa = _stat(pa)
    if sa is not None:  # b lies inside a
        for q in pb.parents:
            sq = _stat(q)
            if sq is not None and os.path.samestat(sq, sa):
                return True
    return False


def input_files(inputs: Iterable[Optional[PathLike]]) -> List[Path]:
    """The inputs plus the data file a MetaImage ``.mhd`` / NRRD ``.nhdr`` input's header names (one image)."""
    from ..provenance import _detached_data_file

    out: List[Path] = []
    for src in inputs:
        if not isinstance(src, (str, os.PathLike)) or not os.fspath(src):  # None, or an in-memory input
            continue
        p = Path(src)
        out.append(p)
        try:
            data = _detached_data_file(p) if p.is_file() else None
        except (OSError, ValueError):
            data = None
        if data is not None:
            out.append(data)
    return out


def check_output(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = (),
                 kind: Optional[str] = None) -> Path:
    """Refuse to write over an input, or over an existing path unless ``overwrite``; return the Path.

    ``kind`` (``"file"`` or ``"folder"``) also refuses, even with ``overwrite``, to replace a folder by a
    file or a file by a folder: that would delete something that is not an earlier output.

    Raises:
        OutputExistsError: the target exists (and ``overwrite`` is False), is one of ``inputs`` (or the
            data file of a ``.mhd``/``.nhdr`` input), or is of the other kind.
    """
    p = Path(path)
    for src in input_files(inputs):
        if same_file(p, src):
            raise OutputExistsError(
                "refusing to write onto the volume's own source file or folder (inputs are never modified)",
                fix="choose another output path", path=p)
    exists = p.exists() or p.is_symlink()
    if exists and not overwrite:
        raise OutputExistsError("the output exists", fix="choose another path, or pass overwrite=True to replace it", path=p)
    if exists and kind == "file" and p.is_dir() and not p.is_symlink():
        raise OutputExistsError("a folder is in the way of the output file (overwrite replaces files, never folders)",
                                fix="choose another output name, or move the folder away", path=p)
    if exists and kind == "folder" and not p.is_dir():
        raise OutputExistsError("a file is in the way of the output folder (overwrite replaces a folder, never a file)",
                                fix="choose another output name, or move the file away", path=p)
    if not p.parent.is_dir():
        raise OutputExistsError("the output's folder does not exist", fix="create the folder first", path=p.parent)
    return p


def _typed_os_error(e: BaseException, p: Path) -> Optional[MedfuseError]:
    """A user-fixable file-system error as an OutputExistsError naming the output, else None."""
    if not isinstance(e, OSError) or isinstance(e, MedfuseError):
        return None
    code = e.errno
    if code in (errno.EACCES, errno.EPERM):
        return OutputExistsError("cannot write the output there (permission denied); nothing was written",
                                 fix="choose a folder you can write to, or change its permissions", path=p)
    if code == errno.EROFS:
        return OutputExistsError("the output's file system is read-only; nothing was written",
                                 fix="choose a folder on a writable disk", path=p)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return OutputExistsError("the disk is full (or over quota, or the file too large); nothing was written "
                                 "and any earlier output was kept", fix="free some space, or choose another disk",
                                 path=p)
    return None


def _public_mode(path: PathLike, *, folder: bool = False, replacing: Optional[PathLike] = None) -> None:
    """mkstemp/mkdtemp create 0600/0700; give results the usual umask-based permissions, or, when they replace
    an existing output, that output's permissions (an output made private, say with ``chmod 600`` because it
    holds patient data, stays private when it is overwritten)."""
    if replacing is not None:
        try:
            st = os.stat(replacing)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) == folder:
            os.chmod(path, stat.S_IMODE(st.st_mode))
            return
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(path, (0o777 if folder else 0o666) & ~mask)


def _temp_suffix(name: str) -> str:
    """The target's suffix in lower case (``.nii.gz`` whole): writers (nibabel, ITK) choose the format and
    compression from the name and do not all recognise ``.NII.GZ`` or ``.MHA``; the final name keeps its case."""
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``.

    The temporary name keeps the full suffix (``.nii.gz``), in lower case, so that writers that choose
    a format from the name still work. An existing folder at ``path`` is never replaced.
    """
    p = check_output(path, overwrite=overwrite, inputs=inputs, kind="file")
    tmp: Optional[str] = None
    try:
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=_TMP_PREFIX, suffix=_temp_suffix(p.name))
        os.close(fd)
        yield Path(tmp)
        _public_mode(tmp, replacing=p)
        check_output(p, overwrite=overwrite, inputs=inputs, kind="file")  # appeared (or changed) while writing
        os.replace(tmp, p)
    except OSError as e:
        typed = _typed_os_error(e, p)
        if typed is None:
            raise
        raise typed from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            os.unlink(tmp)


def _is_dicom_file(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def refuse_foreign_folder(p: Path) -> None:
    """OutputExistsError when ``p`` is a folder ``overwrite`` may not replace (it holds more than a DICOM series)."""
    if p.is_dir() and not _replaceable_folder(p):
        raise OutputExistsError("the output folder holds files that are not a DICOM series (overwrite replaces only "
                                "a DICOM series folder)", fix="choose another output name, or empty the folder",
                                path=p)


def _replaceable_folder(p: Path) -> bool:
    """A folder ``overwrite`` may replace: empty, or only DICOM files (a series, such as medfuse writes).

    Anything else (sub-folders, documents, a NIfTI) may be the user's own and is never deleted.
    """
    try:
        entries = list(os.scandir(p))
    except OSError:
        return False
    for e in entries:
        if e.name.startswith("."):  # .DS_Store, Thumbs-like hidden files
            if e.is_dir(follow_symlinks=False):
                return False
            continue
        if not e.is_file(follow_symlinks=False) or not _is_dicom_file(Path(e.path)):
            return False
    return True


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = ()) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    With ``overwrite`` an existing folder is moved aside first and removed only after the
    new one is in place; if anything fails (or Ctrl-C) in between, it is put back. Only a folder
    holding nothing but DICOM files (a series) is replaced; a file, or a folder with other content,
    is refused (:class:`OutputExistsError`) and left alone.
    """
    p = check_output(path, overwrite=overwrite, inputs=inputs, kind="folder")
    refuse_foreign_folder(p)
    tmp: Optional[Path] = None
    old: Optional[Path] = None
    try:
        tmp = Path(tempfile.mkdtemp(dir=p.parent, prefix=_TMP_PREFIX))
        yield tmp
        _public_mode(tmp, folder=True, replacing=p)
        check_output(p, overwrite=overwrite, inputs=inputs, kind="folder")  # appeared while writing
        if p.exists() or p.is_symlink():
            if p.is_dir() and not _replaceable_folder(p):
                raise OutputExistsError("the output folder changed while writing and now holds other files",
                                        fix="choose another output name", path=p)
            old = Path(tempfile.mkdtemp(dir=p.parent, prefix=".medfuse-old-")) / "x"
            os.replace(p, old)
        os.replace(tmp, p)
    except BaseException as e:
        if old is not None and os.path.lexists(old) and not os.path.lexists(p):
            os.replace(old, p)  # the swap did not finish: the earlier output goes back in place
        typed = _typed_os_error(e, p)
        if typed is None:
            raise
        raise typed from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old.parent, ignore_errors=True)


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False,
                       inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Write bytes atomically; returns the Path."""
    with atomic_path(path, overwrite=overwrite, inputs=inputs) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = False,
                      inputs: Iterable[Optional[PathLike]] = ()) -> Path:
    """Write UTF-8 text atomically; returns the Path."""
    return atomic_write_bytes(path, text.encode("utf-8"), overwrite=overwrite, inputs=inputs)
