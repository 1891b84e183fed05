"""Progress reporting and cancellation shared by every long operation.

Long operations accept ``progress`` (a callable ``progress(fraction, message)``,
fraction in 0..1) and ``cancel`` (a :class:`CancelToken`). The CLI turns them into
a tqdm bar, the napari widget into a ``thread_worker`` progress bar with Cancel.
"""

from __future__ import annotations

import threading
from typing import Callable, Optional

from ._checks import describe
from .errors import CancelledError, InvalidInputError

ProgressFn = Callable[[float, str], None]

#: tqdm ``bar_format`` of the command line's text bars: ``fuse:  40%|####      | 00:12, register: level 2``.
#: tqdm puts ", " before a non-empty ``{postfix}`` itself (and nothing before an empty one), so the field must
#: follow ``{elapsed}`` directly: with a space before it the bar read ``00:12 , register`` (and ended in a space).
TEXT_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"


class CancelToken:
    """A thread-safe flag that a UI sets and a worker polls."""

    def __init__(self) -> None:
        self._event = threading.Event()

    def cancel(self) -> None:
        """Ask the work polling this token to stop: its next check raises :class:`~medfuse.errors.CancelledError`.

        Safe to call from any thread, and more than once; a cancelled token stays cancelled.
        """
        self._event.set()

    @property
    def cancelled(self) -> bool:
        """True once :meth:`cancel` was called."""
        return self._event.is_set()

    def raise_if_cancelled(self, what: str = "the operation") -> None:
        """Raise if :meth:`cancel` was called; else return (what a worker calls between steps).

        Args:
            what: what was cancelled, for the message (``"<what> was cancelled"``).

        Raises:
            CancelledError: the token was cancelled.
        """
        if self._event.is_set():
            raise CancelledError(f"{what} was cancelled")


def report(progress: Optional[ProgressFn], fraction: float, message: str = "") -> None:
    """Call ``progress`` if given; never let a UI callback's failure kill the computation."""
    if progress is None:
        return
    try:
        progress(float(min(1.0, max(0.0, fraction))), message)
    except CancelledError:
        raise
    except Exception:  # noqa: BLE001 - a broken progress bar must not lose a result
        pass


def check(cancel: Optional[CancelToken], what: str = "the operation") -> None:
    """Raise :class:`CancelledError` if ``cancel`` was set."""
    if cancel is not None:
        cancel.raise_if_cancelled(what)


def check_callbacks(progress=None, cancel=None) -> None:
    """Refuse a ``progress`` that cannot be called or a ``cancel`` that is no :class:`CancelToken`, up front.

    Why: :func:`report` swallows a progress callback's errors (a broken bar must not lose a result), so
    ``progress=3`` used to pass silently; a wrong ``cancel`` raised an AttributeError at its first check, which
    may come after minutes of work.

    Raises:
        InvalidInputError: either one of the wrong kind.
    """
    if progress is not None and not callable(progress):
        raise InvalidInputError(f"progress must be a function progress(fraction, message), got {describe(progress)}",
                                fix="pass e.g. progress=lambda f, msg: print(f\"{f:.0%} {msg}\"), or leave it out")
    if cancel is not None and not callable(getattr(cancel, "raise_if_cancelled", None)):
        raise InvalidInputError(f"cancel must be a medfuse.progress.CancelToken, got {describe(cancel)}",
                                fix="pass cancel=medfuse.progress.CancelToken(), or leave it out")
