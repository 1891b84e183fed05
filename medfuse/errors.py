"""One exception hierarchy for medfuse.

Every error raised on bad input is a :class:`MedfuseError`. Messages say what is
wrong, name the file where there is one, and say how to fix it. They never carry
patient identifiers (name, ID, birth date): build them from geometry, tags'
*names* and file paths only.
"""

from __future__ import annotations

import os
from typing import Optional

__all__ = [
    "MedfuseError",
    "InvalidInputError",
    "UnreadableFileError",
    "UnsupportedDataError",
    "MultipleSeriesError",
    "GeometryError",
    "SUVError",
    "OutputExistsError",
    "OutputWriteError",
    "RegistrationError",
    "FusionError",
    "WeightsError",
    "CancelledError",
    "MissingDependencyError",
    "MedfuseWarning",
]


class MedfuseError(Exception):
    """Base class of every error medfuse raises on purpose.

    Args:
        problem: what is wrong, in one sentence.
        fix: how the user can fix it (optional but strongly encouraged).
        path: the file or folder concerned, if any.
    """

    def __init__(self, problem: str, *, fix: Optional[str] = None, path: Optional[os.PathLike | str] = None):
        self.problem = problem
        self.fix = fix
        self.path = None if path is None else os.fspath(path)
        super().__init__(self._compose())

    def _compose(self) -> str:
        parts = []
        if self.path:
            parts.append(f"{self.path}: ")
        parts.append(self.problem.rstrip("."))
        if not self.problem.endswith("?"):  # "did you mean 'x'?" ends its sentence itself
            parts.append(".")
        if self.fix:
            parts.append(f" Fix: {self.fix.rstrip('.')}.")
        return "".join(parts)

    def one_line(self) -> str:
        """The message on one line, for CLIs and notifications."""
        return " ".join(str(self).split())


class InvalidInputError(MedfuseError, ValueError):
    """An argument or array has the wrong shape, type, values or is empty/NaN."""


class _OSErrorFields(MedfuseError, OSError):
    """A MedfuseError that is an OSError with ``errno``, ``strerror`` and ``filename`` set as an OSError's.

    Why: OSError's constructor fills these only from a (code, message, filename) triple, which would change
    ``str(self)``; set here, OSError-style code (``e.errno == errno.ENOENT``, logging ``"{e.strerror}:
    {e.filename}"``) reads what the message says. It pickles with them (OSError pickles as ``type(*args)``, which
    lost fix, path and errno across a process pool).
    """

    def __init__(self, problem: str, *, errno: Optional[int] = None, fix: Optional[str] = None, path=None):
        super().__init__(problem, fix=fix, path=path)
        self.errno = errno
        self.strerror = os.strerror(errno) if errno else problem
        self.filename = None if path is None else os.fspath(path)

    def __str__(self) -> str:
        # OSError's own str() becomes "[Errno 28] ...: path" once strerror is set; the message stays medfuse's.
        return str(self.args[0]) if self.args else self._compose()

    def __reduce__(self):
        return (_rebuild_write_error, (type(self), self.problem, self.errno, self.fix, self.path),
                dict(self.__dict__))


class UnreadableFileError(_OSErrorFields):
    """A file is missing, empty, truncated, or in a format medfuse does not read.

    :attr:`filename` is the file concerned, and :attr:`errno` the cause's code where it is one (``errno.ENOENT``
    for a missing file or folder), as an OSError's, so that ``e.errno == errno.ENOENT`` finds a missing input.

    Args:
        problem: what is wrong, in one sentence.
        errno: the cause's ``errno`` code, if any.
        fix: how the user can fix it.
        path: the file or folder concerned, if any.
    """


class UnsupportedDataError(MedfuseError):
    """A readable file that holds no image medfuse can use (RT, SEG, SR, ...)."""


class MultipleSeriesError(MedfuseError):
    """A folder holds several series (or a series several volumes) and none was chosen.

    Args:
        problem: what is wrong, in one sentence.
        choices: the series (or volumes) to choose from, kept in :attr:`choices` for a caller to offer.
        fix: how the user can fix it.
        path: the file or folder concerned, if any.
    """

    def __init__(self, problem: str, *, choices=(), fix: Optional[str] = None, path=None):
        self.choices = list(choices)
        super().__init__(problem, fix=fix, path=path)


class GeometryError(MedfuseError, ValueError):
    """Geometry is invalid (singular/sheared affine, missing slices) or two grids differ."""


class SUVError(MedfuseError):
    """A PET header does not allow SUV to be computed."""


class OutputExistsError(MedfuseError, FileExistsError):
    """Something is in the output's way: the output exists and overwriting was not asked for, a name that differs
    only in letter case exists, a file or folder of the other kind is there, the output is an input, it appeared
    while writing, or an interrupted earlier write left files that block it.

    Only these: a caller that catches it (or :class:`FileExistsError`) to pick another name may do so safely.
    A write that fails for another reason raises :class:`OutputWriteError`.
    """


class OutputWriteError(_OSErrorFields):
    """The output could not be written, and nothing is in its way: the disk is full or over quota, permission
    denied, a read-only file system, a name or path too long, its folder missing, a file open in another program
    (Windows), and similar.

    Choosing another name does not help (unlike :class:`OutputExistsError`). :attr:`errno` is set where the cause
    is known (``errno.ENOSPC``, ``EACCES``, ``EROFS``, ``ENAMETOOLONG``, ``ENOENT``, ...), so callers can test it.

    Args:
        problem: what is wrong, in one sentence.
        errno: the cause's ``errno`` code, if known.
        fix: how the user can fix it.
        path: the file or folder concerned, if any.
    """


def _rebuild_write_error(cls, problem, code, fix, path):
    return cls(problem, errno=code, fix=fix, path=path)


class RegistrationError(MedfuseError):
    """Registration cannot run on these inputs (no overlap, constant image, ...)."""


class FusionError(MedfuseError):
    """Fusion cannot run on these inputs."""


class WeightsError(MedfuseError):
    """Model weights are missing, corrupt or do not match the model."""


class CancelledError(MedfuseError):
    """A long operation was cancelled through its cancel token.

    Args:
        problem: what was cancelled (default: "the operation was cancelled").
        **kw: ``fix`` and ``path``, as :class:`MedfuseError` takes them.
    """

    def __init__(self, problem: str = "the operation was cancelled", **kw):
        super().__init__(problem, **kw)


class MissingDependencyError(MedfuseError, ImportError):
    """An optional dependency is needed for this feature and is not installed."""

    @classmethod
    def for_package(cls, package: str, feature: str, extra: str) -> "MissingDependencyError":
        """The error for ``package`` failing to import: not installed, or installed but unloadable.

        Why the second: under a memory limit (``ulimit -v``, a cluster job's) torch's libraries fail to map
        ("failed to map segment from shared object"), and "not installed, pip install" sent users to reinstall
        a package they had. Called while handling the ImportError, whose text it quotes.
        """
        import importlib.util
        import re
        import sys

        # The top package: an ImportError's name is the submodule that failed (torch._C), whose spec cannot be
        # found once its parent fails to import. A name with an extra ("dask[distributed]") is several packages:
        # which one is missing is not told, so it keeps the plain advice.
        package = package if "[" in package else package.split(".")[0]
        try:
            installed = "[" not in package and importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):
            installed = False
        if not installed:
            return cls(f"{feature} needs the optional package '{package}', which is not installed",
                       fix=f"pip install 'medfuse[{extra}]'")
        why = sys.exc_info()[1]
        said = f" ({' '.join(str(why).split())[:300]})" if why is not None else ""
        return cls(f"{feature} needs the optional package '{package}', which is installed but could not be "
                   f"imported{said}",
                   fix=f"run python -c 'import {package}' to see why; a memory limit (ulimit -v, a job's memory "
                       f"request) too small for its libraries gives 'failed to map segment': raise it. Else "
                       f"reinstall it: pip install --force-reinstall 'medfuse[{extra}]'")


class MedfuseWarning(UserWarning):
    """Data was loaded or processed, but not in the way the user may assume (e.g. PET left in Bq/mL)."""


def reworded(text: str, advice) -> str:
    """``text`` with each ``(pattern, words)`` of ``advice`` replaced: a plain string or a compiled regular
    expression, in order. The command line and the napari plugin put medfuse's Python advice in their own words."""
    for pattern, words in advice:
        text = text.replace(pattern, words) if isinstance(pattern, str) else pattern.sub(words, text)
    return text
