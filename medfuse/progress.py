"""Progress reporting and cancellation shared by every long operation.

Long operations accept ``progress`` (a callable ``progress(fraction, message)``,
fraction in 0..1) and ``cancel`` (a :class:`CancelToken`). The CLI turns them into
a tqdm bar, the napari widget into a ``thread_worker`` progress bar with Cancel.
"""

from __future__ import annotations

import os
import re
import threading
from typing import Any, Callable, Optional, Union

from ._checks import describe
from .errors import CancelledError, InvalidInputError

ProgressFn = Callable[[float, str], None]

#: tqdm ``bar_format`` of the command line's text bars: ``fuse:  40%|####      | 00:12, register: level 2``.
#: tqdm puts ", " before a non-empty ``{postfix}`` itself (and nothing before an empty one), so the field must
#: follow ``{elapsed}`` directly: with a space before it the bar read ``00:12 , register`` (and ended in a space).
TEXT_BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {elapsed}{postfix}"

#: The text bar of a narrow terminal (a 40-cell braille line): no bar drawing and no clock, so that the message
#: has the room: `` 48% register, rigid: level 2/3``.
TEXT_BAR_FORMAT_NARROW = "{percentage:3.0f}% {desc}{postfix}"

#: The environment variable that turns off every progress bar of the command line (any value but empty, 0,
#: false, no or off), for a wrapper or a screen reader's user who wants none without a flag on each command.
NO_PROGRESS_ENV = "MEDFUSE_NO_PROGRESS"

_FALSE_WORDS = ("", "0", "false", "no", "off", "n")


def _env_true(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() not in _FALSE_WORDS


def text_bar_allowed() -> bool:
    """Whether the environment lets a command-line progress bar be drawn at all.

    No bar under ``MEDFUSE_NO_PROGRESS`` (:data:`NO_PROGRESS_ENV`), ``TQDM_DISABLE`` (tqdm's own switch, which an
    explicit ``disable=`` overrides: it was ignored) or ``TERM=dumb`` (a terminal that cannot move back over a
    line: an Emacs shell, a screen reader's plain console, where each redraw is a new line to read).
    """
    if _env_true(NO_PROGRESS_ENV) or _env_true("TQDM_DISABLE"):
        return False
    return os.environ.get("TERM", "").strip().lower() != "dumb"


def text_bar_ascii(stream: Any) -> Union[bool, str]:
    """tqdm's ``ascii=`` for a bar written to ``stream``: True (``#`` blocks) unless the block characters can be
    shown, or the alphabet ``TQDM_ASCII`` gives.

    Why: the locale says what the terminal shows, and under ``LC_ALL=C`` Python's UTF-8 mode still encodes the
    blocks (tqdm's own test passed), which a C terminal or braille display shows as garbage. ``TQDM_ASCII=1`` is
    a switch here: tqdm took it as a one-character alphabet and divided by zero.
    """
    given = os.environ.get("TQDM_ASCII")
    if given is not None and given.strip():
        word = given.strip().lower()
        if word in _FALSE_WORDS:
            return False
        # An alphabet has two characters at least (a blank and a full cell); a word like "1" or "yes" is a switch.
        return given if len(given) >= 2 and word not in ("true", "yes", "on") else True
    for name in ("LC_ALL", "LC_CTYPE", "LANG"):  # the first one set is the one in force
        value = os.environ.get(name, "")
        if value:
            if not re.search(r"utf-?8", value, re.IGNORECASE):
                return True
            break
    try:
        "\u2588\u258f".encode(getattr(stream, "encoding", None) or "ascii")
    except (UnicodeError, LookupError):
        return True
    return False


def cut_at_word(text: str, room: int) -> str:
    """``text`` in at most ``room`` characters, cut at a word boundary and ended with ``...`` when cut (a message
    cut mid-word, ``rigid: lev``, is what a braille line showed)."""
    if len(text) <= room:
        return text
    if room < 4:
        return ""
    head = text[:room - 3]
    if text[room - 3] != " " and " " in head:
        head = head.rsplit(" ", 1)[0]
    return head.rstrip(" ,;:") + "..."


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
