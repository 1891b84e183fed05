"""Atomic-write helpers: write beside the target, then move it into place in one step.

A crash or exception mid-write leaves either the old file (or nothing) or the
complete new file, never a partial one, and no temporary file behind. Other modules may import these.

Without ``overwrite`` the move never replaces anything, even a file that appears at the target after the last
check (another process's output): files are hard-linked into place (``os.link`` fails when the name exists),
folders are renamed onto a folder this process has just created empty (``os.mkdir`` fails when the name exists).

An overwrite that is killed (SIGKILL, power loss) mid-swap can leave the earlier output aside, in a
``.medfuse-old-<key>-*`` folder beside the target; the next write to that target puts it back or, when the swap
had finished, removes it (see :func:`recover_leftovers`).

Temporary files and folders are named after their target and their writer,
``.medfuse-tmp-<key>-<owner>-<pid>-<random><suffix>`` (``<key>``: a hash of the target's name; ``<owner>``: a hash
of the machine, its boot and the process namespace; ``<pid>``: the writing process). A kill leaves one behind; the
next write to the same target removes it once it is provably stale: written on this machine since its last boot by
a process that has ended, or, from another machine or boot (whose processes cannot be checked), untouched for a day.
A live writer's temporary file (another process writing the same target right now) is never touched. In a folder
so deep that this name would make the temporary's path too long, the shorter ``.medfuse-tmp-<key>-<random><suffix>``
is used; its writer cannot be checked, so it is removed as another machine's is, once untouched for a day.

Data reaches the disk before its name does: each finished file (and a folder's files) is flushed with
``fsync`` before the move, and the folder after it, so that a power cut cannot leave an output empty under its
final name (nor the earlier output lost to an empty replacement). ``MEDFUSE_FSYNC=0`` turns this off (a scratch
disk, many small writes on a slow network file system).

Errors from the file system that the user can fix (permission denied, read-only file system, disk
full or over quota, a name too long, a missing folder) become :class:`~medfuse.errors.OutputWriteError` naming the
output, with a fix and the cause's ``errno``; :class:`~medfuse.errors.OutputExistsError` is kept for something in
the output's way (an existing output, a case twin, a file or folder of the other kind, leftovers that block).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import socket
import stat
import tempfile
import time
import unicodedata
import warnings
from pathlib import Path
from typing import Iterable, Iterator, List, Optional, Union

from ..errors import InvalidInputError, MedfuseError, MedfuseWarning, OutputExistsError, OutputWriteError

__all__ = ["check_output", "atomic_path", "atomic_dir", "atomic_write_bytes", "atomic_write_text", "same_file",
           "input_files", "leftovers", "recover_leftovers", "stale_temporaries", "make_folder", "folder_error"]

PathLike = Union[str, os.PathLike]

_TMP_PREFIX = ".medfuse-tmp-"
_OLD_PREFIX = ".medfuse-old-"
#: A temporary's name (see :func:`_temp_prefix`): target key, owner key, process id, mkstemp's random part, suffix.
_TMP_NAME = re.compile(r"\.medfuse-tmp-([0-9a-f]{12})-([0-9a-f]{8})-([0-9]{1,10})-[a-z0-9_]{1,32}(\.[a-z0-9.]{1,16})?")
#: The shorter name used where the usual one would make the temporary's path too long (a deep folder): target key
#: and mkstemp's random part only. Its writer cannot be checked, so it is removed as another machine's is.
_SHORT_TMP_NAME = re.compile(r"\.medfuse-tmp-([0-9a-f]{12})-[a-z0-9_]{1,32}(\.[a-z0-9.]{1,16})?")
#: A temporary of another machine or boot is removed only after this long untouched (its writer cannot be checked).
_FOREIGN_STALE_S = 24 * 3600
#: What ``os.link`` says on a file system without hard links (FAT, exFAT, some network shares).
_NO_HARD_LINKS = {errno.EPERM, errno.EMLINK, errno.ENOSYS, getattr(errno, "ENOTSUP", -1),
                  getattr(errno, "EOPNOTSUPP", -1)}
#: Windows' codes for the same (``CreateHardLink`` on exFAT or FAT32, a USB stick: ERROR_INVALID_FUNCTION; on some
#: shares: ERROR_NOT_SUPPORTED). Python reports both as errno EINVAL, which is no reason to fall back on POSIX.
_NO_HARD_LINKS_WINERROR = {1, 50}
#: Windows' code for a path over its 260-character limit (ERROR_FILENAME_EXCED_RANGE; errno ENOENT).
_TOO_LONG_WINERROR = 206
#: Windows' codes for a file another program holds open (ERROR_ACCESS_DENIED, ERROR_SHARING_VIOLATION): Windows
#: cannot replace or delete it, e.g. a report open in Excel (errno EACCES, read as "permission denied" before).
_IN_USE_WINERROR = {5, 32}


@contextlib.contextmanager
def folder_lock(folder: PathLike) -> Iterator[None]:
    """Hold an exclusive OS lock on ``folder`` (``flock`` on the folder itself: no lock file beside the outputs)
    for the block, across processes and threads, waiting for another holder to finish.

    Why: an output and its provenance sidecar are two files, written one after the other. Two medfuse runs
    writing the same output at once each checked that it was free and wrote their sidecar; one rename won, and
    the sidecar left could describe the other run's image. Under the lock the second run finds the first's
    output (refused without ``overwrite``; replaced as a pair with it).

    Where the folder cannot be locked (Windows, which has no ``flock``; a file system without locks; a folder not
    yet made) the block runs unlocked, as before.
    """
    try:
        import fcntl
    except ImportError:  # Windows
        yield
        return
    try:
        fd = os.open(os.fspath(folder), os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:  # ENOLCK and the like: no locks on this file system
            pass
        yield
    finally:
        os.close(fd)  # releases the lock


def _no_hard_links(e: OSError) -> bool:
    """Whether ``os.link`` failed because the file system has no hard links (so the fallback is used)."""
    return e.errno in _NO_HARD_LINKS or getattr(e, "winerror", None) in _NO_HARD_LINKS_WINERROR


def _too_long(e: BaseException, p: Path) -> Optional[OutputWriteError]:
    """The typed error for a name or path too long for the file system (255 bytes a name on Linux and macOS, 260
    characters a path on Windows unless long paths are enabled), else None. On Windows an overwrite's copy of the
    earlier output (``.medfuse-old-*``) has a path about 35 characters longer than the output's."""
    if isinstance(e, OSError) and (e.errno == errno.ENAMETOOLONG or getattr(e, "winerror", None) == _TOO_LONG_WINERROR):
        return OutputWriteError(f"the output's name or path is too long for the file system ({len(p.name)} "
                                f"characters in the name, {len(os.path.abspath(p))} in the path); nothing was "
                                "written", errno=errno.ENAMETOOLONG,
                                fix="choose a shorter name, or a folder with a shorter path", path=p)
    return None


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
    if "\0" in os.fspath(a) or "\0" in os.fspath(b):  # no file has such a name (os calls raise ValueError)
        return False
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
                 kind: Optional[str] = None, recover: bool = True) -> Path:
    """Refuse to write over an input, or over an existing path unless ``overwrite``; return the Path.

    ``kind`` (``"file"`` or ``"folder"``) also refuses, even with ``overwrite``, to replace a folder by a
    file or a file by a folder: that would delete something that is not an earlier output.

    With ``recover`` (the default) what an interrupted earlier overwrite of ``path`` left beside it is
    resolved first (:func:`recover_leftovers`), so the checks see the earlier output back in place.

    A name that differs only in letter case from an existing entry beside it (``MR.NII.GZ`` beside ``mr.nii.gz``
    on a case-sensitive disk) counts as that entry, as on Windows and macOS: refused, even with ``overwrite``
    (replacing it would leave two files that clash there).

    So does a name that differs only in how its accents are stored (Unicode NFC or NFD: ``é`` as one character or
    as ``e`` plus an accent), one name on macOS and on most network shares.

    A named pipe, socket or device node at ``path`` is refused even with ``overwrite`` (``os.replace`` would
    swap the node itself for a regular file); a symbolic link there is replaced as a link, never its target. A link
    that loops or points to nothing is refused without ``overwrite`` (in words: it is neither "a file in the way"
    nor an earlier output), and for a folder output even with it.

    Raises:
        OutputExistsError: the target exists (and ``overwrite`` is False), is one of ``inputs`` (or the
            data file of a ``.mhd``/``.nhdr`` input), is of the other kind, is a pipe, socket or device node, is a
            link to nothing, or differs only in letter case or Unicode normalisation from an existing entry.
        OutputWriteError: its folder does not exist, is a file, or is a link to nothing.
        InvalidInputError: the path holds a null character, or is a Windows path (``C:\\out\\f.nii.gz``,
            ``sub\\f.nii.gz``) on a system whose folders are separated by ``/`` only.
    """
    p = Path(path)
    if "\0" in os.fspath(p):
        # Every os call would raise a bare ValueError ("embedded null byte"), some only after the image was written.
        raise InvalidInputError(f"the output path {_shown(os.fspath(p))!r} holds a null character (\\0), which no "
                                "file name can contain", fix="check how the path was built (a C string, a fixed-width "
                                "field or a file read in binary mode can leave a \\0 in it) and pass it without")
    if not os.path.lexists(p) and (windows_style(p.name) or (windows_style(p) and not os.path.isdir(p.parent))):
        # It was written as one file named "C:\out\f.nii.gz" (or "sub\f.nii.gz" beside the folder sub/).
        raise InvalidInputError("the output path looks like a Windows path (a backslash, or a drive letter such as "
                                "C:); on this system folders are separated by /, and a backslash is part of a name",
                                fix="write the path with / (e.g. out/f.nii.gz)", path=p)
    try:
        os.lstat(p)
    except (OSError, ValueError) as e:  # absent is fine; a name too long would fail every check below untyped
        if _too_long(e, p) is not None:
            raise _too_long(e, p) from None
    link = _broken_link(p.parent)
    if link is not None:  # said as "the output's folder is a file" before
        raise OutputWriteError(f"the output's folder is {link}", errno=errno.ELOOP if "loops" in link else
                               errno.ENOENT, fix="point the link at an existing folder, or choose another output "
                               "folder", path=p.parent)
    if os.path.lexists(p.parent) and not p.parent.is_dir():
        # A write error, not "exists": another name in the same folder would fail the same way.
        raise OutputWriteError("the output's folder is a file", errno=errno.ENOTDIR,
                               fix="choose an output path inside a folder", path=p.parent)
    if recover:
        recover_leftovers(p, overwrite=overwrite)
    for src in input_files(inputs):
        if same_file(p, src):
            raise OutputExistsError(
                "refusing to write onto an input, its own source file or folder (inputs are never modified)",
                fix="choose another output path", path=p)
    exists = p.exists() or p.is_symlink()
    special = _special_kind(p)
    if special is not None:
        # os.replace would swap the pipe or device node itself for a regular file, deleting it; a symbolic link
        # is not refused here: the link is replaced, never what it points to.
        raise OutputExistsError(f"{special} is at the output path, not a regular file; medfuse writes regular files "
                                "and never replaces a pipe, socket or device node (not even with overwrite)",
                                fix="choose another output name (medfuse cannot write its output into a pipe or "
                                    "device: write a file, then copy it there)", path=p)
    twin = None if exists else _case_twin(p)
    if twin is not None:
        # README: names that differ only in letter case count as one file on every system (they are one on
        # Windows and macOS): "MR.NII.GZ" beside "mr.nii.gz" is that file, so it is refused as that file would be.
        # So do names that differ only in how their accents are stored (NFC/NFD): one file on macOS and SMB shares.
        how = ("letter case" if case_key(twin.name) == case_key(p.name) else
               "how accents are stored (Unicode normalisation; the names look the same)"
               if _form_key(twin.name) == _form_key(p.name) else "letter case and how accents are stored")
        if any(same_file(twin, src) for src in input_files(inputs)):
            raise OutputExistsError(f"refusing to write beside the volume's own source under a name that differs "
                                    f"only in {how} ({_shown(twin.name)}: one file on macOS and Windows or network "
                                    "shares; inputs are never modified)", fix="choose another output path", path=p)
        raise OutputExistsError(f"the output exists as {_shown(twin.name)} (names that differ only in {how} are one "
                                "file on Windows and macOS, so medfuse counts them as one everywhere)",
                                fix="choose another name, or give the existing name exactly (with overwrite=True) "
                                    "to replace it", path=p)
    link = _broken_link(p) if exists else None
    if link is not None and (kind == "folder" or not overwrite):
        # Said as "a file is in the way" or "the output exists" before. A link is never written through: with
        # overwrite an output file replaces the link itself (its missing target is not created).
        raise OutputExistsError(f"the output path is {link}", fix="remove the link (rm), or choose another output "
                                "name" + ("" if kind == "folder" else "; overwrite=True replaces the link itself "
                                          "with the output (nothing is written where it points)"), path=p)
    # The kind mismatches first: "the output exists ... pass overwrite=True" sent the user to an option that is
    # then refused for them.
    if exists and kind == "file" and p.is_dir() and not p.is_symlink():
        raise OutputExistsError("a folder is in the way of the output file (overwrite replaces files, never folders)",
                                fix="choose another output name, or move the folder away", path=p)
    if exists and kind == "folder" and not p.is_dir():
        raise OutputExistsError("a file is in the way of the output folder (overwrite replaces a folder, never a file)",
                                fix="choose another output name, or move the file away", path=p)
    if exists and not overwrite:
        raise OutputExistsError("the output exists", fix="choose another path, or pass overwrite=True to replace it", path=p)
    if exists and _sticky_other_owner(p):
        # Found now, not after the work: replacing it needs a rename over it, which a sticky folder (/tmp, a
        # 1777 or 3775 shared folder) allows only its owner; the late error also blamed the folder.
        raise OutputWriteError("the output belongs to another user, in a folder where only a file's owner may "
                               "replace it (the folder's sticky bit)", errno=errno.EPERM,
                               fix="choose another output name, or ask its owner to remove it", path=p)
    if not p.parent.is_dir():
        hint = missing_hint(p.parent)
        raise OutputWriteError(f"the output's folder does not exist{hint}", errno=errno.ENOENT,
                               fix="correct the path as said, or create the folder" if hint else
                               "create the folder first", path=p.parent)
    return p


def _broken_link(p: Path) -> Optional[str]:
    """What the symbolic link ``p`` is, in words, when it names nothing (it loops, or points to nothing), else
    None (not a link, or a working one)."""
    if not os.path.islink(p):
        return None
    try:
        os.stat(p)
        return None
    except OSError as e:
        if e.errno == errno.ELOOP:
            return "a symbolic link that loops (it leads back to itself), so it names no file or folder"
        if e.errno not in (errno.ENOENT, errno.ENOTDIR):
            return None
    try:
        target = os.readlink(p)
    except OSError:
        return None
    return f"a symbolic link to {_shown(target)!r}, which does not exist"


def _sticky_other_owner(p: Path) -> bool:
    """Whether ``p``, in a folder with the sticky bit, belongs to another user than this process's, who owns
    neither it nor the folder (root may replace anything)."""
    if os.name == "nt" or not hasattr(os, "geteuid"):
        return False
    try:
        me = os.geteuid()
        folder, own = os.stat(p.parent), os.lstat(p)
    except OSError:
        return False
    return bool(me != 0 and folder.st_mode & stat.S_ISVTX and own.st_uid != me and folder.st_uid != me)


#: What each kind of special file is called in messages (by the test of ``os.lstat``'s mode that finds it).
_SPECIAL_KINDS = ((stat.S_ISFIFO, "a named pipe (FIFO)"), (stat.S_ISSOCK, "a socket"),
                  (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))


def _special_kind(p: Path) -> Optional[str]:
    """What ``p`` is, in words, when it is neither a regular file, a folder nor a symbolic link (a named pipe, a
    socket, a device node); None otherwise, and when nothing is there."""
    st = _stat_nofollow(p)
    if st is None or stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode) or stat.S_ISLNK(st.st_mode):
        return None
    return next((name for test, name in _SPECIAL_KINDS if test(st.st_mode)), "a special file")


def case_key(name: str) -> str:
    """``name`` as a case-insensitive disk (NTFS, APFS) compares it: letter by letter in lower case, never one
    letter for two (``str.casefold`` made ``Straße`` and ``Strasse`` one name, which those disks keep apart)."""
    return "".join(low if len(low := c.lower()) == 1 else c for c in name)


def _form_key(name: str) -> str:
    """``name`` in Unicode normal form C: ``é`` typed as one character (NFC, most keyboards) or as ``e`` plus an
    accent (NFD, names made on macOS) are one name on macOS and on normalisation-insensitive shares."""
    return unicodedata.normalize("NFC", name)


def _case_twin(p: Path) -> Optional[Path]:
    """Another entry beside ``p`` whose name differs from ``p``'s only in letter case or in Unicode normalisation
    (on a disk that keeps them apart), else None."""
    key = case_key(_form_key(p.name))
    try:
        with os.scandir(p.parent) as it:
            for e in it:
                if e.name != p.name and case_key(_form_key(e.name)) == key:
                    return Path(e.path)
    except (OSError, ValueError):
        pass
    return None


#: A path written for Windows: a backslash, a drive (``C:``) or a share (``\\server``).
_WINDOWS_STYLE = re.compile(r"\\|^[A-Za-z]:")


def windows_style(path: PathLike) -> bool:
    """Whether ``path`` is spelled as on Windows (``C:\\out\\f.nii.gz``, ``sub\\f.nii.gz``) on a system whose
    folders are separated by ``/`` only, where it would name one file with backslashes and a colon in its name."""
    return os.name != "nt" and bool(_WINDOWS_STYLE.search(os.fspath(path)))


def missing_hint(path: PathLike) -> str:
    """What may explain that ``path`` does not exist, as text to add to "no such file or folder" (or "")."""
    text = os.fspath(path)
    if windows_style(text):
        return "; this looks like a Windows path: on this system folders are separated by /"
    if text.startswith("~"):
        return ("; '~' (the home folder) is expanded by the shell, not inside quotes or in Python: give the full "
                "path, or os.path.expanduser(path)")
    twin = _form_twin(Path(text))
    if twin is not None:
        return (f"; a file or folder named the same with its accents stored differently (another Unicode "
                f"normalisation) exists: {_shown(os.fspath(twin))}; use that name")
    return ""


def _form_twin(p: Path) -> Optional[Path]:
    """``p`` spelled as it exists on the disk when it does not exist as given only because a part of its name
    stores its accents differently (NFC for NFD), else None."""
    parts = p.parts
    here = Path(parts[0]) if p.is_absolute() else Path(".")
    found = False
    for part in parts[1:] if p.is_absolute() else parts:
        if not os.path.lexists(here / part):
            key = _form_key(part)
            try:
                match = next((e.name for e in os.scandir(here) if _form_key(e.name) == key), None)
            except (OSError, ValueError):
                return None
            if match is None:
                return None
            part, found = match, True
        here = here / part
    return here if found else None


# ----------------------------------------------------------------------------- what a killed overwrite left
def _target_key(target: Path) -> str:
    """A short hash of ``target``'s name: ties a leftover to its target (whose own name may be near the limit)."""
    return hashlib.sha256(os.fsencode(Path(target).name)).hexdigest()[:12]


def _aside_prefix(target: Path) -> str:
    """Name prefix of the folders holding ``target``'s earlier copy during an overwrite.

    A short hash of the name ties a leftover to its target (the target's own name may be near the length limit);
    inside, each file or folder keeps its own name, so a person can still see what it is.
    """
    return f"{_OLD_PREFIX}{_target_key(target)}-"


# ----------------------------------------------------------------------------- temporaries and their owners
_OWNER: List[str] = []


def _owner_key() -> str:
    """A short hash of this machine, its current boot and this process's PID namespace: where a process id in a
    temporary's name can be checked (another machine on a shared disk, a reboot or a container has other ids)."""
    if not _OWNER:
        parts = [socket.gethostname()]
        with contextlib.suppress(OSError):
            with open("/proc/sys/kernel/random/boot_id", encoding="ascii") as fh:
                parts.append(fh.read().strip())
        with contextlib.suppress(OSError, AttributeError):
            parts.append(os.readlink("/proc/self/ns/pid"))
        _OWNER.append(hashlib.sha256("\0".join(parts).encode("utf-8", "replace")).hexdigest()[:8])
    return _OWNER[0]


def _temp_prefix(target: Path, *, pid: Optional[int] = None) -> str:
    """The name prefix of this process's temporaries for ``target`` (``pid`` for tests).

    A temporary written for a temporary (the pipeline saves into ``atomic_path(out)``'s file, and ``save`` makes
    its own temporary for it) takes the key of the output it is for: a kill leaves it under a name the next write
    to that output removes (keyed to the first temporary's random name, no write would ever look for it).
    """
    return f"{_TMP_PREFIX}{_temp_key(target)}-{_owner_key()}-{os.getpid() if pid is None else pid}-"


def _temp_key(target: Path) -> str:
    """The key in the names of ``target``'s temporaries: its own, or, for a temporary, that of its output."""
    m = _TMP_NAME.fullmatch(Path(target).name) or _SHORT_TMP_NAME.fullmatch(Path(target).name)
    return m.group(1) if m is not None else _target_key(target)


#: mkstemp's random part (8 characters) plus a DICOM series folder's file names (``IM00001.dcm``), for the check.
_TEMP_ROOM = 20


def _fitting_prefix(target: Path, suffix: str) -> str:
    """The temporary name prefix for ``target``: the usual one, or the shorter form (:data:`_SHORT_TMP_NAME`)
    where the usual one would make a path longer than the system takes (mkstemp makes it absolute).

    Why: in a folder 4,045 characters deep ``out.nii.gz`` itself fits, and ``-o out.nii.gz`` was refused as "too
    long for the file system": its temporary's name, about 50 characters longer, did not fit.
    """
    prefix = _temp_prefix(target)
    limit = _path_max(target.parent)
    if limit and _abs_length(target.parent, prefix, suffix) >= limit:
        return f"{_TMP_PREFIX}{_temp_key(target)}-"
    return prefix


def _abs_length(folder: Path, prefix: str, suffix: str) -> int:
    """The length in bytes of the absolute path of a temporary named ``prefix``…``suffix`` in ``folder``."""
    return len(os.fsencode(os.path.join(os.path.abspath(folder), prefix + suffix))) + _TEMP_ROOM


def _path_max(folder: Path) -> int:
    """The longest path the system takes in ``folder`` (bytes, with its final null), or 0 when it cannot tell."""
    try:
        return int(os.pathconf(folder, "PC_PATH_MAX"))
    except (OSError, ValueError, AttributeError):  # Windows has no pathconf; a folder not there
        return 0


def _make_temp_file(target: Path, suffix: str = "") -> str:
    """A new empty file beside ``target``, named as its temporary; its path (the descriptor is closed).

    Raises:
        OutputWriteError: the file cannot be created (:func:`_temp_error`); it names ``target``.
    """
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=_fitting_prefix(target, suffix), suffix=suffix)
    except OSError as e:
        raise _temp_error(e, target) from None
    os.close(fd)
    return tmp


def _make_temp_dir(target: Path) -> Path:
    """A new empty folder beside ``target``, named as its temporary.

    Raises:
        OutputWriteError: the folder cannot be created (:func:`_temp_error`); it names ``target``.
    """
    try:
        return Path(tempfile.mkdtemp(dir=target.parent, prefix=_fitting_prefix(target, "")))
    except OSError as e:
        raise _temp_error(e, target) from None


def _temp_error(e: OSError, target: Path) -> MedfuseError:
    """Why no temporary could be made beside ``target``, as a typed error naming ``target`` (with the errno).

    Why: the raw error named the temporary (``/proc/.medfuse-tmp-…``), a name the user never gave, and an
    existing folder that takes no new files (``/proc``, ``/sys``: ENOENT) was reported as "no such file".
    """
    if isinstance(e, MedfuseError):
        return e
    limit = _path_max(target.parent)
    if e.errno == errno.ENAMETOOLONG and limit and len(os.fsencode(os.path.abspath(target))) < limit:
        room = limit - 1 - len(os.fsencode(os.path.abspath(target.parent))) - 1
        return OutputWriteError(f"the folder's path is too long for the temporary file medfuse writes first beside "
                                f"the output (the output's own path would fit: {len(os.path.abspath(target))} "
                                f"characters; the system takes {limit - 1}, and the temporary name needs "
                                f"{len(_TMP_PREFIX) + 21 + len(_temp_suffix(target.name))} characters where "
                                f"{max(room, 0)} are left); nothing was written", errno=e.errno,
                                fix="write to a folder with a shorter path, then move the output", path=target)
    typed = _typed_os_error(e, target)
    if typed is not None:
        return typed
    if not os.path.isdir(target.parent):  # removed since it was checked
        return OutputWriteError(f"the output's folder does not exist{missing_hint(target.parent)}", errno=e.errno,
                                fix="create the folder first", path=target)
    # ENOENT for an existing folder: the kernel's own folders (/proc) exist but take no new files.
    reason = "" if e.errno == errno.ENOENT else f" ({e.strerror or type(e).__name__})"
    return OutputWriteError(f"the output's folder cannot hold new files{reason}: creating a file in it fails (a "
                            "virtual file system such as /proc or /sys?); nothing was written", errno=e.errno,
                            fix="choose an output path in an ordinary folder you can write to", path=target)


def _pid_alive(pid: int) -> bool:
    """Whether process ``pid`` (of this machine) runs; True when that cannot be told (nothing is removed then)."""
    if pid == os.getpid():
        return True  # another thread of this process may be writing the same target
    if pid <= 0:
        return True
    if os.name == "nt":  # pragma: no cover - Windows: os.kill(pid, 0) would terminate the process
        import ctypes

        kernel32 = ctypes.WinDLL("kernel32", use_last_error=True)
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return ctypes.get_last_error() != 87  # ERROR_INVALID_PARAMETER: no such process
        try:
            code = ctypes.c_ulong()
            return not kernel32.GetExitCodeProcess(handle, ctypes.byref(code)) or code.value == 259  # STILL_ACTIVE
        finally:
            kernel32.CloseHandle(handle)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # EPERM: it runs, as another user
        return True
    return True


def _last_touched(entry: os.DirEntry) -> float:
    """The newest modification time of a temporary file, or of a temporary folder and the files in it."""
    newest = entry.stat(follow_symlinks=False).st_mtime
    if entry.is_dir(follow_symlinks=False):
        with contextlib.suppress(OSError):
            for e in os.scandir(entry.path):
                with contextlib.suppress(OSError):
                    newest = max(newest, e.stat(follow_symlinks=False).st_mtime)
    return newest


def stale_temporaries(path: PathLike) -> List[Path]:
    """The temporary files and folders that killed writes to ``path`` left beside it (usually none).

    Only names made for this target (its key) count, and only when their writer has provably ended: a process of
    this machine and boot that no longer runs, or, for another machine's (or boot's), nothing touched for a day.
    Symbolic links are never listed.
    """
    p = Path(path)
    return _stale(p, _temporaries_in(p.parent))


def _temporaries_in(folder: Path) -> List[os.DirEntry]:
    """The entries of ``folder`` with medfuse's temporary prefix (one listing serves both kinds of leftover)."""
    try:
        return [e for e in os.scandir(folder) if e.name.startswith(_TMP_PREFIX)]
    except (OSError, ValueError):
        return []


def _stale(p: Path, entries: Iterable[os.DirEntry]) -> List[Path]:
    """Those of ``entries`` that are ``p``'s temporaries left by writers that have ended (see stale_temporaries)."""
    prefix = f"{_TMP_PREFIX}{_target_key(p)}-"
    found = []
    for e in entries:
        if not e.name.startswith(prefix):
            continue
        m = _TMP_NAME.fullmatch(e.name)
        short = None if m is not None else _SHORT_TMP_NAME.fullmatch(e.name)
        suffix = m.group(4) if m is not None else short.group(2) if short is not None else None
        try:
            if ((m is None and short is None) or (suffix or "") not in ("", _temp_suffix(p.name)) or e.is_symlink()
                    or not (e.is_file(follow_symlinks=False) or e.is_dir(follow_symlinks=False))):
                continue
            if m is not None and m.group(2) == _owner_key():
                stale = not _pid_alive(int(m.group(3)))
            else:
                stale = time.time() - _last_touched(e) > _FOREIGN_STALE_S
        except OSError:
            continue
        if stale:
            found.append(Path(e.path))
    return found


#: A temporary's name from medfuse versions before 2026-12-05: mkstemp's random part only, no target or writer.
_LEGACY_TMP_NAME = re.compile(r"\.medfuse-tmp-[a-z0-9_]{8}(\.[a-z0-9.]{1,16})?")


def _legacy_temporaries(entries: Iterable[os.DirEntry]) -> List[Path]:
    """Those of ``entries`` that are temporaries of earlier medfuse versions untouched for a day (their writer
    cannot be told, and no write takes that long); symbolic links never."""
    found = []
    for e in entries:
        if not _LEGACY_TMP_NAME.fullmatch(e.name):
            continue
        try:
            if (not e.is_symlink() and _legacy_shape(e) and time.time() - _last_touched(e) > _FOREIGN_STALE_S):
                found.append(Path(e.path))
        except OSError:
            continue
    return found


#: What an earlier version's temporary could hold: its target's suffix (a file), or the files its DICOM series
#: and MetaImage/NRRD pair writers made (a folder). Anything else with that prefix is someone's own.
_LEGACY_FILE_SUFFIXES = (".nii.gz", ".nii", ".mha", ".nrrd", ".json", ".csv", ".png", ".tfm", ".txt", ".h5", ".mat")
_LEGACY_DIR_FILE = re.compile(r"IM\d{5}\.dcm|[^/]+\.(mhd|nhdr|raw|zraw|raw\.gz)", re.I)


def _legacy_shape(entry: os.DirEntry) -> bool:
    """Whether an earlier version's temporary name holds what such a temporary holds (never a user's folder)."""
    if entry.is_file(follow_symlinks=False):
        return entry.name.lower().endswith(_LEGACY_FILE_SUFFIXES)
    if not entry.is_dir(follow_symlinks=False):
        return False
    inside = list(os.scandir(entry.path))
    return all(e.is_file(follow_symlinks=False) and _LEGACY_DIR_FILE.fullmatch(e.name) for e in inside)


def _remove_stale_temporaries(target: Path) -> None:
    """Remove what killed writes to ``target`` left under its temporary names (:func:`stale_temporaries`).

    Temporaries of earlier medfuse versions (no target in their names) in the same folder go too, once untouched
    for a day.

    A ``.mhd``/``.nhdr`` pair's writer links each file into place from its temporary folder, the header last: a
    kill in between leaves a new data file beside the target that is the same file as one in that folder. With
    the header not placed, that data file is half of an unfinished output and goes too (an earlier data file it
    replaced is aside, and is put back by :func:`recover_leftovers`).
    """
    entries = _temporaries_in(target.parent)  # one listing of the folder per write
    for tmp in _legacy_temporaries(entries):  # whose target is unknown: removed, nothing beside them
        with contextlib.suppress(OSError):
            shutil.rmtree(tmp) if tmp.is_dir() else os.unlink(tmp)
    for tmp in _stale(target, entries):
        try:
            if tmp.is_dir():
                inside = {e.name: e.stat(follow_symlinks=False) for e in os.scandir(tmp)
                          if e.is_file(follow_symlinks=False)}
                placed = _stat_nofollow(target)
                finished = placed is not None and any(os.path.samestat(placed, st) for st in inside.values())
                if not finished:
                    for name, st in inside.items():
                        beside = _stat_nofollow(target.parent / name)
                        if beside is not None and os.path.samestat(beside, st):
                            os.unlink(target.parent / name)
                shutil.rmtree(tmp)
            else:
                os.unlink(tmp)
        except OSError:
            continue  # a leftover that cannot be removed is harmless: hidden, and skipped by hashing and discovery


def _stat_nofollow(p: Path) -> Optional[os.stat_result]:
    try:
        return os.lstat(p)
    except (OSError, ValueError):
        return None


def _make_aside(target: Path) -> Path:
    """A new, empty folder beside ``target`` for the files an overwrite replaces."""
    return Path(tempfile.mkdtemp(dir=target.parent, prefix=_aside_prefix(target)))


def leftovers(path: PathLike) -> List[Path]:
    """The folders an interrupted overwrite of ``path`` left beside it, oldest first (usually none)."""
    p = Path(path)
    prefix = _aside_prefix(p)
    try:
        found = [Path(e.path) for e in os.scandir(p.parent)
                 if e.name.startswith(prefix) and e.is_dir(follow_symlinks=False)]
    except OSError:
        return []
    return sorted(found, key=lambda f: (_stat(f).st_mtime_ns if _stat(f) else 0, f.name))


def _empty_dir(p: Path) -> bool:
    if p.is_symlink() or not p.is_dir():
        return False
    try:
        return not any(os.scandir(p))
    except OSError:
        return False


def _swap_finished(target: Path, aside: Path) -> bool:
    """Whether the new output had been put in place when the overwrite stopped.

    The target is moved aside last (after a ``.mhd``/``.nhdr`` pair's data file), so the swap finished when its
    earlier copy is aside and a new one is in place; an empty folder at the target is the name reserved for a new
    DICOM series that never arrived.
    """
    return os.path.lexists(aside / target.name) and os.path.lexists(target) and not _empty_dir(target)


def _restore(target: Path, aside: Path) -> List[str]:
    """Put everything in ``aside`` back beside ``target`` (replacing the unfinished new files); the names restored."""
    restored = []
    for entry in sorted(os.scandir(aside), key=lambda e: e.name == target.name):  # the target last, as written
        dst = target.parent / entry.name
        if _empty_dir(dst):
            os.rmdir(dst)
        if entry.is_dir(follow_symlinks=False) and os.path.lexists(dst):
            raise OutputExistsError(f"an interrupted earlier write left the earlier {entry.name} in {aside.name}, "
                                    "and something else is now in its place; nothing was changed",
                                    fix=f"compare the two and keep the one you want, then delete {aside.name}",
                                    path=dst)
        os.replace(entry.path, dst)
        restored.append(entry.name)
    os.rmdir(aside)
    return restored


def recover_leftovers(path: PathLike, *, overwrite: bool = False) -> None:
    """Resolve what an overwrite of ``path`` that was killed mid-swap (SIGKILL, power loss) left beside it.

    First the temporary files and folders of killed writes to ``path`` are removed
    (:func:`stale_temporaries`: only this target's, and only once their writer has ended). Then:

    * Swap unfinished (the target missing, or its earlier copy still in place beside a new data file): the
      earlier output is put back, with a :class:`MedfuseWarning`. It may be the only copy of it.
    * Swap finished (the new output in place): the copy aside is older than the output. With ``overwrite`` (the
      output is being replaced anyway) it is deleted; without, it is left alone with a warning saying where it is.

    Raises:
        OutputExistsError: the earlier output cannot be put back (something else took its place, or the file
            system refused); nothing is deleted then.
    """
    p = Path(path)
    _remove_stale_temporaries(p)
    for aside in leftovers(p):
        if _swap_finished(p, aside):
            if overwrite:
                shutil.rmtree(aside, ignore_errors=True)
            else:
                warnings.warn(f"{aside}: an interrupted earlier overwrite of {p.name} left its previous version "
                              f"here; {p.name} itself is complete. Delete the folder when you no longer need it",
                              MedfuseWarning, stacklevel=3)
            continue
        try:
            names = _restore(p, aside)
        except OSError as e:
            if isinstance(e, MedfuseError):
                raise
            raise OutputExistsError(f"an interrupted earlier write left the earlier output in {aside.name} and it "
                                    f"could not be put back ({e.strerror or e.__class__.__name__}); nothing was "
                                    "deleted", fix=f"move the contents of {aside.name} back by hand", path=p) from e
        if names:
            warnings.warn(f"{p}: an earlier medfuse write to it was interrupted mid-swap; its previous version "
                          f"({', '.join(names)}) was put back in place", MedfuseWarning, stacklevel=3)


# ----------------------------------------------------------------------------- moving into place
def _appeared(p: Path) -> OutputExistsError:
    return OutputExistsError("the output appeared while medfuse was writing (another program wrote it?); it was "
                             "kept and the new output discarded", fix="choose another path, or pass overwrite=True "
                             "to replace it", path=p)


def _link_into_place(src: Path, dst: Path, *, keep_source: bool = False) -> None:
    """Move the file ``src`` to ``dst`` unless something is at ``dst``, in one step (no-clobber).

    A hard link fails when the name exists, however late it appeared; without hard links (FAT, exFAT, some
    shares) the name is taken by an exclusive create and then replaced by the file. With ``keep_source`` a hard
    link leaves ``src`` too (a ``.mhd``/``.nhdr`` pair's temporary folder: it proves, after a kill, which file
    beside the target that write had placed).

    Raises:
        OutputExistsError: something is at ``dst``; it is left untouched.
    """
    try:
        os.link(src, dst)
    except FileExistsError:
        raise _appeared(dst) from None
    except OSError as e:
        if not _no_hard_links(e):
            raise
        try:
            os.close(os.open(dst, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
        except FileExistsError:
            raise _appeared(dst) from None
        try:
            os.replace(src, dst)  # onto the empty file this process just made
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(dst)
            raise
        return
    if not keep_source:
        os.unlink(src)


def _rename_dir_into_place(src: Path, dst: Path) -> None:
    """Move the folder ``src`` to ``dst`` unless something is at ``dst``, in one step (no-clobber).

    POSIX ``rename`` replaces an empty folder (and refuses a non-empty one), so the name is first taken with
    ``os.mkdir``, which fails when anything is there; the rename then replaces only that empty folder of ours.
    Windows' ``os.rename`` never replaces.

    Raises:
        OutputExistsError: something is (or was put) at ``dst``; it is left untouched.
    """
    if os.name == "nt":  # pragma: no cover - Windows
        try:
            os.rename(src, dst)
        except FileExistsError:
            raise _appeared(dst) from None
        return
    try:
        os.mkdir(dst, 0o700)
    except FileExistsError:
        raise _appeared(dst) from None
    try:
        os.replace(src, dst)
    except BaseException as e:
        with contextlib.suppress(OSError):
            os.rmdir(dst)  # ours and empty; not removed if another program has put files in it
        if isinstance(e, OSError) and e.errno in (errno.ENOTEMPTY, errno.EEXIST):
            raise _appeared(dst) from None
        raise


def _name_the_output(e: MedfuseError, tmp: Optional[PathLike], target: Path) -> None:
    """A writer's error about the temporary file (or a file in the temporary folder) names the output instead.

    Why: a full disk while writing was reported for ``.medfuse-tmp-….nii.gz``, a name the user never gave.
    """
    if tmp is None or not e.path:
        return
    given = os.path.abspath(e.path)
    # A name that is not UTF-8 is quoted in messages with its bytes escaped (itk_path's "caf\\xe9"): match that too.
    for tmp_s, out in ((os.path.abspath(tmp), os.fspath(target)),
                       (_shown(os.path.abspath(tmp)), _shown(os.fspath(target)))):
        if given == tmp_s or given.startswith(tmp_s + os.sep):
            e.path = out + given[len(tmp_s):]
            e.args = (e._compose(),)
            return


def _shown(path: str) -> str:
    """``path`` as messages quote a name that is not UTF-8: its undecodable bytes as ``\\xNN``."""
    return os.fsencode(path).decode("utf-8", "backslashreplace")


def folder_error(e: OSError, folder: PathLike, problem: str, *, fix: str) -> OutputWriteError:
    """Why ``folder`` could not be created (``mkdir`` raised ``e``), as the typed write error with its errno.

    Not OutputExistsError: nothing is at the output itself, so another output name would fail the same way. A
    file where a folder of the path goes (mkdir says EEXIST or ENOTDIR) is reported as ENOTDIR.
    """
    typed = _typed_os_error(e, Path(folder))
    if isinstance(typed, OutputWriteError):
        return typed
    code = errno.ENOTDIR if isinstance(e, (FileExistsError, NotADirectoryError)) else e.errno
    reason = os.strerror(code) if code else type(e).__name__
    return OutputWriteError(f"{problem} ({reason})", errno=code, fix=fix, path=folder)


def make_folder(folder: PathLike, *, problem: str = "cannot create the output folder",
                fix: str = "choose a folder you can write to") -> Path:
    """``mkdir(parents=True, exist_ok=True)``, its failure (no permission, a full disk, a file in the way) the
    typed :class:`~medfuse.errors.OutputWriteError` of :func:`folder_error`.

    Returns:
        ``folder`` as a Path.
    """
    p = Path(folder)
    if "\0" in os.fspath(p):
        raise InvalidInputError(f"{problem}: the path holds a null character (\\0), which no folder name can contain",
                                fix="check how the path was built and pass it without")
    try:
        p.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise folder_error(e, p, problem, fix=fix) from None
    return p


def _typed_os_error(e: BaseException, p: Path) -> Optional[MedfuseError]:
    """A user-fixable file-system error as an OutputWriteError naming the output (with its errno), else None.

    Why not OutputExistsError: nothing is in the output's way, so a caller that picks another name on a
    FileExistsError would retry forever (on a full disk, say)."""
    if not isinstance(e, OSError) or isinstance(e, MedfuseError):
        return None
    code = e.errno
    if _too_long(e, p) is not None:
        return _too_long(e, p)
    if getattr(e, "winerror", None) in _IN_USE_WINERROR and os.path.isfile(p):
        return OutputWriteError("cannot replace the output: it is open in another program (Windows cannot replace "
                                "an open file) or not writable; nothing was written and it was kept", errno=code,
                                fix="close it in that program (a viewer, Excel) and run again, or choose another "
                                    "output path", path=p)
    if code in (errno.EACCES, errno.EPERM):
        return OutputWriteError("cannot write the output there (permission denied); nothing was written", errno=code,
                                fix="choose a folder you can write to, or change its permissions", path=p)
    if code == errno.EROFS:
        return OutputWriteError("the output's file system is read-only; nothing was written", errno=code,
                                fix="choose a folder on a writable disk", path=p)
    if code in (errno.ENOSPC, getattr(errno, "EDQUOT", -1), errno.EFBIG):
        return OutputWriteError("the disk is full (or over quota, or the file too large); nothing was written "
                                "and any earlier output was kept", errno=code,
                                fix="free some space, or choose another disk", path=p)
    return None


# Files of a folder input whose permissions are looked at (a DICOM series folder: its files' modes).
_MODE_SAMPLE = 64


def _inputs_mask(inputs: Iterable[Optional[PathLike]]) -> int:
    """The permission bits an output of these inputs may have: no group (other) access when an input, or a file
    of an input folder, is not group- (world-) readable, and no group (other) write access when one is not
    group- (world-) writable. Patient data made private stays private when derived."""
    keep = 0o7777
    for p in inputs or ():
        if p is None or os.name == "nt":
            continue
        try:
            modes = [os.stat(p).st_mode]
            if stat.S_ISDIR(modes[0]):
                with os.scandir(p) as it:
                    for i, e in enumerate(it):
                        if i >= _MODE_SAMPLE:
                            break
                        if e.is_file():
                            modes.append(e.stat().st_mode)
        except (OSError, TypeError, ValueError):
            continue
        for m in modes:
            # Write access is narrowed as read is: under umask 000 a fused image of 0644 inputs was 0666 (and a
            # DICOM output folder 0777), writable by anyone.
            for read, write, bits in ((stat.S_IRGRP, stat.S_IWGRP, 0o070), (stat.S_IROTH, stat.S_IWOTH, 0o007)):
                if not m & read:
                    keep &= ~bits
                elif not m & write:
                    keep &= ~write
    return keep


def _public_mode(path: PathLike, *, folder: bool = False, replacing: Optional[PathLike] = None,
                 inputs: Iterable[Optional[PathLike]] = ()) -> None:
    """mkstemp/mkdtemp create 0600/0700; give results the usual umask-based permissions, or, when they replace
    an existing output, that output's permissions (an output made private, say with ``chmod 600`` because it
    holds patient data, stays private when it is overwritten). Either way no wider than the inputs allow
    (:func:`_inputs_mask`): a fused image of a ``chmod 600`` PET is 0600, not 0644 under umask 022."""
    narrow = _inputs_mask(inputs)
    if replacing is not None:
        try:
            st = os.stat(replacing)
        except OSError:
            st = None
        if st is not None and stat.S_ISDIR(st.st_mode) == folder:
            os.chmod(path, stat.S_IMODE(st.st_mode) & narrow)
            return
    # A folder keeps the set-group-ID bit it got from a group project folder (chmod cleared it: files added to
    # it later took their writer's own group).
    keep = os.stat(path).st_mode & stat.S_ISGID if folder else 0
    os.chmod(path, ((0o777 if folder else 0o666) & ~_umask() & narrow) | keep)


def _umask() -> int:
    """The process's umask, read without changing it where the system says it (Linux: /proc/self/status).

    Why: reading it with os.umask sets it to 0 for a moment, and a file another thread created then (a service
    writing patient data) was world-readable: 497 of 956,698 in a stress test.
    """
    try:
        with open("/proc/self/status", encoding="ascii", errors="replace") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)  # the narrowest value while it is read, not the widest
    os.umask(mask)
    return mask


def _durable() -> bool:
    """Whether outputs are flushed to the disk before they take their names (``MEDFUSE_FSYNC=0`` turns it off)."""
    return os.environ.get("MEDFUSE_FSYNC", "1").strip().lower() not in ("0", "false", "no", "off")


def _flush_file(path: PathLike) -> None:
    """Flush a finished temporary file's data to the disk.

    Why: a rename is atomic, but after a power cut or a kernel crash the file system may hold the new name
    before the data written under the temporary one (XFS, ext4 without ``auto_da_alloc``, many network file
    systems): an output replaced with ``--overwrite`` could come back empty, and the earlier one is gone too.
    """
    flags = os.O_RDWR if os.name == "nt" else os.O_RDONLY  # Windows' fsync (_commit) needs write access
    try:
        fd = os.open(path, flags | getattr(os, "O_BINARY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # a file system without fsync (some FUSE mounts): nothing more can be done
        pass
    finally:
        os.close(fd)


def _flush_folder(path: PathLike) -> None:
    """Flush a folder's entries (a rename in it) to the disk; POSIX only (Windows cannot open folders)."""
    if os.name == "nt":  # pragma: no cover - Windows
        return
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _temp_suffix(name: str) -> str:
    """The target's suffix in lower case (``.nii.gz`` whole): writers (nibabel, ITK) choose the format and
    compression from the name and do not all recognise ``.NII.GZ`` or ``.MHA``; the final name keeps its case."""
    low = name.lower()
    return ".nii.gz" if low.endswith(".nii.gz") else Path(low).suffix


@contextlib.contextmanager
def atomic_path(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = (),
                recover: bool = True) -> Iterator[Path]:
    """Yield a temporary file path beside ``path`` (same suffix); on success it replaces ``path``.

    The temporary name keeps the full suffix (``.nii.gz``), in lower case, so that writers that choose
    a format from the name still work. An existing folder at ``path`` is never replaced.

    Args:
        recover: as :func:`check_output`'s: resolve first what killed writes to ``path`` left beside it, which
            lists its folder (twice). ``False`` only for a file this process alone rewrites, and has written with
            ``recover`` since it holds that right (a batch report under its run lock, rewritten every few
            seconds in a folder of thousands of outputs): nobody else can have left anything since.
    """
    inputs = list(inputs or ())  # read again at the end (permissions): a generator would be spent
    p = check_output(path, overwrite=overwrite, inputs=inputs, kind="file", recover=recover)
    tmp: Optional[str] = None
    try:
        tmp = _make_temp_file(p, _temp_suffix(p.name))
        yield Path(tmp)
        _public_mode(tmp, replacing=p, inputs=inputs)
        durable = _durable()
        if durable:
            _flush_file(tmp)  # the data reaches the disk before the name points to it
        # Appeared (or changed) while writing. Without overwrite the move itself refuses too: a file that
        # appears after this check is still never replaced.
        check_output(p, overwrite=overwrite, inputs=inputs, kind="file", recover=False)
        if overwrite:
            os.replace(tmp, p)  # one step: the target is never missing
        else:
            _link_into_place(Path(tmp), p)
        if durable:
            _flush_folder(p.parent)
    except MedfuseError as e:
        _name_the_output(e, tmp, p)
        raise
    except OSError as e:
        typed = _typed_os_error(e, p)
        if typed is None:
            raise
        raise typed from e
    finally:
        if tmp is not None and os.path.lexists(tmp):
            # Windows refuses to delete a file a failed writer still holds open: keep the writer's own error.
            with contextlib.suppress(OSError):
                os.unlink(tmp)


def _is_dicom_file(f: Path) -> bool:
    try:
        with open(f, "rb") as fh:
            head = fh.read(132)
    except OSError:
        return False
    return head[128:132] == b"DICM"


def _written_by_medfuse(f: Path) -> bool:
    """Whether a DICOM file is one medfuse's writer made: ManufacturerModelName ``medfuse`` (older versions wrote
    Manufacturer ``medfuse``). A scanner's or a PACS's files name their own equipment (or nothing)."""
    try:
        import pydicom

        ds = pydicom.dcmread(f, stop_before_pixels=True,
                             specific_tags=["Manufacturer", "ManufacturerModelName"])
    except Exception:  # not readable as DICOM (pydicom raises many types): not ours
        return False
    return "medfuse" in (str(ds.get("ManufacturerModelName", "") or "").strip(),
                         str(ds.get("Manufacturer", "") or "").strip())


def refuse_foreign_folder(p: Path, *, own_series: bool = False) -> None:
    """OutputExistsError when ``p`` is a folder ``overwrite`` may not replace (it holds more than a DICOM series;
    with ``own_series``, more than a DICOM series medfuse's writer made)."""
    if p.is_dir() and not _replaceable_folder(p, own_series=own_series):
        if own_series:
            raise OutputExistsError("the output folder holds files that are not a DICOM series medfuse wrote (e.g. "
                                    "a scanner's original series); overwrite replaces only medfuse's own output and "
                                    "never deletes these", fix="choose another output folder, or move that data "
                                    "away first", path=p)
        raise OutputExistsError("the output folder holds files that are not a DICOM series (overwrite replaces only "
                                "a DICOM series folder)", fix="choose another output name, or empty the folder",
                                path=p)


def _desktop_metadata(name: str) -> bool:
    """Files a desktop adds to any folder it shows (macOS Finder's .DS_Store and ._ AppleDouble files), which go
    with the folder. Other hidden files are the user's own (notes, a scanner file named with a dot) and count as
    "anything else": every hidden file was deleted with the folder it was in."""
    return name == ".DS_Store" or name.startswith("._")


def _replaceable_folder(p: Path, *, own_series: bool = False) -> bool:
    """A folder ``overwrite`` may replace: empty, or only DICOM files (a series, such as medfuse writes; with
    ``own_series``, only files medfuse's writer made).

    Anything else (sub-folders, documents, a NIfTI, a scanner's original series) may be the user's own and is never
    deleted.
    """
    try:
        entries = list(os.scandir(p))
    except OSError:
        return False
    for e in entries:
        if _desktop_metadata(e.name):
            if e.is_dir(follow_symlinks=False):
                return False
            continue
        if not e.is_file(follow_symlinks=False) or not _is_dicom_file(Path(e.path)):
            return False
        if own_series and not _written_by_medfuse(Path(e.path)):
            return False
    return True


@contextlib.contextmanager
def atomic_dir(path: PathLike, *, overwrite: bool = False, inputs: Iterable[Optional[PathLike]] = (),
               own_series: bool = False) -> Iterator[Path]:
    """Yield a temporary folder beside ``path``; on success it is renamed to ``path``.

    With ``overwrite`` an existing folder is moved aside first (``.medfuse-old-<key>-*/<name>``) and removed
    only after the new one is in place; if anything fails (or Ctrl-C) in between, it is put back, and if the
    process is killed in between, the next write to ``path`` puts it back (:func:`recover_leftovers`). Only a
    folder holding nothing but DICOM files (a series) is replaced; a file, or a folder with other content, is
    refused (:class:`OutputExistsError`) and left alone; with ``own_series`` only a series medfuse's DICOM writer
    made is replaced (never a scanner's). Whatever appears at ``path`` while writing (even an empty folder) is
    never replaced.
    """
    inputs = list(inputs or ())
    p = check_output(path, overwrite=overwrite, inputs=inputs, kind="folder")
    refuse_foreign_folder(p, own_series=own_series)
    tmp: Optional[Path] = None
    aside: Optional[Path] = None
    placed = False
    try:
        tmp = _make_temp_dir(p)
        yield tmp
        _public_mode(tmp, folder=True, replacing=p, inputs=inputs)
        narrow = _inputs_mask(inputs)
        if narrow != 0o7777:  # the slices too: copied out of the folder (cp -a, rsync, tar) they kept 0644
            for entry in os.scandir(tmp):
                if entry.is_file(follow_symlinks=False):
                    os.chmod(entry.path, stat.S_IMODE(entry.stat(follow_symlinks=False).st_mode) & narrow)
        durable = _durable()
        if durable:
            for entry in os.scandir(tmp):
                if entry.is_file(follow_symlinks=False):
                    _flush_file(entry.path)
            _flush_folder(tmp)
        check_output(p, overwrite=overwrite, inputs=inputs, kind="folder", recover=False)  # appeared while writing
        if overwrite and (p.exists() or p.is_symlink()):  # without overwrite nothing is ever moved aside
            if p.is_dir() and not _replaceable_folder(p, own_series=own_series):
                raise OutputExistsError("the output folder changed while writing and now holds other files",
                                        fix="choose another output name", path=p)
            aside = _make_aside(p)
            os.replace(p, aside / p.name)
        _rename_dir_into_place(tmp, p)
        placed = True
        if durable:
            _flush_folder(p.parent)
    except BaseException as e:
        if aside is not None and os.path.lexists(aside / p.name) and not os.path.lexists(p):
            os.replace(aside / p.name, p)  # the swap did not finish: the earlier output goes back in place
        if isinstance(e, MedfuseError):
            _name_the_output(e, tmp, p)
        typed = _typed_os_error(e, p)
        if typed is None:
            raise
        raise typed from e
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            if placed:
                shutil.rmtree(aside, ignore_errors=True)
            else:  # the earlier output went back in place, or (something else took its place) stays aside
                with contextlib.suppress(OSError):
                    os.rmdir(aside)


def atomic_write_bytes(path: PathLike, data: bytes, *, overwrite: bool = False,
                       inputs: Iterable[Optional[PathLike]] = (), recover: bool = True) -> Path:
    """Write bytes atomically; returns the Path. ``recover``: as :func:`atomic_path`'s."""
    with atomic_path(path, overwrite=overwrite, inputs=inputs, recover=recover) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def atomic_write_text(path: PathLike, text: str, *, overwrite: bool = False,
                      inputs: Iterable[Optional[PathLike]] = (), recover: bool = True) -> Path:
    """Write UTF-8 text atomically; returns the Path. ``recover``: as :func:`atomic_path`'s.

    A file name that is not UTF-8 (``sub_\\xff``: Python holds its bytes as surrogates) is written as its own
    bytes: it stopped ``medfuse evaluate`` after all its scoring, and a dataset batch before any work (exit 3).
    """
    return atomic_write_bytes(path, text.encode("utf-8", "surrogateescape"), overwrite=overwrite, inputs=inputs,
                              recover=recover)
