"""Background jobs for the dock widget: run medfuse in a napari ``thread_worker`` without freezing Qt.

Jobs never raise: they return an :class:`Outcome`, so napari's own error relay (a traceback notification)
never fires and the widget shows the clean ``MedfuseError.one_line()`` instead.
"""

from __future__ import annotations

import re
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional

from qtpy.QtCore import QObject, Signal


@dataclass
class Outcome:
    """What a job produced: ``value`` or ``error`` (the exception), never both."""

    value: Any = None
    error: Optional[BaseException] = None


#: Python/command-line advice in medfuse's messages, and what a napari user does instead (like ``_cli_error`` in
#: medfuse/cli.py does for the command line). Only the common ones; the rest is shown as medfuse words it.
_NAPARI_ADVICE = (
    (re.compile(r"\(medfuse\.register, or --register \w+ on the command line\)"),
     "(in the Register tab of the medfuse panel)"),
    (re.compile(r"numpy\.nan_to_num\(array, nan=0\.0, posinf=0\.0, neginf=0\.0\), for a Volume "
                r"v\.with_array\(numpy\.nan_to_num\(v\.array, nan=0\.0, posinf=0\.0, neginf=0\.0\)\); or save "
                r"the file with them set to 0"),
     "save the image with them set to 0 (in the program that made it) and open that file instead"),
    (re.compile(r"pass the folder \(or whole_series=True\)"),
     "open the series folder (File > Open Folder…) instead of one of its files"),
    (re.compile(r"pass initialise='geometry' to centre-align them first, or initial_transform= a known rough "
                r"alignment"),
     "move the moving layer over the fixed one (the transform mode in its layer controls), then run again with "
     "'start from the moving layer's placement in the viewer' ticked"),
    (re.compile(r"check its direction: it must map fixed points to moving points \(ITK convention\); a moving -> "
                r"fixed transform needs \.inverse\(\) first"),
     "move the moving layer over the fixed one (the transform mode in its layer controls) and run again, or untick "
     "'start from the moving layer's placement in the viewer'"),
    (re.compile(r"pass interpolation='nearest' to keep the labels and their integer type, or "
                r"interpolation='linear' to interpolate on purpose \(this warning then goes away\)"),
     "if it is a label map or mask, show it over the image as a Labels layer (right-click it in the layer list › "
     "Convert to Labels) rather than fusing or comparing it; if it is an image, this can be ignored"),
)


def napari_words(message: str) -> str:
    """``message`` with the Python/command-line fixes medfuse gives put in napari terms (see ``_NAPARI_ADVICE``)."""
    from medfuse.errors import reworded

    return reworded(message, _NAPARI_ADVICE)


def error_message(exc: BaseException, what: str) -> str:
    """One-line, identifier-free message for a notification, its fix in napari terms."""
    from medfuse.errors import MedfuseError

    if isinstance(exc, MedfuseError):
        return napari_words(exc.one_line())
    return f"{what} failed unexpectedly ({type(exc).__name__}: {' '.join(str(exc).split())[:300]})"


class ProgressRelay(QObject):
    """Carries ``progress(fraction, message)`` calls from the worker thread to the GUI thread.

    Qt queues a signal emitted from another thread, so the slots run in the GUI thread. Calls are
    throttled (a registration reports every iteration) except when the message's stage/level changes.
    """

    progressed = Signal(float, str)

    def __init__(self, *, min_interval_s: float = 0.05):
        super().__init__()
        self._min = float(min_interval_s)
        self._last_t = 0.0
        self._last_head = None

    def __call__(self, fraction: float, message: str = "") -> None:
        head = message.split(",")[0]
        now = time.monotonic()
        if head != self._last_head or now - self._last_t >= self._min or fraction >= 1.0:
            self._last_t, self._last_head = now, head
            self.progressed.emit(float(fraction), str(message))


#: Cancel tokens of the jobs still running (all widgets), cancelled when the application quits.
_RUNNING: "set[Any]" = set()
_QUIT_HOOKED = False
QUIT_WAIT_MS = 10_000  # how long quitting waits for cancelled jobs to reach their next check


def start(job: Callable[[], Any], on_done: Callable[[Outcome], None], *, cancel: Any = None):
    """Run ``job()`` in a napari thread worker and call ``on_done(Outcome)`` in the GUI thread.

    ``cancel`` (a :class:`medfuse.progress.CancelToken` the job polls) is cancelled if the application quits
    while the job runs.
    """
    from napari.qt.threading import create_worker

    def _safe():
        try:
            return Outcome(value=job())
        except BaseException as exc:  # noqa: BLE001 - reported as a notification by on_done
            return Outcome(error=exc)

    def _done(outcome: Outcome) -> None:
        _RUNNING.discard(cancel)
        try:
            on_done(outcome)
        except RuntimeError as exc:  # the widget was closed meanwhile: nothing left to update
            if "deleted" not in str(exc):
                raise

    _hook_quit()
    if cancel is not None:
        _RUNNING.add(cancel)
    worker = create_worker(_safe, _start_thread=False, _ignore_errors=True)
    worker.returned.connect(_done)
    worker.start()
    return worker


def cancel_jobs(tokens: Any = None) -> None:
    """Cancel the given tokens (default: every running job); jobs stop at their next check."""
    for token in list(_RUNNING if tokens is None else tokens):
        if token is not None:
            token.cancel()


def _on_quit() -> None:
    """Cancel every job and wait for the threads: Qt must not delete their signals under a running job."""
    from qtpy.QtCore import QThreadPool

    if not _RUNNING:
        return
    cancel_jobs()
    QThreadPool.globalInstance().waitForDone(QUIT_WAIT_MS)


def _hook_quit() -> None:
    global _QUIT_HOOKED
    if _QUIT_HOOKED:
        return
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    if app is not None:
        import atexit

        app.aboutToQuit.connect(_on_quit)
        atexit.register(_on_quit)  # a script that ends without the Qt event loop never emits aboutToQuit
        _QUIT_HOOKED = True
